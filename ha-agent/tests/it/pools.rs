//! Pools created through the cluster agent: recorded, created by the node's engine, imported again by the agent
//! when that engine restarts empty, refused precisely when they cannot be made, and deleted only when empty.

use std::time::{Duration, Instant};

use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;
use proto::engine as epb;
use proto::engine::engine_client::EngineClient;
use tonic::Code;

use crate::registry::{Online, agent, engine_cmd, free_port, wait_for};

async fn managed(c: &mut ClusterClient<tonic::transport::Channel>) -> Vec<pb::ManagedPool> {
    c.list_pools(pb::ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pools
}

/// An agent and one engine (reg-1) in `dir`, registered; the agent's port, the engine's API port, and a 64 MiB
/// file in `dir` for a pool.
async fn one_node(
    dir: &std::path::Path,
) -> (
    u16,
    crate::registry::Proc,
    u16,
    crate::registry::Proc,
    ClusterClient<tonic::transport::Channel>,
    std::path::PathBuf,
) {
    let port = free_port("127.0.0.1");
    let agent = agent(dir, port);
    let grpc = free_port("127.0.0.1");
    let engine = engine_cmd(dir, 1, &format!("http://127.0.0.1:{port}"), grpc, &[]);
    wait_for(port, &[("reg-1", Online)], "registration").await;
    let c = ClusterClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let disk = dir.join("managed.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    (port, agent, grpc, engine, c, disk)
}

/// Kills reg-1's engine and waits until the agent has it Offline.
async fn down(engine: &mut crate::registry::Proc, port: u16) {
    engine.kill9();
    wait_for(
        port,
        &[("reg-1", crate::registry::Offline)],
        "the node down",
    )
    .await;
}

/// Pool p1 on reg-1's `disk`, made through the agent.
async fn create_p1(c: &mut ClusterClient<tonic::transport::Channel>, disk: &std::path::Path) {
    c.create_pool(pb::CreatePoolRequest {
        node: "reg-1".into(),
        name: "p1".into(),
        disk: disk.display().to_string(),
    })
    .await
    .unwrap();
}

/// Pool p1 on `disk` made through the agent, a one-replica volume in it; then reg-1's engine restarted with the disk
/// moved away (late): the volume's UUID and where the disk is.
async fn volume_on_p1_whose_disk_is_late(
    port: u16,
    engine: &mut crate::registry::Proc,
    c: &mut ClusterClient<tonic::transport::Channel>,
    disk: &std::path::Path,
) -> (String, std::path::PathBuf) {
    create_p1(c, disk).await;
    let t = Instant::now();
    while !managed(c).await[0].reported {
        assert!(t.elapsed() < Duration::from_secs(30), "never reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(pb::CreateVolumeRequest {
        uuid: vol.clone(),
        size_bytes: 8 << 20,
        replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    down(engine, port).await;
    let away = disk.with_file_name("away.img");
    std::fs::rename(disk, &away).unwrap();
    engine.restart();
    wait_for(port, &[("reg-1", Online)], "the node back").await;
    (vol, away)
}

/// Puts p1's disk back from `away` and waits (30 s at most) until reg-1's engine (API port `grpc`) lists the volume's
/// replica again, and, with `created`, the agent has the pool Created.
async fn disk_back(
    grpc: u16,
    c: &mut ClusterClient<tonic::transport::Channel>,
    away: &std::path::Path,
    disk: &std::path::Path,
    created: bool,
) {
    std::fs::rename(away, disk).unwrap();
    let mut e = EngineClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .unwrap();
    let t = Instant::now();
    loop {
        let replicas = e
            .list_replicas(epb::ListReplicasRequest {})
            .await
            .unwrap()
            .into_inner()
            .replicas;
        let pools = managed(c).await;
        if !replicas.is_empty() && (!created || pools[0].phase == pb::PoolPhase::Created as i32) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the pool never came back: {pools:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_created_through_the_agent_comes_back_when_its_engine_restarts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (_port, _agent, grpc, mut engine, mut c, disk) = one_node(dir.path()).await;
    let req = |name: &str, disk: &str| pb::CreatePoolRequest {
        node: "reg-1".into(),
        name: name.into(),
        disk: disk.into(),
    };
    let d = disk.display().to_string();

    let p = c.create_pool(req("p1", &d)).await.unwrap().into_inner();
    assert_eq!(p.phase, pb::PoolPhase::Created as i32, "{p:?}");
    assert!(!p.uuid.is_empty());
    let again = c.create_pool(req("p1", &d)).await.unwrap().into_inner();
    assert_eq!(again.uuid, p.uuid, "the same request gives the same pool");

    // Precise refusals, and nothing recorded for them.
    let other = dir.path().join("other.img");
    std::fs::write(&other, vec![0xAB; 1 << 20]).unwrap();
    let code = |r: Result<tonic::Response<pb::ManagedPool>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(c.create_pool(req("p1", &other.display().to_string())).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.create_pool(req("p2", "relative.img")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_pool(req("p2", &other.display().to_string())).await),
        Code::FailedPrecondition,
        "the engine refuses a disk holding foreign data"
    );
    let mut unknown = req("p3", &d);
    unknown.node = "nobody".into();
    assert_eq!(code(c.create_pool(unknown).await), Code::NotFound);
    assert_eq!(
        managed(&mut c).await.len(),
        1,
        "refused pools leave no record"
    );

    // A replica in it, made through the engine.
    let mut e = EngineClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .unwrap();
    let replica = uuid::Uuid::new_v4().to_string();
    e.create_replica(epb::CreateReplicaRequest {
        pool: "p1".into(),
        uuid: replica.clone(),
        size: 16 << 20,
        share: false,
        allowed_hosts: vec![],
    })
    .await
    .unwrap();

    // The engine restarts without any --pool: the agent imports p1 again, replica and all.
    let node = |c: &mut ClusterClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        async move {
            c.get_node(pb::GetNodeRequest {
                name: "reg-1".into(),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let before = node(&mut c).await.instance;
    engine.kill9();
    engine.restart();
    let t = Instant::now();
    while node(&mut c).await.instance == before {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the engine never registered again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loop {
        let pools = managed(&mut c).await;
        if pools.len() == 1 && pools[0].reported {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "p1 never came back: {pools:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "pool imported again {:?} after the engine restarted",
        t.elapsed()
    );
    let mut e = EngineClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .unwrap();
    let replicas = e
        .list_replicas(epb::ListReplicasRequest {})
        .await
        .unwrap()
        .into_inner()
        .replicas;
    assert!(replicas.iter().any(|r| r.uuid == replica), "{replicas:?}");

    // Deleting waits for the pool to be empty.
    let del = || pb::DeletePoolRequest {
        node: "reg-1".into(),
        name: "p1".into(),
    };
    assert_eq!(
        c.delete_pool(del()).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        managed(&mut c).await[0].phase,
        pb::PoolPhase::Created as i32
    );
    e.destroy_replica(epb::DestroyReplicaRequest { uuid: replica })
        .await
        .unwrap();
    c.delete_pool(del()).await.unwrap();
    assert!(managed(&mut c).await.is_empty());
    assert!(
        e.list_pools(epb::ListPoolsRequest {})
            .await
            .unwrap()
            .into_inner()
            .pools
            .is_empty()
    );
    assert_eq!(
        c.delete_pool(del()).await.unwrap_err().code(),
        Code::NotFound
    );
}

/// A pool holding a replica is deleted while its engine is down, and again right after the engine restarted (before
/// the agent imported the pool again): both are refused, and the pool comes back with its replica. Before, the first
/// left the pool marked Deleting and the agent destroyed it once the engine was back (it answered "no such pool",
/// not having it open, which counted as destroyed), and the second did the same at once: the pool was never
/// imported again and its replicas were lost to the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_holding_a_replica_is_not_deleted_while_or_after_its_engine_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _agent, grpc, mut engine, mut c, disk) = one_node(dir.path()).await;
    create_p1(&mut c, &disk).await;
    let mut e = EngineClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .unwrap();
    let replica = uuid::Uuid::new_v4().to_string();
    e.create_replica(epb::CreateReplicaRequest {
        pool: "p1".into(),
        uuid: replica.clone(),
        size: 16 << 20,
        share: false,
        allowed_hosts: vec![],
    })
    .await
    .unwrap();
    let del = || pb::DeletePoolRequest {
        node: "reg-1".into(),
        name: "p1".into(),
    };
    // Down: refused, and nothing is left armed.
    down(&mut engine, port).await;
    assert!(c.delete_pool(del()).await.is_err());
    assert_eq!(
        managed(&mut c).await[0].phase,
        pb::PoolPhase::Created as i32
    );
    // Back, and asked before the agent imported the pool again (the engine starts without it open): refused for
    // the replica it holds.
    engine.restart();
    let t = Instant::now();
    loop {
        match c.delete_pool(del()).await {
            Err(s) if s.code() == Code::FailedPrecondition => {
                if !s.message().contains("is Offline") {
                    break;
                }
            }
            r => panic!("deleted a pool holding a replica: {r:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loop {
        let pools = managed(&mut c).await;
        if pools.len() == 1 && pools[0].reported && pools[0].phase == pb::PoolPhase::Created as i32
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "p1 never came back: {pools:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut e = EngineClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .unwrap();
    let replicas = e
        .list_replicas(epb::ListReplicasRequest {})
        .await
        .unwrap()
        .into_inner()
        .replicas;
    assert!(replicas.iter().any(|r| r.uuid == replica), "{replicas:?}");
}

/// A pool holding a volume's replica is not deleted when its engine, restarted, cannot import it (its disk late):
/// the volume's record says the replica is there whatever the engine can tell, and the pool comes back with its
/// replica once the disk does. Before, the failed import counted as the pool being gone: its record was deleted,
/// it was never imported again, and the volume's only copy was lost to the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_disk_is_late_after_a_restart_is_not_deleted_under_its_volume() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _agent, grpc, mut engine, mut c, disk) = one_node(dir.path()).await;
    let (vol, away) = volume_on_p1_whose_disk_is_late(port, &mut engine, &mut c, &disk).await;
    match c
        .delete_pool(pb::DeletePoolRequest {
            node: "reg-1".into(),
            name: "p1".into(),
        })
        .await
    {
        Err(s) if s.code() == Code::FailedPrecondition => {
            assert!(s.message().contains(&vol), "{s:?}")
        }
        r => panic!("deleted the pool of a volume's replica: {r:?}"),
    }
    disk_back(grpc, &mut c, &away, &disk, false).await;
}

/// The agent dies after it recorded a pool's delete and before it asked whether volumes hold replicas there; the
/// pool's engine, restarted, cannot import it (its disk late). The next agent finds the delete unfinished: it puts
/// the pool back, for the volume's replica in it, and imports it once the disk is back. Before, it finished the
/// delete without asking the volumes: the engine, not having the pool open and unable to import it, took it for
/// gone, the pool's record was dropped and marked destroyed, and the volume's only copy was lost to the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_delete_left_unfinished_by_a_crash_is_not_finished_under_a_volume() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let (port, mut agent, grpc, mut engine, mut c, disk) = one_node(dir.path()).await;
    let (_vol, away) = volume_on_p1_whose_disk_is_late(port, &mut engine, &mut c, &disk).await;

    agent.set_env("FAILPOINTS", "pool-delete.marked=return");
    agent.restart();
    let url = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    loop {
        let asked = match ClusterClient::connect(url.clone()).await {
            Ok(mut c) => Some(
                c.delete_pool(pb::DeletePoolRequest {
                    node: "reg-1".into(),
                    name: "p1".into(),
                })
                .await,
            ),
            Err(_) => None,
        };
        if let Some(st) = agent.exited(Duration::from_millis(100)).await {
            assert_eq!(st.signal(), Some(9), "{asked:?}\n{}", agent.log());
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the agent never reached the failpoint: {asked:?}"
        );
    }
    agent.set_env("FAILPOINTS", "");
    agent.restart();
    wait_for(port, &[("reg-1", Online)], "the agent back").await;
    let mut c = ClusterClient::connect(url).await.unwrap();
    let t = Instant::now();
    loop {
        let pools = managed(&mut c).await;
        assert_eq!(pools.len(), 1, "the pool's record was dropped: {pools:?}");
        if pools[0].phase != pb::PoolPhase::Deleting as i32 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the pool stays Deleting: {pools:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    disk_back(grpc, &mut c, &away, &disk, true).await;
}
