//! Scale benchmark of the cluster agent (not a test: it prints figures). One real `cluster-agent` process on a real
//! etcd (or the embedded store) manages `--nodes` simulated io-engines (`sim_engine`: the engine API served from
//! memory, all in this process) and `--volumes` volumes of 3 replicas. It reports the time to register the nodes,
//! create and publish the volumes, the agent's RSS and CPU, the store's size, and the time from a replica fault (a
//! simulated engine faults a child and reports it, as io-engine does) to the start of its replacement's rebuild
//! (the replacement child added to the nexus), over `--faults` faults one after the other.
//!
//! `scripts/bench-scale.sh` builds the release binaries and runs it; see its header for the options.

mod sim_engine;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use proto::cluster as cpb;
use proto::cluster::cluster_client::ClusterClient;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    #[arg(long, default_value_t = 10000)]
    volumes: usize,
    #[arg(long, default_value_t = 100)]
    faults: usize,
    /// Create and publish requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// `etcd` (a real etcd started here) or `embedded`.
    #[arg(long, default_value = "etcd")]
    store: String,
    /// The cluster-agent binary (default: target/release/cluster-agent).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Extra flags for the cluster agent, space-separated.
    #[arg(long, default_value = "")]
    agent_args: String,
    // `cargo bench` passes --bench.
    #[arg(long, hide = true)]
    bench: bool,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts etcd on loopback with its data in `dir`.
