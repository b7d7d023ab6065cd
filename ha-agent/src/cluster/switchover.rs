//! HA switch-over: a node agent reports that its host's path to a volume's nexus broke, and the nexus moves to
//! another live node. Persisted stage by stage: the report is recorded ([`SwitchoverRecord`]), the old nexus ended
//! when its engine answers (which drains it), the new one recorded with a new reservation key, created over the
//! in-sync replicas whose nodes are up (preempting the old key on every replica before it takes I/O, so the old
//! nexus, even running, can never write again), exported, and the record cleared. An agent that dies anywhere in
//! it finishes it when it next heals the volume; a nexus left on a node that was away is destroyed by the
//! stale-nexus reconciler when that node answers.
//!
//! A report is checked before anything moves: it must name a published volume, come for the host the volume is
//! published to, and name an address of the current nexus (a report for an earlier nexus gets the current target:
//! duplicate reports of one failure cause one switch-over). If the nexus's engine answers, exports the volume and
//! still has a controller of that host connected, the path is not broken from the target's side and nothing moves;
//! one that exports it without the host's controller is watched for [`RECONNECT_WAIT`] first, as a host whose path
//! was only reset (a brief network stall that outlasted the keep-alive) connects again within its reconnect delay,
//! and moving a healthy nexus for it would disown its node's replicas and rebuild them elsewhere.
//! If it did not answer that check in time (frozen, or cut off from the agent too), ending the old nexus is not
//! waited for a second time: the fencing alone keeps it from writing, and it is destroyed when its node answers.

use std::time::Duration;

use proto::engine as epb;
use proto::names;
use tokio::time::Instant;
use uuid::Uuid;

use super::failpoint;
use super::node::{self, NodeState};
use super::volume::{SwitchoverRecord, VolumePhase, VolumeRecord};
use super::volumes::{NexusEnd, VolumeError, Volumes};

/// How long a host whose controller the old nexus's engine exports the volume without gets to connect again before
/// its report moves the nexus. Keelson's paths reconnect 1 s after a reset (`reconnect_delay=1`), and the report is
/// sent as soon as the path is seen down (the node agent's grace is 0 by default): a reset path is back well within
/// this, a path that cannot reach the target is moved this much later.
pub(crate) const RECONNECT_WAIT: Duration = Duration::from_millis(2500);

/// How often the engine is asked again meanwhile.
const RECONNECT_POLL: Duration = Duration::from_millis(200);

/// What the old nexus's engine said when a report was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OldEngine {
    /// It still has a controller of the reporting host: the path is not broken from its side.
    HostConnected,
    /// It exports the volume without one.
    HostGone,
    /// It answered and does not export the volume (restarted, or its nexus ended): no path to it can come back.
    NotExported,
    /// It did not answer in time, or could not be reached.
    Silent,
}

/// What a node agent saw.
#[derive(Clone, Debug)]
pub struct PathReport {
    /// The reporting node (where the host runs).
    pub node: String,
    pub host_nqn: String,
    /// The subsystem NQN of the volume.
    pub nqn: String,
    /// The address of the broken path, `ip:port`.
    pub address: String,
    pub seen_ms: u64,
}

