//! nvmf-perf: a load generator in the spirit of fio / spdk_nvme_perf, built on Keelson's initiator.
//! Drives `--queues` I/O queues with `--qd` commands outstanding each, for `--time` seconds, and prints IOPS,
//! throughput, latency percentiles and CPU seconds (its own, and the target's with `--target-pid`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use nvmf_target::config::parse_size;
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::controller::Controller;
use nvmf_target::initiator::queue::Queue;
use nvmf_target::protocol::command::{Sgl, Sqe, io};

/// mimalloc keeps the large, short-lived I/O buffers in its own pages; glibc's malloc turns every 128 KiB buffer
/// into an mmap/munmap pair with page faults, which halves large-block throughput.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Pattern {
    Randread,
    Randwrite,
    Randrw,
    Read,
    Write,
}

#[derive(Parser, Debug)]
#[command(
    name = "nvmf-perf",
    version,
    about = "NVMe/TCP load generator on Keelson's initiator"
)]
struct Args {
    /// Target address.
    #[arg(long, default_value = "127.0.0.1:4420")]
    addr: SocketAddr,
    /// Subsystem NQN.
    #[arg(long, required_unless_present_any = ["pingpong", "pingpong_server"], default_value = "")]
    nqn: String,
    /// Namespace ID.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    #[arg(long, value_enum, default_value = "randread")]
    rw: Pattern,
    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 50)]
    mix: u32,
    /// Block size (e.g. 4k, 128k).
    #[arg(long, default_value = "4k")]
    bs: String,
    /// Outstanding commands per queue.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// I/O queues (one TCP connection each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Seconds to run (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    time: u64,
    /// Bytes of the namespace to touch (default: all of it from `--offset`).
    #[arg(long)]
    size: Option<String>,
    /// Where the touched bytes start (a multiple of the block size).
    #[arg(long, default_value = "0")]
    offset: String,
    /// Host NQN to connect as (default: a fresh one of nvmf-perf's own).
    #[arg(long)]
    host_nqn: Option<String>,
    /// Header and data digests.
    #[arg(long)]
    digests: bool,
    /// TCP congestion control of the connection, as io-engine's flag: `auto` (CUBIC where the system's default is
    /// BBR), `system`, or an algorithm's name.
    #[arg(long, env = "KEELSON_TCP_CONGESTION", default_value = "auto")]
    tcp_congestion: nvmf_target::transport::Congestion,
    /// Also report this process's CPU seconds (e.g. the io-engine's PID).
    #[arg(long)]
    target_pid: Option<u32>,
    /// Connect and stay idle (keep-alive only) for `--time` seconds, then report the target's CPU seconds.
    #[arg(long)]
    idle: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Measure the bare TCP round trip instead, the floor under any NVMe/TCP latency: 64-byte messages to a
    /// `--pingpong-server` at `--addr` and back, one at a time, for `--time` seconds; prints p50 and p99.
    #[arg(long)]
    pingpong: bool,
    /// Serve `--pingpong` on `--addr` (echo 64-byte messages) until killed.
    #[arg(long)]
    pingpong_server: bool,
}

/// Blocking sockets, one thread each side: what the kernel gives a round trip without busy polling.
fn pingpong_server(addr: SocketAddr) -> Result<()> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    for s in l.incoming() {
        let mut s = s?;
        s.set_nodelay(true)?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {}
        });
    }
    Ok(())
}

fn pingpong(addr: SocketAddr, time: Duration) -> Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connecting {addr}"))?;
    s.set_nodelay(true)?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut buf = [0x5Au8; 64];
    let warm = Instant::now() + Duration::from_secs(1);
    let end = warm + time;
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        s.write_all(&buf)?;
        s.read_exact(&mut buf)?;
        if t >= warm {
            hist.record(t.elapsed().as_nanos() as u64)?;
        }
    }
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "TCP ping-pong 64 B: {} round trips, us p50 {:.1} p99 {:.1} mean {:.1}",
        hist.len(),
        us(0.5),
        us(0.99),
        hist.mean() / 1000.0
    );
    Ok(())
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

struct Worker {
    hist: Histogram<u64>,
    ios: u64,
    errors: u64,
    /// The first failed command's error (an NVMe status names itself).
    first_error: Option<String>,
    disconnected: bool,
}

