//! Online expansion through the cluster agent with real io-engines: a published volume grows while a host writes
//! to it, the host sees the new size without reconnecting; an unpublished one grows and is published at its new
//! size; bad requests get precise codes and change nothing, also when a replica's node is down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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

use crate::registry::{Offline, Online, three_nodes, wait_for};

const MIB: u64 = 1 << 20;
const HOST: &str = "nqn.2026-11.io.keelson:test-expand-host";

fn expand(uuid: &str, size: u64) -> pb::ExpandVolumeRequest {
    pb::ExpandVolumeRequest {
        uuid: uuid.into(),
        size_bytes: size,
    }
}

async fn get(c: &mut ClusterClient<Channel>, uuid: &str) -> pb::Volume {
    c.get_volume(pb::GetVolumeRequest { uuid: uuid.into() })
        .await
        .unwrap()
        .into_inner()
}

/// The size of every replica of `v` as its engine reports it.
async fn replica_sizes(nodes: &[pb::Node], v: &pb::Volume) -> Vec<u64> {
    let mut out = Vec::new();
    for r in &v.replica_list {
        let n = nodes.iter().find(|n| n.name == r.node).unwrap();
        let mut e = EngineClient::connect(n.engine_endpoint.clone())
            .await
            .unwrap();
        let listed = e
            .list_replicas(epb::ListReplicasRequest {})
            .await
            .unwrap()
            .into_inner();
        out.push(
            listed
                .replicas
                .iter()
                .find(|x| x.uuid == r.uuid)
                .unwrap()
                .size,
        );
    }
    out
}

async fn publish(c: &mut ClusterClient<Channel>, uuid: &str) -> pb::Volume {
    c.publish_volume(pb::PublishVolumeRequest {
        uuid: uuid.into(),
        host_nqn: HOST.into(),
        node: String::new(),
        multi_host: false,
        require_known_node: false,
    })
    .await
    .unwrap()
    .into_inner()
}

/// A new unpublished 4 MiB volume with two replicas.
async fn two_replicas_of_4_mib(c: &mut ClusterClient<Channel>) -> String {
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 4 * MIB,
        replicas: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    vol
}