impl Volumes {
    /// Checks a report and switches the volume's nexus over when it holds; returns the volume as it is now (its
    /// nexus's NQN and addresses are where the host connects).
    pub async fn report_path_failure(&self, rep: PathReport) -> Result<VolumeRecord, VolumeError> {
        let uuid = rep
            .nqn
            .strip_prefix(&names::volume_nqn(""))
            .and_then(|u| Uuid::parse_str(u).ok())
            .ok_or_else(|| {
                VolumeError::InvalidArgument(format!("{:?} is not a Keelson volume's NQN", rep.nqn))
            })?;
        if rep.node.is_empty() || !rep.host_nqn.starts_with("nqn.") || rep.address.is_empty() {
            return Err(VolumeError::InvalidArgument(
                "a report needs the node, the host NQN and the failed address".into(),
            ));
        }
        let address = names::target_address(&rep.address);
        let lock = self.lock_of(uuid);
        let mut waited = false;
        loop {
            let held = lock.lock().await;
            let mut r = self.get(uuid).await?;
            if r.phase != VolumePhase::Created {
                return Err(VolumeError::FailedPrecondition {
                    uuid,
                    why: "it is not a created volume".into(),
                });
            }
            // Not the reporting host's (any more): its node agent removes the stale paths. A nexus on record that is
            // not made yet (a publish or switch-over under way) still counts as the volume's, for its hosts.
            // A nexus being unpublished is no host's any more: a report about it moves nothing (a switch-over would
            // publish the volume again, to a host the CO detached).
            let Some(nexus) = r
                .nexus
                .clone()
                .filter(|n| n.has_host(&rep.host_nqn) && !n.unpublishing)
            else {
                return Err(VolumeError::NotPublishedTo {
                    uuid,
                    host: rep.host_nqn,
                    published_to: r.nexus.map(|n| n.hosts()).unwrap_or_default(),
                });
            };
            if let Some(s) = r.switchover.clone() {
                tracing::info!(%uuid, from = %s.from, "a switch-over is already under way: finishing it");
                return self.finish_switchover(r, &s, true).await;
            }
            let mut address = address.clone();
            if !nexus
                .addresses
                .iter()
                .any(|a| names::target_address(a) == address)
            {
                // The host reports a path to an earlier nexus: the current one is its answer, unless the current one's
                // node is down (it never reached it, or lost it before it had a path there): then that path will not
                // come either, and the report stands for it.
                let current_up = self
                    .registry
                    .get(&nexus.node)
                    .await
                    .is_ok_and(|n| n.record.status.state == NodeState::Online);
                match nexus.addresses.first() {
                    Some(a) if !current_up => {
                        tracing::warn!(%uuid, reported = %address, now = ?nexus.addresses, node = %rep.node, "a broken path to an earlier nexus, and the current one's node is down: switching it over");
                        address = names::target_address(a);
                    }
                    _ => {
                        tracing::info!(%uuid, reported = %address, now = ?nexus.addresses, node = %rep.node, "a broken path to an earlier nexus: the current one is the answer");
                        return Ok(r);
                    }
                }
            }
            let mut old_engine = self.host_connected(uuid, &nexus.node, &rep.host_nqn).await;
            if old_engine == OldEngine::HostGone && !waited {
                // Watched without the volume's lock (a fault question of the volume is answered meanwhile), then
                // everything checked again.
                drop(held);
                old_engine = self
                    .host_reconnected(uuid, &nexus.node, &rep.host_nqn)
                    .await;
                waited = true;
                if old_engine != OldEngine::HostConnected {
                    continue;
                }
            }
            let again = if waited { " again" } else { "" };
            if old_engine == OldEngine::HostConnected {
                return Err(VolumeError::FailedPrecondition {
                    uuid,
                    why: format!(
                        "its nexus on {} answers and {} is connected to it{again}: the path is not broken from the target's side",
                        nexus.node, rep.host_nqn
                    ),
                });
            }
            // With nowhere to go, nothing is recorded: a switch-over on record holds fault consent and healing off.
            if !self.elsewhere_up(&nexus.node).await? {
                return Err(nowhere(uuid, &nexus.node));
            }
            let s = SwitchoverRecord {
                from: nexus.node.clone(),
                reporter: rep.node.clone(),
                address,
                seen_ms: rep.seen_ms,
                reported_ms: node::now_ms(),
                old_ended: None,
                old_replicas_left: false,
            };
            tracing::warn!(%uuid, from = %s.from, reporter = %s.reporter, address = %s.address, "path reported broken: switching the nexus over");
            r.switchover = Some(s.clone());
            self.save(&r).await?;
            failpoint::at(failpoint::SWITCHOVER_REPORTED);
            return self
                .finish_switchover(r, &s, old_engine != OldEngine::Silent)
                .await;
        }
    }

    /// Asks `node`'s engine again until `host` is connected to the volume's nexus there, or the nexus is not
    /// exported any more, or for [`RECONNECT_WAIT`]: the last answer. An engine that misses an answer (Silent: one
    /// call timed out, it was busy) is asked again within the wait: one missed answer of an engine that answered
    /// before does not cut the host's time to connect again short.
    async fn host_reconnected(&self, uuid: Uuid, node: &str, host: &str) -> OldEngine {
        let until = Instant::now() + RECONNECT_WAIT;
        loop {
            tokio::time::sleep(RECONNECT_POLL).await;
            let now = self.host_connected(uuid, node, host).await;
            let settled = matches!(now, OldEngine::HostConnected | OldEngine::NotExported);
            if settled || Instant::now() >= until {
                if now == OldEngine::HostConnected {
                    tracing::info!(%uuid, node, host, "the reported host connected to the nexus again: nothing moves");
                }
                return now;
            }
        }
    }

