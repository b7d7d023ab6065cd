//! Fencing with NVMe reservations across real io-engine processes: replicas in pools on 127.0.0.1-.3, nexus A on
//! .4 and its replacement B on .5. Once B has preempted A's key, none of A's writes lands on any replica, and the
//! reservation survives a restart of a replica's io-engine. And per access class over NVMe/TCP: a fenced host
//! changes nothing on a replica, not its data, nor its missed-writes records, nor its snapshots (the local path's
//! twin is `engine::local`'s unit test). And on a single-path subsystem (a replica's), a write of a controller its
//! host left behind never lands after the host took its reservation again through a newer one (a rejoin, or the
//! initiator's own reconnect).

use std::time::Duration;

use bytes::Bytes;
use nvmf_target::block::{BlockDevice, BlockError, MissedWrites};
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use nvmf_target::initiator::reservation::REPLICA_RESERVATION;
use nvmf_target::protocol::command::resv;
use nvmf_target::protocol::pdu::{Pdu, R2t};
use nvmf_target::protocol::status::Status;
use nvmf_target::target::subsystem::Namespace;
use proto::engine as pb;
use proto::engine::engine_client::EngineClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::{HOST, HOSTID, NQN, Raw, Recv, single_path_target};
use crate::pools::{PoolNode, disk, open_volume, pattern, publish, replica_nodes, replica_req};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

async fn nexus_on(
    api: &mut EngineClient<Channel>,
    uuid: &str,
    children: &[String],
    key: u64,
    preempt: u64,
) -> Result<pb::Nexus, tonic::Status> {
    let n = api
        .create_nexus(pb::CreateNexusRequest {
            uuid: uuid.into(),
            children: children.to_vec(),
            io_timeout_ms: 2000,
            reservation_key: key,
            preempt_key: preempt,
            ..Default::default()
        })
        .await?
        .into_inner();
    publish(api, uuid).await?;
    Ok(n)
}

