//! Crash safety of the control plane: the cluster agent is killed (SIGKILL, by an armed failpoint) between every two
//! steps of create, publish, snapshot, expand, scale up, scale down, replace and delete; a new agent on the same
//! store resumes or rolls back the operation, and then every replica any engine holds is one some volume records, on
//! its recorded node and of the volume's size, each volume with its replica count on distinct nodes: nothing leaked,
//! nothing doubled. Once on the embedded
//! store and once on a real etcd (Debian `etcd-server`, started by the test).

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use ha_agent::cluster::failpoint as fp;
use nvmf_target::block::BlockDevice;
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;
use proto::engine as epb;
use proto::engine::engine_client::EngineClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::etcd::Etcd;
use crate::registry::{Online, Proc, agent_with, engine_with, free_port, wait_for};

const MIB: u64 = 1 << 20;
pub(crate) const HOST: &str = "nqn.2026-11.io.keelson:test-crash-host";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_at_any_stage_on_the_embedded_store_resumes_with_nothing_leaked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agent").display().to_string();
    every_stage(dir.path(), &["--data-dir", &data]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_at_any_stage_on_etcd_resumes_with_nothing_leaked() {
    let Some(etcd) =
        Etcd::start("an_agent_killed_at_any_stage_on_etcd_resumes_with_nothing_leaked").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    every_stage(dir.path(), &["--store", "etcd", "--etcd", &etcd.endpoint]).await;
}

struct Cluster {
    agent: Proc,
    c: ClusterClient<Channel>,
    engines: Vec<Proc>,
}

impl Cluster {
    /// An agent on `store` and three engines (reg-1..3) in `dir`, registered.
    async fn start(dir: &Path, store: &[&str]) -> Cluster {
        let port = free_port("127.0.0.1");
        let agent = agent_with(dir, port, store, "agent");
        let url = format!("http://127.0.0.1:{port}");
        let engines: Vec<_> = (1..=3).map(|i| engine_with(dir, i, &url)).collect();
        wait_for(
            port,
            &[("reg-1", Online), ("reg-2", Online), ("reg-3", Online)],
            "registration",
        )
        .await;
        let c = ClusterClient::connect(url).await.unwrap();
        Cluster { agent, c, engines }
    }

    /// [`consistent`], with the agent's log in the failure.
    async fn consistent(&self, what: &str, settled: impl Fn(&[pb::Volume]) -> bool) {
        if let Err(e) = try_consistent(&self.c, &settled).await {
            let engines: Vec<String> = self.engines.iter().map(|p| tail(&p.log())).collect();
            panic!(
                "{what}: never consistent: {e}\nagent log:\n{}\nengine logs:\n{}",
                tail(&self.agent.log()),
                engines.join("\n----\n")
            );
        }
    }

    /// Restarts the agent with `failpoint` armed, runs `op` (which must reach it), and checks the agent died there
    /// by SIGKILL; then starts it again unarmed.
    async fn crash_in<F, Fut>(&mut self, failpoint: &str, op: F)
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>>,
    {
        self.crash_in_then(failpoint, op, |_| {}).await
    }

    /// [`Cluster::crash_in`], doing `while_down` to the cluster while the agent is dead.
    async fn crash_in_then<F, Fut>(
        &mut self,
        failpoint: &str,
        op: F,
        while_down: impl FnOnce(&mut Cluster),
    ) where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>>,
    {
        self.agent
            .set_env("FAILPOINTS", &format!("{failpoint}=return"));
        self.agent.restart();
        // Asked again while the agent lives but does not serve yet (starting, campaigning, or the client's
        // connection was to the agent before).
        let t = Instant::now();
        let r = loop {
            let r = op(self.c.clone()).await;
            match &r {
                Err(s) if unserved(s) && t.elapsed() < SERVED_WITHIN => {
                    if self
                        .agent
                        .exited(Duration::from_millis(100))
                        .await
                        .is_some()
                    {
                        break r;
                    }
                }
                _ => break r,
            }
        };
        let st = match self.agent.exited(Duration::from_secs(20)).await {
            Some(st) => Some(st),
            None => self.agent.last_exit(),
        };
        assert!(
            st.and_then(|s| s.signal()) == Some(9),
            "{failpoint}: the agent should have died there (call: {r:?}, exit: {st:?}); log:\n{}",
            tail(&self.agent.log())
        );
        println!("{failpoint}: agent killed there");
        while_down(self);
        self.agent.set_env("FAILPOINTS", "");
        self.agent.restart();
    }
}

/// A volume placed on a node that dies before its replica there is made (the agent died right after placing it, the
/// node while the agent was down) is rolled back once the node is Offline, so the caller's retry is placed again on
/// the nodes that live. Before, the creation waited for that node for ever: the volume stayed Creating, every retry
/// failed, and the dead node could not be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_placed_on_a_node_that_died_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut k = Cluster::start(dir.path(), &[]).await;
    let vol = uuid::Uuid::new_v4().to_string();
    k.crash_in_then(
        fp::CREATE_PLACED,
        |c| {
            let vol = vol.clone();
            async move { create(c, &vol, 3).await }
        },
        |k| k.engines[2].kill9(),
    )
    .await;
    // Three replicas no longer fit; two do, once the first creation is rolled back.
    let t = Instant::now();
    loop {
        match create(k.c.clone(), &vol, 2).await {
            Ok(()) => break,
            Err(s) => {
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "never placed again: {s:?}\nagent log:\n{}",
                    tail(&k.agent.log())
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    let v =
        k.c.get_volume(pb::GetVolumeRequest { uuid: vol.clone() })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(v.replica_list.len(), 2, "{v:?}");
    assert!(v.replica_list.iter().all(|r| r.node != "reg-3"), "{v:?}");
}

/// A shared (multi-host) volume: the agent killed after recording a second host and before its nexus's engine let it
/// in, then after dropping that host from the record and before the engine refused it. The caller's retry finishes
/// each: the added host connects, the dropped one is refused. Before, the retry found the record as asked and
/// answered at once: the added host was refused for good, the dropped one kept its access.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_added_or_dropped_by_a_call_cut_short_is_let_in_or_refused_by_its_retry() {
    const OTHER: &str = "nqn.2026-11.io.keelson:test-crash-other-host";
    let dir = tempfile::tempdir().unwrap();
    let mut k = Cluster::start(dir.path(), &[]).await;
    let vol = uuid::Uuid::new_v4().to_string();
    create(k.c.clone(), &vol, 2).await.unwrap();
    let to = |host: &'static str, c: ClusterClient<Channel>, vol: String| async move {
        let mut c = c;
        c.publish_volume(pb::PublishVolumeRequest {
            uuid: vol,
            host_nqn: host.into(),
            node: String::new(),
            multi_host: true,
            require_known_node: false,
        })
        .await
        .map(|r| r.into_inner())
    };
    let from = |host: &'static str, c: ClusterClient<Channel>, vol: String| async move {
        let mut c = c;
        c.unpublish_volume(pb::UnpublishVolumeRequest {
            uuid: vol,
            host_nqn: host.into(),
        })
        .await
        .map(drop)
    };
    to(HOST, k.c.clone(), vol.clone()).await.unwrap();
    k.crash_in(fp::PUBLISH_HOST_RECORDED, |c| {
        let vol = vol.clone();
        async move { to(OTHER, c, vol).await.map(drop) }
    })
    .await;
    let v = until_served(|| to(OTHER, k.c.clone(), vol.clone()))
        .await
        .unwrap();
    let connect = |v: &pb::Volume| {
        let mut o = ConnectOptions::new(v.target_addresses[0].parse().unwrap(), &v.nqn);
        o.hostnqn = OTHER.into();
        RemoteNamespace::connect(o, 1)
    };
    connect(&v)
        .await
        .expect("the added host is let in")
        .close()
        .await;
    k.crash_in(fp::UNPUBLISH_HOST_DROPPED, |c| {
        let vol = vol.clone();
        async move { from(OTHER, c, vol).await }
    })
    .await;
    until_served(|| from(OTHER, k.c.clone(), vol.clone()))
        .await
        .unwrap();
    assert!(
        connect(&v).await.is_err(),
        "the dropped host is still let in"
    );
}

