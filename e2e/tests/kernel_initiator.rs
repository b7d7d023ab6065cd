//! The Linux kernel's NVMe/TCP initiator (nvme-cli in a QEMU VM) against io-engine. Needs root (network namespace,
//! tap) and QEMU; the VM image is built on first use.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Result;
use e2e::bins;
use e2e::netns::Netns;
use e2e::process::Process;
use e2e::vm::{self, VM_LOCK};

const NQN: &str = "nqn.2026-11.io.keelson:vol-00000000-0000-4000-8000-00000000e2e0";
const GRPC: &str = "127.0.0.1:10124";

struct Setup {
    engine: Process,
    ns: Netns,
    _logs: std::path::PathBuf,
}

/// io-engine in a fresh namespace: ports 1 = :4420, 2 = :4421, 3 = :8009 (discovery), one 128 MiB memory namespace.
fn start(ns_name: &str) -> Result<Setup> {
    let ns = Netns::create(ns_name, "kvtap0")?;
    let logs = vm::tempdir()?;
    let mut cmd = ns.command(bins::path("io-engine"));
    cmd.env("RUST_LOG", "info")
        .arg("--node-name")
        .arg("e2e-node")
        .arg("--listen")
        .arg("10.200.0.1:4420,10.200.0.1:4421,10.200.0.1:8009")
        .arg("--grpc")
        .arg(GRPC)
        .arg("--export")
        .arg(format!("nqn={NQN},memory=128MiB"));
    let mut engine = Process::spawn("io-engine", cmd, &logs)?;
    engine.wait_for_log("io-engine running", Duration::from_secs(20))?;
    Ok(Setup {
        engine,
        ns,
        _logs: logs,
    })
}

/// The guest job must have finished with ALL-OK; shows its output and the engine's log otherwise.
fn assert_job_ok(out: &vm::JobOutcome, engine: &Process) {
    println!("{}", out.output);
    assert!(
        out.success && out.output.contains("ALL-OK"),
        "guest job failed:\n{}\nio-engine:\n{}",
        out.output,
        engine.log()
    );
}

fn keelctl(ns: &Netns, args: &[&str]) -> Result<()> {
    let st = ns
        .command(bins::path("keelctl"))
        .args(["engine", "--endpoint", &format!("http://{GRPC}")])
        .args(args)
        .status()?;
    anyhow::ensure!(st.success(), "keelctl {args:?} failed");
    Ok(())
}

fn basic(ns_name: &str, digests: bool) {
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = start(ns_name).unwrap();
    let job = bins::workspace().join("e2e/vm/jobs/kernel-basic");
    let params = [
        ("TARGET", "10.200.0.1".to_string()),
        ("PORT", "4420".into()),
        ("DISC_PORT", "8009".into()),
        ("NQN", NQN.into()),
        ("DIGESTS", if digests { "1" } else { "0" }.into()),
    ];
    let out = vm::run_job(&s.ns, &job, &params, Duration::from_secs(300), |r| {
        anyhow::bail!("unexpected {r}")
    })
    .unwrap();
    assert_job_ok(&out, &s.engine);
    let st = s.engine.terminate(Duration::from_secs(10)).unwrap();
    assert!(
        st.success(),
        "io-engine did not exit cleanly on SIGTERM: {st}\n{}",
        s.engine.log()
    );
}

#[test]
fn kernel_discovers_connects_formats_and_verifies_fio_without_digests() {
    if !vm::allowed("kernel_discovers_connects_formats_and_verifies_fio_without_digests") {
        return;
    }
    basic("keelson-e2e-plain", false);
}

#[test]
fn kernel_verifies_fio_with_header_and_data_digests() {
    if !vm::allowed("kernel_verifies_fio_with_header_and_data_digests") {
        return;
    }
    basic("keelson-e2e-dgst", true);
}

#[test]
fn kernel_multipath_moves_io_to_the_other_port_when_ana_turns_inaccessible() {
    if !vm::allowed("kernel_multipath_moves_io_to_the_other_port_when_ana_turns_inaccessible") {
        return;
    }
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let s = start("keelson-e2e-mpath").unwrap();
    let job = bins::workspace().join("e2e/vm/jobs/kernel-multipath");
    let params = [
        ("TARGET", "10.200.0.1".to_string()),
        ("PORT", "4420".into()),
        ("PORT2", "4421".into()),
        ("NQN", NQN.into()),
    ];
    let ns = &s.ns;
    let out = vm::run_job(
        ns,
        &job,
        &params,
        Duration::from_secs(300),
        |req| match req {
            "ana-inaccessible" => keelctl(
                ns,
                &["set-ana", "--port", "1", "--group", "1", "inaccessible"],
            ),
            "ana-optimized" => {
                keelctl(ns, &["set-ana", "--port", "1", "--group", "1", "optimized"])
            }
            other => anyhow::bail!("unknown request {other}"),
        },
    )
    .unwrap();
    assert_job_ok(&out, &s.engine);
}
