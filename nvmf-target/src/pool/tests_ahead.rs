//! The stock and mapping ahead (`stock`, `ahead`): what a first write costs once the stock is filled, and what a
//! sequential writer finds mapped. Their crash safety is the power-cut test's (`tests`), whose workload has a
//! sequential writer and takes stocked clusters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use uuid::Uuid;

use super::ahead::AHEAD;
use super::*;
use crate::block::memory::MemoryDevice;
use crate::block::{BlockDevice, BlockError};

const MIB: u64 = 1 << 20;
const CS: u64 = 256 << 10;

/// A memory disk that counts its flushes.
struct CountingDisk {
    inner: MemoryDevice,
    flushes: AtomicU64,
}

#[async_trait]
impl BlockDevice for CountingDisk {
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
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.inner.flush().await
    }
}

/// A 32 MiB pool of 256 KiB clusters with a replica of `clusters` clusters.
async fn pool_with_replica(clusters: u64) -> (Arc<CountingDisk>, Pool, Uuid, Arc<PoolVolume>) {
    let disk = Arc::new(CountingDisk {
        inner: MemoryDevice::new(32 * MIB, 512),
        flushes: AtomicU64::new(0),
    });
    let spec = PoolSpec {
        name: "p1".into(),
        uuid: Uuid::new_v4(),
        cluster_size: CS as u32,
    };
    let pool = Pool::create(disk.clone(), &spec, &Claim::new("node-a"))
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
    let before = disk.flushes.load(Ordering::Relaxed);
    // First writes in the middle of clusters (no sequential writer): each takes a stocked cluster.
    for (i, c) in [5u64, 9, 17].into_iter().enumerate() {
        vol.write(c * CS + 8192, data(2 + i as u8)).await.unwrap();
    }
    assert_eq!(
        disk.flushes.load(Ordering::Relaxed) - before,
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
async fn a_sequential_writer_finds_the_next_clusters_mapped_and_reading_zeroes() {
    let (disk, pool, r, vol) = pool_with_replica(32).await;
    vol.write(0, data(1)).await.unwrap();
    // Entering cluster 1 at its start, right after a mapped cluster: a stream.
    vol.write(CS, data(2)).await.unwrap();
    let mapped = (2 + AHEAD) * CS;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pool.volume_allocated(&r) < mapped {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} bytes mapped, not {mapped}",
            pool.volume_allocated(&r)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        vol.mapped_ranges(),
        vec![(0, mapped)],
        "the next {AHEAD} clusters, no more"
    );
    assert!(
        vol.read(2 * CS, AHEAD * CS)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0)
    );
    // The stream goes on into them with no allocation of its own; a write elsewhere maps nothing ahead.
    let flushes = disk.flushes.load(Ordering::Relaxed);
    vol.write(2 * CS + 4096, data(3)).await.unwrap();
    assert_eq!(disk.flushes.load(Ordering::Relaxed), flushes);
    vol.write(20 * CS + 4096, data(4)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(pool.volume_allocated(&r), mapped + CS);
    // The mapping is durable: an import finds it and the data.
    let dev: Arc<dyn BlockDevice> = disk.clone();
    drop((vol, pool));
    let pool = Pool::import(dev, &Claim::new("node-a")).await.unwrap();
    let vol = pool.open_volume(&r).unwrap();
    assert_eq!(pool.volume_allocated(&r), mapped + CS);
    assert_eq!(&vol.read(CS, 4096).await.unwrap()[..], &data(2)[..]);
    assert_eq!(
        &vol.read(2 * CS + 4096, 4096).await.unwrap()[..],
        &data(3)[..]
    );
    assert!(vol.read(3 * CS, CS).await.unwrap().iter().all(|b| *b == 0));
}