/// Worker `index` of all (`a.stride` of them): random patterns draw from `seed`; sequential ones start at the
/// worker's index and step over the others, so that together they write (or read) one sequential stream.
async fn worker(q: Queue, a: WorkerArgs, index: u64, seed: u64) -> Worker {
    let mut w = Worker {
        hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram"),
        ios: 0,
        errors: 0,
        first_error: None,
        disconnected: false,
    };
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let blocks_per_io = a.bs / u64::from(a.lba_size);
    let slots = a.region / a.bs;
    let data = Bytes::from(vec![0xA5u8; a.bs as usize]);
    let mut seq = (index % slots.max(1)) * blocks_per_io;
    let start = Instant::now();
    let warm = start + Duration::from_secs(1);
    let end = warm + a.time;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let r = next();
        let read = match a.rw {
            Pattern::Randread | Pattern::Read => true,
            Pattern::Randwrite | Pattern::Write => false,
            Pattern::Randrw => (r % 100) < u64::from(a.mix),
        };
        let lba = a.first_lba
            + if matches!(a.rw, Pattern::Read | Pattern::Write) {
                let at = seq;
                seq = (seq + blocks_per_io * a.stride) % (slots * blocks_per_io);
                at
            } else {
                (next() % slots) * blocks_per_io
            };
        let op = if read { io::READ } else { io::WRITE };
        let mut sqe = Sqe::rw(op, a.nsid, lba, blocks_per_io as u32, a.bs as u32, false);
        let payload = if read {
            sqe.set_sgl(Sgl::transport(a.bs as u32));
            None
        } else {
            Some(data.clone())
        };
        let t = Instant::now();
        let res = q.submit(sqe, payload).await;
        if let Err(e) = &res
            && w.first_error.is_none()
        {
            w.first_error = Some(e.to_string());
        }
        if t >= warm {
            match res {
                Ok(_) => {
                    w.ios += 1;
                    let _ = w.hist.record(t.elapsed().as_nanos() as u64);
                }
                Err(_) => w.errors += 1,
            }
        } else if res.is_err() {
            w.errors += 1;
        }
        // A queue whose connection is gone fails every command at once: stop rather than spin on errors.
        if res.is_err() && q.closed().is_cancelled() {
            w.disconnected = true;
            break;
        }
    }
    w
}

