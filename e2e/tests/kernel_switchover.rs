//! HA switch-over with the Linux kernel as the application's host (in a QEMU VM): three io-engines and a cluster
//! agent in a network namespace, a 3-replica volume published to the guest, the node agent running in the guest
//! next to the kernel. While verified fio writes, the host makes the nexus fail, one way per round: kill -9 of its
//! io-engine, SIGSTOP of it, the guest cut off from it (a partition: it still reaches its replicas), a drain of its
//! node. The node agent reports the broken path, the cluster agent moves the nexus (fenced) to another node, the
//! node agent connects the new path and removes the dead one. fio must see no error in any round; the guest prints
//! each round's longest I/O stall and the path metrics. Needs root (network namespace) and QEMU.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use e2e::bins;
use e2e::netns::Netns;
use e2e::process::Process;
use e2e::vm::{self, VM_LOCK};

const VOLUME: &str = "00000000-0000-4000-8000-00000000a0a0";
const HOSTNQN: &str = "nqn.2026-11.io.keelson:host-app-1";
const HOSTID: &str = "5e3c0a2d-7f4b-4c1e-9a8d-2b6f0c9e1a01";
const AGENT: &str = "10.200.0.1:10200";
const ACK_PORT: u16 = 4440;

fn keelctl(ns: &Netns, args: &[&str]) -> Result<String> {
    let out = ns
        .command(bins::path("keelctl"))
        .args(args)
        .env("KEELSON_AGENT", format!("http://{AGENT}"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "keelctl {args:?}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// The address of engine `i`'s NVMe/TCP listener: its own, on the namespace's side of the tap (so that a test can
/// cut the guest off from it alone).
fn engine_ip(i: u32) -> String {
    format!("10.200.0.1{i}")
}

/// Engine `i` in the namespace: NVMe/TCP on [`engine_ip`]:4420, its own CNTLID range (a replacement nexus must
/// never hand out a CNTLID the host still holds), a pool on a sparse file.
fn engine(ns: &Netns, logs: &Path, i: u32) -> Result<Process> {
    let name = format!("n{i}");
    let disk = logs.join(format!("{name}-pool.img"));
    if !disk.exists() {
        std::fs::File::create(&disk)?.set_len(512 << 20)?;
    }
    let mut cmd = ns.command(bins::path("io-engine"));
    cmd.env("RUST_LOG", "info")
        .args(["--node-name", &name])
        .args(["--listen", &format!("{}:4420", engine_ip(i))])
        .args(["--grpc", &format!("127.0.0.{i}:10124")])
        .args([
            "--cntlid-range",
            &format!("{}-{}", i * 1000, i * 1000 + 999),
        ])
        .args(["--cluster-agent", &format!("http://{AGENT}")])
        .arg("--pool")
        .arg(format!("pool-{name}={}", disk.display()));
    let _ = ns
        .command("ip")
        .args([
            "addr",
            "add",
            &format!("{}/24", engine_ip(i)),
            "dev",
            &ns.tap,
        ])
        .stderr(std::process::Stdio::null())
        .status();
    let mut p = Process::spawn(&name, cmd, logs)?;
    p.wait_for_log("io-engine running", Duration::from_secs(20))?;
    Ok(p)
}

/// The node agent and the libraries it links (the guest has glibc's core but not necessarily libgcc_s), stripped.
fn stage_node_agent(job: &Path) -> Result<()> {
    let bin = job.join("node-agent");
    let st = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(bins::path("node-agent"))
        .arg(&bin)
        .status()?;
    if !st.success() {
        bail!("objcopy node-agent: {st}");
    }
    let ldd = Command::new("ldd").arg(&bin).output()?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| l.split("=> ").nth(1)?.split(' ').next())
        .filter(|l| l.contains("libgcc_s"))
    {
        std::fs::copy(lib, job.join(Path::new(lib).file_name().unwrap()))?;
    }
    Ok(())
}

/// The cluster agent in the namespace, on the embedded store in the test's directory (the same one each start),
/// with `failpoints` armed (`FAILPOINTS`; empty: none).
fn cluster_agent(ns: &Netns, logs: &Path, name: &str, failpoints: &str) -> Result<Process> {
    let mut cmd = ns.command(bins::path("cluster-agent"));
    cmd.env("RUST_LOG", "info")
        .env("FAILPOINTS", failpoints)
        .args(["--grpc", AGENT, "--data-dir"])
        .arg(logs.join("agent"))
        .args(["--heartbeat-ms", "500", "--node-timeout-ms", "2000"]);
    let mut p = Process::spawn(name, cmd, logs)?;
    p.wait_for_log("cluster agent starting", Duration::from_secs(20))?;
    Ok(p)
}

/// Waits until the agent lists the three nodes Online.
fn all_online(ns: &Netns) -> Result<()> {
    let t = Instant::now();
    while keelctl(ns, &["get", "nodes"])
        .unwrap_or_default()
        .matches("Online")
        .count()
        < 3
    {
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "nodes never came Online: {}",
                keelctl(ns, &["get", "nodes"]).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The node running the volume's nexus, as the cluster agent says (`n1`..`n3`), and the volume's state.
fn nexus_of(ns: &Netns) -> Result<(String, String)> {
    let out = keelctl(ns, &["get", "-o", "json", "volumes"])?;
    for l in out.lines() {
        let v: serde_json::Value = serde_json::from_str(l)?;
        if v["uuid"] == VOLUME {
            return Ok((
                v["nexus_node"].as_str().unwrap_or_default().to_string(),
                v["state"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    bail!("volume {VOLUME} not listed: {out}")
}

/// The failures of one run, from KEELSON_SWITCHOVER_FAILURES (the benchmark repeats them): `kill` (kill -9 of the
/// nexus's engine), `stop` (SIGSTOP of it), `cut` (the guest cut off from it while it still reaches the replicas),
/// `drain` (`keelctl node drain` of its node), `crash` (kill -9 of its engine with the cluster agent armed to die
/// right after recording the switch-over, then restarted). The keep-alive timeout of the guest's paths (what bounds
/// noticing a silent node) comes from KEELSON_SWITCHOVER_KATO.
fn failures() -> String {
    std::env::var("KEELSON_SWITCHOVER_FAILURES")
        .unwrap_or_else(|_| "kill stop cut drain crash".into())
}

#[test]
fn kernel_io_survives_nexus_failures_through_the_node_agents_switch_over() {
    let test = "kernel_io_survives_nexus_failures_through_the_node_agents_switch_over";
    if !vm::allowed(test) {
        return;
    }
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::create("keelson-e2e-ho", "kvtap3").unwrap();
    let logs = vm::tempdir().unwrap();
    let mut agent = cluster_agent(&ns, &logs, "cluster-agent", "").unwrap();
    let mut engines: Vec<Option<Process>> = (1..=3)
        .map(|i| Some(engine(&ns, &logs, i).unwrap()))
        .collect();
    all_online(&ns).unwrap();
    let mut agents = 1;
    keelctl(
        &ns,
        &["volume", "create", VOLUME, "64MiB", "--replicas", "3"],
    )
    .unwrap();
    let published = keelctl(&ns, &["volume", "publish", VOLUME, HOSTNQN, "--node", "n1"]).unwrap();
    println!("{published}");
    assert!(published.contains("10.200.0.11:4420"), "{published}");

    let tmp = vm::tempdir().unwrap();
    let job = tmp.join("job");
    std::fs::create_dir_all(&job).unwrap();
    std::fs::copy(
        bins::workspace().join("e2e/vm/jobs/kernel-switchover/run.sh"),
        job.join("run.sh"),
    )
    .unwrap();
    stage_node_agent(&job).unwrap();
    let params = [
        ("TARGET", engine_ip(1)),
        ("PORT", "4420".into()),
        ("ACK_HOST", "10.200.0.1".into()),
        ("NQN", format!("nqn.2026-11.io.keelson:vol-{VOLUME}")),
        ("HOSTNQN", HOSTNQN.into()),
        ("HOSTID", HOSTID.into()),
        ("AGENT", format!("http://{AGENT}")),
        ("FIO_SECONDS", "20".into()),
        ("FAILURES", format!("'{}'", failures())),
        (
            "KATO",
            std::env::var("KEELSON_SWITCHOVER_KATO").unwrap_or_else(|_| "5".into()),
        ),
        ("ACK_PORT", ACK_PORT.to_string()),
    ];
    // The engine made to fail in this round, how, and the listener that tells the guest it is back.
    let mut failed: Option<(usize, String)> = None;
    let mut ack: Option<std::process::Child> = None;
    let out = vm::run_job(&ns, &job, &params, Duration::from_secs(1800), |req| {
        if let Some(mode) = req.strip_prefix("fail-nexus ") {
            if let Some(mut a) = ack.take() {
                let _ = a.kill();
                let _ = a.wait();
            }
            let (node, _) = nexus_of(&ns)?;
            let i: usize = node.trim_start_matches('n').parse::<usize>()? - 1;
            let Some(p) = engines[i].as_ref() else {
                bail!("the nexus is on {node}, whose engine is not running");
            };
            if mode == "crash" {
                // The cluster agent will die (kill -9, at a failpoint) right after recording the switch-over.
                agent.terminate(Duration::from_secs(20))?;
                agent = cluster_agent(
                    &ns,
                    &logs,
                    "cluster-agent-armed",
                    "switchover.reported=return",
                )?;
                all_online(&ns)?;
            }
            match mode {
                "kill" => drop(engines[i].take()), // SIGKILL
                "crash" => {
                    drop(engines[i].take());
                    let st = agent.wait_exit(Duration::from_secs(60))?;
                    if std::os::unix::process::ExitStatusExt::signal(&st) != Some(9) {
                        bail!(
                            "the armed agent should have died at its failpoint: {st}\n{}",
                            agent.log()
                        );
                    }
                    agents += 1;
                    agent = cluster_agent(&ns, &logs, &format!("cluster-agent-{agents}"), "")?;
                    println!("host: the cluster agent died in the switch-over and was restarted");
                }
                "stop" => {
                    Command::new("kill")
                        .args(["-STOP", &p.pid().to_string()])
                        .status()?;
                }
                // A partition: the engine's address goes from the namespace, so the guest's packets to it and its
                // packets to the guest are dropped, while it still reaches the replicas and the cluster agent.
                "cut" => {
                    let st = ns
                        .command("ip")
                        .args([
                            "addr",
                            "del",
                            &format!("{}/24", engine_ip(i as u32 + 1)),
                            "dev",
                            &ns.tap,
                        ])
                        .status()?;
                    if !st.success() {
                        bail!("ip addr del: {st}");
                    }
                }
                // A planned move: the nexus leaves the node through the same path.
                "drain" => {
                    keelctl(&ns, &["node", "drain", &node])?;
                }
                other => bail!("unknown failure {other}"),
            }
            println!("host: {mode} of {node}, which ran the nexus");
            failed = Some((i, mode.to_string()));
        } else if req == "restore" {
            if let Some((i, mode)) = failed.take() {
                match engines[i].as_ref() {
                    Some(p) if mode == "stop" => {
                        Command::new("kill")
                            .args(["-CONT", &p.pid().to_string()])
                            .status()?;
                    }
                    Some(_) if mode == "cut" => {
                        ns.command("ip")
                            .args([
                                "addr",
                                "add",
                                &format!("{}/24", engine_ip(i as u32 + 1)),
                                "dev",
                                &ns.tap,
                            ])
                            .status()?;
                    }
                    Some(_) if mode == "drain" => {
                        keelctl(&ns, &["node", "uncordon", &format!("n{}", i + 1)])?;
                    }
                    _ => engines[i] = Some(engine(&ns, &logs, i as u32 + 1)?),
                }
            }
            // Back to three healthy replicas before the next round.
            let t = Instant::now();
            loop {
                let (_, state) = nexus_of(&ns)?;
                if state == "Online" {
                    break;
                }
                if t.elapsed() > Duration::from_secs(120) {
                    bail!(
                        "the volume never came back Online: {}",
                        keelctl(&ns, &["get", "volumes"])?
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            ack = Some(
                ns.command("socat")
                    .arg(format!(
                        "TCP-LISTEN:{ACK_PORT},bind=10.200.0.1,fork,reuseaddr"
                    ))
                    .arg("EXEC:/bin/true")
                    .spawn()?,
            );
        } else {
            bail!("unknown request {req}");
        }
        Ok(())
    })
    .unwrap();
    if let Some(mut a) = ack.take() {
        let _ = a.kill();
        let _ = a.wait();
    }
    println!("{}", out.output);
    let volumes = keelctl(&ns, &["get", "volumes"]).unwrap_or_default();
    assert!(
        out.success && out.output.contains("ALL-OK"),
        "guest job failed:\n{}\nvolumes:\n{volumes}\ncluster agent:\n{}",
        out.output,
        agent.log()
    );
    println!("{volumes}");
    // The cluster agents' stage timings of each switch-over.
    for e in std::fs::read_dir(&logs).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("cluster-agent") {
            let log = std::fs::read_to_string(e.path()).unwrap_or_default();
            for l in log.lines().filter(|l| l.contains("switched over")) {
                println!("agent: {l}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    drop(engines);
}
