//! io-engine: one per storage node. Serves NVMe/TCP (subsystems, discovery, ANA) on its listeners and the engine
//! management API over gRPC. Thin: parse flags, set up logging, start the engine, wait for SIGTERM/SIGINT.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use nvmf_target::config::{ExportSpec, PoolArg};
use nvmf_target::engine::{Configured, Engine, EngineConfig};
use nvmf_target::io_threads::IoThreads;
use nvmf_target::target::TargetConfig;
use serde::Deserialize;

/// mimalloc keeps the large, short-lived I/O buffers in its own pages; glibc's malloc turns every 128 KiB buffer
/// into an mmap/munmap pair with page faults, which halves large-block throughput.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "io-engine",
    version,
    about = "Keelson storage node: NVMe/TCP target and engine API"
)]
struct Args {
    /// Name of this node (defaults to the host name).
    #[arg(long, env = "KEELSON_NODE_NAME")]
    node_name: Option<String>,
    /// NVMe/TCP listener address; repeat for several ports. Discovery is served on every listener.
    #[arg(
        long = "listen",
        env = "KEELSON_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:4420"
    )]
    listen: Vec<SocketAddr>,
    /// Engine gRPC API address.
    #[arg(long, env = "KEELSON_GRPC", default_value = "127.0.0.1:10124")]
    grpc: SocketAddr,
    /// Prometheus metrics address (`GET /metrics`); not served when unset.
    #[arg(long, env = "KEELSON_METRICS")]
    metrics: Option<SocketAddr>,
    /// Export a namespace at start-up, e.g. `nqn=nqn.2026-11.io.keelson:vol-demo,memory=256MiB`
    /// or `nqn=...,file=/dev/loop0,direct=true`. Keys: nqn, memory, file, size, direct, bs, nsid, uuid, ana-group,
    /// hosts (`;`-separated; none = any host). Repeatable.
    #[arg(long = "export", env = "KEELSON_EXPORT", value_delimiter = ' ')]
    exports: Vec<ExportSpec>,
    /// Pool to create on a blank disk or import at start-up, `NAME=/path/to/disk-or-file`. Repeatable.
    #[arg(long = "pool", env = "KEELSON_POOLS", value_delimiter = ' ')]
    pools: Vec<PoolArg>,
    /// JSON file with `{"listen": [...], "exports": [{...}], "pools": [{"name", "disk"}]}` added to the flags.
    #[arg(long, env = "KEELSON_CONFIG")]
    config: Option<PathBuf>,
    /// Controller IDs this node hands out, `MIN-MAX` (make them disjoint across nodes serving one subsystem).
    #[arg(long, env = "KEELSON_CNTLID_RANGE", default_value = "1-65519")]
    cntlid_range: String,
    /// Cluster agent URLs (`http://host:port`, comma-separated): register this node and send heartbeats.
    #[arg(long, env = "KEELSON_CLUSTER_AGENT", value_delimiter = ',')]
    cluster_agent: Vec<String>,
    /// The engine API address the cluster agent should dial (default: `--grpc`).
    #[arg(long, env = "KEELSON_GRPC_ADVERTISE")]
    grpc_advertise: Option<SocketAddr>,
    /// A label of this node, `key=value` (repeat it, or comma-separate in the environment): volumes' node
    /// selectors and topology place replicas by them (e.g. `topology.kubernetes.io/zone=a`).
    #[arg(long = "node-label", env = "KEELSON_NODE_LABELS", value_delimiter = ',', value_parser = parse_label)]
    node_labels: Vec<(String, String)>,
    /// A label of one of this node's pools, `POOL:key=value` (repeatable): volumes' pool selectors match them
    /// (e.g. `pool1:media=ssd`).
    #[arg(long = "pool-label", env = "KEELSON_POOL_LABELS", value_delimiter = ',', value_parser = parse_pool_label)]
    pool_labels: Vec<(String, String, String)>,
    /// I/O threads: each NVMe/TCP connection is served on one of them, with its disk I/O and a nexus's sends to its
    /// children (`auto`, the default: one per CPU this process may run on). 0: everything on the shared runtime,
    /// and no spin.
    #[arg(long, env = "KEELSON_IO_THREADS", default_value = "auto", value_parser = parse_io_threads)]
    io_threads: usize,
    /// The longest an I/O thread spins after its data-path work before it sleeps, in microseconds (0: never). The
    /// spin adapts to the load, yields to any other thread that wants the CPU, and an idle engine never spins
    /// (ARCHITECTURE.md, step 1). Only with I/O threads.
    #[arg(long, env = "KEELSON_SPIN_US", default_value_t = 100)]
    spin_us: u64,
    /// TCP congestion control of the NVMe/TCP connections, served and made: `auto` (the default: CUBIC where the
    /// system's default is BBR, whose pacing holds a storage connection's bursts back; otherwise the system's),
    /// `system`, or an algorithm's name.
    #[arg(long, env = "KEELSON_TCP_CONGESTION", default_value = "auto")]
    tcp_congestion: nvmf_target::transport::Congestion,
}

