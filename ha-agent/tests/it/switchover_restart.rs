//! Switch-overs the cluster agent dies in (an armed failpoint kills it between two recorded stages), with real
//! io-engines: restarted, the agent finishes each from its last recorded stage, also when the new nexus was lost
//! meanwhile (its engine restarted, or its node died), and every acknowledged write reads back on the new path.

use std::time::{Duration, Instant};

use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::registry::{Proc, three_nodes};
use crate::switchover::{MIB, connect, publish_to, report, verify, write_all};

/// A new 3-replica volume published with its nexus on reg-1, its first 8 blocks written.
async fn written_on_reg_1(c: &mut ClusterClient<Channel>) -> pb::Volume {
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 16 * MIB,
        replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let v = publish_to(c, vol, "reg-1").await;
    let ns = connect(&v).await;
    write_all(&ns, 0..8).await;
    ns.close().await;
    v
}

/// Restarts the agent with `failpoint` armed, then reports `v`'s first path broken until the agent dies there.
async fn dies_reporting(
    agent: &mut Proc,
    c: &mut ClusterClient<Channel>,
    v: &pb::Volume,
    failpoint: &str,
) {
    agent.set_env("FAILPOINTS", &format!("{failpoint}=return"));
    agent.restart();
    let t = Instant::now();
    loop {
        match c
            .report_path_failure(report(v, &v.target_addresses[0]))
            .await
        {
            // No answer: the agent is not serving yet, or died in the call (the connection closed under it).
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Cancelled | Code::Unknown
                ) || std::error::Error::source(&s)
                    .is_some_and(|e| e.is::<tonic::transport::Error>()) =>
            {
                if let Some(st) = agent.exited(Duration::from_millis(100)).await {
                    // Killed there, by the failpoint: not a start that failed, nor a death elsewhere.
                    use std::os::unix::process::ExitStatusExt;
                    let log = agent.log();
                    assert_eq!(st.signal(), Some(9), "{failpoint}: {st:?}\n{log}");
                    assert!(
                        log.contains(&format!("failpoint {failpoint}: killing the agent")),
                        "{failpoint}: the agent died, not there\n{log}"
                    );
                    return;
                }
            }
            r => panic!("{failpoint}: the agent should have died there: {r:?}"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{failpoint}: never served"
        );
    }
}

