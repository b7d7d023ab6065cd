//! Giving freed clusters' space back to the file system under the pool, or telling the block device under it. A
//! replica destroyed, whole clusters the host deallocated (a guest's `fstrim`), or a copy-on-write that took a
//! cluster's last other user's place, leave clusters free; on a sparse file their space would stay taken on the
//! file system for ever, since a free cluster is only written again when an allocation takes it, and a
//! thin-provisioned LUN or an SSD under a block device would keep them mapped. On a block device the same runs are
//! discarded ([`crate::block::discard`]) in smaller holds ([`DISCARD_BYTES`]: the device does the work), until the
//! device refuses one, and an import discards nothing (its whole free space at every start): what a process that
//! died first did not discard stays mapped there. As the commit
//! that freed them is applied (in the journal's task, so also when the caller that asked went away), their runs
//! join the pool's queue of releases, which one task at a time punches out of the file
//! ([`crate::block::BlockDevice::release`]); at a pool file's import, every free cluster's run does, which also catches up on
//! what a process that died first never gave back.
//!
//! Why it is safe: the task punches in holds of at most [`HOLD_BYTES`], each under the pool's gate held
//! exclusively, so no I/O of the pool runs meanwhile (every read, write and filling of the stock holds it shared;
//! every allocation reserves its clusters under it), and in each hold it punches only what is free and not
//! reserved then: no one maps those clusters, no allocation is about to write them, and the stock's zeroed clusters
//! (reserved) keep their space. Each hold first checks, under the gate, that the pool is open, not faulted, and
//! that its label still names this import: a displaced owner punches nothing another node may have mapped since.
//! A free cluster's bytes mean nothing (an allocation zeroes around its data, the stock zeroes what it holds), so
//! what a punched cluster reads afterwards does not matter. The task holds the pool only weakly: a pool dropped
//! (an import the engine refused, say) is not kept open by it.
//!
//! A disk that hangs holds the gate as its I/O would (a punch is not cut short: the file system may still be
//! punching when a timeout fires).
//!
//! A pool file that had all its space when the pool was made (`fallocate`, so that the file system under it can
//! never run out for it) keeps it: its owner asked for that space, and nothing is given back. Recorded in the label
//! then: a sparse file the pool once wrote all through looks the same later, and still gives space back.
//!
//! Best effort: a release that fails, or never runs (the process died; records whose caller went away before they
//! were written wait in the journal's queue for the next commit), leaves the space taken; a pool file's next import
//! gives it back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::PoolInner;
use crate::block::{BlockDevice, BlockError};

/// Bytes punched by one system call at most: a long run is cut, since the file system holds the file while it
/// punches.
const CALL_BYTES: u64 = 64 << 20;
/// Bytes punched under one hold of the gate at most: the pool's I/O waits for no more than that at a time.
const HOLD_BYTES: u64 = 256 << 20;
/// Bytes discarded by one call, and under one hold, on a block device: a discard is the device's work (a TRIM an
/// SSD may not queue, a SAN's UNMAP), not a file system's metadata change, so the pool's I/O waits for less of it.
const DISCARD_BYTES: u64 = 32 << 20;

/// A pool's queue of runs to give back, `(first cluster, count)`, and whether its task is running.
#[derive(Default)]
pub(super) struct Releases {
    queue: Mutex<Vec<(u32, u64)>>,
    running: AtomicBool,
}

impl Releases {
    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<(u32, u64)>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// No release is queued or under way.
    #[cfg(test)]
    pub(super) fn idle(&self) -> bool {
        !self.running.load(Ordering::Acquire)
    }
}

/// Runs of adjacent clusters, `(first, count)`, in `clusters` (in any order, repeats allowed).
pub(super) fn runs(clusters: &[u32]) -> Vec<(u32, u64)> {
    let mut sorted = clusters.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted_runs(sorted)
}

/// [`runs`] of clusters already in ascending order without repeats.
fn sorted_runs(clusters: impl IntoIterator<Item = u32>) -> Vec<(u32, u64)> {
    let mut runs: Vec<(u32, u64)> = Vec::new();
    for c in clusters {
        match runs.last_mut() {
            Some((first, n)) if u64::from(*first) + *n == u64::from(c) => *n += 1,
            _ => runs.push((c, 1)),
        }
    }
    runs
}

/// Whether a hold went through its share of the runs, or the releasing stops.
enum Held {
    Through(usize),
    Stop,
}

