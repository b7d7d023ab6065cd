//! Volume snapshots through the cluster API with real engines: taken through the nexus while the volume is
//! published (crash-consistent across replicas) and on the replicas when it is not; a volume made from one holds
//! the data of that moment on clones in the snapshot's pools; idempotency, bad requests, deletes without leftovers.

use std::time::Duration;

use bytes::Bytes;
use nvmf_target::block::BlockDevice;
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;
use proto::engine as epb;
use proto::engine::engine_client::EngineClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::registry::three_nodes;

const MIB: u64 = 1 << 20;
const HOST: &str = "nqn.2026-11.io.keelson:test-snapshot-host";

fn data(seed: u8) -> Bytes {
    Bytes::from(vec![seed; 64 << 10])
}

async fn publish(c: &mut ClusterClient<Channel>, vol: &str) -> RemoteNamespace {
    let p = c
        .publish_volume(pb::PublishVolumeRequest {
            uuid: vol.into(),
            host_nqn: HOST.into(),
            node: String::new(),
            multi_host: false,
            require_known_node: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut o = ConnectOptions::new(p.target_addresses[0].parse().unwrap(), &p.nqn);
    o.hostnqn = HOST.into();
    RemoteNamespace::connect(o, 1).await.unwrap()
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.map(drop).unwrap_err().code()
}

/// The snapshots the cluster agent lists.
async fn listed(c: &mut ClusterClient<Channel>) -> Vec<pb::VolumeSnapshot> {
    c.list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots
}

/// Every snapshot copy the engines hold, by uuid.
async fn copies_everywhere(nodes: &[pb::Node]) -> Vec<String> {
    let mut all = Vec::new();
    for n in nodes {
        let mut e = EngineClient::connect(n.engine_endpoint.clone())
            .await
            .unwrap();
        all.extend(
            e.list_snapshots(epb::ListSnapshotsRequest {})
                .await
                .unwrap()
                .into_inner()
                .snapshots
                .into_iter()
                .map(|s| s.uuid),
        );
    }
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_a_live_volume_make_volumes_with_the_data_of_their_moment() {
    let (_dir, _port, _agent, _engines, nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 8 * MIB,
        replicas: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let ns = publish(&mut c, &vol).await;
    ns.write(0, data(1)).await.unwrap();

    // Taken through the nexus while published; the same request again is the same snapshot.
    let s1 = uuid::Uuid::new_v4().to_string();
    let req = |volume: &str, uuid: &str| pb::CreateSnapshotRequest {
        volume: volume.into(),
        uuid: uuid.into(),
    };
    let s = c
        .create_snapshot(req(&vol, &s1))
        .await
        .unwrap()
        .into_inner();
    assert!(s.ready);
    assert_eq!((s.nodes.len(), s.size_bytes), (2, 8 * MIB));
    assert_eq!(
        c.create_snapshot(req(&vol, &s1))
            .await
            .unwrap()
            .into_inner(),
        s
    );
    ns.write(0, data(2)).await.unwrap();

    // Bad requests.
    let other = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: other.clone(),
        size_bytes: 4 * MIB,
        replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        code(c.create_snapshot(req(&other, &s1)).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            c.create_snapshot(req(&uuid::Uuid::new_v4().to_string(), "x"))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_snapshot(req(
                &uuid::Uuid::new_v4().to_string(),
                &uuid::Uuid::new_v4().to_string()
            ))
            .await
        ),
        Code::NotFound
    );
    let from = |uuid: &str, size: u64, replicas: u32, snap: &str| pb::CreateVolumeRequest {
        uuid: uuid.into(),
        size_bytes: size,
        replicas,
        source_snapshot: snap.into(),
        ..Default::default()
    };
    let clone = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        code(c.create_volume(from(&clone, 8 * MIB, 4, &s1)).await),
        Code::ResourceExhausted,
        "four replicas on three nodes"
    );
    assert_eq!(
        code(c.create_volume(from(&clone, 16 * MIB, 2, &s1)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_volume(from(&clone, 8 * MIB, 2, &uuid::Uuid::new_v4().to_string()))
                .await
        ),
        Code::NotFound
    );

    // A volume made from it holds the data of its moment, on clones in the snapshot's pools.
    let v = c
        .create_volume(from(&clone, 8 * MIB, 2, &s1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.source_snapshot, s1);
    let mut on: Vec<_> = v.replica_list.iter().map(|r| r.node.clone()).collect();
    on.sort();
    let mut snap_nodes = s.nodes.clone();
    snap_nodes.sort();
    assert_eq!(on, snap_nodes);
    let cns = publish(&mut c, &clone).await;
    // Reads go round the children: each clone holds the snapshot's data.
    for _ in 0..2 {
        assert_eq!(cns.read(0, 64 << 10).await.unwrap(), data(1));
    }
    cns.write(64 << 10, data(9)).await.unwrap();
    assert_eq!(ns.read(0, 64 << 10).await.unwrap(), data(2));
    assert_eq!(
        ns.read(64 << 10, 64 << 10).await.unwrap(),
        Bytes::from(vec![0; 64 << 10])
    );
    cns.close().await;

    // Three replicas of a snapshot with two copies: clones on the copies' nodes, and a replica made empty on the
    // third node, out of sync (the volume Degraded) until it is published and rebuilds it from the clones. Before,
    // refused for good (RESOURCE_EXHAUSTED): a snapshot of a Degraded volume, or one whose copy's node is down, could
    // not be restored at the class's replica count.
    let three = uuid::Uuid::new_v4().to_string();
    let v = c
        .create_volume(from(&three, 8 * MIB, 3, &s1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.replica_list.len(), 3);
    assert_eq!(v.state, "Degraded", "{v:?}");
    assert!(v.reason.contains("made empty"), "{v:?}");
    let tns = publish(&mut c, &three).await;
    assert_eq!(tns.read(0, 64 << 10).await.unwrap(), data(1));
    let t = std::time::Instant::now();
    loop {
        let v = c
            .get_volume(pb::GetVolumeRequest {
                uuid: three.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if v.state == "Online" {
            assert!(v.reason.is_empty(), "{v:?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never Online: {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reads go round the children: each of the three holds the snapshot's data.
    for _ in 0..6 {
        assert_eq!(tns.read(0, 64 << 10).await.unwrap(), data(1));
    }
    tns.close().await;
    c.delete_volume(pb::DeleteVolumeRequest { uuid: three })
        .await
        .unwrap();
    ns.close().await;

    // A volume made from the volume itself holds what it holds now; its hidden snapshot goes with it.
    let copy = uuid::Uuid::new_v4().to_string();
    let v = c
        .create_volume(pb::CreateVolumeRequest {
            uuid: copy.clone(),
            size_bytes: 8 * MIB,
            replicas: 2,
            source_volume: vol.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.source_volume.as_str(), v.source_snapshot.as_str()),
        (vol.as_str(), "")
    );
    let vns = publish(&mut c, &copy).await;
    assert_eq!(vns.read(0, 64 << 10).await.unwrap(), data(2));
    vns.close().await;
    assert_eq!(
        listed(&mut c).await.len(),
        1,
        "the hidden snapshot is not listed"
    );
    assert_eq!(copies_everywhere(&nodes).await.len(), 4);
    c.delete_volume(pb::DeleteVolumeRequest { uuid: copy.clone() })
        .await
        .unwrap();
    assert_eq!(
        copies_everywhere(&nodes).await.len(),
        2,
        "the hidden snapshot went with its volume"
    );

    // Unpublished, the snapshot is taken on the replicas.
    c.unpublish_volume(pb::UnpublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: String::new(),
    })
    .await
    .unwrap();
    let s2 = uuid::Uuid::new_v4().to_string();
    let s = c
        .create_snapshot(req(&vol, &s2))
        .await
        .unwrap()
        .into_inner();
    assert!(s.ready && s.nodes.len() == 2);
    let listed: Vec<String> = c
        .list_snapshots(pb::ListSnapshotsRequest {
            volume: vol.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .into_iter()
        .map(|s| s.uuid)
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&s1) && listed.contains(&s2));

    // Deletes leave nothing behind: the clone volume, the snapshots (two copies each), then the volumes.
    for v in [&clone, &other] {
        c.delete_volume(pb::DeleteVolumeRequest { uuid: v.clone() })
            .await
            .unwrap();
    }
    assert_eq!(copies_everywhere(&nodes).await.len(), 4);
    for s in [&s1, &s2] {
        c.delete_snapshot(pb::DeleteSnapshotRequest { uuid: s.clone() })
            .await
            .unwrap();
    }
    assert_eq!(
        code(
            c.delete_snapshot(pb::DeleteSnapshotRequest { uuid: s1.clone() })
                .await
        ),
        Code::NotFound
    );
    assert!(copies_everywhere(&nodes).await.is_empty());
    c.delete_volume(pb::DeleteVolumeRequest { uuid: vol.clone() })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// The agent dies after the engines took a snapshot and before it recorded the copies; the volume's nodes are down
/// when it comes back (so the snapshot stays unfinished), and the volume is deleted. The unfinished snapshot is
/// deleted with every copy it left, on the nodes that were down too once they return: no pool space lost for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_left_unfinished_by_a_crash_leaves_no_copy_when_its_volume_is_deleted() {
    use ha_agent::cluster::failpoint as fp;

    use crate::registry::{Offline, Online, wait_for};

    let (_dir, port, mut agent, mut engines, nodes, c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    crate::crash::create(c.clone(), &vol, 2).await.unwrap();
    let v = loop {
        let v = c
            .clone()
            .get_volume(pb::GetVolumeRequest { uuid: vol.clone() })
            .await
            .unwrap()
            .into_inner();
        if v.replica_list.iter().all(|r| r.created) {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    agent.set_env("FAILPOINTS", &format!("{}=return", fp::SNAPSHOT_TAKEN));
    agent.restart();
    let snap = uuid::Uuid::new_v4().to_string();
    let r = crate::crash::until_served(|| {
        let mut c = c.clone();
        let (vol, snap) = (vol.clone(), snap.clone());
        async move {
            c.create_snapshot(pb::CreateSnapshotRequest {
                volume: vol,
                uuid: snap,
            })
            .await
        }
    })
    .await;
    assert!(r.is_err(), "{r:?}");
    assert!(agent.exited(Duration::from_secs(20)).await.is_some());
    assert_eq!(
        copies_everywhere(&nodes).await.len(),
        2,
        "both replicas took it"
    );
    // The replicas' nodes are down when the agent returns: the snapshot cannot be finished (with one of them up,
    // it would be, with the copy there).
    let down: Vec<String> = v.replica_list.iter().map(|r| r.node.clone()).collect();
    let index = |n: &str| n.strip_prefix("reg-").unwrap().parse::<usize>().unwrap() - 1;
    for n in &down {
        engines[index(n)].kill9();
    }
    agent.set_env("FAILPOINTS", "");
    agent.restart();
    let offline: Vec<(&str, _)> = down.iter().map(|n| (n.as_str(), Offline)).collect();
    wait_for(port, &offline, "replica nodes down").await;
    crate::crash::until_served(|| {
        let mut c = c.clone();
        let vol = vol.clone();
        async move { c.delete_volume(pb::DeleteVolumeRequest { uuid: vol }).await }
    })
    .await
    .unwrap();
    for n in &down {
        engines[index(n)].restart();
    }
    let online: Vec<(&str, _)> = down.iter().map(|n| (n.as_str(), Online)).collect();
    wait_for(port, &online, "replica nodes back").await;
    let t = std::time::Instant::now();
    loop {
        let left = copies_everywhere(&nodes).await;
        if left.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "copies left for ever: {left:?}\n{}",
            crate::crash::tail(&agent.log())
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A one-replica volume of `size` bytes whose first `written` bytes are written through and flushed, published.
async fn written_volume(
    c: &mut ClusterClient<Channel>,
    size: u64,
    written: u64,
) -> (String, RemoteNamespace) {
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: size,
        replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let ns = publish(c, &vol).await;
    for off in (0..written).step_by(64 << 10) {
        ns.write(off, data((off / MIB) as u8)).await.unwrap();
    }
    ns.flush().await.unwrap();
    (vol, ns)
}

/// A volume made from a snapshot goes on the snapshot's pools only where they have room for it written through: its
/// clones share every cluster with the snapshot and copy each at its first overwrite, so a pool that the snapshot
/// left without that room refuses it (RESOURCE_EXHAUSTED, saying which pool and how much room it has) instead of
/// taking a volume whose writes would fail for want of space. Room is read from the engine at that moment: the
/// snapshot taken just before has already shrunk it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_from_a_snapshot_needs_room_for_its_copies() {
    let (_dir, _port, _agent, _engines, nodes, mut c) = three_nodes().await;
    // A 24 MiB volume on a pool of 56 MiB of clusters, 16 MiB written: the snapshot keeps room for those 16 MiB to
    // be copied (32 MiB were free beside the volume), which leaves 16 MiB, not the 24 a clone may take.
    let (vol, ns) = written_volume(&mut c, 24 * MIB, 16 * MIB).await;
    ns.close().await;
    let snap = uuid::Uuid::new_v4().to_string();
    c.create_snapshot(pb::CreateSnapshotRequest {
        volume: vol.clone(),
        uuid: snap.clone(),
    })
    .await
    .unwrap();
    let clone = uuid::Uuid::new_v4().to_string();
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            uuid: clone.clone(),
            size_bytes: 24 * MIB,
            replicas: 1,
            source_snapshot: snap.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("room for") && e.message().contains(&(24 * MIB).to_string()),
        "{}",
        e.message()
    );
    assert_eq!(
        code(c.get_volume(pb::GetVolumeRequest { uuid: clone }).await),
        Code::NotFound,
        "a refused volume leaves no record"
    );
    // Made from the volume itself: the hidden snapshot taken for it is deleted with the refusal, not left pinning
    // room until the orphan sweep.
    let from_volume = uuid::Uuid::new_v4().to_string();
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            uuid: from_volume.clone(),
            size_bytes: 24 * MIB,
            replicas: 1,
            source_volume: vol.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(copies_everywhere(&nodes).await, vec![snap.clone()]);
}

/// A snapshot is taken only where the replicas' pools can keep room for what it makes them copy: once it shares a
/// replica's clusters, each is copied at its first overwrite, so a pool without room for them would fail the
/// volume's writes later. It is refused (RESOURCE_EXHAUSTED, naming the pool), and leaves no record and no copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_needs_room_for_the_copies_it_makes_its_replicas_take() {
    let (_dir, _port, _agent, _engines, nodes, mut c) = three_nodes().await;
    // 32 MiB on a pool of 56 MiB of clusters: 24 MiB free beside it, and 28 MiB written that a snapshot would
    // share.
    let (vol, ns) = written_volume(&mut c, 32 * MIB, 28 * MIB).await;
    let snap = uuid::Uuid::new_v4().to_string();
    let e = c
        .create_snapshot(pb::CreateSnapshotRequest {
            volume: vol.clone(),
            uuid: snap.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains(&format!("may copy {}", 28 * MIB))
            && e.message().contains(&format!("has room for {}", 24 * MIB)),
        "{}",
        e.message()
    );
    assert!(copies_everywhere(&nodes).await.is_empty());
    let listed = listed(&mut c).await;
    assert!(
        !format!("{listed:?}").contains(&snap),
        "a refused snapshot is listed: {listed:?}"
    );
    // The volume goes on: its writes still land.
    ns.write(30 * MIB, data(9)).await.unwrap();
    assert_eq!(ns.read(30 * MIB, 64 << 10).await.unwrap(), data(9));
    ns.close().await;
}

/// A snapshot deleted while the pool holding its copy is not imported (its engine restarted without its disk, so
/// the pool waits pending) is not taken for gone on the engine's NotFound: the delete answers FAILED_PRECONDITION
/// and the record stays, and once the disk is back and the pool imported, the copy is destroyed (before, the record
/// went and the copy kept its clusters in the pool for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_deleted_while_its_pool_is_away_is_destroyed_when_the_pool_returns() {
    let (dir, port, _agent, mut engines, nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 8 * MIB,
        replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let node = crate::registry::volume_now(&c, &vol).await.replica_list[0]
        .node
        .clone();
    let i: usize = node.trim_start_matches("reg-").parse().unwrap();
    let snap = uuid::Uuid::new_v4().to_string();
    c.create_snapshot(pb::CreateSnapshotRequest {
        volume: vol.clone(),
        uuid: snap.clone(),
    })
    .await
    .unwrap();
    assert_eq!(copies_everywhere(&nodes).await, vec![snap.clone()]);

    let img = dir.path().join(format!("pool{i}.img"));
    let away = dir.path().join(format!("pool{i}.away"));
    engines[i - 1].kill9();
    std::fs::rename(&img, &away).unwrap();
    engines[i - 1].restart();
    crate::registry::wait_for(port, &[(node.as_str(), crate::registry::Online)], "restart").await;
    // (Online may still be the killed engine's record: until the new one serves, the delete is UNAVAILABLE.)
    let t = std::time::Instant::now();
    let e = loop {
        let e = c
            .delete_snapshot(pb::DeleteSnapshotRequest { uuid: snap.clone() })
            .await
            .unwrap_err();
        if e.code() != Code::Unavailable || t.elapsed() > Duration::from_secs(30) {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not imported"), "{}", e.message());

    std::fs::rename(&away, &img).unwrap();
    let t = std::time::Instant::now();
    loop {
        let listed = listed(&mut c).await;
        let copies = copies_everywhere(&nodes).await;
        if copies.is_empty() && !format!("{listed:?}").contains(&snap) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the copy was never destroyed: {copies:?}, {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A new 8 MiB volume of `replicas` replicas and a snapshot of it: their UUIDs.
async fn snapshot_of_a_new_volume(
    c: &mut ClusterClient<Channel>,
    replicas: u32,
) -> (String, String) {
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 8 * MIB,
        replicas,
        ..Default::default()
    })
    .await
    .unwrap();
    let snap = uuid::Uuid::new_v4().to_string();
    c.create_snapshot(pb::CreateSnapshotRequest {
        volume: vol.clone(),
        uuid: snap.clone(),
    })
    .await
    .unwrap();
    (vol, snap)
}

/// Deleting a snapshot asks only the nodes that may hold a copy of it: a replica added to the volume since, on a node
/// that is down now, does not hold the delete up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_deleted_while_a_node_that_never_held_a_copy_is_down() {
    let (_dir, _port, _agent, mut engines, nodes, mut c) = three_nodes().await;
    let (vol, snap) = snapshot_of_a_new_volume(&mut c, 1).await;
    let v = c
        .set_volume_replicas(pb::SetVolumeReplicasRequest {
            uuid: vol.clone(),
            replicas: 2,
        })
        .await
        .unwrap()
        .into_inner();
    let first = v.replica_list[0].node.clone();
    let added = v
        .replica_list
        .iter()
        .map(|r| r.node.clone())
        .find(|n| *n != first)
        .expect("a second replica");
    let i: usize = added.trim_start_matches("reg-").parse().unwrap();
    engines[i - 1].kill9();
    c.delete_snapshot(pb::DeleteSnapshotRequest { uuid: snap.clone() })
        .await
        .unwrap();
    let up: Vec<pb::Node> = nodes.iter().filter(|n| n.name != added).cloned().collect();
    assert!(copies_everywhere(&up).await.is_empty());
}

/// A node that held a copy of a snapshot is deleted from the cluster (dead, DeleteNode): deleting the snapshot then
/// destroys the copies on the other nodes and drops the record, instead of answering NOT_FOUND for the node gone
/// (which CSI takes for "deleted") and leaving those copies and their pools held for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_with_a_copy_on_a_deleted_node_is_deleted_everywhere_else() {
    let (_dir, port, _agent, mut engines, nodes, mut c) = three_nodes().await;
    let (vol, snap) = snapshot_of_a_new_volume(&mut c, 3).await;
    // The volume goes (its snapshot stays), then reg-1 dies and is deleted from the cluster.
    c.delete_volume(pb::DeleteVolumeRequest { uuid: vol.clone() })
        .await
        .unwrap();
    engines[0].kill9();
    crate::registry::wait_for(port, &[("reg-1", crate::registry::Offline)], "reg-1 down").await;
    c.delete_node(pb::DeleteNodeRequest {
        name: "reg-1".into(),
    })
    .await
    .unwrap();
    c.delete_snapshot(pb::DeleteSnapshotRequest { uuid: snap.clone() })
        .await
        .expect("the snapshot is deleted");
    let up: Vec<pb::Node> = nodes
        .iter()
        .filter(|n| n.name != "reg-1")
        .cloned()
        .collect();
    assert!(copies_everywhere(&up).await.is_empty());
    let listed = listed(&mut c).await;
    assert!(listed.iter().all(|s| s.uuid != snap), "{listed:?}");
}

/// A snapshot whose record names a pool it asked a node about where no copy was made (its replica there was
/// rebuilding), and that pool was deleted through the agent since: deleting the snapshot finishes. Before, the
/// engine's NotFound there counted as "the pool not imported yet" for ever, and every delete answered
/// FAILED_PRECONDITION. A pool the agent did not destroy still counts as to come. Needs etcd (Debian package
/// etcd-server), where the test writes the record beside the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_asked_of_a_pool_destroyed_since_is_deleted() {
    use ha_agent::cluster::store::Store;
    let test = "a_snapshot_asked_of_a_pool_destroyed_since_is_deleted";
    let Some(etcd) = crate::etcd::Etcd::start(test).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = crate::registry::free_port("127.0.0.1");
    let store = ["--store", "etcd", "--etcd", etcd.endpoint.as_str()];
    let _agent = crate::registry::agent_with(dir.path(), port, &store, "agent");
    let url = format!("http://127.0.0.1:{port}");
    let _engines: Vec<_> = (1..=2)
        .map(|i| crate::registry::engine_with(dir.path(), i, &url))
        .collect();
    let (nodes, _) = crate::registry::wait_for(
        port,
        &[
            ("reg-1", crate::registry::Online),
            ("reg-2", crate::registry::Online),
        ],
        "registration",
    )
    .await;
    let mut c = ClusterClient::connect(url).await.unwrap();
    let (vol, snap) = snapshot_of_a_new_volume(&mut c, 1).await;
    let holder = crate::registry::volume_now(&c, &vol).await.replica_list[0]
        .node
        .clone();
    let other = if holder == "reg-1" { "reg-2" } else { "reg-1" };
    // The other node was asked too, of a pool it has no more (made and deleted through the agent), and of one
    // that was never the agent's (it may be imported through the engine's API again).
    let disk = dir.path().join("extra.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    c.create_pool(pb::CreatePoolRequest {
        node: other.into(),
        name: "extra".into(),
        disk: disk.display().to_string(),
    })
    .await
    .unwrap();
    c.delete_pool(pb::DeletePoolRequest {
        node: other.into(),
        name: "extra".into(),
    })
    .await
    .unwrap();
    let key = format!("/keelson/snapshots/{snap}");
    let s = etcd.store().await;
    let ask = |pools: &[&str]| {
        let s = &s;
        let key = &key;
        let pools: Vec<String> = pools.iter().map(|p| p.to_string()).collect();
        async move {
            let mut record: serde_json::Value =
                serde_json::from_slice(&s.get(key).await.unwrap().unwrap().value).unwrap();
            record["asked"] = serde_json::json!([other]);
            record["asked_pools"] = serde_json::Value::Array(
                pools
                    .iter()
                    .map(|p| serde_json::json!([other, p]))
                    .collect(),
            );
            s.put(key, serde_json::to_vec(&record).unwrap())
                .await
                .unwrap();
        }
    };
    ask(&["extra", "never-the-agents"]).await;
    let e = c
        .delete_snapshot(pb::DeleteSnapshotRequest { uuid: snap.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("never-the-agents"), "{e:?}");
    ask(&["extra"]).await;
    c.delete_snapshot(pb::DeleteSnapshotRequest { uuid: snap.clone() })
        .await
        .expect("the delete finishes");
    assert!(listed(&mut c).await.is_empty());
    assert!(copies_everywhere(&nodes).await.is_empty());
    assert!(s.get(&key).await.unwrap().is_none());
}

/// A volume not published, one of its two replicas on a node that is down: a snapshot is taken of the replica that
/// is up (nothing writes to a volume without a nexus, so every replica in sync holds the same data). Before, the
/// snapshot waited for the node for ever (UNAVAILABLE at each try), and with it any clone of the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_an_unpublished_volume_is_taken_while_a_replicas_node_is_down() {
    let (_dir, port, _agent, mut engines, nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    let v = c
        .create_volume(pb::CreateVolumeRequest {
            uuid: vol.clone(),
            size_bytes: 8 * MIB,
            replicas: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let down = v.replica_list[0].node.clone();
    let i: usize = down.trim_start_matches("reg-").parse().unwrap();
    engines[i - 1].kill9();
    crate::registry::wait_for(
        port,
        &[(down.as_str(), crate::registry::Offline)],
        "kill -9",
    )
    .await;
    let snap = uuid::Uuid::new_v4().to_string();
    c.create_snapshot(pb::CreateSnapshotRequest {
        volume: vol.clone(),
        uuid: snap.clone(),
    })
    .await
    .unwrap();
    let s = listed(&mut c).await;
    assert!(
        s.iter().any(|x| x.uuid == snap && x.ready),
        "taken and ready: {s:?}"
    );
    let up: Vec<pb::Node> = nodes.iter().filter(|n| n.name != down).cloned().collect();
    assert_eq!(copies_everywhere(&up).await, vec![snap]);
}

/// A volume whose nexus ended uncleanly (its node killed, the volume unpublished while it was down): its replicas may
/// differ where the last writes went, and nothing has resynced them, so a snapshot of it is one copy of one replica.
/// Before, each replica was copied, and a volume made from the snapshot had replicas that disagreed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_after_an_unclean_end_is_one_copy_of_one_replica() {
    let (_dir, port, _agent, mut engines, nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    let v = c
        .create_volume(pb::CreateVolumeRequest {
            uuid: vol.clone(),
            size_bytes: 8 * MIB,
            replicas: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The nexus on the node holding no replica: killing it leaves both replicas up.
    let third = nodes
        .iter()
        .find(|n| v.replica_list.iter().all(|r| r.node != n.name))
        .unwrap()
        .name
        .clone();
    let p = c
        .publish_volume(pb::PublishVolumeRequest {
            uuid: vol.clone(),
            host_nqn: HOST.into(),
            node: third.clone(),
            multi_host: false,
            require_known_node: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.nexus_node, third);
    let mut o = ConnectOptions::new(p.target_addresses[0].parse().unwrap(), &p.nqn);
    o.hostnqn = HOST.into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    ns.write(0, data(1)).await.unwrap();
    let i: usize = third.trim_start_matches("reg-").parse().unwrap();
    engines[i - 1].kill9();
    crate::registry::wait_for(
        port,
        &[(third.as_str(), crate::registry::Offline)],
        "kill -9",
    )
    .await;
    c.unpublish_volume(pb::UnpublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: HOST.into(),
    })
    .await
    .unwrap();
    let snap = uuid::Uuid::new_v4().to_string();
    c.create_snapshot(pb::CreateSnapshotRequest {
        volume: vol.clone(),
        uuid: snap.clone(),
    })
    .await
    .unwrap();
    let up: Vec<pb::Node> = nodes.iter().filter(|n| n.name != third).cloned().collect();
    assert_eq!(copies_everywhere(&up).await, vec![snap]);
    drop(ns);
}