fn etcd(dir: &std::path::Path) -> Result<(Killed, String)> {
    let (client, peer) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "keelson-bench", "--data-dir"])
        .arg(dir)
        .args([
            "--listen-client-urls",
            &endpoint,
            "--advertise-client-urls",
            &endpoint,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("keelson-bench={peer_url}")])
        .args(["--quota-backend-bytes", &(8u64 << 30).to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("etcd (Debian package etcd-server)")?;
    Ok((Killed(child), endpoint))
}

/// Resident and peak resident memory of `pid`, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds (user + system) `pid` has used.
fn cpu_s(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Runs `op` on every volume index with `concurrency` in flight; returns the latencies and the wall time.
async fn each_volume<F, Fut>(
    count: usize,
    concurrency: usize,
    op: F,
) -> Result<(Vec<Duration>, Duration)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let t = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (op, next, lat) = (op.clone(), next.clone(), lat.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return Ok::<(), anyhow::Error>(());
                }
                let s = Instant::now();
                let mut tries = 0;
                loop {
                    match op(i).await {
                        Ok(()) => break,
                        Err(e) if tries < 5 => {
                            tries += 1;
                            eprintln!("volume {i}: {e:#}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                lat.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(s.elapsed());
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let wall = t.elapsed();
    let mut v = std::mem::take(&mut *lat.lock().unwrap_or_else(|e| e.into_inner()));
    v.sort();
    Ok((v, wall))
}

fn volume_uuid(i: usize) -> String {
    uuid::Uuid::from_u128(0x6b65_656c_736f_6e00_0000_0000_0000_0000 | i as u128).to_string()
}

fn report(what: &str, count: usize, lat: &[Duration], wall: Duration) {
    println!(
        "{what}: {count} in {:.1} s ({:.0}/s); latency p50 {} p99 {} max {}",
        wall.as_secs_f64(),
        count as f64 / wall.as_secs_f64(),
        ms(percentile(lat, 0.5)),
        ms(percentile(lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default()),
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let want = (args.nodes as u64) * 4 + 4096;
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    if soft < want {
        nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            want.min(hard),
            hard,
        )?;
    }
    let agent_bin = args
        .agent
        .clone()
        .unwrap_or_else(|| e2e::bins::workspace().join("target/release/cluster-agent"));
    anyhow::ensure!(
        agent_bin.exists(),
        "{} is missing: build it with cargo build --release",
        agent_bin.display()
    );
    let work = tempfile::tempdir()?;
    println!(
        "scale benchmark: {} simulated nodes, {} volumes of 3 replicas, {} faults, store {}, {} requests in flight",
        args.nodes, args.volumes, args.faults, args.store, args.concurrency
    );

    // The store and the agent.
    let store_dir = work.path().join("store");
    let mut agent_cmd = Command::new(&agent_bin);
    let _etcd = match args.store.as_str() {
        "etcd" => {
            let (etcd, endpoint) = etcd(&store_dir)?;
            let t = Instant::now();
            while ha_agent::cluster::store::etcd::EtcdStore::connect(std::slice::from_ref(
                &endpoint,
            ))
            .await
            .is_err()
            {
                anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "etcd never came up");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            agent_cmd.args(["--store", "etcd", "--etcd", &endpoint]);
            Some(etcd)
        }
        "embedded" => {
            agent_cmd
                .args(["--store", "embedded", "--data-dir"])
                .arg(&store_dir);
            None
        }
        other => bail!("--store {other}: etcd or embedded"),
    };
    let grpc = format!("127.0.0.1:{}", free_port());
    let log_path = work.path().join("agent.log");
    agent_cmd
        .args(["--grpc", &grpc])
        .args(args.agent_args.split_whitespace())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?);
    let agent = Killed(agent_cmd.spawn().context("starting the cluster agent")?);
    let pid = agent.0.id();
    let url = format!("http://{grpc}");
    let mut api: ClusterClient<Channel> = {
        let t = Instant::now();
        loop {
            match ClusterClient::connect(url.clone()).await {
                Ok(c) => break c,
                Err(_) if t.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => bail!("the agent never answered: {e}"),
            }
        }
    };

    // The nodes.
    let replaced = Arc::new(Mutex::new(Vec::new()));
    let t = Instant::now();
    let engines = Arc::new(sim_engine::start(args.nodes, replaced.clone()).await);
    for e in engines.values() {
        tokio::spawn(e.clone().register_and_beat(url.clone()));
    }
    loop {
        let online = api
            .list_nodes(cpb::ListNodesRequest {})
            .await
            .map(|r| {
                r.into_inner()
                    .nodes
                    .iter()
                    .filter(|n| n.state == cpb::NodeState::Online as i32)
                    .count()
            })
            .unwrap_or(0);
        if online == args.nodes {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(300),
            "only {online} nodes Online after 5 min"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "nodes: {} Online in {:.1} s",
        args.nodes,
        t.elapsed().as_secs_f64()
    );

    // The volumes: created, then published.
    let cpu0 = cpu_s(pid);
    let (lat, wall) = each_volume(args.volumes, args.concurrency, {
        let api = api.clone();
        move |i| {
            let mut api = api.clone();
            async move {
                api.create_volume(cpb::CreateVolumeRequest {
                    uuid: volume_uuid(i),
                    size_bytes: 1 << 30,
                    replicas: 3,
                    ..Default::default()
                })
                .await
                .map(drop)
                .map_err(|s| anyhow::anyhow!("create: {}: {}", s.code(), s.message()))
            }
        }
    })
    .await?;
    report("create", args.volumes, &lat, wall);
    let cpu1 = cpu_s(pid);
    println!(
        "  agent CPU {:.1} s, {:.2} ms per volume",
        cpu1 - cpu0,
        (cpu1 - cpu0) * 1000.0 / args.volumes as f64
    );
    let (lat, wall) = each_volume(args.volumes, args.concurrency, {
        let api = api.clone();
        move |i| {
            let mut api = api.clone();
            async move {
                api.publish_volume(cpb::PublishVolumeRequest {
                    uuid: volume_uuid(i),
                    host_nqn: "nqn.2026-11.io.keelson:host-bench".into(),
                    node: String::new(),
                    multi_host: false,
                    require_known_node: false,
                })
                .await
                .map(drop)
                .map_err(|s| anyhow::anyhow!("publish: {}: {}", s.code(), s.message()))
            }
        }
    })
    .await?;
    report("publish", args.volumes, &lat, wall);
    let cpu2 = cpu_s(pid);
    println!(
        "  agent CPU {:.1} s, {:.2} ms per volume",
        cpu2 - cpu1,
        (cpu2 - cpu1) * 1000.0 / args.volumes as f64
    );

    // Steady state.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu3 = cpu_s(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu4 = cpu_s(pid);
    let (rss, hwm) = rss_mib(pid);
    // etcd's database file (its write-ahead log preallocates 64 MiB segments) or the embedded store's file.
    let db = [
        store_dir.join("member/snap/db"),
        store_dir.join("store.redb"),
    ]
    .iter()
    .find_map(|p| std::fs::metadata(p).ok())
    .map_or(0, |m| m.len());
    println!(
        "steady state: agent CPU {:.0}% of a core over 10 s; RSS {rss:.0} MiB (peak {hwm:.0} MiB); store database {:.1} MiB ({:.1} MiB on disk with logs)",
        (cpu4 - cpu3) * 10.0,
        db as f64 / (1 << 20) as f64,
        dir_bytes(&store_dir) as f64 / (1 << 20) as f64
    );

    // Faults, one after the other.
    let where_nexus: BTreeMap<String, String> = engines
        .values()
        .flat_map(|e| e.nexus_names().into_iter().map(|n| (n, e.name.clone())))
        .collect();
    anyhow::ensure!(
        where_nexus.len() == args.volumes,
        "{} nexuses for {} volumes",
        where_nexus.len(),
        args.volumes
    );
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut missed = 0;
    let t = Instant::now();
    for _ in 0..args.faults {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let v = volume_uuid(seed as usize % args.volumes);
        let e = &engines[&where_nexus[&v]];
        let before = replaced.lock().unwrap_or_else(|e| e.into_inner()).len();
        if e.fault_child(&v, &engines).is_none() {
            missed += 1;
            continue;
        }
        let waited = Instant::now();
        while replaced.lock().unwrap_or_else(|e| e.into_inner()).len() == before {
            if waited.elapsed() > Duration::from_secs(30) {
                missed += 1;
                eprintln!("volume {v}: no replacement within 30 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut lat = replaced.lock().unwrap_or_else(|e| e.into_inner()).clone();
    lat.sort();
    println!(
        "faults: {} in {:.1} s, {} without a replacement; fault to rebuild start p50 {} p99 {} max {}",
        args.faults,
        t.elapsed().as_secs_f64(),
        missed,
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default()),
    );
    let (rss, hwm) = rss_mib(pid);
    println!(
        "end: agent RSS {rss:.0} MiB (peak {hwm:.0} MiB), CPU {:.1} s in all",
        cpu_s(pid)
    );
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    println!("agent log: {warnings} warnings or errors");
    for l in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(5)
    {
        println!("  {l}");
    }
    drop(api);
    anyhow::ensure!(missed == 0, "{missed} faults were not repaired");
    Ok(())
}