pub(crate) fn tail(log: &str) -> String {
    let lines: Vec<_> = log.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

/// Whether a call failed because no agent served it (none listening, not leading yet, or the connection was to an
/// agent that died).
pub(crate) fn unserved(s: &tonic::Status) -> bool {
    s.code() == Code::Unavailable
        || std::error::Error::source(s).is_some_and(|e| e.is::<tonic::transport::Error>())
}

/// How long a restarted agent may take to serve again: on etcd it leads only once the killed one's lease has
/// expired, and under the whole suite's load on two cores that once took more than 30 s.
const SERVED_WITHIN: Duration = Duration::from_secs(90);

/// `op`, retried while no agent answers (starting, campaigning); its first answer from a leader.
pub(crate) async fn until_served<T, F, Fut>(mut op: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let t = Instant::now();
    loop {
        match op().await {
            Err(s) if unserved(&s) && t.elapsed() < SERVED_WITHIN => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

pub(crate) async fn create(
    mut c: ClusterClient<Channel>,
    uuid: &str,
    replicas: u32,
) -> Result<(), tonic::Status> {
    c.create_volume(pb::CreateVolumeRequest {
        uuid: uuid.into(),
        size_bytes: 4 * MIB,
        replicas,
        ..Default::default()
    })
    .await
    .map(drop)
}

pub(crate) async fn publish(
    mut c: ClusterClient<Channel>,
    uuid: &str,
) -> Result<pb::Volume, tonic::Status> {
    c.publish_volume(pb::PublishVolumeRequest {
        uuid: uuid.into(),
        host_nqn: HOST.into(),
        node: String::new(),
        multi_host: false,
        require_known_node: false,
    })
    .await
    .map(|r| r.into_inner())
}

pub(crate) async fn scale(
    mut c: ClusterClient<Channel>,
    uuid: &str,
    n: u32,
) -> Result<(), tonic::Status> {
    c.set_volume_replicas(pb::SetVolumeReplicasRequest {
        uuid: uuid.into(),
        replicas: n,
    })
    .await
    .map(drop)
}

async fn expand(
    mut c: ClusterClient<Channel>,
    uuid: &str,
    size: u64,
) -> Result<pb::Volume, tonic::Status> {
    c.expand_volume(pb::ExpandVolumeRequest {
        uuid: uuid.into(),
        size_bytes: size,
    })
    .await
    .map(|r| r.into_inner())
}

async fn delete(mut c: ClusterClient<Channel>, uuid: &str) -> Result<(), tonic::Status> {
    c.delete_volume(pb::DeleteVolumeRequest { uuid: uuid.into() })
        .await
        .map(drop)
}

/// A volume made from another volume, deleted, the agent killed right after its record went (its hidden clone-source
/// snapshot, whose UUID comes from the volume's, not destroyed yet): made again under the same UUID from the same
/// source (CSI makes the UUID from the claim's name), it holds what the source holds now, not what it held the first
/// time. Before, the first snapshot was left Created and the second creation took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_made_again_from_a_volume_after_a_crash_in_its_delete_has_the_source_s_data_of_now()
 {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agent").display().to_string();
    let mut k = Cluster::start(dir.path(), &["--data-dir", &data]).await;
    let source = uuid::Uuid::new_v4().to_string();
    until_served(|| create(k.c.clone(), &source, 1))
        .await
        .unwrap();
    let v = until_served(|| publish(k.c.clone(), &source))
        .await
        .unwrap();
    let read_at = |v: &pb::Volume| {
        let mut o = ConnectOptions::new(v.target_addresses[0].parse().unwrap(), &v.nqn);
        o.hostnqn = HOST.into();
        o
    };
    let ns = RemoteNamespace::connect(read_at(&v), 1).await.unwrap();
    ns.write(0, block(1)).await.unwrap();
    ns.close().await;
    let copy = uuid::Uuid::new_v4().to_string();
    let from_source = |c: ClusterClient<Channel>, copy: String, source: String| async move {
        let mut c = c;
        c.create_volume(pb::CreateVolumeRequest {
            uuid: copy,
            size_bytes: 4 * MIB,
            replicas: 1,
            source_volume: source,
            ..Default::default()
        })
        .await
        .map(drop)
    };
    until_served(|| from_source(k.c.clone(), copy.clone(), source.clone()))
        .await
        .unwrap();
    k.crash_in(fp::DELETE_RECORD_DROPPED, |c| {
        let copy = copy.clone();
        async move { delete(c, &copy).await }
    })
    .await;
    // The source changes; the copy is made again under the same UUID.
    let v = until_served(|| publish(k.c.clone(), &source))
        .await
        .unwrap();
    let ns = RemoteNamespace::connect(read_at(&v), 1).await.unwrap();
    ns.write(0, block(2)).await.unwrap();
    ns.close().await;
    let t = Instant::now();
    loop {
        match from_source(k.c.clone(), copy.clone(), source.clone()).await {
            Ok(()) => break,
            // The first snapshot is still being deleted.
            Err(e) => assert!(
                t.elapsed() < Duration::from_secs(30),
                "never made again: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = until_served(|| publish(k.c.clone(), &copy)).await.unwrap();
    let ns = RemoteNamespace::connect(read_at(&v), 1).await.unwrap();
    assert_eq!(
        ns.read(0, 64 << 10).await.unwrap(),
        block(2),
        "the copy made again holds the source's data of the first time"
    );
    ns.close().await;
}

pub(crate) fn block(seed: u8) -> Bytes {
    Bytes::from(vec![seed | 1; 64 << 10])
}

/// Writes and reads back a block through the published volume (one nexus holds the replicas' reservations).
pub(crate) async fn write_through(v: &pb::Volume, seed: u8) {
    let mut o = ConnectOptions::new(v.target_addresses[0].parse().unwrap(), &v.nqn);
    o.hostnqn = HOST.into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    ns.write(u64::from(seed) * (64 << 10), block(seed))
        .await
        .unwrap();
    assert_eq!(
        ns.read(u64::from(seed) * (64 << 10), 64 << 10)
            .await
            .unwrap(),
        block(seed)
    );
    ns.close().await;
}

/// Waits until the cluster is consistent: every volume Created with its replica count, on distinct nodes, all
/// confirmed, no expansion in flight; the replicas the engines hold are exactly those the volumes record, each on
/// its node and of its volume's size, and a published volume's nexus is that size too; `settled`
/// (what the step being checked asks of its volume) holds.
async fn consistent(
    c: &ClusterClient<Channel>,
    what: &str,
    settled: impl Fn(&[pb::Volume]) -> bool,
) {
    if let Err(e) = try_consistent(c, &settled).await {
        panic!("{what}: never consistent: {e}");
    }
}

async fn try_consistent(
    c: &ClusterClient<Channel>,
    settled: &impl Fn(&[pb::Volume]) -> bool,
) -> Result<(), String> {
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(60) {
        match check(c.clone(), settled).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}

async fn check(
    mut c: ClusterClient<Channel>,
    settled: &impl Fn(&[pb::Volume]) -> bool,
) -> Result<(), String> {
    let vols = c
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .volumes;
    let nodes = c
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .nodes;
    let mut recorded = BTreeSet::new();
    for v in &vols {
        let on: BTreeSet<_> = v.replica_list.iter().map(|r| &r.node).collect();
        if v.phase != pb::VolumePhase::Created as i32
            || v.expanding_from_bytes != 0
            || v.replica_list.len() != v.replicas as usize
            || on.len() != v.replica_list.len()
            || v.replica_list.iter().any(|r| !r.created)
        {
            return Err(format!("volume not settled: {v:?}"));
        }
        recorded.extend(
            v.replica_list
                .iter()
                .map(|r| (r.uuid.clone(), r.node.clone())),
        );
    }
    let size_of: std::collections::BTreeMap<&str, u64> = vols
        .iter()
        .flat_map(|v| {
            v.replica_list
                .iter()
                .map(|r| (r.uuid.as_str(), v.size_bytes))
        })
        .collect();
    let mut held = BTreeSet::new();
    let mut count = 0;
    for n in &nodes {
        let mut e = EngineClient::connect(n.engine_endpoint.clone())
            .await
            .map_err(|e| e.to_string())?;
        for r in e
            .list_replicas(epb::ListReplicasRequest {})
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .replicas
        {
            count += 1;
            if size_of.get(r.uuid.as_str()).is_some_and(|s| *s != r.size) {
                return Err(format!("replica {} is {} bytes: {vols:?}", r.uuid, r.size));
            }
            held.insert((r.uuid, n.name.clone()));
        }
        for x in e
            .list_nexuses(epb::ListNexusesRequest {})
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .nexuses
        {
            if let Some(v) = volume(&vols, &x.uuid).filter(|v| v.nexus_node == n.name)
                && x.size_bytes != v.size_bytes
            {
                return Err(format!(
                    "nexus of {} is {} bytes: {v:?}",
                    v.uuid, x.size_bytes
                ));
            }
        }
    }
    if held != recorded || count != held.len() {
        return Err(format!(
            "engines hold {held:?} ({count}), volumes record {recorded:?}"
        ));
    }
    if !settled(&vols) {
        return Err(format!("step not done: {vols:#?}"));
    }
    Ok(())
}

fn volume<'a>(vols: &'a [pb::Volume], uuid: &str) -> Option<&'a pb::Volume> {
    vols.iter().find(|v| v.uuid == uuid)
}

async fn every_stage(dir: &Path, store: &[&str]) {
    let mut k = Cluster::start(dir, store).await;

    // Create: killed after the placement is recorded, and after an engine made a replica the record lacks. The
    // new agent finishes the creation; the caller's retry gets the same volume.
    for f in [fp::CREATE_PLACED, fp::CREATE_REPLICA_CREATED] {
        let vol = uuid::Uuid::new_v4().to_string();
        k.crash_in(f, |c| {
            let vol = vol.clone();
            async move { create(c, &vol, 3).await }
        })
        .await;
        until_served(|| create(k.c.clone(), &vol, 3)).await.unwrap();
        k.consistent(f, |v| volume(v, &vol).is_some()).await;
        until_served(|| delete(k.c.clone(), &vol)).await.unwrap();
    }

    // Publish: killed after the nexus and its key are recorded, after the engine made the nexus, after it exported
    // it. Publishing again gives a nexus that takes writes (it holds the replicas' reservations).
    let vol = uuid::Uuid::new_v4().to_string();
    until_served(|| create(k.c.clone(), &vol, 2)).await.unwrap();
    for (i, f) in [
        fp::PUBLISH_NEXUS_RECORDED,
        fp::PUBLISH_NEXUS_CREATED,
        fp::PUBLISH_PUBLISHED,
    ]
    .into_iter()
    .enumerate()
    {
        k.crash_in(f, |c| {
            let vol = vol.clone();
            async move { publish(c, &vol).await.map(drop) }
        })
        .await;
        if f == fp::PUBLISH_PUBLISHED {
            // Exported, the record not saying so: a snapshot before the publish is asked again is taken through
            // that nexus (its hosts may write through it), and has a copy on each replica.
            let snap = uuid::Uuid::new_v4().to_string();
            let s = until_served(|| {
                let mut c = k.c.clone();
                let (vol, snap) = (vol.clone(), snap.clone());
                async move {
                    c.create_snapshot(pb::CreateSnapshotRequest {
                        volume: vol,
                        uuid: snap,
                    })
                    .await
                }
            })
            .await
            .unwrap()
            .into_inner();
            assert!(s.ready && s.nodes.len() == 2, "{f}: {s:?}");
            until_served(|| {
                let mut c = k.c.clone();
                let snap = snap.clone();
                async move {
                    c.delete_snapshot(pb::DeleteSnapshotRequest { uuid: snap })
                        .await
                }
            })
            .await
            .unwrap();
        }
        let v = until_served(|| publish(k.c.clone(), &vol)).await.unwrap();
        write_through(&v, i as u8).await;
        k.consistent(f, |v| volume(v, &vol).is_some()).await;
        let unpublish = |c: ClusterClient<Channel>, vol: String| async move {
            let mut c = c;
            c.unpublish_volume(pb::UnpublishVolumeRequest {
                uuid: vol,
                host_nqn: String::new(),
            })
            .await
            .map(drop)
        };
        if i == 0 {
            // Unpublish killed once it is recorded, before the engine ended the nexus: the next agent's healing
            // finishes it (it made the nexus again, exported to the host just detached, when the record still said
            // published), and the CO's retry finds it done.
            k.crash_in(fp::UNPUBLISH_MARKED, |c| unpublish(c, vol.clone()))
                .await;
            let nexuses_of_vol = || async {
                let mut held = Vec::new();
                let nodes = until_served(|| {
                    let mut c = k.c.clone();
                    async move { c.list_nodes(pb::ListNodesRequest {}).await }
                })
                .await
                .unwrap()
                .into_inner()
                .nodes;
                for n in nodes {
                    let mut e = EngineClient::connect(n.engine_endpoint).await.unwrap();
                    let listed = e
                        .list_nexuses(epb::ListNexusesRequest {})
                        .await
                        .unwrap()
                        .into_inner()
                        .nexuses;
                    if listed.iter().any(|x| x.uuid == vol) {
                        held.push(n.name);
                    }
                }
                held
            };
            let t = Instant::now();
            loop {
                let held = nexuses_of_vol().await;
                if held.is_empty() {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "the unpublish was never finished: a nexus on {held:?}\n{}",
                    tail(&k.agent.log())
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let get = || {
                let mut c = k.c.clone();
                let vol = vol.clone();
                async move { c.get_volume(pb::GetVolumeRequest { uuid: vol }).await }
            };
            // A few more of its sweeps: it stays unpublished.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let got = until_served(get).await.unwrap().into_inner();
            assert!(
                got.nexus_node.is_empty() && nexuses_of_vol().await.is_empty(),
                "published again after an unpublish cut short: {got:?}"
            );
            until_served(|| unpublish(k.c.clone(), vol.clone()))
                .await
                .unwrap();
        }
        // Unpublished for the next stage, but the last (scaling works on it published).
        if i == 1 {
            until_served(|| {
                let mut c = k.c.clone();
                let vol = vol.clone();
                async move {
                    c.unpublish_volume(pb::UnpublishVolumeRequest {
                        uuid: vol,
                        host_nqn: String::new(),
                    })
                    .await
                }
            })
            .await
            .unwrap();
        }
    }

    // Snapshot of the published volume: killed after it is recorded, and after the engines took it. Asked again,
    // it is taken (or found) and every copy the engines hold is one the record lists.
    for f in [fp::SNAPSHOT_RECORDED, fp::SNAPSHOT_TAKEN] {
        let snap = uuid::Uuid::new_v4().to_string();
        let take = |c: ClusterClient<Channel>, vol: String, snap: String| async move {
            let mut c = c;
            c.create_snapshot(pb::CreateSnapshotRequest {
                volume: vol,
                uuid: snap,
            })
            .await
        };
        k.crash_in(f, |c| {
            take(c, vol.clone(), snap.clone()).map(|r| r.map(drop))
        })
        .await;
        let retried_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let s = until_served(|| take(k.c.clone(), vol.clone(), snap.clone()))
            .await
            .unwrap()
            .into_inner();
        assert!(s.ready && s.nodes.len() == 2, "{f}: {s:?}");
        // Its copies were taken again by the retry: its creation time is the retry's, not the first call's.
        assert!(
            s.created_unix_ms >= retried_ms,
            "{f}: created at {} ms, retried at {retried_ms} ms",
            s.created_unix_ms
        );
        let mut held = Vec::new();
        for n in
            k.c.clone()
                .list_nodes(pb::ListNodesRequest {})
                .await
                .unwrap()
                .into_inner()
                .nodes
        {
            let mut e = EngineClient::connect(n.engine_endpoint).await.unwrap();
            if e.list_snapshots(epb::ListSnapshotsRequest {})
                .await
                .unwrap()
                .into_inner()
                .snapshots
                .iter()
                .any(|x| x.uuid == snap)
            {
                held.push(n.name);
            }
        }
        let mut recorded = s.nodes.clone();
        recorded.sort();
        held.sort();
        assert_eq!(held, recorded, "{f}: copies held versus recorded");
        k.c.clone()
            .delete_snapshot(pb::DeleteSnapshotRequest { uuid: snap })
            .await
            .unwrap();
    }

    // Expand the published volume: killed after the new size is recorded, after an engine grew a replica, after
    // the nexus grew. Asked again (or by the reconciler), it finishes; the host sees the new size and writes there.
    for (i, f) in [
        fp::EXPAND_RECORDED,
        fp::EXPAND_REPLICA_GROWN,
        fp::EXPAND_NEXUS_GROWN,
    ]
    .into_iter()
    .enumerate()
    {
        let size = (5 + i as u64) * MIB;
        k.crash_in(f, |c| {
            let vol = vol.clone();
            async move { expand(c, &vol, size).await.map(drop) }
        })
        .await;
        let v = until_served(|| expand(k.c.clone(), &vol, size))
            .await
            .unwrap();
        assert_eq!((v.size_bytes, v.expanding_from_bytes), (size, 0), "{f}");
        k.consistent(f, |v| volume(v, &vol).is_some_and(|v| v.size_bytes == size))
            .await;
        let v = until_served(|| publish(k.c.clone(), &vol)).await.unwrap();
        let mut o = ConnectOptions::new(v.target_addresses[0].parse().unwrap(), &v.nqn);
        o.hostnqn = HOST.into();
        let ns = RemoteNamespace::connect(o, 1).await.unwrap();
        assert_eq!(ns.size_bytes(), size, "{f}");
        ns.write(size - 4096, Bytes::from(vec![i as u8 + 1; 4096]))
            .await
            .unwrap();
        ns.close().await;
    }

    // Scale up 2 → 3 on the published volume: killed after the new replica is placed, created, added.
    for f in [
        fp::HEAL_REPLICA_PLACED,
        fp::HEAL_REPLICA_CREATED,
        fp::HEAL_CHILD_ADDED,
    ] {
        k.crash_in(f, |c| {
            let vol = vol.clone();
            async move { scale(c, &vol, 3).await }
        })
        .await;
        k.consistent(f, |v| {
            volume(v, &vol).is_some_and(|v| v.replicas == 3 && v.state == "Online")
        })
        .await;
        // Back to 2 (unarmed) for the next stage.
        until_served(|| scale(k.c.clone(), &vol, 2)).await.unwrap();
        k.consistent("scaled back", |v| {
            volume(v, &vol).is_some_and(|v| v.replicas == 2)
        })
        .await;
    }
    let v = until_served(|| publish(k.c.clone(), &vol)).await.unwrap();
    write_through(&v, 7).await;

    // Scale down 3 → 2: killed after the nexus let the surplus replica go (recorded out of sync before), after the
    // retired replica is recorded as garbage, and after it left the record.
    for f in [
        fp::RETIRE_CHILD_REMOVED,
        fp::RETIRE_GARBAGE_RECORDED,
        fp::RETIRE_DROPPED,
    ] {
        until_served(|| scale(k.c.clone(), &vol, 3)).await.unwrap();
        k.consistent("scaled up", |v| {
            volume(v, &vol).is_some_and(|v| v.replicas == 3 && v.state == "Online")
        })
        .await;
        k.crash_in(f, |c| {
            let vol = vol.clone();
            async move { scale(c, &vol, 2).await }
        })
        .await;
        k.consistent(f, |v| volume(v, &vol).is_some_and(|v| v.replicas == 2))
            .await;
    }

    // Replace: the node of a replica that is not the nexus's is killed; its child faults and the agent dies while
    // retiring it. The next agent finishes the retirement and places the replacement on the free node; when the
    // dead node's engine returns, its retired replica is destroyed.
    let v = until_served(|| publish(k.c.clone(), &vol)).await.unwrap();
    let victim = v
        .replica_list
        .iter()
        .find(|r| r.node != v.nexus_node)
        .unwrap()
        .node
        .clone();
    let i: usize = victim.strip_prefix("reg-").unwrap().parse().unwrap();
    k.agent
        .set_env("FAILPOINTS", &format!("{}=return", fp::RETIRE_DROPPED));
    k.agent.restart();
    k.engines[i - 1].kill9();
    // Writes go on (no error) and make the nexus see the child fail.
    for s in 10..14 {
        write_through(&v, s).await;
    }
    let st = k.agent.exited(Duration::from_secs(30)).await;
    assert!(
        st.and_then(|s| s.signal()) == Some(9),
        "the agent should have died retiring the faulted replica: {st:?}\n{}",
        tail(&k.agent.log())
    );
    k.agent.set_env("FAILPOINTS", "");
    k.agent.restart();
    let dead = victim.clone();
    let t = Instant::now();
    loop {
        let v = until_served(|| {
            let mut c = k.c.clone();
            let vol = vol.clone();
            async move { c.get_volume(pb::GetVolumeRequest { uuid: vol }).await }
        })
        .await
        .unwrap()
        .into_inner();
        if v.state == "Online" && v.replica_list.iter().all(|r| r.node != dead && r.created) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never replaced: {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    k.engines[i - 1].restart();
    k.consistent("replaced, and the dead node back", |v| {
        volume(v, &vol).is_some_and(|v| v.replica_list.iter().all(|r| r.node != dead))
    })
    .await;
    // Every write made through the crashes reads back.
    let v = until_served(|| publish(k.c.clone(), &vol)).await.unwrap();
    let mut o = ConnectOptions::new(v.target_addresses[0].parse().unwrap(), &v.nqn);
    o.hostnqn = HOST.into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    for s in [0u8, 1, 2, 7, 10, 11, 12, 13] {
        assert_eq!(
            ns.read(u64::from(s) * (64 << 10), 64 << 10).await.unwrap(),
            block(s),
            "write {s}"
        );
    }
    ns.close().await;

    // Delete of the published volume: killed after it is marked, after its nexus is destroyed, while retiring its
    // replicas. Deleting again (or the reconciler) finishes it.
    for f in [
        fp::DELETE_MARKED,
        fp::DELETE_NEXUS_DESTROYED,
        fp::RETIRE_GARBAGE_RECORDED,
    ] {
        let vol = if f == fp::DELETE_MARKED {
            vol.clone()
        } else {
            let v2 = uuid::Uuid::new_v4().to_string();
            until_served(|| create(k.c.clone(), &v2, 2)).await.unwrap();
            until_served(|| publish(k.c.clone(), &v2)).await.unwrap();
            v2
        };
        k.crash_in(f, |c| {
            let vol = vol.clone();
            async move { delete(c, &vol).await }
        })
        .await;
        match until_served(|| delete(k.c.clone(), &vol)).await {
            Ok(()) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => panic!("{f}: delete again: {s:?}"),
        }
        k.consistent(f, |v| volume(v, &vol).is_none()).await;
    }
    drop(k.engines);
}

/// Agent A on `store` (an etcd) with `engines` io-engines reg-1.. registered to it and to agent B's port (B not
/// started): A, B's port, the engines and A's client.
async fn leader_a_of_two_on_etcd(
    dir: &Path,
    store: &[&str],
    engines: u32,
) -> (Proc, u16, Vec<Proc>, ClusterClient<Channel>) {
    let (pa, pb_) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let a = agent_with(dir, pa, store, "agent-a");
    let (ua, ub) = (
        format!("http://127.0.0.1:{pa}"),
        format!("http://127.0.0.1:{pb_}"),
    );
    let procs: Vec<_> = (1..=engines)
        .map(|i| engine_with(dir, i, &format!("{ua},{ub}")))
        .collect();
    let names: Vec<String> = (1..=engines).map(|i| format!("reg-{i}")).collect();
    let want: Vec<(&str, pb::NodeState)> = names.iter().map(|n| (n.as_str(), Online)).collect();
    wait_for(pa, &want, "registration").await;
    let ca = ClusterClient::connect(ua).await.unwrap();
    (a, pb_, procs, ca)
}

/// Agent A (its client `ca`) restarted with `failpoints` armed and leading again, then agent B started on `port` and
/// standing by (it answers that it does not lead): B and its client. (B cannot take the lead while A restarts: A's
/// lease holds until it expires, and A campaigns again at once.)
async fn armed_leader_and_standby(
    a: &mut Proc,
    ca: &ClusterClient<Channel>,
    failpoints: &str,
    dir: &Path,
    port: u16,
    store: &[&str],
) -> (Proc, ClusterClient<Channel>) {
    a.set_env("FAILPOINTS", failpoints);
    a.restart();
    until_served(|| {
        let mut c = ca.clone();
        async move { c.list_volumes(pb::ListVolumesRequest::default()).await }
    })
    .await
    .unwrap();
    let b = agent_with(dir, port, store, "agent-b");
    let cb = ClusterClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy(),
    );
    let t = Instant::now();
    loop {
        let standby = cb
            .clone()
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap_err();
        if standby.message().contains("does not lead") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{standby:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (b, cb)
}

/// Two agents on one etcd: the leader is killed in the middle of a scale operation (after the new replica is
/// created, before the record says so); the other agent takes the lead within the lease TTL and finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_agent_finishes_a_scale_the_killed_leader_began() {
    let Some(etcd) =
        Etcd::start("the_standby_agent_finishes_a_scale_the_killed_leader_began").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = ["--store", "etcd", "--etcd", etcd.endpoint.as_str()];
    let (mut a, pb_, engines, ca) = leader_a_of_two_on_etcd(dir.path(), &store, 3).await;
    let vol = uuid::Uuid::new_v4().to_string();
    until_served(|| create(ca.clone(), &vol, 2)).await.unwrap();
    until_served(|| publish(ca.clone(), &vol)).await.unwrap();

    // A leads; B waits. A is restarted armed (B cannot take the lead meanwhile: A's lease holds until it expires,
    // and A campaigns again at once); B starts after A leads again.
    let (_b, cb) = armed_leader_and_standby(
        &mut a,
        &ca,
        &format!("{}=return", fp::HEAL_REPLICA_CREATED),
        dir.path(),
        pb_,
        &store,
    )
    .await;

    let r = scale(ca.clone(), &vol, 3).await;
    let st = a.exited(Duration::from_secs(20)).await;
    assert!(
        st.and_then(|s| s.signal()) == Some(9),
        "the leader should have died in the scale: {r:?} {st:?}"
    );
    let t = Instant::now();
    consistent(&cb, "the standby finished the scale", |v| {
        volume(v, &vol).is_some_and(|v| v.replicas == 3 && v.state == "Online")
    })
    .await;
    println!(
        "the standby finished the scale {:?} after the leader died",
        t.elapsed()
    );
    drop(engines);
}

/// Two agents on one etcd: the leader, told to stop (SIGTERM) while a publish it serves is in flight, resigns only
/// once that call has ended, so the agent taking over never meets its engine calls. Before, it resigned at once and
/// went on serving the call: the standby led (and could make or destroy nexuses) while the old leader's publish was
/// still making its nexus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_resigns_only_once_its_calls_in_flight_have_ended() {
    let Some(etcd) =
        Etcd::start("a_stopped_leader_resigns_only_once_its_calls_in_flight_have_ended").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = ["--store", "etcd", "--etcd", etcd.endpoint.as_str()];
    let (mut a, pb_, engines, ca) = leader_a_of_two_on_etcd(dir.path(), &store, 2).await;
    let vol = uuid::Uuid::new_v4().to_string();
    until_served(|| create(ca.clone(), &vol, 2)).await.unwrap();
    // A publish waits 2 s between sharing the replicas and making the nexus.
    let (_b, cb) = armed_leader_and_standby(
        &mut a,
        &ca,
        &format!("{}=return(2000)", fp::PUBLISH_CREATING),
        dir.path(),
        pb_,
        &store,
    )
    .await;
    let published = tokio::spawn({
        let ca = ca.clone();
        let vol = vol.clone();
        async move {
            let r = publish(ca, &vol).await;
            (r, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.signal("-TERM");
    // When the standby first leads.
    let t = Instant::now();
    let b_leads = loop {
        if cb
            .clone()
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .is_ok()
        {
            break Instant::now();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the standby never led"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (r, done) = published.await.unwrap();
    assert!(r.is_ok(), "{r:?}\n{}", a.log());
    assert!(
        b_leads >= done,
        "the standby led {:?} before the old leader's publish ended",
        done - b_leads
    );
    let st = a.exited(Duration::from_secs(20)).await;
    assert!(st.is_some_and(|s| s.success()), "{st:?}\n{}", a.log());
    drop(engines);
}

/// The store goes away (etcd frozen) under a working cluster: a create answers UNAVAILABLE in bounded time (no
/// hang) and leaves no replica behind; once etcd is back (and the agent, which exits when it loses its store, is
/// restarted by its supervisor), the same create succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_down_calls_are_unavailable_leave_nothing_and_work_again_after() {
    let Some(etcd) =
        Etcd::start("with_the_store_down_calls_are_unavailable_leave_nothing_and_work_again_after")
            .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port("127.0.0.1");
    let store = ["--store", "etcd", "--etcd", etcd.endpoint.as_str()];
    let mut agent = agent_with(dir.path(), port, &store, "agent");
    let url = format!("http://127.0.0.1:{port}");
    let engines: Vec<_> = (1..=3).map(|i| engine_with(dir.path(), i, &url)).collect();
    wait_for(
        port,
        &[("reg-1", Online), ("reg-2", Online), ("reg-3", Online)],
        "registration",
    )
    .await;
    let c = ClusterClient::new(
        tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect_lazy(),
    );
    consistent(&c, "before", |v| v.is_empty()).await;

    etcd.signal("-STOP");
    let vol = uuid::Uuid::new_v4().to_string();
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), create(c.clone(), &vol, 3))
        .await
        .expect("the call ends by itself");
    let took = t.elapsed();
    let e = r.unwrap_err();
    assert!(unserved(&e), "UNAVAILABLE (or no agent to answer): {e:?}");
    println!("create with etcd frozen: {:?} after {took:?}", e.code());
    etcd.signal("-CONT");

    // The supervisor's part: an agent that lost its store exits; start it again.
    if agent.exited(Duration::from_secs(15)).await.is_some() {
        agent.restart();
    }
    until_served(|| create(c.clone(), &vol, 3)).await.unwrap();
    consistent(&c, "after", |v| volume(v, &vol).is_some()).await;
    drop(engines);
}
