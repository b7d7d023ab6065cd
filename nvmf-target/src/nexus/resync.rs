//! Rebuild orchestration: starts a rebuild task for a child, feeds it healthy siblings as sources, marks the child
//! healthy when the copy completes (or faulted when it fails), and keeps a history of past rebuilds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use futures_util::future::join_all;

use crate::block::BlockDevice;
use crate::rebuild::{self, Progress, RebuildConfig, SegmentMap, Source};

use super::Nexus;
use super::child::{Child, ChildState};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebuildKind {
    /// Every segment.
    Full,
    /// Only the segments written while the child was away.
    Partial,
}

/// One finished rebuild.
#[derive(Clone, Debug, PartialEq)]
pub struct RebuildRecord {
    pub child: String,
    pub kind: RebuildKind,
    pub bytes_copied: u64,
    /// Bytes of segments with no data on the source, deallocated on the child instead of copied.
    pub bytes_skipped: u64,
    pub bytes_total: u64,
    pub duration: std::time::Duration,
    pub finished_at: SystemTime,
    /// `None` on success, else why it failed.
    pub error: Option<String>,
}

/// How many finished rebuilds a nexus keeps in full (the latest): every Nexus reply of the engine API carries them,
/// and a nexus lives for months. Older ones count only in [`RebuildTotals`].
pub const HISTORY_KEPT: usize = 64;

/// Upper bounds (seconds) of the rebuild-duration buckets [`RebuildTotals`] counts: 10 ms to 1 hour.
pub const DURATION_BOUNDS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Every rebuild a nexus finished, counted (what its metrics report, never going back).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RebuildTotals {
    /// By kind (full, partial) and outcome (ok, failed).
    pub finished: [[u64; 2]; 2],
    pub bytes_copied: u64,
    pub seconds: f64,
    /// Rebuilds that took at most each of [`DURATION_BOUNDS`] (cumulative).
    pub within: [u64; 12],
}

impl RebuildTotals {
    fn count(&mut self, r: &RebuildRecord) {
        let kind = usize::from(r.kind == RebuildKind::Partial);
        self.finished[kind][usize::from(r.error.is_some())] += 1;
        self.bytes_copied += r.bytes_copied;
        let s = r.duration.as_secs_f64();
        self.seconds += s;
        for (n, b) in self.within.iter_mut().zip(DURATION_BOUNDS) {
            if s <= *b {
                *n += 1;
            }
        }
    }

    pub fn count_of(&self, kind: RebuildKind, ok: bool) -> u64 {
        self.finished[usize::from(kind == RebuildKind::Partial)][usize::from(!ok)]
    }

    pub fn total(&self) -> u64 {
        self.finished.iter().flatten().sum()
    }
}

/// The latest rebuilds in full and the totals of all.
#[derive(Default)]
pub(super) struct History {
    recent: std::collections::VecDeque<RebuildRecord>,
    totals: RebuildTotals,
}

impl History {
    fn push(&mut self, r: RebuildRecord) {
        self.totals.count(&r);
        if self.recent.len() == HISTORY_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(r);
    }
}

/// Healthy siblings of the child being rebuilt, round robin.
struct Siblings {
    nexus: Arc<Nexus>,
    exclude: String,
    /// The nexus's application I/O count when `busy` last looked.
    seen_ios: std::sync::atomic::AtomicU64,
}

impl Source for Siblings {
    fn pick(&self) -> Option<Arc<dyn BlockDevice>> {
        let healthy: Vec<_> = self
            .nexus
            .list()
            .into_iter()
            .filter(|c| c.name != self.exclude && c.state() == ChildState::Healthy)
            .collect();
        if healthy.is_empty() {
            return None;
        }
        // Not one that lost its connection since it joined (it may have lost writes it had not flushed; its next
        // I/O faults it), unless every one did.
        let kept: Vec<_> = healthy
            .iter()
            .filter(|c| !c.lost_connection())
            .cloned()
            .collect();
        let healthy = if kept.is_empty() { healthy } else { kept };
        let i = self.nexus.next_read.fetch_add(1, Ordering::Relaxed) % healthy.len();
        Some(healthy[i].device.clone())
    }

