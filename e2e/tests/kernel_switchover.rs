//! HA switch-over with the Linux kernel as the application's host (in a QEMU VM): three io-engines and a cluster
//! agent in a network namespace, a 3-replica volume published to the guest, the node agent running in the guest
//! next to the kernel. The host kills -9 the io-engine hosting the nexus while verified fio writes; the node agent
//! reports the broken path, the cluster agent moves the nexus (fenced) to another node, the node agent connects the
//! new path and removes the dead one. fio must see no error; the guest prints the longest I/O stall and the path
//! metrics. Needs root (network namespace) and QEMU.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use e2e::bins;
use e2e::netns::Netns;
use e2e::process::Process;
use e2e::vm::{self, VM_LOCK};

const VOLUME: &str = "00000000-0000-4000-8000-00000000a0a0";
const HOSTNQN: &str = "nqn.2026-11.io.keelson:host-app-1";
const HOSTID: &str = "5e3c0a2d-7f4b-4c1e-9a8d-2b6f0c9e1a01";
const AGENT: &str = "10.200.0.1:10200";

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

/// Engine `i` in the namespace: NVMe/TCP on 10.200.0.1:442i (the guest reaches only 10.200.0.1), its own CNTLID
/// range (a replacement nexus must never hand out a CNTLID the host still holds), a pool on a sparse file.
fn engine(ns: &Netns, logs: &Path, i: u32) -> Result<Process> {
    let name = format!("n{i}");
    let disk = logs.join(format!("{name}-pool.img"));
    std::fs::File::create(&disk)?.set_len(512 << 20)?;
    let mut cmd = ns.command(bins::path("io-engine"));
    cmd.env("RUST_LOG", "info")
        .args(["--node-name", &name])
        .args(["--listen", &format!("10.200.0.1:442{i}")])
        .args(["--grpc", &format!("127.0.0.{i}:10124")])
        .args([
            "--cntlid-range",
            &format!("{}-{}", i * 1000, i * 1000 + 999),
        ])
        .args(["--cluster-agent", &format!("http://{AGENT}")])
        .arg("--pool")
        .arg(format!("pool-{name}={}", disk.display()));
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

#[test]
fn kernel_io_survives_a_killed_nexus_engine_through_the_node_agents_switch_over() {
    let test = "kernel_io_survives_a_killed_nexus_engine_through_the_node_agents_switch_over";
    if !vm::allowed(test) {
        return;
    }
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::create("keelson-e2e-ho", "kvtap3").unwrap();
    let logs = vm::tempdir().unwrap();
    let mut agent_cmd = ns.command(bins::path("cluster-agent"));
    agent_cmd
        .env("RUST_LOG", "info")
        .args(["--grpc", AGENT, "--data-dir"])
        .arg(logs.join("agent"))
        .args(["--heartbeat-ms", "500", "--node-timeout-ms", "2000"]);
    let mut agent = Process::spawn("cluster-agent", agent_cmd, &logs).unwrap();
    agent
        .wait_for_log("cluster agent starting", Duration::from_secs(20))
        .unwrap();
    let mut engines: Vec<Option<Process>> = (1..=3)
        .map(|i| Some(engine(&ns, &logs, i).unwrap()))
        .collect();
    let t = std::time::Instant::now();
    while keelctl(&ns, &["get", "nodes"])
        .unwrap_or_default()
        .matches("Online")
        .count()
        < 3
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "nodes never came Online"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    keelctl(
        &ns,
        &["volume", "create", VOLUME, "64MiB", "--replicas", "3"],
    )
    .unwrap();
    let published = keelctl(&ns, &["volume", "publish", VOLUME, HOSTNQN, "--node", "n1"]).unwrap();
    println!("{published}");
    assert!(published.contains("10.200.0.1:4421"), "{published}");

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
        ("TARGET", "10.200.0.1".to_string()),
        ("PORT", "4421".into()),
        ("NQN", format!("nqn.2026-11.io.keelson:vol-{VOLUME}")),
        ("HOSTNQN", HOSTNQN.into()),
        ("HOSTID", HOSTID.into()),
        ("AGENT", format!("http://{AGENT}")),
        ("FIO_SECONDS", "20".into()),
    ];
    let out = vm::run_job(&ns, &job, &params, Duration::from_secs(400), |req| {
        match req {
            "kill-nexus" => drop(engines[0].take()), // SIGKILL
            other => bail!("unknown request {other}"),
        }
        Ok(())
    })
    .unwrap();
    println!("{}", out.output);
    let volume = keelctl(&ns, &["get", "volumes"]).unwrap_or_default();
    assert!(
        out.success && out.output.contains("ALL-OK"),
        "guest job failed:\n{}\nvolume:\n{volume}\ncluster agent:\n{}",
        out.output,
        agent.log()
    );
    println!("{volume}");
    assert!(
        volume.contains(VOLUME) && !volume.contains("10.200.0.1:4421"),
        "the nexus left n1: {volume}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
    drop(engines);
}
