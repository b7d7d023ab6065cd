//! Identity: the plugin's name and version, its capabilities, and Probe: ready while the plugin answers, the cluster
//! agent away or not (its calls answer UNAVAILABLE meanwhile).

use std::time::Duration;

use proto::csi::plugin_capability::Type as CapabilityType;
use proto::csi::plugin_capability::service::Type as ServiceType;
use proto::csi::*;

use crate::harness::{Cluster, connect, driver, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_names_the_plugin_and_probe_does_not_follow_the_cluster_agent() {
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
    assert!(
        caps.iter().any(|c| matches!(
            &c.r#type,
            Some(CapabilityType::VolumeExpansion(e))
                if e.r#type == proto::csi::plugin_capability::volume_expansion::Type::Online as i32
        )),
        "online expansion advertised: {caps:?}"
    );

    let ready = id.probe(ProbeRequest {}).await.unwrap().into_inner().ready;
    assert_eq!(ready, Some(true));

    // The agent gone: still ready (its liveness probe must not restart it, and its sidecars with it), and a call
    // that needs the agent answers UNAVAILABLE, which the sidecars retry.
    c.agent.terminate(Duration::from_secs(10)).unwrap();
    let ready = id.probe(ProbeRequest {}).await.unwrap().into_inner().ready;
    assert_eq!(ready, Some(true));

    // A driver whose agent address answers nothing starts, serves, is ready, and answers UNAVAILABLE.
    let sock = c.dir.path().join("other.sock");
    let url = format!("http://127.0.0.1:{}", free_port("127.0.0.1"));
    let _d = driver(c.dir.path(), "driver2", &sock, &url);
    let ch = connect(&sock).await;
    let mut id2 = proto::csi::identity_client::IdentityClient::new(ch.clone());
    let ready = id2.probe(ProbeRequest {}).await.unwrap().into_inner().ready;
    assert_eq!(ready, Some(true));
    let listed = proto::csi::controller_client::ControllerClient::new(ch)
        .list_volumes(ListVolumesRequest::default())
        .await;
    assert_eq!(listed.unwrap_err().code(), tonic::Code::Unavailable);
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

/// csi-driver in `mode` on a socket in `dir`, its agent address answering nothing.
fn driver_in(dir: &std::path::Path, mode: &str) -> (e2e::process::Process, std::path::PathBuf) {
    let sock = dir.join(format!("{mode}.sock"));
    let mut cmd = std::process::Command::new(e2e::bins::path("csi-driver"));
    cmd.args(["--mode", mode, "--node-name", "worker-7", "--endpoint"])
        .arg(format!("unix://{}", sock.display()))
        .args([
            "--cluster-agent",
            &format!("http://127.0.0.1:{}", free_port("127.0.0.1")),
        ]);
    (e2e::process::Process::spawn(mode, cmd, dir).unwrap(), sock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_plugin_is_ready_without_the_agent_and_each_mode_serves_its_services() {
    use proto::csi::controller_client::ControllerClient;
    use proto::csi::node_client::NodeClient;
    let dir = tempfile::tempdir().unwrap();

    // Node mode: ready with no agent (its liveness probe must not restart it while the agent is away); the Node
    // service answers from this node; no Controller service.
    let (_n, sock) = driver_in(dir.path(), "node");
    let ch = connect(&sock).await;
    let mut id = proto::csi::identity_client::IdentityClient::new(ch.clone());
    assert_eq!(
        id.probe(ProbeRequest {}).await.unwrap().into_inner().ready,
        Some(true)
    );
    let info = NodeClient::new(ch.clone())
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "worker-7");
    assert_eq!(
        info.accessible_topology.unwrap().segments["topology.keelson.io/node"],
        "worker-7"
    );
    let caps = ControllerClient::new(ch)
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await;
    assert_eq!(caps.unwrap_err().code(), tonic::Code::Unimplemented);

    // All: both services; ready, the agent absent.
    let (_a, sock) = driver_in(dir.path(), "all");
    let ch = connect(&sock).await;
    assert!(
        ControllerClient::new(ch.clone())
            .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
            .await
            .is_ok()
    );
    assert!(
        NodeClient::new(ch.clone())
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .is_ok()
    );
    let mut id = proto::csi::identity_client::IdentityClient::new(ch);
    assert_eq!(
        id.probe(ProbeRequest {}).await.unwrap().into_inner().ready,
        Some(true)
    );
}
