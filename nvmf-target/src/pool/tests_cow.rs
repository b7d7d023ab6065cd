//! Copy-on-write against I/O in flight on the cluster it copies, with two clones sharing a cluster: a write that
//! finds the old cluster its volume's alone while that volume's own copy is still on its way, and a read of the old
//! cluster still on its way when the copy commits and the other clone writes into it. And what replicas may still
//! take (`PoolStats::may_take`) as snapshots share their clusters and copies take new ones.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use super::*;
use crate::block::BlockDevice;
use crate::block::fault::{FaultDevice, FaultPlan};
use crate::block::memory::MemoryDevice;

const MIB: u64 = 1 << 20;
const CS: u64 = 256 << 10;

/// A pool on a disk that can be slowed, with two clones of one snapshot (both gone) sharing cluster 0's physical
/// cluster `x` (filled with 1s), and no one else.
struct Clones {
    slow: Arc<FaultDevice>,
    pool: Pool,
    one: Arc<PoolVolume>,
    two: Arc<PoolVolume>,
    c2: Uuid,
    x: u32,
}

async fn two_clones_sharing_cluster_0() -> Clones {
    let slow = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(32 * MIB, 512))));
    let spec = PoolSpec {
        name: "p1".into(),
        uuid: Uuid::new_v4(),
        cluster_size: CS as u32,
    };
    let pool = Pool::create(slow.clone(), &spec, &Claim::new("node-a"))
        .await
        .unwrap();
    let (r, s, c1, c2) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let vol = pool.create_replica(r, 4 * CS, None).await.unwrap();
    vol.write(0, Bytes::from(vec![1u8; CS as usize]))
        .await
        .unwrap();
    pool.snapshot(r, s).await.unwrap();
    let one = pool.clone_snapshot(s, c1, None).await.unwrap();
    let two = pool.clone_snapshot(s, c2, None).await.unwrap();
    pool.destroy_volume(r).await.unwrap();
    pool.destroy_volume(s).await.unwrap();
    // The two clones share cluster 0's physical cluster, and no one else does.
    let x = pool.inner.meta().volumes[&c1].map[0];
    assert_eq!(pool.inner.meta().refs(x), 2);
    Clones {
        slow,
        pool,
        one,
        two,
        c2,
        x,
    }
}