    /// Whether `node`'s engine exports the volume's nexus with a controller of `host` connected.
    async fn host_connected(&self, uuid: Uuid, node: &str, host: &str) -> OldEngine {
        if failpoint::answers(failpoint::SWITCHOVER_OLD_ENGINE_SILENT) {
            return OldEngine::Silent;
        }
        let Ok(mut c) = self.engine(node).await else {
            return OldEngine::Silent;
        };
        let nqn = names::volume_nqn(&uuid.to_string());
        match c.list_subsystems(epb::ListSubsystemsRequest {}).await {
            Err(_) => OldEngine::Silent,
            Ok(l) => {
                let l = l.into_inner();
                let mut exports = l.subsystems.iter().filter(|s| s.nqn == nqn).peekable();
                if exports.peek().is_none() {
                    OldEngine::NotExported
                } else if exports.any(|s| s.controllers.iter().any(|c| c.host_nqn == host)) {
                    OldEngine::HostConnected
                } else {
                    OldEngine::HostGone
                }
            }
        }
    }

    /// Whether the volume's nexus lists a healthy child whose replica is not on `from`.
    async fn healthy_elsewhere(&self, r: &VolumeRecord, from: &str) -> bool {
        let Some(n) = r.nexus.as_ref() else {
            return false;
        };
        let Ok(mut c) = self.engine(&n.node).await else {
            return false;
        };
        let Ok(listed) = c.list_nexuses(epb::ListNexusesRequest {}).await else {
            return false;
        };
        listed
            .into_inner()
            .nexuses
            .iter()
            .filter(|x| x.uuid == r.uuid.to_string())
            .flat_map(|x| &x.children)
            .filter(|c| c.state == epb::ChildState::Healthy as i32)
            .filter_map(|c| super::heal::replica_of(&c.uri))
            .any(|id| r.replicas.iter().any(|x| x.uuid == id && x.node != from))
    }

    /// Whether a node other than `from` is Online and uncordoned: somewhere a nexus could move to.
    async fn elsewhere_up(&self, from: &str) -> Result<bool, VolumeError> {
        Ok(self.registry.list().await?.iter().any(|n| {
            n.record.spec.name != from
                && n.record.status.state == NodeState::Online
                && !n.record.cordoned
        }))
    }

