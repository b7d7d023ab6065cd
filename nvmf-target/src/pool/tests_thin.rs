//! A pool on a disk that runs out of space under it, as a sparse file does on a file system that fills up: a write
//! the disk has no room for fails with Capacity Exceeded only when it changed nothing (so replicas that all return
//! it still agree), and with an I/O error when it may have changed something.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use uuid::Uuid;

use super::*;
use crate::block::memory::MemoryDevice;
use crate::block::{BlockDevice, BlockError};

const MIB: u64 = 1 << 20;
const CS: u64 = 256 << 10;
const BLOCK: u64 = 4096;

/// Memory that takes space per 4 KiB block on its first write, from a budget, as a file system does for a sparse
/// file: a write that runs out writes the blocks it has room for and fails with NoSpace (a short write, then
/// ENOSPC). With `copy_on_write`, every write takes new space (btrfs and the like). A release punches the whole
/// blocks of its range out (they read as zeroes and their space is free again), unless `punches` is off.
pub(super) struct ThinDisk {
    inner: MemoryDevice,
    budget: AtomicU64,
    backed: Mutex<BTreeSet<u64>>,
    copy_on_write: AtomicBool,
    pub(super) punches: AtomicBool,
}

impl ThinDisk {
    pub(super) fn new(size: u64) -> ThinDisk {
        ThinDisk {
            inner: MemoryDevice::new(size, 512),
            budget: AtomicU64::new(u64::MAX),
            backed: Mutex::new(BTreeSet::new()),
            copy_on_write: AtomicBool::new(false),
            punches: AtomicBool::new(true),
        }
    }

    /// Bytes with space under them.
    pub(super) fn backed_bytes(&self) -> u64 {
        self.backed.lock().unwrap().len() as u64 * BLOCK
    }

    /// Leaves room for `blocks` more 4 KiB blocks.
    fn room_for(&self, blocks: u64) {
        self.budget.store(blocks, Ordering::SeqCst);
    }

    /// How many blocks of `offset..offset+len` can be written before the space runs out.
    fn take(&self, offset: u64, len: u64, all_or_nothing: bool) -> u64 {
        let mut backed = self.backed.lock().unwrap();
        let cow = self.copy_on_write.load(Ordering::SeqCst);
        let blocks: Vec<u64> = (offset / BLOCK..(offset + len).div_ceil(BLOCK)).collect();
        let new = blocks.iter().filter(|b| cow || !backed.contains(b)).count() as u64;
        let budget = self.budget.load(Ordering::SeqCst);
        if all_or_nothing && new > budget {
            return 0;
        }
        let mut left = budget;
        let mut fits = 0;
        for b in &blocks {
            if cow || !backed.contains(b) {
                if left == 0 {
                    break;
                }
                left -= 1;
                backed.insert(*b);
            }
            fits += 1;
        }
        self.budget.store(left, Ordering::SeqCst);
        fits
    }
}

#[async_trait]
impl BlockDevice for ThinDisk {
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
        let len = data.len() as u64;
        let fits = (self.take(offset, len, false) * BLOCK).min(len);
        if fits > 0 {
            self.inner
                .write(offset, data.slice(..fits as usize))
                .await?;
        }
        if fits < len {
            return Err(BlockError::NoSpace);
        }
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let fits = (self.take(offset, len, false) * BLOCK).min(len);
        if fits > 0 {
            self.inner.write_zeroes(offset, fits).await?;
        }
        if fits < len {
            return Err(BlockError::NoSpace);
        }
        Ok(())
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.deallocate(offset, len).await
    }
    fn releases_space(&self) -> bool {
        true
    }
    fn backed(&self) -> Option<u64> {
        Some(self.backed_bytes())
    }
    async fn release(&self, offset: u64, len: u64) -> Result<bool, BlockError> {
        if !self.punches.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let whole = offset.div_ceil(BLOCK)..(offset + len) / BLOCK;
        if whole.is_empty() {
            return Ok(true);
        }
        self.inner
            .deallocate(whole.start * BLOCK, (whole.end - whole.start) * BLOCK)
            .await?;
        let mut backed = self.backed.lock().unwrap();
        let freed = whole.filter(|b| backed.remove(b)).count() as u64;
        let budget = self.budget.load(Ordering::SeqCst);
        self.budget
            .store(budget.saturating_add(freed), Ordering::SeqCst);
        Ok(true)
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush().await
    }
    fn room(&self) -> Option<u64> {
        Some(self.budget.load(Ordering::SeqCst).saturating_mul(BLOCK))
    }
    async fn preallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.copy_on_write.load(Ordering::SeqCst) {
            return Ok(()); // reserves nothing that a later write can use
        }
        let blocks = len.div_ceil(BLOCK);
        if self.take(offset, len, true) < blocks {
            return Err(BlockError::NoSpace);
        }
        Ok(())
    }
}

