//! A fault-injecting wrapper: fails I/O after N operations, fails I/O touching given byte ranges, and adds latency.
//! The plan can be changed while I/O runs. Tests use it, and the engine keeps one under every pool disk and
//! exported test namespace for `InjectFault`; with no plan set it costs one atomic load per I/O.

use std::ops::Range;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlockDevice, BlockError};

/// What to break. The default breaks nothing.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// Fail every I/O once this many I/Os have completed since the plan was set.
    pub fail_after: Option<u64>,
    /// Fail any I/O that overlaps one of these byte ranges.
    pub fail_ranges: Vec<Range<u64>>,
    /// Delay every I/O by this much.
    pub latency: Option<Duration>,
    /// Apply failures to reads (writes, zeroes and deallocates are always subject to them).
    pub reads_too: bool,
}

pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    plan: Mutex<FaultPlan>,
    /// A plan that breaks something is set.
    armed: AtomicBool,
    ios: AtomicU64,
    injected: AtomicU64,
}

impl FaultDevice {
    pub fn new(inner: Arc<dyn BlockDevice>) -> FaultDevice {
        FaultDevice {
            inner,
            plan: Mutex::new(FaultPlan::default()),
            armed: AtomicBool::new(false),
            ios: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    pub fn set_plan(&self, plan: FaultPlan) {
        let armed =
            plan.fail_after.is_some() || !plan.fail_ranges.is_empty() || plan.latency.is_some();
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = plan;
        self.ios.store(0, Ordering::SeqCst);
        self.armed.store(armed, Ordering::SeqCst);
    }

    /// How many I/Os were failed on purpose.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    async fn gate(&self, offset: u64, len: u64, is_read: bool) -> Result<(), BlockError> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let plan = self.plan.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(l) = plan.latency {
            tokio::time::sleep(l).await;
        }
        let n = self.ios.fetch_add(1, Ordering::SeqCst);
        if is_read && !plan.reads_too {
            return Ok(());
        }
        let after = plan.fail_after.is_some_and(|limit| n >= limit);
        let in_range = plan
            .fail_ranges
            .iter()
            .any(|r| offset < r.end && r.start < offset + len.max(1));
        if after || in_range {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(BlockError::Injected { offset });
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for FaultDevice {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        self.gate(offset, len, true).await?;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        self.gate(offset, data.len() as u64, false).await?;
        self.inner.write(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.gate(offset, len, false).await?;
        self.inner.write_zeroes(offset, len).await
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.gate(offset, len, false).await?;
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
        self.gate(offset, len, false).await?;
        self.inner.preallocate(offset, len).await
    }
    fn releases_space(&self) -> bool {
        // Not under a plan: background releases (and their label reads) would take the failures and the latency
        // meant for the I/O the plan is about.
        !self.armed.load(Ordering::Relaxed) && self.inner.releases_space()
    }
    async fn release(&self, offset: u64, len: u64) -> Result<bool, BlockError> {
        // A disk under a plan gives nothing back: background releases would take the failures and the latency
        // meant for the I/O the plan is about.
        if self.armed.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.inner.release(offset, len).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.gate(0, 0, false).await?;
        self.inner.flush().await
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
        self.gate(offset, len, true).await?;
        self.inner.allocated_ranges(offset, len).await
    }
    async fn note_missed(&self, m: &crate::block::MissedWrites) -> Result<(), BlockError> {
        self.gate(0, 0, false).await?;
        self.inner.note_missed(m).await
    }
    async fn forget_missed(&self, child: &str) -> Result<(), BlockError> {
        self.gate(0, 0, false).await?;
        self.inner.forget_missed(child).await
    }
    async fn missed(&self) -> Result<Vec<crate::block::MissedWrites>, BlockError> {
        self.gate(0, 0, true).await?;
        self.inner.missed().await
    }
    async fn snapshot(&self, id: uuid::Uuid) -> Result<(), BlockError> {
        self.gate(0, 0, false).await?;
        self.inner.snapshot(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::conformance;
    use crate::block::memory::MemoryDevice;

    fn dev() -> FaultDevice {
        FaultDevice::new(Arc::new(MemoryDevice::new(4 << 20, 512)))
    }

    #[tokio::test]
    async fn without_a_plan_it_is_transparent() {
        conformance::run(&dev()).await;
    }

    #[tokio::test]
    async fn fails_after_n_ios() {
        let d = dev();
        d.set_plan(FaultPlan {
            fail_after: Some(2),
            ..Default::default()
        });
        d.write(0, Bytes::from(vec![1; 512])).await.unwrap();
        d.write(0, Bytes::from(vec![1; 512])).await.unwrap();
        assert!(matches!(
            d.write(0, Bytes::from(vec![1; 512])).await,
            Err(BlockError::Injected { .. })
        ));
        assert!(
            d.read(0, 512).await.is_ok(),
            "reads are spared unless reads_too"
        );
        assert_eq!(d.injected(), 1);
    }

    #[tokio::test]
    async fn fails_a_range_only() {
        let d = dev();
        d.set_plan(FaultPlan {
            fail_ranges: [4096..8192, 1 << 30..(1 << 30) + 1].to_vec(),
            reads_too: true,
            ..Default::default()
        });
        assert!(d.read(0, 4096).await.is_ok());
        assert!(d.read(3584, 1024).await.is_err());
        assert!(d.write(8192, Bytes::from(vec![0; 512])).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn adds_latency() {
        let d = dev();
        d.set_plan(FaultPlan {
            latency: Some(Duration::from_millis(50)),
            ..Default::default()
        });
        let t = tokio::time::Instant::now();
        d.read(0, 512).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(50));
    }
}