    /// The stages after the report: the old nexus ended if its engine answers (asked only when `ask_old`), the new
    /// one made elsewhere, the old node's replicas it leaves out disowned. Each stage is recorded in the switch-over
    /// record before the next, so a retry (healing's, or a restarted agent's) goes on from where this one stopped.
    pub(super) async fn finish_switchover(
        &self,
        r: VolumeRecord,
        s: &SwitchoverRecord,
        ask_old: bool,
    ) -> Result<VolumeRecord, VolumeError> {
        let uuid = r.uuid;
        let mut r = r;
        let mut s = s.clone();
        let t = std::time::Instant::now();
        // Published elsewhere already: an attempt died before it disowned the replicas it left out. Unless the node
        // it went to is down since (before the new nexus had a healthy child there): then it moves on again, as a
        // report of its path would move it were this switch-over not on record (never back to the node it left;
        // the replicas it then leaves out are fenced by the next nexus when they join it).
        let moved = match r.nexus.as_ref().filter(|n| n.published && n.node != s.from) {
            Some(n) => self
                .registry
                .get(&n.node)
                .await
                .is_ok_and(|x| x.record.status.state == NodeState::Online),
            None => false,
        };
        let mut end_old = std::time::Duration::ZERO;
        let mut done = Ok(());
        if !moved {
            // With nowhere to go, the old nexus is left alone (it may still serve, and it is what the host has), and
            // the switch-over is dropped from the record: kept, it would hold every fault's consent and healing off
            // (a nexus it ended, or a new one recorded, is made again by healing, wherever it can go then).
            if !self.elsewhere_up(&s.from).await? {
                r.switchover = None;
                self.save(&r).await?;
                return Err(nowhere(uuid, &s.from));
            }
            // Only the old nexus (the one the report was about, on the node the new one never goes to) is ended; a
            // new one recorded by an earlier attempt is what publishing goes on with. How it ended is recorded
            // before anything else moves. Until its engine has ended it, each attempt asks again (one with a child
            // on a frozen node may take a while to end).
            if s.old_ended.is_none() && ask_old {
                // A write to the fenced store first: an agent that lost its leadership (stalled past its lease
                // while another finished this switch-over and the volume moved on) fails here instead of ending
                // a nexus that is live again, as the report's own path and a drain's move do.
                self.save(&r).await?;
                s.old_ended = match self.destroy_nexus(uuid, &s.from).await {
                    Ok(NexusEnd::Destroyed { clean }) => Some(clean),
                    // Its engine answers without it: ended (an earlier attempt or the stale-nexus reconciler
                    // destroyed it, or the engine restarted), cleanly only if its instance is known to have shut
                    // down cleanly.
                    Ok(NexusEnd::Gone) => match r.nexus.as_ref().filter(|n| n.node == s.from) {
                        Some(old) => Some(self.ended_cleanly(uuid, old).await),
                        None => Some(false),
                    },
                    Ok(NexusEnd::NodeDown) | Err(_) => None,
                };
                if s.old_ended.is_some() {
                    r.switchover = Some(s.clone());
                    self.save(&r).await?;
                }
            }
            end_old = t.elapsed();
            failpoint::at(failpoint::SWITCHOVER_OLD_ENDED);
            // An old nexus its engine did not end may still write to its node's replicas (its local one even
            // after the new nexus fenced the others), so the new nexus never uses them. One that ended left them
            // whole: they are used only when no in-sync replica elsewhere is on an Online node (maybe the only
            // copies), else left out too and, once the new nexus is published, disowned: the nexus leaves the node
            // the host lost, and healing places their replacements. Decided anew by each attempt, and recorded.
            let nodes = self.registry.list().await?;
            let online = |name: &str| {
                nodes.iter().any(|n| {
                    n.record.spec.name == name && n.record.status.state == NodeState::Online
                })
            };
            let elsewhere = r
                .replicas
                .iter()
                .any(|x| x.node != s.from && x.created && x.synced && online(&x.node));
            let leave = s.old_ended.is_none() || elsewhere;
            if leave != s.old_replicas_left {
                s.old_replicas_left = leave;
                r.switchover = Some(s.clone());
                self.save(&r).await?;
            }
            let host = r
                .nexus
                .as_ref()
                .map(|n| n.host_nqn.clone())
                .unwrap_or_default();
            // The old nexus's clean end speaks for it only while the record still names it (not for a new one an
            // earlier attempt made elsewhere, which publishing judges by itself).
            let old_clean =
                s.old_ended == Some(true) && r.nexus.as_ref().is_some_and(|n| n.node == s.from);
            done = self
                .publish_avoiding(r.clone(), &host, "", old_clean, &s.from, leave)
                .await
                .map(|v| r = v);
        }
        let publish = t.elapsed() - end_old;
        // Disowned only once the new nexus runs without them and has a healthy child elsewhere: before, the in-sync
        // replica counted on elsewhere may turn out unreachable (its node dead and not known to be yet), and these
        // the only copies left. Until then the switch-over stays on record, and healing comes back to it.
        if done.is_ok() && s.old_replicas_left && !self.healthy_elsewhere(&r, &s.from).await {
            tracing::info!(%uuid, from = %s.from, "switched over; the old node's replicas are disowned once the new nexus has a healthy child");
            return Ok(r);
        }
        if done.is_ok() {
            if s.old_replicas_left {
                while let Some(i) = r.replicas.iter().position(|x| x.node == s.from) {
                    r.reason = format!(
                        "replica {} on {} disowned: the nexus left that node ({} lost its path)",
                        r.replicas[i].uuid, s.from, s.reporter
                    );
                    self.disown(&mut r, i).await?;
                }
            }
            r.switchover = None;
            self.save(&r).await?;
        }
        let disown = t.elapsed() - end_old - publish;
        let took = node::now_ms().saturating_sub(s.reported_ms);
        self.metrics
            .operation("switchover", if done.is_ok() { "ok" } else { "failed" });
        match &done {
            Ok(()) => {
                for (stage, d) in [
                    ("end_old", end_old),
                    ("publish", publish),
                    ("disown", disown),
                    ("total", std::time::Duration::from_millis(took)),
                ] {
                    self.metrics.switchover_stage(stage, d);
                }
                tracing::info!(
                    %uuid,
                    from = %s.from,
                    to = %r.nexus.as_ref().map_or("", |n| n.node.as_str()),
                    end_old_ms = end_old.as_millis() as u64,
                    publish_ms = publish.as_millis() as u64,
                    disown_ms = disown.as_millis() as u64,
                    took_ms = took,
                    "switched over"
                )
            }
            Err(e) => {
                tracing::warn!(%uuid, from = %s.from, error = %e, "switch-over not finished yet; healing retries it")
            }
        }
        done.map(|()| r)
    }
}

/// Why a nexus on `from` cannot move.
fn nowhere(uuid: Uuid, from: &str) -> VolumeError {
    VolumeError::FailedPrecondition {
        uuid,
        why: format!("no node but {from} is Online and uncordoned: the nexus cannot move"),
    }
}
