//! Changes whose caller goes away while their commit waits for the journal (a gRPC client that hung up, a
//! command's future dropped): they still end as if the caller had waited, holding the locks that make them safe
//! until they are applied (`PoolInner::commit_holding`). Destroys and deallocations: `tests_release`.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::tests_release::{CS, MIB, data, pool_on, queued};
use super::tests_thin::ThinDisk;
use crate::block::BlockDevice;

/// A snapshot whose caller goes away still holds the replica's writes off until it is applied: a write sent
/// meanwhile copies the cluster it now shares, so the snapshot keeps what it was taken with. Before, the write went
/// in place at once, into a cluster the snapshot then shared: the snapshot changed after it was taken (and a later
/// copy-on-write racing that write could lose it).
#[tokio::test]
async fn a_snapshot_whose_caller_went_away_keeps_what_it_was_taken_with() {
    let disk = Arc::new(ThinDisk::new(32 * MIB));
    let pool = pool_on(&disk).await;
    let a = Uuid::new_v4();
    let vol = pool.create_replica(a, 4 * CS, None).await.unwrap();
    vol.write(0, data(1, 4 * CS)).await.unwrap();
    let s = Uuid::new_v4();
    let held = pool.inner.journal.hold().await;
    let snapshot = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.snapshot(a, s).await })
    };
    queued(&pool).await;
    snapshot.abort();
    assert!(snapshot.await.unwrap_err().is_cancelled());
    let write = {
        let vol = vol.clone();
        tokio::spawn(async move { vol.write(0, data(2, 4096)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(held);
    // Another commit, which writes whatever still waits in the journal's queue.
    pool.create_replica(Uuid::new_v4(), CS, None).await.unwrap();
    write.await.unwrap().unwrap();
    let snap = pool.open_volume(&s).unwrap();
    assert!(
        snap.read(0, CS).await.unwrap().iter().all(|b| *b == 1),
        "the snapshot changed after it was taken"
    );
    let now = vol.read(0, CS).await.unwrap();
    assert!(now[..4096].iter().all(|b| *b == 2));
    assert!(now[4096..].iter().all(|b| *b == 1));
}

/// A replica grown by a caller that went away takes its new size: its open handle as well as its metadata. Before,
/// the handle kept the old size until the next import (writes past it refused), and asking again changed nothing,
/// the metadata having the size already.
#[tokio::test]
async fn a_resize_whose_caller_went_away_grows_the_open_replica() {
    let disk = Arc::new(ThinDisk::new(32 * MIB));
    let pool = pool_on(&disk).await;
    let a = Uuid::new_v4();
    let vol = pool.create_replica(a, 4 * CS, None).await.unwrap();
    let held = pool.inner.journal.hold().await;
    let resize = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.resize_replica(a, 8 * CS).await })
    };
    queued(&pool).await;
    resize.abort();
    assert!(resize.await.unwrap_err().is_cancelled());
    drop(held);
    pool.create_replica(Uuid::new_v4(), CS, None).await.unwrap();
    assert_eq!(pool.volume_meta(&a).unwrap().size, 8 * CS);
    pool.resize_replica(a, 8 * CS).await.unwrap();
    assert_eq!(vol.size(), 8 * CS, "the open replica kept its old size");
    vol.write(6 * CS, data(3, 4096)).await.unwrap();
}
