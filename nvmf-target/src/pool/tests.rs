//! Pool behaviour end to end on memory devices, and crash safety: a device that loses power after any write, keeping
//! an arbitrary subset (possibly torn) of what was not flushed, must always import into a sound pool holding every
//! acknowledged change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use uuid::Uuid;

use super::*;
use crate::block::memory::MemoryDevice;
use crate::block::{BlockError, check_range};

const MIB: u64 = 1 << 20;
const CS: u32 = 256 << 10;

fn spec(name: &str) -> PoolSpec {
    PoolSpec {
        name: name.into(),
        uuid: Uuid::new_v4(),
        cluster_size: CS,
    }
}

/// The node these tests import pools as.
fn me() -> Claim {
    Claim::new("node-a")
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_add((i / 512) as u8) | 1)
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test]
async fn replicas_are_thin_and_survive_import() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap();
    let cap = pool.stats().capacity;
    assert!(cap >= 24 * MIB && cap % u64::from(CS) == 0, "{cap}");
    let r = Uuid::new_v4();
    let vol = pool.create_replica(r, 4 * MIB, None).await.unwrap();
    assert_eq!(pool.stats().allocated, 0);
    assert_eq!(pool.stats().committed, 4 * MIB);
    vol.write(MIB + 4096, pattern(7, 8192)).await.unwrap();
    assert_eq!(pool.stats().allocated, u64::from(CS));
    assert_eq!(vol.mapped_ranges(), vec![(MIB, u64::from(CS))]);
    let back = vol.read(MIB, 16384).await.unwrap();
    assert!(back[..4096].iter().all(|b| *b == 0));
    assert_eq!(&back[4096..12288], &pattern(7, 8192)[..]);
    assert!(back[12288..].iter().all(|b| *b == 0));
    drop((vol, pool));

    let pool = Pool::import(dev.clone(), &me()).await.unwrap();
    assert_eq!(pool.volumes().len(), 1);
    let vol = pool.open_volume(&r).unwrap();
    assert_eq!(
        &vol.read(MIB + 4096, 8192).await.unwrap()[..],
        &pattern(7, 8192)[..]
    );
    assert_eq!(pool.stats().allocated, u64::from(CS));
}

/// A 32 MiB pool on a memory disk that can be slowed (or failed), with a replica of `clusters` clusters: the
/// memory under it, the disk, the pool, the replica's id and the replica.
async fn slowable_pool(
    clusters: u64,
) -> (
    Arc<dyn BlockDevice>,
    Arc<crate::block::fault::FaultDevice>,
    Pool,
    Uuid,
    Arc<PoolVolume>,
) {
    let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let slow = Arc::new(crate::block::fault::FaultDevice::new(mem.clone()));
    let pool = Pool::create(slow.clone(), &spec("p1"), &me())
        .await
        .unwrap();
    let r = Uuid::new_v4();
    let vol = pool
        .create_replica(r, clusters * u64::from(CS), None)
        .await
        .unwrap();
    (mem, slow, pool, r, vol)
}

#[tokio::test]
async fn allocations_at_once_share_journal_transactions_and_all_survive_import() {
    use crate::block::fault::FaultPlan;
    let (mem, slow, pool, r, vol) = slowable_pool(16).await;
    slow.set_plan(FaultPlan {
        latency: Some(std::time::Duration::from_millis(2)),
        ..Default::default()
    });
    let before = pool.inner.journal.used_blocks().await;
    let writes = (0..16u8).map(|i| vol.write(u64::from(i) * u64::from(CS) + 512, pattern(i, 4096)));
    for r in futures_util::future::join_all(writes).await {
        r.unwrap();
    }
    let used = pool.inner.journal.used_blocks().await - before;
    assert!(
        used < 8,
        "16 allocations at once took {used} journal blocks"
    );
    drop((vol, pool));

    let pool = Pool::import(mem, &me()).await.unwrap();
    let vol = pool.open_volume(&r).unwrap();
    for i in 0..16u8 {
        let at = u64::from(i) * u64::from(CS) + 512;
        assert_eq!(
            &vol.read(at, 4096).await.unwrap()[..],
            &pattern(i, 4096)[..]
        );
    }
    assert_eq!(pool.stats().allocated, 16 * u64::from(CS));
}

#[tokio::test]
async fn an_allocating_write_whose_caller_goes_half_way_still_ends_and_gives_back_its_cluster() {
    use crate::block::fault::FaultPlan;
    use std::time::Duration;
    let (_mem, slow, pool, r, vol) = slowable_pool(4).await;
    let cs = u64::from(CS);
    vol.write(cs, pattern(1, 4096)).await.unwrap();
    let snap = Uuid::new_v4();
    pool.snapshot(r, snap).await.unwrap();
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(30)),
        ..Default::default()
    });
    // Reserved for an allocation, not stocked for later ones.
    let reserved =
        || pool.inner.reserved.lock().unwrap().len() - pool.inner.stock.lock().unwrap().len();
    // A first write to a cluster, and zeroes over one shared with the snapshot (a copy): each caller gives up
    // while the disk still has the new cluster's writes (a nexus's child timeout, a request deadline).
    let gone =
        tokio::time::timeout(Duration::from_millis(10), vol.write(0, pattern(2, 4096))).await;
    assert!(gone.is_err(), "the write was still running");
    let gone = tokio::time::timeout(Duration::from_millis(10), vol.write_zeroes(cs, 4096)).await;
    assert!(gone.is_err(), "the zeroes were still running");
    assert_eq!(reserved(), 2, "both hold a reserved cluster");
    // Both go on to the end: their clusters are mapped and none stays reserved (lost to the pool until an import).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reserved() > 0 || pool.volume_allocated(&r) < 2 * cs {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} clusters still reserved, {} bytes mapped",
            reserved(),
            pool.volume_allocated(&r)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    slow.set_plan(FaultPlan::default());
    assert_eq!(&vol.read(0, 4096).await.unwrap()[..], &pattern(2, 4096)[..]);
    assert!(vol.read(cs, 4096).await.unwrap().iter().all(|x| *x == 0));
    let sv = pool.open_volume(&snap).unwrap();
    assert_eq!(&sv.read(cs, 4096).await.unwrap()[..], &pattern(1, 4096)[..]);
    // The clusters they used are the volume's: the pool fills to its capacity and no further.
    assert_eq!(pool.stats().allocated, 3 * cs);
}

#[tokio::test]
async fn a_replica_conforms_to_the_block_device_contract() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(dev, &spec("p1"), &me()).await.unwrap();
    let vol = pool
        .create_replica(Uuid::new_v4(), 4 * MIB, None)
        .await
        .unwrap();
    crate::block::conformance::run(vol.as_ref()).await;
}

#[tokio::test]
async fn a_replica_grows_online_and_its_snapshots_keep_their_size() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(dev.clone(), &spec("grow"), &me())
        .await
        .unwrap();
    let cs = u64::from(CS);
    let r = Uuid::new_v4();
    // A size that ends inside a cluster: the rest of that cluster must read as zeroes once it is in the volume.
    let old = 2 * cs + 4096;
    let vol = pool.create_replica(r, old, None).await.unwrap();
    vol.write(old - 4096, pattern(3, 4096)).await.unwrap();
    assert!(matches!(
        vol.write(old, pattern(4, 4096)).await,
        Err(BlockError::OutOfRange { .. })
    ));
    let snap = Uuid::new_v4();
    pool.snapshot(r, snap).await.unwrap();

    let new = 4 * cs;
    let meta = pool.resize_replica(r, new).await.unwrap();
    assert_eq!((meta.size, vol.size_bytes()), (new, new));
    assert_eq!(pool.stats().committed, new);
    let tail = vol.read(old - 4096, 8192).await.unwrap();
    assert_eq!(&tail[..4096], &pattern(3, 4096)[..]);
    assert!(
        tail[4096..].iter().all(|b| *b == 0),
        "the grown tail is zero"
    );
    vol.write(old, pattern(4, 4096)).await.unwrap();
    vol.write(new - 4096, pattern(5, 4096)).await.unwrap();
    assert_eq!(pool.volume_meta(&snap).unwrap().size, old);
    let s = pool.open_volume(&snap).unwrap();
    assert_eq!(s.size_bytes(), old);
    assert!(s.read(old - 4096, 4096).await.unwrap()[..] == pattern(3, 4096)[..]);

    // The same size again is a no-op; smaller, a snapshot, beyond the pool, or unaligned are refused.
    assert_eq!(pool.resize_replica(r, new).await.unwrap().size, new);
    for (id, size) in [
        (r, old),
        (snap, new * 2),
        (r, 1 << 40),
        (r, new + 100),
        (Uuid::new_v4(), new),
    ] {
        let e = pool.resize_replica(id, size).await.unwrap_err();
        assert!(
            matches!(
                e,
                PoolError::InvalidArgument(_) | PoolError::NoSpace(_) | PoolError::NotFound(_)
            ),
            "{size}: {e}"
        );
    }
    drop((vol, s, pool));

    let pool = Pool::import(dev, &me()).await.unwrap();
    let vol = pool.open_volume(&r).unwrap();
    assert_eq!(vol.size_bytes(), new);
    assert_eq!(
        &vol.read(old, 4096).await.unwrap()[..],
        &pattern(4, 4096)[..]
    );
    assert_eq!(
        &vol.read(new - 4096, 4096).await.unwrap()[..],
        &pattern(5, 4096)[..]
    );
}

