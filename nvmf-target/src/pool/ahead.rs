//! Mapping ahead of a sequential writer: a write that enters a cluster at its start right after a mapped one is
//! taken for a stream, and the next few clusters of the volume that have none are mapped to stocked ones (zeroed
//! durably, `stock`) in the background, in one commit.
//!
//! Why: a first write must not be acknowledged before its cluster's mapping is durable, and each commit costs a
//! flush. Mapped on demand, a stream stops at every cluster for that flush, with all its writes in flight waiting
//! on it. Mapped ahead, the flush runs while the stream writes the clusters before, and usually ends before the
//! stream gets there.
//!
//! What it costs: up to [`AHEAD`] clusters per stream mapped before they are written, which read as zeroes (as
//! they would unmapped) and count as allocated. A pool short of space has no stock and maps nothing ahead.

use std::sync::atomic::Ordering;

use super::meta::Record;
use super::volume::PoolVolume;

/// How many clusters past the one a stream enters are kept mapped.
pub(super) const AHEAD: u64 = 4;

impl PoolVolume {
    /// Called with the offset of each write: if it starts a cluster right after a mapped one and some of the
    /// [`AHEAD`] clusters after it have no mapping, maps them in the background (one such task per volume at a
    /// time).
    pub(super) fn follow_stream(&self, offset: u64) {
        let cs = self.cs();
        if !offset.is_multiple_of(cs) || offset < cs {
            return;
        }
        let logical = offset / cs;
        let end = self.size().div_ceil(cs).min(logical + 1 + AHEAD);
        let unmapped = |l: u64| matches!(self.lookup(l as u32), Ok(None));
        if unmapped(logical - 1) || !(logical + 1..end).any(unmapped) {
            return;
        }
        if self.pool.stock_is_empty() && self.pool.unreserved_free() == 0 {
            return;
        }
        if self.mapping_ahead.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            self.mapping_ahead.store(false, Ordering::Release);
            return;
        };
        tokio::spawn(async move {
            me.map_ahead(logical + 1, end).await;
            me.mapping_ahead.store(false, Ordering::Release);
        });
    }

    /// Maps the clusters of `from..to` that have none to stocked clusters, in one commit.
    async fn map_ahead(&self, from: u64, to: u64) {
        let _io = self.pool.gate.read().await;
        let _vol = self.quiesce.read().await;
        if self.check_writable().is_err() {
            return;
        }
        if self.pool.stock_is_empty() {
            self.pool.fill_stock().await;
        }
        let _serial = self.alloc.exclusive(from..to).await;
        let mut taken = Vec::new();
        for logical in from..to {
            if !matches!(self.lookup(logical as u32), Ok(None)) {
                continue;
            }
            let Some(physical) = self.pool.take_stocked() else {
                break;
            };
            taken.push((logical as u32, physical));
        }
        if taken.is_empty() {
            return;
        }
        let records = taken
            .iter()
            .map(|(logical, physical)| Record::Map {
                volume: self.uuid,
                logical: *logical,
                physical: *physical,
            })
            .collect();
        if let Err(e) = self.pool.commit(records).await {
            tracing::debug!(volume = %self.uuid, error = %e, "mapping ahead of a sequential writer failed");
        }
        for (_, physical) in taken {
            self.pool.release_cluster(physical);
        }
    }
}
