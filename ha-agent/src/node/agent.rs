//! The node agent's life: register the node and its host NQNs with the cluster agent (again every heartbeat it
//! asks for, and at once when a new host NQN shows up: reports are taken only from registered nodes), scan sysfs
//! every poll interval (no busy loop), keep the path metrics, and for each subsystem with a broken path run one
//! switch-over at a time: report it to the cluster agent (retried with backoff until acknowledged), connect the
//! target it answers with, wait for that path to be live, then delete the dead controller so the kernel stops
//! reconnecting to a dead address. The block device stays the same multipath head (same subsystem NQN and
//! namespace), so a mounted file system sees only a pause. A report refused because the volume is no longer
//! published to the node ends in [`super::unpublished`] instead, which removes its dead paths.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use super::fabrics::{self, Connect};
use super::metrics::NodeMetrics;
use super::paths::{Broken, PathTracker};
use super::sysfs;
use super::unpublished;

#[derive(Clone, Debug)]
pub struct NodeAgentConfig {
    /// This node's name, as reports give it.
    pub node: String,
    /// Host NQNs registered besides those seen on Keelson controllers.
    pub host_nqns: Vec<String>,
    /// Cluster agent URLs (`http://host:port`), tried in order.
    pub cluster_agents: Vec<String>,
    /// Where sysfs is (`/sys`).
    pub sys: PathBuf,
    /// The fabrics device (`/dev/nvme-fabrics`).
    pub fabrics: PathBuf,
    /// How often sysfs is read.
    pub poll: Duration,
    /// How long a path stays unusable before it is reported.
    pub grace: Duration,
    /// How long a live path may hold I/O with none completing before it counts as broken (zero: never).
    pub stall: Duration,
    /// Keep-alive timeout of the paths it connects, seconds.
    pub keep_alive_tmo: u32,
    /// How long a new path gets to become live.
    pub live_timeout: Duration,
}

/// Longest wait between two reports of one failure, and between two switch-over attempts of one subsystem.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Longest wait before a refused report is made again. A refusal usually means the old engine still counts the
/// host as connected (a cut link, until the target's keep-alive watchdog drops it, one keep-alive timeout later),
/// and asking again costs the cluster agent one engine call.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Longest wait before a report refused for a volume the cluster agent does not know (deleted) or a request it calls
/// bad is made again: asking again soon changes nothing, and each costs a report and a registration.
const UNKNOWN_BACKOFF_MAX: Duration = Duration::from_secs(60);
const UNKNOWN_BACKOFF_FIRST: Duration = Duration::from_secs(5);

/// How one switch-over attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// A usable path to the volume's nexus.
    Done,
    /// The cluster agent refused the report (the path is not broken from the target's side, or not its nexus).
    Refused,
    /// The cluster agent does not know the volume (deleted), or calls the report bad: asked again rarely.
    RefusedForGood,
    /// Anything else: the new path did not come up, the nexus stayed, the agent stopped.
    Failed,
}

/// Connect attempts per new path.
const CONNECT_TRIES: u32 = 5;

