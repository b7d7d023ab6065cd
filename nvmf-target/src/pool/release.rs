//! Giving freed clusters' space back to the file system under the pool. A replica destroyed, or whole clusters the
//! host deallocated (a guest's `fstrim`), leave clusters free; on a sparse file their space would stay taken on the
//! file system for ever, since a free cluster is only written again when an allocation takes it. After the commit
//! that freed them, a task of its own punches them out of the file ([`crate::block::BlockDevice::release`]); at import, every
//! free cluster is, which also catches up on what a process that died first never gave back.
//!
//! Why it is safe: the task punches in batches, each under the pool's gate held exclusively, so no I/O of the
//! pool runs meanwhile (every read, write and filling of the stock holds it shared), and it punches only what is
//! free and not reserved then: no one maps those clusters, and no allocation is about to write them. It stops once
//! the pool is closed, faulted, or its label names another import. A free cluster's bytes mean nothing (an
//! allocation zeroes around its data, the stock zeroes what it holds), so what a punched cluster reads afterwards
//! does not matter.
//!
//! Best effort: a release that fails leaves the space taken (logged); the next import tries again.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::PoolInner;

/// Runs punched under one hold of the gate: the pool's I/O waits for at most this many system calls at a time.
const RUNS_PER_HOLD: usize = 16;

/// Runs of adjacent clusters, `(first, count)`, in `clusters` (in any order, repeats allowed).
pub(super) fn runs(clusters: &[u32]) -> Vec<(u32, u64)> {
    let mut sorted = clusters.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(u32, u64)> = Vec::new();
    for c in sorted {
        match runs.last_mut() {
            Some((first, n)) if u64::from(*first) + *n == u64::from(c) => *n += 1,
            _ => runs.push((c, 1)),
        }
    }
    runs
}

impl PoolInner {
    /// Gives back, in a task of its own, the space under those of `runs` that are free when their turn comes
    /// (see the module's doc).
    pub(super) fn release_behind(self: &Arc<Self>, runs: Vec<(u32, u64)>) {
        if runs.is_empty() || !self.dev.releases_space() {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move { pool.release_free(runs).await });
    }

    /// The free clusters' runs, for an import to give back.
    pub(super) fn free_runs(&self) -> Vec<(u32, u64)> {
        let meta = self.meta();
        let free: Vec<u32> = (0..meta.data_clusters() as u32)
            .filter(|c| meta.refs(*c) == 0)
            .collect();
        runs(&free)
    }

    async fn release_free(&self, runs: Vec<(u32, u64)>) {
        let cs = u64::from(self.label.cluster_size);
        let mut released = 0u64;
        for batch in runs.chunks(RUNS_PER_HOLD) {
            // A label read, not under the gate: the pool's I/O waits for nothing but the punches.
            if !self.still_ours().await {
                return;
            }
            let _excl = self.gate.write().await;
            if self.closed.load(Ordering::Acquire) || self.fault().is_some() {
                return;
            }
            for &(first, n) in batch {
                let free: Vec<u32> = {
                    let reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
                    let meta = self.meta();
                    (first..first.saturating_add(n as u32))
                        .filter(|c| meta.refs(*c) == 0 && !reserved.contains(c))
                        .collect()
                };
                for (c, m) in self::runs(&free) {
                    match self.dev.release(self.label.cluster_offset(c), m * cs).await {
                        Ok(true) => released += m,
                        // The disk gives nothing back: asking for the rest is no use.
                        Ok(false) => return,
                        Err(e) => {
                            tracing::warn!(
                                pool = %self.label.name,
                                error = %e,
                                "could not give freed clusters' space back to the file system; the next import tries again"
                            );
                            return;
                        }
                    }
                }
            }
        }
        if released > 0 {
            tracing::debug!(pool = %self.label.name, clusters = released, "gave freed clusters' space back");
        }
    }
}
