//! HA switch-over through the cluster API, with real io-engines and Keelson's own initiator as the host: the
//! engine hosting a volume's nexus is killed (or frozen, as a partitioned node is), the host reports its broken
//! path, and the nexus moves to another node, fenced so the old one can never write again (also when it reaches no
//! other replica: then the agent's refusal to let it go on without them stops it); every acknowledged write reads
//! back through the new path. Reports that must not move anything (bad input, another host, a node with no
//! registered node agent, a path the target still sees connected or sees connect again, repeats) do not.

use std::time::{Duration, Instant};

use bytes::Bytes;
use nvmf_target::block::BlockDevice;
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::registry::three_nodes;

pub(crate) const MIB: u64 = 1 << 20;
const HOST: &str = "nqn.2026-11.io.keelson:test-switchover-host";

fn block(i: u64) -> Bytes {
    Bytes::from(vec![(i as u8).wrapping_mul(53) | 1; 64 << 10])
}

pub(crate) async fn connect(v: &pb::Volume) -> RemoteNamespace {
    let mut o = ConnectOptions::new(v.target_addresses[0].parse().unwrap(), &v.nqn);
    o.hostnqn = HOST.into();
    RemoteNamespace::connect(o, 1).await.unwrap()
}

async fn published(c: &mut ClusterClient<Channel>, replicas: u32, node: &str) -> pb::Volume {
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 16 * MIB,
        replicas,
        ..Default::default()
    })
    .await
    .unwrap();
    publish_to(c, vol, node).await
}

/// The host's node agent registers its node (`app-1`) and host NQN, as the node-agent binary does: reports are
/// taken from registered nodes only.
async fn register_app(c: &mut ClusterClient<Channel>) {
    let r = c
        .register_host(pb::RegisterHostRequest {
            node: "app-1".into(),
            host_nqns: vec![HOST.into()],
            version: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.heartbeat_ms >= 1000, "{r:?}");
}

pub(crate) async fn publish_to(
    c: &mut ClusterClient<Channel>,
    uuid: String,
    node: &str,
) -> pb::Volume {
    register_app(c).await;
    c.publish_volume(pb::PublishVolumeRequest {
        uuid,
        host_nqn: HOST.into(),
        node: node.into(),
        multi_host: false,
        require_known_node: false,
    })
    .await
    .unwrap()
    .into_inner()
}

pub(crate) fn report(v: &pb::Volume, address: &str) -> pb::ReportPathFailureRequest {
    pb::ReportPathFailureRequest {
        node: "app-1".into(),
        host_nqn: HOST.into(),
        nqn: v.nqn.clone(),
        address: address.into(),
        seen_unix_ms: 0,
    }
}

/// The host reports its path to `v`'s nexus broken; the nexus moves off its node (returned: the volume now).
async fn reported_off(c: &mut ClusterClient<Channel>, v: &pb::Volume) -> pb::Volume {
    let moved = c
        .report_path_failure(report(v, &v.target_addresses[0]))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(moved.nexus_node, v.nexus_node, "{moved:#?}");
    moved
}

pub(crate) async fn write_all(ns: &RemoteNamespace, blocks: std::ops::Range<u64>) {
    for i in blocks {
        ns.write((i * 256) << 10, block(i)).await.unwrap();
    }
}

pub(crate) async fn verify(ns: &RemoteNamespace, blocks: std::ops::Range<u64>) {
    for i in blocks {
        assert_eq!(
            ns.read((i * 256) << 10, 64 << 10).await.unwrap(),
            block(i),
            "write {i}"
        );
    }
}

/// The host's path to `v`'s nexus is reset after four writes: its connection ends, its node agent reports the
/// path at once, and it connects again after the kernel's reconnect_delay (1 s). The report is refused
/// (FAILED_PRECONDITION: the host connected again); the new connection.
async fn reset_and_connected_again(c: &ClusterClient<Channel>, v: &pb::Volume) -> RemoteNamespace {
    let ns = connect(v).await;
    write_all(&ns, 0..4).await;
    ns.close().await;
    let mut reporter = c.clone();
    let req = report(v, &v.target_addresses[0]);
    let reported = tokio::spawn(async move { reporter.report_path_failure(req).await });
    // Connected again well within the agent's wait (the kernel's reconnect_delay is 1 s; a loaded machine's connect
    // takes more of the wait's 2.5 s). A report checked only once the host is back is refused without waiting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ns = connect(v).await;
    let s = reported.await.unwrap().unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("connected to it"), "{}", s.message());
    ns
}

