//! Fail-stop for a pool whose metadata write failed: a [`BlockDevice`] over the pool's disk that, once blown,
//! refuses every write, write-zeroes, deallocate and flush (reads go on), until the pool is imported again.
//!
//! Why: a journal transaction whose write or flush failed may still be on the disk, and the disk's next flush
//! (anyone's: a host's flush of its data, the next commit) can make it durable, so the next import replays a change
//! the pool reported failed and never applied. The host would see its acknowledged, flushed data undone: an
//! Unmap that failed here while the cluster was written and flushed again, or a Map whose cluster was handed to
//! another volume. Nothing the pool knows in memory is then sure to match the disk; an import reads the disk
//! again (and compacts whatever the journal holds) and is the only way back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;

use crate::block::{BlockDevice, BlockError};

pub(super) struct Fuse {
    inner: Arc<dyn BlockDevice>,
    /// Why the pool stopped taking writes.
    blown: Arc<OnceLock<String>>,
    flushes: Arc<Flushes>,
}

/// The disk's flushes (the journal's and the volumes' alike), one at a time: a flush that fails blows the fuse
/// before the next one starts, so no flush after a failed one succeeds. Callers waiting meanwhile share the next
/// one.
#[derive(Default)]
struct Flushes {
    one: tokio::sync::Mutex<()>,
    /// Flushes started, and the number of the last one that succeeded (they are numbered from 1 as they start).
    started: AtomicU64,
    succeeded: AtomicU64,
}

impl Fuse {
    pub fn new(inner: Arc<dyn BlockDevice>) -> Fuse {
        Fuse {
            inner,
            blown: Arc::new(OnceLock::new()),
            flushes: Arc::default(),
        }
    }

    /// Stops every later write and flush. Returns whether this call blew it (the first reason is kept).
    pub fn blow(&self, why: String) -> bool {
        self.blown.set(why).is_ok()
    }

    /// Why the pool takes no writes, if it doesn't.
    pub fn blown(&self) -> Option<&str> {
        self.blown.get().map(String::as_str)
    }

    pub fn check(&self) -> Result<(), BlockError> {
        check(&self.blown)
    }
}

fn check(blown: &OnceLock<String>) -> Result<(), BlockError> {
    match blown.get() {
        None => Ok(()),
        Some(why) => Err(BlockError::Io(std::io::Error::other(format!(
            "the pool takes no writes until it is imported again: {why}"
        )))),
    }
}

