//! Clusters made ready ahead of allocations: free clusters zeroed and flushed, so that a write to a never-mapped
//! cluster can take one and go straight to its data and its mapping's commit, with no zeroing and no flush of its
//! own.
//!
//! Why it is safe: a cluster in the stock reads as zeroes on the disk durably (its zeroing was flushed) and is
//! reserved, so nothing else writes it until an allocation takes it. Once the mapping is committed, every byte of
//! the cluster is zero or the new write's, so nothing of a former owner can show, whatever a power cut keeps.
//!
//! The stock lives in memory only. An allocation that wrote into a stocked cluster and then failed, or a process
//! that died, leaves that cluster dirty and free; it is never stocked again without being zeroed, since after an
//! import, or a failed allocation, the cluster is one of the plain free clusters, which an allocation zeroes
//! around its data and flushes before mapping. A full pool gives the stock back before it fails a write for space.
//!
//! The stock is filled by an allocation that found it empty: besides its own cluster it zeroes a few more, and its
//! one flush covers them all. One flush thus serves many allocations (the first writes of a volume being filled).

use std::sync::atomic::Ordering;

use super::PoolInner;

/// How much the stock holds at most, in bytes (and never more than [`MAX_CLUSTERS`] clusters).
const STOCK_BYTES: u64 = 64 << 20;
const MAX_CLUSTERS: u64 = 16;
/// The stock takes at most this share of the free clusters (1 / n), so a nearly full pool stocks nothing.
const FREE_SHARE: u64 = 8;

impl PoolInner {
    pub(super) fn stock_is_empty(&self) -> bool {
        self.stock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// A stocked cluster (zeroed on the disk durably, reserved), if any.
    pub(super) fn take_stocked(&self) -> Option<u32> {
        self.stock.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Free clusters to zero for the stock, reserved, when the stock is empty and no other allocation is filling
    /// it; hand them to [`Self::stock_filled`] once their zeroing is flushed, or release them.
    pub(super) fn reserve_for_stock(&self) -> Vec<u32> {
        if !self
            .stock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
            || self.stocking.swap(true, Ordering::AcqRel)
        {
            return Vec::new();
        }
        let cs = u64::from(self.label.cluster_size);
        let free = self.unreserved_free();
        let want = (STOCK_BYTES / cs)
            .clamp(1, MAX_CLUSTERS)
            .min(free / FREE_SHARE);
        let picked = self.pick_free(want as usize);
        if picked.is_empty() {
            self.stocking.store(false, Ordering::Release);
        }
        picked
    }

    /// `clusters` (from [`Self::reserve_for_stock`]) are zeroed and the zeroing is durable: they join the stock.
    /// Empty: the filling failed and its clusters were released.
    pub(super) fn stock_filled(&self, clusters: Vec<u32>) {
        self.stock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(clusters);
        self.stocking.store(false, Ordering::Release);
    }

    /// Gives every stocked cluster back to the free ones (the pool is short of space); how many.
    pub(super) fn drain_stock(&self) -> usize {
        let drained: Vec<u32> =
            std::mem::take(&mut *self.stock.lock().unwrap_or_else(|e| e.into_inner()));
        let n = drained.len();
        for c in drained {
            self.release_cluster(c);
        }
        n
    }
}

impl PoolInner {
    /// Fills the stock when it is empty and no allocation is filling it: zeroes free clusters and flushes them. A
    /// failure leaves the stock empty (the clusters go back to the free ones).
    pub(super) async fn fill_stock(&self) {
        let picked = self.reserve_for_stock();
        if picked.is_empty() {
            return;
        }
        let cs = u64::from(self.label.cluster_size);
        let zeroed = async {
            for c in &picked {
                self.dev
                    .write_zeroes(self.label.cluster_offset(*c), cs)
                    .await?;
            }
            self.dev.flush().await
        }
        .await;
        match zeroed {
            Ok(()) => self.stock_filled(picked),
            Err(e) => {
                tracing::debug!(pool = %self.label.name, error = %e, "zeroing clusters for the stock failed");
                for c in picked {
                    self.release_cluster(c);
                }
                self.stock_filled(Vec::new());
            }
        }
    }
}
