//! Mapping ahead of a writer that goes in order. When a write allocates the logical cluster right after the last
//! one its volume allocated, its commit also maps the next never-mapped clusters to stocked ones (zeroed on the
//! disk durably, see `stock`). A sequential writer then pays one commit, one flush, per run of clusters instead of
//! one per cluster, and finds the next clusters of its run mapped: it writes them in place.
//!
//! How far: as many clusters as the run has made allocations in order so far, at most [`AHEAD_MAX`], and never
//! more than the stock holds. A writer that stops thus leaves at most as much mapped and unwritten as it wrote, and a
//! nearly full pool maps nothing ahead (its stock is empty: the stock takes at most an eighth of the free
//! clusters). A random writer almost never allocates right after its last allocation, so it maps nothing ahead.
//!
//! Why it is safe: a stocked cluster reads as zeroes, as the never-mapped cluster did, so mapping it changes no
//! byte any reader sees, before or after a crash. Each cluster mapped ahead is held under the volume's
//! allocation lock from its lookup to the commit: no other write allocates it meanwhile, and one that waits for
//! it finds it mapped and writes in place. The lock is only tried, never waited for, so a write holding one
//! cluster never waits for another.

use std::sync::Mutex;

use super::volume::PoolVolume;
use crate::block::BlockError;
use crate::block::range_lock::RangeGuard;

/// Most clusters mapped ahead by one commit.
pub(super) const AHEAD_MAX: u32 = 8;

/// Where a volume's writer is in its run of clusters allocated in order.
pub(super) struct Stream(Mutex<Run>);

struct Run {
    /// The logical cluster after the last one allocated (or mapped ahead); `u32::MAX` before any.
    next: u32,
    /// How many allocations the run made in order (clusters mapped ahead not counted: a writer that skips them
    /// never gets more mapped ahead than it allocated).
    len: u32,
}

impl Default for Stream {
    fn default() -> Stream {
        Stream(Mutex::new(Run {
            next: u32::MAX,
            len: 0,
        }))
    }
}

impl Stream {
    fn lock(&self) -> std::sync::MutexGuard<'_, Run> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Clusters to map ahead with an allocation's own: (logical, stocked physical) pairs, their logical clusters held
/// until the commit ends. Clusters not committed go back to the free ones ([`Ahead::release`]).
#[derive(Default)]
pub(super) struct Ahead {
    pub(super) maps: Vec<(u32, u32)>,
    _held: Option<RangeGuard>,
}

impl PoolVolume {
    /// What to map ahead of an allocation of `logical`, a never-mapped cluster, called under its allocation lock.
    pub(super) fn take_ahead(&self, logical: u32) -> Result<Ahead, BlockError> {
        let want = {
            let run = self.stream.lock();
            if run.next != logical {
                return Ok(Ahead::default());
            }
            run.len.min(AHEAD_MAX)
        };
        let clusters = self.mapped_len()?;
        let from = logical.saturating_add(1);
        let to = from.saturating_add(want).min(clusters);
        if from >= to {
            return Ok(Ahead::default());
        }
        let Some(held) = self.alloc.try_exclusive(u64::from(from)..u64::from(to)) else {
            return Ok(Ahead::default());
        };
        let mut maps = Vec::new();
        for l in from..to {
            // Mapped already, or the volume is gone (its commit fails then): no further.
            if !matches!(self.lookup(l), Ok(None)) {
                break;
            }
            let Some(c) = self.pool.take_stocked() else {
                break;
            };
            maps.push((l, c));
        }
        self.pool.refill_behind();
        Ok(Ahead {
            maps,
            _held: Some(held),
        })
    }

    /// `logical` was allocated, and `ahead` clusters after it mapped with it: the run goes on from there, or a
    /// new one starts.
    pub(super) fn allocated_in_order(&self, logical: u32, ahead: usize) {
        let mut run = self.stream.lock();
        run.len = if run.next == logical {
            run.len.saturating_add(1)
        } else {
            1
        };
        run.next = logical.saturating_add(1 + ahead as u32);
    }
}

impl Ahead {
    /// Gives back the clusters of a commit that failed: never written, so the next allocation may take them.
    pub(super) fn release(self, volume: &PoolVolume) {
        for (_, c) in &self.maps {
            volume.pool.release_unused(*c);
        }
    }

    /// The commit mapped them: they are no longer reserved.
    pub(super) fn committed(self, volume: &PoolVolume) {
        for (_, c) in &self.maps {
            volume.pool.release_cluster(*c);
        }
    }
}