impl PoolInner {
    /// Queues `runs` to be given back, and starts the pool's task unless it is running (see the module's doc).
    pub(super) fn release_behind(self: &Arc<Self>, runs: Vec<(u32, u64)>) {
        if runs.is_empty() || self.keeps_space || !self.dev.releases_space() {
            return;
        }
        let mut queue = self.releases.queue();
        queue.extend(runs);
        // Under the queue's lock: a task that found the queue empty has cleared it already, or will see these.
        if self.releases.running.swap(true, Ordering::AcqRel) {
            return;
        }
        drop(queue);
        tokio::spawn(release_queued(Arc::downgrade(self)));
    }

    /// Bytes released by one call and under one hold at most: a file's (punched) or a block device's (discarded).
    fn release_limits(&self) -> (u64, u64) {
        if self.disk.backed().is_some() {
            (CALL_BYTES, HOLD_BYTES)
        } else {
            (DISCARD_BYTES, DISCARD_BYTES)
        }
    }

    /// The free clusters' runs, for an import to give back.
    pub(super) fn free_runs(&self) -> Vec<(u32, u64)> {
        let meta = self.meta();
        sorted_runs((0..meta.data_clusters() as u32).filter(|c| meta.refs(*c) == 0))
    }

    /// One hold of the gate: punches, from the start of `calls` (runs no longer than [`CALL_BYTES`]), up to
    /// [`HOLD_BYTES`] of what is still free and not reserved.
    async fn release_hold(&self, calls: &[(u32, u64)]) -> Held {
        let cs = u64::from(self.label.cluster_size);
        let hold_bytes = self.release_limits().1;
        let _excl = self.gate.write().await;
        // A disk put under a fault plan meanwhile gives nothing back, and its label is not read for it.
        if self.closed.load(Ordering::Acquire)
            || self.fault().is_some()
            || !self.dev.releases_space()
            || !self.still_ours().await
        {
            return Held::Stop;
        }
        let mut bytes = 0;
        let mut through = 0;
        for &(first, n) in calls {
            if bytes > 0 && bytes + n * cs > hold_bytes {
                break;
            }
            through += 1;
            bytes += n * cs;
            let free = {
                let reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
                let meta = self.meta();
                sorted_runs(
                    (first..first + n as u32)
                        .filter(|c| meta.refs(*c) == 0 && !reserved.contains(c)),
                )
            };
            for (c, m) in free {
                match self.dev.release(self.label.cluster_offset(c), m * cs).await {
                    Ok(true) => {}
                    // The disk gives nothing back: asking for the rest is no use.
                    Ok(false) => return Held::Stop,
                    // The file system had no room for the punch's own bookkeeping: the next runs may fit.
                    Err(BlockError::NoSpace) => {}
                    Err(e) => {
                        tracing::warn!(
                            pool = %self.label.name,
                            error = %e,
                            "could not give freed clusters' space back; a pool file's next import tries again"
                        );
                        return Held::Stop;
                    }
                }
            }
        }
        Held::Through(through)
    }
}

/// The pool's releasing task: gives back what is queued, a hold at a time, until the queue is empty, the pool is
/// gone or a hold says stop (then what is queued is dropped, for the next import to give back).
async fn release_queued(pool: Weak<PoolInner>) {
    // Clears `running` if the task ends any other way than below (a panic, its runtime shut down): later releases
    // then start a task of their own.
    let mut running = Running(Some(pool.clone()));
    loop {
        let (runs, cs, call_bytes) = {
            let Some(p) = pool.upgrade() else { return };
            let mut queue = p.releases.queue();
            if queue.is_empty() {
                p.releases.running.store(false, Ordering::Release);
                running.0 = None;
                return;
            }
            (
                std::mem::take(&mut *queue),
                u64::from(p.label.cluster_size),
                p.release_limits().0,
            )
        };
        let per_call = (call_bytes / cs).max(1);
        let calls: Vec<(u32, u64)> = runs
            .into_iter()
            .flat_map(|(first, n)| {
                (0..n)
                    .step_by(per_call as usize)
                    .map(move |i| (first + i as u32, per_call.min(n - i)))
            })
            .collect();
        let mut done = 0;
        while done < calls.len() {
            let Some(p) = pool.upgrade() else { return };
            match p.release_hold(&calls[done..]).await {
                Held::Through(n) => done += n,
                Held::Stop => {
                    let mut queue = p.releases.queue();
                    queue.clear();
                    p.releases.running.store(false, Ordering::Release);
                    running.0 = None;
                    return;
                }
            }
        }
    }
}

/// The releasing task of a pool, until it ends as it should (see [`release_queued`]).
struct Running(Option<Weak<PoolInner>>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(p) = self.0.take().and_then(|w| w.upgrade()) {
            let _queue = p.releases.queue();
            p.releases.running.store(false, Ordering::Release);
        }
    }
}
