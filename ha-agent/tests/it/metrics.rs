//! The cluster agent's `/metrics` with real engines: leadership, nodes, volumes and replicas by state, operations
//! by result, reconcile and store timings; `promtool check metrics` accepts it.

use std::time::{Duration, Instant};

use e2e::metrics::{promtool_check, sample, scrape};
use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;
use tonic::Code;

use crate::registry::{Online, agent_with, engine_with, free_port, wait_for};

const HOST: &str = "nqn.2026-11.io.keelson:test-metrics-host";

async fn body(addr: &str) -> String {
    let a = addr.to_string();
    let resp = tokio::task::spawn_blocking(move || scrape(&a, "/metrics"))
        .await
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// Scrapes until every (series, value) in `want` holds; the last body.
async fn until(addr: &str, want: &[(&str, f64)]) -> String {
    let t = Instant::now();
    loop {
        let b = body(addr).await;
        if want.iter().all(|(s, v)| sample(&b, s) == Some(*v)) {
            return b;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never {want:?}:\n{b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reports_volumes_replicas_operations_and_timings_and_passes_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mport) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let maddr = format!("127.0.0.1:{mport}");
    let data = dir.path().join("agent").display().to_string();
    let _agent = agent_with(
        dir.path(),
        port,
        &["--data-dir", &data, "--metrics", &maddr],
        "agent",
    );
    let url = format!("http://127.0.0.1:{port}");
    let _engines: Vec<_> = (1..=3).map(|i| engine_with(dir.path(), i, &url)).collect();
    wait_for(
        port,
        &[("reg-1", Online), ("reg-2", Online), ("reg-3", Online)],
        "registration",
    )
    .await;
    until(
        &maddr,
        &[
            ("keelson_agent_leader", 1.0),
            ("keelson_nodes{state=\"Online\"}", 3.0),
            ("keelson_volumes{state=\"Online\"}", 0.0),
        ],
    )
    .await;

    let mut c = ClusterClient::connect(url).await.unwrap();
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 4 << 20,
        replicas: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let bad = c
        .create_volume(pb::CreateVolumeRequest {
            uuid: uuid::Uuid::new_v4().to_string(),
            size_bytes: 4 << 20,
            replicas: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    until(
        &maddr,
        &[
            ("keelson_volumes{state=\"Online\"}", 1.0),
            ("keelson_replicas{state=\"unattached\"}", 2.0),
        ],
    )
    .await;
    c.publish_volume(pb::PublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: HOST.into(),
        node: String::new(),
        multi_host: false,
        require_known_node: false,
    })
    .await
    .unwrap();
    let b = until(
        &maddr,
        &[
            ("keelson_volumes{state=\"Online\"}", 1.0),
            ("keelson_volumes{state=\"Degraded\"}", 0.0),
            ("keelson_replicas{state=\"healthy\"}", 2.0),
            ("keelson_replicas{state=\"unattached\"}", 0.0),
            ("keelson_rebuilds_running", 0.0),
            (
                "keelson_agent_operations_total{operation=\"create_volume\",result=\"ok\"}",
                1.0,
            ),
            (
                "keelson_agent_operations_total{operation=\"create_volume\",result=\"InvalidArgument\"}",
                1.0,
            ),
            (
                "keelson_agent_operations_total{operation=\"publish_volume\",result=\"ok\"}",
                1.0,
            ),
        ],
    )
    .await;
    for series in [
        "keelson_agent_store_request_duration_seconds_count{request=\"txn\"}",
        "keelson_agent_store_request_duration_seconds_count{request=\"get\"}",
        "keelson_agent_reconcile_duration_seconds_count{reconciler=\"healing\"}",
        "keelson_agent_reconcile_duration_seconds_count{reconciler=\"node_sweep\"}",
    ] {
        assert!(
            sample(&b, series).is_some_and(|n| n > 0.0),
            "{series}:\n{b}"
        );
    }

    // Scale to 3: the new replica is rebuilt, then healthy.
    c.set_volume_replicas(pb::SetVolumeReplicasRequest {
        uuid: vol.clone(),
        replicas: 3,
    })
    .await
    .unwrap();
    let b = until(
        &maddr,
        &[
            ("keelson_replicas{state=\"healthy\"}", 3.0),
            ("keelson_volumes{state=\"Online\"}", 1.0),
        ],
    )
    .await;
    if e2e::privileged::allowed_with("promtool check of the agent's /metrics", &["promtool"]) {
        promtool_check(&b);
    }
    let other = tokio::task::spawn_blocking(move || scrape(&maddr, "/"))
        .await
        .unwrap();
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}
