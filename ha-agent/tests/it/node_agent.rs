//! The node-agent binary against a sysfs tree laid out as the kernel lays it out (the host kernel here has no
//! NVMe/TCP; `e2e/tests/kernel_switchover.rs` runs it in the VM against the real one): a broken path it cannot
//! report yet (no cluster agent) is retried with backoff while the metrics keep being served and say so; once a
//! cluster agent answers, a report about a volume it does not know is refused and counted, not retried in a loop;
//! the dead path of a volume now published to another node is removed.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::metrics::{promtool_check, scrape};

use crate::registry::{Proc, agent, free_port};

/// A Keelson subsystem with one controller (`nvme0`) in `state`, under `sys`.
fn subsystem(sys: &Path, nqn: &str, state: &str) {
    let d = sys.join("class/nvme-subsystem/nvme-subsys0");
    let c = d.join("nvme0");
    // Where the controller's delete_controller is written.
    std::fs::create_dir_all(sys.join("class/nvme/nvme0")).unwrap();
    std::fs::create_dir_all(c.join("nvme0c0n1")).unwrap();
    std::fs::write(d.join("subsysnqn"), format!("{nqn}\n")).unwrap();
    for (f, v) in [
        ("state", state),
        (
            "address",
            "traddr=127.0.0.9,trsvcid=4420,src_addr=127.0.0.1",
        ),
        ("transport", "tcp"),
        ("cntlid", "7"),
        ("hostnqn", "nqn.2026-11.io.keelson:host-node-agent-test"),
        ("hostid", "0f1e2d3c-0000-4000-8000-000000000001"),
    ] {
        std::fs::write(c.join(f), format!("{v}\n")).unwrap();
    }
    std::fs::write(c.join("nvme0c0n1/ana_state"), "optimized\n").unwrap();
}

/// The node-agent binary as node `app-1`, on the sysfs tree `dir/sys`, reporting to a cluster agent on `port`,
/// serving its metrics on `maddr`, polling every 50 ms.
fn node_agent_app_1(dir: &Path, port: u16, maddr: &str) -> Proc {
    Proc::start(
        [
            env!("CARGO_BIN_EXE_node-agent"),
            "--cluster-agent",
            &format!("http://127.0.0.1:{port}"),
            "--node-name",
            "app-1",
            "--metrics",
            maddr,
            "--poll-ms",
            "50",
            "--sys",
            &dir.join("sys").display().to_string(),
            "--fabrics",
            &dir.join("nvme-fabrics").display().to_string(),
        ]
        .map(String::from)
        .to_vec(),
        dir.join("node-agent.log"),
    )
}