/// A path that was only reset (the host's connection ended, as a keep-alive that timed out over a brief network
/// stall ends it) and is reported at once: the host connects again within the kernel's reconnect delay, and the
/// report moves nothing. Before, the engine's first answer (no controller of the host) moved the healthy nexus and
/// had its node's replicas disowned and rebuilt elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_path_whose_host_connects_again_keeps_its_nexus() {
    let (_dir, _port, _agent, _engines, _nodes, mut c) = three_nodes().await;
    let v = published(&mut c, 2, "reg-1").await;
    let ns = reset_and_connected_again(&c, &v).await;
    let now = crate::registry::volume_now(&c, &v.uuid).await;
    assert_eq!(now.nexus_node, "reg-1", "{now:#?}");
    assert_eq!(now.target_addresses, v.target_addresses);
    verify(&ns, 0..4).await;
    write_all(&ns, 4..8).await;
    // A host that stays away is moved once the wait is over.
    ns.close().await;
    let moved = reported_off(&mut c, &v).await;
    let ns = connect(&moved).await;
    verify(&ns, 0..8).await;
}

/// While the host's time to connect again runs, the old engine misses an answer (the call timed out, as one of a
/// busy engine may) and then answers again, and the host connects: the nexus stays. Before, the missed answer
/// ended the wait, and the check after it moved the nexus of a host about to connect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_answer_of_the_old_engine_does_not_cut_the_hosts_time_to_connect_again_short() {
    let (_dir, port, mut agent, _engines, _nodes, mut c) = three_nodes().await;
    // The first question to the old engine is answered; the second, the wait's first, is taken as missed.
    agent.set_env(
        "FAILPOINTS",
        &format!(
            "{}=1*off->1*return->off",
            ha_agent::cluster::failpoint::SWITCHOVER_OLD_ENGINE_SILENT
        ),
    );
    agent.restart();
    crate::registry::wait_for(
        port,
        &[
            ("reg-1", pb::NodeState::Online),
            ("reg-2", pb::NodeState::Online),
            ("reg-3", pb::NodeState::Online),
        ],
        "agent restart",
    )
    .await;
    let v = published(&mut c, 2, "reg-1").await;
    let ns = reset_and_connected_again(&c, &v).await;
    assert!(
        agent
            .log()
            .contains("failpoint switchover.old-engine-silent: answering"),
        "the answer was not missed"
    );
    let now = crate::registry::volume_now(&c, &v.uuid).await;
    assert_eq!(now.nexus_node, "reg-1", "{now:#?}");
    verify(&ns, 0..4).await;
}

/// The host loses its path to a nexus whose node is alive, and the volume's only replica is on that node: the old
/// nexus is ended by its engine, and the new one is made on another node with that replica as its remote child.
/// Before, the old nexus was destroyed and the new one refused (no other node held a replica): the volume was left
/// without a nexus, each retry failing the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_lost_to_a_nexus_beside_the_only_replica_moves_the_nexus_and_keeps_the_replica() {
    let (_dir, _port, _agent, _engines, _nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 16 * MIB,
        replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let holder = crate::registry::volume_now(&c, &vol).await.replica_list[0].clone();
    let v = publish_to(&mut c, vol.clone(), &holder.node).await;
    assert_eq!(v.nexus_node, holder.node);
    let ns = connect(&v).await;
    write_all(&ns, 0..8).await;
    ns.close().await;

    let moved = reported_off(&mut c, &v).await;
    assert_eq!(moved.replica_list.len(), 1, "{moved:#?}");
    assert_eq!(moved.replica_list[0].uuid, holder.uuid, "{moved:#?}");
    let ns = connect(&moved).await;
    verify(&ns, 0..8).await;
    ns.close().await;
}

