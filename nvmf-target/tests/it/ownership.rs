//! One owner per pool, in real io-engine processes: a second io-engine on the same machine cannot import a pool
//! that another one holds, through the same path, a symlink or a loop device over the file, forced or not, and the
//! holder keeps serving and loses nothing across kill -9; a pool owned by another node is refused unless forced.
//! (That a forced import stops the displaced owner at its next metadata commit is shown by the pool's own tests:
//! on one machine the exclusive open keeps two io-engines off one disk before any label is read.)

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use nvmf_target::block::BlockDevice;
use nvmf_target::initiator::namespace::RemoteNamespace;
use proto::engine as pb;
use proto::engine::engine_client::EngineClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::pools::{HOST, PoolNode, disk, pattern, replica_req};
use e2e::loopdev::Loop;

const MIB: u64 = 1 << 20;

/// Writes blocks `from..to` (4 KiB each, one per 256 KiB) and returns what was acknowledged.
async fn write_blocks(ns: &RemoteNamespace, from: u64, to: u64) -> Vec<(u64, Bytes)> {
    let mut acked = Vec::new();
    for i in from..to {
        let (off, data) = (i * 256 * 1024, pattern(i, 4096));
        ns.write(off, data.clone()).await.unwrap();
        acked.push((off, data));
    }
    acked
}

async fn read_back(ns: &RemoteNamespace, acked: &[(u64, Bytes)]) {
    for (off, data) in acked {
        assert_eq!(
            &ns.read(*off, 4096).await.unwrap(),
            data,
            "acknowledged write at {off} lost"
        );
    }
}

async fn create_pool(
    api: &mut EngineClient<Channel>,
    disk: &Path,
) -> Result<pb::Pool, tonic::Status> {
    api.create_pool(pb::CreatePoolRequest {
        name: "pool0".into(),
        disk: disk.display().to_string(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

async fn import_pool(
    api: &mut EngineClient<Channel>,
    disk: &Path,
    force: bool,
) -> Result<pb::Pool, tonic::Status> {
    api.import_pool(pb::ImportPoolRequest {
        disk: disk.display().to_string(),
        force,
    })
    .await
    .map(|r| r.into_inner())
}

/// Test "two engines on one pool": needs root for its loop device part (skipped without it under plain
/// `cargo test`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_engine_cannot_take_a_held_pool_by_any_path_and_the_holder_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), "p.img", 256 * MIB);
    let link = dir.path().join("by-id-link");
    std::os::unix::fs::symlink(&img, &link).unwrap();

    let mut a = PoolNode::start_named("127.0.0.1", "own-a", &img);
    let mut api_a = a.api().await;
    let id = uuid::Uuid::new_v4().to_string();
    api_a
        .create_replica(replica_req(&id, 64 * MIB))
        .await
        .unwrap();
    let ns = a.connect(&id, HOST).await.unwrap();
    let mut acked = write_blocks(&ns, 0, 64).await;

    let b = PoolNode::bare("127.0.0.2", "own-b");
    let mut api_b = b.api().await;
    let mut paths = vec![img.clone(), link.clone()];
    let lo = e2e::privileged::allowed("loop device part of two_engines_on_one_pool")
        .then(|| Loop::attach(&img));
    paths.extend(lo.as_ref().map(|l| l.0.clone()));
    for (n, path) in paths.iter().enumerate() {
        for e in [
            create_pool(&mut api_b, path).await.err(),
            import_pool(&mut api_b, path, false).await.err(),
            import_pool(&mut api_b, path, true).await.err(),
        ] {
            let e = e.unwrap_or_else(|| {
                panic!(
                    "engine B took the pool held by A through {}",
                    path.display()
                )
            });
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(e.message().contains("in use"), "{}", e.message());
            assert!(
                e.message().contains("\"own-a\""),
                "the error names the holder's node: {}",
                e.message()
            );
        }
        // A keeps serving.
        let n = n as u64;
        acked.extend(write_blocks(&ns, 64 + n * 64, 128 + n * 64).await);
    }
    // An io-engine started with the same --pool (a second pod in a rollout, an operator's typo) exits at once,
    // naming the holder; A goes on.
    let out = Command::new(env!("CARGO_BIN_EXE_io-engine"))
        .args([
            "--node-name",
            "own-c",
            "--listen",
            "127.0.0.3:0",
            "--grpc",
            "127.0.0.3:0",
        ])
        .arg("--pool")
        .arg(format!("pool0={}", link.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("\"own-a\""), "{err}");
    acked.extend(write_blocks(&ns, 200, 232).await);
    read_back(&ns, &acked).await;
    drop(ns);

    a.kill9();
    a.restart();
    let mut api_a = a.api().await;
    let ns = a.connect(&id, HOST).await.unwrap();
    read_back(&ns, &acked).await;
    ns.close().await;
    let pools = api_a
        .list_pools(pb::ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pools;
    assert_eq!(
        (pools[0].owner.as_str(), pools[0].incarnation),
        ("own-a", 2)
    );
    drop(lo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_owned_by_another_node_imports_only_when_forced_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), "p.img", 256 * MIB);
    let mut a = PoolNode::start_named("127.0.0.1", "node-gone", &img);
    let mut api_a = a.api().await;
    let id = uuid::Uuid::new_v4().to_string();
    api_a
        .create_replica(replica_req(&id, 64 * MIB))
        .await
        .unwrap();
    let ns = a.connect(&id, HOST).await.unwrap();
    let acked = write_blocks(&ns, 0, 32).await;
    drop(ns);
    a.kill9();

    let b = PoolNode::bare("127.0.0.2", "node-new");
    let mut api_b = b.api().await;
    let e = import_pool(&mut api_b, &img, false).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("belongs to node \"node-gone\""),
        "{}",
        e.message()
    );
    let e = create_pool(&mut api_b, &img).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    let p = import_pool(&mut api_b, &img, true).await.unwrap();
    assert_eq!(
        (p.owner.as_str(), p.incarnation, p.replicas),
        ("node-new", 2, 1)
    );
    let ns = b.connect(&id, HOST).await.unwrap();
    read_back(&ns, &acked).await;
    ns.close().await;
}
