//! Pools and replicas in a real io-engine process, driven through the engine gRPC API: restart and import,
//! allow-lists, precise errors for bad requests (with the disk unchanged), running out of space, and `kill -9` in
//! the middle of replica creation, cluster allocation and snapshots.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nvmf_target::block::{BlockDevice, BlockError};
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use proto::engine as pb;
use proto::engine::engine_client::EngineClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::free_port;

const MIB: u64 = 1 << 20;
pub const HOST: &str = "nqn.2026-11.io.keelson:node-test-nexus";

/// An io-engine process with one pool on a file (or none: [`PoolNode::bare`]); restartable on the same ports.
pub struct PoolNode {
    child: Option<Child>,
    name: String,
    pub ip: String,
    pub port: u16,
    grpc: u16,
    disk: PathBuf,
    /// Where the io-engine's output goes (shown when it does not come up).
    log: PathBuf,
}

impl PoolNode {
    pub fn start(ip: &str, disk: &Path) -> PoolNode {
        Self::start_named(ip, "pools-test", disk)
    }

    /// `name` is the node name: nexuses on nodes with different names are different hosts.
    /// An io-engine with no pool at start.
    pub fn bare(ip: &str, name: &str) -> PoolNode {
        Self::start_named(ip, name, Path::new(""))
    }

    pub fn start_named(ip: &str, name: &str, disk: &Path) -> PoolNode {
        let port = free_port(ip);
        let mut n = PoolNode {
            child: None,
            name: name.into(),
            ip: ip.into(),
            port,
            grpc: free_port(ip),
            disk: disk.to_path_buf(),
            log: std::env::temp_dir().join(format!("keelson-pool-node-{name}-{port}.log")),
        };
        n.restart();
        n
    }

    pub fn restart(&mut self) {
        self.kill9();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_io-engine"));
        cmd.args(["--node-name", &self.name])
            .args(["--listen", &format!("{}:{}", self.ip, self.port)])
            .args(["--grpc", &format!("{}:{}", self.ip, self.grpc)]);
        if !self.disk.as_os_str().is_empty() {
            cmd.arg("--pool")
                .arg(format!("pool0={}", self.disk.display()));
        }
        let log = std::fs::File::create(&self.log).unwrap();
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.child = Some(child);
    }

    /// Sends a signal (`-STOP`, `-CONT`, ...) to the io-engine.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// What the io-engine logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub async fn api(&self) -> EngineClient<Channel> {
        let url = format!("http://{}:{}", self.ip, self.grpc);
        for _ in 0..200 {
            if let Ok(c) = EngineClient::connect(url.clone()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // The log's last lines, without a backtrace.
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let log = log.split("Stack backtrace").next().unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        panic!(
            "io-engine at {url} never came up; its log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    pub async fn connect(&self, replica: &str, host: &str) -> Result<RemoteNamespace, String> {
        let addr = format!("{}:{}", self.ip, self.port).parse().unwrap();
        let mut o = ConnectOptions::new(addr, &format!("nqn.2026-11.io.keelson:replica-{replica}"));
        o.hostnqn = host.to_string();
        RemoteNamespace::connect(o, 1)
            .await
            .map_err(|e| e.to_string())
    }
}

impl Drop for PoolNode {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_file(&self.log);
    }
}

pub fn disk(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

pub fn pattern(seed: u64, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (seed as u8).wrapping_mul(31).wrapping_add((i / 4096) as u8) | 1)
            .collect::<Vec<u8>>(),
    )
}

pub fn replica_req(uuid: &str, size: u64) -> pb::CreateReplicaRequest {
    pb::CreateReplicaRequest {
        pool: "pool0".into(),
        uuid: uuid.into(),
        size,
        share: true,
        allowed_hosts: vec![HOST.into()],
    }
}