    fn failed(&self, source: &Arc<dyn BlockDevice>, reason: &str) {
        let list = self.nexus.list();
        if let Some(c) = list.iter().find(|c| Arc::ptr_eq(&c.device, source)) {
            let n = c.note_read_error();
            if n >= self.nexus.config.read_error_limit {
                let why = format!("{n} read errors during rebuild, last: {reason}");
                if self.nexus.config.fault_gate.is_none() {
                    c.fault(&why);
                } else {
                    // Asked for off the copy's path: the copy moves on to another source meanwhile.
                    let (nexus, c) = (self.nexus.clone(), c.clone());
                    self.nexus.tasks.spawn(async move {
                        let _ = nexus.fault_confirmed(&c, &why, None).await;
                    });
                }
            }
        }
    }

    fn busy(&self) -> bool {
        let now = self.nexus.app_ios.load(Ordering::Relaxed);
        self.seen_ios.swap(now, Ordering::Relaxed) != now
    }
}

impl Nexus {
    pub(super) fn start_rebuild(
        self: &Arc<Self>,
        child: Arc<Child>,
        map: SegmentMap,
        kind: RebuildKind,
    ) {
        let progress = Arc::new(Progress::new(&map));
        // Stopped with the nexus, or when the child is faulted.
        let stop = self.cancel.child_token();
        let nexus = self.clone();
        tracing::info!(nexus = %self.name, child = %child.name, ?kind, bytes = progress.total_bytes, "rebuild started");
        // A copy's disk I/O is bounded as the application's is: a stalled child fails its rebuild (and a stalled
        // source is swapped) instead of holding the copy's range, and the writes there, until the disk answers.
        let config = RebuildConfig {
            io_timeout: Some(self.config.io_timeout),
            ..self.config.rebuild.clone()
        };
        let rebuilt = child.clone();
        let (p, st) = (progress.clone(), stop.clone());
        let work = async move {
            let source = Siblings {
                nexus: nexus.clone(),
                exclude: child.name.clone(),
                seen_ios: Default::default(),
            };
            let r = rebuild::run(
                &source,
                &child.device,
                &map,
                &nexus.lock,
                &config,
                &progress,
                &stop,
            )
            .await;
            let skipped = r.as_ref().map_or(0, |s| s.bytes_skipped);
            // A destination whose connection was lost and made again during the copy (its node restarted while
            // idle: no copy failed) may have lost what it took before: it is not complete.
            let r = r.map_err(|e| e.to_string()).and_then(|s| {
                if child.lost_connection() {
                    Err("the child's connection was lost during the rebuild: copies it had not flushed may be gone".to_string())
                } else {
                    Ok(s)
                }
            });
            // From the records' copy to the child turning healthy, no write runs: one would make a record for a child
            // still away on the healthy children only (this one is not yet), and the copy taken here would lack it.
            let mut quiet = None;
            // Given up if the child is faulted meanwhile (its stop fires): a write it failed may wait for the agent's
            // consent to fault another child, and a rejoin of this one (under the agent's lock) waits for this task.
            let quieted = match &r {
                Ok(_) if child.state() == ChildState::Rebuilding => {
                    tokio::select! {
                        g = nexus.lock.exclusive_all() => Some(g),
                        _ = stop.cancelled() => None,
                    }
                }
                _ => None,
            };
            let r = match r {
                Ok(_) if quieted.is_none() && child.state() == ChildState::Rebuilding => {
                    Err("the rebuild was stopped".to_string())
                }
                Ok(s) if child.state() == ChildState::Rebuilding => {
                    quiet = quieted;
                    // The child is complete: what others recorded for it, and what it recorded before it went
                    // away, is of no use any more. Dropped before it turns healthy, so no new record can be lost.
                    // Each asked within the I/O timeout: a child that never answers (its pool's journal
                    // stalled) must not hold the volume's writes here.
                    nexus.forget_missed(&child.name).await;
                    let timeout = nexus.config.io_timeout;
                    if let Ok(Ok(old)) = tokio::time::timeout(timeout, child.device.missed()).await
                    {
                        join_all(old.iter().map(|m| {
                            tokio::time::timeout(timeout, child.device.forget_missed(&m.child))
                        }))
                        .await;
                    }
                    // It holds, as the others do, what the children still away missed (the copy moved data, not
                    // records): a later nexus over it and one of them must know.
                    nexus.record_away_on(&child).await.map(|()| s)
                }
                r => r,
            };
            // The record is in the history before anyone can see the child healthy (the history's lock is held
            // across both): whoever sees the nexus Online after a rebuild finds that rebuild in its history.
            let mut history = nexus.history.lock().unwrap_or_else(|e| e.into_inner());
            let error = match r {
                Ok(_) => nexus.finish_rebuild(&child).err(),
                Err(e) => {
                    child.fault(&format!("rebuild failed: {e}"));
                    child.rebuild_done();
                    Some(e)
                }
            };
            let copied = progress.done_bytes() - skipped;
            tracing::info!(nexus = %nexus.name, child = %child.name, copied, skipped, ?error, "rebuild finished");
            history.push(RebuildRecord {
                child: child.name.clone(),
                kind,
                bytes_copied: copied,
                bytes_skipped: skipped,
                bytes_total: progress.total_bytes,
                duration: progress.elapsed(),
                finished_at: SystemTime::now(),
                error,
            });
            drop(history);
            drop(quiet);
            nexus.changed();
        };
        if !rebuilt.start_rebuild(p, st, || self.tasks.spawn(work)) {
            tracing::warn!(nexus = %self.name, child = %rebuilt.name, "faulted before its rebuild started: not rebuilt");
            self.changed();
        }
    }

