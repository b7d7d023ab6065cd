//! csi-driver: Keelson's CSI plugin (`csi.keelson.io`) on a Unix socket.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use csi_driver::agent::Agent;
use csi_driver::kernel::Kernel;
use csi_driver::mounts::Mounts;
use csi_driver::node::NodeService;
use csi_driver::server::{self, Mode};

#[derive(Parser, Debug)]
#[command(
    name = "csi-driver",
    version,
    about = "Keelson's CSI driver, csi.keelson.io"
)]
struct Args {
    /// Which services to run: controller (with the provisioner, attacher and snapshotter sidecars), node (on
    /// every node, for the kubelet), or all.
    #[arg(
        long,
        value_enum,
        env = "KEELSON_CSI_MODE",
        default_value = "controller"
    )]
    mode: Mode,
    /// Where to serve: unix:///path/to/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///run/csi/csi.sock")]
    endpoint: String,
    /// Cluster agent addresses (http://host:port), comma-separated.
    #[arg(
        long,
        env = "KEELSON_CLUSTER_AGENT",
        value_delimiter = ',',
        required = true
    )]
    cluster_agent: Vec<String>,
    /// This node's name (the node service's node id).
    #[arg(long, env = "KEELSON_NODE_NAME")]
    node_name: Option<String>,
    /// The most volumes this node takes (the node service's NodeGetInfo; 0: no limit).
    #[arg(long, default_value_t = 0)]
    max_volumes: i64,
    /// sysfs (tests point it elsewhere).
    #[arg(long, default_value = "/sys", hide = true)]
    sys: std::path::PathBuf,
    /// The kernel's NVMe-oF connect file.
    #[arg(long, default_value = "/dev/nvme-fabrics", hide = true)]
    fabrics: std::path::PathBuf,
    /// Longest wait for one cluster agent call, in seconds (creating a volume with many replicas can take a while).
    #[arg(long, default_value_t = 60)]
    agent_timeout_s: u64,
    /// How long, from the first NodeUnstageVolume that found a volume without a live path (its target gone, a
    /// switch-over not done), its unstages answer UNAVAILABLE before one gives up what the page cache holds for it
    /// and disconnects, in seconds.
    #[arg(long, default_value_t = csi_driver::node::GIVE_UP_AFTER.as_secs())]
    unstage_give_up_s: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    if args.mode != Mode::Controller && args.node_name.is_none() {
        anyhow::bail!("--node-name is required for the node service");
    }
    let agent = Arc::new(Agent::new(
        &args.cluster_agent,
        Duration::from_secs(args.agent_timeout_s),
    )?);
    let listener = server::bind(&args.endpoint)?;
    tracing::info!(endpoint = %args.endpoint, mode = ?args.mode, "csi-driver serving");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    let node = args.node_name.clone().map(|n| {
        NodeService::new(
            n,
            args.max_volumes,
            Kernel::new(&args.sys, &args.fabrics, "/dev"),
            Mounts::system(),
        )
        .with_agent(agent.clone())
        .with_sole_writers_file(sole_writers_file(&args.endpoint))
        .with_live_wait(
            csi_driver::node::LIVE_WAIT,
            Duration::from_secs(args.unstage_give_up_s),
        )
    });
    server::serve(listener, args.mode, agent, node, shutdown).await
}

/// Where the node plugin keeps its single-writer publishes: beside its socket (the kubelet's plugin directory, a
/// host path that outlives the plugin's container), or the working directory for a TCP endpoint.
fn sole_writers_file(endpoint: &str) -> std::path::PathBuf {
    let dir = endpoint
        .strip_prefix("unix://")
        .and_then(|p| std::path::Path::new(p).parent())
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    dir.join("keelson-single-writers.json")
}
