//! Nexus restart, as Mayastor documents it and better: the io-engine hosting a published volume's nexus goes away
//! and comes back, and the agent makes the nexus again on it by itself. After a *clean* end (SIGTERM: the engine
//! shuts its nexuses down, then deregisters) every replica comes back as it was, nothing rebuilt; after an
//! *unclean* one (kill -9: writes may have been in flight) the replica on the nexus's node stays and the others are
//! rebuilt from it in full, and the volume reports those rebuilds. Every acknowledged write reads back, from the
//! volume and from each replica.

use std::time::{Duration, Instant};

use bytes::Bytes;
use nvmf_target::block::BlockDevice;
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;
use tonic::transport::Channel;

use crate::registry::three_nodes;

const MIB: u64 = 1 << 20;
const HOST: &str = "nqn.2026-11.io.keelson:test-restart-host";
const BLOCKS: u64 = 32;

fn block(round: u8, i: u64) -> Bytes {
    Bytes::from(vec![
        round.wrapping_mul(101) ^ (i as u8).wrapping_mul(37) | 1;
        64 << 10
    ])
}

async fn connect(v: &pb::Volume) -> RemoteNamespace {
    let mut o = ConnectOptions::new(v.target_addresses[0].parse().unwrap(), &v.nqn);
    o.hostnqn = HOST.into();
    RemoteNamespace::connect(o, 1).await.unwrap()
}

async fn get(c: &mut ClusterClient<Channel>, vol: &str) -> pb::Volume {
    c.get_volume(pb::GetVolumeRequest { uuid: vol.into() })
        .await
        .unwrap()
        .into_inner()
}

/// A new 40 MiB volume with three replicas; its uuid.
async fn three_replica_volume(c: &mut ClusterClient<Channel>) -> String {
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 40 * MIB,
        replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    vol
}