#[tokio::test]
async fn a_write_beside_a_copy_on_write_in_progress_is_not_lost_when_the_old_cluster_becomes_unshared()
 {
    let Clones {
        slow,
        pool,
        one,
        two,
        c2: _,
        x,
    } = two_clones_sharing_cluster_0().await;

    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(30)),
        ..Default::default()
    });
    // The second clone's copy starts first and commits first; the first clone's copy has read the old cluster by
    // then and commits after.
    let second = {
        let two = two.clone();
        tokio::spawn(async move { two.write(0, Bytes::from(vec![2u8; 4096])).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let first = {
        let one = one.clone();
        tokio::spawn(async move { one.write(0, Bytes::from(vec![3u8; 4096])).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pool.inner.meta().refs(x) != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second clone's copy never committed"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        !first.is_finished(),
        "the first clone's copy is still on its way"
    );
    // The old cluster is now the first clone's alone: a write beside the copy in progress.
    one.write(8192, Bytes::from(vec![4u8; 4096])).await.unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    slow.set_plan(FaultPlan::default());

    let back = one.read(0, CS).await.unwrap();
    assert!(back[..4096].iter().all(|b| *b == 3));
    assert!(back[4096..8192].iter().all(|b| *b == 1));
    assert!(
        back[8192..12288].iter().all(|b| *b == 4),
        "the acknowledged write beside the copy was lost"
    );
    assert!(back[12288..].iter().all(|b| *b == 1));
    let back = two.read(0, CS).await.unwrap();
    assert!(back[..4096].iter().all(|b| *b == 2));
    assert!(back[4096..].iter().all(|b| *b == 1));
}

#[tokio::test]
async fn a_read_in_flight_when_its_cluster_is_copied_away_returns_none_of_the_other_clones_writes()
{
    let Clones {
        slow,
        pool,
        one,
        two,
        c2,
        x,
    } = two_clones_sharing_cluster_0().await;

    // A read of the first clone's cluster 0 looks the cluster up and is slow to reach the disk.
    slow.set_plan(FaultPlan {
        // Long enough for the copy and the write below to end first even on a loaded machine.
        latency: Some(Duration::from_secs(1)),
        ..Default::default()
    });
    let reading = {
        let one = one.clone();
        tokio::spawn(async move { one.read(0, 4096).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    slow.set_plan(FaultPlan::default());
    // Meanwhile the first clone copies the cluster away, which leaves the old one the second clone's alone, and the
    // second clone writes straight into it.
    one.write(0, Bytes::from(vec![3u8; 4096])).await.unwrap();
    assert_eq!(pool.inner.meta().refs(x), 1);
    two.write(0, Bytes::from(vec![2u8; 4096])).await.unwrap();
    assert_eq!(
        pool.inner.meta().volumes[&c2].map[0],
        x,
        "the second clone wrote in place"
    );
    assert!(!reading.is_finished(), "the read is still on its way");

    let back = reading.await.unwrap().unwrap();
    assert!(
        back.iter().all(|b| *b == 1) || back.iter().all(|b| *b == 3),
        "the first clone's read returned data that was never the first clone's: {:?}",
        &back[..8]
    );
}

mod may_take {
    use super::super::tests_release::{CS, MIB, data, pool_on};
    use super::super::tests_thin::ThinDisk;
    use super::*;

    /// What a pool's replicas may still take follows its snapshots: a replica written through and snapshotted may take
    /// all its clusters again, a copy-on-write takes one of them, and with the snapshot gone the rest are its own again.
    /// (The figure is walked from the cluster maps only while snapshots or clones exist, once per change.)
    #[tokio::test]
    async fn what_replicas_may_still_take_follows_snapshots_and_copies() {
        let disk = Arc::new(ThinDisk::new(32 * MIB));
        let pool = pool_on(&disk).await;
        let a = Uuid::new_v4();
        let vol = pool.create_replica(a, 4 * CS, None).await.unwrap();
        assert_eq!(pool.stats().may_take, 4 * CS, "nothing written yet");
        vol.write(0, data(1, 4 * CS)).await.unwrap();
        assert_eq!(pool.stats().may_take, 0);
        let s = Uuid::new_v4();
        pool.snapshot(a, s).await.unwrap();
        assert_eq!(pool.stats().may_take, 4 * CS, "every cluster is shared");
        assert_eq!(
            pool.stats().may_take,
            4 * CS,
            "the same, from the walk kept"
        );
        vol.write(0, data(2, 4096)).await.unwrap();
        assert_eq!(pool.stats().may_take, 3 * CS, "one copied");
        pool.destroy_volume(s).await.unwrap();
        assert_eq!(pool.stats().may_take, 0, "its own again");
    }

    /// A replica whose size is not a whole number of clusters may take its partial last cluster whole: the room
    /// left for new replicas leaves it out. Before, without snapshots, it counted bytes: a pool of two clusters
    /// with a replica of one and a half offered half a cluster more, and both replicas written through needed
    /// three.
    #[tokio::test]
    async fn a_partial_last_cluster_is_promised_whole() {
        let disk = Arc::new(ThinDisk::new(32 * MIB));
        let pool = pool_on(&disk).await;
        let capacity = pool.stats().capacity;
        let vol = pool
            .create_replica(Uuid::new_v4(), CS + CS / 2, None)
            .await
            .unwrap();
        assert_eq!(pool.stats().may_take, 2 * CS);
        assert_eq!(pool.stats().replica_room, capacity - 2 * CS);
        vol.write(CS, data(1, 4096)).await.unwrap();
        assert_eq!(pool.stats().may_take, CS, "one of its two taken");
    }

    /// What a snapshot taken now would add to what the pool keeps room for: the clusters only the replica maps.
    #[tokio::test]
    async fn unshared_clusters_are_what_a_snapshot_would_share() {
        let disk = Arc::new(ThinDisk::new(32 * MIB));
        let pool = pool_on(&disk).await;
        let a = Uuid::new_v4();
        let vol = pool.create_replica(a, 4 * CS, None).await.unwrap();
        assert_eq!(pool.volume_usage(&a).1, 0, "nothing mapped");
        vol.write(0, data(1, 3 * CS)).await.unwrap();
        assert_eq!(pool.volume_usage(&a).1, 3 * CS);
        pool.snapshot(a, Uuid::new_v4()).await.unwrap();
        assert_eq!(pool.volume_usage(&a).1, 0, "all shared");
        vol.write(CS, data(2, 4096)).await.unwrap();
        vol.write(3 * CS, data(3, 4096)).await.unwrap();
        assert_eq!(
            pool.volume_usage(&a).1,
            2 * CS,
            "one copied, one new: its own"
        );
        assert_eq!(pool.volume_usage(&Uuid::new_v4()).1, 0, "no such volume");
    }
}
