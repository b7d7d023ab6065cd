//! Pools on disks that are not plain: a file system that fills up under a pool's file, a 4Kn disk (4096-byte
//! logical blocks, where 512-byte direct I/O fails), and a disk missing when io-engine starts.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nvmf_target::block::{BlockDevice, BlockError};
use proto::engine as pb;
use proto::engine::engine_client::EngineClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::free_port;
use crate::pools::{HOST, PoolNode, disk, pattern, pool0, replica_req};
use e2e::loopdev::Loop;

const MIB: u64 = 1 << 20;

/// The pools an engine lists.
async fn pools(api: &EngineClient<Channel>) -> Vec<pb::Pool> {
    let mut api = api.clone();
    let r = api.list_pools(pb::ListPoolsRequest {}).await.unwrap();
    r.into_inner().pools
}

/// A small ext4 file system on a loop device, mounted in a directory of its own; unmounted when dropped.
struct SmallFs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl SmallFs {
    fn new(size: u64) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        for cmd in [
            vec!["mkfs.ext4", "-q", "-F", img.to_str().unwrap()],
            vec![
                "mount",
                "-o",
                "loop",
                img.to_str().unwrap(),
                mnt.to_str().unwrap(),
            ],
        ] {
            let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        SmallFs { _dir: dir, mnt }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// A pool on a sparse file larger than the file system under it (thin on thin): when the file system fills up,
/// writes that need a new cluster fail with Capacity Exceeded (the host's ENOSPC), as on a full pool, and nothing
/// else changes: writes into clusters the replica has and reads go on, the disk is not counted as failing, the pool
/// is not faulted and imports again on the full file system (its metadata's space was reserved when it was
/// created), and once there is room again new clusters are taken. Needs root (a loop-mounted ext4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_file_system_fills_up_fails_new_clusters_with_capacity_exceeded_and_imports_again()
 {
    if !e2e::privileged::allowed_with(
        "a_pool_whose_file_system_fills_up (a loop-mounted ext4)",
        &["root", "mkfs.ext4", "mount"],
    ) {
        return;
    }
    let fs = SmallFs::new(128 * MIB);
    // Room another file holds, given back at the end: enough for a new cluster, a refilled stock and more.
    let ballast = fs.mnt.join("ballast");
    std::fs::write(&ballast, vec![1u8; (72 * MIB) as usize]).unwrap();
    let mut node = PoolNode::start("127.0.0.1", &disk(&fs.mnt, "p.img", 512 * MIB));
    let mut api = node.api().await;
    let cap = pool0(&mut api).await.capacity;
    let id = uuid::Uuid::new_v4().to_string();
    api.create_replica(replica_req(&id, cap)).await.unwrap();
    let ns = node.connect(&id, HOST).await.unwrap();
    // One block in each cluster, until the file system has no room for another.
    let mut acked = Vec::new();
    let e = loop {
        let off = acked.len() as u64 * 4 * MIB;
        assert!(off < cap, "the file system never filled up");
        match ns.write(off, pattern(off, 4096)).await {
            Ok(()) => acked.push(off),
            Err(e) => break e,
        }
    };
    assert!(matches!(e, BlockError::NoSpace), "{e:?}");
    assert!(acked.len() >= 2, "{} clusters written", acked.len());
    let full_at = acked.len() as u64 * 4 * MIB;
    ns.write(acked[0] + 8192, pattern(7, 4096)).await.unwrap();
    ns.flush().await.unwrap();
    let p = pool0(&mut api).await;
    assert_eq!((p.disk_errors, p.fault.as_str()), (0, ""), "{p:?}");
    assert!(p.no_space_errors >= 1 && p.disk_full, "{p:?}");
    // The room is the file system's as last looked at (the stock's refills and releases run beside the writes, and
    // a loaded machine may run them late): asked again for a while.
    let t = std::time::Instant::now();
    loop {
        let p = pool0(&mut api).await;
        if p.disk_room.is_some_and(|r| r < 4 * MIB) {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "the file system's room is reported: {p:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    ns.close().await;

    node.kill9();
    node.restart();
    let mut api = node.api().await;
    assert_eq!(pool0(&mut api).await.fault, "");
    let ns = node.connect(&id, HOST).await.unwrap();
    for off in &acked {
        let got = ns.read(*off, 4096).await.unwrap();
        assert_eq!(got, pattern(*off, 4096), "acknowledged write at {off} lost");
    }
    assert_eq!(
        ns.read(acked[0] + 8192, 4096).await.unwrap(),
        pattern(7, 4096)
    );
    let e = ns.write(full_at, pattern(1, 4096)).await.unwrap_err();
    assert!(matches!(e, BlockError::NoSpace), "{e:?}");

    std::fs::remove_file(&ballast).unwrap();
    assert!(Command::new("sync").status().unwrap().success());
    ns.write(full_at, pattern(full_at, 4096)).await.unwrap();
    assert_eq!(
        ns.read(full_at, 4096).await.unwrap(),
        pattern(full_at, 4096)
    );
    let p = pool0(&mut api).await;
    assert_eq!(
        (p.disk_errors, p.fault.as_str(), p.disk_full),
        (0, "", false),
        "{p:?}"
    );
    ns.close().await;
}

/// A child process killed when dropped (a failed assertion leaves no io-engine behind).
struct KillOnDrop(Child);

impl KillOnDrop {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A node configured with two pools, one of whose disks is not there at start: the engine comes up serving the
/// other, says which one is pending and why (`keelson_pool_pending`, the log), and opens it by itself once the
/// disk appears, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_disk_is_missing_at_start_leaves_the_others_served_and_opens_when_it_appears()
{
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.0.1";
    let (port, grpc, mport) = (free_port(ip), free_port(ip), free_port(ip));
    let here = disk(dir.path(), "a.img", 64 * MIB);
    let late = dir.path().join("b.img");
    let log = dir.path().join("engine.log");
    let child = Command::new(env!("CARGO_BIN_EXE_io-engine"))
        .args(["--node-name", "pending-test"])
        .args(["--listen", &format!("{ip}:{port}")])
        .args(["--grpc", &format!("{ip}:{grpc}")])
        .args(["--metrics", &format!("{ip}:{mport}")])
        .arg("--pool")
        .arg(format!("late={}", late.display()))
        .arg("--pool")
        .arg(format!("here={}", here.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut engine = KillOnDrop(child);
    let names = |pools: Vec<pb::Pool>| pools.into_iter().map(|p| p.name).collect::<Vec<_>>();
    let api = crate::harness::engine_api(&format!("{ip}:{grpc}")).await;
    let api = api.unwrap_or_else(|| {
        panic!(
            "io-engine never came up: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert_eq!(names(pools(&api).await), ["here"]);
    let maddr = format!("{ip}:{mport}");
    let scrape = || {
        let a = maddr.clone();
        tokio::task::spawn_blocking(move || e2e::metrics::scrape(&a, "/metrics"))
    };
    let m = scrape().await.unwrap();
    let pending = format!(
        "keelson_pool_pending{{pool=\"late\",disk=\"{}\"}} 1",
        late.display()
    );
    assert!(m.contains(&pending), "no {pending} in:\n{m}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("pool not opened") && logged.contains("late"),
        "{logged}"
    );
    let listed = api
        .clone()
        .list_pools(pb::ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pending;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let p = &listed[0];
    assert_eq!(
        (p.name.as_str(), p.disk.as_str()),
        ("late", late.to_str().unwrap())
    );
    assert!(
        p.retrying && p.attempts >= 1 && !p.error.is_empty(),
        "{p:?}"
    );

    std::fs::File::create(&late)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let mut opened = false;
    for _ in 0..100 {
        if names(pools(&api).await) == ["here", "late"] {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = scrape().await.unwrap();
    let still = api
        .clone()
        .list_pools(pb::ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pending;
    engine.kill();
    assert!(still.is_empty(), "{still:?}");
    assert!(
        opened,
        "the pool never opened: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(!m.contains("keelson_pool_pending"), "{m}");
}

/// A 4Kn disk (a loop device with 4096-byte logical blocks): a pool made on it without a block size gets 4096-byte
/// blocks, so its replicas show hosts 4096-byte blocks and no write smaller than the disk's unit reaches it; one
/// asked for 512-byte blocks is refused (INVALID_ARGUMENT, naming the unit) with the disk left blank; and the pool
/// imports again, through `--pool`, with its own block size. Needs root (losetup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_on_a_4kn_disk_gets_4096_byte_blocks_and_512_byte_ones_are_refused() {
    if !e2e::privileged::allowed_with(
        "a_pool_on_a_4kn_disk (losetup -b 4096)",
        &["root", "losetup"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lo = Loop::attach_with_blocks(&disk(dir.path(), "4kn.img", 64 * MIB), 4096);
    let other = Loop::attach_with_blocks(&disk(dir.path(), "4kn-b.img", 64 * MIB), 4096);

    let mut node = PoolNode::start("127.0.0.1", &lo.0);
    let mut api = node.api().await;
    let p = pool0(&mut api).await;
    assert_eq!(p.block_size, 4096, "{p:?}");
    assert_eq!(
        p.disk_room, None,
        "a block device's space is its own: {p:?}"
    );
    let e = api
        .create_pool(pb::CreatePoolRequest {
            name: "small".into(),
            disk: other.0.display().to_string(),
            block_size: 512,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("4096"), "{}", e.message());
    let head = std::fs::read(dir.path().join("4kn-b.img")).unwrap();
    assert!(
        head[..8192].iter().all(|b| *b == 0),
        "the refused disk was written"
    );

    let id = uuid::Uuid::new_v4().to_string();
    api.create_replica(replica_req(&id, 16 * MIB))
        .await
        .unwrap();
    let ns = node.connect(&id, HOST).await.unwrap();
    assert_eq!(ns.block_size(), 4096);
    ns.write(8192, pattern(3, 4096)).await.unwrap();
    ns.flush().await.unwrap();
    ns.close().await;

    node.kill9();
    node.restart();
    let mut api = node.api().await;
    assert_eq!(pool0(&mut api).await.block_size, 4096);
    let ns = node.connect(&id, HOST).await.unwrap();
    assert_eq!(ns.read(8192, 4096).await.unwrap(), pattern(3, 4096));
    let p = pool0(&mut api).await;
    assert_eq!(p.disk_errors, 0, "{p:?}");
    ns.close().await;
    drop(node);
}

/// A configured pool whose disk holds another node's pool is left pending (the import is refused: it is not
/// forced), and when that node destroys its pool the retries do not make a new pool on the blank disk behind
/// anyone's back: only CreatePool formats it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_pool_whose_disk_was_wiped_is_not_formatted_by_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), "p.img", 64 * MIB);
    let mut other = PoolNode::start_named("127.0.0.1", "other-node", &img);
    pool0(&mut other.api().await).await;
    other.kill9();

    let mut node = PoolNode::start_named("127.0.0.1", "this-node", &img);
    let api = node.api().await;
    assert!(pools(&api).await.is_empty());
    // The other node destroys its pool: the label goes.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 4096], 0).unwrap();
    f.sync_all().unwrap();
    // Retries at 1, 3 and 7 s.
    tokio::time::sleep(Duration::from_millis(7500)).await;
    assert!(
        pools(&api).await.is_empty(),
        "a retry made a pool on the wiped disk"
    );
    let head = std::fs::read(&img).unwrap();
    assert!(
        head[..4096].iter().all(|b| *b == 0),
        "a retry wrote a label"
    );
    let log = node.log_text();
    assert!(log.contains("is blank"), "{log}");
    node.kill9();
}

/// Space on the file system a pool's sparse file takes.
fn file_space(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Waits (bounded) for a pool file's space to drop to `at_most` bytes; what it is then.
async fn space_drops_to(path: &std::path::Path, at_most: u64) -> u64 {
    for _ in 0..100 {
        let now = file_space(path);
        if now <= at_most {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    file_space(path)
}

/// A pool on a sparse file gives the file system back the space of clusters it no longer uses: whole clusters the
/// host deallocates (a guest's `fstrim`), and a destroyed replica's. Data still in use reads back unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_file_gives_the_space_of_deallocated_clusters_and_destroyed_replicas_back() {
    let dir =
        tempfile::tempdir_in(std::env::var_os("KEELSON_TEST_FS").unwrap_or("/var/tmp".into()))
            .unwrap();
    let path = disk(dir.path(), "p.img", 512 * MIB);
    let node = PoolNode::start("127.0.0.1", &path);
    let mut api = node.api().await;
    let id = uuid::Uuid::new_v4().to_string();
    api.create_replica(replica_req(&id, 64 * MIB))
        .await
        .unwrap();
    let ns = node.connect(&id, HOST).await.unwrap();
    for off in (0..64 * MIB).step_by(MIB as usize) {
        ns.write(off, pattern(off, MIB as usize)).await.unwrap();
    }
    ns.flush().await.unwrap();
    let written = file_space(&path);
    assert!(
        written >= 64 * MIB,
        "{written} bytes taken after 64 MiB written"
    );

    // From 4 KiB into cluster 7 to 4 KiB before the end: clusters 8 to 14 are whole and go back (28 MiB); the
    // partial clusters at each end are zeroed in place and stay.
    ns.deallocate(28 * MIB + 4096, 36 * MIB - 8192)
        .await
        .unwrap();
    let trimmed = space_drops_to(&path, written - 28 * MIB).await;
    assert!(
        written - trimmed >= 28 * MIB,
        "deallocating 28 MiB of whole clusters gave back {} bytes",
        written - trimmed
    );
    for off in (0..28 * MIB).step_by(MIB as usize) {
        assert_eq!(ns.read(off, MIB).await.unwrap(), pattern(off, MIB as usize));
    }
    for off in (28 * MIB + 4096..64 * MIB - 4096).step_by(MIB as usize) {
        let len = MIB.min(64 * MIB - 4096 - off);
        let back = ns.read(off, len).await.unwrap();
        assert!(
            back.iter().all(|b| *b == 0),
            "deallocated data at {off} reads back"
        );
    }
    let head = ns.read(28 * MIB, 4096).await.unwrap();
    assert_eq!(head, pattern(28 * MIB, 4096));
    let tail = ns.read(64 * MIB - 4096, 4096).await.unwrap();
    assert_eq!(
        tail,
        pattern(63 * MIB, MIB as usize).slice((MIB - 4096) as usize..)
    );
    ns.close().await;

    // What is left, nine clusters, goes back with the replica.
    api.destroy_replica(pb::DestroyReplicaRequest { uuid: id.clone() })
        .await
        .unwrap();
    let destroyed = space_drops_to(&path, trimmed - 36 * MIB).await;
    assert!(
        trimmed - destroyed >= 36 * MIB,
        "destroying the replica gave back {} bytes",
        trimmed - destroyed
    );
}

/// A pool file given its space up front (`fallocate`) on a file system with no room left besides: its room is
/// the file's own, so the pool reports room for all of its free clusters, not the file system's none (else the
/// cluster agent would place nothing on it). Needs root (a loop-mounted ext4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preallocated_pool_file_on_a_full_file_system_reports_its_own_room() {
    if !e2e::privileged::allowed_with(
        "a_preallocated_pool_file (a loop-mounted ext4)",
        &["root", "mkfs.ext4", "mount"],
    ) {
        return;
    }
    let fs = SmallFs::new(96 * MIB);
    let path = fs.mnt.join("p.img");
    let out = Command::new("fallocate")
        .args(["-l", "48M"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The rest of the file system goes to another file.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none"])
        .arg(format!("of={}", fs.mnt.join("ballast").display()))
        .status();
    let node = PoolNode::start("127.0.0.1", &path);
    let mut api = node.api().await;
    let p = pool0(&mut api).await;
    let room = p.disk_room.expect("a pool file reports its room");
    assert!(
        room >= p.capacity - p.allocated,
        "room {room} for a pool with {} free bytes in a preallocated file: {p:?}",
        p.capacity - p.allocated
    );
    // It keeps the space it was given: a destroyed replica's clusters and an import give none of it back.
    let before = file_space(&path);
    let id = uuid::Uuid::new_v4().to_string();
    api.create_replica(replica_req(&id, 8 * MIB)).await.unwrap();
    let ns = node.connect(&id, HOST).await.unwrap();
    ns.write(0, pattern(1, (8 * MIB) as usize)).await.unwrap();
    ns.close().await;
    api.destroy_replica(pb::DestroyReplicaRequest { uuid: id })
        .await
        .unwrap();
    let mut node = node;
    node.restart();
    let mut api = node.api().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        file_space(&path) >= before,
        "{} < {before}",
        file_space(&path)
    );
    let p = pool0(&mut api).await;
    assert!(
        p.disk_room.is_some_and(|r| r >= p.capacity - p.allocated),
        "{p:?}"
    );
}

/// A pool on a block device tells the device which clusters it no longer uses (a discard), so a thin-provisioned
/// disk under it (here a loop device over a sparse file, which punches what is discarded out of its file) gets the
/// space back: whole clusters the host deallocates and a destroyed replica's. Data still in use reads back, also
/// after a kill -9 and an import (which discards nothing of a block device). Needs root (losetup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_on_a_block_device_discards_the_clusters_it_frees() {
    if !e2e::privileged::allowed_with("a_pool_on_a_block_device_discards", &["root", "losetup"]) {
        return;
    }
    let dir =
        tempfile::tempdir_in(std::env::var_os("KEELSON_TEST_FS").unwrap_or("/var/tmp".into()))
            .unwrap();
    let img = disk(dir.path(), "thin.img", 256 * MIB);
    let lo = Loop::attach(&img);
    let mut node = PoolNode::start("127.0.0.1", &lo.0);
    let mut api = node.api().await;
    pool0(&mut api).await;
    let (gone, kept) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    for (seed, id) in [(1, &gone), (2, &kept)] {
        api.create_replica(replica_req(id, 48 * MIB)).await.unwrap();
        let ns = node.connect(id, HOST).await.unwrap();
        for off in (0..48 * MIB).step_by(MIB as usize) {
            ns.write(off, pattern(seed + off / MIB, MIB as usize))
                .await
                .unwrap();
        }
        ns.flush().await.unwrap();
        ns.close().await;
    }
    let written = file_space(&img);
    assert!(
        written >= 96 * MIB,
        "{written} bytes taken after 96 MiB written"
    );

    // Clusters 2 to 5 of the kept replica (4 MiB clusters), whole: 16 MiB go back.
    let ns = node.connect(&kept, HOST).await.unwrap();
    ns.deallocate(8 * MIB, 16 * MIB).await.unwrap();
    let trimmed = space_drops_to(&img, written - 16 * MIB).await;
    assert!(
        written - trimmed >= 16 * MIB,
        "deallocating 16 MiB of whole clusters gave back {} bytes",
        written - trimmed
    );
    ns.close().await;
    api.destroy_replica(pb::DestroyReplicaRequest { uuid: gone.clone() })
        .await
        .unwrap();
    let destroyed = space_drops_to(&img, trimmed - 48 * MIB).await;
    assert!(
        trimmed - destroyed >= 48 * MIB,
        "destroying a 48 MiB replica gave back {} bytes",
        trimmed - destroyed
    );

    node.kill9();
    node.restart();
    let api = node.api().await;
    let ns = node.connect(&kept, HOST).await.unwrap();
    for off in (0..48 * MIB).step_by(MIB as usize) {
        let back = ns.read(off, MIB).await.unwrap();
        if (8 * MIB..24 * MIB).contains(&off) {
            assert!(
                back.iter().all(|b| *b == 0),
                "deallocated data at {off} reads back"
            );
        } else {
            assert_eq!(back, pattern(2 + off / MIB, MIB as usize), "at {off}");
        }
    }
    ns.close().await;
    let p = pools(&api).await;
    assert_eq!(p[0].disk_errors, 0, "{p:?}");
    drop(node);
}

/// A file device whose flush failed (a disk that lost its writes back: here a loop device over a file whose file
/// system filled up under buffered writes) fails every later flush and write, also once there is room again.
/// Before, the kernel told of the writeback error once, so a host's retried flush succeeded and data it was then
/// told was durable was gone. Needs root (losetup, a loop-mounted ext4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_of_a_file_device_fails_every_later_flush() {
    if !e2e::privileged::allowed_with(
        "a_failed_flush_of_a_file_device (losetup, a loop-mounted ext4)",
        &["root", "losetup", "mkfs.ext4", "mount"],
    ) {
        return;
    }
    let fs = SmallFs::new(16 * MIB);
    let img = fs.mnt.join("thin.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let lo = Loop::attach(&img);
    // The file system full: the loop device's writes into its file's holes find no room.
    let filler = fs.mnt.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M"])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status();
    let dev = nvmf_target::block::file::FileDevice::open(&lo.0, 0, 512, false).unwrap();
    dev.write(0, bytes::Bytes::from(vec![7u8; (4 * MIB) as usize]))
        .await
        .unwrap();
    assert!(
        dev.flush().await.is_err(),
        "the writes never reached the disk"
    );
    std::fs::remove_file(&filler).unwrap();
    assert!(
        dev.flush().await.is_err(),
        "a flush after a failed one succeeded over lost writes"
    );
    assert!(
        dev.write(0, bytes::Bytes::from(vec![1u8; 4096]))
            .await
            .is_err()
    );
}