/// The nexus's engine is killed: the host's report moves the nexus to another node at once (no waiting for the
/// node to be declared Offline), a repeated report gets the same target, and every write reads back there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nexus_engine_is_switched_over_on_the_hosts_report() {
    let (_dir, _port, _agent, mut engines, _nodes, mut c) = three_nodes().await;
    let v = published(&mut c, 3, "reg-1").await;
    assert_eq!(v.nexus_node, "reg-1");
    let old = v.target_addresses[0].clone();
    let ns = connect(&v).await;
    write_all(&ns, 0..16).await;

    // Reports that move nothing.
    let code = |r: Result<tonic::Response<pb::Volume>, tonic::Status>| r.unwrap_err().code();
    let mut bad = report(&v, &old);
    bad.nqn = "nqn.2026-11.io.keelson:vol-not-a-uuid".into();
    assert_eq!(
        code(c.report_path_failure(bad).await),
        Code::InvalidArgument
    );
    let mut bad = report(&v, &old);
    bad.nqn = proto::names::volume_nqn(&uuid::Uuid::new_v4().to_string());
    assert_eq!(code(c.report_path_failure(bad).await), Code::NotFound);
    let mut bad = report(&v, &old);
    bad.host_nqn = "nqn.2026-11.io.keelson:someone-else".into();
    assert_eq!(
        code(c.report_path_failure(bad).await),
        Code::FailedPrecondition
    );
    let s = c.report_path_failure(report(&v, &old)).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("connected"), "{}", s.message());
    // From a node no node agent registered (yet: it is asked to register, not told of a missing volume, which its
    // node agent asks about again only rarely); from a registered node for a host that is not its own.
    let mut bad = report(&v, &old);
    bad.node = "app-9".into();
    let s = c.report_path_failure(bad).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message().contains("no registered node agent"),
        "{}",
        s.message()
    );
    c.register_host(pb::RegisterHostRequest {
        node: "app-2".into(),
        host_nqns: vec!["nqn.2026-11.io.keelson:host-app-2".into()],
        version: "test".into(),
    })
    .await
    .unwrap();
    let mut bad = report(&v, &old);
    bad.node = "app-2".into();
    assert_eq!(
        code(c.report_path_failure(bad).await),
        Code::FailedPrecondition
    );
    // Registrations that make no sense.
    for (node, nqns) in [
        ("", vec![HOST]),
        ("App_1", vec![HOST]),
        ("app-3", vec![]),
        ("app-3", vec!["host"]),
    ] {
        let s = c
            .register_host(pb::RegisterHostRequest {
                node: node.into(),
                host_nqns: nqns.into_iter().map(String::from).collect(),
                version: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{node:?}: {s:?}");
    }
    let hosts = c
        .list_hosts(pb::ListHostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(
        hosts
            .iter()
            .map(|h| (h.node.as_str(), h.alive))
            .collect::<Vec<_>>(),
        [("app-1", true), ("app-2", true)]
    );
    // Forgetting a node: refused while a volume is published to it or while its agent is alive; an unknown one
    // is not found.
    let forget = |node: &str| pb::DeleteHostRequest { node: node.into() };
    let s = c.delete_host(forget("app-1")).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("published"), "{}", s.message());
    let s = c.delete_host(forget("app-2")).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("heard from"), "{}", s.message());
    let s = c.delete_host(forget("app-9")).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let s = c.delete_host(forget("")).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // The nexus's engine dies; the host reports at once, in the kernel's address form.
    engines[0].kill9();
    let (ip, port) = old.rsplit_once(':').unwrap();
    let t = Instant::now();
    let moved = c
        .report_path_failure(report(
            &v,
            &format!("traddr={ip},trsvcid={port},src_addr=10.0.0.9"),
        ))
        .await
        .unwrap()
        .into_inner();
    let took = t.elapsed();
    assert_ne!(moved.nexus_node, "reg-1", "{moved:#?}");
    assert_eq!(moved.nqn, v.nqn, "the same subsystem");
    assert_ne!(moved.target_addresses, v.target_addresses);
    assert!(
        moved.replica_list.iter().all(|r| r.node != "reg-1"),
        "the failed node's replica is disowned: {moved:#?}"
    );
    println!(
        "switched over from reg-1 to {} in {took:?}",
        moved.nexus_node
    );
    let again = c
        .report_path_failure(report(&v, &old))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.nexus_node.as_str(), &again.target_addresses),
        (moved.nexus_node.as_str(), &moved.target_addresses),
        "a repeated report moves nothing"
    );
    drop(ns);

    let ns = connect(&moved).await;
    verify(&ns, 0..16).await;
    write_all(&ns, 16..24).await;
    verify(&ns, 0..24).await;
    ns.close().await;
}