/// A number of I/O threads, or `auto` (one per CPU this process may run on).
fn parse_io_threads(s: &str) -> Result<usize, String> {
    if s == "auto" {
        return Ok(std::thread::available_parallelism().map_or(1, |n| n.get()));
    }
    s.parse()
        .map_err(|_| format!("{s:?}: a number of threads, or auto"))
}

/// `POOL:key=value`.
fn parse_pool_label(s: &str) -> Result<(String, String, String), String> {
    let (pool, kv) = s
        .split_once(':')
        .ok_or_else(|| format!("pool label {s:?} is not POOL:key=value"))?;
    let (k, v) = parse_label(kv)?;
    if pool.is_empty() {
        return Err(format!("pool label {s:?} names no pool"));
    }
    Ok((pool.to_string(), k, v))
}

/// `key=value`, both non-empty.
fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} is not key=value")),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    listen: Vec<SocketAddr>,
    #[serde(default)]
    exports: Vec<ExportSpec>,
    #[serde(default)]
    pools: Vec<PoolArg>,
}

fn parse_range(s: &str) -> Result<(u16, u16)> {
    let (a, b) = s.split_once('-').context("cntlid range must be MIN-MAX")?;
    let (a, b): (u16, u16) = (a.trim().parse()?, b.trim().parse()?);
    anyhow::ensure!(
        a >= 1 && a <= b && b <= 0xFFEF,
        "cntlid range must lie within 1-65519"
    );
    Ok((a, b))
}