#[derive(Clone, Copy)]
struct WorkerArgs {
    rw: Pattern,
    mix: u32,
    bs: u64,
    lba_size: u32,
    region: u64,
    /// The region's first block.
    first_lba: u64,
    nsid: u32,
    time: Duration,
    stride: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.pingpong_server {
        // Blocking is fine here: nothing else runs on this runtime in this mode.
        return pingpong_server(args.addr);
    }
    if args.pingpong {
        return pingpong(args.addr, Duration::from_secs(args.time));
    }
    nvmf_target::transport::set_congestion(&args.tcp_congestion)
        .map_err(|e| anyhow::anyhow!("--tcp-congestion: {e}"))?;
    let bs = parse_size(&args.bs)?;
    let mut o = ConnectOptions::new(args.addr, &args.nqn);
    o.io_queues = args.queues;
    o.queue_depth = u16::try_from(args.qd).context("qd too large")?;
    o.header_digest = args.digests;
    o.data_digest = args.digests;
    if let Some(h) = &args.host_nqn {
        o.hostnqn = h.clone();
    }
    let ctrl = Controller::connect(&o).await.context("connecting")?;
    let ns = ctrl
        .identify_namespace(args.nsid)
        .await
        .context("identify namespace")?;
    let lba_size = 1u32 << ns.lbads;
    let ns_bytes = ns.nsze * u64::from(lba_size);
    let offset = parse_size(&args.offset)?;
    anyhow::ensure!(
        offset % bs == 0 && offset < ns_bytes,
        "offset must be a multiple of bs inside the namespace"
    );
    let region = match &args.size {
        Some(s) => parse_size(s)?.min(ns_bytes - offset),
        None => ns_bytes - offset,
    };
    anyhow::ensure!(
        bs >= u64::from(lba_size) && bs % u64::from(lba_size) == 0,
        "bs must be a multiple of {lba_size}"
    );
    anyhow::ensure!(region >= bs, "region smaller than one I/O");
    if args.idle {
        let pid = args.target_pid.map(|p| p.to_string());
        let t0 = pid.as_deref().and_then(cpu_seconds);
        tokio::time::sleep(Duration::from_secs(args.time)).await;
        let used = pid
            .as_deref()
            .and_then(cpu_seconds)
            .zip(t0)
            .map(|(a, b)| a - b);
        let _ = ctrl.shutdown().await;
        match used {
            Some(c) => println!(
                "idle {} s with {} queue(s) connected: target CPU {c:.2} s",
                args.time, args.queues
            ),
            None => println!(
                "idle {} s: give --target-pid to measure the target's CPU",
                args.time
            ),
        }
        return Ok(());
    }
    let total_workers = args.qd * ctrl.io_queues().len();
    let wa = WorkerArgs {
        rw: args.rw,
        mix: args.mix,
        bs,
        lba_size,
        region,
        first_lba: offset / u64::from(lba_size),
        nsid: args.nsid,
        time: Duration::from_secs(args.time),
        stride: total_workers as u64,
    };
    let me = std::process::id().to_string();
    let target_pid = args.target_pid.map(|p| p.to_string());
    let mut tasks = tokio::task::JoinSet::new();
    for (qi, q) in ctrl.io_queues().iter().enumerate() {
        for d in 0..args.qd {
            let index = (qi * args.qd + d) as u64;
            let seed = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(index + 1);
            tasks.spawn(worker(q.clone(), wa, index, seed));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (c0, t0, w0) = (
        cpu_seconds(&me),
        target_pid.as_deref().and_then(cpu_seconds),
        Instant::now(),
    );
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let (mut ios, mut errors, mut lost) = (0u64, 0u64, 0usize);
    let mut first_error = None;
    while let Some(w) = tasks.join_next().await {
        let w = w?;
        hist.add(&w.hist)?;
        ios += w.ios;
        errors += w.errors;
        lost += usize::from(w.disconnected);
        first_error = first_error.or(w.first_error);
    }
    let secs = w0.elapsed().as_secs_f64();
    let client_cpu = cpu_seconds(&me).zip(c0).map(|(a, b)| a - b);
    let target_cpu = target_pid
        .as_deref()
        .and_then(cpu_seconds)
        .zip(t0)
        .map(|(a, b)| a - b);
    let _ = ctrl.shutdown().await;

    let iops = ios as f64 / secs;
    let mbps = iops * bs as f64 / 1e6;
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let per_m = |cpu: Option<f64>| cpu.map(|c| c / (ios as f64 / 1e6));
    // Written at once, ignoring a closed pipe (`nvmf-perf ... | head -1` must not panic).
    let mut out = String::new();
    if args.json {
        let v = serde_json::json!({
            "rw": format!("{:?}", args.rw).to_lowercase(), "bs": bs, "qd": args.qd, "queues": args.queues,
            "seconds": secs, "ios": ios, "errors": errors, "first_error": first_error, "iops": iops, "mb_per_s": mbps,
            "lat_us": {"mean": hist.mean() / 1000.0, "p50": us(0.5), "p99": us(0.99), "p999": us(0.999)},
            "client_cpu_s": client_cpu, "target_cpu_s": target_cpu,
            "target_cpu_s_per_million_ios": per_m(target_cpu), "client_cpu_s_per_million_ios": per_m(client_cpu),
        });
        out = format!("{v}\n");
    } else {
        out += &format!(
            "{:?} bs={} qd={} queues={}: {:.0} IOPS, {:.1} MB/s, lat us mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1}, errors {}",
            args.rw,
            bs,
            args.qd,
            args.queues,
            iops,
            mbps,
            hist.mean() / 1000.0,
            us(0.5),
            us(0.99),
            us(0.999),
            errors
        );
        out.push('\n');
        if let Some(c) = client_cpu {
            out += &format!(
                "  client CPU {c:.2} s ({:.2} s per million I/Os)\n",
                per_m(Some(c)).unwrap_or(0.0)
            );
        }
        if let Some(c) = target_cpu {
            out += &format!(
                "  target CPU {c:.2} s ({:.2} s per million I/Os)\n",
                per_m(Some(c)).unwrap_or(0.0)
            );
        }
    }
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    anyhow::ensure!(
        lost == 0,
        "{lost} of {total_workers} workers lost their connection"
    );
    anyhow::ensure!(
        errors == 0 && first_error.is_none(),
        "{errors} I/O errors; the first: {}",
        first_error.unwrap_or_default()
    );
    Ok(())
}
