//! Identity: the plugin's name and version, its capabilities, and Probe following the cluster agent.

use std::time::Duration;

use proto::csi::plugin_capability::Type as CapabilityType;
use proto::csi::plugin_capability::service::Type as ServiceType;
use proto::csi::*;

use crate::harness::{Cluster, connect, driver, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_names_the_plugin_and_probe_follows_the_cluster_agent() {
    let mut c = Cluster::start(1).await;
    let mut id = c.identity().await;
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.keelson.io");
    assert!(!info.vendor_version.is_empty());

    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let services: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(CapabilityType::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&(ServiceType::ControllerService as i32)));
    assert!(services.contains(&(ServiceType::VolumeAccessibilityConstraints as i32)));

    let ready = id.probe(ProbeRequest {}).await.unwrap().into_inner().ready;
    assert_eq!(ready, Some(true));

    // The agent gone: not ready (and Probe itself still answers).
    c.agent.terminate(Duration::from_secs(10)).unwrap();
    let ready = id.probe(ProbeRequest {}).await.unwrap().into_inner().ready;
    assert_eq!(ready, Some(false));

    // A driver whose agent address answers nothing starts, serves, and is not ready.
    let sock = c.dir.path().join("other.sock");
    let url = format!("http://127.0.0.1:{}", free_port("127.0.0.1"));
    let _d = driver(c.dir.path(), "driver2", &sock, &url);
    let mut id2 = proto::csi::identity_client::IdentityClient::new(connect(&sock).await);
    let ready = id2.probe(ProbeRequest {}).await.unwrap().into_inner().ready;
    assert_eq!(ready, Some(false));
    assert_eq!(
        id2.get_plugin_info(GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .name,
        "csi.keelson.io"
    );
}

#[test]
fn the_driver_refuses_a_bad_endpoint_and_a_missing_agent_address() {
    let bin = e2e::bins::path("csi-driver");
    let out = std::process::Command::new(&bin)
        .args([
            "--endpoint",
            "tcp://x",
            "--cluster-agent",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unix:///"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(&bin)
        .args(["--endpoint", "unix:///tmp/x.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
