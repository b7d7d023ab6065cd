//! The Linux kernel initiator (in a QEMU VM) on a 3-replica nexus of pool-backed thin replicas (each io-engine has
//! a pool on a sparse file): verified fio while one replica's io-engine is killed and later replaced by a new
//! replica rebuilt online. Needs root (network namespace) and QEMU.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use e2e::bins;
use e2e::netns::Netns;
use e2e::process::Process;
use e2e::vm::{self, VM_LOCK};

const SIZE: &str = "128MiB";
const VOLUME: &str = "00000000-0000-4000-8000-00000000ab5e";

fn replica_uuid(i: u32) -> String {
    format!("00000000-0000-4000-8000-00000000000{i}")
}

fn replica(i: u32) -> String {
    format!("nqn.2026-11.io.keelson:replica-{}", replica_uuid(i))
}

/// An io-engine inside the namespace with a pool on a 512 MiB sparse file, serving one thin replica of it.
fn engine(
    ns: &Netns,
    logs: &std::path::Path,
    name: &str,
    listen: &str,
    grpc: &str,
    replica: u32,
) -> Result<Process> {
    let disk = logs.join(format!("{name}-pool.img"));
    std::fs::File::create(&disk)?.set_len(512 << 20)?;
    let mut cmd = ns.command(bins::path("io-engine"));
    cmd.env("RUST_LOG", "info")
        .args(["--node-name", name, "--listen", listen, "--grpc", grpc])
        .arg("--pool")
        .arg(format!("pool-{name}={}", disk.display()));
    let mut p = Process::spawn(name, cmd, logs)?;
    p.wait_for_log("io-engine running", Duration::from_secs(20))?;
    let pool = format!("pool-{name}");
    let uuid = replica_uuid(replica);
    keelctl_at(
        ns,
        grpc,
        &["replica", "create", &pool, &uuid, SIZE, "--share"],
    )?;
    Ok(p)
}

fn keelctl(ns: &Netns, args: &[&str]) -> Result<String> {
    keelctl_at(ns, "127.0.0.1:10124", args)
}

fn keelctl_at(ns: &Netns, grpc: &str, args: &[&str]) -> Result<String> {
    let out: std::process::Output = ns
        .command(bins::path("keelctl"))
        .args(["engine", "--endpoint", &format!("http://{grpc}")])
        .args(args)
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

#[test]
fn kernel_fio_survives_a_killed_replica_and_reads_back_from_the_rebuilt_one() {
    if !vm::allowed("kernel_fio_survives_a_killed_replica_and_reads_back_from_the_rebuilt_one") {
        return;
    }
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::create("keelson-e2e-nexus", "kvtap0").unwrap();
    let logs = vm::tempdir().unwrap();
    let nexus_engine = engine(&ns, &logs, "n1", "10.200.0.1:4420", "127.0.0.1:10124", 1).unwrap();
    let _r2 = engine(&ns, &logs, "n2", "127.0.0.2:4420", "127.0.0.2:10124", 2).unwrap();
    let mut r3 = Some(engine(&ns, &logs, "n3", "127.0.0.3:4420", "127.0.0.3:10124", 3).unwrap());
    let mut r4 = None;
    let c1 = format!("local:///{}", replica(1));
    let c2 = format!("nvmf://127.0.0.2:4420/{}", replica(2));
    let c3 = format!("nvmf://127.0.0.3:4420/{}", replica(3));
    let c4 = format!("nvmf://127.0.0.4:4420/{}", replica(4));
    keelctl(
        &ns,
        &[
            "create-nexus",
            VOLUME,
            &c1,
            &c2,
            &c3,
            "--io-timeout-ms",
            "5000",
        ],
    )
    .unwrap();
    let published = keelctl(&ns, &["publish-nexus", VOLUME, "--allow-any-host"]).unwrap();
    assert!(published.contains(" online "), "{published}");
    let nqn = format!("nqn.2026-11.io.keelson:vol-{VOLUME}");

    let job = bins::workspace().join("e2e/vm/jobs/kernel-nexus");
    let params = [
        ("TARGET", "10.200.0.1".to_string()),
        ("PORT", "4420".into()),
        ("NQN", nqn),
        ("ACK_PORT", "4431".into()),
    ];
    let out = vm::run_job(&ns, &job, &params, Duration::from_secs(400), |req| {
        match req {
            "kill-replica" => {
                drop(r3.take()); // SIGKILL
            }
            "replace-replica" => {
                let state = keelctl(&ns, &["nexuses"])?;
                if !state.contains(&format!("child {c3} faulted")) {
                    bail!("the killed replica is not faulted:\n{state}");
                }
                keelctl(&ns, &["remove-child", VOLUME, &c3])?;
                r4 = Some(engine(
                    &ns,
                    &logs,
                    "n4",
                    "127.0.0.4:4420",
                    "127.0.0.4:10124",
                    4,
                )?);
                keelctl(&ns, &["add-child", VOLUME, &c4])?;
            }
            "isolate-rebuilt" => {
                let start = Instant::now();
                loop {
                    let state = keelctl(&ns, &["nexuses"])?;
                    if state.contains(&format!("nexus {VOLUME} online")) {
                        println!("{state}");
                        break;
                    }
                    if start.elapsed() > Duration::from_secs(120) {
                        bail!("nexus never came back online:\n{state}");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                keelctl(
                    &ns,
                    &[
                        "fault-child",
                        VOLUME,
                        &c1,
                        "--reason",
                        "test: read from the rebuilt replica only",
                    ],
                )?;
                keelctl(
                    &ns,
                    &[
                        "fault-child",
                        VOLUME,
                        &c2,
                        "--reason",
                        "test: read from the rebuilt replica only",
                    ],
                )?;
                keelctl(&ns, &["add-listener", "10.200.0.1:4431"])?;
            }
            other => bail!("unknown request {other}"),
        }
        Ok(())
    })
    .unwrap();
    println!("{}", out.output);
    let state = keelctl(&ns, &["nexuses"]).unwrap_or_default();
    assert!(
        out.success && out.output.contains("ALL-OK"),
        "guest job failed:\n{}\nnexus:\n{state}\nio-engine:\n{}",
        out.output,
        nexus_engine.log()
    );
    // Thin pool replicas: clusters the guest never wrote are skipped, the rest copied.
    let line = state
        .lines()
        .find(|l| l.contains(&format!("rebuild {c4} full copied=")))
        .unwrap_or_else(|| panic!("no rebuild record for {c4}:\n{state}"));
    let field = |k: &str| -> u64 {
        let v = line
            .split(k)
            .nth(1)
            .unwrap()
            .split([' ', '/'])
            .next()
            .unwrap();
        v.parse().unwrap()
    };
    assert_eq!(field("copied=") + field("skipped="), 134217728, "{line}");
    assert!(field("copied=") > 0 && line.ends_with(" ok"), "{line}");
    // Passed: the pools' disks go (the logs stay, as for every e2e test).
    for n in ["n1", "n2", "n3", "n4"] {
        let _ = std::fs::remove_file(logs.join(format!("{n}-pool.img")));
    }
}
