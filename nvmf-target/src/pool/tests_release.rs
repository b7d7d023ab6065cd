//! Freed clusters' space goes back to the disk under the pool (`release`): a destroyed replica's, whole clusters
//! the host deallocated, and at import whatever was never given back; never a cluster a snapshot still shares or an
//! allocation took meanwhile.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use super::tests_thin::ThinDisk;
use super::*;
use crate::block::{BlockDevice, BlockError};

pub(super) const MIB: u64 = 1 << 20;
pub(super) const CS: u64 = 256 << 10;

pub(super) async fn pool_on(disk: &Arc<ThinDisk>) -> Pool {
    let spec = PoolSpec {
        name: "p1".into(),
        uuid: Uuid::new_v4(),
        cluster_size: CS as u32,
    };
    Pool::create(disk.clone(), &spec, &Claim::new("node-a"))
        .await
        .unwrap()
}

pub(super) fn data(seed: u8, len: u64) -> Bytes {
    Bytes::from(vec![seed; len as usize])
}

/// Waits (bounded) until the pool's releases are done; the disk's backed bytes then.
async fn settled(pool: &Pool, disk: &ThinDisk) -> u64 {
    for _ in 0..500 {
        if pool.inner.releases.idle() {
            return disk.backed_bytes();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the pool's releases never ended");
}

#[tokio::test]
async fn a_destroyed_replicas_space_goes_back_except_what_a_snapshot_shares() {
    let disk = Arc::new(ThinDisk::new(32 * MIB));
    let pool = pool_on(&disk).await;
    let a = Uuid::new_v4();
    let vol = pool.create_replica(a, 8 * CS, None).await.unwrap();
    vol.write(0, data(1, 6 * CS)).await.unwrap();
    // A snapshot shares the first six clusters; two more are the replica's alone.
    pool.snapshot(a, Uuid::new_v4()).await.unwrap();
    vol.write(6 * CS, data(2, 2 * CS)).await.unwrap();
    let before = settled(&pool, &disk).await;
    drop(vol);
    pool.destroy_volume(a).await.unwrap();
    let after = settled(&pool, &disk).await;
    assert_eq!(
        before - after,
        2 * CS,
        "exactly the replica's own clusters go back"
    );

    // A replica with nothing shared gives all of its clusters back.
    let b = Uuid::new_v4();
    let vol = pool.create_replica(b, 4 * CS, None).await.unwrap();
    vol.write(0, data(3, 4 * CS)).await.unwrap();
    let before = settled(&pool, &disk).await;
    drop(vol);
    pool.destroy_volume(b).await.unwrap();
    assert_eq!(before - settled(&pool, &disk).await, 4 * CS);
}

/// A destroy whose caller goes away while its commit waits for the journal still ends: writes sent to the volume
/// meanwhile wait for it and then find the volume gone, and the replica's space goes back. Before, the caller's
/// going let those writes into clusters the destroy, applied with a later commit, then freed under them; and the
/// caller, not the commit, queued the release, so the space stayed taken until the next import.
#[tokio::test]
async fn a_destroy_whose_caller_went_away_still_ends_and_gives_its_space_back() {
    let disk = Arc::new(ThinDisk::new(32 * MIB));
    let pool = pool_on(&disk).await;
    let a = Uuid::new_v4();
    let vol = pool.create_replica(a, 4 * CS, None).await.unwrap();
    vol.write(0, data(1, 4 * CS)).await.unwrap();
    let before = settled(&pool, &disk).await;
    let held = pool.inner.journal.hold().await;
    let destroy = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.destroy_volume(a).await })
    };
    queued(&pool).await;
    destroy.abort();
    assert!(destroy.await.unwrap_err().is_cancelled());
    let write = tokio::spawn(async move { vol.write(0, data(2, 4096)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(held);
    // Another commit: whatever waited in the journal's queue is applied once it is (it queues behind them).
    pool.create_replica(Uuid::new_v4(), CS, None).await.unwrap();
    assert!(pool.volume_meta(&a).is_none(), "the destroy was committed");
    let w = write.await.unwrap();
    assert!(
        matches!(w, Err(BlockError::Closed)),
        "a write after the destroy: {w:?}"
    );
    assert_eq!(
        before - settled(&pool, &disk).await,
        4 * CS,
        "the destroyed replica's space went back"
    );
}

/// Waits (bounded) until a commit waits for the journal.
pub(super) async fn queued(pool: &Pool) {
    for _ in 0..500 {
        if pool.inner.journal.queued() > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("nothing was queued for the journal");
}

/// A deallocation whose caller goes away while its commit waits for the journal still holds the pool's I/O off
/// until the commit is applied: a write sent after it lands after the unmap. Before, the caller's going let writes
/// in at once, and the unmap, applied with a later commit, freed the cluster under the write just acknowledged: its
/// data was lost, and another volume's allocation could have taken the cluster while it was still being written.
#[tokio::test]
async fn a_deallocation_whose_caller_went_away_holds_writes_off_until_it_is_applied() {
    let disk = Arc::new(ThinDisk::new(32 * MIB));
    let pool = pool_on(&disk).await;
    let vol = pool
        .create_replica(Uuid::new_v4(), 4 * CS, None)
        .await
        .unwrap();
    vol.write(0, data(1, 4 * CS)).await.unwrap();
    let held = pool.inner.journal.hold().await;
    let dealloc = {
        let vol = vol.clone();
        tokio::spawn(async move { vol.deallocate(CS, CS).await })
    };
    queued(&pool).await;
    dealloc.abort();
    assert!(dealloc.await.unwrap_err().is_cancelled());
    let write = {
        let vol = vol.clone();
        tokio::spawn(async move { vol.write(CS, data(2, 4096)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(held);
    // Another commit: whatever waited in the journal's queue is applied once it is (it queues behind them).
    pool.create_replica(Uuid::new_v4(), CS, None).await.unwrap();
    write.await.unwrap().unwrap();
    let back = vol.read(CS, CS).await.unwrap();
    assert!(
        back[..4096].iter().all(|b| *b == 2),
        "the write sent after the deallocation was lost"
    );
    assert!(back[4096..].iter().all(|b| *b == 0));
    assert!(vol.read(0, CS).await.unwrap().iter().all(|b| *b == 1));
}

#[tokio::test]
async fn whole_clusters_the_host_deallocates_go_back_and_partly_deallocated_ones_stay() {
    let disk = Arc::new(ThinDisk::new(32 * MIB));
    let pool = pool_on(&disk).await;
    let vol = pool
        .create_replica(Uuid::new_v4(), 8 * CS, None)
        .await
        .unwrap();
    vol.write(0, data(1, 8 * CS)).await.unwrap();
    let before = settled(&pool, &disk).await;
    // Half of cluster 1, clusters 2 and 3 whole, half of cluster 4.
    vol.deallocate(CS + CS / 2, 3 * CS).await.unwrap();
    assert_eq!(before - settled(&pool, &disk).await, 2 * CS);
    let back = vol.read(0, 8 * CS).await.unwrap();
    assert!(back[..(CS + CS / 2) as usize].iter().all(|b| *b == 1));
    assert!(
        back[(CS + CS / 2) as usize..(4 * CS + CS / 2) as usize]
            .iter()
            .all(|b| *b == 0)
    );
    assert!(back[(4 * CS + CS / 2) as usize..].iter().all(|b| *b == 1));
}

#[tokio::test]
async fn a_freed_cluster_an_allocation_took_before_its_release_ran_keeps_its_data() {
    let disk = Arc::new(ThinDisk::new(16 * MIB));
    let pool = pool_on(&disk).await;
    let later = pool
        .create_replica(Uuid::new_v4(), 4 * CS, None)
        .await
        .unwrap();
    // One replica takes every free cluster, so that the next allocation must take one of its clusters.
    let s = pool.stats();
    let free = (s.capacity - s.allocated) / CS;
    let a = Uuid::new_v4();
    let vol = pool.create_replica(a, free * CS, None).await.unwrap();
    vol.write(0, data(1, free * CS)).await.unwrap();
    assert_eq!(pool.stats().allocated, pool.stats().capacity);
    let full = settled(&pool, &disk).await;
    let freed = release::runs(&pool.volume_meta(&a).unwrap().map);
    drop(vol);
    pool.destroy_volume(a).await.unwrap();
    // These writes must take freed clusters.
    for i in 0..4 {
        later.write(i * CS, data(10 + i as u8, CS)).await.unwrap();
    }
    // A release of the destroyed replica's clusters that comes only now (it waited for the gate behind them)
    // punches only those still free.
    pool.inner.release_behind(freed);
    settled(&pool, &disk).await;
    for i in 0..4 {
        let back = later.read(i * CS, CS).await.unwrap();
        assert!(
            back.iter().all(|b| *b == 10 + i as u8),
            "cluster {i} of the later replica was punched under its data"
        );
    }
    // All but the four clusters taken again and at most a stock's worth (zeroed ahead) went back.
    assert!(free > 12);
    assert!(
        full - disk.backed_bytes() >= (free - 12) * CS,
        "the freed clusters' space went back: {full} -> {} bytes backed",
        disk.backed_bytes()
    );
}

#[tokio::test]
async fn an_import_gives_back_the_space_of_free_clusters_never_given_back() {
    let disk = Arc::new(ThinDisk::new(32 * MIB));
    let pool = pool_on(&disk).await;
    let a = Uuid::new_v4();
    let vol = pool.create_replica(a, 6 * CS, None).await.unwrap();
    vol.write(0, data(1, 6 * CS)).await.unwrap();
    let keep = Uuid::new_v4();
    let kept = pool.create_replica(keep, 2 * CS, None).await.unwrap();
    kept.write(0, data(2, 2 * CS)).await.unwrap();
    // A disk that gives nothing back (as if the process died before it could): the space stays taken.
    disk.punches.store(false, Ordering::SeqCst);
    drop(vol);
    pool.destroy_volume(a).await.unwrap();
    let before = settled(&pool, &disk).await;
    drop((kept, pool));
    disk.punches.store(true, Ordering::SeqCst);
    let pool = Pool::import(disk.clone(), &Claim::new("node-a"))
        .await
        .unwrap();
    let after = settled(&pool, &disk).await;
    assert!(
        before - after >= 6 * CS,
        "the destroyed replica's clusters went back at import: {before} -> {after}"
    );
    let kept = pool.open_volume(&keep).unwrap();
    assert!(kept.read(0, 2 * CS).await.unwrap().iter().all(|b| *b == 2));
}

/// A sparse pool file the pool once wrote all through (every cluster used, then freed) still gives space back after
/// an import: that it keeps its space is decided when the pool is made, and recorded. Before, a file with all its
/// space at import was taken for one made with `fallocate`, and nothing was given back from then on. A file given
/// its space before the pool was made keeps it.
#[tokio::test]
async fn a_sparse_pool_once_written_all_through_still_gives_space_back_after_an_import() {
    let disk = Arc::new(ThinDisk::new(8 * MIB));
    let pool = pool_on(&disk).await;
    let clusters = pool.stats().capacity / CS;
    let a = Uuid::new_v4();
    let vol = pool.create_replica(a, clusters * CS, None).await.unwrap();
    vol.write(0, data(1, clusters * CS)).await.unwrap();
    assert!(disk.backed_bytes() >= 8 * MIB, "{}", disk.backed_bytes());
    drop((vol, pool));
    let pool = Pool::import(disk.clone(), &Claim::new("node-a"))
        .await
        .unwrap();
    pool.destroy_volume(a).await.unwrap();
    let after = settled(&pool, &disk).await;
    assert!(
        after <= 8 * MIB - clusters * CS,
        "the destroyed replica's space stayed taken: {after} bytes backed"
    );

    // Given its space up front: kept, after an import too.
    let disk = Arc::new(ThinDisk::new(8 * MIB));
    disk.preallocate(0, 8 * MIB).await.unwrap();
    let pool = pool_on(&disk).await;
    let b = Uuid::new_v4();
    let vol = pool.create_replica(b, 4 * CS, None).await.unwrap();
    vol.write(0, data(2, 4 * CS)).await.unwrap();
    drop((vol, pool));
    let pool = Pool::import(disk.clone(), &Claim::new("node-a"))
        .await
        .unwrap();
    pool.destroy_volume(b).await.unwrap();
    assert_eq!(settled(&pool, &disk).await, 8 * MIB);
}

#[tokio::test]
async fn a_free_cluster_an_allocation_has_reserved_is_not_punched() {
    let disk = Arc::new(ThinDisk::new(16 * MIB));
    let pool = pool_on(&disk).await;
    settled(&pool, &disk).await;
    // An allocation in flight: its cluster reserved, its data on the disk, its mapping not committed yet.
    let c = pool.inner.pick_free(1)[0];
    let at = pool.inner.label.cluster_offset(c);
    disk.write(at, data(9, CS)).await.unwrap();
    pool.inner.release_behind(vec![(c, 1)]);
    settled(&pool, &disk).await;
    assert!(
        disk.read(at, CS).await.unwrap().iter().all(|b| *b == 9),
        "a reserved cluster was punched"
    );
    // Once given back unused, it is free like any other, and goes.
    pool.inner.release_unused(c);
    pool.inner.release_behind(vec![(c, 1)]);
    settled(&pool, &disk).await;
    assert!(disk.read(at, CS).await.unwrap().iter().all(|b| *b == 0));
}

#[tokio::test]
async fn a_displaced_owner_punches_nothing_the_new_owner_may_have_mapped() {
    let disk = Arc::new(ThinDisk::new(16 * MIB));
    let old = pool_on(&disk).await;
    let id = Uuid::new_v4();
    old.create_replica(id, 4 * CS, None).await.unwrap();
    settled(&old, &disk).await;
    // Another node takes the pool and writes a cluster the old owner still sees as free.
    let new = Pool::import(disk.clone(), &Claim::forced("node-b"))
        .await
        .unwrap();
    settled(&new, &disk).await;
    let vol = new.open_volume(&id).unwrap();
    vol.write(0, data(5, CS)).await.unwrap();
    let c = new.inner.meta().volumes[&id].map[0];
    assert_eq!(old.inner.meta().refs(c), 0);
    old.inner.release_behind(vec![(c, 1)]);
    settled(&old, &disk).await;
    assert!(
        vol.read(0, CS).await.unwrap().iter().all(|b| *b == 5),
        "the displaced owner punched the new owner's data"
    );
}