/// Runs until `stop` fires.
pub async fn run(cfg: NodeAgentConfig, metrics: Arc<NodeMetrics>, stop: CancellationToken) {
    let mut tracker = PathTracker::new(cfg.grace, cfg.stall);
    // Subsystems with a switch-over running, and when each may be tried again after a failed one.
    let busy: Arc<Mutex<BTreeMap<String, bool>>> = Arc::default();
    let mut retry: BTreeMap<String, (Instant, Duration)> = BTreeMap::new();
    let done = Arc::new(tokio::sync::Mutex::new(Vec::<(String, Outcome)>::new()));
    // Connected ahead, so that the first report does not pay for it.
    let clients = Arc::new(AgentClients::default());
    {
        let (clients, urls) = (clients.clone(), cfg.cluster_agents.clone());
        tokio::spawn(async move {
            for u in urls {
                let _ = clients.get(&u).await;
            }
        });
    }
    // Host NQNs seen on Keelson controllers; a new one is registered at once.
    let seen_hosts: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let register_now = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(keep_registered(
        cfg.clone(),
        clients.clone(),
        metrics.clone(),
        seen_hosts.clone(),
        register_now.clone(),
        stop.clone(),
    ));
    let mut tick = tokio::time::interval(cfg.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The subsystems could not be read at the last scan (told once, not at every tick).
    let mut unreadable = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (nqn, outcome) in done.lock().await.drain(..) {
            busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&nqn);
            if outcome == Outcome::Done {
                retry.remove(&nqn);
            } else {
                let (first, max) = match outcome {
                    Outcome::Refused => (Duration::from_millis(200), REFUSED_BACKOFF_MAX),
                    Outcome::RefusedForGood => (UNKNOWN_BACKOFF_FIRST, UNKNOWN_BACKOFF_MAX),
                    _ => (Duration::from_millis(200), BACKOFF_MAX),
                };
                let wait = retry
                    .get(&nqn)
                    .map_or(first, |(_, w)| (*w * 2).clamp(first, max));
                retry.insert(nqn, (Instant::now() + wait, wait));
            }
        }
        let sys = cfg.sys.clone();
        let scan = match tokio::task::spawn_blocking(move || sysfs::scan_checked(&sys)).await {
            Ok(Ok(scan)) => {
                unreadable = false;
                scan
            }
            // Not looked at this time: nothing is taken as gone or as broken from a scan that did not happen.
            Ok(Err(e)) => {
                if !std::mem::replace(&mut unreadable, true) {
                    tracing::warn!(error = %e, "the kernel's NVMe subsystems could not be read; asked again");
                }
                continue;
            }
            Err(_) => continue,
        };
        {
            let mut seen = seen_hosts.lock().unwrap_or_else(|e| e.into_inner());
            let before = seen.len();
            seen.extend(
                scan.iter()
                    .flat_map(|s| s.controllers.iter().map(|c| c.host_nqn.clone()))
                    .filter(|h| !h.is_empty()),
            );
            if seen.len() != before {
                register_now.notify_one();
            }
        }
        let broken = tracker.observe(&scan, Instant::now(), SystemTime::now());
        metrics.paths(&scan, &tracker.stalled());
        // A failure over (its path usable again, or gone with its volume) takes its backoff with it: the next one
        // starts afresh, not where the last one's refusals left it.
        {
            let busy = busy.lock().unwrap_or_else(|e| e.into_inner());
            retry.retain(|nqn, _| busy.contains_key(nqn) || broken.iter().any(|b| &b.nqn == nqn));
        }
        for b in broken {
            if retry
                .get(&b.nqn)
                .is_some_and(|(at, _)| Instant::now() < *at)
            {
                continue;
            }
            {
                let mut busy = busy.lock().unwrap_or_else(|e| e.into_inner());
                if busy.contains_key(&b.nqn) {
                    continue;
                }
                busy.insert(b.nqn.clone(), true);
            }
            let (cfg, metrics, done, stop, clients, register_now) = (
                cfg.clone(),
                metrics.clone(),
                done.clone(),
                stop.clone(),
                clients.clone(),
                register_now.clone(),
            );
            tokio::spawn(async move {
                let nqn = b.nqn.clone();
                let outcome = tokio::select! {
                    _ = stop.cancelled() => Outcome::Failed,
                    r = switch_over(&cfg, &clients, &metrics, &register_now, b) => r,
                };
                done.lock().await.push((nqn, outcome));
            });
        }
    }
}

/// Connections to the cluster agents, kept between reports (a new HTTP/2 connection per report cost a guest more
/// than the switch-over itself) and dropped when a call fails for want of a connection.
#[derive(Default)]
pub struct AgentClients {
    by_url: Mutex<BTreeMap<String, ClusterClient<Channel>>>,
    /// The agent that answered last (the leader, as far as this node knows): asked first.
    leader: Mutex<Option<String>>,
}

impl AgentClients {
    /// `urls`, the one that answered last first: followers listed before the leader (one on a dead node costs a
    /// connect timeout) are not asked before it every time.
    fn in_order(&self, urls: &[String]) -> Vec<String> {
        let leader = self
            .leader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out: Vec<String> = leader
            .iter()
            .filter(|l| urls.contains(l))
            .cloned()
            .collect();
        out.extend(urls.iter().filter(|u| Some(*u) != leader.as_ref()).cloned());
        out
    }

    /// `url` answered as the leader does.
    fn answered(&self, url: &str) {
        *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = Some(url.to_string());
    }

    /// Whether a failed call says the connection itself failed (to be made again), not an answer from the agent (a
    /// follower's "not leading" is Unavailable too, over a connection worth keeping).
    fn connection_failed(s: &tonic::Status) -> bool {
        std::error::Error::source(s).is_some()
    }

    async fn get(&self, url: &str) -> Result<ClusterClient<Channel>, tonic::transport::Error> {
        if let Some(c) = self
            .by_url
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(url)
        {
            return Ok(c.clone());
        }
        // A switch-over takes the agent seconds at most (engine calls time out); a connection gone silent is found
        // by HTTP/2 keep-alives.
        let ch = tonic::transport::Endpoint::from_shared(url.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(15))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        let c = ClusterClient::new(ch);
        self.by_url
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(url.to_string(), c.clone());
        Ok(c)
    }