#[tokio::test]
async fn snapshots_and_clones_are_copy_on_write() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap();
    let r = Uuid::new_v4();
    let vol = pool.create_replica(r, 2 * MIB, None).await.unwrap();
    vol.write(0, pattern(1, 65536)).await.unwrap();
    let s = Uuid::new_v4();
    let snap = pool.snapshot(r, s).await.unwrap();
    assert_eq!(snap.snapshot_of, Some(r));
    assert_eq!(pool.snapshot(r, s).await.unwrap(), snap, "idempotent");
    assert_eq!(
        pool.stats().allocated,
        u64::from(CS),
        "a snapshot copies nothing"
    );

    vol.write(4096, pattern(2, 4096)).await.unwrap();
    assert_eq!(
        pool.stats().allocated,
        2 * u64::from(CS),
        "the first write copies"
    );
    let sv = pool.open_volume(&s).unwrap();
    assert_eq!(
        &sv.read(0, 65536).await.unwrap()[..],
        &pattern(1, 65536)[..]
    );
    assert!(matches!(
        sv.write(0, pattern(3, 512)).await,
        Err(BlockError::ReadOnly)
    ));
    let now = vol.read(0, 8192).await.unwrap();
    assert_eq!(&now[..4096], &pattern(1, 4096)[..]);
    assert_eq!(&now[4096..], &pattern(2, 4096)[..]);

    let c = Uuid::new_v4();
    let clone = pool.clone_snapshot(s, c, None).await.unwrap();
    assert_eq!(
        &clone.read(0, 65536).await.unwrap()[..],
        &pattern(1, 65536)[..]
    );
    clone.write(0, pattern(9, 512)).await.unwrap();
    assert_eq!(&sv.read(0, 512).await.unwrap()[..], &pattern(1, 512)[..]);
    assert_eq!(pool.stats().allocated, 3 * u64::from(CS));

    // The snapshot goes; the clone and the replica keep their data. The snapshot's own copy is freed once no
    // volume uses it.
    pool.destroy_volume(s).await.unwrap();
    assert!(matches!(sv.read(0, 512).await, Err(BlockError::Closed)));
    assert_eq!(
        &clone.read(512, 512).await.unwrap()[..],
        &pattern(1, 1024)[512..]
    );
    assert_eq!(pool.stats().allocated, 2 * u64::from(CS));
    drop((vol, clone, sv, pool));
    let pool = Pool::import(dev, &me()).await.unwrap();
    let clone = pool.open_volume(&c).unwrap();
    assert_eq!(&clone.read(0, 512).await.unwrap()[..], &pattern(9, 512)[..]);
    assert_eq!(pool.volume_meta(&c).unwrap().clone_of, Some(s));
}

#[tokio::test]
async fn a_snapshot_waits_for_its_own_volumes_io_and_no_other() {
    use std::time::Duration;
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(dev, &spec("p"), &me()).await.unwrap();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let va = pool.create_replica(a, MIB, None).await.unwrap();
    let vb = pool.create_replica(b, MIB, None).await.unwrap();
    // An I/O of `a` is in flight.
    let in_flight = va.quiesce.read().await;
    let wait = Duration::from_secs(5);
    tokio::time::timeout(wait, pool.snapshot(b, Uuid::new_v4()))
        .await
        .expect("a snapshot of b waits for no I/O of a")
        .unwrap();
    let snap_a = pool.snapshot(a, Uuid::new_v4());
    tokio::pin!(snap_a);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut snap_a)
            .await
            .is_err(),
        "a snapshot of a waits for a's I/O"
    );
    // While it waits, other volumes' I/O goes on.
    tokio::time::timeout(wait, vb.write(0, pattern(2, 4096)))
        .await
        .expect("b's I/O does not wait for a's snapshot")
        .unwrap();
    drop(in_flight);
    tokio::time::timeout(wait, snap_a).await.unwrap().unwrap();
}

/// A 12 MiB pool holding a replica as large as the pool and a 1 MiB one, and the pool's capacity in clusters.
async fn small_pool_with_two_replicas() -> (Pool, u64, Arc<PoolVolume>, Arc<PoolVolume>) {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(12 * MIB, 512));
    let pool = Pool::create(dev, &spec("small"), &me()).await.unwrap();
    let clusters = pool.stats().capacity / u64::from(CS);
    let a = pool
        .create_replica(Uuid::new_v4(), pool.stats().capacity, None)
        .await
        .unwrap();
    let b = pool
        .create_replica(Uuid::new_v4(), MIB, None)
        .await
        .unwrap();
    (pool, clusters, a, b)
}

#[tokio::test]
async fn a_full_pool_fails_only_writes_that_need_a_new_cluster() {
    let (pool, clusters, a, b) = small_pool_with_two_replicas().await;
    for i in 0..clusters {
        a.write(i * u64::from(CS), pattern(i as u8, 4096))
            .await
            .unwrap();
    }
    assert!(matches!(
        b.write(0, pattern(1, 4096)).await,
        Err(BlockError::NoSpace)
    ));
    assert_eq!(pool.stats().no_space_errors, 1);
    a.write(8192, pattern(5, 4096)).await.unwrap();
    assert_eq!(
        &a.read(8192, 4096).await.unwrap()[..],
        &pattern(5, 4096)[..]
    );
    // Deallocating whole clusters gives them back.
    a.deallocate(0, u64::from(CS)).await.unwrap();
    assert!(a.read(0, 4096).await.unwrap().iter().all(|x| *x == 0));
    b.write(0, pattern(1, 4096)).await.unwrap();
}

#[tokio::test]
async fn a_write_that_needs_more_clusters_than_are_free_changes_nothing() {
    let (pool, clusters, a, b) = small_pool_with_two_replicas().await;
    let cs = u64::from(CS);
    // `a` maps all but its last two clusters and `b` takes one more: one cluster stays free.
    for i in 0..clusters - 2 {
        a.write(i * cs, pattern(i as u8, 4096)).await.unwrap();
    }
    b.write(0, pattern(1, 4096)).await.unwrap();
    let before = pool.stats().allocated;
    // A write across `a`'s last two (unmapped) clusters needs two.
    let across = (clusters - 1) * cs - 4096;
    let e = a.write(across, pattern(7, 8192)).await;
    assert!(matches!(e, Err(BlockError::NoSpace)), "{e:?}");
    assert_eq!(pool.stats().allocated, before);
    assert_eq!(pool.stats().no_space_errors, 1);
    // Neither half landed, not even in the cluster that had room.
    assert!(a.read(across, 8192).await.unwrap().iter().all(|x| *x == 0));
    // The free cluster is still there for a write that fits.
    a.write(across, pattern(3, 4096)).await.unwrap();
    assert_eq!(
        &a.read(across, 4096).await.unwrap()[..],
        &pattern(3, 4096)[..]
    );
}

#[tokio::test]
async fn many_writes_at_once_into_the_last_free_cluster_all_land() {
    use crate::block::fault::FaultPlan;
    // A file system's writeback: many writes at once into one never-mapped cluster, with one cluster left free.
    // Each reserves a cluster before it finds the first one's allocation: they wait for it, none fails for space.
    let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(12 * MIB, 512));
    let slow = Arc::new(crate::block::fault::FaultDevice::new(mem));
    let pool = Pool::create(slow.clone(), &spec("small"), &me())
        .await
        .unwrap();
    let cs = u64::from(CS);
    let clusters = pool.stats().capacity / cs;
    let a = pool
        .create_replica(Uuid::new_v4(), clusters * cs, None)
        .await
        .unwrap();
    for i in 0..clusters - 1 {
        a.write(i * cs, pattern(i as u8, 4096)).await.unwrap();
    }
    slow.set_plan(FaultPlan {
        latency: Some(std::time::Duration::from_millis(5)),
        ..Default::default()
    });
    let last = (clusters - 1) * cs;
    let writes = (0..8u8).map(|i| a.write(last + u64::from(i) * 8192, pattern(100 + i, 8192)));
    for (i, r) in futures_util::future::join_all(writes)
        .await
        .into_iter()
        .enumerate()
    {
        assert!(r.is_ok(), "write {i}: {r:?}");
    }
    slow.set_plan(FaultPlan::default());
    for i in 0..8u8 {
        let at = last + u64::from(i) * 8192;
        assert_eq!(
            &a.read(at, 8192).await.unwrap()[..],
            &pattern(100 + i, 8192)[..]
        );
    }
    assert_eq!(pool.stats().no_space_errors, 0);
    assert_eq!(pool.inner.reserved.lock().unwrap().len(), 0);
    // Full now: a write into another never-mapped cluster still fails for space, at once.
    let b = pool.create_replica(Uuid::new_v4(), cs, None).await.unwrap();
    let at = std::time::Instant::now();
    assert!(matches!(
        b.write(0, pattern(1, 4096)).await,
        Err(BlockError::NoSpace)
    ));
    assert!(
        at.elapsed() < RESERVE_WAIT,
        "a write with nothing to wait for waited"
    );
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap();
    let r = Uuid::new_v4();
    for size in [0, 1000] {
        let e = pool.create_replica(r, size, None).await.err();
        assert!(matches!(e, Some(PoolError::InvalidArgument(_))), "{e:?}");
    }
    let e = pool.create_replica(r, 64 * MIB, None).await.err();
    assert!(matches!(e, Some(PoolError::NoSpace(_))), "{e:?}");
    pool.create_replica(r, MIB, None).await.unwrap();
    pool.create_replica(r, MIB, None).await.unwrap();
    let e = pool.create_replica(r, 2 * MIB, None).await.err();
    assert!(matches!(e, Some(PoolError::AlreadyExists { .. })), "{e:?}");
    let e = pool.snapshot(Uuid::new_v4(), Uuid::new_v4()).await.err();
    assert!(matches!(e, Some(PoolError::NotFound(_))), "{e:?}");
    let e = pool.clone_snapshot(r, Uuid::new_v4(), None).await.err();
    assert!(matches!(e, Some(PoolError::InvalidArgument(_))), "{e:?}");
    let e = pool.destroy().await.err();
    assert!(matches!(e, Some(PoolError::NotEmpty { .. })), "{e:?}");
    let e = Pool::create(dev.clone(), &spec("p2"), &me()).await.err();
    assert!(matches!(e, Some(PoolError::AlreadyExists { .. })), "{e:?}");
    assert_eq!(pool.volumes().len(), 1);
    pool.destroy_volume(r).await.unwrap();
    pool.destroy().await.unwrap();
    assert!(matches!(Pool::probe(dev.as_ref()).await, Ok(Probe::Blank)));
}