/// A frozen nexus engine (a partitioned node: alive, unreachable): after the switch-over it thaws and its host
/// connection sends a write, which fails on the fenced replicas and never reaches the volume; the old nexus is
/// destroyed; the volume holds exactly what the host wrote through the paths it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_nexus_is_fenced_after_the_switch_over_and_its_late_write_lands_nowhere() {
    let (_dir, _port, _agent, engines, nodes, mut c) = three_nodes().await;
    let v = published(&mut c, 2, "reg-3").await;
    assert_eq!(v.nexus_node, "reg-3");
    let old_ns = connect(&v).await;
    write_all(&old_ns, 0..8).await;

    engines[2].signal("-STOP");
    let moved = reported_off(&mut c, &v).await;
    let ns = connect(&moved).await;
    verify(&ns, 0..8).await;
    write_all(&ns, 8..12).await;

    // The old node thaws; its nexus still has the host's connection and tries to write block 0 over.
    engines[2].signal("-CONT");
    let late = tokio::time::timeout(
        Duration::from_secs(20),
        old_ns.write(0, Bytes::from(vec![0xEE; 64 << 10])),
    )
    .await;
    assert!(
        !matches!(late, Ok(Ok(()))),
        "the old nexus acknowledged a write after the switch-over"
    );
    println!("the old nexus's late write: {late:?}");
    crate::registry::until_no_nexus(&nodes, "reg-3").await;
    verify(&ns, 0..12).await;
    ns.close().await;
    drop(old_ns);
}

