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
//! around its data and flushes before mapping.
//!
//! The stock is filled two ways, one flush covering every cluster of a filling:
//! - behind the allocation that took its last cluster, in a task of its own ([`PoolInner::refill_behind`]), so
//!   that the next first writes find it full and neither wait for zeroing nor pay a flush for it;
//! - by an allocation that found it empty and no filling under way: besides its own cluster it zeroes the stock's,
//!   under its own flush.
//!
//! It takes at most an eighth of the free clusters, so a nearly full pool stocks nothing; and a reservation that
//! comes up short waits for a filling in progress and takes the stock back before it fails a write for space. A
//! filling holds the pool's gate shared, as I/O does, and a closed pool starts none: a destroyed pool's label is
//! wiped only once no filling zeroes anything more.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::PoolInner;
use super::label::{LABEL_LEN, Label};
use crate::block::BlockError;

/// How much the stock holds at most, in bytes (and never more than [`MAX_CLUSTERS`] clusters).
const STOCK_BYTES: u64 = 32 << 20;
const MAX_CLUSTERS: u64 = 8;
/// The stock takes at most this share of the free clusters (1 / n).
const FREE_SHARE: u64 = 8;

impl PoolInner {
    /// A stocked cluster (zeroed on the disk durably, reserved), if any: the lowest, so that a volume written in
    /// order takes them in order.
    pub(super) fn take_stocked(&self) -> Option<u32> {
        self.stock.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Takes a stocked cluster, and starts filling the stock again behind this allocation if it took the last.
    pub(super) fn take_stocked_refilling(self: &Arc<Self>) -> Option<u32> {
        let c = self.take_stocked();
        if c.is_some() {
            self.refill_behind();
        }
        c
    }

    /// Fills an empty stock in a task of its own (see the module's doc), if no filling is under way.
    pub(super) fn refill_behind(self: &Arc<Self>) {
        let empty = self
            .stock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if !empty || self.stocking.load(Ordering::Acquire) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let _io = pool.gate.read().await;
            if pool.closed.load(Ordering::Acquire) {
                return;
            }
            let clusters = pool.reserve_for_stock().await;
            if clusters.is_empty() {
                return;
            }
            let zeroed = async {
                pool.zero_for_stock(&clusters).await?;
                pool.dev.flush().await
            }
            .await;
            match zeroed {
                Ok(()) => pool.stock_filled(clusters),
                Err(e) => {
                    tracing::debug!(pool = %pool.label.name, error = %e, "filling the stock failed");
                    for c in clusters {
                        pool.release_unused(c);
                    }
                    pool.stock_filled(Vec::new());
                }
            }
        });
    }

    /// Free clusters to zero for the stock, reserved, when the stock is empty, no other allocation is filling it,
    /// and the label still names this import (a displaced owner zeroes nothing more); hand them to
    /// [`Self::stock_filled`] once their zeroing is flushed, or release them and call it with none.
    pub(super) async fn reserve_for_stock(&self) -> Vec<u32> {
        {
            let stock = self.stock.lock().unwrap_or_else(|e| e.into_inner());
            if !stock.is_empty() || self.stocking.swap(true, Ordering::AcqRel) {
                return Vec::new();
            }
        }
        let cs = u64::from(self.label.cluster_size);
        let want = (STOCK_BYTES / cs)
            .clamp(1, MAX_CLUSTERS)
            .min(self.unreserved_free() / FREE_SHARE);
        let picked = if want > 0 && self.still_ours().await {
            self.pick_free(want as usize)
        } else {
            Vec::new()
        };
        if picked.is_empty() {
            self.stock_filled(Vec::new());
        }
        picked
    }

    /// Zeroes `clusters` (from [`Self::reserve_for_stock`]); the caller's flush makes it durable.
    pub(super) async fn zero_for_stock(&self, clusters: &[u32]) -> Result<(), BlockError> {
        let cs = u64::from(self.label.cluster_size);
        for c in clusters {
            self.dev
                .write_zeroes(self.label.cluster_offset(*c), cs)
                .await?;
        }
        Ok(())
    }

    /// `clusters` (from [`Self::reserve_for_stock`]) are zeroed and the zeroing is durable: they join the stock.
    /// Empty: the filling failed and its clusters were released.
    pub(super) fn stock_filled(&self, clusters: Vec<u32>) {
        let mut stock = self.stock.lock().unwrap_or_else(|e| e.into_inner());
        stock.extend(clusters);
        // Highest first: `take_stocked` pops the lowest.
        stock.sort_unstable_by(|a, b| b.cmp(a));
        drop(stock);
        self.stocking.store(false, Ordering::Release);
        self.stock_ready.notify_waiters();
    }

    /// Gives every stocked cluster back to the free ones (a reservation came up short), once a filling in
    /// progress has ended; how many.
    pub(super) async fn drain_stock(&self) -> usize {
        let ready = self.stock_ready.notified();
        tokio::pin!(ready);
        ready.as_mut().enable();
        if self.stocking.load(Ordering::Acquire) {
            ready.await;
        }
        let drained: Vec<u32> =
            std::mem::take(&mut *self.stock.lock().unwrap_or_else(|e| e.into_inner()));
        let n = drained.len();
        for c in drained {
            self.release_unused(c);
        }
        n
    }

    /// Whether the label on the disk still names this import (another node may have taken the pool).
    async fn still_ours(&self) -> bool {
        match self.dev.read(0, LABEL_LEN).await {
            Ok(block) => Label::decode(&block, self.dev.size_bytes()).is_ok_and(|l| {
                l.owner == self.label.owner && l.incarnation == self.label.incarnation
            }),
            Err(_) => false,
        }
    }
}