/// Waits (`limit` at most) until `v`'s switch-over off its first nexus's node is finished: the nexus published on a
/// node that is none of `not_on` (nor that first node), and that node's replicas disowned (its last stage).
async fn finished(
    agent: &Proc,
    c: &mut ClusterClient<Channel>,
    v: &pb::Volume,
    not_on: &[&str],
    limit: Duration,
) -> pb::Volume {
    let t = Instant::now();
    loop {
        if let Ok(m) = c
            .get_volume(pb::GetVolumeRequest {
                uuid: v.uuid.clone(),
            })
            .await
            .map(|r| r.into_inner())
            && !m.nexus_node.is_empty()
            && m.nexus_node != v.nexus_node
            && !not_on.contains(&m.nexus_node.as_str())
            && !m.nqn.is_empty()
            // The old node's replicas disowned (a replacement healing places there since is another replica).
            && !m.replica_list.iter().any(|r| {
                r.node == v.nexus_node && v.replica_list.iter().any(|o| o.uuid == r.uuid)
            })
        {
            return m;
        }
        assert!(
            t.elapsed() < limit,
            "the switch-over was never finished; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The cluster agent is killed (an armed failpoint) at each stage of a switch-over: after recording it, after
/// ending the old nexus, and at each step of publishing the replacement (recorded, created, exported). Restarted,
/// it finishes the switch-over by itself, and every write reads back through the new path. The killed engine comes
/// back between rounds (its stale nexus and disowned replica are cleaned up), so each round starts from three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_over_the_agent_died_in_is_finished_by_the_restarted_agent() {
    use ha_agent::cluster::failpoint as fp;
    let (_dir, port, mut agent, mut engines, _nodes, mut c) = three_nodes().await;
    for failpoint in [
        fp::SWITCHOVER_REPORTED,
        fp::SWITCHOVER_OLD_ENDED,
        fp::PUBLISH_NEXUS_RECORDED,
        fp::PUBLISH_NEXUS_CREATED,
        fp::PUBLISH_PUBLISHED,
        fp::RETIRE_GARBAGE_RECORDED,
        fp::RETIRE_DROPPED,
    ] {
        // The last round's volume is deleted; its replicas leave the pools as their engines answer.
        let t = Instant::now();
        let v = &loop {
            let vol = uuid::Uuid::new_v4().to_string();
            match c
                .create_volume(pb::CreateVolumeRequest {
                    uuid: vol.clone(),
                    size_bytes: 16 * MIB,
                    replicas: 3,
                    ..Default::default()
                })
                .await
            {
                Ok(_) => break publish_to(&mut c, vol, "reg-1").await,
                // No room yet (the last round's replicas are still being collected), or a node the last round
                // restarted not answering yet: asked again.
                Err(s)
                    if matches!(s.code(), Code::ResourceExhausted | Code::Unavailable)
                        && t.elapsed() < Duration::from_secs(30) =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(s) => panic!("{failpoint}: create: {s}"),
            }
        };
        let ns = connect(v).await;
        write_all(&ns, 0..8).await;
        ns.close().await;
        engines[0].kill9();
        dies_reporting(&mut agent, &mut c, v, failpoint).await;
        agent.set_env("FAILPOINTS", "");
        agent.restart();
        let moved = finished(&agent, &mut c, v, &[], Duration::from_secs(30)).await;
        println!(
            "{failpoint}: finished by the restarted agent, nexus on {}",
            moved.nexus_node
        );
        let ns = connect(&moved).await;
        verify(&ns, 0..8).await;
        ns.close().await;
        engines[0].restart();
        crate::registry::wait_for(
            port,
            &[("reg-1", pb::NodeState::Online)],
            "the killed node back",
        )
        .await;
        c.unpublish_volume(pb::UnpublishVolumeRequest {
            uuid: v.uuid.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.delete_volume(pb::DeleteVolumeRequest {
            uuid: v.uuid.clone(),
        })
        .await
        .unwrap();
    }
}

/// The agent dies after the switch-over published the new nexus and before it disowned the old node's replicas;
/// while it is down, the new nexus's engine restarts (the nexus is gone). Restarted, the agent makes the nexus again
/// (not on the old node, not from its replicas) and finishes the switch-over. Before, the switch-over on record
/// waited for a healthy child of a nexus that no longer existed, and kept every other repair of the volume off for
/// good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_over_whose_new_nexus_is_lost_while_the_agent_is_down_is_finished_by_the_restarted_agent()
 {
    use ha_agent::cluster::failpoint as fp;
    let (_dir, _port, mut agent, mut engines, _nodes, mut c) = three_nodes().await;
    let v = &written_on_reg_1(&mut c).await;
    engines[0].kill9();
    dies_reporting(&mut agent, &mut c, v, fp::RETIRE_GARBAGE_RECORDED).await;
    // The new nexus is on reg-2 or reg-3: both engines restart, so it is gone from its engine.
    engines[1].kill9();
    engines[2].kill9();
    engines[1].restart();
    engines[2].restart();
    agent.set_env("FAILPOINTS", "");
    agent.restart();
    let moved = finished(&agent, &mut c, v, &[], Duration::from_secs(60)).await;
    let ns = connect(&moved).await;
    verify(&ns, 0..8).await;
    ns.close().await;
}

/// The agent dies after the switch-over published the new nexus (the old one ended cleanly) and before it disowned
/// the old node's replicas; while it is down, the new nexus's node dies. Restarted, the agent moves the nexus on to the last node (not
/// back to the first) and finishes the switch-over. Before, the switch-over on record counted the nexus as moved
/// and waited for a healthy child on a dead node for good, answering every report with the dead nexus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_over_whose_new_nexus_node_dies_while_the_agent_is_down_moves_on() {
    use ha_agent::cluster::failpoint as fp;
    let (_dir, port, mut agent, mut engines, nodes, mut c) = three_nodes().await;
    let v = &written_on_reg_1(&mut c).await;
    let vol = v.uuid.clone();
    // The host's path is gone and the old nexus's engine answers: it is ended cleanly, so the new one starts from
    // the replicas in sync as they are (no resync that would leave the third node's copy out of sync meanwhile).
    dies_reporting(&mut agent, &mut c, v, fp::RETIRE_GARBAGE_RECORDED).await;
    // The node the new nexus went to, from the engines themselves (the agent is down).
    let mut new_node = None;
    for (i, n) in nodes.iter().enumerate().skip(1) {
        let mut e = proto::engine::engine_client::EngineClient::connect(n.engine_endpoint.clone())
            .await
            .unwrap();
        let listed = e
            .list_nexuses(proto::engine::ListNexusesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nexuses;
        if listed.iter().any(|x| x.uuid == vol) {
            new_node = Some((i, n.name.clone()));
        }
    }
    let (i, second) = new_node.expect("the new nexus is on reg-2 or reg-3");
    engines[i].kill9();
    agent.set_env("FAILPOINTS", "");
    agent.restart();
    crate::registry::wait_for(
        port,
        &[(second.as_str(), crate::registry::Offline)],
        "the new nexus's node down",
    )
    .await;
    let moved = finished(
        &agent,
        &mut c,
        v,
        &[second.as_str()],
        Duration::from_secs(60),
    )
    .await;
    let ns = connect(&moved).await;
    verify(&ns, 0..8).await;
    ns.close().await;
}