    fn forget(&self, url: &str) {
        self.by_url
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(url);
    }
}

/// Registers this node and its host NQNs with the cluster agent, then again every heartbeat the agent asks for
/// (with backoff while none answers), and at once when `now` is notified (a new host NQN, a report refused for an
/// unregistered node).
async fn keep_registered(
    cfg: NodeAgentConfig,
    clients: Arc<AgentClients>,
    metrics: Arc<NodeMetrics>,
    seen: Arc<Mutex<BTreeSet<String>>>,
    now: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut host_nqns: BTreeSet<String> = cfg.host_nqns.iter().cloned().collect();
        host_nqns.extend(
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        let req = pb::RegisterHostRequest {
            node: cfg.node.clone(),
            host_nqns: host_nqns.into_iter().collect(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        let mut wait = None;
        let mut last = String::new();
        for url in &clients.in_order(&cfg.cluster_agents) {
            match clients.get(url).await {
                Ok(mut c) => match c.register_host(req.clone()).await {
                    Ok(r) => {
                        clients.answered(url);
                        let every = Duration::from_millis(r.into_inner().heartbeat_ms.max(1000));
                        wait = Some(every);
                        break;
                    }
                    Err(s) => {
                        if AgentClients::connection_failed(&s) {
                            clients.forget(url);
                        }
                        last = format!("{url}: {:?} {}", s.code(), s.message());
                    }
                },
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        metrics.registered(wait.is_some());
        let wait = match wait {
            Some(w) => {
                backoff = Duration::from_millis(200);
                w
            }
            None => {
                tracing::warn!(why = %last, retry_in_ms = backoff.as_millis() as u64, "registration not taken");
                let w = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                w
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = now.notified() => {}
        }
    }
}

/// Why the cluster agent refused a report.
struct Refusal {
    /// The volume is not published to the reporting host: the path is stale.
    not_published_here: bool,
    /// NOT_FOUND or INVALID_ARGUMENT: asking again soon would change nothing.
    lasting: bool,
}

/// Reports `b` until acknowledged, or until the cluster agent refuses it.
async fn report(
    cfg: &NodeAgentConfig,
    clients: &AgentClients,
    metrics: &NodeMetrics,
    register_now: &tokio::sync::Notify,
    b: &Broken,
) -> Result<pb::Volume, Refusal> {
    let req = pb::ReportPathFailureRequest {
        node: cfg.node.clone(),
        host_nqn: b.controller.host_nqn.clone(),
        nqn: b.nqn.clone(),
        address: b.controller.address.clone(),
        seen_unix_ms: b
            .seen
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut last = String::new();
        for url in &clients.in_order(&cfg.cluster_agents) {
            let mut c = match clients.get(url).await {
                Ok(c) => c,
                Err(e) => {
                    metrics.report("unreachable");
                    last = format!("{url}: {e}");
                    continue;
                }
            };
            match c.report_path_failure(req.clone()).await {
                Ok(v) => {
                    metrics.report("ok");
                    clients.answered(url);
                    return Ok(v.into_inner());
                }
                Err(s) => {
                    metrics.report(&format!("{:?}", s.code()));
                    if AgentClients::connection_failed(&s) {
                        clients.forget(url);
                    }
                    if matches!(
                        s.code(),
                        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition
                    ) {
                        // Perhaps not registered (yet, or with this host): register again before the next try.
                        register_now.notify_one();
                        tracing::warn!(nqn = %b.nqn, address = %b.controller.address, code = ?s.code(), why = %s.message(), "the cluster agent refused the report");
                        let to = s.metadata().get(proto::names::NOT_PUBLISHED_TO);
                        return Err(Refusal {
                            lasting: matches!(s.code(), Code::NotFound | Code::InvalidArgument),
                            not_published_here: s.code() == Code::FailedPrecondition
                                && to.is_some_and(|h| {
                                    h.as_bytes() == b.controller.host_nqn.as_bytes()
                                }),
                        });
                    }
                    last = format!("{url}: {}", s.message());
                }
            }
        }
        tracing::warn!(nqn = %b.nqn, why = %last, retry_in_ms = backoff.as_millis() as u64, "report not acknowledged");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The targets of `s`'s paths that `host` keeps: its controllers not being deleted (one being deleted takes no I/O,
/// and one of another host NQN is not this host's path). `None` when every path is gone or going (the volume being
/// unstaged: its last paths deleted): connecting a new one would bring back a path nobody uses, reconnecting for
/// ever once the volume is unpublished.
fn paths_kept(s: &sysfs::Subsystem, host: &str) -> Option<Vec<String>> {
    if s.controllers.iter().all(sysfs::Controller::being_deleted) {
        return None;
    }
    Some(
        s.controllers
            .iter()
            .filter(|c| !c.being_deleted() && c.host_nqn == host)
            .map(|c| c.target())
            .collect(),
    )
}

/// One switch-over of `b`'s subsystem.
async fn switch_over(
    cfg: &NodeAgentConfig,
    clients: &AgentClients,
    metrics: &NodeMetrics,
    register_now: &tokio::sync::Notify,
    b: Broken,
) -> Outcome {
    tracing::warn!(nqn = %b.nqn, controller = %b.controller.name, address = %b.controller.address, state = %b.controller.state, "broken path: reporting it");
    let reported = Instant::now();
    let v = match report(cfg, clients, metrics, register_now, &b).await {
        Ok(v) => v,
        Err(refusal) => {
            if refusal.not_published_here && unpublished::remove_stale_path(cfg, &b).await {
                metrics.switchover("unpublished", None);
                return Outcome::Done;
            }
            metrics.switchover("refused", None);
            return if refusal.lasting {
                Outcome::RefusedForGood
            } else {
                Outcome::Refused
            };
        }
    };
    let acknowledged = reported.elapsed();
    let targets: Vec<String> = v
        .target_addresses
        .iter()
        .map(|a| proto::names::target_address(a))
        .collect();
    let broken_at = b.controller.target();
    if targets.is_empty() || targets.contains(&broken_at) {
        tracing::info!(nqn = %b.nqn, ?targets, "the volume's nexus stays where it is: the kernel reconnects to it");
        metrics.switchover("unchanged", None);
        return Outcome::Failed;
    }
    let sys = cfg.sys.clone();
    let scan = |sys: PathBuf, nqn: String| async move {
        tokio::task::spawn_blocking(move || sysfs::scan(&sys).into_iter().find(|s| s.nqn == nqn))
            .await
            .ok()
            .flatten()
    };
    let Some(have) = scan(sys.clone(), b.nqn.clone())
        .await
        .and_then(|s| paths_kept(&s, &b.controller.host_nqn))
    else {
        tracing::info!(nqn = %b.nqn, "the volume's paths are gone from this node: nothing to connect");
        metrics.switchover("unchanged", None);
        return Outcome::Failed;
    };
    // Whether a path to a target is there or was made: without one, nothing can turn live, and the live wait below
    // would only hold the I/O longer before the next report.
    let mut any = targets.iter().any(|t| have.contains(t));
    for t in targets.iter().filter(|t| !have.contains(t)) {
        let c = Connect {
            nqn: v.nqn.clone(),
            address: t.clone(),
            host_nqn: b.controller.host_nqn.clone(),
            host_id: b.controller.host_id.clone(),
            keep_alive_tmo: cfg.keep_alive_tmo,
        };
        let fabrics = cfg.fabrics.clone();
        let connect =
            move || fabrics::connect_retrying(CONNECT_TRIES, &c, |c| fabrics::connect(&fabrics, c));
        match tokio::task::spawn_blocking(connect).await {
            Ok(Ok(n)) => {
                any = true;
                tracing::info!(nqn = %v.nqn, address = %t, instance = n.instance, cntlid = n.cntlid, "new path connected");
            }
            Ok(Err(e)) => {
                tracing::warn!(nqn = %v.nqn, address = %t, error = %e, "connecting the new path failed")
            }
            Err(e) => tracing::warn!(error = %e, "connect task failed"),
        }
    }
    let connected = reported.elapsed();
    if !any {
        tracing::warn!(nqn = %b.nqn, ?targets, "no new path connected");
        metrics.switchover("failed", None);
        return Outcome::Failed;
    }
    // Live first, then the dead one goes: deleting the last path would remove the block device.
    let t0 = Instant::now();
    let live = loop {
        if let Some(s) = scan(sys.clone(), b.nqn.clone()).await
            && s.controllers.iter().any(|c| {
                c.usable() && targets.contains(&c.target()) && c.host_nqn == b.controller.host_nqn
            })
        {
            break Some(s);
        }
        if t0.elapsed() > cfg.live_timeout {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let Some(s) = live else {
        tracing::warn!(nqn = %b.nqn, ?targets, "no new path became live");
        metrics.switchover("failed", None);
        return Outcome::Failed;
    };
    let took = b.seen_at.elapsed();
    metrics.switchover("ok", Some(took));
    // Stages, from the failure first seen: reported (the grace period and the scan), acknowledged (the cluster
    // agent's switch-over), connected, live (the kernel's namespace scan of the new path).
    tracing::info!(
        nqn = %b.nqn,
        ?targets,
        report_ms = (reported - b.seen_at).as_millis() as u64,
        switchover_ms = acknowledged.as_millis() as u64,
        connect_ms = (connected - acknowledged).as_millis() as u64,
        live_ms = (reported.elapsed() - connected).as_millis() as u64,
        took_ms = took.as_millis() as u64,
        "switched over: the new path is live"
    );
    for c in s
        .controllers
        .iter()
        .filter(|c| !targets.contains(&c.target()) && c.host_nqn == b.controller.host_nqn)
    {
        let (sys, name) = (cfg.sys.clone(), c.name.clone());
        if c.state == "live" {
            // A live old path (its target silent, not gone): deleting it would wait for the I/O it holds until the
            // kernel's I/O timeout (30 s). A reset tears its queues down first, and that I/O moves to the new path.
            // Linux 6.1 starts the reset only once an outstanding keep-alive has timed out (at most one keep-alive
            // timeout, which is why the paths use a short one); the write returns when the reset is over.
            let (sys, name) = (sys.clone(), name.clone());
            if let Ok(Err(e)) =
                tokio::task::spawn_blocking(move || fabrics::reset(&sys, &name)).await
            {
                tracing::warn!(controller = %c.name, error = %e, "resetting the silent path failed");
            }
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(2) {
                let still_live = scan(cfg.sys.clone(), b.nqn.clone()).await.is_some_and(|s| {
                    s.controllers
                        .iter()
                        .any(|x| x.name == c.name && x.state == "live")
                });
                if !still_live {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        match tokio::task::spawn_blocking(move || fabrics::delete(&sys, &name)).await {
            Ok(Ok(())) => {
                tracing::info!(controller = %c.name, address = %c.address, "dead path removed")
            }
            Ok(Err(e)) => {
                tracing::warn!(controller = %c.name, error = %e, "removing the dead path failed")
            }
            Err(e) => tracing::warn!(error = %e, "delete task failed"),
        }
    }
    Outcome::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent that answered last is asked first; before, every report and heartbeat went through the agents in
    /// their configured order, and a follower listed first was dialled again each time (its connection dropped on
    /// its "not leading" answer), a dead one costing a connect timeout per report.
    #[test]
    fn the_agent_that_answered_last_is_asked_first() {
        let c = AgentClients::default();
        let urls: Vec<String> = ["http://a", "http://b", "http://c"]
            .map(String::from)
            .into();
        assert_eq!(c.in_order(&urls), urls);
        c.answered("http://b");
        assert_eq!(c.in_order(&urls), ["http://b", "http://a", "http://c"]);
        // One no longer configured is not asked.
        c.answered("http://gone");
        assert_eq!(c.in_order(&urls), urls);
        assert!(!AgentClients::connection_failed(
            &tonic::Status::unavailable("this cluster agent does not lead (yet); try another")
        ));
    }

    /// A switch-over finding the volume's last paths being deleted (an unstage under way) connects nothing; one
    /// finding a path to the new target that is being deleted, or is another host's, connects its own. Before, any
    /// controller counted: the unstaged volume got a path back, or the host waited for one that never took I/O.
    #[test]
    fn paths_being_deleted_or_of_another_host_are_not_kept() {
        let c = |name: &str, state: &str, port: u16, host: &str| sysfs::Controller {
            name: name.into(),
            state: state.into(),
            address: format!("traddr=127.0.0.1,trsvcid={port}"),
            host_nqn: host.into(),
            ..Default::default()
        };
        let s = |controllers| sysfs::Subsystem {
            nqn: "nqn.2026-11.io.keelson:vol-x".into(),
            controllers,
            ..Default::default()
        };
        let (h, other) = (
            "nqn.2026-11.io.keelson:host-a",
            "nqn.2026-11.io.keelson:host-b",
        );
        assert_eq!(
            paths_kept(&s(vec![c("nvme0", "deleting", 4420, h)]), h),
            None
        );
        assert_eq!(
            paths_kept(
                &s(vec![
                    c("nvme0", "connecting", 4420, h),
                    c("nvme1", "deleting (no IO)", 4421, h),
                    c("nvme2", "live", 4421, other),
                ]),
                h
            ),
            Some(vec!["127.0.0.1:4420".to_string()])
        );
    }
}
