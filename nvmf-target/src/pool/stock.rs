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

use super::commit::Metadata;
use super::label::{LABEL_LEN, Label};
use super::{PoolError, PoolInner};
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
            let Some(filling) = pool.reserve_for_stock().await else {
                return;
            };
            let zeroed = async {
                pool.zero_for_stock(&filling.clusters).await?;
                pool.dev.flush().await
            }
            .await;
            match &zeroed {
                Ok(()) => {}
                Err(BlockError::NoSpace) => pool.disk_room(false),
                Err(e) => {
                    tracing::debug!(pool = %pool.label.name, error = %e, "filling the stock failed")
                }
            }
            filling.end(zeroed.is_ok());
        });
    }

    /// A filling of the stock: free clusters to zero, reserved, when the stock is empty, no other filling is under
    /// way, the pool is open and the label still names this import (a displaced owner zeroes nothing more). End
    /// it with [`Filling::end`] once the zeroing is flushed, or failed.
    pub(super) async fn reserve_for_stock(&self) -> Option<Filling<'_>> {
        {
            let stock = self.stock.lock().unwrap_or_else(|e| e.into_inner());
            if !stock.is_empty() || self.stocking.swap(true, Ordering::AcqRel) {
                return None;
            }
        }
        // From here, dropping it ends the filling.
        let mut filling = Filling {
            pool: self,
            clusters: Vec::new(),
            ended: false,
        };
        let cs = u64::from(self.label.cluster_size);
        let want = (STOCK_BYTES / cs)
            .clamp(1, MAX_CLUSTERS)
            .min(self.unreserved_free() / FREE_SHARE);
        let closed = || self.closed.load(Ordering::Acquire);
        if want == 0 || closed() || !self.still_ours().await || closed() {
            return None;
        }
        filling.clusters = self.pick_free(want as usize);
        if filling.clusters.is_empty() {
            return None;
        }
        Some(filling)
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
    /// progress has ended: whether free clusters may have changed meanwhile (it waited for a filling, which may
    /// have given its clusters back, or it gave some back).
    pub(super) async fn drain_stock(&self) -> bool {
        let ready = self.stock_ready.notified();
        tokio::pin!(ready);
        ready.as_mut().enable();
        let waited = self.stocking.load(Ordering::Acquire);
        if waited {
            ready.await;
        }
        let drained: Vec<u32> =
            std::mem::take(&mut *self.stock.lock().unwrap_or_else(|e| e.into_inner()));
        let gave_back = !drained.is_empty();
        for c in drained {
            self.release_unused(c);
        }
        waited || gave_back
    }

    /// Reads the label back before data goes into a cluster this import found free (a first write's, or a
    /// copy-on-write's): an owner displaced by a forced import may find free what the new owner has mapped since,
    /// and must not write there. If another import claimed the pool, fails with [`PoolError::OwnershipLost`] and
    /// closes the pool's volumes, as a commit that finds it does; a label that cannot be read fails the write.
    pub(super) async fn ensure_ours(&self) -> Result<(), PoolError> {
        let block = self
            .dev
            .read(0, LABEL_LEN)
            .await
            .map_err(|e| PoolError::Io(format!("reading the label back: {e}")))?;
        match Label::decode(&block, self.dev.size_bytes()) {
            Ok(l) if l.owner == self.label.owner && l.incarnation == self.label.incarnation => {
                Ok(())
            }
            other => {
                let now = match other {
                    Ok(l) => format!(
                        "node {:?} imported it (incarnation {}; this import was {})",
                        l.owner, l.incarnation, self.label.incarnation
                    ),
                    Err(e) => format!("its label now reads: {e}"),
                };
                let e = PoolError::OwnershipLost {
                    pool: self.label.name.clone(),
                    now,
                };
                self.failed(&e);
                Err(e)
            }
        }
    }

    /// Whether the label on the disk still names this import (another node may have taken the pool).
    pub(super) async fn still_ours(&self) -> bool {
        match self.dev.read(0, LABEL_LEN).await {
            Ok(block) => Label::decode(&block, self.dev.size_bytes()).is_ok_and(|l| {
                l.owner == self.label.owner && l.incarnation == self.label.incarnation
            }),
            Err(_) => false,
        }
    }
}

/// A filling of the stock under way (it set the pool's `stocking`) and the clusters it zeroes, reserved. Dropped
/// before [`Filling::end`] (its task gone at a runtime's shutdown), it gives them back and ends, so no reservation
/// waits for it forever.
pub(super) struct Filling<'a> {
    pool: &'a PoolInner,
    pub(super) clusters: Vec<u32>,
    ended: bool,
}

impl Filling<'_> {
    /// Ends the filling: with its zeroing durable the clusters join the stock, else they go back to the free ones.
    pub(super) fn end(mut self, zeroed: bool) {
        let clusters = std::mem::take(&mut self.clusters);
        if zeroed {
            self.pool.stock_filled(clusters);
            self.ended = true;
        } else {
            self.clusters = clusters;
        }
    }
}

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        for c in self.clusters.drain(..) {
            self.pool.release_unused(c);
        }
        self.pool.stock_filled(Vec::new());
    }
}
