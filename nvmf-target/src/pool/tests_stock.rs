//! The stock (`stock`): what a first write costs once the stock is filled, and that the stock never makes a
//! write fail for space the pool has. Its crash safety is the power-cut test's (`tests`), whose workload takes
//! stocked clusters on a disk full of old data.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use super::*;
use crate::block::BlockDevice;
use crate::block::memory::MemoryDevice;

const MIB: u64 = 1 << 20;
const CS: u64 = 256 << 10;

fn spec() -> PoolSpec {
    PoolSpec {
        name: "p1".into(),
        uuid: Uuid::new_v4(),
        cluster_size: CS as u32,
    }
}

/// A 32 MiB pool of 256 KiB clusters with a replica of `clusters` clusters.
async fn pool_with_replica(clusters: u64) -> (Arc<MemoryDevice>, Pool, Uuid, Arc<PoolVolume>) {
    let disk = Arc::new(MemoryDevice::new(32 * MIB, 512));
    let pool = Pool::create(disk.clone(), &spec(), &Claim::new("node-a"))
        .await
        .unwrap();
    let r = Uuid::new_v4();
    let vol = pool.create_replica(r, clusters * CS, None).await.unwrap();
    (disk, pool, r, vol)
}

fn data(seed: u8) -> Bytes {
    Bytes::from(vec![seed; 4096])
}

#[tokio::test]
async fn first_writes_after_the_stock_is_filled_cost_one_flush_each() {
    let (disk, pool, r, vol) = pool_with_replica(32).await;
    // The first allocation zeroes the stock with its own cluster, under its one flush before the commit.
    vol.write(4096, data(1)).await.unwrap();
    let before = disk.flushes();
    // First writes in the middle of clusters (no sequential writer): each takes a stocked cluster.
    for (i, c) in [5u64, 9, 17].into_iter().enumerate() {
        vol.write(c * CS + 8192, data(2 + i as u8)).await.unwrap();
    }
    assert_eq!(
        disk.flushes() - before,
        3,
        "one flush per first write: its commit's"
    );
    assert_eq!(pool.volume_allocated(&r), 4 * CS);
    for (i, c) in [5u64, 9, 17].into_iter().enumerate() {
        let back = vol.read(c * CS, CS).await.unwrap();
        assert!(back[..8192].iter().all(|b| *b == 0));
        assert_eq!(&back[8192..12288], &data(2 + i as u8)[..]);
        assert!(back[12288..].iter().all(|b| *b == 0));
    }
}

#[tokio::test]
async fn a_nearly_full_pool_serves_every_free_cluster_while_its_stock_is_being_filled() {
    use crate::block::fault::{FaultDevice, FaultPlan};
    let slow = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(32 * MIB, 512))));
    let pool = Pool::create(slow.clone(), &spec(), &Claim::new("node-a"))
        .await
        .unwrap();
    let clusters = pool.stats().capacity / CS;
    let r = Uuid::new_v4();
    let vol = pool.create_replica(r, clusters * CS, None).await.unwrap();
    // All but 16 clusters used, and nothing stocked: 16 free.
    let left = 16;
    for c in 0..clusters - left {
        vol.write(c * CS + 4096, data(1)).await.unwrap();
    }
    pool.inner.drain_stock().await;
    // A slow disk: the next first write fills the stock (one of the 16) while 15 more first writes come.
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(20)),
        ..Default::default()
    });
    let filler = {
        let vol = vol.clone();
        let at = (clusters - left) * CS + 4096;
        tokio::spawn(async move { vol.write(at, data(2)).await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(
        pool.inner.stocking.load(Ordering::Acquire),
        "the stock is being filled"
    );
    let rest = (clusters - left + 1..clusters).map(|c| vol.write(c * CS + 4096, data(3)));
    for (i, w) in futures_util::future::join_all(rest)
        .await
        .into_iter()
        .enumerate()
    {
        w.unwrap_or_else(|e| panic!("write {i} of the last 15 clusters failed: {e}"));
    }
    filler.await.unwrap().unwrap();
    assert_eq!(pool.stats().allocated, clusters * CS);
    assert_eq!(pool.stats().no_space_errors, 0);
}

#[tokio::test]
async fn a_replica_written_in_order_lies_in_order_on_the_disk() {
    let disk = Arc::new(MemoryDevice::new(64 * MIB, 512));
    let pool = Pool::create(disk, &spec(), &Claim::new("node-a"))
        .await
        .unwrap();
    let r = Uuid::new_v4();
    let vol = pool.create_replica(r, 40 * CS, None).await.unwrap();
    // 64 KiB writes from the start to the end, as a file system's or a database's sequential writer.
    let step = 64 << 10;
    for at in (0..40 * CS).step_by(step) {
        vol.write(at, Bytes::from(vec![1u8; step])).await.unwrap();
    }
    let map = pool.inner.meta().volumes[&r].map.clone();
    let first = map[0];
    assert_eq!(
        map,
        (first..first + 40).collect::<Vec<u32>>(),
        "logical clusters in order are physical clusters in order, with no holes between them"
    );
}
