//! What the cluster agent must never give up, with real io-engines: the replica that has every write (a publish
//! that fails marks nothing out of sync, a scale-down keeps the replicas in sync, a snapshot copies only them), and
//! the volume itself after a nexus whose creation the agent never saw confirmed (the next nexus preempts its key).

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use ha_agent::cluster::failpoint as fp;
use nvmf_target::block::BlockDevice;
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;
use proto::engine as epb;
use proto::engine::engine_client::EngineClient;
use tonic::transport::Channel;

use crate::crash::{HOST, block, create, publish, scale, until_served, write_through};
use crate::registry::{Offline, Online, three_nodes, wait_for};

async fn get(c: &ClusterClient<Channel>, uuid: &str) -> pb::Volume {
    until_served(|| {
        let mut c = c.clone();
        let uuid = uuid.to_string();
        async move { c.get_volume(pb::GetVolumeRequest { uuid }).await }
    })
    .await
    .unwrap()
    .into_inner()
}

/// Waits (60 s at most) until the volume satisfies `done`.
async fn until(
    c: &ClusterClient<Channel>,
    uuid: &str,
    what: &str,
    done: impl Fn(&pb::Volume) -> bool,
) -> pb::Volume {
    let t = Instant::now();
    loop {
        let v = get(c, uuid).await;
        if done(&v) {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what}: never: {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn publish_on(
    c: &ClusterClient<Channel>,
    uuid: &str,
    node: &str,
) -> Result<pb::Volume, tonic::Status> {
    until_served(|| {
        let mut c = c.clone();
        let (uuid, node) = (uuid.to_string(), node.to_string());
        async move {
            c.publish_volume(pb::PublishVolumeRequest {
                uuid,
                host_nqn: HOST.into(),
                node,
                multi_host: false,
                require_known_node: false,
            })
            .await
            .map(|r| r.into_inner())
        }
    })
    .await
}

async fn unpublish(c: &ClusterClient<Channel>, uuid: &str) {
    until_served(|| {
        let mut c = c.clone();
        let uuid = uuid.to_string();
        async move {
            c.unpublish_volume(pb::UnpublishVolumeRequest {
                uuid,
                host_nqn: String::new(),
            })
            .await
        }
    })
    .await
    .unwrap();
}

/// The block [`write_through`] wrote with `seed` reads back through the published volume `v`.
async fn reads_back(v: &pb::Volume, seed: u8) {
    let mut o = ConnectOptions::new(v.target_addresses[0].parse().unwrap(), &v.nqn);
    o.hostnqn = HOST.into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    let at = u64::from(seed) * (64 << 10);
    // Reads go round the children: as many reads as replicas look at each.
    for _ in 0..v.replica_list.len().max(1) {
        assert_eq!(ns.read(at, 64 << 10).await.unwrap(), block(seed));
    }
    ns.close().await;
}

/// The agent's consent to fault replica `replica`'s child, asked as the volume's first nexus (key 1, on `node`)
/// asks it, whatever that nexus does.
async fn consent(port: u16, node: &str, vol: &str, replica: &str) {
    let mut reg = proto::cluster::registration_client::RegistrationClient::connect(format!(
        "http://127.0.0.1:{port}"
    ))
    .await
    .unwrap();
    reg.confirm_child_fault(pb::ConfirmChildFaultRequest {
        node: node.to_string(),
        volume: vol.to_string(),
        key: 1,
        child: format!("nvmf://127.0.0.9:1/nqn.2026-11.io.keelson:replica-{replica}"),
        reason: "test".into(),
    })
    .await
    .unwrap();
}

fn index(node: &str) -> usize {
    node.strip_prefix("reg-").unwrap().parse::<usize>().unwrap() - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_finds_no_in_sync_replica_up_marks_nothing_and_succeeds_once_it_returns() {
    let (_dir, port, _agent, mut engines, _nodes, c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    create(c.clone(), &vol, 1).await.unwrap();
    let v = until(&c, &vol, "created", |v| {
        v.replica_list.iter().all(|r| r.created)
    })
    .await;
    let holder = v.replica_list[0].node.clone();
    let other = ["reg-1", "reg-2", "reg-3"]
        .into_iter()
        .find(|n| *n != holder)
        .unwrap();
    let v = publish_on(&c, &vol, other).await.unwrap();
    write_through(&v, 1).await;
    unpublish(&c, &vol).await;

    // The only replica's node is down: a publish elsewhere has nothing to make a nexus of, and must not record the
    // replica as missing writes (it has them all).
    engines[index(&holder)].kill9();
    wait_for(port, &[(holder.as_str(), Offline)], "replica node down").await;
    let refused = publish_on(&c, &vol, other).await;
    assert!(refused.is_err(), "{refused:?}");
    let v = get(&c, &vol).await;
    assert!(v.replica_list.iter().all(|r| r.in_sync), "{v:#?}");

    // It returns: the volume is published, with the data written before.
    engines[index(&holder)].restart();
    wait_for(port, &[(holder.as_str(), Online)], "replica node back").await;
    let t = Instant::now();
    let v = loop {
        match publish_on(&c, &vol, other).await {
            Ok(v) if !v.target_addresses.is_empty() => break v,
            r => {
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "never published again: {r:?}\n{:#?}",
                    get(&c, &vol).await
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    reads_back(&v, 1).await;
}

/// The nexus's last healthy child faults (its replica's node dies under a write): nothing is left to rebuild it
/// from, and its replica is the only copy of the volume. It is kept, in sync, while its node is away; once the node
/// is back the nexus is made again from it, with the data. Before, healing retired the faulted child like any other:
/// the only replica was given up and destroyed when its node came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nexus_whose_last_child_faults_keeps_that_replica_and_is_made_again_from_it() {
    let (_dir, port, mut agent, mut engines, _nodes, c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    create(c.clone(), &vol, 1).await.unwrap();
    let v = until(&c, &vol, "created", |v| {
        v.replica_list.iter().all(|r| r.created)
    })
    .await;
    let only = v.replica_list[0].clone();
    let other = ["reg-1", "reg-2", "reg-3"]
        .into_iter()
        .find(|n| *n != only.node)
        .unwrap();
    let v = publish_on(&c, &vol, other).await.unwrap();
    write_through(&v, 1).await;

    // The replica's node dies; a write through the nexus fails on its only child.
    engines[index(&only.node)].kill9();
    let mut o = ConnectOptions::new(v.target_addresses[0].parse().unwrap(), &v.nqn);
    o.hostnqn = HOST.into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(30), ns.write(0, block(9))).await;
    assert!(
        !matches!(failed, Ok(Ok(()))),
        "a write with no child left succeeded"
    );
    ns.close().await;
    until(&c, &vol, "the volume is Faulted", |v| v.state == "Faulted").await;
    wait_for(port, &[(only.node.as_str(), Offline)], "replica node down").await;
    // Sweeps pass over it while the node is away: the replica stays, in sync.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = get(&c, &vol).await;
    assert_eq!(v.replica_list.len(), 1, "{v:#?}");
    assert_eq!(v.replica_list[0].uuid, only.uuid, "{v:#?}");
    assert!(v.replica_list[0].in_sync, "{v:#?}");

    // The node is back: the nexus is made again from the replica, with what was written. The agent is killed
    // once that restart is recorded, before it ends the old nexus: the next agent finishes it at once (it waited
    // ten minutes, the volume Faulted, the restart's stamp taken for a restart just done).
    agent.set_env(
        "FAILPOINTS",
        &format!("{}=return", fp::HEAL_RESTART_RECORDED),
    );
    agent.restart();
    engines[index(&only.node)].restart();
    let st = agent.exited(Duration::from_secs(60)).await;
    assert!(
        st.and_then(|s| s.signal()) == Some(9),
        "the agent should have died restarting the nexus: {st:?}"
    );
    agent.set_env("FAILPOINTS", "");
    agent.restart();
    wait_for(port, &[(only.node.as_str(), Online)], "replica node back").await;
    let v = until(&c, &vol, "Online again from its replica", |v| {
        v.state == "Online"
            && !v.target_addresses.is_empty()
            && v.replica_list.len() == 1
            && v.replica_list[0].uuid == only.uuid
    })
    .await;
    reads_back(&v, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpublished_volume_snapshots_and_scales_down_to_its_in_sync_replicas_only() {
    let (_dir, _port, _agent, _engines, _nodes, c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    create(c.clone(), &vol, 2).await.unwrap();
    let v = publish(c.clone(), &vol).await.unwrap();
    write_through(&v, 1).await;
    let synced: Vec<String> = v.replica_list.iter().map(|r| r.uuid.clone()).collect();
    unpublish(&c, &vol).await;

    // A third replica placed while unpublished is empty until a nexus rebuilds it.
    scale(c.clone(), &vol, 3).await.unwrap();
    let v = until(&c, &vol, "scaled up", |v| {
        v.replica_list.len() == 3 && v.replica_list.iter().all(|r| r.created)
    })
    .await;
    let empty = v
        .replica_list
        .iter()
        .find(|r| !synced.contains(&r.uuid))
        .unwrap()
        .clone();

    // A snapshot has copies of the in-sync replicas only: a clone of the empty one would be served as the data.
    let snap = uuid::Uuid::new_v4().to_string();
    let s = c
        .clone()
        .create_snapshot(pb::CreateSnapshotRequest {
            volume: vol.clone(),
            uuid: snap.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.ready, "{s:?}");
    assert_eq!(s.nodes.len(), 2, "{s:?}");
    assert!(
        !s.nodes.contains(&empty.node),
        "a copy of the empty replica: {s:?}"
    );
    let e = c
        .clone()
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .find(|n| n.name == empty.node)
        .unwrap();
    let held = EngineClient::connect(e.engine_endpoint)
        .await
        .unwrap()
        .list_snapshots(epb::ListSnapshotsRequest {})
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert!(held.iter().all(|x| x.uuid != snap), "{held:?}");
    c.clone()
        .delete_snapshot(pb::DeleteSnapshotRequest { uuid: snap })
        .await
        .unwrap();

    // Scaled down to one: the one kept has the data (the empty one goes first, whatever its node's name).
    scale(c.clone(), &vol, 1).await.unwrap();
    let v = until(&c, &vol, "scaled down", |v| v.replica_list.len() == 1).await;
    assert!(
        synced.contains(&v.replica_list[0].uuid),
        "kept {:?}, in sync were {synced:?}",
        v.replica_list
    );
    let v = publish(c.clone(), &vol).await.unwrap();
    reads_back(&v, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nexus_made_but_never_confirmed_is_preempted_by_the_next_one_on_another_node() {
    let (_dir, port, mut agent, mut engines, _nodes, c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    create(c.clone(), &vol, 2).await.unwrap();
    let v = until(&c, &vol, "created", |v| {
        v.replica_list.iter().all(|r| r.created)
    })
    .await;
    let first = v.replica_list[0].node.clone();
    // The agent dies right after the engine made the nexus (its key now holds both replicas), before it saved
    // that the key was taken.
    agent.set_env(
        "FAILPOINTS",
        &format!("{}=return", fp::PUBLISH_NEXUS_CREATED),
    );
    agent.restart();
    let r = publish_on(&c, &vol, &first).await;
    assert!(r.is_err(), "{r:?}");
    assert!(
        agent.exited(Duration::from_secs(20)).await.is_some(),
        "the agent should have died there"
    );
    // Its node goes down before any agent runs again.
    engines[index(&first)].kill9();
    agent.set_env("FAILPOINTS", "");
    agent.restart();
    wait_for(port, &[(first.as_str(), Offline)], "nexus node down").await;
    // The volume is published on the other replica's node: its nexus preempted the unconfirmed key.
    let t = Instant::now();
    let v = loop {
        match publish(c.clone(), &vol).await {
            Ok(v) if !v.target_addresses.is_empty() && v.nexus_node != first => break v,
            r => {
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "never published elsewhere: {r:?}\n{}",
                    crate::crash::tail(&agent.log())
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    write_through(&v, 2).await;
}

/// A fault the agent consents to reaches the nexus only with the answer: a heal that lists the nexus in between
/// (the child still healthy there) must not count the child in sync again, or a later nexus could be made of a
/// replica that missed writes. Here the answer never reaches the nexus at all (asked through the API), so the
/// child stays healthy in every listing: the replica stays out of sync. Before, the next sweep undid the fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_fault_is_not_undone_by_a_listing_from_before_the_nexus_applied_it() {
    let (_dir, port, _agent, _engines, _nodes, c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    create(c.clone(), &vol, 2).await.unwrap();
    let v = until(&c, &vol, "created", |v| {
        v.replica_list.iter().all(|r| r.created)
    })
    .await;
    let (a, b) = (v.replica_list[0].clone(), v.replica_list[1].clone());
    let v = publish_on(&c, &vol, &a.node).await.unwrap();
    write_through(&v, 1).await;
    // The volume's first nexus has key 1.
    consent(port, &a.node, &vol, &b.uuid).await;
    let in_sync = |v: &pb::Volume| {
        v.replica_list
            .iter()
            .find(|r| r.uuid == b.uuid)
            .unwrap()
            .in_sync
    };
    let v = get(&c, &vol).await;
    assert!(!in_sync(&v), "{v:#?}");
    // Sweeps (every 500 ms here) list the nexus, where the child is still healthy.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = get(&c, &vol).await;
    assert!(
        !in_sync(&v),
        "a listing from before the fault counted the replica in sync again: {v:#?}"
    );
}

/// A fault the agent consented to for one nexus (the replica recorded out of sync until that nexus shows it
/// applied) must not outlive it: the next nexus, made without the replica, rebuilds it, and once that nexus shows
/// it Healthy it is in sync again (else it would never count, and a volume losing its other copy later could not
/// be served from it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_faulted_with_consent_for_an_earlier_nexus_is_in_sync_again_once_the_next_one_rebuilt_it()
 {
    let (_dir, port, _agent, _engines, _nodes, c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    create(c.clone(), &vol, 2).await.unwrap();
    let v = until(&c, &vol, "created", |v| {
        v.replica_list.iter().all(|r| r.created)
    })
    .await;
    let (a, b) = (v.replica_list[0].clone(), v.replica_list[1].clone());
    let v = publish_on(&c, &vol, &a.node).await.unwrap();
    write_through(&v, 1).await;
    // The first nexus (key 1) asks to fault b's child, and goes away before it applies the fault.
    consent(port, &a.node, &vol, &b.uuid).await;
    let in_sync = |v: &pb::Volume| {
        v.replica_list
            .iter()
            .find(|r| r.uuid == b.uuid)
            .unwrap()
            .in_sync
    };
    assert!(!in_sync(&get(&c, &vol).await));
    unpublish(&c, &vol).await;
    // The next nexus is made of a alone; healing adds b, which it rebuilds (one block: done at once).
    let v = publish_on(&c, &vol, &a.node).await.unwrap();
    until(
        &c,
        &vol,
        "b rebuilt by the new nexus and counted in sync",
        in_sync,
    )
    .await;
    reads_back(&v, 1).await;
}

/// A scale-down right after the agent consented to fault a replica (the nexus has not applied it yet, so it still
/// lists the child healthy) retires that replica, not one in sync: the listing is from before the fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_down_retires_the_replica_faulted_with_consent_though_the_nexus_still_lists_it_healthy()
 {
    let (_dir, port, _agent, _engines, _nodes, c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    create(c.clone(), &vol, 3).await.unwrap();
    let v = until(&c, &vol, "created", |v| {
        v.replica_list.iter().all(|r| r.created)
    })
    .await;
    let on = v.replica_list[0].clone();
    let v = publish_on(&c, &vol, &on.node).await.unwrap();
    write_through(&v, 1).await;
    // Of the two replicas away from the nexus, the records' tie-break would retire the first by node name: the
    // fault goes to the other.
    let mut away: Vec<pb::VolumeReplica> = v
        .replica_list
        .iter()
        .filter(|r| r.node != on.node)
        .cloned()
        .collect();
    away.sort_by(|a, b| a.node.cmp(&b.node));
    let (kept, faulted) = (away[0].clone(), away[1].clone());
    consent(port, &on.node, &vol, &faulted.uuid).await;
    scale(c.clone(), &vol, 2).await.unwrap();
    let v = get(&c, &vol).await;
    let mut left: Vec<String> = v.replica_list.iter().map(|r| r.uuid.clone()).collect();
    left.sort();
    let mut want = vec![on.uuid.clone(), kept.uuid.clone()];
    want.sort();
    assert_eq!(left, want, "the replica missing writes goes: {v:#?}");
    reads_back(&v, 1).await;
}

/// The agent asked to fault a child while another replica is not in sync on record (added by a scale-up, its
/// rebuild's end not seen yet) cannot tell, without the nexus's listing, whether that replica goes on in sync: it
/// gives no answer yet (UNAVAILABLE: the engine asks again, the write waits), and consents once the listing comes.
/// Before, it consented at once: the faulted replica and the new one were both out of sync on record, the nexus's
/// replica the only one in sync, and a volume losing that node could not be made again from the new one that held
/// every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_consent_while_the_nexus_cannot_say_which_children_go_on_in_sync() {
    let (_dir, port, _agent, engines, _nodes, c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    create(c.clone(), &vol, 2).await.unwrap();
    let v = until(&c, &vol, "created", |v| {
        v.replica_list.iter().all(|r| r.created)
    })
    .await;
    let (a, b) = (v.replica_list[0].clone(), v.replica_list[1].clone());
    let v = publish_on(&c, &vol, &a.node).await.unwrap();
    write_through(&v, 1).await;
    // The nexus's engine freezes (its API does not answer) as a third replica is added.
    engines[index(&a.node)].signal("-STOP");
    let _ = tokio::time::timeout(Duration::from_secs(5), scale(c.clone(), &vol, 3)).await;
    let v = get(&c, &vol).await;
    let added: Vec<_> = v
        .replica_list
        .iter()
        .filter(|r| r.uuid != a.uuid && r.uuid != b.uuid)
        .collect();
    assert!(
        added.len() == 1 && !added[0].in_sync,
        "a third replica, not in sync: {v:#?}"
    );
    let mut reg = proto::cluster::registration_client::RegistrationClient::connect(format!(
        "http://127.0.0.1:{port}"
    ))
    .await
    .unwrap();
    let ask = pb::ConfirmChildFaultRequest {
        node: a.node.clone(),
        volume: vol.clone(),
        key: 1,
        child: format!(
            "nvmf://127.0.0.9:1/nqn.2026-11.io.keelson:replica-{}",
            b.uuid
        ),
        reason: "test".into(),
    };
    let refused = reg.confirm_child_fault(ask.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let v = get(&c, &vol).await;
    assert!(
        v.replica_list.iter().any(|r| r.uuid == b.uuid && r.in_sync),
        "nothing recorded without an answer: {v:#?}"
    );
    engines[index(&a.node)].signal("-CONT");
    let t = Instant::now();
    while let Err(e) = reg.confirm_child_fault(ask.clone()).await {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "never confirmed: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
