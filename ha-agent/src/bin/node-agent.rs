//! node-agent: runs on every node that mounts Keelson volumes (next to the CSI node plugin). Thin: flags, logging,
//! the metrics server, the agent loop until SIGTERM/SIGINT.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use ha_agent::node::agent::{self, NodeAgentConfig};
use ha_agent::node::metrics::NodeMetrics;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "node-agent",
    version,
    about = "Keelson node agent: watches NVMe paths, reports broken ones, connects replacements"
)]
struct Args {
    /// This node's name (default: the host name).
    #[arg(long, env = "KEELSON_NODE_NAME")]
    node_name: Option<String>,
    /// Cluster agent URLs, comma-separated (`http://10.0.0.1:10200`).
    #[arg(
        long,
        env = "KEELSON_CLUSTER_AGENT",
        value_delimiter = ',',
        required = true
    )]
    cluster_agent: Vec<String>,
    /// How often the kernel's NVMe state is read, in milliseconds.
    #[arg(long, env = "KEELSON_POLL_MS", default_value_t = 100)]
    poll_ms: u64,
    /// How long a path stays broken before it is reported, in milliseconds.
    #[arg(long, env = "KEELSON_GRACE_MS", default_value_t = 0)]
    grace_ms: u64,
    /// How long a live path may have I/O in flight with none completing before it is reported as broken (its
    /// target went silent without the connection failing), in milliseconds; 0: only the kernel's keep-alive
    /// notices. A slow but healthy target reported this way keeps its nexus: the cluster agent asks its engine.
    #[arg(long, env = "KEELSON_STALL_MS", default_value_t = 1000)]
    stall_ms: u64,
    /// Keep-alive timeout of the paths this agent connects, in seconds.
    #[arg(long, env = "KEELSON_KEEP_ALIVE_TMO", default_value_t = 2)]
    keep_alive_tmo: u32,
    /// Host NQNs this node's kernel connects to volumes with, registered with the cluster agent (which takes path
    /// reports only for a registered node's hosts). Always registered besides: the CSI node plugin's
    /// (`nqn.2026-11.io.keelson:host-<node>`), `/etc/nvme/hostnqn` when there is one, and every host NQN seen on a
    /// Keelson volume's controller.
    #[arg(long = "host-nqn", env = "KEELSON_HOST_NQN", value_delimiter = ',')]
    host_nqns: Vec<String>,
    /// How long a new path gets to become live, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    live_timeout_ms: u64,
    /// Prometheus metrics address (`GET /metrics`).
    #[arg(long, env = "KEELSON_NODE_METRICS", default_value = "0.0.0.0:9501")]
    metrics: SocketAddr,
    #[arg(long, default_value = "/sys", hide = true)]
    sys: PathBuf,
    #[arg(long, default_value = "/dev/nvme-fabrics", hide = true)]
    fabrics: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    if ha_agent::node::sysfs::native_multipath(&args.sys) == Some(false) {
        anyhow::bail!("{}", ha_agent::node::sysfs::NO_MULTIPATH);
    }
    let node = args.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "node".into())
    });
    let metrics = NodeMetrics::new();
    let listener = tokio::net::TcpListener::bind(args.metrics)
        .await
        .with_context(|| format!("metrics address {}", args.metrics))?;
    let stop = CancellationToken::new();
    let m = metrics.clone();
    let serve = tokio::spawn(ha_agent::metrics_http::serve(
        std::sync::Arc::new(move || m.render()),
        listener,
        stop.clone(),
    ));
    let mut host_nqns = args.host_nqns.clone();
    host_nqns.push(proto::names::kernel_host_nqn(&node));
    if let Ok(h) = std::fs::read_to_string("/etc/nvme/hostnqn")
        && !h.trim().is_empty()
    {
        host_nqns.push(h.trim().to_string());
    }
    let cfg = NodeAgentConfig {
        node,
        host_nqns,
        cluster_agents: args.cluster_agent.clone(),
        sys: args.sys.clone(),
        fabrics: args.fabrics.clone(),
        poll: Duration::from_millis(args.poll_ms.max(10)),
        grace: Duration::from_millis(args.grace_ms),
        stall: Duration::from_millis(args.stall_ms),
        keep_alive_tmo: args.keep_alive_tmo.max(1),
        live_timeout: Duration::from_millis(args.live_timeout_ms),
    };
    tracing::info!(node = %cfg.node, agents = ?cfg.cluster_agents, poll_ms = args.poll_ms, "node agent starting");
    let run = tokio::spawn(agent::run(cfg, metrics, stop.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    stop.cancel();
    let _ = run.await;
    let _ = serve.await;
    Ok(())
}
