//! The io-engine binary: serves an exported namespace and stops cleanly on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nvmf_target::block::BlockDevice;
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;

use crate::harness::free_port;

#[tokio::test]
async fn io_engine_serves_an_export_and_exits_cleanly_on_sigterm() {
    let (port, grpc) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let nqn = "nqn.2026-11.io.keelson:vol-00000000-0000-4000-8000-0000000000cc";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ns.img");
    let mut child = Command::new(env!("CARGO_BIN_EXE_io-engine"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--grpc",
            &format!("127.0.0.1:{grpc}"),
        ])
        .arg("--export")
        .arg(format!(
            "nqn={nqn},file={},size=16MiB,direct=true",
            file.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let start = Instant::now();
    let ns = loop {
        match RemoteNamespace::connect(ConnectOptions::new(addr, nqn), 1).await {
            Ok(ns) => break ns,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("io-engine never served: {e}"),
        }
    };
    assert_eq!(ns.size_bytes(), 16 << 20);
    ns.write(4096, Bytes::from(vec![0x5A; 8192])).await.unwrap();
    ns.flush().await.unwrap();
    assert_eq!(&ns.read(4096, 8192).await.unwrap()[..], &[0x5A; 8192][..]);
    // The data is in the file.
    let on_disk = std::fs::read(&file).unwrap();
    assert_eq!(&on_disk[4096..4096 + 8192], &[0x5A; 8192][..]);

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "io-engine ignored SIGTERM with a host connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("INFO"), "io-engine logs to stderr: {log:?}");
    assert!(
        !log.contains('\x1b'),
        "colour codes in a log that is not a terminal: {log:?}"
    );
}

#[test]
fn io_engine_rejects_a_bad_export_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_io-engine"))
        .args(["--export", "nqn=nqn.x,memory=lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad size"), "{err}");
}
