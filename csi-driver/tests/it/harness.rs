//! A real cluster for the CSI tests: a cluster agent on the embedded store, io-engines `csi-1`.. on 127.0.0.<i>
//! with a 256 MiB file pool each, and csi-driver serving on a Unix socket in a temporary directory; clients for
//! the CSI services over that socket and for the cluster API. A test can restart the agent on its store (with
//! failpoints armed) and pause an engine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::process::Process;
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use proto::cluster::cluster_client::ClusterClient;
use proto::csi::controller_client::ControllerClient;
use proto::csi::identity_client::IdentityClient;
use proto::csi::volume_capability::access_mode::Mode;
use proto::csi::{ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest};
use tonic::transport::Channel;

pub fn free_port(ip: &str) -> u16 {
    e2e::ports::free_port(ip)
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub agent_url: String,
    pub agent: Process,
    pub engines: Vec<Process>,
    /// Kept so it is killed with the cluster.
    _driver: Process,
    pub socket: PathBuf,
}

fn engine(dir: &Path, i: u32, agent_url: &str) -> Process {
    let ip = format!("127.0.0.{i}");
    let disk = dir.join(format!("pool{i}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let mut cmd = Command::new(e2e::bins::path("io-engine"));
    cmd.args([
        "--node-name",
        &format!("csi-{i}"),
        "--listen",
        &format!("{ip}:{}", free_port(&ip)),
        "--grpc",
        &format!("{ip}:{}", free_port(&ip)),
        "--cluster-agent",
        agent_url,
        "--pool",
        &format!("pool{i}={}", disk.display()),
    ]);
    Process::spawn(&format!("engine{i}"), cmd, dir).unwrap()
}

/// csi-driver --mode controller on `socket`, talking to `agent_url`.
pub fn driver(dir: &Path, name: &str, socket: &Path, agent_url: &str) -> Process {
    let mut cmd = Command::new(e2e::bins::path("csi-driver"));
    cmd.args([
        "--mode",
        "controller",
        "--endpoint",
        &format!("unix://{}", socket.display()),
        "--cluster-agent",
        agent_url,
        "--agent-timeout-s",
        "30",
    ]);
    Process::spawn(name, cmd, dir).unwrap()
}

/// A channel to the driver's socket, waiting for it to serve.
pub async fn connect(socket: &Path) -> Channel {
    let t = Instant::now();
    loop {
        match proto::unix::channel(&socket.display().to_string()).await {
            Ok(ch) => return ch,
            Err(e) if t.elapsed() > Duration::from_secs(20) => {
                panic!("no driver on {}: {e}", socket.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The cluster agent serving on `grpc`, its store under `dir`, its log `<log>.log`; `failpoints`: the failpoints
/// armed (`FAILPOINTS`, `ha_agent::cluster::failpoint`; empty: none).
fn cluster_agent(dir: &Path, log: &str, grpc: &str, failpoints: &str) -> Process {
    let mut cmd = Command::new(e2e::bins::path("cluster-agent"));
    cmd.args([
        "--name",
        "agent",
        "--data-dir",
        &dir.join("agent").display().to_string(),
        "--grpc",
        grpc,
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
    ]);
    if !failpoints.is_empty() {
        cmd.env("FAILPOINTS", failpoints);
    }
    Process::spawn(log, cmd, dir).unwrap()
}

impl Cluster {
    /// Starts `engines` io-engines, the agent and the driver; returns once every node is Online.
    pub async fn start(engines: u32) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port("127.0.0.1");
        let agent_url = format!("http://127.0.0.1:{port}");
        let agent = cluster_agent(dir.path(), "agent", &format!("127.0.0.1:{port}"), "");
        let engines: Vec<Process> = (1..=engines)
            .map(|i| engine(dir.path(), i, &agent_url))
            .collect();
        let socket = dir.path().join("csi").join("csi.sock");
        let driver = driver(dir.path(), "driver", &socket, &agent_url);
        let c = Cluster {
            dir,
            agent_url,
            agent,
            engines,
            _driver: driver,
            socket,
        };
        c.wait_online(c.engines.len()).await;
        c.register_app_nodes().await;
        c
    }

    /// Application nodes `worker-1` to `worker-3`, registered as their node agents do (a publish to a node that no
    /// node agent or io-engine registered is NOT_FOUND).
    async fn register_app_nodes(&self) {
        let mut c = self.cluster().await;
        for i in 1..=3 {
            let node = format!("worker-{i}");
            c.register_host(proto::cluster::RegisterHostRequest {
                host_nqns: vec![proto::names::kernel_host_nqn(&node)],
                node,
                version: "test".into(),
            })
            .await
            .unwrap();
        }
    }

    /// Stops the cluster agent (SIGTERM; one that died already is only reaped) and starts another on its store and
    /// address, with `failpoints` armed, logging to `<log>.log`; returns once it leads and answers.
    pub async fn restart_agent(&mut self, log: &str, failpoints: &str) {
        self.agent.terminate(Duration::from_secs(10)).unwrap();
        let grpc = self.agent_url.trim_start_matches("http://").to_string();
        self.agent = cluster_agent(self.dir.path(), log, &grpc, failpoints);
        self.nodes().await;
    }

    /// The nodes as the leading agent lists them (waiting for one to lead).
    pub async fn nodes(&self) -> Vec<proto::cluster::Node> {
        let t = Instant::now();
        loop {
            if let Ok(mut c) = ClusterClient::connect(self.agent_url.clone()).await
                && let Ok(r) = c.list_nodes(proto::cluster::ListNodesRequest {}).await
            {
                return r.into_inner().nodes;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no agent leads:\n{}",
                self.agent.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) io-engine `i` (0-based): a stopped engine keeps its sockets and
    /// answers nothing.
    pub fn pause_engine(&self, i: usize, paused: bool) {
        let sig = if paused { "-STOP" } else { "-CONT" };
        let st = Command::new("kill")
            .args([sig, &self.engines[i].pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill {sig} engine {i}: {st}");
    }

    pub async fn cluster(&self) -> ClusterClient<Channel> {
        ClusterClient::connect(self.agent_url.clone())
            .await
            .unwrap()
    }

    /// Waits until `n` nodes are Online with their pools.
    pub async fn wait_online(&self, n: usize) {
        let t = Instant::now();
        loop {
            if let Ok(mut c) = ClusterClient::connect(self.agent_url.clone()).await
                && let Ok(r) = c.list_nodes(proto::cluster::ListNodesRequest {}).await
            {
                let online = r
                    .into_inner()
                    .nodes
                    .iter()
                    .filter(|x| {
                        x.state == proto::cluster::NodeState::Online as i32 && !x.pools.is_empty()
                    })
                    .count();
                if online == n {
                    return;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "nodes never Online:\n{}",
                self.agent.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(connect(&self.socket).await)
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(connect(&self.socket).await)
    }
}

/// Publishes `id` to node `node` and connects to it as that node's host would.
pub async fn attach(ctl: &mut ControllerClient<Channel>, id: &str, node: &str) -> RemoteNamespace {
    let ctx = ctl
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            volume_capability: Some(crate::controller::cap(Mode::SingleNodeWriter, true)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let addr = ctx["targetAddresses"]
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut o = ConnectOptions::new(addr, &ctx["nqn"]);
    o.hostnqn = ctx["hostNqn"].clone();
    o.command_timeout = Duration::from_secs(10);
    RemoteNamespace::connect(o, 0).await.unwrap()
}

pub async fn detach(
    ctl: &mut ControllerClient<Channel>,
    ns: RemoteNamespace,
    id: &str,
    node: &str,
) {
    ns.close().await;
    unpublish(ctl, id, node).await;
}

/// ControllerUnpublishVolume of volume `id` from `node`, which must succeed.
pub async fn unpublish(ctl: &mut ControllerClient<Channel>, id: &str, node: &str) {
    ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Waits until no pool holds a replica (pools are reported with the engines' heartbeats).
pub async fn pools_empty(c: &Cluster) {
    let mut cl = c.cluster().await;
    let t = Instant::now();
    loop {
        let nodes = cl
            .list_nodes(proto::cluster::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        let held: Vec<String> = nodes
            .iter()
            .flat_map(|n| n.pools.iter().map(move |p| (n, p)))
            .filter(|(_, p)| p.committed != 0)
            .map(|(n, p)| format!("{}: {p:?}", n.name))
            .collect();
        if held.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "replicas left behind: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
