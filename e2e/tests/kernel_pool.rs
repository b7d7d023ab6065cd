//! The Linux kernel initiator (in a QEMU VM) on two thin replicas that together overcommit a small pool: data reads back, a write that
//! needs a new cluster fails with ENOSPC (the kernel's reading of NVMe Capacity Exceeded), nothing else breaks, the
//! pool counts the failure, and once the guest discards the other replica (`blkdiscard`) the write fits. And on a replica of a pool on a 4Kn disk (a loop device with 4096-byte logical
//! blocks): the kernel sees 4096-byte blocks and a file system on it keeps its files. Needs root (network
//! namespace, losetup) and QEMU.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use e2e::bins;
use e2e::loopdev::Loop;
use e2e::netns::Netns;
use e2e::process::Process;
use e2e::vm::{self, VM_LOCK};

const X: &str = "00000000-0000-4000-8000-0000000000c1";
const Y: &str = "00000000-0000-4000-8000-0000000000c2";
const Z: &str = "00000000-0000-4000-8000-0000000000c3";

fn keelctl(ns: &Netns, args: &[&str]) -> String {
    let out = ns
        .command(bins::path("keelctl"))
        .args(["engine", "--endpoint", "http://127.0.0.1:10124"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keelctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn the_kernel_gets_enospc_from_a_full_thin_pool_and_keeps_its_data() {
    if !vm::allowed("the_kernel_gets_enospc_from_a_full_thin_pool_and_keeps_its_data") {
        return;
    }
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::create("keelson-e2e-pool", "kvtap0").unwrap();
    let logs = vm::tempdir().unwrap();
    // Metadata takes 8 MiB of this 20 MiB file: three 4 MiB clusters are left.
    let disk = logs.join("pool.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    let disk4k = logs.join("pool-4kn.img");
    std::fs::File::create(&disk4k)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let lo = Loop::attach_with_blocks(&disk4k, 4096);
    let mut cmd = ns.command(bins::path("io-engine"));
    cmd.env("RUST_LOG", "info")
        .args(["--node-name", "p1", "--listen", "10.200.0.1:4420"])
        .args(["--grpc", "127.0.0.1:10124"])
        .arg("--pool")
        .arg(format!("pool0={}", disk.display()))
        .arg("--pool")
        .arg(format!("pool4k={}", lo.0.display()));
    let mut engine = Process::spawn("io-engine", cmd, &logs).unwrap();
    engine
        .wait_for_log("io-engine running", Duration::from_secs(20))
        .unwrap();
    let pool = keelctl(&ns, &["pool", "list"]);
    assert!(pool.contains("capacity=12582912"), "{pool}");
    for r in [X, Y] {
        keelctl(&ns, &["replica", "create", "pool0", r, "12MiB", "--share"]);
    }
    keelctl(&ns, &["replica", "create", "pool4k", Z, "16MiB", "--share"]);

    let job = bins::workspace().join("e2e/vm/jobs/kernel-pool");
    let params = [
        ("TARGET", "10.200.0.1".to_string()),
        ("PORT", "4420".into()),
        ("NQN_X", format!("nqn.2026-11.io.keelson:replica-{X}")),
        ("NQN_Y", format!("nqn.2026-11.io.keelson:replica-{Y}")),
        ("NQN_Z", format!("nqn.2026-11.io.keelson:replica-{Z}")),
    ];
    let out = vm::run_job(&ns, &job, &params, Duration::from_secs(200), |r| {
        anyhow::bail!("unexpected request {r}")
    })
    .unwrap();
    println!("{}", out.output);
    let pool = keelctl(&ns, &["pool", "list"]);
    assert!(
        out.success && out.output.contains("ALL-OK"),
        "guest job failed:\n{}\npool: {pool}\nio-engine:\n{}",
        out.output,
        engine.log()
    );
    let pool0 = pool
        .lines()
        .find(|l| l.starts_with("pool pool0 "))
        .unwrap_or_default();
    // X's two clusters: Y's went back when the guest discarded it.
    assert!(pool0.contains("allocated=8388608"), "{pool}");
    assert!(
        !pool0.contains("no_space_errors=0"),
        "the failure is counted: {pool}"
    );
    assert!(
        engine.log().contains("pool is full"),
        "the failure is logged:\n{}",
        engine.log()
    );
    assert!(
        !engine.log().contains("disk i/o error"),
        "no disk errors (512-byte I/O on the 4Kn disk):\n{}",
        engine.log()
    );
    engine.terminate(Duration::from_secs(10)).unwrap();
    drop(lo);
}