/// The old nexus thaws after the switch-over cut off from every other replica (their engines are gone), its host
/// connection still up: it cannot be fenced on replicas it does not reach, and without the agent's consent it would
/// fault them and acknowledge the write on its local replica alone, a replica the volume no longer uses. While no
/// agent answers (killed), the write is held; the restarted agent refuses (a newer nexus took over; or destroys the
/// stale nexus first), the engine closes the host's connection without an answer, and once the volume's replicas
/// are back the host reads exactly what it wrote through the paths it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_nexus_cut_off_from_the_other_replicas_acknowledges_nothing_on_its_own() {
    let (_dir, port, mut agent, mut engines, nodes, mut c) = three_nodes().await;
    let v = published(&mut c, 3, "reg-3").await;
    assert_eq!(v.nexus_node, "reg-3");
    let old_ns = connect(&v).await;
    write_all(&old_ns, 0..8).await;

    // Frozen until the agent counts the node Offline, so that the agent, as if cut off from it, asks its engine
    // nothing more (no call waits in its sockets to destroy the local replica the moment it thaws).
    engines[2].signal("-STOP");
    crate::registry::wait_for(
        port,
        &[("reg-3", pb::NodeState::Offline)],
        "frozen node Offline",
    )
    .await;
    let moved = reported_off(&mut c, &v).await;
    let ns = connect(&moved).await;
    write_all(&ns, 8..12).await;
    ns.close().await;

    // Both other replicas' engines die, and so does the agent; the host's write to the old nexus waits in its
    // socket until the node thaws.
    engines[0].kill9();
    engines[1].kill9();
    agent.kill9();
    let late = tokio::spawn(async move {
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            old_ns.write(0, Bytes::from(vec![0xEE; 64 << 10])),
        )
        .await;
        drop(old_ns);
        r
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    engines[2].signal("-CONT");
    // The nexus finds both remote children gone and asks the agent; no answer comes, and the write stays held
    // until an agent answers again (restarted, as its supervisor would).
    let t = Instant::now();
    while !engines[2]
        .log()
        .contains("asking the cluster agent before going on without a child")
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the old nexus never asked; its engine's log:\n{}",
            engines[2].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !late.is_finished(),
        "the write was answered while no agent could confirm the fault"
    );
    agent.restart();
    let late = late.await.unwrap();
    assert!(
        !matches!(late, Ok(Ok(()))),
        "the replaced nexus acknowledged a write on its local replica alone"
    );
    println!("the replaced nexus's late write: {late:?}");
    // Stopped either by the agent's refusal or by its destruction as a stale nexus, whichever the agent did first
    // once it answered again.
    let log = engines[2].log();
    println!(
        "stopped by {}",
        if log.contains("a newer nexus replaced this one: unpublishing it") {
            "the agent's refusal"
        } else {
            "its destruction as a stale nexus"
        }
    );
    crate::registry::until_no_nexus(&nodes, "reg-3").await;

    // The volume's replicas come back; its nexus is made again where it was, and holds what the host wrote.
    engines[0].restart();
    engines[1].restart();
    let t = Instant::now();
    let back = loop {
        if let Ok(m) = c
            .get_volume(pb::GetVolumeRequest {
                uuid: v.uuid.clone(),
            })
            .await
            .map(|r| r.into_inner())
            && m.nexus_node == moved.nexus_node
            && (m.state == "Online" || m.state == "Degraded")
        {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the nexus was never made again; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ns = connect(&back).await;
    verify(&ns, 0..12).await;
    ns.close().await;

    // Questions the agent must refuse: from the replaced nexus's node, for a volume it does not know, and garbage.
    let mut reg = proto::cluster::registration_client::RegistrationClient::connect(format!(
        "http://127.0.0.1:{port}"
    ))
    .await
    .unwrap();
    let ask = |node: &str, volume: &str| pb::ConfirmChildFaultRequest {
        node: node.into(),
        volume: volume.into(),
        key: 1,
        child: format!(
            "nvmf://127.0.0.9:1/nqn.2026-11.io.keelson:replica-{}",
            uuid::Uuid::new_v4()
        ),
        reason: "test".into(),
    };
    let code = |r: Result<_, tonic::Status>| r.map(drop).unwrap_err().code();
    let replaced = reg.confirm_child_fault(ask("reg-3", &v.uuid)).await;
    assert_eq!(code(replaced), Code::FailedPrecondition);
    let unknown = reg
        .confirm_child_fault(ask("reg-1", &uuid::Uuid::new_v4().to_string()))
        .await;
    assert_eq!(code(unknown), Code::NotFound);
    let garbage = reg.confirm_child_fault(ask("reg-1", "not-a-uuid")).await;
    assert_eq!(code(garbage), Code::InvalidArgument);
    // A child that names no replica: nothing could be recorded out of sync for it.
    let mut no_replica = ask("reg-1", &v.uuid);
    no_replica.child = "nvmf://127.0.0.9:1/nqn.2026-11.io.keelson:replica-x".into();
    let no_replica = reg.confirm_child_fault(no_replica).await;
    assert_eq!(code(no_replica), Code::InvalidArgument);
}

/// The host loses its path to a nexus whose engine answers, and the volume's other in-sync replica is on a node that
/// froze a moment ago (still Online in the registry): the switch-over cannot share that replica. Once the old nexus
/// has ended (its engine ends it when its frozen child times out) its node's replica is whole: it is kept, and once
/// the frozen node is known to be Offline the new nexus is made of it on the third node. Before, that replica was disowned (and destroyed) before
/// the new nexus existed, and later attempts, having forgotten that the old nexus had ended, would not have used it
/// anyway: the volume stayed without a nexus, its only reachable copy gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_over_whose_other_copy_is_on_a_frozen_node_keeps_the_old_nodes_copy() {
    let (_dir, _port, agent, engines, _nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 16 * MIB,
        replicas: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let holders = c
        .get_volume(pb::GetVolumeRequest { uuid: vol.clone() })
        .await
        .unwrap()
        .into_inner()
        .replica_list;
    let (kept, frozen) = (holders[0].clone(), holders[1].clone());
    let v = publish_to(&mut c, vol.clone(), &kept.node).await;
    assert_eq!(v.nexus_node, kept.node);
    let ns = connect(&v).await;
    write_all(&ns, 0..8).await;
    ns.close().await;

    let frozen_engine = &engines[frozen.node["reg-".len()..].parse::<usize>().unwrap() - 1];
    frozen_engine.signal("-STOP");
    let first = c
        .report_path_failure(report(&v, &v.target_addresses[0]))
        .await;
    println!(
        "the report, {} frozen: {:?}",
        frozen.node,
        first.map(|m| m.into_inner().nexus_node)
    );
    let t = Instant::now();
    let moved = loop {
        let m = c
            .get_volume(pb::GetVolumeRequest { uuid: vol.clone() })
            .await
            .unwrap()
            .into_inner();
        if !m.nqn.is_empty() && m.nexus_node != kept.node && m.nexus_node != frozen.node {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never switched over while {} is frozen: {m:#?}\nagent log:\n{}",
            frozen.node,
            crate::crash::tail(&agent.log())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        moved.replica_list.iter().any(|r| r.uuid == kept.uuid),
        "the old node's copy is kept: {moved:#?}"
    );
    let ns = connect(&moved).await;
    verify(&ns, 0..8).await;
    ns.close().await;
    frozen_engine.signal("-CONT");
}

/// The nexus moves off a killed node, and the node it went to dies before the host had a path there: the host,
/// whose only broken path is still the one to the first nexus, reports that one again. The current nexus's node is
/// down, so the report stands for it: the nexus moves on to the last node, and every write reads back there.
/// Before, the answer was always the dead current nexus, and the host waited on it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_of_an_earlier_path_moves_a_nexus_whose_node_is_down() {
    let (_dir, port, _agent, mut engines, _nodes, mut c) = three_nodes().await;
    let v = published(&mut c, 3, "reg-1").await;
    let ns = connect(&v).await;
    write_all(&ns, 0..8).await;
    ns.close().await;
    engines[0].kill9();
    let moved = reported_off(&mut c, &v).await;
    // The first nexus ended uncleanly: the second resyncs the third node's copy from its own. Until that copy is in
    // sync again, the second node's is the only one known to hold every write, and the volume waits for it.
    let t = Instant::now();
    loop {
        let m = c
            .get_volume(pb::GetVolumeRequest {
                uuid: v.uuid.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let others: Vec<_> = m
            .replica_list
            .iter()
            .filter(|r| r.node != v.nexus_node)
            .collect();
        if others.len() == 2 && others.iter().all(|r| r.in_sync) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never in sync: {m:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = moved
        .nexus_node
        .strip_prefix("reg-")
        .unwrap()
        .parse::<usize>()
        .unwrap()
        - 1;
    engines[second].kill9();
    crate::registry::wait_for(
        port,
        &[(moved.nexus_node.as_str(), crate::registry::Offline)],
        "the second nexus's node down",
    )
    .await;
    // Its own answer while that node was up was the second nexus; now the report of the first path moves it.
    let again = c
        .report_path_failure(report(&v, &v.target_addresses[0]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        again.nexus_node != v.nexus_node && again.nexus_node != moved.nexus_node,
        "{again:#?}"
    );
    let ns = connect(&again).await;
    verify(&ns, 0..8).await;
    ns.close().await;
}
