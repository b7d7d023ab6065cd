//! A device that counts the I/O errors its disk returns (`EIO` and the like, and injected faults, which stand for
//! them; not range or space errors): how a pool knows its disk is failing, to say so to the cluster agent, which
//! then places nothing new on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlockDevice, BlockError};

pub struct ErrorCount {
    inner: Arc<dyn BlockDevice>,
    errors: AtomicU64,
}

impl ErrorCount {
    pub fn new(inner: Arc<dyn BlockDevice>) -> ErrorCount {
        ErrorCount {
            inner,
            errors: AtomicU64::new(0),
        }
    }

    /// Disk I/O errors so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn seen<T>(&self, r: Result<T, BlockError>) -> Result<T, BlockError> {
        if let Err(e @ (BlockError::Io(_) | BlockError::Injected { .. })) = &r {
            let n = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
            if n == 1 || n.is_power_of_two() {
                tracing::error!(error = %e, errors = n, "disk i/o error");
            }
        }
        r
    }
}

#[async_trait]
impl BlockDevice for ErrorCount {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        self.seen(self.inner.read(offset, len).await)
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        self.seen(self.inner.write(offset, data).await)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.seen(self.inner.write_zeroes(offset, len).await)
    }

    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.seen(self.inner.deallocate(offset, len).await)
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
        self.seen(self.inner.preallocate(offset, len).await)
    }

    fn releases_space(&self) -> bool {
        self.inner.releases_space()
    }
    async fn release(&self, offset: u64, len: u64) -> Result<bool, BlockError> {
        self.seen(self.inner.release(offset, len).await)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.seen(self.inner.flush().await)
    }

    async fn settle(&self) {
        self.inner.settle().await
    }

    fn connection_losses(&self) -> u64 {
        self.inner.connection_losses()
    }

    fn remote(&self) -> bool {
        self.inner.remote()
    }

    async fn allocated_ranges(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, u64)>>, BlockError> {
        self.seen(self.inner.allocated_ranges(offset, len).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::memory::MemoryDevice;

    #[tokio::test]
    async fn disk_errors_are_counted_and_other_failures_are_not() {
        let d = ErrorCount::new(Arc::new(MemoryDevice::new(1 << 20, 512)));
        d.write(0, Bytes::from(vec![1; 512])).await.unwrap();
        assert!(d.read(1 << 20, 512).await.is_err(), "out of range");
        assert_eq!(d.errors(), 0);
        let r: Result<(), BlockError> = Err(BlockError::Io(std::io::Error::other("EIO")));
        assert!(d.seen(r).is_err());
        assert_eq!(d.errors(), 1);
    }
}