async fn connect(v: &pb::Volume) -> RemoteNamespace {
    let mut o = ConnectOptions::new(v.target_addresses[0].parse().unwrap(), &v.nqn);
    o.hostnqn = HOST.into();
    RemoteNamespace::connect(o, 1).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_volume_grows_under_writes_and_bad_expansions_change_nothing() {
    let (_dir, port, _agent, mut engines, nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 8 * MIB,
        replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let v = publish(&mut c, &vol).await;
    let ns = Arc::new(connect(&v).await);
    ns.write(8 * MIB - 4096, Bytes::from(vec![7u8; 4096]))
        .await
        .unwrap();

    // Refused, and nothing changes: unknown or malformed volume, smaller, unaligned, larger than the pools themselves
    // (OUT_OF_RANGE: never possible; RESOURCE_EXHAUSTED is for room missing now).
    for (uuid, size, code) in [
        (uuid::Uuid::new_v4().to_string(), 16 * MIB, Code::NotFound),
        ("not-a-uuid".to_string(), 16 * MIB, Code::InvalidArgument),
        (vol.clone(), 4 * MIB, Code::InvalidArgument),
        (vol.clone(), 16 * MIB + 100, Code::InvalidArgument),
        (vol.clone(), 0, Code::InvalidArgument),
        (vol.clone(), 1 << 30, Code::OutOfRange),
    ] {
        let e = c.expand_volume(expand(&uuid, size)).await.unwrap_err();
        assert_eq!(e.code(), code, "{uuid} {size}: {e:?}");
    }
    let now = get(&mut c, &vol).await;
    assert_eq!((now.size_bytes, now.expanding_from_bytes), (8 * MIB, 0));
    assert_eq!(replica_sizes(&nodes, &now).await, vec![8 * MIB; 3]);

    // Grows while a host writes all along, on the connection it had.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (ns, stop, done) = (ns.clone(), stop.clone(), done.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                ns.write((i % 1024) * 4096, Bytes::from(vec![i as u8 | 1; 4096]))
                    .await
                    .unwrap();
                i += 1;
                done.store(i, Ordering::Relaxed);
            }
            i
        })
    };
    // Writes counted, not slept on: a loaded machine runs fewer in a fixed pause.
    let writes_reach = |n: u64| {
        let done = done.clone();
        async move {
            let t = Instant::now();
            while done.load(Ordering::Relaxed) < n {
                assert!(t.elapsed() < Duration::from_secs(30), "the writes stopped");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    writes_reach(5).await;
    let grown = c
        .expand_volume(expand(&vol, 24 * MIB))
        .await
        .unwrap()
        .into_inner();
    writes_reach(done.load(Ordering::Relaxed) + 5).await;
    stop.store(true, Ordering::Relaxed);
    assert!(
        writer.await.unwrap() >= 10,
        "writes went on across the growth"
    );
    assert_eq!(
        (
            grown.size_bytes,
            grown.expanding_from_bytes,
            grown.state.as_str()
        ),
        (24 * MIB, 0, "Online")
    );
    assert_eq!(replica_sizes(&nodes, &grown).await, vec![24 * MIB; 3]);
    assert_eq!(ns.rescan().await.unwrap() * 512, 24 * MIB);
    ns.write(24 * MIB - 4096, Bytes::from(vec![9u8; 4096]))
        .await
        .unwrap();
    assert_eq!(
        ns.read(8 * MIB - 4096, 8192).await.unwrap(),
        Bytes::from([vec![7u8; 4096], vec![0u8; 4096]].concat()),
        "old data stays, new space reads as zeroes"
    );
    assert_eq!(
        ns.read(24 * MIB - 4096, 4096).await.unwrap(),
        Bytes::from(vec![9u8; 4096])
    );
    // The same size again is a no-op.
    let again = c
        .expand_volume(expand(&vol, 24 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.size_bytes, 24 * MIB);
    ns.close().await;

    // A replica's node is down: refused before anything is recorded.
    let victim = grown
        .replica_list
        .iter()
        .find(|r| r.node != grown.nexus_node)
        .unwrap()
        .node
        .clone();
    let i: usize = victim.strip_prefix("reg-").unwrap().parse().unwrap();
    engines[i - 1].kill9();
    wait_for(port, &[(victim.as_str(), Offline)], "replica node down").await;
    let e = c.expand_volume(expand(&vol, 32 * MIB)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&victim), "{e:?}");
    let now = get(&mut c, &vol).await;
    assert_eq!((now.size_bytes, now.expanding_from_bytes), (24 * MIB, 0));
    engines[i - 1].restart();
    wait_for(port, &[(victim.as_str(), Online)], "replica node back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpublished_volume_grows_and_is_published_at_its_new_size() {
    let (_dir, _port, _agent, _engines, nodes, mut c) = three_nodes().await;
    let vol = two_replicas_of_4_mib(&mut c).await;
    let v = c
        .expand_volume(expand(&vol, 12 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replica_sizes(&nodes, &v).await, vec![12 * MIB; 2]);
    let v = publish(&mut c, &vol).await;
    let ns = connect(&v).await;
    assert_eq!(ns.size_bytes(), 12 * MIB);
    ns.close().await;
    let e = c
        .create_snapshot(pb::CreateSnapshotRequest {
            volume: vol.clone(),
            uuid: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.size_bytes, 12 * MIB, "a snapshot has the grown size");
}

/// A replica larger than its volume (made at the size of a growth that was undone since: a replacement healing made
/// while the growth waited): a nexus over it is the volume's size, not the replica's (hosts would see, and file
/// systems grow into, more than the volume has), and a later growth to less than that replica's size counts it as
/// grown (it refused to shrink, and the growth waited for ever or was undone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_larger_than_its_volume_neither_sizes_the_nexus_nor_blocks_a_growth() {
    let (_dir, _port, _agent, _engines, nodes, mut c) = three_nodes().await;
    let vol = two_replicas_of_4_mib(&mut c).await;
    let v = get(&mut c, &vol).await;
    // Both replicas larger than the volume, behind the agent's back: a nexus over either was their size.
    for r in &v.replica_list {
        let n = nodes.iter().find(|n| n.name == r.node).unwrap();
        EngineClient::connect(n.engine_endpoint.clone())
            .await
            .unwrap()
            .resize_replica(epb::ResizeReplicaRequest {
                uuid: r.uuid.clone(),
                size: 16 * MIB,
            })
            .await
            .unwrap();
    }
    let p = publish(&mut c, &vol).await;
    let ns = connect(&p).await;
    assert_eq!(ns.size_bytes(), 4 * MIB, "the nexus is the volume's size");
    ns.close().await;
    // Grown to less than the replicas have: they are grown enough.
    let v = c
        .expand_volume(expand(&vol, 8 * MIB))
        .await
        .expect("the growth counts replicas already larger as grown")
        .into_inner();
    assert_eq!(v.size_bytes, 8 * MIB);
    let ns = connect(&p).await;
    assert_eq!(ns.size_bytes(), 8 * MIB, "the nexus grew to the new size");
    ns.close().await;
}

/// Growth takes room as placements do (each pool here holds 56 MiB): two expansions asked at once, or an expansion
/// and a new volume, never both get the same free space of a pool; the one refused changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansions_and_placements_at_once_do_not_take_one_pools_room_twice() {
    let (_dir, _port, _agent, _engines, _nodes, c) = three_nodes().await;
    let volume = |size: u64| pb::CreateVolumeRequest {
        uuid: uuid::Uuid::new_v4().to_string(),
        size_bytes: size,
        replicas: 3,
        ..Default::default()
    };
    let code = |r: Result<tonic::Response<pb::Volume>, tonic::Status>| match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    };
    let mut c1 = c.clone();
    let a = c1
        .create_volume(volume(16 * MIB))
        .await
        .unwrap()
        .into_inner();
    let b = c1
        .create_volume(volume(16 * MIB))
        .await
        .unwrap()
        .into_inner();
    // 24 MiB left on each pool; each growth needs 16 more on each.
    let (mut ca, mut cb) = (c.clone(), c.clone());
    let (ra, rb) = tokio::join!(
        ca.expand_volume(expand(&a.uuid, 32 * MIB)),
        cb.expand_volume(expand(&b.uuid, 32 * MIB)),
    );
    let mut codes = [code(ra), code(rb)];
    codes.sort_by_key(|c| *c as i32);
    assert_eq!(codes, [Code::Ok, Code::ResourceExhausted]);
    let (grown, kept) = if get(&mut c1, &a.uuid).await.size_bytes == 32 * MIB {
        (a, b)
    } else {
        (b, a)
    };
    let k = get(&mut c1, &kept.uuid).await;
    assert_eq!(
        k.size_bytes,
        16 * MIB,
        "the refused expansion changed nothing: {k:?}"
    );

    // The grown volume goes: 40 MiB free on each pool once the heartbeats show it.
    c1.delete_volume(pb::DeleteVolumeRequest { uuid: grown.uuid })
        .await
        .unwrap();
    crate::registry::wait_for_committed(&mut c1, 16 * MIB).await;
    // A growth of 24 MiB and a new volume of 24 MiB on every pool: only one fits.
    let (grow, place) = tokio::join!(
        ca.expand_volume(expand(&kept.uuid, 40 * MIB)),
        cb.create_volume(volume(24 * MIB)),
    );
    let mut codes = [code(grow), code(place)];
    codes.sort_by_key(|c| *c as i32);
    assert_eq!(codes, [Code::Ok, Code::ResourceExhausted]);
}
