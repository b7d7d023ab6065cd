//! The rebuild copy loop. For each marked segment: take the exclusive range lock (application writes to that
//! segment wait), read it from a source, write it to the destination, release. Up to `parallel` segments are in
//! flight at once, so the copy is not bound by one round trip per segment. Writes that arrive meanwhile for
//! other segments go to the destination too (the caller fans them out), so when the loop ends the destination is
//! identical to the sources. A failing source is swapped for another; a failing destination ends the rebuild.
//!
//! Segments where the source holds no data (thin replicas that were never written there) are not copied: the
//! source's allocation map, read once at the start, says which might be empty; each of those is checked again
//! under its lock (an application write may have landed since) and, if still empty, deallocated on the
//! destination instead of copied.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::block::BlockDevice;
use crate::block::range_lock::RangeLock;

use super::map::SegmentMap;

/// How many times one segment may fail on a source before the rebuild gives up.
const SOURCE_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("no healthy source left to copy from")]
    NoSource,
    #[error("reading the source at {offset}: {reason}")]
    Source { offset: u64, reason: String },
    #[error("writing the destination at {offset}: {reason}")]
    Destination { offset: u64, reason: String },
    #[error("cancelled")]
    Cancelled,
}

/// Picks a source for the next segment (a healthy child, round robin); `None` when none is left.
pub trait Source: Send + Sync {
    fn pick(&self) -> Option<Arc<dyn BlockDevice>>;
    /// The picked source failed; the caller decides whether it stays a source.
    fn failed(&self, source: &Arc<dyn BlockDevice>, reason: &str);
}

#[derive(Clone, Debug)]
pub struct RebuildConfig {
    /// Copy unit; also the granularity of the write log.
    pub segment_size: u64,
    /// Bytes per second the rebuild may copy; `None` = as fast as it can.
    pub rate_limit: Option<u64>,
    /// Segments copied at once.
    pub parallel: usize,
}

impl Default for RebuildConfig {
    fn default() -> RebuildConfig {
        RebuildConfig {
            segment_size: 1 << 20,
            rate_limit: None,
            parallel: 4,
        }
    }
}

/// Live counters of one rebuild.
#[derive(Debug)]
pub struct Progress {
    pub total_bytes: u64,
    done: AtomicU64,
    started: Instant,
}

impl Progress {
    pub fn new(total_bytes: u64) -> Progress {
        Progress {
            total_bytes,
            done: AtomicU64::new(0),
            started: Instant::now(),
        }
    }
    pub fn done_bytes(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
    /// Bytes per second so far.
    pub fn rate(&self) -> f64 {
        self.done_bytes() as f64 / self.elapsed().as_secs_f64().max(1e-9)
    }
}

/// What a finished rebuild did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuildStats {
    pub bytes_copied: u64,
    /// Bytes of segments that held no data on the source and were deallocated instead of copied.
    pub bytes_skipped: u64,
    pub segments: u64,
    pub duration: Duration,
}

/// Whether a segment overlaps none of the (merged, ordered) allocated ranges.
fn unallocated(allocated: &[(u64, u64)], range: &std::ops::Range<u64>) -> bool {
    !allocated
        .iter()
        .any(|(s, n)| *s < range.end && s + n > range.start)
}

/// Copies one segment, swapping a failing source for another. Returns its length and whether it was copied
/// (rather than found empty on the source, when `maybe_empty`, and deallocated on the destination).
async fn copy_segment(
    source: &dyn Source,
    dst: &Arc<dyn BlockDevice>,
    range: std::ops::Range<u64>,
    lock: &RangeLock,
    maybe_empty: bool,
) -> Result<(u64, bool), RebuildError> {
    let len = range.end - range.start;
    let mut attempts = 0;
    loop {
        let src = source.pick().ok_or(RebuildError::NoSource)?;
        let guard = lock.exclusive(range.clone()).await;
        if maybe_empty
            && let Ok(Some(r)) = src.allocated_ranges(range.start, len).await
            && r.is_empty()
        {
            dst.deallocate(range.start, len)
                .await
                .map_err(|e| RebuildError::Destination {
                    offset: range.start,
                    reason: e.to_string(),
                })?;
            return Ok((len, false));
        }
        let data = match src.read(range.start, len).await {
            Ok(d) => d,
            Err(e) => {
                drop(guard);
                source.failed(&src, &e.to_string());
                attempts += 1;
                if attempts >= SOURCE_ATTEMPTS {
                    return Err(RebuildError::Source {
                        offset: range.start,
                        reason: e.to_string(),
                    });
                }
                continue;
            }
        };
        dst.write(range.start, data)
            .await
            .map_err(|e| RebuildError::Destination {
                offset: range.start,
                reason: e.to_string(),
            })?;
        return Ok((len, true));
    }
}

