//! Healing, as Mayastor documents it (its scenario 2): nodes 1-3 with one pool each, a 2-replica volume on nodes 1
//! and 2; node 2's io-engine is killed (-9) under I/O: its child faults, the agent retires it, places a replacement
//! on node 3 (Rule 2 forbids node 1), the nexus rebuilds it, the volume is Online again, and every write made
//! before and during the failure reads back, from the volume and from the new replica. Then its scenario 3: node 2
//! back, scaled to 3, the new replica lands on node 2 and is rebuilt.

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ha_agent::cluster::failpoint as fp;
use ha_agent::cluster::store::Store;
use ha_agent::cluster::store::embedded::EmbeddedStore;
use ha_agent::cluster::volume::{self, VolumeRecord};
use nvmf_target::block::BlockDevice;
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;
use tonic::transport::Channel;

use crate::crash::{tail, until_served};
use crate::registry::{Offline, Online, agent, engine_with, free_port, three_nodes, wait_for};

const MIB: u64 = 1 << 20;
const HOST: &str = "nqn.2026-11.io.keelson:test-heal-host";

fn block(i: u64) -> Bytes {
    Bytes::from(vec![(i as u8).wrapping_mul(37) | 1; 64 << 10])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_node_is_replaced_on_the_free_node_and_rebuilt_with_every_write() {
    let (_dir, port, agent, mut engines, _nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    let v = c
        .create_volume(pb::CreateVolumeRequest {
            uuid: vol.clone(),
            size_bytes: 16 * MIB,
            replicas: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let nodes: Vec<_> = v.replica_list.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes, ["reg-1", "reg-2"], "ties go by node name");
    let p = c
        .publish_volume(pb::PublishVolumeRequest {
            uuid: vol.clone(),
            host_nqn: HOST.into(),
            node: "reg-1".into(),
            multi_host: false,
            require_known_node: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut o = ConnectOptions::new(p.target_addresses[0].parse().unwrap(), &p.nqn);
    o.hostnqn = HOST.into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    for i in 0..64 {
        ns.write((i * 128) << 10, block(i)).await.unwrap();
    }

    // Node 2 dies; the application keeps writing (no error: the nexus goes on with node 1's replica).
    engines[1].kill9();
    for i in 64..128 {
        ns.write((i * 128) << 10, block(i)).await.unwrap();
    }
    // The nexus went on without node 2's replica only once the agent had recorded it out of sync.
    assert!(
        agent.log().contains("child fault confirmed"),
        "no fault consent asked:\n{}",
        agent.log()
    );

    let t = Instant::now();
    let healed = loop {
        let v = c
            .get_volume(pb::GetVolumeRequest { uuid: vol.clone() })
            .await
            .unwrap()
            .into_inner();
        let on: Vec<_> = v.replica_list.iter().map(|r| r.node.clone()).collect();
        if v.state == "Online"
            && on.contains(&"reg-3".to_string())
            && !on.contains(&"reg-2".to_string())
        {
            break v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never healed: {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "replaced and rebuilt {:?} after the node was killed",
        t.elapsed()
    );
    assert_eq!(healed.replica_list.len(), 2);
    for i in 0..128 {
        assert_eq!(
            ns.read((i * 128) << 10, 64 << 10).await.unwrap(),
            block(i),
            "write {i}"
        );
    }
    ns.close().await;
    // The new replica holds every write too.
    let new = healed
        .replica_list
        .iter()
        .find(|r| r.node == "reg-3")
        .unwrap();
    let n3 = c
        .get_node(pb::GetNodeRequest {
            name: "reg-3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut o = ConnectOptions::new(
        n3.nvmf_listeners[0].parse().unwrap(),
        &proto::names::replica_nqn(&new.uuid),
    );
    crate::registry::as_node(&mut o, "reg-1");
    let rep = RemoteNamespace::connect(o, 1).await.unwrap();
    for i in 0..128 {
        assert_eq!(
            rep.read((i * 128) << 10, 64 << 10).await.unwrap(),
            block(i),
            "write {i} on the new replica"
        );
    }
    rep.close().await;

    // Scenario 3: node 2's pool is back (its engine restarts); scaled 2 → 3, the new replica goes to node 2 (the
    // only node without one), is rebuilt, and the volume is Online; the replica it held before was destroyed.
    engines[1].restart();
    wait_for(port, &[("reg-2", Online)], "node 2 back").await;
    c.set_volume_replicas(pb::SetVolumeReplicasRequest {
        uuid: vol.clone(),
        replicas: 3,
    })
    .await
    .unwrap();
    let t = Instant::now();
    let v = loop {
        let v = c
            .get_volume(pb::GetVolumeRequest { uuid: vol.clone() })
            .await
            .unwrap()
            .into_inner();
        let on_2 = v.replica_list.iter().find(|r| r.node == "reg-2");
        if v.state == "Online"
            && v.replica_list.len() == 3
            && on_2.is_some_and(|r| v.rebuilds.iter().any(|b| b.replica == r.uuid))
        {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "scenario 3: {v:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let n2 = c
        .get_node(pb::GetNodeRequest {
            name: "reg-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut engine2 = proto::engine::engine_client::EngineClient::connect(n2.engine_endpoint)
        .await
        .unwrap();
    let new2 = &v
        .replica_list
        .iter()
        .find(|r| r.node == "reg-2")
        .unwrap()
        .uuid;
    // The old one goes with the agent's next sweep of retired replicas, which may come after the rebuild.
    let t = Instant::now();
    loop {
        let held = engine2
            .list_replicas(proto::engine::ListReplicasRequest {})
            .await
            .unwrap()
            .into_inner()
            .replicas;
        let held: Vec<_> = held.iter().map(|r| &r.uuid).collect();
        if held == [new2] {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "node 2 holds only its new replica: {held:?}, not [{new2}]"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(engines);
}

/// Mayastor's scenario 4, on two nodes: the only other node is down, so no replacement can be placed (Rule 2): the
/// volume stays Degraded and says why; when the node is back, a replacement lands there and the volume is Online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_eligible_node_the_volume_stays_degraded_saying_why_and_heals_when_one_returns() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port("127.0.0.1");
    let mut agent = agent(dir.path(), port);
    let url = format!("http://127.0.0.1:{port}");
    let mut engines: Vec<_> = (1..=2).map(|i| engine_with(dir.path(), i, &url)).collect();
    wait_for(
        port,
        &[("reg-1", Online), ("reg-2", Online)],
        "registration",
    )
    .await;
    let mut c: ClusterClient<Channel> = ClusterClient::connect(url).await.unwrap();
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 8 * MIB,
        replicas: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let p = c
        .publish_volume(pb::PublishVolumeRequest {
            uuid: vol.clone(),
            host_nqn: HOST.into(),
            node: "reg-1".into(),
            multi_host: false,
            require_known_node: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut o = ConnectOptions::new(p.target_addresses[0].parse().unwrap(), &p.nqn);
    o.hostnqn = HOST.into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    engines[1].kill9();
    for i in 0..16 {
        ns.write((i * 128) << 10, block(i)).await.unwrap();
    }
    let get = |c: &mut ClusterClient<Channel>| {
        let c = c.clone();
        let vol = vol.clone();
        async move {
            until_served(|| {
                let mut c = c.clone();
                let uuid = vol.clone();
                async move { c.get_volume(pb::GetVolumeRequest { uuid }).await }
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let t = Instant::now();
    loop {
        let v = get(&mut c).await;
        if v.state == "Degraded" && v.reason.contains("no replacement can be placed") {
            assert!(
                v.reason.contains("reg-1 already holds a replica"),
                "{}",
                v.reason
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not degraded with a reason: {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A node that holds the volume's target (and its last replica) cannot be forgotten.
    let s = c
        .delete_node(pb::DeleteNodeRequest {
            name: "reg-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message().contains("its target (nexus) on node reg-1"),
        "{}",
        s.message()
    );
    // The agent is killed right after the nexus took the replacement as a child; with no agent, the nexus rebuilds
    // it. The record left must not still say why the volume was Degraded: GetVolume pairs it with the nexus, which
    // is whole (an agent that cleared the reason only after adding answered Online with the old reason meanwhile).
    let n1 = c
        .get_node(pb::GetNodeRequest {
            name: "reg-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    agent.set_env("FAILPOINTS", &format!("{}=return", fp::HEAL_CHILD_ADDED));
    agent.restart();
    engines[1].restart();
    let st = agent.exited(Duration::from_secs(60)).await;
    assert!(
        st.and_then(|s| s.signal()) == Some(9),
        "the agent should have died after adding the child (exit {st:?}); log:\n{}",
        tail(&agent.log())
    );
    let mut e1 = proto::engine::engine_client::EngineClient::connect(n1.engine_endpoint.clone())
        .await
        .unwrap();
    let t = Instant::now();
    loop {
        let l = e1
            .list_nexuses(proto::engine::ListNexusesRequest {})
            .await
            .unwrap()
            .into_inner();
        let nx = l.nexuses.iter().find(|n| n.uuid == vol).unwrap();
        let healthy = nx
            .children
            .iter()
            .filter(|c| c.state == proto::engine::ChildState::Healthy as i32)
            .count();
        if healthy == 2 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the replacement never rebuilt: {nx:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let store = EmbeddedStore::open(&dir.path().join("agent").join("store.redb"))
        .await
        .unwrap();
    let uuid = uuid::Uuid::parse_str(&vol).unwrap();
    let kept = store.get(&volume::key(&uuid)).await.unwrap().unwrap();
    let r = VolumeRecord::decode(&kept.value).unwrap();
    assert_eq!(r.replicas.len(), 2, "{r:#?}");
    assert!(
        r.reason.is_empty(),
        "whole, yet the record says: {}",
        r.reason
    );
    drop(store);
    agent.set_env("FAILPOINTS", "");
    agent.restart();
    let t = Instant::now();
    loop {
        let v = get(&mut c).await;
        if v.state == "Online" && v.replica_list.len() == 2 {
            assert!(v.reason.is_empty(), "{}", v.reason);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never healed after the node returned: {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..16 {
        assert_eq!(
            ns.read((i * 128) << 10, 64 << 10).await.unwrap(),
            block(i),
            "write {i}"
        );
    }
    ns.close().await;
    // The replica left on node 2 while it was down is garbage-collected: node 2 keeps only the new one.
    let v = get(&mut c).await;
    let want: Vec<String> = v
        .replica_list
        .iter()
        .filter(|r| r.node == "reg-2")
        .map(|r| r.uuid.clone())
        .collect();
    let n2 = c
        .get_node(pb::GetNodeRequest {
            name: "reg-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let t = Instant::now();
    loop {
        let mut e = proto::engine::engine_client::EngineClient::connect(n2.engine_endpoint.clone())
            .await
            .unwrap();
        let have: Vec<String> = e
            .list_replicas(proto::engine::ListReplicasRequest {})
            .await
            .unwrap()
            .into_inner()
            .replicas
            .into_iter()
            .map(|r| r.uuid)
            .collect();
        if have == want {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "node 2 keeps {have:?}, the volume has {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scaling (Mayastor's scenarios 3, 5 and 6, on healthy nodes): 2 → 3 puts the new replica on the node without one
/// and the nexus rebuilds it; 3 → 1 keeps the nexus's own; more replicas than nodes is refused with nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_adds_replicas_on_free_nodes_and_removes_those_away_from_the_nexus() {
    let (_dir, _port, _agent, _engines, _nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 8 * MIB,
        replicas: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let p = c
        .publish_volume(pb::PublishVolumeRequest {
            uuid: vol.clone(),
            host_nqn: HOST.into(),
            node: "reg-1".into(),
            multi_host: false,
            require_known_node: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut o = ConnectOptions::new(p.target_addresses[0].parse().unwrap(), &p.nqn);
    o.hostnqn = HOST.into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    for i in 0..16 {
        ns.write((i * 128) << 10, block(i)).await.unwrap();
    }
    let scale = |n: u32| pb::SetVolumeReplicasRequest {
        uuid: vol.clone(),
        replicas: n,
    };
    let settled = |c: &mut ClusterClient<Channel>, n: usize| {
        let mut c = c.clone();
        let vol = vol.clone();
        async move {
            let t = Instant::now();
            loop {
                let v = c
                    .get_volume(pb::GetVolumeRequest { uuid: vol.clone() })
                    .await
                    .unwrap()
                    .into_inner();
                if v.state == "Online"
                    && v.replica_list.len() == n
                    && v.replica_list.iter().all(|r| r.created)
                {
                    return v;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "never settled at {n}: {v:#?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    c.set_volume_replicas(scale(3)).await.unwrap();
    let v = settled(&mut c, 3).await;
    let mut on: Vec<_> = v.replica_list.iter().map(|r| r.node.clone()).collect();
    on.sort();
    assert_eq!(on, ["reg-1", "reg-2", "reg-3"]);

    let e = c.set_volume_replicas(scale(4)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert_eq!(
        c.set_volume_replicas(scale(0)).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    c.set_volume_replicas(scale(1)).await.unwrap();
    let v = settled(&mut c, 1).await;
    assert_eq!(v.replicas, 1);
    assert_eq!(
        v.replica_list[0].node, "reg-1",
        "the nexus's own replica stays"
    );
    for i in 0..16 {
        assert_eq!(
            ns.read((i * 128) << 10, 64 << 10).await.unwrap(),
            block(i),
            "write {i}"
        );
    }
    ns.close().await;
}

/// The nexus's own node dies: publishing again (as the node agent will) makes a new nexus on a live node from the
/// replicas whose nodes are up, fencing the dead one's key; healing retires the replica on the dead node and puts
/// a new one on the free node; every acknowledged write reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_nexus_node_dies_a_new_publish_moves_the_nexus_and_healing_follows() {
    let (_dir, _port, _agent, mut engines, _nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 8 * MIB,
        replicas: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let publish = |node: &str| pb::PublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: HOST.into(),
        node: node.into(),
        multi_host: false,
        require_known_node: false,
    };
    let p = c
        .publish_volume(publish("reg-1"))
        .await
        .unwrap()
        .into_inner();
    let connect = |p: &pb::Volume| {
        let mut o = ConnectOptions::new(p.target_addresses[0].parse().unwrap(), &p.nqn);
        o.hostnqn = HOST.into();
        RemoteNamespace::connect(o, 1)
    };
    let ns = connect(&p).await.unwrap();
    for i in 0..16 {
        ns.write((i * 128) << 10, block(i)).await.unwrap();
    }
    drop(ns);
    engines[0].kill9();

    let t = Instant::now();
    let p = loop {
        match c.publish_volume(publish("reg-2")).await {
            Ok(r) => break r.into_inner(),
            Err(e) => assert!(
                t.elapsed() < Duration::from_secs(30),
                "never published again: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "published on {} {:?} after the nexus node died",
        p.nexus_node,
        t.elapsed()
    );
    assert_eq!(p.nexus_node, "reg-2");
    let ns = connect(&p).await.unwrap();
    for i in 0..16 {
        assert_eq!(
            ns.read((i * 128) << 10, 64 << 10).await.unwrap(),
            block(i),
            "write {i}"
        );
    }
    let t = Instant::now();
    loop {
        let v = c
            .get_volume(pb::GetVolumeRequest { uuid: vol.clone() })
            .await
            .unwrap()
            .into_inner();
        let mut on: Vec<_> = v.replica_list.iter().map(|r| r.node.clone()).collect();
        on.sort();
        if v.state == "Online" && on == ["reg-2", "reg-3"] {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never healed: {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ns.write(0, block(99)).await.unwrap();
    assert_eq!(ns.read(0, 64 << 10).await.unwrap(), block(99));
    ns.close().await;
}

/// Draining a node moves the nexuses off it, each shut down cleanly first (so nothing is resynced), to a node of
/// one of the volume's replicas; the node says Draining, then Drained; uncordoning ends the drain. The agent is
/// killed once the old nexus ended, before the new one is made: the next agent knows that end was clean (it
/// resynced every replica, the engine of the old nexus still running, so it could not tell).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_moves_its_nexuses_off_without_a_resync() {
    let (_dir, _port, mut agent, _engines, _nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 8 * MIB,
        replicas: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let p = c
        .publish_volume(pb::PublishVolumeRequest {
            uuid: vol.clone(),
            host_nqn: HOST.into(),
            node: "reg-1".into(),
            multi_host: false,
            require_known_node: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.nexus_node, "reg-1");
    let mut o = ConnectOptions::new(p.target_addresses[0].parse().unwrap(), &p.nqn);
    o.hostnqn = HOST.into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    for i in 0..16 {
        ns.write((i * 128) << 10, block(i)).await.unwrap();
    }
    ns.close().await;

    agent.set_env("FAILPOINTS", &format!("{}=return", fp::DRAIN_OLD_ENDED));
    agent.restart();
    let n = until_served(|| {
        let mut c = c.clone();
        async move {
            c.drain_node(pb::CordonNodeRequest {
                name: "reg-1".into(),
            })
            .await
        }
    })
    .await
    .unwrap()
    .into_inner();
    assert!(n.cordoned);
    assert_eq!(n.drain_state, "Draining");
    let st = agent.exited(Duration::from_secs(30)).await;
    assert!(
        st.and_then(|s| s.signal()) == Some(9),
        "the agent should have died moving the nexus: {st:?}\n{}",
        tail(&agent.log())
    );
    agent.set_env("FAILPOINTS", "");
    agent.restart();
    let t = Instant::now();
    let v = loop {
        let Ok(v) = c
            .get_volume(pb::GetVolumeRequest { uuid: vol.clone() })
            .await
        else {
            assert!(t.elapsed() < Duration::from_secs(30), "never served again");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let v = v.into_inner();
        if v.nexus_node != "reg-1" && !v.nqn.is_empty() && v.state == "Online" {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never moved: {v:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v.nexus_node, "reg-2", "to the other replica's node");
    assert!(v.rebuilds.is_empty(), "no resync: {:?}", v.rebuilds);
    let n = c
        .get_node(pb::GetNodeRequest {
            name: "reg-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.drain_state, "Drained");
    let mut o = ConnectOptions::new(v.target_addresses[0].parse().unwrap(), &v.nqn);
    o.hostnqn = HOST.into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    for i in 0..16 {
        assert_eq!(
            ns.read((i * 128) << 10, 64 << 10).await.unwrap(),
            block(i),
            "write {i}"
        );
    }
    ns.close().await;
    let n = c
        .uncordon_node(pb::CordonNodeRequest {
            name: "reg-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((n.cordoned, n.drain_state.as_str()), (false, ""));
}

/// The nexus's node is frozen (SIGSTOP: a partition, not a death); publishing again moves the nexus to a live node
/// with a key that fences the old one. When the node thaws, the old nexus is found there, no record names it, and
/// it is destroyed; the volume goes on on the new nexus with every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nexus_left_behind_on_a_frozen_node_is_destroyed_when_it_thaws() {
    let (_dir, port, _agent, engines, nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 8 * MIB,
        replicas: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let publish = |node: &str| pb::PublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: HOST.into(),
        node: node.into(),
        multi_host: false,
        require_known_node: false,
    };
    let p = c
        .publish_volume(publish("reg-3"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.nexus_node, "reg-3");
    engines[2].signal("-STOP");
    wait_for(port, &[("reg-3", Offline)], "reg-3 frozen").await;
    let p = c
        .publish_volume(publish("reg-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.nexus_node, "reg-1");
    let mut o = ConnectOptions::new(p.target_addresses[0].parse().unwrap(), &p.nqn);
    o.hostnqn = HOST.into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    ns.write(0, block(1)).await.unwrap();

    engines[2].signal("-CONT");
    wait_for(port, &[("reg-3", Online)], "reg-3 thawed").await;
    crate::registry::until_no_nexus(&nodes, "reg-3").await;
    ns.write(64 << 10, block(2)).await.unwrap();
    assert_eq!(ns.read(0, 64 << 10).await.unwrap(), block(1));
    assert_eq!(ns.read(64 << 10, 64 << 10).await.unwrap(), block(2));
    ns.close().await;
    drop(engines);
}

/// A nexus's question before it goes on without a child holds that volume's writes until the agent answers, and
/// the agent answers under the volume's lock. A heal pass over a node claims all of the node's volumes before it
/// lists the node's nexuses; it lets those not healed yet go after a second, so the question waits for one
/// volume's heal, not for the whole pass. Each heal is slowed to 3 s here (a failpoint, as engines slow to answer
/// slow it); before, a question for the last of four volumes waited for all four heals (about 12 s, with the
/// writes held: long enough, with more volumes, for the host's I/O timeout to reset its path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_question_waits_for_one_volumes_heal_not_for_a_pass_over_the_node() {
    let (_dir, _port, mut agent, _engines, nodes, mut c) = three_nodes().await;
    let mut vols = Vec::new();
    for _ in 0..4 {
        let vol = uuid::Uuid::new_v4().to_string();
        c.create_volume(pb::CreateVolumeRequest {
            uuid: vol.clone(),
            size_bytes: 4 * MIB,
            replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
        vols.push(vol);
    }
    // Passes go through a node's volumes in the order of their UUIDs: the last is healed last.
    vols.sort();
    let mut last = None;
    for vol in &vols {
        last = Some(crate::switchover::publish_to(&mut c, vol.clone(), "reg-1").await);
    }
    let last = last.unwrap();
    assert_eq!(last.nexus_node, "reg-1", "{last:#?}");
    let ns = crate::switchover::connect(&last).await;
    crate::switchover::write_all(&ns, 0..4).await;

    agent.set_env(
        "FAILPOINTS",
        &format!(
            "{}=return(3000)",
            ha_agent::cluster::failpoint::HEAL_NODE_VOLUME
        ),
    );
    agent.restart();
    let t = Instant::now();
    while !agent.log().contains("failpoint heal.node-volume: waiting") {
        assert!(t.elapsed() < Duration::from_secs(60), "no heal pass began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A pass over reg-1 holds every volume; reg-3's disk now fails every write.
    let n3 = nodes.iter().find(|n| n.name == "reg-3").unwrap();
    proto::engine::engine_client::EngineClient::connect(n3.engine_endpoint.clone())
        .await
        .unwrap()
        .inject_fault(proto::engine::InjectFaultRequest {
            pool: "pool3".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let t = Instant::now();
    crate::switchover::write_all(&ns, 4..8).await;
    let held = t.elapsed();
    println!("a write that faulted a child waited {held:?} for the agent's consent");
    // One heal (3 s) and the pass's hold (1 s), with room for a loaded machine; behind every heal of the pass it was
    // about 12 s.
    assert!(
        held < Duration::from_secs(9),
        "the consent waited {held:?}, behind the pass's other heals"
    );
    crate::switchover::verify(&ns, 0..8).await;
}
