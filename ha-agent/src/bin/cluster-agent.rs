//! cluster-agent: Keelson's control plane. Thin: parse flags, set up logging, open the store, run the agent until
//! SIGTERM/SIGINT. Exits non-zero when it loses leadership or the store, for its supervisor to restart it.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use ha_agent::cluster::agent::{self, AgentConfig};
use ha_agent::cluster::registry::RegistryConfig;
use ha_agent::cluster::store::Store;
use ha_agent::cluster::store::embedded::EmbeddedStore;
use ha_agent::cluster::store::etcd::EtcdStore;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreKind {
    /// redb in `--data-dir` (one agent).
    Embedded,
    /// etcd at `--etcd` (several agents, one leader).
    Etcd,
}

#[derive(Parser, Debug)]
#[command(
    name = "cluster-agent",
    version,
    about = "Keelson cluster agent: registry, placement, healing"
)]
struct Args {
    #[arg(long, env = "KEELSON_STORE", value_enum, default_value = "embedded")]
    store: StoreKind,
    /// Where the embedded store keeps its file.
    #[arg(
        long,
        env = "KEELSON_DATA_DIR",
        default_value = "/var/lib/keelson/agent"
    )]
    data_dir: PathBuf,
    /// etcd endpoints, comma-separated (`http://127.0.0.1:2379`).
    #[arg(long, env = "KEELSON_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Cluster API address.
    #[arg(long, env = "KEELSON_AGENT_GRPC", default_value = "127.0.0.1:10200")]
    grpc: SocketAddr,
    /// This agent's name in leader election (default: host name and process ID).
    #[arg(long, env = "KEELSON_AGENT_NAME")]
    name: Option<String>,
    /// How often io-engines send heartbeats, in milliseconds.
    #[arg(long, env = "KEELSON_HEARTBEAT_MS", default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Silence after which a node is probed and, if the probe fails, marked Offline, in milliseconds.
    #[arg(long, env = "KEELSON_NODE_TIMEOUT_MS", default_value_t = 3000)]
    node_timeout_ms: u64,
    /// Leadership lease TTL in milliseconds (etcd rounds up to whole seconds).
    #[arg(long, env = "KEELSON_LEASE_TTL_MS", default_value_t = 5000)]
    lease_ttl_ms: u64,
    /// Prometheus metrics address (`GET /metrics`); not served when unset.
    #[arg(long, env = "KEELSON_AGENT_METRICS")]
    metrics: Option<SocketAddr>,
    /// How often the reconcilers sweep every volume, pool and snapshot without an event, in milliseconds (nexus
    /// changes reported by engines and node state changes are acted on at once).
    #[arg(long, env = "KEELSON_SWEEP_MS", default_value_t = 5000)]
    sweep_ms: u64,
    /// Timeout of each engine API call, in milliseconds.
    #[arg(long, env = "KEELSON_ENGINE_TIMEOUT_MS", default_value_t = 1000)]
    engine_timeout_ms: u64,
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
    // Tests arm failpoints with FAILPOINTS (see ha_agent::cluster::failpoint); unset, this does nothing.
    let _failpoints = fail::FailScenario::setup();
    let store: Arc<dyn Store> = match args.store {
        StoreKind::Embedded => {
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("creating {}", args.data_dir.display()))?;
            Arc::new(EmbeddedStore::open(&args.data_dir.join("store.redb")).await?)
        }
        StoreKind::Etcd => {
            anyhow::ensure!(!args.etcd.is_empty(), "--store etcd needs --etcd ENDPOINTS");
            Arc::new(EtcdStore::connect(&args.etcd).await?)
        }
    };
    let listener = tokio::net::TcpListener::bind(args.grpc)
        .await
        .with_context(|| format!("cluster API address {}", args.grpc))?;
    let metrics = match args.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics address {addr}"))?,
        ),
        None => None,
    };
    let name = args.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "agent".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let config = AgentConfig {
        name,
        registry: RegistryConfig {
            heartbeat: Duration::from_millis(args.heartbeat_ms.max(10)),
            timeout: Duration::from_millis(args.node_timeout_ms.max(args.heartbeat_ms)),
        },
        lease_ttl: Duration::from_millis(args.lease_ttl_ms.max(100)),
        engine_timeout: Duration::from_millis(args.engine_timeout_ms.max(10)),
        sweep: Duration::from_millis(args.sweep_ms.max(10)),
    };
    tracing::info!(grpc = %args.grpc, store = ?args.store, name = %config.name, "cluster agent starting");
    let stop = CancellationToken::new();
    let run = tokio::spawn(agent::run(store, listener, metrics, config, stop.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::pin!(run);
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        r = &mut run => { r??; return Ok(()); }
    }
    stop.cancel();
    run.await??;
    tracing::info!("stopped");
    Ok(())
}
