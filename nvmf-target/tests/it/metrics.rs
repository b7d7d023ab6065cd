//! io-engine's `/metrics`: after real I/O through a published nexus over a pool replica, the scrape shows pool,
//! replica, I/O, nexus and child metrics, and `promtool check metrics` accepts it (promtool is installed by
//! scripts/install-deps.sh).

use std::process::{Child, Command, Stdio};

use nvmf_target::block::BlockDevice;
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use proto::engine as pb;

use crate::harness::free_port;
use crate::pools::{disk, pattern, publish};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_shows_io_pools_and_nexuses_and_passes_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.0.1";
    let (port, grpc, mport) = (free_port(ip), free_port(ip), free_port(ip));
    let img = disk(dir.path(), "p.img", 64 << 20);
    let _p = Proc(
        Command::new(env!("CARGO_BIN_EXE_io-engine"))
            .args(["--node-name", "metrics-test"])
            .args(["--listen", &format!("{ip}:{port}")])
            .args(["--grpc", &format!("{ip}:{grpc}")])
            .args(["--metrics", &format!("{ip}:{mport}")])
            .arg("--pool")
            .arg(format!("pool0={}", img.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let api = crate::harness::engine_api(&format!("{ip}:{grpc}")).await;
    let mut api = api.expect("io-engine up");
    let replica = uuid::Uuid::new_v4().to_string();
    api.create_replica(pb::CreateReplicaRequest {
        pool: "pool0".into(),
        uuid: replica.clone(),
        size: 16 << 20,
        share: true,
        allowed_hosts: vec![],
    })
    .await
    .unwrap();
    let vol = uuid::Uuid::new_v4().to_string();
    api.create_nexus(pb::CreateNexusRequest {
        uuid: vol.clone(),
        children: vec![format!("local:///nqn.2026-11.io.keelson:replica-{replica}")],
        ..Default::default()
    })
    .await
    .unwrap();
    publish(&mut api, &vol).await.unwrap();
    let addr = format!("{ip}:{port}").parse().unwrap();
    let ns = RemoteNamespace::connect(
        ConnectOptions::new(addr, &format!("nqn.2026-11.io.keelson:vol-{vol}")),
        1,
    )
    .await
    .unwrap();
    for i in 0..10u64 {
        ns.write(i * 8192, pattern(i, 8192)).await.unwrap();
        ns.read(i * 8192, 8192).await.unwrap();
    }
    ns.close().await;

    let maddr = format!("{ip}:{mport}");
    let resp = tokio::task::spawn_blocking(move || e2e::metrics::scrape(&maddr, "/metrics"))
        .await
        .unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let vol_nqn = format!("nqn=\"nqn.2026-11.io.keelson:vol-{vol}\"");
    let line = |prefix: &str, contains: &str| {
        body.lines()
            .find(|l| l.starts_with(prefix) && l.contains(contains))
            .unwrap_or_else(|| panic!("no {prefix} with {contains} in:\n{body}"))
            .to_string()
    };
    line("keelson_io_errors_total", &vol_nqn);
    let vol_line = |name: &str, op: &str| {
        let l = body
            .lines()
            .find(|l| {
                l.starts_with(name) && l.contains(&vol_nqn) && l.contains(&format!("op=\"{op}\""))
            })
            .unwrap_or_else(|| panic!("no {name} {op} for the volume in:\n{body}"));
        l.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
    };
    assert_eq!(vol_line("keelson_io_operations_total", "write"), 10.0);
    assert_eq!(vol_line("keelson_io_bytes_total", "read"), 81920.0);
    assert_eq!(vol_line("keelson_io_latency_seconds_count", "read"), 10.0);
    line("keelson_io_latency_seconds_bucket", "le=\"0.001\"");
    line("keelson_pool_capacity_bytes", "pool=\"pool0\"");
    let alloc = line("keelson_replica_allocated_bytes", &replica);
    assert!(alloc.ends_with(" 4194304"), "{alloc}");
    let state = line("keelson_nexus_state", "state=\"online\"");
    assert!(state.ends_with(" 1"), "{state}");
    line("keelson_nexus_child_state", "state=\"healthy\"");
    line("keelson_nexus_rebuilds_total", "kind=\"full\"");
    let waiting = line("keelson_nexus_fault_consent_waiting", "nexus=");
    assert!(waiting.ends_with(" 0"), "{waiting}");
    line("keelson_nexus_fault_consents_total", "result=\"refused\"");

    // Needs promtool (Debian package prometheus; scripts/install-deps.sh installs it).
    if e2e::privileged::allowed_with("promtool check of /metrics", &["promtool"]) {
        e2e::metrics::promtool_check(body);
    }

    let maddr = format!("{ip}:{mport}");
    let other = tokio::task::spawn_blocking(move || e2e::metrics::scrape(&maddr, "/"))
        .await
        .unwrap();
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}