#[tokio::main]
async fn main() -> Result<()> {
    // Logs go to stderr, coloured only when that is a terminal (a log file or journald gets plain text).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut args = Args::parse();
    if let Some(path) = &args.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let fc: FileConfig =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for e in &fc.exports {
            e.validate()
                .map_err(|r| anyhow::anyhow!("export {}: {r}", e.nqn))?;
        }
        args.listen.extend(fc.listen);
        args.exports.extend(fc.exports);
        args.pools.extend(fc.pools);
    }
    let (cntlid_min, cntlid_max) = parse_range(&args.cntlid_range)?;
    match nvmf_target::transport::set_congestion(&args.tcp_congestion)
        .map_err(|e| anyhow::anyhow!("--tcp-congestion: {e}"))?
    {
        Some(cc) => tracing::info!(algorithm = %cc, "NVMe/TCP connections' congestion control"),
        None => tracing::info!("NVMe/TCP connections keep the system's congestion control"),
    }
    let node_name = args.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "node".into())
    });
    let io_threads = match args.io_threads {
        0 => None,
        n => Some(Arc::new(
            IoThreads::start(
                n,
                std::time::Duration::from_micros(args.spin_us),
                nvmf_target::block::uring::defer_completions_here,
            )
            .context("starting the I/O threads")?,
        )),
    };
    let config = EngineConfig {
        node_name,
        target: TargetConfig {
            cntlid_min,
            cntlid_max,
            io_threads,
            ..TargetConfig::default()
        },
    };
    let engine = Engine::new(config);
    for addr in &args.listen {
        engine.target().add_listener(*addr, 0).await?;
    }
    for e in &args.exports {
        let nsid = engine
            .export(e)
            .with_context(|| format!("exporting {}", e.nqn))?;
        let l = engine.target().listeners();
        let addr = l.first().map(|l| l.address);
        tracing::info!(nqn = %e.nqn, nsid, "exported");
        if let Some(a) = addr {
            println!(
                "nvme connect -t tcp -a {} -s {} -n {}",
                a.ip(),
                a.port(),
                e.nqn
            );
        }
    }
    for (i, p) in args.pools.iter().enumerate() {
        if let Some(q) = args.pools[..i]
            .iter()
            .find(|q| q.name == p.name || q.disk == p.disk)
        {
            anyhow::bail!(
                "pools {}={} and {}={} share a name or a disk",
                q.name,
                q.disk,
                p.name,
                p.disk
            );
        }
    }
    for p in &args.pools {
        // A pool that does not open leaves the others served; the engine keeps trying it (engine::pending).
        let opened = engine
            .open_configured_pool(&p.name, &p.disk)
            .await
            .with_context(|| format!("pool {} on {}", p.name, p.disk))?;
        let e = match opened {
            Configured::Open(e) => e,
            Configured::Pending(e) => {
                tracing::error!(pool = %p.name, disk = %p.disk, error = %e,
                    "pool not opened: serving without it and trying again in the background");
                continue;
            }
        };
        let s = e.pool.stats();
        tracing::info!(
            pool = %p.name,
            disk = %p.disk,
            capacity = s.capacity,
            allocated = s.allocated,
            replicas = e.pool.volumes().len(),
            "pool ready"
        );
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    // Bound before the engine registers: a cluster agent that hears of it may call it at once (bound in the
    // serving task, the API could still refuse connections when the first heartbeat arrived).
    let api_listener = tokio::net::TcpListener::bind(args.grpc)
        .await
        .with_context(|| format!("engine API address {}", args.grpc))?;
    let api = tokio::spawn(nvmf_target::api::serve_on(
        engine.clone(),
        api_listener,
        shutdown.clone(),
    ));
    if let Some(addr) = args.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics address {addr}"))?;
        tokio::spawn(nvmf_target::metrics::serve(
            engine.clone(),
            listener,
            shutdown.clone(),
        ));
        tracing::info!(%addr, "serving metrics");
    }
    let registration = (!args.cluster_agent.is_empty()).then(|| {
        let cfg = nvmf_target::api::registration::RegistrationConfig {
            agents: args.cluster_agent.clone(),
            engine_endpoint: format!("http://{}", args.grpc_advertise.unwrap_or(args.grpc)),
            labels: args.node_labels.iter().cloned().collect(),
            pool_labels: {
                let mut m: std::collections::HashMap<_, std::collections::HashMap<_, _>> =
                    Default::default();
                for (pool, k, v) in &args.pool_labels {
                    m.entry(pool.clone())
                        .or_default()
                        .insert(k.clone(), v.clone());
                }
                m
            },
        };
        // Deregistration comes last, after every nexus is shut down: it tells the cluster agent the engine ended
        // cleanly (no write left in flight), so it can recompose nexuses without a full resync.
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(nvmf_target::api::registration::run(
            engine.clone(),
            cfg,
            stop.clone(),
        ));
        (stop, task)
    });
    tracing::info!(grpc = %args.grpc, "io-engine running");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        r = api => { r??; anyhow::bail!("gRPC server stopped"); }
    }
    if !engine.shutdown().await {
        tracing::warn!(
            "a nexus did not drain: the cluster agent is told which, and resyncs its replicas"
        );
    }
    shutdown.cancel();
    if let Some((stop, task)) = registration {
        // Deregisters, naming the nexuses that did not drain.
        stop.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), task).await;
    }
    tracing::info!("stopped");
    Ok(())
}