async fn volume(node: &PoolNode, uuid: &str) -> RemoteNamespace {
    let mut ns = open_volume(node, uuid).await;
    ns.reconnect_wait = Duration::ZERO;
    ns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_nexus_fences_the_old_one_and_none_of_its_writes_lands() {
    let dir = tempfile::tempdir().unwrap();
    let (mut replicas, uris) = replica_nodes(dir.path(), "replica", SIZE, 64 * MIB).await;
    let a = PoolNode::start_named("127.0.0.4", "nexus-a", &disk(dir.path(), "a.img", 16 * MIB));
    let b = PoolNode::start_named("127.0.0.5", "nexus-b", &disk(dir.path(), "b.img", 16 * MIB));
    let vol = uuid::Uuid::new_v4().to_string();
    let mut api_a = a.api().await;
    let mut api_b = b.api().await;

    nexus_on(&mut api_a, &vol, &uris, 1, 0).await.unwrap();
    let va = volume(&a, &vol).await;
    va.write(0, pattern(1, 65536)).await.unwrap();

    // Without the old key, B cannot take over.
    let e = nexus_on(&mut api_b, &vol, &uris, 2, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    // With it, B preempts A on every replica.
    nexus_on(&mut api_b, &vol, &uris, 2, 1).await.unwrap();
    let vb = volume(&b, &vol).await;
    assert_eq!(vb.read(0, 65536).await.unwrap(), pattern(1, 65536));

    // A keeps trying to write: every attempt fails and nothing reaches a replica.
    for i in 0..4 {
        let off = MIB * (1 + i);
        assert!(
            va.write(off, pattern(50 + i, 4096)).await.is_err(),
            "A's write {i} succeeded"
        );
    }
    let list = api_a
        .list_nexuses(pb::ListNexusesRequest {})
        .await
        .unwrap()
        .into_inner();
    // A preempted nexus stops as a whole (its replicas are not at fault): at most one nexus writes.
    assert_eq!(list.nexuses[0].state, pb::NexusState::Shutdown as i32);
    // Asked for again, the stopped nexus is not handed back as if made; nor is B's for a request with another key.
    let again = |key: u64| pb::CreateNexusRequest {
        uuid: vol.clone(),
        children: uris.clone(),
        io_timeout_ms: 2000,
        reservation_key: key,
        preempt_key: key - 1,
        ..Default::default()
    };
    let e = api_a.create_nexus(again(1)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    let e = api_b.create_nexus(again(3)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    api_b.create_nexus(again(2)).await.unwrap();
    vb.write(8 * MIB, pattern(7, 4096)).await.unwrap();
    for (node, id) in &replicas {
        let r = node
            .connect(id, "nqn.2026-11.io.keelson:node-checker")
            .await
            .unwrap();
        // Exclusive Access: a host without the reservation reads nothing either.
        assert!(
            matches!(
                r.read(8 * MIB, 4096).await,
                Err(nvmf_target::block::BlockError::ReservationConflict)
            ),
            "a host without the reservation read {id}"
        );
        let rep = r.report().await.unwrap();
        assert_eq!(rep.rtype, 2, "Exclusive Access");
        let holders: Vec<u64> = rep
            .registrants
            .iter()
            .filter(|x| x.2)
            .map(|x| x.1)
            .collect();
        assert_eq!(holders, vec![2], "B holds the reservation on {id}");
        r.close().await;
    }

    // The reservation is kept across a restart of a replica's io-engine.
    let (node, id) = &mut replicas[0];
    node.restart();
    let _ = node.api().await;
    let r = node
        .connect(id, "nqn.2026-11.io.keelson:node-checker")
        .await
        .unwrap();
    let rep = r.report().await.unwrap();
    assert_eq!(rep.rtype, 2);
    assert_eq!(
        rep.registrants
            .iter()
            .filter(|x| x.2)
            .map(|x| x.1)
            .collect::<Vec<_>>(),
        vec![2]
    );
    assert!(
        matches!(
            r.write(0, pattern(9, 4096)).await,
            Err(nvmf_target::block::BlockError::ReservationConflict)
        ),
        "a host without the reservation wrote"
    );
    r.close().await;
    // The engine API shows the same, from the pool's metadata.
    let res = node
        .api()
        .await
        .get_reservation(pb::GetReservationRequest {
            replica: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.r#type, 2);
    let holders: Vec<u64> = res
        .registrants
        .iter()
        .filter(|r| r.holds)
        .map(|r| r.key)
        .collect();
    assert_eq!(holders, vec![2]);

    // The old nexus is shut down for good: unpublished, listed as shut down.
    let n = api_a
        .shutdown_nexus(pb::ShutdownNexusRequest { uuid: vol.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.state, pb::NexusState::Shutdown as i32);
    assert!(n.nqn.is_empty(), "unpublished");
    va.close().await;
    vb.close().await;

    // What each replica holds, read by a checker that takes the reservation over: none of A's fenced writes.
    for (node, id) in &replicas {
        let r = node
            .connect(id, "nqn.2026-11.io.keelson:node-checker")
            .await
            .unwrap();
        r.register_key(99).await.unwrap();
        r.acquire(resv::PREEMPT, 99, 2, resv::EXCLUSIVE_ACCESS)
            .await
            .unwrap();
        for i in 0..4 {
            let got = r.read(MIB * (1 + i), 4096).await.unwrap();
            assert!(
                got.iter().all(|b| *b == 0),
                "A's fenced write {i} landed on {id}"
            );
        }
        assert_eq!(r.read(8 * MIB, 4096).await.unwrap(), pattern(7, 4096));
        r.close().await;
    }
}

/// A nexus on a replica's node, over its local replica and a remote one, is replaced by one made of the remote
/// replica alone (the cluster agent leaves out the old node's replicas when it cannot end the old nexus: its node cut
/// off, not dead), which writes. The old nexus still reaches its local replica, which the new one never fenced:
/// once the read lease is past, no read through it returns the data from before the new nexus's write (it checks
/// its remote child first, meets the reservation conflict and stops). Before, its round-robin reads were served
/// from the local replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_nexus_serves_no_read_from_its_local_replica_after_a_new_one_fenced_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (replicas, uris) = replica_nodes(dir.path(), "lease", SIZE, 64 * MIB).await;
    let b = PoolNode::start_named("127.0.0.5", "nexus-b", &disk(dir.path(), "b.img", 16 * MIB));
    let vol = uuid::Uuid::new_v4().to_string();
    let a = &replicas[0].0;
    let mut api_a = a.api().await;
    let mut api_b = b.api().await;
    let old_children = vec![
        proto::names::local_child_uri(&replicas[0].1),
        uris[1].clone(),
    ];
    nexus_on(&mut api_a, &vol, &old_children, 1, 0)
        .await
        .unwrap();
    let va = volume(a, &vol).await;
    va.write(0, pattern(1, 65536)).await.unwrap();
    nexus_on(&mut api_b, &vol, &uris[1..2], 2, 1).await.unwrap();
    let vb = volume(&b, &vol).await;
    vb.write(0, pattern(2, 65536)).await.unwrap();
    tokio::time::sleep(nvmf_target::nexus::READ_LEASE + Duration::from_millis(200)).await;
    for i in 0..6 {
        if let Ok(d) = va.read(0, 65536).await {
            assert_ne!(
                d,
                pattern(1, 65536),
                "read {i}: older than the new nexus's write"
            );
        }
    }
    // Stopped: it met the new nexus's reservation on its remote child.
    let list = api_a
        .list_nexuses(pb::ListNexusesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.nexuses[0].state, pb::NexusState::Shutdown as i32);
    vb.close().await;
    va.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_host_changes_nothing_on_a_replica_by_any_command_class() {
    let dir = tempfile::tempdir().unwrap();
    let node = PoolNode::start_named(
        "127.0.0.1",
        "fence-classes",
        &disk(dir.path(), "r.img", 64 * MIB),
    );
    let mut api = node.api().await;
    let id = uuid::Uuid::new_v4().to_string();
    let (old_host, new_host) = (
        "nqn.2026-11.io.keelson:node-old",
        "nqn.2026-11.io.keelson:node-new",
    );
    let mut req = replica_req(&id, SIZE);
    req.allowed_hosts = vec![old_host.into(), new_host.into()];
    api.create_replica(req).await.unwrap();
    let connect = |host: &str| {
        let addr = format!("{}:{}", node.ip, node.port).parse().unwrap();
        let mut o = ConnectOptions::new(addr, &format!("nqn.2026-11.io.keelson:replica-{id}"));
        o.hostnqn = host.to_string();
        RemoteNamespace::connect(o, 1)
    };
    let old = connect(old_host).await.unwrap();
    let new = connect(new_host).await.unwrap();
    let record = |child: &str| MissedWrites {
        child: child.into(),
        since_ms: 1,
        ranges: vec![(0, 4096)],
    };

    // The old holder works, then is preempted by the new one.
    old.register_key(1).await.unwrap();
    old.acquire(resv::ACQUIRE, 1, 0, REPLICA_RESERVATION)
        .await
        .unwrap();
    old.write(0, pattern(1, 4096)).await.unwrap();
    old.note_missed(&record("child-x")).await.unwrap();
    new.register_key(2).await.unwrap();
    new.acquire(resv::PREEMPT, 2, 1, REPLICA_RESERVATION)
        .await
        .unwrap();

    let conflict = |what: &str, r: Result<(), BlockError>| {
        assert!(
            matches!(r, Err(BlockError::ReservationConflict)),
            "a fenced host's {what}: {r:?}"
        );
    };
    // Data.
    conflict("write", old.write(0, pattern(2, 4096)).await);
    conflict("write zeroes", old.write_zeroes(0, 4096).await);
    conflict("deallocate", old.deallocate(0, 4096).await);
    conflict("flush", old.flush().await);
    // Missed-writes records.
    conflict("note", old.note_missed(&record("child-y")).await);
    conflict("forget", old.forget_missed("child-x").await);
    // Snapshots.
    conflict("snapshot", old.snapshot(uuid::Uuid::new_v4()).await);
    // Reads too, under the Exclusive Access a nexus holds (what the old one read could be older than the new
    // one's writes).
    assert!(matches!(
        old.read(0, 4096).await,
        Err(BlockError::ReservationConflict)
    ));
    assert!(matches!(
        old.missed().await,
        Err(BlockError::ReservationConflict)
    ));

    // Nothing changed, and the holder can do all of it.
    assert_eq!(new.read(0, 4096).await.unwrap(), pattern(1, 4096));
    assert_eq!(new.missed().await.unwrap(), vec![record("child-x")]);
    let snaps = api
        .list_snapshots(pb::ListSnapshotsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(snaps.snapshots.is_empty(), "{snaps:?}");
    new.note_missed(&record("child-y")).await.unwrap();
    new.forget_missed("child-x").await.unwrap();
    new.snapshot(uuid::Uuid::new_v4()).await.unwrap();
    new.write(0, pattern(3, 4096)).await.unwrap();
    assert_eq!(new.missed().await.unwrap(), vec![record("child-y")]);
    old.close().await;
    new.close().await;
}

/// A write sent without its data (R2T) by a host that holds the reservation, whose data comes after a newer host
/// preempted it: refused, and the newer host's write stays. (An old nexus paused between command and data.)
#[tokio::test]
async fn a_write_whose_data_arrives_after_its_host_was_fenced_is_refused() {
    let t = crate::harness::target().await;
    let ns = t.target.subsystem(NQN).unwrap().namespace(1).unwrap();
    held_by_the_host(&ns, 1).await;
    let (_admin, mut q, r2t) = left_behind(t.addr).await;
    // A newer nexus takes over and writes.
    let new = uuid::Uuid::new_v4();
    ns.reservations
        .change(|s| {
            s.register(new, resv::REGISTER, false, 0, 2)?;
            s.acquire(new, resv::PREEMPT, false, 2, 1, resv::WRITE_EXCLUSIVE)
        })
        .await
        .unwrap();
    let newer = Bytes::from(vec![7u8; 1 << 20]);
    ns.device.write(0, newer.clone()).await.unwrap();
    // The old host's data arrives.
    q.send_data(&r2t, 3).await.unwrap();
    let Recv::Pdu(Pdu::CapsuleResp(c)) = q.recv().await else {
        panic!("expected the write's completion")
    };
    assert_eq!(c.status, Status::RESERVATION_CONFLICT);
    assert_eq!(ns.device.read(0, 1 << 20).await.unwrap(), newer);
}

/// Host [`HOSTID`] registers `key` and takes the reservation of `ns` a nexus takes of its children.
async fn held_by_the_host(ns: &Namespace, key: u64) {
    let host = uuid::Uuid::from_bytes(HOSTID);
    ns.reservations
        .change(|s| {
            s.register(host, resv::REGISTER, false, 0, key)?;
            s.acquire(host, resv::ACQUIRE, false, key, 0, resv::EXCLUSIVE_ACCESS)
        })
        .await
        .unwrap();
}

/// A controller of [`HOSTID`] the host gave up on, with a 1 MiB write at LBA 0 whose data it has not sent yet.
async fn left_behind(addr: std::net::SocketAddr) -> (Raw, Raw, R2t) {
    let (mut admin, id) = Raw::admin(addr, 0).await;
    let mut q = Raw::io(addr, &mut admin, id).await;
    let r2t = q.write_awaiting_data(4, 1 << 20).await;
    (admin, q, r2t)
}

/// The data of the write [`left_behind`] arrives: the write is refused, or the connection was closed before it
/// was read. Either way the namespace still holds `newer` at LBA 0.
async fn its_late_data_is_refused(old: &mut Raw, r2t: &R2t, ns: &Namespace, newer: &Bytes) {
    if old.send_data(r2t, 3).await.is_ok() {
        match old.recv().await {
            Recv::Pdu(Pdu::CapsuleResp(c)) => assert_eq!(c.status, Status::ABORTED_SQ_DELETION),
            Recv::Closed | Recv::Error(_) => {}
            Recv::Pdu(p) => panic!("unexpected {p:?}"),
        }
    }
    assert_eq!(&ns.device.read(0, 1 << 20).await.unwrap(), newer);
}

/// A namespace initiator of host [`HOSTID`] to the harness's subsystem.
fn host_options(addr: std::net::SocketAddr) -> ConnectOptions {
    let mut o = ConnectOptions::new(addr, NQN);
    o.hostnqn = HOST.into();
    o.hostid = HOSTID;
    o
}

/// A write of an older controller of the host holding the reservation, whose data comes after the host took its
/// reservation again through a newer controller (a nexus rejoining a replica it gave up on, before rebuilding it):
/// refused, and the host's newer write stays. On a single-path subsystem, as a replica's.
#[tokio::test]
async fn a_write_of_a_controller_its_host_left_behind_is_refused_once_it_reserved_through_a_newer_one()
 {
    let t = single_path_target().await;
    let ns = t.target.subsystem(NQN).unwrap().namespace(1).unwrap();
    held_by_the_host(&ns, 1).await;
    let (_old_admin, mut old, r2t) = left_behind(t.addr).await;

    // The same host connects again and takes its reservation again there (nothing changes but the fence).
    let remote = RemoteNamespace::connect(host_options(t.addr), 1)
        .await
        .unwrap();
    remote
        .acquire(resv::ACQUIRE, 1, 0, resv::EXCLUSIVE_ACCESS)
        .await
        .unwrap();
    let newer = Bytes::from(vec![7u8; 1 << 20]);
    remote.write(0, newer.clone()).await.unwrap();

    its_late_data_is_refused(&mut old, &r2t, &ns, &newer).await;
    // The newer controller still works.
    remote.write(0, newer.clone()).await.unwrap();
    remote.close().await;
}

/// The initiator reconnects by itself (a nexus goes on with reconnected children when all lost their connections
/// at once): the reconnected controller takes the reservation again before serving, which ends the controller it
/// replaces on a single-path subsystem. A write of that older controller whose data comes after is refused, and
/// the newer write stays.
#[tokio::test]
async fn a_reconnect_ends_the_controller_it_replaces_before_serving() {
    let t = single_path_target().await;
    let sub = t.target.subsystem(NQN).unwrap();
    let ns = sub.namespace(1).unwrap();
    held_by_the_host(&ns, 1).await;
    let (_old_admin, mut old, r2t) = left_behind(t.addr).await;
    let old_id = sub.controllers()[0].cntlid;

    let remote = RemoteNamespace::connect(host_options(t.addr), 1)
        .await
        .unwrap();
    remote.hold_reservation(1);
    // Its connection is lost: the target ends its controller, and it reconnects.
    for c in sub.controllers().into_iter().filter(|c| c.cntlid != old_id) {
        c.shutdown("test: the connection is lost");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while remote.connection_losses() == 0 || !remote.is_connected() {
        assert!(std::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let newer = Bytes::from(vec![7u8; 1 << 20]);
    remote.write(0, newer.clone()).await.unwrap();

    its_late_data_is_refused(&mut old, &r2t, &ns, &newer).await;
    remote.close().await;
}

/// Another nexus with the same host identifier (a second engine given the node's name) re-keys the host's
/// registration and takes the reservation: the target lets that host's commands through, whatever connection they
/// come on. The first nexus's initiator, reconnecting, finds its key refused: it serves no more I/O (reservation
/// conflict) instead of writing beside the other.
#[tokio::test]
async fn a_reconnect_whose_key_was_replaced_by_the_same_host_serves_no_io() {
    let t = single_path_target().await;
    let sub = t.target.subsystem(NQN).unwrap();
    let ns = sub.namespace(1).unwrap();
    held_by_the_host(&ns, 1).await;
    let first = RemoteNamespace::connect(host_options(t.addr), 1)
        .await
        .unwrap();
    first.hold_reservation(1);
    first.write(0, Bytes::from(vec![1u8; 4096])).await.unwrap();
    let before = first.connection_losses();

    // The second one, of the same host: its key replaces the first's (which also ends the first's controllers).
    let second = RemoteNamespace::connect(host_options(t.addr), 1)
        .await
        .unwrap();
    second.register_key(2).await.unwrap();
    second
        .acquire(resv::ACQUIRE, 2, 0, REPLICA_RESERVATION)
        .await
        .unwrap();
    second.hold_reservation(2);
    // The target ended the first's controller as the host took the reservation through a newer one: it reconnects.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while first.connection_losses() == before {
        if std::time::Instant::now() > deadline {
            panic!("the first nexus's connection was never lost");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while !first.is_connected() {
        assert!(std::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = first.write(0, Bytes::from(vec![9u8; 4096])).await;
    assert!(
        matches!(r, Err(BlockError::ReservationConflict)),
        "the first nexus still writes: {r:?}"
    );
    assert!(matches!(
        first.read(0, 4096).await,
        Err(BlockError::ReservationConflict)
    ));
    let newer = Bytes::from(vec![2u8; 4096]);
    second.write(0, newer.clone()).await.unwrap();
    assert_eq!(ns.device.read(0, 4096).await.unwrap(), newer);
    first.close().await;
    second.close().await;
}

/// A close while the initiator reconnects returns once the reconnect has ended: the reservation it was taking
/// again has been taken (the target carries it out anyway, and it must not come after what the caller does next),
/// and its controller is shut down unused.
#[tokio::test]
async fn a_close_during_a_reconnect_waits_for_it_and_leaves_no_controller_behind() {
    let t = single_path_target().await;
    let sub = t.target.subsystem(NQN).unwrap();
    let ns = sub.namespace(1).unwrap();
    held_by_the_host(&ns, 1).await;
    let remote = std::sync::Arc::new(
        RemoteNamespace::connect(host_options(t.addr), 1)
            .await
            .unwrap(),
    );
    remote.hold_reservation(1);

    // Another change holds the namespace's reservations a while: the reconnect's acquire waits for it.
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let held = {
        let (ns, release) = (ns.clone(), release.clone());
        tokio::spawn(async move {
            ns.reservations
                .change_settled(release.notified(), |_| Ok(()))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    for c in sub.controllers() {
        c.shutdown("test: the connection is lost");
    }
    // The reconnect's controller (its backoff, then a connect: waited for, however loaded the machine).
    let t = std::time::Instant::now();
    while sub.controllers().len() != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the reconnect's controller: {}",
            sub.controllers().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let closing = {
        let remote = remote.clone();
        tokio::spawn(async move { remote.close().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !closing.is_finished(),
        "the close waits for the acquire under way"
    );
    release.notify_one();
    held.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(5), closing)
        .await
        .expect("the close returns once the acquire was answered")
        .unwrap();
    assert!(
        !remote.is_connected(),
        "nothing was published after the close"
    );
    let t = std::time::Instant::now();
    while !sub.controllers().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "a controller stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Linux's host sends its 16-byte key buffer with every reservation command, Release and Clear included (8 bytes
/// are CRKEY, the rest unused): taken, as Linux's target takes it, and the reservation released or cleared.
#[tokio::test]
async fn a_release_or_clear_with_linux_s_sixteen_bytes_of_keys_is_carried_out() {
    use nvmf_target::protocol::command::{Sgl, Sqe, io};

    let t = crate::harness::target().await;
    let ns = t.target.subsystem(NQN).unwrap().namespace(1).unwrap();
    let (mut admin, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut admin, id).await;
    let keys = |a: u64, b: u64| {
        let mut d = a.to_le_bytes().to_vec();
        d.extend_from_slice(&b.to_le_bytes());
        Bytes::from(d)
    };
    let resv = |opcode: u8, cdw10: u32| {
        let mut sqe = Sqe::new(opcode, 1);
        sqe.set_cdw(10, cdw10);
        sqe.set_sgl(Sgl::in_capsule(16));
        sqe
    };
    let we = u32::from(resv::WRITE_EXCLUSIVE) << 8;
    for (action, what) in [(resv::RELEASE, "release"), (resv::CLEAR, "clear")] {
        let c = q
            .cmd(
                resv(io::RESERVATION_REGISTER, u32::from(resv::REGISTER)),
                keys(0, 5),
            )
            .await;
        assert!(c.status.is_success(), "register: {:?}", c.status);
        let c = q
            .cmd(
                resv(io::RESERVATION_ACQUIRE, u32::from(resv::ACQUIRE) | we),
                keys(5, 0),
            )
            .await;
        assert!(c.status.is_success(), "acquire: {:?}", c.status);
        let c = q
            .cmd(
                resv(io::RESERVATION_RELEASE, u32::from(action) | we),
                keys(5, 0),
            )
            .await;
        assert!(
            c.status.is_success(),
            "{what} with 16 bytes: {:?}",
            c.status
        );
        let st = ns.reservations.state();
        assert_eq!(st.holder, None, "{what}: still held");
        if action == resv::CLEAR {
            assert!(st.registrants.is_empty(), "clear: still registered");
        } else {
            // Unregister for the next round.
            let c = q
                .cmd(
                    resv(io::RESERVATION_REGISTER, u32::from(resv::UNREGISTER)),
                    keys(5, 0),
                )
                .await;
            assert!(c.status.is_success(), "unregister: {:?}", c.status);
        }
    }
}