#[tokio::test]
async fn corrupt_labels_and_metadata_are_detected_not_used() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap();
    let r = Uuid::new_v4();
    pool.create_replica(r, MIB, None).await.unwrap();
    let label = pool.label().clone();
    drop(pool);
    // The newest checkpoint is torn: the pool falls back to the older one plus its journal... which import
    // already compacted, so the older one is the state before import. Either way the replica is there.
    let (a, b) = (label.ckpt_offset[0], label.ckpt_offset[1]);
    let flip = |off: u64| {
        let dev = dev.clone();
        async move {
            let mut blk = dev.read(off, 512).await.unwrap().to_vec();
            blk[20] ^= 0xff;
            dev.write(off, Bytes::from(blk)).await.unwrap();
        }
    };
    let newest = Pool::import(dev.clone(), &me()).await.unwrap();
    let epoch_area = if newest.inner.journal.epoch().await % 2 == 1 {
        a
    } else {
        b
    };
    drop(newest);
    flip(epoch_area).await;
    let p = Pool::import(dev.clone(), &me()).await.unwrap();
    assert!(p.volume_meta(&r).is_some());
    drop(p);
    flip(a).await;
    flip(b).await;
    let e = Pool::import(dev.clone(), &me()).await.err();
    assert!(matches!(e, Some(PoolError::CorruptMetadata(_))), "{e:?}");

    flip(0).await;
    let e = Pool::import(dev.clone(), &me()).await.err();
    assert!(matches!(e, Some(PoolError::CorruptLabel(_))), "{e:?}");
    let e = Pool::create(dev.clone(), &spec("p1"), &me()).await.err();
    assert!(matches!(e, Some(PoolError::CorruptLabel(_))), "{e:?}");

    let other: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    other.write(512, pattern(1, 512)).await.unwrap();
    let e = Pool::create(other, &spec("p1"), &me()).await.err();
    assert!(matches!(e, Some(PoolError::ForeignData)), "{e:?}");
}

/// The newest checkpoint is unreadable after the journal took transactions of its epoch: the import refuses (the
/// older checkpoint would undo every change since, and be written over the good copy), rather than bring the pool
/// back without them.
#[tokio::test]
async fn an_unreadable_newest_checkpoint_with_later_transactions_is_refused_not_rolled_back() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    drop(Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap());
    // Imported: both areas hold a checkpoint, the newer one just written.
    let pool = Pool::import(dev.clone(), &me()).await.unwrap();
    let label = pool.label().clone();
    let epoch = pool.inner.journal.epoch().await;
    // A change after the last checkpoint: a transaction of its epoch, the first in the journal.
    let r = Uuid::new_v4();
    pool.create_replica(r, MIB, None).await.unwrap();
    assert_eq!(pool.inner.journal.epoch().await, epoch);
    drop(pool);
    let newest = label.ckpt_offset[if epoch % 2 == 1 { 0 } else { 1 }];
    let mut blk = dev.read(newest, 512).await.unwrap().to_vec();
    blk[20] ^= 0xff;
    dev.write(newest, Bytes::from(blk)).await.unwrap();
    let e = Pool::import(dev.clone(), &me()).await.err();
    assert!(
        matches!(&e, Some(PoolError::CorruptMetadata(m)) if m.contains("transactions of epoch")),
        "{e:?}"
    );
}

#[tokio::test]
async fn the_journal_wraps_into_checkpoints() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap();
    let keep = Uuid::new_v4();
    pool.create_replica(keep, MIB, None).await.unwrap();
    // 1,100 transactions overflow the 1,024-block journal at least once.
    for _ in 0..550 {
        let u = Uuid::new_v4();
        pool.create_replica(u, MIB, None).await.unwrap();
        pool.destroy_volume(u).await.unwrap();
    }
    assert!(pool.inner.journal.epoch().await >= 2);
    drop(pool);
    let pool = Pool::import(dev, &me()).await.unwrap();
    assert_eq!(pool.volumes().len(), 1);
    assert!(pool.volume_meta(&keep).is_some());
}

/// A device that can lose power: reads see every write, but only flushed writes are sure to survive. After
/// `budget` writes the power is cut and every further I/O fails.
struct CrashDevice {
    state: Mutex<CrashState>,
    bs: u32,
    size: u64,
}

struct CrashState {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    writes: u64,
    budget: Option<u64>,
}

impl CrashDevice {
    fn new(image: Vec<u8>, budget: Option<u64>) -> CrashDevice {
        CrashDevice {
            bs: 512,
            size: image.len() as u64,
            state: Mutex::new(CrashState {
                current: image.clone(),
                durable: image,
                pending: Vec::new(),
                writes: 0,
                budget,
            }),
        }
    }

    fn writes(&self) -> u64 {
        self.state.lock().unwrap().writes
    }

    /// The image after the power cut: durable data plus, for each unflushed write, per `keep(i)`: 0 lost,
    /// 1 kept, 2 torn (only its first sector kept).
    fn crash_image(&self, mut keep: impl FnMut(usize) -> u8) -> Vec<u8> {
        let s = self.state.lock().unwrap();
        let mut img = s.durable.clone();
        for (i, (off, data)) in s.pending.iter().enumerate() {
            let n = match keep(i) {
                0 => 0,
                1 => data.len(),
                _ => data.len().min(512),
            };
            img[*off as usize..*off as usize + n].copy_from_slice(&data[..n]);
        }
        img
    }

