//! Changes whose caller goes away while their commit waits for the journal (a gRPC client that hung up, a
//! command's future dropped): they still end as if the caller had waited, holding the locks that make them safe
//! until they are applied (`PoolInner::commit_holding`), without waiting for someone else's commit, and a change
//! asked after them sees them (`PoolInner::caught_up`). Destroys and deallocations: `tests_release`.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::Pool;
use super::meta::{Record, Share};
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
    // Another commit: whatever waited in the journal's queue is applied once it is (it queues behind them).
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

/// Creates replica `a`, and gives up once the create waits for the journal (held by the caller).
async fn create_abandoned_while_queued(pool: &Pool, a: Uuid) {
    let create = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.create_replica(a, CS, None).await.map(|_| ()) })
    };
    queued(pool).await;
    create.abort();
    assert!(create.await.unwrap_err().is_cancelled());
}

/// Records whose caller went away while they waited for the journal are committed as soon as the journal is free,
/// not whenever someone else next commits. Before, they stayed queued in memory only (a reservation saved by a
/// command whose connection dropped, a replica created by a request whose client hung up): the pool's metadata and
/// journal showed the older state until an unrelated change came, which then applied them out of turn.
#[tokio::test]
async fn records_whose_caller_went_away_are_committed_without_waiting_for_another_commit() {
    let disk = Arc::new(ThinDisk::new(32 * MIB));
    let pool = pool_on(&disk).await;
    let a = Uuid::new_v4();
    let held = pool.inner.journal.hold().await;
    create_abandoned_while_queued(&pool, a).await;
    drop(held);
    for _ in 0..500 {
        if pool.volume_meta(&a).is_some() {
            assert_eq!(pool.inner.journal.queued(), 0);
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("the create stayed in the journal's queue");
}

/// A destroy asked after a create whose caller went away, while the create still waited for the journal, destroys
/// the replica. Before, it answered NotFound at once and the create applied after it: a replica nobody knew of
/// (the cluster agent had its garbage record dropped on that NotFound) kept its space for ever.
#[tokio::test]
async fn a_destroy_after_a_create_on_its_way_destroys_what_the_create_makes() {
    let disk = Arc::new(ThinDisk::new(32 * MIB));
    let pool = pool_on(&disk).await;
    let a = Uuid::new_v4();
    let held = pool.inner.journal.hold().await;
    create_abandoned_while_queued(&pool, a).await;
    let destroy = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.destroy_volume(a).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(held);
    destroy.await.unwrap().unwrap();
    pool.create_replica(Uuid::new_v4(), CS, None).await.unwrap();
    assert!(
        pool.volume_meta(&a).is_none(),
        "the replica was created after its destroy"
    );
}

/// Of a share and an unshare asked one after the other, the unshare is what the pool keeps, even while the share
/// still waited for the journal. Before, the unshare found the replica unshared in memory and answered at once;
/// the share applied after it, and the next import exported the replica again.
#[tokio::test]
async fn an_unshare_asked_after_a_share_on_its_way_is_what_the_pool_keeps() {
    let disk = Arc::new(ThinDisk::new(32 * MIB));
    let pool = pool_on(&disk).await;
    let a = Uuid::new_v4();
    pool.create_replica(a, CS, None).await.unwrap();
    let held = pool.inner.journal.hold().await;
    // The share's record on its way: past the share's own look at the metadata, waiting for the journal.
    let share = {
        let pool = pool.clone();
        let record = Record::SetShare {
            volume: a,
            share: Some(Share { hosts: vec![] }),
        };
        tokio::spawn(async move { pool.inner.commit(vec![record]).await })
    };
    queued(&pool).await;
    let unshare = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.set_share(a, None).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(held);
    share.await.unwrap().unwrap();
    unshare.await.unwrap().unwrap();
    assert_eq!(pool.volume_meta(&a).unwrap().share, None);
}