    /// Keeps on `child` the records of what every child still away missed.
    async fn record_away_on(&self, child: &Arc<Child>) -> Result<(), String> {
        let records: Vec<_> = self
            .list()
            .into_iter()
            .filter(|c| c.name != child.name)
            .filter_map(|c| c.missed_record())
            .collect();
        for m in &records {
            match tokio::time::timeout(self.config.io_timeout, child.device.note_missed(m)).await {
                Ok(Ok(())) | Ok(Err(crate::block::BlockError::Unsupported)) => {}
                Ok(Err(e)) => return Err(format!("recording on it what {} missed: {e}", m.child)),
                Err(_) => return Err(format!("recording on it what {} missed timed out", m.child)),
            }
        }
        Ok(())
    }

    /// Drops the persisted record of what `name` missed from every child (it caught up or left). Best effort: a
    /// record left behind only makes a later nexus rebuild that child again.
    /// Each child is asked at once, within the I/O timeout (one that never answers leaves its record, and holds
    /// no one up).
    pub(super) async fn forget_missed(&self, name: &str) {
        let key = super::child::stable_key(name);
        let children = self.list();
        let asked =
            join_all(children.iter().map(|c| {
                tokio::time::timeout(self.config.io_timeout, c.device.forget_missed(&key))
            }))
            .await;
        for (c, r) in children.iter().zip(asked) {
            match r {
                Ok(Ok(())) | Ok(Err(crate::block::BlockError::Unsupported)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(nexus = %self.name, child = %c.name, error = %e, "cannot drop a missed-writes record")
                }
                Err(_) => {
                    tracing::warn!(nexus = %self.name, child = %c.name, "dropping a missed-writes record timed out")
                }
            }
        }
    }

    /// The latest rebuilds (at most [`HISTORY_KEPT`]), oldest first.
    pub fn rebuild_history(&self) -> Vec<RebuildRecord> {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recent
            .iter()
            .cloned()
            .collect()
    }

    /// Every rebuild this nexus finished, counted.
    pub fn rebuild_totals(&self) -> RebuildTotals {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .totals
            .clone()
    }
}