    fn store(&self, offset: u64, data: Vec<u8>) -> Result<(), BlockError> {
        let mut s = self.state.lock().unwrap();
        if s.budget.is_some_and(|b| s.writes >= b) {
            return Err(BlockError::Closed);
        }
        s.writes += 1;
        s.current[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        s.pending.push((offset, data));
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for CrashDevice {
    fn block_size(&self) -> u32 {
        self.bs
    }
    fn num_blocks(&self) -> u64 {
        self.size / 512
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        check_range(offset, len, self.bs, self.size)?;
        let s = self.state.lock().unwrap();
        if s.budget.is_some_and(|b| s.writes >= b) {
            return Err(BlockError::Closed);
        }
        Ok(Bytes::copy_from_slice(
            &s.current[offset as usize..(offset + len) as usize],
        ))
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        check_range(offset, data.len() as u64, self.bs, self.size)?;
        self.store(offset, data.to_vec())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.bs, self.size)?;
        self.store(offset, vec![0; len as usize])
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        let mut s = self.state.lock().unwrap();
        if s.budget.is_some_and(|b| s.writes >= b) {
            return Err(BlockError::Closed);
        }
        let pending = std::mem::take(&mut s.pending);
        for (off, data) in pending {
            s.durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
}

/// What the volumes must hold: their full contents.
type Model = BTreeMap<Uuid, Vec<u8>>;

const VOL: u64 = MIB;

/// Runs the scripted workload until the device fails. Returns the model before and after the last operation
/// (equal if the script completed), and whether the pool was created.
async fn workload(dev: Arc<dyn BlockDevice>, ids: &[Uuid; 4]) -> (Model, Model, bool) {
    let mut after = Model::new();
    macro_rules! step {
        ($e:expr, $change:expr) => {{
            let before = after.clone();
            $change(&mut after);
            if $e.await.is_err() {
                return (before, after, true);
            }
        }};
    }
    let Ok(pool) = Pool::create(dev, &spec("crash"), &me()).await else {
        return (Model::new(), Model::new(), false);
    };
    let [r1, s1, c1, r2] = *ids;
    let write = |v: Uuid, off: u64, seed: u8| {
        let pool = pool.clone();
        async move {
            let vol = pool.open_volume(&v)?;
            vol.write(off, pattern(seed, 4096))
                .await
                .map_err(|e| PoolError::Io(e.to_string()))?;
            vol.flush().await.map_err(|e| PoolError::Io(e.to_string()))
        }
    };
    let put = |v: Uuid, off: u64, seed: u8| {
        move |m: &mut Model| {
            m.get_mut(&v).unwrap()[off as usize..off as usize + 4096]
                .copy_from_slice(&pattern(seed, 4096));
        }
    };
    let cs = u64::from(CS);
    step!(pool.create_replica(r1, VOL, None), |m: &mut Model| {
        m.insert(r1, vec![0; VOL as usize]);
    });
    step!(write(r1, 0, 1), put(r1, 0, 1));
    step!(write(r1, cs + 8192, 2), put(r1, cs + 8192, 2));
    step!(write(r1, 4096, 3), put(r1, 4096, 3));
    step!(pool.snapshot(r1, s1), |m: &mut Model| {
        let d = m[&r1].clone();
        m.insert(s1, d);
    });
    step!(write(r1, 0, 4), put(r1, 0, 4));
    step!(pool.clone_snapshot(s1, c1, None), |m: &mut Model| {
        let d = m[&s1].clone();
        m.insert(c1, d);
    });
    step!(write(c1, cs + 8192, 5), put(c1, cs + 8192, 5));
    step!(pool.destroy_volume(s1), |m: &mut Model| {
        m.remove(&s1);
    });
    step!(pool.create_replica(r2, VOL, None), |m: &mut Model| {
        m.insert(r2, vec![0; VOL as usize]);
    });
    step!(write(r2, 2 * cs, 6), put(r2, 2 * cs, 6));
    step!(pool.resize_replica(r2, VOL + cs + 4096), |m: &mut Model| {
        m.get_mut(&r2)
            .unwrap()
            .resize((VOL + cs + 4096) as usize, 0);
    });
    step!(write(r2, VOL + cs, 9), put(r2, VOL + cs, 9));
    step!(pool.resize_replica(r2, 2 * VOL), |m: &mut Model| {
        m.get_mut(&r2).unwrap().resize(2 * VOL as usize, 0);
    });
    step!(pool.destroy_volume(r1), |m: &mut Model| {
        m.remove(&r1);
    });
    step!(write(r2, 3 * cs, 7), put(r2, 3 * cs, 7));
    step!(write(c1, 3 * cs, 8), put(c1, 3 * cs, 8));
    (after.clone(), after, true)
}

async fn contents(pool: &Pool) -> Model {
    let mut m = Model::new();
    for v in pool.volumes() {
        let vol = pool.open_volume(&v.uuid).unwrap();
        m.insert(v.uuid, vol.read(0, v.size).await.unwrap().to_vec());
    }
    m
}

#[tokio::test]
async fn a_power_cut_after_any_write_leaves_a_sound_pool_with_every_acknowledged_change() {
    let size = 12 * MIB as usize;
    // A used disk: everything but the label block holds old data that must never show through.
    let mut blank = vec![0xA5u8; size];
    blank[..4096].fill(0);
    let ids = [
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    ];
    let full = Arc::new(CrashDevice::new(blank.clone(), None));
    let (_, done, _) = workload(full.clone(), &ids).await;
    let total = full.writes();
    assert!(total > 25, "the workload wrote {total} times");
    let mut checked = 0;
    let mut rng = 0x9e3779b97f4a7c15u64;
    for budget in 0..=total {
        for variant in 0..3u8 {
            let dev = Arc::new(CrashDevice::new(blank.clone(), Some(budget)));
            let (before, after, created) = workload(dev.clone(), &ids).await;
            let image = dev.crash_image(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                match variant {
                    0 => 0,
                    1 => 1,
                    _ => (rng % 3) as u8,
                }
            });
            let back: Arc<dyn BlockDevice> = Arc::new(CrashDevice::new(image, None));
            let pool = match Pool::import(back.clone(), &me()).await {
                Ok(p) => p,
                Err(PoolError::NoLabel) => {
                    assert!(!created, "budget {budget}: the pool vanished");
                    continue;
                }
                Err(e) => panic!("budget {budget} variant {variant}: import failed: {e}"),
            };
            let got = contents(&pool).await;
            let keys = |m: &Model| m.keys().copied().collect::<Vec<_>>();
            assert!(
                keys(&got) == keys(&before) || keys(&got) == keys(&after),
                "budget {budget} variant {variant}: volumes {:?}, expected {:?} or {:?}",
                keys(&got),
                keys(&before),
                keys(&after)
            );
            // An unacknowledged write may be torn: each sector is old or new, never anything else.
            for (id, data) in &got {
                let old = before.get(id).or(after.get(id)).unwrap();
                let new = after.get(id).unwrap_or(old);
                assert!(
                    data.len() == old.len() || data.len() == new.len(),
                    "budget {budget} variant {variant}: volume {id} is {} bytes",
                    data.len()
                );
                for (i, sector) in data.chunks(512).enumerate() {
                    let r = i * 512..(i + 1) * 512;
                    let is = |m: &Vec<u8>| m.get(r.clone()).is_some_and(|x| x == sector);
                    assert!(
                        is(old) || is(new),
                        "budget {budget} variant {variant}: volume {id} sector {i} holds data never written"
                    );
                }
            }
            // The recovered pool is usable: it takes a new replica and writes.
            let u = Uuid::new_v4();
            let v = pool.create_replica(u, VOL, None).await.unwrap();
            v.write(0, pattern(9, 4096)).await.unwrap();
            checked += 1;
        }
    }
    assert!(checked > 60, "{checked} crash images checked");
    assert_eq!(done.len(), 2);
}

#[tokio::test]
async fn another_nodes_import_is_refused_naming_the_owner_unless_forced() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap();
    assert_eq!(
        (pool.label().owner.as_str(), pool.label().incarnation),
        ("node-a", 1)
    );
    drop(pool);

    let e = Pool::import(dev.clone(), &Claim::new("node-b")).await.err();
    let Some(PoolError::OwnedByAnotherNode {
        owner, incarnation, ..
    }) = &e
    else {
        panic!("{e:?}");
    };
    assert_eq!((owner.as_str(), *incarnation), ("node-a", 1));
    assert!(e.unwrap().to_string().contains("node-a"));
    // The refused import wrote nothing: the owner imports as before.
    let pool = Pool::import(dev.clone(), &me()).await.unwrap();
    assert_eq!(pool.label().incarnation, 2);
    drop(pool);

    let pool = Pool::import(dev.clone(), &Claim::forced("node-b"))
        .await
        .unwrap();
    assert_eq!(
        (pool.label().owner.as_str(), pool.label().incarnation),
        ("node-b", 3)
    );
}

#[tokio::test]
async fn a_displaced_owner_stops_at_its_next_metadata_commit() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let old = Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap();
    let r = Uuid::new_v4();
    let vol = old.create_replica(r, 4 * MIB, None).await.unwrap();
    vol.write(0, pattern(1, 4096)).await.unwrap();

    // Another node takes the disk over (a LUN moved while the old owner still runs).
    let new = Pool::import(dev.clone(), &Claim::forced("node-b"))
        .await
        .unwrap();
    assert_eq!(new.volumes().len(), 1);

    // The old owner's next change is refused before it writes anything, and it closes its volumes.
    let e = old.create_replica(Uuid::new_v4(), MIB, None).await.err();
    assert!(
        matches!(&e, Some(PoolError::OwnershipLost { now, .. }) if now.contains("node-b")),
        "{e:?}"
    );
    assert!(old.is_lost());
    assert!(matches!(
        vol.write(0, pattern(2, 4096)).await,
        Err(BlockError::Closed)
    ));
    assert!(matches!(vol.read(0, 4096).await, Err(BlockError::Closed)));
    assert!(old.open_volume(&r).unwrap().read(0, 512).await.is_err());

    // The new owner sees what the old one committed and nothing of what it tried afterwards.
    let nv = new.open_volume(&r).unwrap();
    assert_eq!(&nv.read(0, 4096).await.unwrap()[..], &pattern(1, 4096)[..]);
    new.create_replica(Uuid::new_v4(), MIB, None).await.unwrap();
    drop((new, nv));
    let again = Pool::import(dev, &Claim::new("node-b")).await.unwrap();
    assert_eq!(again.volumes().len(), 2);
}

/// A displaced owner's first write to a never-mapped cluster goes into a cluster that is free as far as it knows,
/// which the new owner may have mapped since (its stock was zeroed before the takeover). It reads the label back
/// before writing there, and stops: the new owner's acknowledged data stays. Before, the check came only with the
/// mapping's commit, after the data had overwritten the new owner's.
#[tokio::test]
async fn a_displaced_owner_writes_no_data_into_a_cluster_it_found_free() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let old = Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap();
    let r = Uuid::new_v4();
    let vol = old.create_replica(r, 8 * MIB, None).await.unwrap();
    vol.write(0, pattern(1, 4096)).await.unwrap();
    // The stock is filled behind that first allocation.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let new = Pool::import(dev.clone(), &Claim::forced("node-b"))
        .await
        .unwrap();
    let nv = new.open_volume(&r).unwrap();
    // The new owner maps the replica's other clusters, each taking the lowest free ones.
    let clusters = 8 * MIB / u64::from(CS);
    for i in 1..clusters {
        nv.write(i * u64::from(CS), pattern(2, 4096)).await.unwrap();
    }
    // The old owner has not heard (it committed nothing since): to it, the replica's second cluster was never
    // written, and its stock holds zeroed free clusters to put it in.
    assert!(!old.is_lost());
    let e = vol.write(u64::from(CS), pattern(3, 4096)).await;
    assert!(e.is_err(), "a displaced owner's allocating write: {e:?}");
    assert!(old.is_lost(), "and it closes its volumes");
    for i in 1..clusters {
        assert_eq!(
            &nv.read(i * u64::from(CS), 4096).await.unwrap()[..],
            &pattern(2, 4096)[..],
            "cluster {i}"
        );
    }
}