pub async fn pool0(api: &mut EngineClient<Channel>) -> pb::Pool {
    let pools = api
        .list_pools(pb::ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pools;
    pools
        .into_iter()
        .find(|p| p.name == "pool0")
        .expect("pool0 listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_come_back_exported_after_a_restart_and_only_to_allowed_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = PoolNode::start("127.0.0.1", &disk(dir.path(), "p.img", 256 * MIB));
    let mut api = node.api().await;
    let p = pool0(&mut api).await;
    assert_eq!((p.allocated, p.committed, p.cluster_size), (0, 0, 4 << 20));
    let id = uuid::Uuid::new_v4().to_string();
    let r = api
        .create_replica(replica_req(&id, 64 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert!(r.uri.ends_with(&format!(":replica-{id}")), "{}", r.uri);
    assert_eq!(r.allocated, 0);
    // Idempotent.
    api.create_replica(replica_req(&id, 64 * MIB))
        .await
        .unwrap();

    let e = node
        .connect(&id, "nqn.2026-11.io.keelson:node-stranger")
        .await
        .err();
    assert!(e.is_some(), "a host not on the allow-list connected");
    let ns = node.connect(&id, HOST).await.unwrap();
    ns.write(10 * MIB, pattern(1, 1 << 20)).await.unwrap();
    ns.write(40 * MIB + 4096, pattern(2, 8192)).await.unwrap();
    ns.flush().await.unwrap();
    let r = api
        .list_replicas(pb::ListReplicasRequest {})
        .await
        .unwrap()
        .into_inner()
        .replicas;
    assert_eq!(r[0].allocated, 8 * MIB, "two 4 MiB clusters");
    let snap = uuid::Uuid::new_v4().to_string();
    api.create_snapshot(pb::CreateSnapshotRequest {
        replica: id.clone(),
        uuid: snap.clone(),
    })
    .await
    .unwrap();
    ns.write(10 * MIB, pattern(3, 4096)).await.unwrap();
    ns.close().await;

    node.restart();
    let mut api = node.api().await;
    let p = pool0(&mut api).await;
    assert_eq!((p.replicas, p.snapshots, p.committed), (1, 1, 64 * MIB));
    assert_eq!(
        p.allocated,
        12 * MIB,
        "the copy-on-write took a third cluster"
    );
    let ns = node.connect(&id, HOST).await.unwrap();
    assert_eq!(ns.read(10 * MIB, 4096).await.unwrap(), pattern(3, 4096));
    assert_eq!(
        ns.read(10 * MIB + 4096, MIB - 4096).await.unwrap(),
        pattern(1, 1 << 20).slice(4096..)
    );
    assert_eq!(
        ns.read(40 * MIB + 4096, 8192).await.unwrap(),
        pattern(2, 8192)
    );
    assert!(ns.read(0, MIB).await.unwrap().iter().all(|b| *b == 0));
    ns.close().await;

    // A clone of the snapshot holds the data as it was before the last write.
    let clone = uuid::Uuid::new_v4().to_string();
    api.create_clone(pb::CreateCloneRequest {
        snapshot: snap.clone(),
        uuid: clone.clone(),
        share: true,
        allowed_hosts: vec![HOST.into()],
    })
    .await
    .unwrap();
    let c = node.connect(&clone, HOST).await.unwrap();
    assert_eq!(c.read(10 * MIB, MIB).await.unwrap(), pattern(1, 1 << 20));
    c.close().await;

    // Unshared: no host may connect, and that too survives a restart.
    api.unshare_replica(pb::UnshareReplicaRequest { uuid: id.clone() })
        .await
        .unwrap();
    node.restart();
    let mut api = node.api().await;
    assert!(node.connect(&id, HOST).await.is_err());
    api.share_replica(pb::ShareReplicaRequest {
        uuid: id.clone(),
        allowed_hosts: vec![HOST.into()],
    })
    .await
    .unwrap();
    node.connect(&id, HOST).await.unwrap().close().await;
    for v in [&clone, &id] {
        api.destroy_replica(pb::DestroyReplicaRequest {
            uuid: v.to_string(),
        })
        .await
        .unwrap();
    }
    api.destroy_snapshot(pb::DestroySnapshotRequest { uuid: snap })
        .await
        .unwrap();
    let p = pool0(&mut api).await;
    assert_eq!((p.allocated, p.replicas, p.snapshots), (0, 0, 0));
}

/// Three io-engines on 127.0.0.1-.3 (named `{prefix}-N`), each with a pool on a `disk_size` file and one shared
/// replica of `size` bytes open to any host. Returns the nodes with their replica UUIDs, and the replicas' URIs.
pub async fn replica_nodes(
    dir: &Path,
    prefix: &str,
    size: u64,
    disk_size: u64,
) -> (Vec<(PoolNode, String)>, Vec<String>) {
    let mut nodes = Vec::new();
    let mut uris = Vec::new();
    for i in 1..=3 {
        let node = PoolNode::start_named(
            &format!("127.0.0.{i}"),
            &format!("{prefix}-{i}"),
            &disk(dir, &format!("{prefix}{i}.img"), disk_size),
        );
        let id = uuid::Uuid::new_v4().to_string();
        let mut req = replica_req(&id, size);
        req.allowed_hosts = vec![];
        let r = node.api().await.create_replica(req).await.unwrap();
        uris.push(r.into_inner().uri);
        nodes.push((node, id));
    }
    (nodes, uris)
}

/// Publishes a nexus to any host.
pub async fn publish(api: &mut EngineClient<Channel>, vol: &str) -> Result<(), tonic::Status> {
    api.publish_nexus(pb::PublishNexusRequest {
        uuid: vol.to_string(),
        ana_group: 1,
        allow_any_host: true,
        allowed_hosts: vec![],
    })
    .await
    .map(drop)
}

/// Connects to a published volume on `node` as a fresh host.
pub async fn open_volume(node: &PoolNode, vol: &str) -> RemoteNamespace {
    let addr = format!("{}:{}", node.ip, node.port).parse().unwrap();
    let nqn = format!("nqn.2026-11.io.keelson:vol-{vol}");
    RemoteNamespace::connect(ConnectOptions::new(addr, &nqn), 1)
        .await
        .unwrap()
}

fn file_hash(p: &Path) -> u32 {
    crc32c::crc32c(&std::fs::read(p).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_codes_and_leave_the_disk_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let disk0 = disk(dir.path(), "p.img", 64 * MIB);
    let node = PoolNode::start("127.0.0.1", &disk0);
    let mut api = node.api().await;
    let id = uuid::Uuid::new_v4().to_string();
    api.create_replica(replica_req(&id, 8 * MIB)).await.unwrap();
    let before = file_hash(&disk0);
    let unknown = uuid::Uuid::new_v4().to_string();

    let mut cases: Vec<(&str, Code, Result<(), tonic::Status>)> = Vec::new();
    let req = |uuid: &str, size: u64| replica_req(uuid, size);
    let fresh = uuid::Uuid::new_v4().to_string();
    cases.push((
        "zero size",
        Code::InvalidArgument,
        api.create_replica(req(&fresh, 0)).await.map(drop),
    ));
    cases.push((
        "unaligned size",
        Code::InvalidArgument,
        api.create_replica(req(&fresh, 1000)).await.map(drop),
    ));
    cases.push((
        "larger than the pool",
        Code::ResourceExhausted,
        api.create_replica(req(&fresh, 1 << 40)).await.map(drop),
    ));
    cases.push((
        "same uuid, other size",
        Code::AlreadyExists,
        api.create_replica(req(&id, 16 * MIB)).await.map(drop),
    ));
    cases.push((
        "not a uuid",
        Code::InvalidArgument,
        api.create_replica(req("nope", MIB)).await.map(drop),
    ));
    let mut other_pool = req(&fresh, MIB);
    other_pool.pool = "pool9".into();
    cases.push((
        "unknown pool",
        Code::NotFound,
        api.create_replica(other_pool).await.map(drop),
    ));
    let mut bad_host = req(&fresh, MIB);
    bad_host.allowed_hosts = vec!["not an nqn".into()];
    cases.push((
        "bad host NQN",
        Code::InvalidArgument,
        api.create_replica(bad_host).await.map(drop),
    ));
    cases.push((
        "destroy unknown replica",
        Code::NotFound,
        api.destroy_replica(pb::DestroyReplicaRequest {
            uuid: unknown.clone(),
        })
        .await
        .map(drop),
    ));
    cases.push((
        "snapshot of unknown replica",
        Code::NotFound,
        api.create_snapshot(pb::CreateSnapshotRequest {
            replica: unknown.clone(),
            uuid: fresh.clone(),
        })
        .await
        .map(drop),
    ));
    cases.push((
        "clone of a replica",
        Code::InvalidArgument,
        api.create_clone(pb::CreateCloneRequest {
            snapshot: id.clone(),
            uuid: fresh.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
    ));
    // A subsystem made through the generic calls under a replica's name: a shared replica of that UUID is refused,
    // not exported as that subsystem's namespace (a nexus would have read and written the stranger's).
    let squatted = uuid::Uuid::new_v4().to_string();
    let squatted_nqn = format!("nqn.2026-11.io.keelson:replica-{squatted}");
    api.create_subsystem(pb::CreateSubsystemRequest {
        nqn: squatted_nqn.clone(),
        allow_any_host: true,
        ..Default::default()
    })
    .await
    .unwrap();
    api.add_namespace(pb::AddNamespaceRequest {
        nqn: squatted_nqn.clone(),
        backend: Some(pb::Backend {
            kind: Some(pb::backend::Kind::Memory(pb::MemoryBackend {
                size_bytes: MIB,
            })),
            block_size: 512,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    cases.push((
        "a shared replica under a stranger subsystem's name",
        Code::FailedPrecondition,
        api.create_replica(req(&squatted, MIB)).await.map(drop),
    ));
    cases.push((
        "destroy a pool with replicas",
        Code::FailedPrecondition,
        api.destroy_pool(pb::DestroyPoolRequest {
            name: "pool0".into(),
        })
        .await
        .map(drop),
    ));
    let create_pool = |name: &str, disk: &str, cluster: u32| pb::CreatePoolRequest {
        name: name.into(),
        disk: disk.into(),
        cluster_size: cluster,
        ..Default::default()
    };
    let d0 = disk0.display().to_string();
    cases.push((
        "same pool, other cluster size",
        Code::AlreadyExists,
        api.create_pool(create_pool("pool0", &d0, 1 << 20))
            .await
            .map(drop),
    ));
    cases.push((
        "disk in use",
        Code::AlreadyExists,
        api.create_pool(create_pool("pool1", &d0, 0))
            .await
            .map(drop),
    ));
    cases.push((
        "relative disk",
        Code::InvalidArgument,
        api.create_pool(create_pool("pool1", "p.img", 0))
            .await
            .map(drop),
    ));
    cases.push((
        "missing disk",
        Code::InvalidArgument,
        api.create_pool(create_pool("pool1", "/nonexistent/x", 0))
            .await
            .map(drop),
    ));
    cases.push(("bad cluster size", Code::InvalidArgument, {
        let d = disk(dir.path(), "q.img", 64 * MIB);
        api.create_pool(create_pool("pool1", &d.display().to_string(), 3 << 20))
            .await
            .map(drop)
    }));
    cases.push(("block size neither 512 nor 4096", Code::InvalidArgument, {
        let d = disk(dir.path(), "r.img", 64 * MIB);
        api.create_pool(pb::CreatePoolRequest {
            block_size: 8192,
            ..create_pool("pool1", &d.display().to_string(), 0)
        })
        .await
        .map(drop)
    }));
    cases.push((
        "nexus child that does not resolve",
        Code::Unavailable,
        api.create_nexus(pb::CreateNexusRequest {
            uuid: fresh.clone(),
            children: vec![format!(
                "nvmf://127.0.0.1:1/nqn.2026-11.io.keelson:replica-{unknown}"
            )],
            ..Default::default()
        })
        .await
        .map(drop),
    ));
    for (what, code, got) in cases {
        let e = got.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {}", e.message());
        assert!(!e.message().is_empty(), "{what}");
    }
    let listed = api
        .list_replicas(pb::ListReplicasRequest {})
        .await
        .unwrap()
        .into_inner()
        .replicas;
    assert_eq!(listed.len(), 1);
    drop(node);
    assert_eq!(
        file_hash(&disk0),
        before,
        "a refused request changed the disk"
    );

    // A corrupted label: import is refused with DATA_LOSS and the disk is left as it was.
    let mut bytes = std::fs::read(&disk0).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&disk0, &bytes).unwrap();
    let corrupt = file_hash(&disk0);
    let d1 = disk(dir.path(), "empty.img", 64 * MIB);
    let mut node = PoolNode::start("127.0.0.1", &d1);
    let mut api = node.api().await;
    let e = api
        .import_pool(pb::ImportPoolRequest {
            disk: d0.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{}", e.message());
    assert!(e.message().contains("label"), "{}", e.message());
    let e = api
        .create_pool(create_pool("pool2", &d0, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{}", e.message());
    node.kill9();
    assert_eq!(file_hash(&disk0), corrupt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_fails_new_allocations_with_capacity_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    // Metadata takes about 7 MiB: this leaves two or three 4 MiB clusters.
    let node = PoolNode::start("127.0.0.1", &disk(dir.path(), "p.img", 20 * MIB));
    let mut api = node.api().await;
    let cap = pool0(&mut api).await.capacity;
    let (a, b) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    api.create_replica(replica_req(&a, cap)).await.unwrap();
    api.create_replica(replica_req(&b, cap)).await.unwrap();
    let na = node.connect(&a, HOST).await.unwrap();
    let nb = node.connect(&b, HOST).await.unwrap();
    let mut off = 0;
    while off < cap {
        na.write(off, pattern(off, 4096)).await.unwrap();
        off += 4 * MIB;
    }
    let e = nb.write(0, pattern(9, 4096)).await.unwrap_err();
    assert!(matches!(e, BlockError::NoSpace), "{e:?}");
    // Writes into clusters a replica already has still work, and reads are unaffected.
    na.write(8192, pattern(7, 4096)).await.unwrap();
    assert_eq!(na.read(8192, 4096).await.unwrap(), pattern(7, 4096));
    let p = pool0(&mut api).await;
    assert_eq!((p.allocated, p.no_space_errors), (cap, 1));
    na.close().await;
    nb.close().await;
}

/// What the client saw acknowledged before the kill.
#[derive(Default)]
struct Acked {
    replicas: Vec<String>,
    snapshots: Vec<(String, String)>,
    /// (replica, offset, seed) of flushed writes.
    writes: Vec<(String, u64, u64)>,
}

/// Creates replicas, writes into fresh clusters and takes snapshots as fast as it can, recording what was acked.
async fn churn(node_ip: String, grpc: u16, port: u16, acked: Arc<Mutex<Acked>>) {
    let url = format!("http://{node_ip}:{grpc}");
    let Ok(mut api) = EngineClient::connect(url).await else {
        return;
    };
    let addr = format!("{node_ip}:{port}").parse().unwrap();
    for i in 0u64.. {
        let id = uuid::Uuid::new_v4().to_string();
        if api
            .create_replica(replica_req(&id, 16 * MIB))
            .await
            .is_err()
        {
            return;
        }
        acked.lock().unwrap().replicas.push(id.clone());
        let mut o = ConnectOptions::new(addr, &format!("nqn.2026-11.io.keelson:replica-{id}"));
        o.hostnqn = HOST.into();
        let Ok(ns) = RemoteNamespace::connect(o, 1).await else {
            return;
        };
        for c in 0..3u64 {
            let off = c * 4 * MIB + 4096 * (i % 7);
            let seed = i * 10 + c;
            if ns.write(off, pattern(seed, 4096)).await.is_err() || ns.flush().await.is_err() {
                return;
            }
            acked.lock().unwrap().writes.push((id.clone(), off, seed));
        }
        ns.close().await;
        let snap = uuid::Uuid::new_v4().to_string();
        let req = pb::CreateSnapshotRequest {
            replica: id.clone(),
            uuid: snap.clone(),
        };
        if api.create_snapshot(req).await.is_err() {
            return;
        }
        acked.lock().unwrap().snapshots.push((snap, id.clone()));
        // Keep the pool from filling: drop older replicas now and then. Once asked for, the replica may be
        // there or not after a kill, so it is no longer checked.
        if i % 3 == 2 {
            let old = {
                let mut a = acked.lock().unwrap();
                let old = a.replicas.remove(0);
                a.writes.retain(|w| w.0 != old);
                old
            };
            let req = pb::DestroyReplicaRequest { uuid: old };
            if api.destroy_replica(req).await.is_err() {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_creates_allocations_and_snapshots_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = PoolNode::start("127.0.0.1", &disk(dir.path(), "p.img", 1 << 30));
    let _ = node.api().await;
    let mut rng = 0x2545f4914f6cdd1du64;
    let mut total_acked = 0;
    for round in 0..8 {
        let acked = Arc::new(Mutex::new(Acked::default()));
        let task = tokio::spawn(churn(node.ip.clone(), node.grpc, node.port, acked.clone()));
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Let the churn get going, then kill at a random point of whatever it is doing.
        for _ in 0..400 {
            if !acked.lock().unwrap().replicas.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng % 300)).await;
        node.kill9();
        // The churn may be waiting for its initiator to reconnect: what it saw acknowledged is recorded.
        task.abort();
        let _ = task.await;
        node.restart();
        let mut api = node.api().await;
        let listed = api
            .list_replicas(pb::ListReplicasRequest {})
            .await
            .unwrap()
            .into_inner()
            .replicas;
        let snaps = api
            .list_snapshots(pb::ListSnapshotsRequest {})
            .await
            .unwrap()
            .into_inner()
            .snapshots;
        let a = std::mem::take(&mut *acked.lock().unwrap());
        for r in &a.replicas {
            assert!(
                listed.iter().any(|l| l.uuid == *r && !l.uri.is_empty()),
                "round {round}: replica {r} lost"
            );
        }
        for (s, r) in &a.snapshots {
            assert!(
                snaps.iter().any(|x| x.uuid == *s && x.replica == *r),
                "round {round}: snapshot {s} lost"
            );
        }
        let writes = a.writes;
        total_acked += a.replicas.len() + a.snapshots.len() + writes.len();
        let mut by_replica: std::collections::BTreeMap<String, Vec<(u64, u64)>> =
            Default::default();
        for (r, off, seed) in writes {
            by_replica.entry(r).or_default().push((off, seed));
        }
        for (r, writes) in by_replica {
            let ns = node.connect(&r, HOST).await.unwrap();
            for (off, seed) in writes {
                assert_eq!(
                    ns.read(off, 4096).await.unwrap(),
                    pattern(seed, 4096),
                    "round {round}: replica {r} lost a flushed write at {off}"
                );
            }
            ns.close().await;
        }
        // Clean up so the pool does not fill over the rounds.
        for r in listed {
            api.destroy_replica(pb::DestroyReplicaRequest { uuid: r.uuid })
                .await
                .unwrap();
        }
        for s in snaps {
            api.destroy_snapshot(pb::DestroySnapshotRequest { uuid: s.uuid })
                .await
                .unwrap();
        }
        assert_eq!(
            pool0(&mut api).await.allocated,
            0,
            "round {round}: leaked clusters"
        );
    }
    eprintln!("{total_acked} acknowledged operations checked over 8 kills");
    assert!(
        total_acked >= 16,
        "only {total_acked} acknowledged operations were checked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_between_thin_replicas_copies_only_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let (nodes, uris) = replica_nodes(dir.path(), "thin", size, 128 * MIB).await;
    let mut api = nodes[0].0.api().await;
    let vol = uuid::Uuid::new_v4().to_string();
    api.create_nexus(pb::CreateNexusRequest {
        uuid: vol.clone(),
        children: uris[..2].to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    publish(&mut api, &vol).await.unwrap();
    let ns = open_volume(&nodes[0].0, &vol).await;
    // 1.5 MiB written into two of the volume's sixteen 4 MiB clusters.
    ns.write(MIB, pattern(1, 1 << 20)).await.unwrap();
    ns.write(40 * MIB, pattern(2, 512 << 10)).await.unwrap();
    api.add_child(pb::ChildRequest {
        uuid: vol.clone(),
        uri: uris[2].clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let mut record = None;
    for _ in 0..400 {
        let n = api
            .list_nexuses(pb::ListNexusesRequest {})
            .await
            .unwrap()
            .into_inner();
        if let Some(r) = n.nexuses[0].rebuilds.first() {
            record = Some(r.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r = record.expect("the rebuild finished");
    assert_eq!(r.error, "");
    // Allocation is known per 4 MiB cluster: the two clusters written are copied, the other 56 MiB skipped.
    assert_eq!(
        (r.bytes_copied, r.bytes_skipped),
        (8 * MIB, 56 * MIB),
        "{r:?}"
    );
    ns.close().await;
    let want = {
        let (node, id) = &nodes[0];
        let c = node.connect(id, HOST).await.unwrap();
        let d = c.read(0, size).await.unwrap();
        c.close().await;
        d
    };
    let (node, id) = &nodes[2];
    let c = node.connect(id, HOST).await.unwrap();
    assert!(
        c.read(0, size).await.unwrap() == want,
        "the rebuilt replica differs"
    );
    c.close().await;
    let listed = node
        .api()
        .await
        .list_replicas(pb::ListReplicasRequest {})
        .await
        .unwrap();
    assert_eq!(
        listed.into_inner().replicas[0].allocated,
        8 * MIB,
        "thin after the rebuild too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_snapshot_under_writes_is_the_same_on_every_replica_and_clones_into_a_new_volume()
{
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let (nodes, uris) = replica_nodes(dir.path(), "snap", size, 64 * MIB).await;
    let mut api = nodes[0].0.api().await;
    let vol = uuid::Uuid::new_v4().to_string();
    let create = |vol: &str, children: Vec<String>| pb::CreateNexusRequest {
        uuid: vol.to_string(),
        children,
        ..Default::default()
    };
    api.create_nexus(create(&vol, uris.clone())).await.unwrap();
    publish(&mut api, &vol).await.unwrap();
    let ns = std::sync::Arc::new(open_volume(&nodes[0].0, &vol).await);
    ns.write(0, pattern(1, size as usize)).await.unwrap();

    // Writes keep coming while the snapshot is taken.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (ns, stop, done) = (ns.clone(), stop.clone(), done.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let off = (i * 7 % 4096) * 4096;
                ns.write(off, pattern(100 + i, 4096)).await.unwrap();
                i += 1;
                done.store(i, std::sync::atomic::Ordering::Relaxed);
            }
            i
        })
    };
    // Writes counted, not slept on: a loaded machine runs fewer in a fixed pause.
    let writes_reach = |n: u64| {
        let done = done.clone();
        async move {
            let t = std::time::Instant::now();
            while done.load(std::sync::atomic::Ordering::Relaxed) < n {
                assert!(t.elapsed() < Duration::from_secs(30), "the writes stopped");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    writes_reach(10).await;
    let snap = uuid::Uuid::new_v4().to_string();
    let r = api
        .snapshot_nexus(pb::SnapshotNexusRequest {
            uuid: vol.clone(),
            snapshot_uuid: snap.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.children.len(), 3);
    writes_reach(done.load(std::sync::atomic::Ordering::Relaxed) + 10).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes >= 20, "only {writes} writes ran around the snapshot");

    // Clone the snapshot on every node; a new volume over the clones shows one point in time, the same on all.
    let mut clone_uris = Vec::new();
    for (node, _) in &nodes {
        let mut a = node.api().await;
        let snaps = a
            .list_snapshots(pb::ListSnapshotsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(
            snaps.snapshots.iter().any(|s| s.uuid == snap),
            "snapshot listed on every node"
        );
        let c = a
            .create_clone(pb::CreateCloneRequest {
                snapshot: snap.clone(),
                uuid: uuid::Uuid::new_v4().to_string(),
                share: true,
                allowed_hosts: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        clone_uris.push(c.uri);
    }
    let mut contents = Vec::new();
    for (i, u) in clone_uris.iter().enumerate() {
        let v = uuid::Uuid::new_v4().to_string();
        api.create_nexus(create(&v, vec![u.clone()])).await.unwrap();
        publish(&mut api, &v).await.unwrap();
        let c = open_volume(&nodes[0].0, &v).await;
        contents.push(c.read(0, size).await.unwrap());
        c.close().await;
        assert!(contents[i] == contents[0], "clone {i} differs from clone 0");
    }
    let now = ns.read(0, size).await.unwrap();
    assert!(
        contents[0] != now,
        "the snapshot should predate the last writes"
    );
    ns.close().await;
    // Snapshots are deleted per node.
    for (node, _) in &nodes {
        node.api()
            .await
            .destroy_snapshot(pb::DestroySnapshotRequest { uuid: snap.clone() })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_nexus_gives_a_returning_replica_a_partial_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let (replicas, uris) = replica_nodes(dir.path(), "away", size, 128 * MIB).await;
    let mut nexus_node =
        PoolNode::start_named("127.0.0.4", "nexus-r", &disk(dir.path(), "n.img", 16 * MIB));
    let vol = uuid::Uuid::new_v4().to_string();
    let create = pb::CreateNexusRequest {
        uuid: vol.clone(),
        children: uris.clone(),
        io_timeout_ms: 1000,
        ..Default::default()
    };
    let mut api = nexus_node.api().await;
    api.create_nexus(create.clone()).await.unwrap();
    publish(&mut api, &vol).await.unwrap();
    let ns = open_volume(&nexus_node, &vol).await;
    ns.write(0, pattern(1, 32 << 20)).await.unwrap();
    // Flushed: writes a replica had not flushed when it went away are copied again too.
    ns.flush().await.unwrap();

    // Replica 3 freezes; the next write faults it after the I/O timeout, and three segments change meanwhile.
    replicas[2].0.signal("-STOP");
    for (i, off) in [3 * MIB + 4096, 20 * MIB, 50 * MIB].into_iter().enumerate() {
        ns.write(off, pattern(10 + i as u64, 200 << 10))
            .await
            .unwrap();
    }
    ns.close().await;
    // The nexus dies while the replica is away; the replica comes back; a new nexus is created over the same three.
    nexus_node.kill9();
    let faults: Vec<String> = nexus_node
        .log_text()
        .lines()
        .filter(|l| l.contains("faulted"))
        .map(String::from)
        .collect();
    replicas[2].0.signal("-CONT");
    nexus_node.restart();
    let mut api = nexus_node.api().await;
    api.create_nexus(create).await.unwrap();
    let mut rec = None;
    for _ in 0..400 {
        let n = api
            .list_nexuses(pb::ListNexusesRequest {})
            .await
            .unwrap()
            .into_inner();
        if n.nexuses[0].state == pb::NexusState::Online as i32 && !n.nexuses[0].rebuilds.is_empty()
        {
            rec = Some(n.nexuses[0].rebuilds[0].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r = rec.expect("the returning replica was rebuilt and the volume is online");
    assert_eq!(
        (r.kind.as_str(), r.error.as_str()),
        ("partial", ""),
        "{r:?}"
    );
    // A child whose connection the nexus saw lost and made again (a keep-alive missed on a loaded machine) may have
    // lost what it had not flushed: it is faulted at once with all of that in its log, and copies more.
    if faults.iter().any(|l| l.contains("connection was lost")) {
        assert!(r.bytes_copied >= 3 * MIB, "{r:?}");
    } else {
        assert_eq!(
            r.bytes_copied,
            3 * MIB,
            "only the three segments written while it was away: {r:?}; the old nexus's faults: {faults:#?}"
        );
    }
    let mut contents = Vec::new();
    for (node, id) in &replicas {
        let c = node.connect(id, HOST).await.unwrap();
        contents.push(c.read(0, size).await.unwrap());
        c.close().await;
    }
    assert!(
        contents[0] == contents[1] && contents[1] == contents[2],
        "replicas differ after the rebuild"
    );
    assert_eq!(
        contents[0].slice(50 * MIB as usize..(50 * MIB + 4096) as usize),
        pattern(12, 4096)
    );
    // The records are gone once it caught up: another restart rebuilds nothing.
    nexus_node.restart();
    let mut api = nexus_node.api().await;
    api.create_nexus(pb::CreateNexusRequest {
        uuid: vol.clone(),
        children: uris.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let n = api
        .list_nexuses(pb::ListNexusesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.nexuses[0].state, pb::NexusState::Online as i32);
    assert!(n.nexuses[0].rebuilds.is_empty());
}

/// A volume grows online: every replica is resized, then the nexus; a host connected all along is told (Namespace
/// Attribute Changed, nsid 1 in the Changed Namespace List), sees the new size on its next identify and writes
/// beyond the old end; the replicas hold the same data; bad requests get precise codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_grows_online_under_writes_and_its_host_is_told() {
    use bytes::Buf;
    const OLD: u64 = 8 * MIB;
    const NEW: u64 = 20 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let (nodes, uris) = replica_nodes(dir.path(), "grow", OLD, 64 * MIB).await;
    let mut api = nodes[0].0.api().await;
    let vol = uuid::Uuid::new_v4().to_string();
    api.create_nexus(pb::CreateNexusRequest {
        uuid: vol.clone(),
        children: uris.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    publish(&mut api, &vol).await.unwrap();
    let ns = Arc::new(open_volume(&nodes[0].0, &vol).await);
    let addr = format!("{}:{}", nodes[0].0.ip, nodes[0].0.port)
        .parse()
        .unwrap();
    let subnqn = format!("nqn.2026-11.io.keelson:vol-{vol}");
    let (mut host, _) =
        crate::harness::Raw::admin_to(addr, 0, &subnqn, "nqn.2026-11.io.keelson:host-grow").await;
    host.arm_events(1 << 8).await;

    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (ns, stop, done) = (ns.clone(), stop.clone(), done.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                ns.write((i * 13 % 2048) * 4096, pattern(i, 4096))
                    .await
                    .unwrap();
                i += 1;
                done.store(i, Ordering::Relaxed);
            }
            i
        })
    };
    // Writes go on before, during and after the growth (counted, not timed: a loaded machine is slow, not wrong).
    let writes_reach = |n: u64| {
        let done = done.clone();
        async move {
            let t = std::time::Instant::now();
            while done.load(Ordering::Relaxed) < n {
                assert!(t.elapsed() < Duration::from_secs(30), "writes stopped");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    writes_reach(5).await;
    let resize_nexus = |size: u64| pb::ResizeNexusRequest {
        uuid: vol.clone(),
        size,
    };
    let e = api.resize_nexus(resize_nexus(NEW)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    for (node, id) in &nodes {
        let mut a = node.api().await;
        let req = |size: u64| pb::ResizeReplicaRequest {
            uuid: id.clone(),
            size,
        };
        assert_eq!(
            a.resize_replica(req(NEW)).await.unwrap().into_inner().size,
            NEW
        );
        assert_eq!(
            a.resize_replica(req(NEW)).await.unwrap().into_inner().size,
            NEW
        );
        for (size, code) in [
            (OLD, Code::InvalidArgument),
            (NEW + 100, Code::InvalidArgument),
            (1 << 40, Code::ResourceExhausted),
        ] {
            let e = a.resize_replica(req(size)).await.unwrap_err();
            assert_eq!(e.code(), code, "{size}: {e:?}");
        }
        let e = a
            .resize_replica(pb::ResizeReplicaRequest {
                uuid: uuid::Uuid::new_v4().to_string(),
                size: NEW,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    let n = api
        .resize_nexus(resize_nexus(NEW))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.size_bytes, NEW);
    let ev = host.cqe().await;
    assert_eq!(ev.dw0(), 0x0004_0002, "notice: namespace attribute changed");
    let mut log = crate::events::log_page(&mut host, 0x04, 4096).await;
    assert_eq!(log.get_u32_le(), 1, "namespace 1 is listed as changed");

    writes_reach(done.load(Ordering::Relaxed) + 5).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_eq!(
        ns.size_bytes(),
        OLD,
        "the host learns the size when it asks again"
    );
    assert_eq!(ns.rescan().await.unwrap() * 512, NEW);
    ns.write(NEW - MIB, pattern(7, MIB as usize)).await.unwrap();
    assert_eq!(
        ns.read(NEW - MIB, MIB).await.unwrap(),
        pattern(7, MIB as usize)
    );
    assert!(
        ns.read(OLD, MIB).await.unwrap().iter().all(|b| *b == 0),
        "the new space reads as zeroes"
    );

    for (size, code) in [
        (NEW, Code::Ok),
        (OLD, Code::InvalidArgument),
        (NEW + 100, Code::InvalidArgument),
        (NEW + MIB, Code::FailedPrecondition),
    ] {
        let got = api.resize_nexus(resize_nexus(size)).await.map(drop);
        assert_eq!(got.err().map_or(Code::Ok, |e| e.code()), code, "{size}");
    }
    let e = api
        .resize_nexus(pb::ResizeNexusRequest {
            uuid: uuid::Uuid::new_v4().to_string(),
            size: NEW,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let want = ns.read(0, NEW).await.unwrap();
    ns.close().await;
    for (node, id) in &nodes {
        let c = node.connect(id, HOST).await.unwrap();
        assert_eq!(c.size_bytes(), NEW);
        assert!(
            c.read(0, NEW).await.unwrap() == want,
            "replica on {} differs",
            node.ip
        );
        c.close().await;
    }
}

/// kill -9 while 32 writes are in flight on 4 queues (the pool's disk I/O in flight together, through io_uring),
/// each write followed by a flush: every write whose flush was acknowledged reads back after the restart, in clusters
/// written before and in fresh ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_32_writes_on_4_queues_loses_no_flushed_write() {
    const WRITERS: u64 = 32;
    const HALF: u64 = 32 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let mut node = PoolNode::start("127.0.0.1", &disk(dir.path(), "p.img", 512 * MIB));
    let mut api = node.api().await;
    let id = uuid::Uuid::new_v4().to_string();
    api.create_replica(replica_req(&id, 2 * HALF))
        .await
        .unwrap();
    let addr = format!("{}:{}", node.ip, node.port).parse().unwrap();
    let connect = |queues: u16| {
        let mut o = ConnectOptions::new(addr, &format!("nqn.2026-11.io.keelson:replica-{id}"));
        o.hostnqn = HOST.into();
        o.io_queues = queues;
        RemoteNamespace::connect(o, 1)
    };
    // The lower half's clusters are written (allocated) first; the upper half's are fresh.
    let ns = connect(1).await.unwrap();
    for off in (0..HALF).step_by(MIB as usize) {
        ns.write(off, pattern(0, MIB as usize)).await.unwrap();
    }
    ns.flush().await.unwrap();
    ns.close().await;

    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut checked = 0;
    for round in 0..2u64 {
        let ns = Arc::new(connect(4).await.unwrap());
        let acked = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (ns, acked) = (ns.clone(), acked.clone());
                tokio::spawn(async move {
                    // Each write to a block of its own, alternating written and fresh clusters.
                    for k in 0u64.. {
                        let block = (k / 2 + round * 128) * WRITERS + w;
                        let off = (k % 2) * HALF + (block * 4096) % HALF;
                        let seed = round * 1_000_000 + k * WRITERS + w + 1;
                        if ns.write(off, pattern(seed, 4096)).await.is_err()
                            || ns.flush().await.is_err()
                        {
                            return;
                        }
                        acked.lock().unwrap().push((off, seed));
                    }
                })
            })
            .collect();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(200 + rng % 400)).await;
        node.kill9();
        for w in writers {
            w.abort();
            let _ = w.await;
        }
        let acked = std::mem::take(&mut *acked.lock().unwrap());
        assert!(
            acked.len() > 64,
            "round {round}: only {} writes acknowledged",
            acked.len()
        );
        node.restart();
        let _ = node.api().await;
        let ns = connect(1).await.unwrap();
        for (off, seed) in &acked {
            assert_eq!(
                ns.read(*off, 4096).await.unwrap(),
                pattern(*seed, 4096),
                "round {round}: the flushed write at {off} is lost"
            );
        }
        checked += acked.len();
        ns.close().await;
    }
    eprintln!("{checked} flushed writes checked over 2 kills at QD32 on 4 queues");
}
