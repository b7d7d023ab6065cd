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
use crate::block::fault::{FaultDevice, FaultPlan};
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

/// A 32 MiB pool of 256 KiB clusters on a device that takes fault plans (latency, failures).
async fn pool_on_fault_device() -> (Arc<FaultDevice>, Pool) {
    let dev = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(32 * MIB, 512))));
    let pool = Pool::create(dev.clone(), &spec(), &Claim::new("node-a"))
        .await
        .unwrap();
    (dev, pool)
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
    let (slow, pool) = pool_on_fault_device().await;
    let clusters = pool.stats().capacity / CS;
    let r = Uuid::new_v4();
    let vol = pool.create_replica(r, clusters * CS, None).await.unwrap();
    // All but 16 clusters used, and nothing stocked: 16 free. Written backwards, so nothing is mapped ahead.
    let left = 16;
    for c in (0..clusters - left).rev() {
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
    // Waited for, not slept on: on a loaded machine the filler may take longer than a fixed pause to get there.
    let t = std::time::Instant::now();
    while !pool.inner.stocking.load(Ordering::Acquire) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the stock is never filled"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
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

#[tokio::test]
async fn a_writer_in_order_maps_its_next_clusters_with_fewer_commits_and_a_random_one_maps_none_ahead()
 {
    let (disk, pool, r, vol) = pool_with_replica(32).await;
    let step = 64 << 10;
    let before = disk.flushes();
    for at in (0..32 * CS).step_by(step) {
        let seed = (at / CS) as u8 + 1;
        vol.write(at, Bytes::from(vec![seed; step])).await.unwrap();
    }
    let flushes = disk.flushes() - before;
    assert!(
        flushes <= 16,
        "32 clusters written in order took {flushes} flushes: one commit per cluster, none mapped ahead"
    );
    assert_eq!(
        pool.volume_allocated(&r),
        32 * CS,
        "nothing mapped past the end"
    );

    // A writer that stops leaves at most as much mapped ahead as it wrote.
    let s = Uuid::new_v4();
    let stopped = pool.create_replica(s, 32 * CS, None).await.unwrap();
    for c in 0..5 {
        stopped.write(c * CS, data(1)).await.unwrap();
    }
    let mapped = pool.volume_allocated(&s) / CS;
    assert!(
        (6..=10).contains(&mapped),
        "5 clusters written in order, {mapped} mapped"
    );
    let back = stopped.read(5 * CS, (mapped - 5) * CS).await.unwrap();
    assert!(back.iter().all(|b| *b == 0), "mapped ahead reads as zeroes");

    // A random writer maps what it writes, nothing more.
    let q = Uuid::new_v4();
    let random = pool.create_replica(q, 32 * CS, None).await.unwrap();
    for c in [7u64, 3, 20, 11, 2, 30, 16] {
        random.write(c * CS + 4096, data(2)).await.unwrap();
    }
    assert_eq!(pool.volume_allocated(&q), 7 * CS);

    // After a restart, every byte is what was written or zero.
    drop((vol, stopped, random, pool));
    let pool = Pool::import(disk, &Claim::new("node-a")).await.unwrap();
    let vol = pool.open_volume(&r).unwrap();
    for c in 0..32u64 {
        let back = vol.read(c * CS, CS).await.unwrap();
        assert!(back.iter().all(|b| *b == c as u8 + 1), "cluster {c}");
    }
    let stopped = pool.open_volume(&s).unwrap();
    let back = stopped.read(0, 32 * CS).await.unwrap();
    for (c, chunk) in back.chunks(CS as usize).enumerate() {
        let want = if c < 5 { 1 } else { 0 };
        assert!(chunk[..4096].iter().all(|b| *b == want), "cluster {c}");
        assert!(chunk[4096..].iter().all(|b| *b == 0), "cluster {c}");
    }
}

#[tokio::test]
async fn eight_writes_in_flight_in_order_each_land_once_where_they_were_sent() {
    let (_disk, pool, r, vol) = pool_with_replica(48).await;
    // As a sequential writer at queue depth 8: the writes into the next clusters race the commits mapping them
    // ahead, and every one must end up in the cluster that is mapped.
    let step = 32 << 10;
    let chunks: Vec<u64> = (0..48 * CS).step_by(step).collect();
    for wave in chunks.chunks(8) {
        let writes = wave.iter().map(|at| {
            let seed = (at / step as u64 % 251) as u8 + 1;
            vol.write(*at, Bytes::from(vec![seed; step]))
        });
        for w in futures_util::future::join_all(writes).await {
            w.unwrap();
        }
    }
    assert_eq!(pool.volume_allocated(&r), 48 * CS);
    let back = vol.read(0, 48 * CS).await.unwrap();
    for (i, chunk) in back.chunks(step).enumerate() {
        let seed = (i % 251) as u8 + 1;
        assert!(chunk.iter().all(|b| *b == seed), "chunk {i}");
    }
}

#[tokio::test]
async fn the_allocation_that_takes_the_last_stocked_cluster_fills_the_stock_again_behind_it() {
    let (disk, pool, _r, vol) = pool_with_replica(64).await;
    let stocked = |pool: &Pool| pool.inner.stock.lock().unwrap().len() as u64;
    vol.write(4096, data(1)).await.unwrap();
    let n = stocked(&pool);
    assert!(n > 0, "the first allocation filled the stock");
    // First writes in scattered clusters take the whole stock.
    for i in 0..n {
        vol.write((2 + 3 * i) * CS + 8192, data(2)).await.unwrap();
    }
    let mut waited = 0;
    while stocked(&pool) == 0 {
        assert!(
            waited < 500,
            "no write came since, and the stock is still empty"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
    // The next first write finds it full: its data and its commit's flush, no zeroing of its own.
    let before = disk.flushes();
    vol.write(60 * CS + 8192, data(3)).await.unwrap();
    assert_eq!(disk.flushes() - before, 1);
    let back = vol.read(60 * CS, CS).await.unwrap();
    assert!(back[..8192].iter().all(|b| *b == 0));
    assert_eq!(&back[8192..12288], &data(3)[..]);
    assert!(back[12288..].iter().all(|b| *b == 0));
}

#[tokio::test]
async fn a_pool_is_destroyed_only_once_a_filling_of_its_stock_has_ended() {
    let (slow, pool) = pool_on_fault_device().await;
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(30)),
        ..Default::default()
    });
    pool.inner.refill_behind();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        pool.inner.stocking.load(Ordering::Acquire),
        "the filling is under way"
    );
    pool.destroy().await.unwrap();
    assert!(
        !pool.inner.stocking.load(Ordering::Acquire),
        "the filling zeroes nothing after the label is wiped"
    );
    assert!(matches!(Pool::probe(&*slow).await, Ok(Probe::Blank)));
}