/// Copies every segment marked in `map` from `source` to `dst`.
pub async fn run(
    source: &dyn Source,
    dst: &Arc<dyn BlockDevice>,
    map: &SegmentMap,
    lock: &RangeLock,
    config: &RebuildConfig,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<RebuildStats, RebuildError> {
    use futures_util::StreamExt;
    let start = Instant::now();
    let mut segments = 0;
    let mut skipped = 0;
    let allocated = match source.pick() {
        Some(src) => src
            .allocated_ranges(0, src.size_bytes())
            .await
            .ok()
            .flatten(),
        None => return Err(RebuildError::NoSource),
    };
    let mut copies = futures_util::stream::iter(map.ranges())
        .map(|range| {
            let maybe_empty = allocated.as_ref().is_some_and(|a| unallocated(a, &range));
            copy_segment(source, dst, range, lock, maybe_empty)
        })
        .buffer_unordered(config.parallel.max(1));
    loop {
        let next = tokio::select! {
            n = copies.next() => n,
            _ = cancel.cancelled() => return Err(RebuildError::Cancelled),
        };
        let Some(r) = next else { break };
        let (len, copied) = r?;
        segments += 1;
        if !copied {
            skipped += len;
        }
        let done = progress.done.fetch_add(len, Ordering::Relaxed) + len;
        if let Some(rate) = config.rate_limit.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            let elapsed = start.elapsed();
            if due > elapsed {
                tokio::select! {
                    _ = tokio::time::sleep(due - elapsed) => {}
                    _ = cancel.cancelled() => return Err(RebuildError::Cancelled),
                }
            }
        }
    }
    Ok(RebuildStats {
        bytes_copied: progress.done_bytes() - skipped,
        bytes_skipped: skipped,
        segments,
        duration: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::block::fault::{FaultDevice, FaultPlan};
    use crate::block::memory::MemoryDevice;

    struct Fixed(Vec<Arc<dyn BlockDevice>>, std::sync::Mutex<usize>);
    impl Source for Fixed {
        fn pick(&self) -> Option<Arc<dyn BlockDevice>> {
            let mut i = self.1.lock().unwrap();
            *i += 1;
            self.0.get(*i % self.0.len()).cloned()
        }
        fn failed(&self, _: &Arc<dyn BlockDevice>, _: &str) {}
    }

    /// Runs a rebuild with the default config, a fresh lock and no cancellation.
    async fn copy(
        sources: Vec<Arc<dyn BlockDevice>>,
        dst: &Arc<dyn BlockDevice>,
        map: &SegmentMap,
    ) -> Result<RebuildStats, RebuildError> {
        let p = Progress::new(map.marked_bytes());
        let s = Fixed(sources, Default::default());
        run(
            &s,
            dst,
            map,
            &RangeLock::new(),
            &RebuildConfig::default(),
            &p,
            &CancellationToken::new(),
        )
        .await
    }

    fn mem(size: u64) -> Arc<dyn BlockDevice> {
        Arc::new(MemoryDevice::new(size, 512))
    }

    #[tokio::test]
    async fn segments_never_written_on_the_source_are_deallocated_not_copied() {
        let src = mem(8 << 20);
        src.write(5 << 20, Bytes::from(vec![7u8; 4096]))
            .await
            .unwrap();
        // A stale destination: its old data must not survive where the source has none.
        let dst = mem(8 << 20);
        dst.write(0, Bytes::from(vec![9u8; 8 << 20])).await.unwrap();
        let stats = copy(vec![src.clone()], &dst, &SegmentMap::full(8 << 20, 1 << 20))
            .await
            .unwrap();
        assert_eq!(
            (stats.bytes_copied, stats.bytes_skipped),
            (1 << 20, 7 << 20)
        );
        assert_eq!(
            dst.read(0, 8 << 20).await.unwrap(),
            src.read(0, 8 << 20).await.unwrap()
        );
    }

    #[tokio::test]
    async fn copies_only_marked_segments() {
        let src = mem(8 << 20);
        src.write(0, Bytes::from(vec![1u8; 8 << 20])).await.unwrap();
        let dst = mem(8 << 20);
        let mut map = SegmentMap::empty(8 << 20, 1 << 20);
        map.mark(3 << 20, 10);
        let stats = copy(vec![src], &dst, &map).await.unwrap();
        assert_eq!((stats.bytes_copied, stats.segments), (1 << 20, 1));
        assert!(
            dst.read(3 << 20, 1 << 20)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 1)
        );
        assert!(dst.read(0, 1 << 20).await.unwrap().iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn a_failing_source_is_replaced() {
        let good = mem(4 << 20);
        good.write(0, Bytes::from(vec![7u8; 4 << 20]))
            .await
            .unwrap();
        let bad = Arc::new(FaultDevice::new(mem(4 << 20)));
        bad.set_plan(FaultPlan {
            fail_after: Some(0),
            reads_too: true,
            ..Default::default()
        });
        let dst = mem(4 << 20);
        let map = SegmentMap::full(4 << 20, 1 << 20);
        let s = Fixed(vec![good, bad], Default::default());
        let p = Progress::new(map.marked_bytes());
        run(
            &s,
            &dst,
            &map,
            &RangeLock::new(),
            &RebuildConfig::default(),
            &p,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(dst.read(0, 4 << 20).await.unwrap().iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn a_failing_destination_ends_the_rebuild() {
        let src = mem(4 << 20);
        let dst = Arc::new(FaultDevice::new(mem(4 << 20)));
        dst.set_plan(FaultPlan {
            fail_after: Some(1),
            ..Default::default()
        });
        let dst: Arc<dyn BlockDevice> = dst;
        let map = SegmentMap::full(4 << 20, 1 << 20);
        let r = copy(vec![src], &dst, &map).await;
        assert!(matches!(r, Err(RebuildError::Destination { offset, .. }) if offset == 1 << 20));
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_paces_the_copy() {
        let src = mem(4 << 20);
        let dst = mem(4 << 20);
        let map = SegmentMap::full(4 << 20, 1 << 20);
        let p = Progress::new(map.marked_bytes());
        let cfg = RebuildConfig {
            segment_size: 1 << 20,
            rate_limit: Some(2 << 20),
            parallel: 1,
        };
        let s = Fixed(vec![src], Default::default());
        let stats = run(
            &s,
            &dst,
            &map,
            &RangeLock::new(),
            &cfg,
            &p,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(
            stats.duration >= Duration::from_millis(1990),
            "{:?}",
            stats.duration
        );
    }
}