/// The value of the first sample whose line starts with `prefix` (`0` if none).
fn value(body: &str, prefix: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

async fn until(maddr: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    loop {
        let a = maddr.to_string();
        // Not listening yet while the node agent starts.
        let up = std::net::TcpStream::connect(&a).is_ok();
        let body = match up {
            true => {
                let r = tokio::task::spawn_blocking(move || scrape(&a, "/metrics"))
                    .await
                    .unwrap();
                r.split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_string())
                    .unwrap_or_default()
            }
            false => String::new(),
        };
        // A body at all: a node agent that stopped serving is no answer (its metrics would all read 0).
        if !body.is_empty() && ok(&body) {
            return body;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{what}:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_path_is_reported_with_backoff_until_a_cluster_agent_answers() {
    let dir = tempfile::tempdir().unwrap();
    let sys = dir.path().join("sys");
    let vol = uuid::Uuid::new_v4().to_string();
    subsystem(&sys, &proto::names::volume_nqn(&vol), "connecting");
    let port = free_port("127.0.0.1");
    let maddr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let node_agent = node_agent_app_1(dir.path(), port, &maddr);

    // No cluster agent yet: the report is retried, spaced out, and the metrics show the path and the attempts.
    let path = format!(
        "keelson_node_path_state{{address=\"127.0.0.9:4420\",controller=\"nvme0\",state=\"connecting\",volume=\"{vol}\"}} 1"
    );
    let t = Instant::now();
    until(&maddr, "reports retried while no agent answers", |b| {
        b.contains(&path) && value(b, "keelson_node_reports_total{result=\"unreachable\"}") >= 3.0
    })
    .await;
    // Polled every 50 ms, but reported 100, 200, 400, 800 ms ... apart: a handful of attempts in 3 s, not 60.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(t.elapsed())).await;
    let body = until(&maddr, "metrics", |_| true).await;
    let tries = value(&body, "keelson_node_reports_total{result=\"unreachable\"}");
    assert_eq!(
        value(&body, "keelson_node_registered"),
        0.0,
        "no agent to register with"
    );
    assert!(
        (3.0..=8.0).contains(&tries),
        "{tries} attempts in {:?}: no backoff",
        t.elapsed()
    );
    if e2e::privileged::allowed_with("promtool check of the node agent's /metrics", &["promtool"]) {
        promtool_check(&body);
    }

    // A cluster agent that does not know the volume: refused, counted, and the node agent carries on.
    let _agent = agent(dir.path(), port);
    let body = until(&maddr, "the refusal counted", |b| {
        value(b, "keelson_node_reports_total{result=\"NotFound\"}") >= 1.0
            && value(b, "keelson_node_switchovers_total{result=\"refused\"}") >= 1.0
    })
    .await;
    assert_eq!(
        value(&body, "keelson_node_switchovers_total{result=\"ok\"}"),
        0.0
    );
    // Not asked again soon: a volume the cluster agent does not know stays unknown. Before, it was reported (and
    // the node registered again) every second for ever.
    let refused = value(&body, "keelson_node_reports_total{result=\"NotFound\"}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let body = until(&maddr, "metrics", |_| true).await;
    assert!(
        value(&body, "keelson_node_reports_total{result=\"NotFound\"}") <= refused + 1.0,
        "asked again and again: {body}"
    );
    // It registered its node, with the CSI node plugin's host NQN and the one its kernel's controller uses.
    until(&maddr, "registered", |b| {
        value(b, "keelson_node_registered") == 1.0
    })
    .await;
    let mut c =
        proto::cluster::cluster_client::ClusterClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
    let hosts = c
        .list_hosts(proto::cluster::ListHostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert_eq!(hosts[0].node, "app-1");
    assert!(hosts[0].alive, "{hosts:?}");
    // (and /etc/nvme/hostnqn's, where this machine has one).
    for h in [
        "nqn.2026-11.io.keelson:host-app-1",
        "nqn.2026-11.io.keelson:host-node-agent-test",
    ] {
        assert!(hosts[0].host_nqns.iter().any(|x| x == h), "{hosts:?}");
    }
    assert!(
        node_agent.log().contains("refused the report"),
        "{}",
        node_agent.log()
    );
    assert!(
        !deleted(&sys),
        "the path of a volume the cluster agent does not know is left alone"
    );
}

/// Whether the node agent removed the controller: wrote `1` to its `delete_controller`, which is not there before.
/// The fake file is a plain one that an agent still reporting the path writes again every poll (`std::fs::write`
/// empties it, then writes): a read that finds it empty caught such a rewrite, and is taken again.
fn deleted(sys: &Path) -> bool {
    let file = sys.join("class/nvme/nvme0/delete_controller");
    for _ in 0..100 {
        match std::fs::read(&file) {
            Ok(b) if b.is_empty() => std::thread::sleep(std::time::Duration::from_millis(10)),
            Ok(b) => return b == b"1",
            Err(_) => return false,
        }
    }
    false
}

/// A volume force-detached from this node and published to another: the node's controller, reconnecting for ever to
/// the old nexus, is removed once the cluster agent says the volume is not published here. While it was published
/// here, the same broken path was reported and kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_path_of_a_volume_published_elsewhere_is_removed() {
    use proto::cluster as pb;
    let (dir, port, _agent, _engines, _nodes, mut c) = crate::registry::three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 16 << 20,
        replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let here = "nqn.2026-11.io.keelson:host-node-agent-test";
    c.publish_volume(pb::PublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: here.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let sys = dir.path().join("sys");
    subsystem(&sys, &proto::names::volume_nqn(&vol), "connecting");
    let maddr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let node_agent = node_agent_app_1(dir.path(), port, &maddr);
    // Published here: a path to an address that is not the nexus's is answered with the nexus (which the fake
    // fabrics device cannot connect to), never removed.
    until(&maddr, "the report answered", |b| {
        value(b, "keelson_node_reports_total{result=\"ok\"}") >= 2.0
    })
    .await;
    assert!(!deleted(&sys), "{}", node_agent.log());
    // Force-detached from this host and published to another node's.
    c.unpublish_volume(pb::UnpublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: here.into(),
    })
    .await
    .unwrap();
    let other = "nqn.2026-11.io.keelson:host-app-2";
    c.register_host(pb::RegisterHostRequest {
        node: "app-2".into(),
        host_nqns: vec![other.into()],
        version: "test".into(),
    })
    .await
    .unwrap();
    c.publish_volume(pb::PublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: other.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    until(&maddr, "the dead path removed", |b| {
        value(b, "keelson_node_switchovers_total{result=\"unpublished\"}") >= 1.0
    })
    .await;
    assert!(deleted(&sys), "{}", node_agent.log());
    // Still published to the other node, untouched.
    let v = c
        .get_volume(pb::GetVolumeRequest { uuid: vol })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.host_nqns, vec![other.to_string()], "{v:?}");
}