#[tokio::test(start_paused = true)]
async fn a_reservation_that_waited_for_a_failed_filling_gets_the_clusters_it_gave_back() {
    let (flaky, pool) = pool_on_fault_device().await;
    let free = pool.stats().capacity / CS;
    // Every write fails from now on, after 30 ms: the filling reads the label, reserves, and its zeroing fails.
    flaky.set_plan(FaultPlan {
        fail_after: Some(0),
        latency: Some(Duration::from_millis(30)),
        ..Default::default()
    });
    pool.inner.refill_behind();
    tokio::time::sleep(Duration::from_millis(45)).await;
    let filling = pool.inner.reserved.lock().unwrap().len() as u64;
    assert!(
        pool.inner.stocking.load(Ordering::Acquire) && filling > 0,
        "the filling holds {filling} clusters while it zeroes them"
    );
    // A reservation of every free cluster comes up short, waits for the filling, which fails and gives them back.
    let all = pool
        .inner
        .reserve_clusters(free as usize)
        .await
        .expect("every free cluster, the failed filling's too");
    assert_eq!(all.len() as u64, free);
    assert!(!pool.inner.stocking.load(Ordering::Acquire));
}

#[test]
fn a_filling_whose_task_is_dropped_ends_and_gives_its_clusters_back() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    };
    let main = runtime();
    let (slow, pool) = main.block_on(pool_on_fault_device());
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(50)),
        ..Default::default()
    });
    let free = pool.stats().capacity / CS;
    // The filling runs on a runtime that goes away while it zeroes (an I/O thread stopping).
    let side = runtime();
    side.block_on(async {
        pool.inner.refill_behind();
        tokio::time::sleep(Duration::from_millis(70)).await;
    });
    assert!(pool.inner.stocking.load(Ordering::Acquire));
    assert!(!pool.inner.reserved.lock().unwrap().is_empty());
    drop(side);
    assert!(
        !pool.inner.stocking.load(Ordering::Acquire),
        "no reservation waits for a filling that is gone"
    );
    assert!(pool.inner.reserved.lock().unwrap().is_empty());
    let all = main
        .block_on(pool.inner.reserve_clusters(free as usize))
        .unwrap();
    assert_eq!(all.len() as u64, free);
}