#[tokio::test]
async fn a_second_import_by_the_same_node_displaces_the_first() {
    // Two processes of one node on one disk (what the exclusive open prevents on one machine): the newer import
    // wins, the older stops at its next commit.
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let first = Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap();
    let second = Pool::import(dev.clone(), &me()).await.unwrap();
    assert_eq!(second.label().incarnation, first.label().incarnation + 1);
    let e = first.create_replica(Uuid::new_v4(), MIB, None).await.err();
    assert!(matches!(e, Some(PoolError::OwnershipLost { .. })), "{e:?}");
    second
        .create_replica(Uuid::new_v4(), MIB, None)
        .await
        .unwrap();
}

#[tokio::test]
async fn two_destroys_of_a_volume_at_once_destroy_it_once_and_the_pool_still_imports() {
    use std::time::Duration;
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap();
    let (r, keep) = (Uuid::new_v4(), Uuid::new_v4());
    pool.create_replica(r, MIB, None).await.unwrap();
    pool.create_replica(keep, MIB, None).await.unwrap();
    // I/O in flight holds the gate: both destroys (a DestroyReplica and its retry) pass their check and wait.
    let io = pool.inner.gate.read().await;
    let destroy = |p: Pool| tokio::spawn(async move { p.destroy_volume(r).await });
    let (d1, d2) = (destroy(pool.clone()), destroy(pool.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(io);
    let (a, b) = (d1.await.unwrap(), d2.await.unwrap());
    let not_found = |e: &Result<(), PoolError>| matches!(e, Err(PoolError::NotFound(PoolObject::Volume(u))) if *u == r);
    assert!(
        (a.is_ok() && not_found(&b)) || (b.is_ok() && not_found(&a)),
        "{a:?} {b:?}"
    );
    // The pool goes on, and imports with the volume destroyed once.
    pool.create_replica(Uuid::new_v4(), MIB, None)
        .await
        .unwrap();
    drop(pool);
    let pool = Pool::import(dev, &me()).await.unwrap();
    assert_eq!(pool.volumes().len(), 2);
    assert!(pool.volume_meta(&r).is_none() && pool.volume_meta(&keep).is_some());
}

#[tokio::test]
async fn a_change_to_a_volume_destroyed_in_the_same_batch_is_refused_not_written() {
    use std::time::Duration;
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap();
    let r = Uuid::new_v4();
    pool.create_replica(r, MIB, None).await.unwrap();
    // A commit in progress: the changes below pass their checks and share the next transaction.
    let busy = pool.inner.journal.hold().await;
    let p = pool.clone();
    let destroy = tokio::spawn(async move { p.destroy_volume(r).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let p = pool.clone();
    let reserve = tokio::spawn(async move {
        p.set_reservation(r, Some(serde_json::json!({"holder": 1})))
            .await
    });
    let p = pool.clone();
    let (s, c) = (Uuid::new_v4(), Uuid::new_v4());
    let twice = tokio::spawn(async move {
        let a = p.create_replica(s, MIB, None);
        let b = p.create_replica(s, MIB, None);
        let (a, b) = futures_util::join!(a, b);
        (a.map(drop), b.map(drop))
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(busy);
    destroy.await.unwrap().unwrap();
    let e = reserve.await.unwrap();
    assert!(matches!(e, Err(PoolError::NotFound(_))), "{e:?}");
    // The same create twice at once: both get the replica.
    let (a, b) = twice.await.unwrap();
    a.unwrap();
    b.unwrap();
    pool.create_replica(c, MIB, None).await.unwrap();
    drop(pool);
    let pool = Pool::import(dev, &me()).await.unwrap();
    let mut ids: Vec<Uuid> = pool.volumes().iter().map(|v| v.uuid).collect();
    let mut want = vec![s, c];
    ids.sort();
    want.sort();
    assert_eq!(ids, want);
}

#[tokio::test]
async fn after_a_journal_flush_fails_no_write_is_acknowledged_and_none_acknowledged_is_lost() {
    use crate::block::fault::{FaultDevice, FaultPlan};
    let crash = Arc::new(CrashDevice::new(vec![0; 12 * MIB as usize], None));
    let disk = Arc::new(FaultDevice::new(crash.clone()));
    let pool = Pool::create(disk.clone(), &spec("p"), &me()).await.unwrap();
    let r = Uuid::new_v4();
    let vol = pool.create_replica(r, MIB, None).await.unwrap();
    vol.write(0, pattern(1, 4096)).await.unwrap();
    vol.flush().await.unwrap();
    let other = pool
        .create_replica(Uuid::new_v4(), MIB, None)
        .await
        .unwrap();
    assert_eq!(pool.fault(), None);
    // The disk fails flushes (a range at offset 0 catches them; the label there is not written again) once: the
    // unmap's journal transaction is written, its flush fails.
    disk.set_plan(FaultPlan {
        fail_ranges: vec![std::ops::Range { start: 0, end: 1 }],
        ..Default::default()
    });
    assert!(vol.deallocate(0, u64::from(CS)).await.is_err());
    disk.set_plan(FaultPlan::default());
    // The host writes the cluster again and flushes (the flush would make the failed transaction durable).
    let overwrite = vol.write(0, pattern(2, 4096)).await;
    let flushed = vol.flush().await;
    let acknowledged = overwrite.is_ok() && flushed.is_ok();
    let image = crash.crash_image(|_| 0);
    let back: Arc<dyn BlockDevice> = Arc::new(CrashDevice::new(image, None));
    let after = Pool::import(back, &me()).await.unwrap();
    let got = after.open_volume(&r).unwrap().read(0, 4096).await.unwrap();
    if acknowledged {
        assert!(
            got[..] == pattern(2, 4096)[..],
            "an acknowledged, flushed write was lost"
        );
    }
    assert!(
        !acknowledged,
        "a write after the failed commit was acknowledged"
    );
    // The unmap failed: either it happened or not.
    assert!(got[..] == pattern(1, 4096)[..] || got.iter().all(|b| *b == 0));
    // The pool is faulted: it says why; no write, flush, deallocate or metadata change goes through; reads do.
    let why = pool.fault().expect("the pool is faulted");
    assert!(why.contains("flush"), "{why}");
    assert!(
        pool.stats().disk_errors >= 1,
        "no new replica is placed on it"
    );
    assert!(other.write(0, pattern(3, 4096)).await.is_err());
    assert!(other.flush().await.is_err());
    assert!(other.deallocate(0, u64::from(CS)).await.is_err());
    assert!(vol.read(0, 4096).await.is_ok());
    let e = pool.create_replica(Uuid::new_v4(), MIB, None).await.err();
    assert!(matches!(e, Some(PoolError::Faulted { .. })), "{e:?}");
    // Imported again, it takes writes.
    drop((vol, other, pool));
    let again = Pool::import(disk, &me()).await.unwrap();
    assert_eq!(again.fault(), None);
    let v = again.open_volume(&r).unwrap();
    v.write(0, pattern(4, 4096)).await.unwrap();
    v.flush().await.unwrap();
}

#[tokio::test]
async fn a_fault_injected_on_the_pool_disk_fails_its_metadata_writes_too_and_counts_as_a_disk_error()
 {
    use crate::block::fault::FaultPlan;
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(dev, &spec("p"), &me()).await.unwrap();
    let vol = pool
        .create_replica(Uuid::new_v4(), 4 * MIB, None)
        .await
        .unwrap();
    vol.write(0, pattern(1, 4096)).await.unwrap();
    // Only the journal's blocks fail, as on a disk going bad there: the data of a first write lands, its mapping
    // does not.
    let l = pool.label().clone();
    let injected = pool.inject_disk_fault(Some(FaultPlan {
        fail_ranges: vec![std::ops::Range {
            start: l.journal_offset,
            end: l.journal_offset + l.journal_len,
        }],
        ..Default::default()
    }));
    assert_eq!(injected, 0);
    assert!(
        vol.write(u64::from(CS), pattern(2, 4096)).await.is_err(),
        "a first write whose mapping could not be written was acknowledged"
    );
    assert!(pool.inject_disk_fault(None) >= 1);
    assert!(pool.fault().is_some(), "the pool is faulted");
    assert!(
        pool.inner.disk.errors() >= 1,
        "the journal's error counts as the disk's"
    );
    assert!(vol.read(0, 4096).await.unwrap()[..] == pattern(1, 4096)[..]);
}

#[tokio::test]
async fn a_pool_created_where_one_was_destroyed_never_replays_the_old_journal() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let old = Pool::create(dev.clone(), &spec("old"), &me())
        .await
        .unwrap();
    let r = Uuid::new_v4();
    let vol = old.create_replica(r, 4 * MIB, None).await.unwrap();
    for i in 0..8u8 {
        vol.write(u64::from(i) * u64::from(CS), pattern(i, 4096))
            .await
            .unwrap();
    }
    old.destroy_volume(r).await.unwrap();
    old.destroy().await.unwrap();
    drop((vol, old));

    let new = Pool::create(dev.clone(), &spec("new"), &me())
        .await
        .unwrap();
    let n = Uuid::new_v4();
    new.create_replica(n, MIB, None).await.unwrap();
    drop(new);
    let pool = Pool::import(dev, &me()).await.unwrap();
    let ids: Vec<Uuid> = pool.volumes().iter().map(|v| v.uuid).collect();
    assert_eq!(ids, vec![n]);
    assert_eq!(pool.stats().allocated, 0);
}

#[tokio::test]
async fn a_commit_dropped_half_way_changes_nothing_for_the_commits_it_carries() {
    use crate::block::fault::{FaultDevice, FaultPlan};
    use std::time::Duration;
    let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let slow = Arc::new(FaultDevice::new(mem.clone()));
    let pool = Pool::create(slow.clone(), &spec("p"), &me()).await.unwrap();
    // Each journal commit takes three I/Os (the label read back, the write, the flush): 150 ms.
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(50)),
        ..Default::default()
    });
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // C commits; A and B queue behind it and share the next transaction, which A's caller starts and then
    // gives up on half way (a child timeout around it).
    let c_done = pool.create_replica(c, MIB, None);
    let later = |id: Uuid| {
        let pool = pool.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            pool.create_replica(id, MIB, None).await
        }
    };
    let a_dropped = tokio::time::timeout(Duration::from_millis(270), later(a));
    let b_done = tokio::time::timeout(Duration::from_secs(5), later(b));
    let (c_done, a_dropped, b_done) = futures_util::join!(c_done, a_dropped, b_done);
    c_done.unwrap();
    assert!(a_dropped.is_err(), "A's caller gave up half way");
    b_done.expect("B is answered").unwrap();
    slow.set_plan(FaultPlan::default());
    // A's change was made all the same, and the pool goes on.
    tokio::time::timeout(Duration::from_secs(5), async {
        while pool.volume_meta(&a).is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("A's change is applied");
    pool.create_replica(Uuid::new_v4(), MIB, None)
        .await
        .unwrap();
    drop(pool);
    let pool = Pool::import(mem, &me()).await.unwrap();
    assert_eq!(pool.volumes().len(), 4);
}

/// A disk whose writes, once handed to it, end on their own time whether or not anyone still waits (as io_uring's
/// or a blocking thread's do): each write is delayed by `late` and runs as a task of its own.
struct LateDisk {
    inner: Arc<MemoryDevice>,
    late: Mutex<std::time::Duration>,
    /// The same for writes of zeroes (a pool's label is wiped so) and flushes, in the caller's task.
    others_late: Mutex<std::time::Duration>,
    inflight: crate::block::inflight::InFlight,
}

#[async_trait]
impl BlockDevice for LateDisk {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        let late = *self.late.lock().unwrap();
        let (inner, ticket) = (self.inner.clone(), self.inflight.start());
        tokio::spawn(async move {
            tokio::time::sleep(late).await;
            let r = inner.write(offset, data).await;
            drop(ticket);
            r
        })
        .await
        .unwrap()
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let late = *self.others_late.lock().unwrap();
        tokio::time::sleep(late).await;
        self.inner.write_zeroes(offset, len).await
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.deallocate(offset, len).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        let late = *self.others_late.lock().unwrap();
        tokio::time::sleep(late).await;
        self.inner.flush().await
    }
    async fn settle(&self) {
        self.inflight.settle().await
    }
}

/// A 12 MiB pool on a [`LateDisk`] (its writes on time until told otherwise).
async fn late_pool() -> (Arc<LateDisk>, Pool) {
    let disk = Arc::new(LateDisk {
        inner: Arc::new(MemoryDevice::new(12 * MIB, 512)),
        late: Mutex::new(std::time::Duration::ZERO),
        others_late: Mutex::new(std::time::Duration::ZERO),
        inflight: Default::default(),
    });
    let pool = Pool::create(disk.clone(), &spec("late"), &me())
        .await
        .unwrap();
    (disk, pool)
}

#[tokio::test]
async fn a_replica_created_while_its_pool_is_destroyed_is_refused_not_wiped() {
    use std::time::Duration;
    let (disk, pool) = late_pool().await;
    // The label's wipe and the journal's writes take a while: a create that starts while the destroy runs is
    // written after the destroy counted the pool's volumes.
    *disk.others_late.lock().unwrap() = Duration::from_millis(300);
    *disk.late.lock().unwrap() = Duration::from_millis(300);
    let destroy = tokio::spawn({
        let pool = pool.clone();
        async move { pool.destroy().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let created = pool.create_replica(Uuid::new_v4(), MIB, None).await.err();
    destroy
        .await
        .unwrap()
        .expect("the pool had no volume when the destroy began");
    assert!(
        matches!(created, Some(PoolError::Destroying { .. })),
        "a create during the destroy must be refused, not acknowledged and then wiped: {created:?}"
    );
    assert!(matches!(Pool::probe(disk.as_ref()).await, Ok(Probe::Blank)));
}

/// A note of missed writes whose caller went away while the journal wrote it (a fenced nexus's connection
/// dropped) is applied by the time a settle of the volume ends: the settle that a reservation change waits for, so
/// the new holder reads the note.
#[tokio::test]
async fn a_settle_waits_for_a_note_of_missed_writes_whose_caller_went_away() {
    use std::time::Duration;
    let (disk, pool) = late_pool().await;
    let r = Uuid::new_v4();
    pool.create_replica(r, MIB, None).await.unwrap();
    let vol = pool.open_volume(&r).unwrap();
    // The journal's flush takes a while: the note is written, then made durable and applied 300 ms later.
    *disk.others_late.lock().unwrap() = Duration::from_millis(300);
    let missed = crate::block::MissedWrites {
        child: "c1".into(),
        since_ms: 1,
        ranges: vec![(0, 4096)],
    };
    let note = tokio::spawn({
        let (vol, missed) = (vol.clone(), missed.clone());
        async move { vol.note_missed(&missed).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    note.abort();
    vol.settle().await;
    assert_eq!(vol.missed().await.unwrap(), vec![missed]);
}

/// A destroy whose caller went away while it waited for the journal (a client's timeout) leaves the pool taking
/// creates again: it had not touched the label.
#[tokio::test]
async fn a_destroy_whose_caller_went_away_lets_creates_in_again() {
    use std::time::Duration;
    let (disk, pool) = late_pool().await;
    let r = Uuid::new_v4();
    pool.create_replica(r, MIB, None).await.unwrap();
    *disk.late.lock().unwrap() = Duration::from_millis(300);
    let gone = tokio::spawn({
        let pool = pool.clone();
        async move { pool.destroy_volume(r).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let destroy = tokio::spawn({
        let pool = pool.clone();
        async move { pool.destroy().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    destroy.abort();
    gone.await.unwrap().unwrap();
    *disk.late.lock().unwrap() = Duration::ZERO;
    pool.create_replica(Uuid::new_v4(), MIB, None)
        .await
        .expect("creates are taken again");
}

#[tokio::test]
async fn a_destroy_refused_for_volumes_lets_creates_in_again() {
    let (_disk, pool) = late_pool().await;
    pool.create_replica(Uuid::new_v4(), MIB, None)
        .await
        .unwrap();
    let e = pool.destroy().await.err();
    assert!(matches!(e, Some(PoolError::NotEmpty { .. })), "{e:?}");
    pool.create_replica(Uuid::new_v4(), MIB, None)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_write_whose_caller_went_away_never_lands_in_clusters_freed_or_shared_since() {
    use std::time::Duration;
    let (disk, pool) = late_pool().await;
    let cs = u64::from(CS);
    let clusters = pool.stats().capacity / cs;
    let a = Uuid::new_v4();
    let va = pool.create_replica(a, cs, None).await.unwrap();
    va.write(0, pattern(1, 4096)).await.unwrap();
    let late = Duration::from_millis(300);
    let give_up = Duration::from_millis(20);
    *disk.late.lock().unwrap() = late;
    // An overwrite whose caller gives up (a nexus's child timeout): the disk still has it.
    assert!(
        tokio::time::timeout(give_up, va.write(0, pattern(2, 4096)))
            .await
            .is_err()
    );
    // Its volume is destroyed and another takes every cluster of the pool, the freed one too.
    *disk.late.lock().unwrap() = Duration::ZERO;
    pool.destroy_volume(a).await.unwrap();
    let b = Uuid::new_v4();
    let vb = pool.create_replica(b, clusters * cs, None).await.unwrap();
    for i in 0..clusters {
        vb.write(i * cs, pattern(9, 4096)).await.unwrap();
    }
    // The same with a snapshot: a write dropped before it must not change what the snapshot shows.
    *disk.late.lock().unwrap() = late;
    assert!(
        tokio::time::timeout(give_up, vb.write(0, pattern(3, 4096)))
            .await
            .is_err()
    );
    *disk.late.lock().unwrap() = Duration::ZERO;
    let s = Uuid::new_v4();
    pool.snapshot(b, s).await.unwrap();
    let snap = pool.open_volume(&s).unwrap();
    let at_snapshot = snap.read(0, 4096).await.unwrap();
    tokio::time::sleep(late * 2).await;
    for i in 0..clusters {
        let want = if i == 0 {
            &at_snapshot[..]
        } else {
            &pattern(9, 4096)[..]
        };
        let got = vb.read(i * cs, 4096).await.unwrap();
        assert!(
            &got[..] == want,
            "cluster {i} of the new volume starts {:?}, not {:?}",
            &got[..4],
            &want[..4]
        );
    }
    let got = snap.read(0, 4096).await.unwrap();
    assert!(
        got == at_snapshot,
        "the snapshot changed after it was taken: starts {:?}, not {:?}",
        &got[..4],
        &at_snapshot[..4]
    );
    assert_eq!(disk.inflight.len(), 0);
}

/// A write over a cluster that must be allocated and one already mapped runs as a task of its own; its caller gave
/// up (a nexus's child timeout) while the first piece was on the disk. A settle (what a reservation change fencing
/// that caller waits for) returned once the disk had ended what it held, and the task then wrote the second piece
/// over whatever came after. Now the settle waits for the task.
#[tokio::test]
async fn a_settle_waits_for_the_later_pieces_of_a_write_whose_caller_went_away() {
    use std::time::Duration;
    let (disk, pool) = late_pool().await;
    let cs = u64::from(CS);
    let v = pool
        .create_replica(Uuid::new_v4(), 2 * cs, None)
        .await
        .unwrap();
    v.write(cs, pattern(1, 4096)).await.unwrap();
    *disk.late.lock().unwrap() = Duration::from_millis(200);
    // The last 4 KiB of cluster 0 (not allocated) and the first of cluster 1.
    assert!(
        tokio::time::timeout(
            Duration::from_millis(20),
            v.write(cs - 4096, pattern(2, 8192))
        )
        .await
        .is_err()
    );
    v.settle().await;
    *disk.late.lock().unwrap() = Duration::ZERO;
    assert!(
        v.read(cs, 4096).await.unwrap()[..] == pattern(2, 8192)[4096..],
        "the settle returned before the write's second piece landed"
    );
    assert_eq!(disk.inflight.len(), 0);
}

/// Under test, [`Pool::open_volume`] of the volume named here waits, once it has looked the volume up, until the
/// sender paired with the receiver sends.
static PAUSE_OPEN: Mutex<Option<(Uuid, std::sync::mpsc::Receiver<()>)>> = Mutex::new(None);

pub(super) fn after_lookup(uuid: &Uuid) {
    let mut pause = PAUSE_OPEN.lock().unwrap();
    if pause.as_ref().is_some_and(|(u, _)| u == uuid) {
        let (_, go) = pause.take().unwrap();
        drop(pause);
        let _ = go.recv();
    }
}

/// A volume destroyed while it is being opened (a snapshot, an export or a resize of it asked at the same time)
/// leaves no open handle behind: the open finds it gone, or hands out a handle the destroy closed, and a replica
/// made again under its name gets a handle of its own size. Before, the open looked the volume up before it took
/// the handles' lock, and put back a handle of the destroyed volume once the destroy had closed and dropped its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_destroyed_while_it_is_opened_leaves_no_handle_behind() {
    let pool = memory_pool(64 * MIB).await;
    let u = Uuid::new_v4();
    pool.create_replica(u, 4 * MIB, None).await.unwrap();
    let (go, wait) = std::sync::mpsc::channel();
    *PAUSE_OPEN.lock().unwrap() = Some((u, wait));
    let opener = pool.clone();
    let opening = tokio::task::spawn_blocking(move || opener.open_volume(&u));
    while PAUSE_OPEN.lock().unwrap().is_some() {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let destroyer = pool.clone();
    let destroying = tokio::spawn(async move { destroyer.destroy_volume(u).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    go.send(()).unwrap();
    let opened = opening.await.unwrap();
    destroying.await.unwrap().unwrap();
    match opened {
        Err(PoolError::NotFound(_)) => {}
        Ok(v) => assert!(
            v.read(0, 512).await.is_err(),
            "an open handle of a destroyed volume"
        ),
        Err(e) => panic!("{e}"),
    }
    let again = pool.create_replica(u, 8 * MIB, None).await.unwrap();
    assert_eq!(again.size(), 8 * MIB);
}

/// Two replicas made at once where the metadata can describe only one more: one is refused. Each request checks
/// the room before its record is committed; before, both checked against the same state and both were committed,
/// and a checkpoint that no longer fits its area fails every later commit and import.
#[tokio::test]
async fn two_creates_at_once_where_the_metadata_has_room_for_one_take_it_once() {
    let pool = memory_pool(64 * MIB).await;
    let size = u64::from(CS);
    let mut made = Vec::new();
    loop {
        let u = Uuid::new_v4();
        match pool.create_replica(u, size, None).await {
            Ok(_) => made.push(u),
            Err(PoolError::MetadataFull(_)) => break,
            Err(e) => panic!("{e}"),
        }
    }
    pool.destroy_volume(made.pop().unwrap()).await.unwrap();
    let (a, b) = tokio::join!(
        pool.create_replica(Uuid::new_v4(), size, None),
        pool.create_replica(Uuid::new_v4(), size, None)
    );
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one fits: {:?} {:?}",
        a.map(drop),
        b.map(drop)
    );
    assert!(
        matches!(a.err().or(b.err()), Some(PoolError::MetadataFull(_))),
        "refused as metadata full"
    );
}

/// A pool whose metadata cannot describe another replica reports no room for one (its data area has plenty):
/// the cluster agent places nothing more there, rather than placing there again and again, each try refused.
#[tokio::test]
async fn a_pool_whose_metadata_is_full_reports_no_room_for_a_replica() {
    let pool = memory_pool(64 * MIB).await;
    let size = u64::from(CS);
    assert!(pool.stats().replica_room > 32 * MIB);
    loop {
        let room = pool.stats().replica_room;
        match pool.create_replica(Uuid::new_v4(), size, None).await {
            Ok(_) => assert!(room >= size, "made with {room} bytes of room"),
            Err(PoolError::MetadataFull(_)) => {
                let s = pool.stats();
                assert!(
                    s.replica_room < size,
                    "{} bytes of room for a replica the metadata refuses ({} bytes of data free)",
                    s.replica_room,
                    s.capacity - s.allocated - s.may_take
                );
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Listings take every volume's metadata but its cluster map (millions of entries in a large pool, copied under the
/// lock the I/O path takes, at every heartbeat and scrape).
#[tokio::test]
async fn volume_headers_are_the_volumes_without_their_maps() {
    let pool = memory_pool(64 * MIB).await;
    let v = pool
        .create_replica(Uuid::new_v4(), 4 * MIB, None)
        .await
        .unwrap();
    v.write(0, Bytes::from(vec![1u8; 4096])).await.unwrap();
    let full = pool.volumes();
    let headers = pool.volume_headers();
    assert_eq!(headers.len(), 1);
    assert!(!full[0].map.is_empty() && headers[0].map.is_empty());
    let mut without = full[0].clone();
    without.map.clear();
    assert_eq!(
        serde_json::to_string(&headers[0]).unwrap(),
        serde_json::to_string(&without).unwrap()
    );
}

/// A pool on a memory device of `size` bytes.
async fn memory_pool(size: u64) -> Pool {
    Pool::create(Arc::new(MemoryDevice::new(size, 512)), &spec("p"), &me())
        .await
        .unwrap()
}

/// A share naming thousands of hosts (any number was taken) would be journaled, and the checkpoint it grows would
/// no longer fit its area: every later commit refused and the pool never imported again. It is refused, and the
/// pool imports as before; a share and a reservation state within their budgets are taken.
#[tokio::test]
async fn a_share_or_reservation_too_large_for_the_metadata_is_refused() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(64 * MIB, 512));
    let pool = Pool::create(dev.clone(), &spec("p"), &me()).await.unwrap();
    let r = Uuid::new_v4();
    pool.create_replica(r, 4 * MIB, None).await.unwrap();
    let nqn = |i: usize| format!("nqn.2026-11.io.keelson:host-{i:0>190}");
    let many = Share {
        hosts: (0..6000).map(nqn).collect(),
    };
    let e = pool.set_share(r, Some(many)).await.unwrap_err();
    assert!(matches!(e, PoolError::InvalidArgument(_)), "{e}");
    let few = Share {
        hosts: (0..4).map(nqn).collect(),
    };
    pool.set_share(r, Some(few.clone())).await.unwrap();
    let big = serde_json::json!({ "registrants": vec!["x".repeat(100); 200] });
    let e = pool.set_reservation(r, Some(big)).await.unwrap_err();
    assert!(matches!(e, PoolError::InvalidArgument(_)), "{e}");
    let made = Uuid::new_v4();
    let e = pool
        .create_replica(
            made,
            4 * MIB,
            Some(Share {
                hosts: (0..6000).map(nqn).collect(),
            }),
        )
        .await
        .err()
        .expect("a create with a share past its budget is refused");
    assert!(matches!(e, PoolError::InvalidArgument(_)), "{e}");
    drop(pool);
    let pool = Pool::import(dev, &me()).await.unwrap();
    assert_eq!(pool.volumes().len(), 1);
    assert_eq!(pool.volume_meta(&r).unwrap().share, Some(few));
}

/// Every replica the metadata admits may take a share and a reservation state up to their budgets, and the
/// checkpoint still fits its area: the pool imports again with them all. Before, admission counted shares and
/// reservations only as they were, so replicas admitted up to the limit and then shared to hosts that registered
/// reservations outgrew the area: every commit refused from then on (the destroy that would make room too) and the
/// pool never imported again.
#[tokio::test]
async fn replicas_admitted_to_the_limit_may_all_take_shares_and_reservations() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(64 * MIB, 512));
    let pool = Pool::create(dev.clone(), &spec("p"), &me()).await.unwrap();
    let mut made = Vec::new();
    loop {
        let r = Uuid::new_v4();
        match pool.create_replica(r, u64::from(CS), None).await {
            Ok(_) => made.push(r),
            Err(PoolError::MetadataFull(_)) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(made.len() > 10, "{}", made.len());
    let nqn = |i: usize| format!("nqn.2026-11.io.keelson:host-{i:0>190}");
    let share = Share {
        hosts: (0..8).map(nqn).collect(),
    };
    let reservation = serde_json::json!({ "registrants": vec!["x".repeat(100); 70] });
    for (i, r) in made.iter().enumerate() {
        pool.set_share(*r, Some(share.clone()))
            .await
            .unwrap_or_else(|e| panic!("share of replica {i} of {}: {e}", made.len()));
        pool.set_reservation(*r, Some(reservation.clone()))
            .await
            .unwrap_or_else(|e| panic!("reservation of replica {i} of {}: {e}", made.len()));
    }
    drop(pool);
    let pool = Pool::import(dev, &me()).await.unwrap();
    assert_eq!(pool.volumes().len(), made.len());
    pool.destroy_volume(made[0]).await.unwrap();
}

/// A volume opened after its pool was closed (an export racing the engine's shutdown, a pool adopted and let go)
/// takes no I/O: its handle is closed from the start. Before, only handles made before the close were.
#[tokio::test]
async fn a_volume_opened_after_its_pool_closed_takes_no_io() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(64 * MIB, 512));
    let pool = Pool::create(dev.clone(), &spec("p"), &me()).await.unwrap();
    let r = Uuid::new_v4();
    pool.create_replica(r, 4 * MIB, None).await.unwrap();
    drop(pool);
    // Imported again: no handle of the volume yet.
    let pool = Pool::import(dev, &me()).await.unwrap();
    pool.close();
    let v = pool.open_volume(&r).unwrap();
    let w = v.write(0, Bytes::from(vec![1u8; 4096])).await;
    assert!(matches!(w, Err(BlockError::Closed)), "{w:?}");
}

/// A destroy of an empty pool whose caller goes away while it waits for the pool's gate (held by a slow disk's
/// work) leaves the pool as it was: a replica made afterwards takes I/O. Before, the pool stayed closed, and every
/// replica made in it after was closed from the start.
#[tokio::test]
async fn a_destroy_given_up_before_the_label_leaves_the_pool_open() {
    let pool = memory_pool(64 * MIB).await;
    let held = pool.inner.gate.clone().read_owned().await;
    let given_up =
        tokio::time::timeout(std::time::Duration::from_millis(100), pool.destroy()).await;
    assert!(given_up.is_err(), "the destroy did not wait for the gate");
    drop(held);
    let v = pool
        .create_replica(Uuid::new_v4(), 4 * MIB, None)
        .await
        .unwrap();
    v.write(0, Bytes::from(vec![3u8; 4096])).await.unwrap();
    assert_eq!(v.read(0, 4096).await.unwrap(), Bytes::from(vec![3u8; 4096]));
}

/// Waits in `preallocate` (what an import does between writing its label and reading the journal) while `held`.
struct HeldAfterClaim {
    inner: Arc<MemoryDevice>,
    held: tokio::sync::watch::Sender<bool>,
}

#[async_trait]
impl BlockDevice for HeldAfterClaim {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        self.inner.write(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.write_zeroes(offset, len).await
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.deallocate(offset, len).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush().await
    }
    async fn preallocate(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        let mut rx = self.held.subscribe();
        let _ = rx.wait_for(|held| !*held).await;
        Ok(())
    }
}

/// An import displaced after it wrote its label and before it read the journal (another node forced an import and
/// committed a change meanwhile) stops before it writes its own checkpoint. Before, it replayed the other owner's
/// journal and wrote a checkpoint of a newer epoch, and the other owner's later changes were lost at its next import
/// (the newer checkpoint won, and the journal's transactions of the older epoch were not replayed).
#[tokio::test]
async fn an_import_displaced_before_it_reads_the_journal_writes_no_checkpoint() {
    let mem = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let dev: Arc<dyn BlockDevice> = Arc::new(HeldAfterClaim {
        inner: mem.clone(),
        held: tokio::sync::watch::channel(false).0,
    });
    drop(Pool::create(dev.clone(), &spec("p1"), &me()).await.unwrap());
    let held = Arc::new(HeldAfterClaim {
        inner: mem.clone(),
        held: tokio::sync::watch::channel(true).0,
    });
    let slow = tokio::spawn({
        let held: Arc<dyn BlockDevice> = held.clone();
        async move { Pool::import(held, &me()).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let plain: Arc<dyn BlockDevice> = mem.clone();
    let new = Pool::import(plain.clone(), &Claim::forced("node-b"))
        .await
        .unwrap();
    let r = Uuid::new_v4();
    new.create_replica(r, 4 * MIB, None).await.unwrap();
    held.held.send_replace(false);
    let e = slow.await.unwrap().err();
    assert!(
        matches!(&e, Some(PoolError::OwnershipLost { .. })),
        "the displaced import went on: {e:?}"
    );
    let r2 = Uuid::new_v4();
    new.create_replica(r2, 4 * MIB, None).await.unwrap();
    drop(new);
    let again = Pool::import(plain, &Claim::new("node-b")).await.unwrap();
    let mut have: Vec<Uuid> = again.volumes().iter().map(|v| v.uuid).collect();
    have.sort();
    let mut want = vec![r, r2];
    want.sort();
    assert_eq!(have, want, "changes of the owner lost");
}

/// A note of missed writes naming more ranges than the journal holds (a host's note may be a 4 MiB command) is kept
/// coarsened to the volume's budget, a superset of what it named, and takes its journal batch with it no more.
/// Before, its record was journaled as it came: past the journal's room, MetadataFull for it and every change
/// written with it.
#[tokio::test]
async fn a_note_of_missed_writes_past_the_journal_s_room_is_kept_coarsened() {
    let pool = memory_pool(64 * MIB).await;
    let r = Uuid::new_v4();
    pool.create_replica(r, 16 * MIB, None).await.unwrap();
    let vol = pool.open_volume(&r).unwrap();
    // 400,000 ranges 20 bytes apart: about 6 MB as JSON, past the 4 MiB journal.
    let ranges: Vec<(u64, u64)> = (0..400_000u64).map(|i| (i * 40, 20)).collect();
    let missed = crate::block::MissedWrites {
        child: "c1".into(),
        since_ms: 1,
        ranges: ranges.clone(),
    };
    vol.note_missed(&missed).await.unwrap();
    let kept = vol.missed().await.unwrap();
    assert_eq!(kept.len(), 1);
    assert!(
        kept[0].encoded_bound() <= meta::MISSED_BUDGET,
        "{}",
        kept[0].ranges.len()
    );
    for (s, n) in ranges.iter().step_by(997) {
        assert!(
            kept[0]
                .ranges
                .iter()
                .any(|(ks, kn)| ks <= s && s + n <= ks + kn),
            "range {s}+{n} no longer named"
        );
    }
}
