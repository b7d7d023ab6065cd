//! The node registry with real processes: a cluster agent on the embedded store and io-engines on 127.0.0.1-.3
//! that register with it; kill -9, SIGSTOP and SIGTERM of engines, a restart of the agent, and bad requests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;
use proto::cluster::registration_client::RegistrationClient;
use tonic::Code;

/// Volume `vol` as the agent lists it now.
pub async fn volume_now(c: &ClusterClient<tonic::transport::Channel>, vol: &str) -> pb::Volume {
    c.clone()
        .get_volume(pb::GetVolumeRequest { uuid: vol.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Connects as the host of `node`'s nexuses (its host NQN and the host ID an engine derives from it), which hold
/// the Exclusive Access reservation of their replicas: only that host may read a replica while its nexus runs.
pub fn as_node(o: &mut nvmf_target::initiator::ConnectOptions, node: &str) {
    o.hostnqn = proto::names::node_host_nqn(node);
    o.hostid = *uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, o.hostnqn.as_bytes()).as_bytes();
}

pub fn free_port(ip: &str) -> u16 {
    e2e::ports::free_port(ip)
}

/// A child process, restartable with the same command line, killed when dropped.
pub struct Proc {
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    exit: Option<std::process::ExitStatus>,
}

impl Proc {
    pub fn start(cmd: Vec<String>, log: PathBuf) -> Proc {
        let mut p = Proc {
            cmd,
            env: Vec::new(),
            log,
            child: None,
            exit: None,
        };
        p.restart();
        p
    }

    pub fn restart(&mut self) {
        self.kill9();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sets `key=value` in the environment of the next (re)start; an empty value unsets it.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        if !value.is_empty() {
            self.env.push((key.into(), value.into()));
        }
    }

    /// Waits up to `limit` for the process to exit on its own; its status, or `None` if it still runs.
    pub async fn exited(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        loop {
            let c = self.child.as_mut()?;
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                self.exit = Some(st);
                return Some(st);
            }
            if t.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How the process last exited, as [`Proc::exited`] saw it.
    pub fn last_exit(&self) -> Option<std::process::ExitStatus> {
        self.exit
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) {
        self.signal("-TERM");
        let st = self.child.take().unwrap().wait().unwrap();
        assert!(
            st.success(),
            "exit {st}: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn agent(dir: &Path, port: u16) -> Proc {
    agent_with(
        dir,
        port,
        &["--data-dir", &dir.join("agent").display().to_string()],
        "agent",
    )
}

pub fn agent_with(dir: &Path, port: u16, store: &[&str], name: &str) -> Proc {
    let mut cmd: Vec<String> = vec![
        env!("CARGO_BIN_EXE_cluster-agent").into(),
        "--name".into(),
        name.into(),
    ];
    cmd.extend(store.iter().map(|s| s.to_string()));
    // No store given: an embedded one in the test's own directory. (The agent's default, /var/lib/keelson/agent, is
    // shared by every run on the machine: records an earlier run left there, node names at other endpoints and
    // their pools' figures, refused this run's engines and made its pools look full.)
    if store.is_empty() {
        cmd.extend([
            "--data-dir".to_string(),
            dir.join(name).display().to_string(),
        ]);
    }
    cmd.extend(
        [
            "--grpc",
            &format!("127.0.0.1:{port}"),
            "--heartbeat-ms",
            "200",
            "--node-timeout-ms",
            "800",
            "--engine-timeout-ms",
            "2000",
            "--lease-ttl-ms",
            "2000",
            "--sweep-ms",
            "500",
        ]
        .map(String::from),
    );
    Proc::start(cmd, dir.join(format!("{name}.log")))
}

fn engine(dir: &Path, i: u32, agent_port: u16) -> Proc {
    engine_with(dir, i, &format!("http://127.0.0.1:{agent_port}"))
}

pub fn engine_with(dir: &Path, i: u32, agents: &str) -> Proc {
    let disk = dir.join(format!("pool{i}.img"));
    if !disk.exists() {
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
    }
    let grpc = free_port(&format!("127.0.0.{i}"));
    engine_cmd(
        dir,
        i,
        agents,
        grpc,
        &["--pool".into(), format!("pool{i}={}", disk.display())],
    )
}

/// An io-engine `reg-<i>` on 127.0.0.<i> with its engine API on `grpc`, registering with `agents`, plus `extra`.
pub fn engine_cmd(dir: &Path, i: u32, agents: &str, grpc: u16, extra: &[String]) -> Proc {
    let ip = format!("127.0.0.{i}");
    let mut cmd = vec![
        e2e::bins::path("io-engine").display().to_string(),
        "--node-name".into(),
        format!("reg-{i}"),
        "--listen".into(),
        format!("{ip}:{}", free_port(&ip)),
        "--grpc".into(),
        format!("{ip}:{grpc}"),
        "--cluster-agent".into(),
        agents.to_string(),
    ];
    cmd.extend(extra.iter().cloned());
    Proc::start(cmd, dir.join(format!("engine{i}.log")))
}

async fn nodes(port: u16) -> Option<Vec<pb::Node>> {
    nodes_at(port).await.ok()
}

async fn nodes_at(port: u16) -> Result<Vec<pb::Node>, tonic::Status> {
    let mut c = ClusterClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(c.list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes)
}

fn state_of(nodes: &[pb::Node], name: &str) -> Option<pb::NodeState> {
    nodes
        .iter()
        .find(|n| n.name == name)
        .and_then(|n| pb::NodeState::try_from(n.state).ok())
}

/// Waits until the agent lists `want` (node, state) pairs; returns the listing and how long it took.
pub async fn wait_for(
    port: u16,
    want: &[(&str, pb::NodeState)],
    what: &str,
) -> (Vec<pb::Node>, Duration) {
    let t = Instant::now();
    let mut last = None;
    while t.elapsed() < Duration::from_secs(30) {
        if let Some(n) = nodes(port).await {
            if want.iter().all(|(name, s)| state_of(&n, name) == Some(*s)) {
                return (n, t.elapsed());
            }
            last = Some(n);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: never reached {want:?}; last listing {last:#?}");
}

pub use pb::NodeState::{Offline, Online};

/// A cluster agent on the embedded store and three io-engines `reg-1` to `reg-3` with a pool each, all Online: the
/// temporary directory they live in, the agent's port, the agent and engines (killed when dropped), the nodes as
/// listed once Online, and a client.
/// Waits (30 s at most) until every pool of every node records `committed` bytes: the heartbeats after a change.
pub async fn wait_for_committed(c: &mut ClusterClient<tonic::transport::Channel>, committed: u64) {
    let t = std::time::Instant::now();
    loop {
        let listed = c
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .nodes;
        if listed
            .iter()
            .all(|n| n.pools.iter().all(|p| p.committed == committed))
        {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{listed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn three_nodes() -> (
    tempfile::TempDir,
    u16,
    Proc,
    Vec<Proc>,
    Vec<pb::Node>,
    ClusterClient<tonic::transport::Channel>,
) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port("127.0.0.1");
    let agent = agent(dir.path(), port);
    let url = format!("http://127.0.0.1:{port}");
    let engines: Vec<_> = (1..=3).map(|i| engine_with(dir.path(), i, &url)).collect();
    let (nodes, _) = wait_for(
        port,
        &[("reg-1", Online), ("reg-2", Online), ("reg-3", Online)],
        "registration",
    )
    .await;
    let c = ClusterClient::connect(url).await.unwrap();
    (dir, port, agent, engines, nodes, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_register_and_the_agent_tracks_kills_freezes_shutdowns_and_its_own_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port("127.0.0.1");
    let mut agent = agent(dir.path(), port);
    let mut engines: Vec<Proc> = (1..=3).map(|i| engine(dir.path(), i, port)).collect();

    let (n, _) = wait_for(
        port,
        &[("reg-1", Online), ("reg-2", Online), ("reg-3", Online)],
        "registration",
    )
    .await;
    for node in &n {
        assert_eq!(node.pools.len(), 1, "{node:?}");
        assert!(
            node.pools[0].capacity > 0 && node.engine_endpoint.starts_with("http://127.0.0."),
            "{node:?}"
        );
        assert_eq!(node.nvmf_listeners.len(), 1);
    }

    // kill -9: heartbeats stop, the probe fails, Offline.
    engines[1].kill9();
    let (n, took) = wait_for(
        port,
        &[("reg-2", Offline), ("reg-1", Online), ("reg-3", Online)],
        "kill -9",
    )
    .await;
    println!("kill -9 of an engine seen as Offline after {took:?}");
    let reg2 = n.iter().find(|x| x.name == "reg-2").unwrap();
    assert!(reg2.reason.contains("probe failed"), "{}", reg2.reason);

    // Forgetting a node: only an Offline one; then it is not listed, and not found again.
    let mut c = ClusterClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let forget = |name: &str| pb::DeleteNodeRequest { name: name.into() };
    let code = |r: Result<tonic::Response<pb::DeleteNodeResponse>, tonic::Status>| {
        r.map(drop).unwrap_err().code()
    };
    assert_eq!(
        code(c.delete_node(forget("reg-3")).await),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(c.delete_node(forget("")).await),
        tonic::Code::InvalidArgument
    );
    c.delete_node(forget("reg-2")).await.unwrap();
    let listed = nodes(port).await.unwrap();
    assert!(listed.iter().all(|x| x.name != "reg-2"), "{listed:?}");
    assert_eq!(
        code(c.delete_node(forget("reg-2")).await),
        tonic::Code::NotFound
    );

    // SIGSTOP: the engine API does not answer either; SIGCONT: it comes back by itself.
    engines[2].signal("-STOP");
    let (_, took) = wait_for(port, &[("reg-3", Offline), ("reg-1", Online)], "SIGSTOP").await;
    println!("a frozen engine seen as Offline after {took:?}");
    engines[2].signal("-CONT");
    wait_for(port, &[("reg-3", Online)], "SIGCONT").await;

    // A restarted engine registers as a new instance.
    let old = reg2.instance.clone();
    engines[1].restart();
    let (n, _) = wait_for(port, &[("reg-2", Online)], "restart").await;
    assert_ne!(n.iter().find(|x| x.name == "reg-2").unwrap().instance, old);

    // A clean shutdown deregisters: Offline at once, saying so (the reason tells it from a timeout).
    engines[0].stop();
    let (n, took) = wait_for(port, &[("reg-1", Offline)], "SIGTERM").await;
    println!("a clean shutdown seen as Offline after {took:?}");
    let reg1 = n.iter().find(|x| x.name == "reg-1").unwrap();
    assert!(reg1.reason.contains("deregistered"), "{}", reg1.reason);

    // The agent restarts (kill -9): the registry is in its store, and the engines find it again.
    agent.kill9();
    agent.restart();
    let (n, _) = wait_for(
        port,
        &[("reg-2", Online), ("reg-3", Online), ("reg-1", Offline)],
        "agent restart",
    )
    .await;
    assert_eq!(n.len(), 3);
    engines[0].restart();
    wait_for(
        port,
        &[("reg-1", Online)],
        "engine back after the agent restart",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_and_unknown_nodes_get_precise_codes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port("127.0.0.1");
    let _agent = agent(dir.path(), port);
    let url = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    let mut reg = loop {
        if let Ok(c) = RegistrationClient::connect(url.clone()).await {
            break c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the agent never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let good = pb::RegisterRequest {
        node: "ok-node".into(),
        engine_endpoint: "http://127.0.0.9:1".into(),
        nvmf_listeners: vec![],
        cntlid_min: 1,
        cntlid_max: 10,
        pools: vec![],
        instance: "i1".into(),
        ..Default::default()
    };
    let code =
        |r: Result<tonic::Response<pb::RegisterResponse>, tonic::Status>| r.err().map(|e| e.code());
    // The agent may need a moment to lead.
    let t = Instant::now();
    while let Err(e) = reg.register(good.clone()).await {
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for bad in [
        pb::RegisterRequest {
            node: "Bad/Name".into(),
            ..good.clone()
        },
        pb::RegisterRequest {
            node: String::new(),
            ..good.clone()
        },
        pb::RegisterRequest {
            instance: String::new(),
            ..good.clone()
        },
        pb::RegisterRequest {
            cntlid_min: 9,
            cntlid_max: 2,
            ..good.clone()
        },
        pb::RegisterRequest {
            cntlid_max: 0xFFFF,
            ..good.clone()
        },
        // A name whose host NQN would be longer than NVMe allows.
        pb::RegisterRequest {
            node: vec!["a".repeat(50); 4].join("."),
            ..good.clone()
        },
        // A listener that would carry its own connect options to every host.
        pb::RegisterRequest {
            nvmf_listeners: vec!["10.0.0.1:4420,hostnqn=nqn.x".into()],
            ..good.clone()
        },
        pb::RegisterRequest {
            nvmf_listeners: vec!["storage-1:4420".into()],
            ..good.clone()
        },
    ] {
        assert_eq!(
            code(reg.register(bad.clone()).await),
            Some(Code::InvalidArgument),
            "{bad:?}"
        );
    }
    // A heartbeat of an instance the agent does not know: register again (never an error the engine cannot act on).
    let hb = reg
        .heartbeat(pb::HeartbeatRequest {
            node: "ok-node".into(),
            instance: "stale".into(),
            pools: vec![],
            changed_nexuses: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(hb.register_again);
    let mut c = ClusterClient::connect(url).await.unwrap();
    let e = c
        .get_node(pb::GetNodeRequest {
            name: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The unreachable engine endpoint of "ok-node" makes it Offline, and nothing else is disturbed.
    let (n, _) = wait_for(port, &[("ok-node", Offline)], "unreachable engine").await;
    assert_eq!(n.len(), 1);
}

/// Needs etcd (Debian package etcd-server). Two agents on one etcd: one leads, the other answers UNAVAILABLE; kill -9
/// of the leader hands over within the lease TTL, and the engines (given both agents) follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_etcd_one_leads_and_the_other_takes_over_when_it_is_killed() {
    let Some(etcd) = crate::etcd::Etcd::start(
        "two_agents_on_etcd_one_leads_and_the_other_takes_over_when_it_is_killed",
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb_) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let store = ["--store", "etcd", "--etcd", etcd.endpoint.as_str()];
    let mut a = agent_with(dir.path(), pa, &store, "agent-a");
    wait_for(pa, &[], "agent-a leads").await;
    let _b = agent_with(dir.path(), pb_, &store, "agent-b");
    let agents = format!("http://127.0.0.1:{pa},http://127.0.0.1:{pb_}");
    let _engines: Vec<Proc> = (1..=2)
        .map(|i| engine_with(dir.path(), i, &agents))
        .collect();
    wait_for(
        pa,
        &[("reg-1", Online), ("reg-2", Online)],
        "registration with the leader",
    )
    .await;
    let e = nodes_at(pb_).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unavailable,
        "the follower does not serve: {e:?}"
    );

    a.kill9();
    let t = Instant::now();
    let (_, took) = wait_for(
        pb_,
        &[("reg-1", Online), ("reg-2", Online)],
        "the follower takes over",
    )
    .await;
    println!(
        "agent-b leads {:?} after agent-a's kill -9 (lease TTL 1 s, etcd rounds to 2 s)",
        t.elapsed().max(took)
    );
    // The engines send their heartbeats to agent-b now (not only the records it read from etcd).
    let t = Instant::now();
    loop {
        let n = nodes_at(pb_).await.unwrap();
        let fresh = n
            .iter()
            .all(|x| x.last_seen_ms_ago > 0 && x.last_seen_ms_ago < 500);
        if fresh && t.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the engines never heartbeat agent-b: {n:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Engines that answer garbage, never answer, or answer as another node (the address now another machine's, which
/// registers elsewhere): the agent's probe of each fails within its timeout, all are marked Offline saying why, the
/// API stays responsive meanwhile, and the real nodes are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_that_answer_garbage_or_hang_are_marked_offline_and_nothing_else_waits() {
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().unwrap();
    let port = free_port("127.0.0.1");
    let _agent = agent(dir.path(), port);
    let _engines: Vec<Proc> = (1..=2).map(|i| engine(dir.path(), i, port)).collect();
    wait_for(
        port,
        &[("reg-1", Online), ("reg-2", Online)],
        "registration",
    )
    .await;

    // One listener answers every connection with garbage and closes it; the other accepts and stays silent.
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (ga, ha) = (garbage.local_addr().unwrap(), hang.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = garbage.accept().await {
            let _ = s
                .write_all(b"HTTP/9.9 418 garbage\r\n\r\n\x00\xff\x13\x37")
                .await;
        }
    });
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    // A real engine, reg-3, registering with no agent here (nothing listens at port 1).
    let grpc3 = free_port("127.0.0.3");
    let _other = engine_cmd(dir.path(), 3, "http://127.0.0.1:1", grpc3, &[]);
    let renamed: std::net::SocketAddr = format!("127.0.0.3:{grpc3}").parse().unwrap();
    let mut reg = RegistrationClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let fakes = [
        ("fake-garbage", ga),
        ("fake-hang", ha),
        ("fake-renamed", renamed),
    ];
    for (name, addr) in fakes {
        reg.register(pb::RegisterRequest {
            node: name.into(),
            engine_endpoint: format!("http://{addr}"),
            nvmf_listeners: vec![],
            cntlid_min: 1,
            cntlid_max: 100,
            pools: vec![],
            instance: "fake".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // No heartbeats follow: both are probed, and the probes fail (garbage at once, silence at the timeout).
    let t = Instant::now();
    loop {
        let t0 = Instant::now();
        let n = nodes(port).await.expect("the API answers");
        // Well under the 2 s a hanging probe takes (the agents' engine timeout here).
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "ListNodes took {:?} while probes hang",
            t0.elapsed()
        );
        let off = |name: &str| state_of(&n, name) == Some(Offline);
        if fakes.iter().all(|(name, _)| off(name)) {
            for (name, _) in fakes {
                let r = &n.iter().find(|x| x.name == name).unwrap().reason;
                assert!(!r.is_empty(), "{name} Offline without a reason");
            }
            assert_eq!(state_of(&n, "reg-1"), Some(Online));
            assert_eq!(state_of(&n, "reg-2"), Some(Online));
            println!(
                "garbage and silent engines marked Offline after {:?}",
                t.elapsed()
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "never marked Offline: {n:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `node`'s engine has no nexus left (the agent destroyed one it left behind).
pub async fn until_no_nexus(nodes: &[pb::Node], node: &str) {
    let n = nodes.iter().find(|n| n.name == node).unwrap();
    let t = Instant::now();
    loop {
        let left = proto::engine::engine_client::EngineClient::connect(n.engine_endpoint.clone())
            .await
            .unwrap()
            .list_nexuses(proto::engine::ListNexusesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nexuses;
        if left.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the old nexus on {node} was never destroyed: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One volume record in the store that does not decode (written by hand, or by a bug): the node calls still answer,
/// and a draining node stays Draining, as where that volume's nexus runs is unknown. Needs etcd (Debian package
/// etcd-server), where the test can write beside the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_volume_record_leaves_the_node_calls_answering() {
    use ha_agent::cluster::store::Store;
    let test = "a_corrupt_volume_record_leaves_the_node_calls_answering";
    let Some(etcd) = crate::etcd::Etcd::start(test).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port("127.0.0.1");
    let store = ["--store", "etcd", "--etcd", etcd.endpoint.as_str()];
    let _agent = agent_with(dir.path(), port, &store, "agent");
    let _engine = engine(dir.path(), 1, port);
    wait_for(port, &[("reg-1", Online)], "registration").await;
    let mut c = ClusterClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let reg1 = || pb::CordonNodeRequest {
        name: "reg-1".into(),
    };
    let n = c.drain_node(reg1()).await.unwrap().into_inner();
    assert_eq!(n.drain_state, "Drained");

    let key = format!("/keelson/volumes/{}", uuid::Uuid::new_v4());
    etcd.store()
        .await
        .put(&key, b"{not a volume record".to_vec())
        .await
        .unwrap();
    let nodes = c
        .list_nodes(pb::ListNodesRequest {})
        .await
        .expect("ListNodes answers beside a corrupt volume record")
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].drain_state, "Draining");
    let n = c
        .get_node(pb::GetNodeRequest {
            name: "reg-1".into(),
        })
        .await
        .expect("GetNode answers")
        .into_inner();
    assert_eq!(n.drain_state, "Draining");
    let n = c.uncordon_node(reg1()).await.expect("Uncordon answers");
    assert!(!n.into_inner().cordoned);
}