async fn pool_on_thin_disk() -> (Arc<ThinDisk>, Pool, Arc<PoolVolume>) {
    let (disk, pool, vol, _) = pool_on_thin_disk_with_id().await;
    (disk, pool, vol)
}

async fn pool_on_thin_disk_with_id() -> (Arc<ThinDisk>, Pool, Arc<PoolVolume>, Uuid) {
    let disk = Arc::new(ThinDisk::new(32 * MIB));
    let spec = PoolSpec {
        name: "p1".into(),
        uuid: Uuid::new_v4(),
        cluster_size: CS as u32,
    };
    let pool = Pool::create(disk.clone(), &spec, &Claim::new("node-a"))
        .await
        .unwrap();
    let id = Uuid::new_v4();
    let vol = pool.create_replica(id, 16 * CS, None).await.unwrap();
    (disk, pool, vol, id)
}

fn data(seed: u8, len: usize) -> Bytes {
    Bytes::from(vec![seed; len])
}

#[tokio::test]
async fn a_write_over_two_new_clusters_with_room_for_one_fails_with_capacity_exceeded_and_changes_nothing()
 {
    let (disk, pool, vol) = pool_on_thin_disk().await;
    // Room for one cluster and a half: the write's second cluster does not fit.
    disk.room_for(CS * 3 / 2 / BLOCK);
    let e = vol.write(CS - 4096, data(7, 8192)).await.unwrap_err();
    assert!(matches!(e, BlockError::NoSpace), "{e:?}");
    let back = vol.read(0, 2 * CS).await.unwrap();
    assert!(
        back.iter().all(|b| *b == 0),
        "part of a write that failed with NoSpace landed"
    );
    assert_eq!(pool.stats().allocated, 0);
    assert!(pool.stats().no_space_errors >= 1);
    assert!(pool.fault().is_none());
    // Room for one cluster is not a full disk; none is, whatever the pool's own free clusters, until there is.
    assert!(!pool.stats().disk_full);
    disk.room_for(0);
    let e = vol.write(5 * CS, data(8, 4096)).await.unwrap_err();
    assert!(matches!(e, BlockError::NoSpace), "{e:?}");
    assert!(pool.stats().disk_full);
    // With room, the disk is not full any more, and the write goes through.
    disk.room_for(u64::MAX);
    assert!(!pool.stats().disk_full);
    vol.write(CS - 4096, data(7, 8192)).await.unwrap();
    assert_eq!(
        &vol.read(CS - 4096, 8192).await.unwrap()[..],
        &data(7, 8192)[..]
    );
}

#[tokio::test]
async fn a_write_that_runs_out_of_space_after_changing_data_fails_with_an_io_error() {
    let (disk, _pool, vol) = pool_on_thin_disk().await;
    vol.write(0, data(1, 8192)).await.unwrap();
    // A file system that copies on write needs new space for an overwrite too; none is left.
    disk.copy_on_write.store(true, Ordering::SeqCst);
    disk.room_for(1);
    let e = vol.write(0, data(2, 8192)).await.unwrap_err();
    assert!(matches!(e, BlockError::Io(_)), "{e:?}");
    // A write over a cluster the volume has and a new one: the first piece is written in place before the new
    // cluster is needed.
    disk.copy_on_write.store(false, Ordering::SeqCst);
    disk.room_for(0);
    let e = vol.write(CS - 4096, data(3, 8192)).await.unwrap_err();
    assert!(
        matches!(e, BlockError::NoSpace),
        "the new cluster's space is looked for before anything is written: {e:?}"
    );
    assert_eq!(
        &vol.read(CS - 4096, 4096).await.unwrap()[..],
        &[0u8; 4096][..]
    );
}

#[tokio::test]
async fn a_deallocate_that_runs_out_of_space_after_zeroing_one_end_fails_with_an_io_error() {
    let (_disk, pool, vol, id) = pool_on_thin_disk_with_id().await;
    vol.write(0, data(1, (3 * CS) as usize)).await.unwrap();
    pool.snapshot(id, Uuid::new_v4()).await.unwrap();
    // Another replica takes every free cluster but one.
    let s = pool.stats();
    let free = (s.capacity - s.allocated) / CS;
    let other = pool
        .create_replica(Uuid::new_v4(), (free - 1) * CS, None)
        .await
        .unwrap();
    for c in 0..free - 1 {
        other.write(c * CS, data(2, 4096)).await.unwrap();
    }
    assert_eq!((pool.stats().capacity - pool.stats().allocated) / CS, 1);
    // Every cluster of the volume is shared with the snapshot: zeroing part of one copies it first. The head's
    // copy takes the last free cluster; the tail's finds none.
    let e = vol.deallocate(CS / 2, 2 * CS).await.unwrap_err();
    assert!(
        matches!(e, BlockError::Io(_)),
        "the head was zeroed before the tail ran out of space: {e:?}"
    );
}