#[async_trait]
impl BlockDevice for Fuse {
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
        self.check()?;
        self.inner.write(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check()?;
        self.inner.write_zeroes(offset, len).await
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check()?;
        self.inner.deallocate(offset, len).await
    }
    fn room(&self) -> Option<u64> {
        self.inner.room()
    }
    fn room_of(&self) -> Option<u64> {
        self.inner.room_of()
    }
    fn backed(&self) -> Option<u64> {
        self.inner.backed()
    }
    async fn preallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check()?;
        self.inner.preallocate(offset, len).await
    }
    fn releases_space(&self) -> bool {
        self.inner.releases_space()
    }
    async fn release(&self, offset: u64, len: u64) -> Result<bool, BlockError> {
        self.check()?;
        self.inner.release(offset, len).await
    }
    /// A failed flush blows the fuse too: the kernel may have dropped the dirty data it could not write and report
    /// the error to one flush only (a file's writeback error goes to the first fsync that checks), so a journal
    /// commit's own flush could succeed afterwards with its transaction lost, and no later flush says what is on
    /// the disk. Flushes go one at a time, each checking the fuse first: none that starts after a failed one
    /// succeeds. The pool is stopped until an import reads the disk again.
    ///
    /// The flush runs in a task of its own: a caller that goes away (a timeout) does not leave a flush running
    /// unheard, whose failure nobody would see while the next one starts.
    async fn flush(&self) -> Result<(), BlockError> {
        self.check()?;
        // A flush numbered above this one started after this call, so covers every write done before it.
        let before = self.flushes.started.load(Ordering::Acquire);
        let (inner, blown, flushes) =
            (self.inner.clone(), self.blown.clone(), self.flushes.clone());
        let task = tokio::spawn(async move {
            let _one = flushes.one.lock().await;
            check(&blown)?;
            if flushes.succeeded.load(Ordering::Acquire) > before {
                return Ok(());
            }
            let n = flushes.started.fetch_add(1, Ordering::AcqRel) + 1;
            let r = inner.flush().await;
            match &r {
                Ok(()) => flushes.succeeded.store(n, Ordering::Release),
                Err(e) => {
                    if blown
                        .set(format!("a flush of the pool's disk failed: {e}"))
                        .is_ok()
                    {
                        tracing::error!(error = %e, "a flush of the pool's disk failed: the pool takes no more writes until it is imported again");
                    }
                }
            }
            r
        });
        task.await.unwrap_or_else(|e| {
            Err(BlockError::Io(std::io::Error::other(format!(
                "the flush of the pool's disk ended early: {e}"
            ))))
        })
    }

    async fn settle(&self) {
        self.inner.settle().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::memory::MemoryDevice;

    #[tokio::test]
    async fn a_blown_fuse_refuses_writes_and_flushes_and_keeps_reads() {
        let f = Fuse::new(Arc::new(MemoryDevice::new(1 << 20, 512)));
        f.write(0, Bytes::from(vec![7u8; 512])).await.unwrap();
        assert!(f.blow("journal flush: EIO".into()));
        assert!(!f.blow("again".into()));
        assert_eq!(f.blown(), Some("journal flush: EIO"));
        assert!(matches!(
            f.write(0, Bytes::from(vec![1u8; 512])).await,
            Err(BlockError::Io(_))
        ));
        assert!(f.write_zeroes(0, 512).await.is_err());
        assert!(f.deallocate(0, 512).await.is_err());
        assert!(f.flush().await.is_err());
        assert_eq!(&f.read(0, 512).await.unwrap()[..], &[7u8; 512][..]);
    }

    #[tokio::test]
    async fn a_failed_flush_blows_the_fuse() {
        use crate::block::fault::{FaultDevice, FaultPlan};
        let disk = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(1 << 20, 512))));
        let f = Fuse::new(disk.clone());
        f.write(0, Bytes::from(vec![7u8; 512])).await.unwrap();
        f.flush().await.unwrap();
        assert_eq!(f.blown(), None);
        disk.set_plan(FaultPlan {
            fail_after: Some(0),
            ..Default::default()
        });
        assert!(f.flush().await.is_err());
        disk.set_plan(FaultPlan::default());
        // The disk works again; the pool does not trust it until it is imported again.
        assert!(
            f.blown().is_some_and(|w| w.contains("flush")),
            "{:?}",
            f.blown()
        );
        assert!(f.flush().await.is_err());
        assert!(f.write(0, Bytes::from(vec![1u8; 512])).await.is_err());
        assert_eq!(&f.read(0, 512).await.unwrap()[..], &[7u8; 512][..]);
    }

    /// A flush whose caller gave up still blows the fuse when it fails, before any later flush runs.
    #[tokio::test]
    async fn a_failed_flush_nobody_waits_for_any_more_still_blows_the_fuse() {
        use crate::block::fault::{FaultDevice, FaultPlan};
        let disk = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(1 << 20, 512))));
        let f = Fuse::new(disk.clone());
        disk.set_plan(FaultPlan {
            fail_after: Some(0),
            latency: Some(std::time::Duration::from_millis(200)),
            ..Default::default()
        });
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(20), f.flush()).await;
        assert!(gave_up.is_err(), "{gave_up:?}");
        disk.set_plan(FaultPlan::default());
        // The next flush waits for the first, which fails: this one fails too.
        assert!(f.flush().await.is_err());
        assert!(f.blown().is_some());
    }
}