/// Waits until the volume is published again, Online, every replica a healthy child.
async fn until_recomposed(c: &mut ClusterClient<Channel>, vol: &str) -> pb::Volume {
    let t = Instant::now();
    loop {
        let v = get(c, vol).await;
        if v.state == "Online"
            && !v.nqn.is_empty()
            && v.replica_list.iter().all(|r| r.state == "healthy")
        {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never recomposed: {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every write of `round` reads back from the volume and from each replica on another node.
async fn verify(c: &mut ClusterClient<Channel>, v: &pb::Volume, round: u8) {
    let ns = connect(v).await;
    for i in 0..BLOCKS {
        assert_eq!(
            ns.read(i * MIB, 64 << 10).await.unwrap(),
            block(round, i),
            "block {i}"
        );
    }
    ns.close().await;
    for r in v.replica_list.iter().filter(|r| r.node != v.nexus_node) {
        let n = c
            .get_node(pb::GetNodeRequest {
                name: r.node.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut o = ConnectOptions::new(
            n.nvmf_listeners[0].parse().unwrap(),
            &proto::names::replica_nqn(&r.uuid),
        );
        crate::registry::as_node(&mut o, &v.nexus_node);
        let rep = RemoteNamespace::connect(o, 1).await.unwrap();
        for i in 0..BLOCKS {
            assert_eq!(
                rep.read(i * MIB, 64 << 10).await.unwrap(),
                block(round, i),
                "block {i} on replica {} ({})",
                r.uuid,
                r.node
            );
        }
        rep.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nexus_engine_restarting_cleanly_or_not_gets_its_nexus_back_resynced_only_after_a_kill()
{
    let (_dir, _port, _agent, mut engines, _nodes, mut c) = three_nodes().await;
    let vol = three_replica_volume(&mut c).await;
    let v = c
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
    assert_eq!(v.nexus_node, "reg-1");

    // Clean: SIGTERM, restart. The same three replicas come back as children; nothing is rebuilt.
    let ns = connect(&v).await;
    for i in 0..BLOCKS {
        ns.write(i * MIB, block(1, i)).await.unwrap();
    }
    ns.close().await;
    engines[0].stop();
    engines[0].restart();
    let t = Instant::now();
    let v = until_recomposed(&mut c, &vol).await;
    println!(
        "clean restart: nexus back {:?} after the engine restarted",
        t.elapsed()
    );
    assert_eq!(v.nexus_node, "reg-1");
    assert!(
        v.rebuilds.is_empty(),
        "a clean end needs no rebuild: {:?}",
        v.rebuilds
    );
    verify(&mut c, &v, 1).await;

    // Unclean: kill -9 under writes, restart. The replica on reg-1 stays; the other two are rebuilt from it in
    // full, and the volume says so.
    killed_under_writes_is_resynced(&mut c, &mut engines[0], &v, 2).await;
    drop(engines);
}

/// The engine hosting `v`'s nexus (on reg-1, `engine`) is killed under writes of `round` and restarted: the nexus
/// comes back with the replica on reg-1 kept and the others rebuilt from it in full, and every write reads back.
async fn killed_under_writes_is_resynced(
    c: &mut ClusterClient<Channel>,
    engine: &mut crate::registry::Proc,
    v: &pb::Volume,
    round: u8,
) {
    let vol = v.uuid.clone();
    let ns = connect(v).await;
    for i in 0..BLOCKS {
        ns.write(i * MIB, block(round, i)).await.unwrap();
    }
    engine.kill9();
    drop(ns);
    engine.restart();
    let t = Instant::now();
    let v = until_recomposed(c, &vol).await;
    println!(
        "unclean restart: nexus back and resynced {:?} after the engine restarted; rebuilds {:?}",
        t.elapsed(),
        v.rebuilds
    );
    let local = v
        .replica_list
        .iter()
        .find(|r| r.node == "reg-1")
        .unwrap()
        .uuid
        .clone();
    let mut rebuilt: Vec<_> = v
        .rebuilds
        .iter()
        .map(|b| (b.replica.clone(), b.kind.as_str(), b.error.as_str()))
        .collect();
    rebuilt.sort();
    let mut others: Vec<_> = v
        .replica_list
        .iter()
        .filter(|r| r.uuid != local)
        .map(|r| (r.uuid.clone(), "full", ""))
        .collect();
    others.sort();
    assert_eq!(rebuilt, others, "every replica but reg-1's rebuilt in full");
    assert!(
        v.rebuilds
            .iter()
            .all(|b| b.bytes_copied + b.bytes_skipped == b.bytes_total && b.bytes_total == 40 * MIB),
        "{:?}",
        v.rebuilds
    );
    verify(c, &v, round).await;
}

/// A publish that began while one engine instance ran on the nexus's node and made its nexus on the next one (the
/// engine restarted cleanly in between) records the instance that made it: that one's kill -9 later is an unclean
/// end, and the replicas are resynced. Before, the nexus kept the first instance, whose clean exit passed for the
/// killed one's: no resync, and replicas that a write in flight reached only some of stayed different.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nexus_made_by_a_restarted_engine_mid_publish_is_resynced_after_that_engines_kill() {
    let (_dir, port, mut agent, mut engines, _nodes, mut c) = three_nodes().await;
    let vol = three_replica_volume(&mut c).await;
    // The publish waits, its replicas shared, before it asks reg-1's engine for the nexus.
    agent.set_env(
        "FAILPOINTS",
        &format!(
            "{}=1*return(8000)",
            ha_agent::cluster::failpoint::PUBLISH_CREATING
        ),
    );
    agent.restart();
    let publishing = {
        let c = c.clone();
        let vol = vol.clone();
        tokio::spawn(crate::crash::until_served(move || {
            let mut c = c.clone();
            let vol = vol.clone();
            async move {
                c.publish_volume(pb::PublishVolumeRequest {
                    uuid: vol,
                    host_nqn: HOST.into(),
                    node: "reg-1".into(),
                    multi_host: false,
                    require_known_node: false,
                })
                .await
            }
        }))
    };
    let t = Instant::now();
    while !agent.log().contains("failpoint publish.creating: waiting") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the publish never reached the failpoint:\n{}",
            crate::crash::tail(&agent.log())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engines[0].stop();
    engines[0].restart();
    crate::registry::wait_for(port, &[("reg-1", pb::NodeState::Online)], "restart").await;
    // Finished by this call or, if the new engine had not imported its pool yet, by healing.
    let first = publishing.await.unwrap();
    println!(
        "the publish across the restart: {:?}",
        first.map(|v| v.into_inner().nexus_node)
    );
    let v = until_recomposed(&mut c, &vol).await;
    assert_eq!(v.nexus_node, "reg-1", "{v:#?}");
    assert!(v.rebuilds.is_empty(), "{:?}", v.rebuilds);

    killed_under_writes_is_resynced(&mut c, &mut engines[0], &v, 1).await;
    drop(engines);
}

/// A replica still being rebuilt when the nexus's engine restarts is not taken for a complete copy: the new nexus
/// is made of the in-sync replicas, and the half-rebuilt one joins it afterwards and is rebuilt again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_rebuilt_replica_is_rebuilt_again_not_trusted_after_a_nexus_restart() {
    let (_dir, _port, _agent, mut engines, nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 40 * MIB,
        replicas: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let v = c
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
    let ns = connect(&v).await;
    for i in 0..BLOCKS {
        ns.write(i * MIB, block(3, i)).await.unwrap();
    }
    ns.close().await;

    // Node 3's disk is slow: the new replica's rebuild takes long.
    let mut e3 = proto::engine::engine_client::EngineClient::connect(
        nodes
            .iter()
            .find(|n| n.name == "reg-3")
            .unwrap()
            .engine_endpoint
            .clone(),
    )
    .await
    .unwrap();
    e3.inject_fault(proto::engine::InjectFaultRequest {
        pool: "pool3".into(),
        latency_ms: 20,
        ..Default::default()
    })
    .await
    .unwrap();
    c.set_volume_replicas(pb::SetVolumeReplicasRequest {
        uuid: vol.clone(),
        replicas: 3,
    })
    .await
    .unwrap();
    let t = Instant::now();
    loop {
        let v = get(&mut c, &vol).await;
        if v.replica_list
            .iter()
            .any(|r| r.node == "reg-3" && r.state == "rebuilding" && r.rebuild_done_bytes > 0)
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{v:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The nexus's engine restarts (cleanly) in the middle of that rebuild.
    engines[0].stop();
    engines[0].restart();
    let t = Instant::now();
    loop {
        let v = get(&mut c, &vol).await;
        if !v.nqn.is_empty() && v.nexus_node == "reg-1" && v.state != "Faulted" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{v:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    e3.inject_fault(proto::engine::InjectFaultRequest {
        pool: "pool3".into(),
        clear: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let v = until_recomposed(&mut c, &vol).await;
    let r3 = v.replica_list.iter().find(|r| r.node == "reg-3").unwrap();
    let b = v
        .rebuilds
        .iter()
        .find(|b| b.replica == r3.uuid)
        .expect("reg-3's replica was rebuilt by the new nexus");
    assert_eq!((b.kind.as_str(), b.error.as_str()), ("full", ""), "{b:?}");
    verify(&mut c, &v, 3).await;
}
