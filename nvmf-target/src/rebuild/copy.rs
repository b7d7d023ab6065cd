//! The rebuild copy loop. Marked segments are copied in runs of neighbours up to `copy_size` bytes, aligned to it
//! (a thin destination then allocates each cluster with one write that fills it). For each run: take the
//! exclusive range lock (application writes to it wait), read it from a source, write it to the destination,
//! mark it copied, release. Up to `parallel` runs are in flight at once. Application writes to segments already
//! copied go to the destination too (the caller fans them out); writes to segments still to be copied need not
//! ([`Progress::pending`]), as the copy brings them over later. When the loop ends the destination is identical to
//! the sources. A failing source is swapped for another; a failing destination ends the rebuild.
//!
//! Segments where the source holds no data (thin replicas that were never written there) are not copied: the
//! source's allocation map, read once at the start, says which might be empty; each of those is checked again
//! under its lock (an application write may have landed since) and, if still empty, deallocated on the
//! destination instead of copied.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::block::BlockDevice;
use crate::block::range_lock::RangeLock;

use super::map::SegmentMap;

/// How often the copy loop looks again at whether the application is busy while copies are in flight.
const IDLE_POLL: Duration = Duration::from_millis(50);
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
    /// Whether the application has done I/O since the last call (the copy then runs `parallel_busy` wide).
    fn busy(&self) -> bool {
        false
    }
}

#[derive(Clone, Debug)]
pub struct RebuildConfig {
    /// Copy unit; also the granularity of the write log.
    pub segment_size: u64,
    /// Bytes per second the rebuild may copy; `None` = as fast as it can.
    pub rate_limit: Option<u64>,
    /// Largest copy: neighbouring segments are copied together up to this many bytes, aligned to it. A thin
    /// destination allocates whole clusters; a copy that fills one needs no zeroing around it.
    pub copy_size: u64,
    /// Copies in flight at once while the application is idle.
    pub parallel: usize,
    /// Copies in flight at once while the application does I/O.
    pub parallel_busy: usize,
    /// Longest one read or write of a copy may take (a nexus sets its I/O timeout): a stalled disk fails the copy
    /// (a read tries another source) instead of holding its range, and the application's writes there, until the
    /// disk answers. `None`: no limit.
    pub io_timeout: Option<Duration>,
}

impl Default for RebuildConfig {
    fn default() -> RebuildConfig {
        RebuildConfig {
            segment_size: 1 << 20,
            copy_size: 4 << 20,
            rate_limit: None,
            io_timeout: None,
            parallel: 4,
            // With the application busy, two 4 MiB copies still keep a disk busy; more only queue ahead of the
            // application's I/O on the same disks.
            parallel_busy: 2,
        }
    }
}

/// Live state of one rebuild: counters, and which segments are still to be copied.
#[derive(Debug)]
pub struct Progress {
    pub total_bytes: u64,
    done: AtomicU64,
    started: Instant,
    /// Segments not copied yet. A segment leaves it while the copy still holds its range lock.
    pending: Mutex<SegmentMap>,
}

impl Progress {
    /// A rebuild that will copy the segments `map` marks.
    pub fn new(map: &SegmentMap) -> Progress {
        Progress {
            total_bytes: map.marked_bytes(),
            done: AtomicU64::new(0),
            started: Instant::now(),
            pending: Mutex::new(map.clone()),
        }
    }

    /// Whether every segment `offset..offset+len` touches is still to be copied. A caller holding that range's
    /// lock may then leave the destination alone: the copy will bring the range over from a source after it.
    pub fn pending(&self, offset: u64, len: u64) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .covers(offset, len)
    }

    fn copied(&self, range: std::ops::Range<u64>) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear(range);
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

/// `io`, failed as a timeout past `limit`.
async fn bounded_io<T>(
    limit: Option<Duration>,
    what: &str,
    io: impl std::future::Future<Output = Result<T, crate::block::BlockError>>,
) -> Result<T, crate::block::BlockError> {
    match limit {
        Some(t) => tokio::time::timeout(t, io).await.unwrap_or_else(|_| {
            Err(crate::block::BlockError::Remote(format!(
                "{what} timed out after {t:?}"
            )))
        }),
        None => io.await,
    }
}

/// Copies one segment, swapping a failing source for another. Returns its length and whether it was copied
/// (rather than found empty on the source, when `maybe_empty`, and deallocated on the destination).
async fn copy_segment(
    source: &dyn Source,
    dst: &Arc<dyn BlockDevice>,
    range: std::ops::Range<u64>,
    lock: &RangeLock,
    maybe_empty: bool,
    progress: &Progress,
    io_timeout: Option<Duration>,
) -> Result<(u64, bool), RebuildError> {
    let len = range.end - range.start;
    let mut attempts = 0;
    loop {
        // The source is picked under the lock: a write that faulted a child while the copy waited has faulted it
        // by now, and a faulted child (which may lack that write) is never picked.
        let guard = lock.exclusive(range.clone()).await;
        let src = source.pick().ok_or(RebuildError::NoSource)?;
        // Asked within the I/O timeout, under the lock that holds the application's writes to the range: a source
        // that does not answer (its pool's metadata stalled) is read instead.
        if maybe_empty
            && let Ok(Some(r)) = bounded_io(
                io_timeout,
                "allocation map",
                src.allocated_ranges(range.start, len),
            )
            .await
            && r.is_empty()
        {
            bounded_io(io_timeout, "deallocate", dst.deallocate(range.start, len))
                .await
                .map_err(|e| RebuildError::Destination {
                    offset: range.start,
                    reason: e.to_string(),
                })?;
            progress.copied(range);
            drop(guard);
            return Ok((len, false));
        }
        let data = match bounded_io(io_timeout, "read", src.read(range.start, len)).await {
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
        bounded_io(io_timeout, "write", dst.write(range.start, data))
            .await
            .map_err(|e| RebuildError::Destination {
                offset: range.start,
                reason: e.to_string(),
            })?;
        progress.copied(range);
        drop(guard);
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
    let start = Instant::now();
    let mut segments = 0;
    let mut skipped = 0;
    // The source's allocation map, asked once; one that fails or does not answer within the I/O timeout (a large,
    // fragmented remote replica's) is asked again segment by segment, so that empty ones are still not copied (a thin
    // destination would take space for every zero).
    let (allocated, ask_each) = match source.pick() {
        Some(src) => match bounded_io(
            config.io_timeout,
            "allocation map",
            src.allocated_ranges(0, src.size_bytes()),
        )
        .await
        {
            Ok(a) => (a, false),
            Err(_) => (None, true),
        },
        None => return Err(RebuildError::NoSource),
    };
    let segment = map.segment_size();
    let mut runs = map.runs(config.copy_size).flat_map(|run| {
        // A run splits where the source's allocation changes, so empty segments are never copied.
        let empty = |r: &std::ops::Range<u64>| {
            ask_each || allocated.as_ref().is_some_and(|a| unallocated(a, r))
        };
        let mut parts: Vec<(std::ops::Range<u64>, bool)> = Vec::new();
        let mut at = run.start;
        while at < run.end {
            let seg = at..(at + segment).min(run.end);
            let e = empty(&seg);
            match parts.last_mut() {
                Some((r, last)) if *last == e => r.end = seg.end,
                _ => parts.push((seg.clone(), e)),
            }
            at = seg.end;
        }
        parts
    });
    let mut inflight = FuturesUnordered::new();
    let mut exhausted = false;
    loop {
        // The rate limit holds back new copies, never the ones in flight (they hold range locks).
        let due = config.rate_limit.filter(|r| *r > 0).map(|rate| {
            start + Duration::from_secs_f64(progress.done_bytes() as f64 / rate as f64)
        });
        let held_back = due.is_some_and(|d| d > Instant::now());
        // Application I/O goes first: while there is some, fewer copies queue ahead of it on the disks.
        let limit = if source.busy() {
            config.parallel_busy
        } else {
            config.parallel
        };
        while !held_back && !exhausted && inflight.len() < limit.max(1) {
            match runs.next() {
                Some((range, maybe_empty)) => inflight.push(copy_segment(
                    source,
                    dst,
                    range,
                    lock,
                    maybe_empty,
                    progress,
                    config.io_timeout,
                )),
                None => exhausted = true,
            }
        }
        if inflight.is_empty() && exhausted {
            break;
        }
        let wake = due
            .filter(|_| held_back)
            .unwrap_or_else(|| Instant::now() + IDLE_POLL);
        let next = tokio::select! {
            Some(r) = inflight.next() => Some(r),
            _ = tokio::time::sleep_until(wake) => None,
            _ = cancel.cancelled() => return Err(RebuildError::Cancelled),
        };
        let Some(r) = next else { continue };
        let (len, copied) = r?;
        segments += 1;
        if !copied {
            skipped += len;
        }
        progress.done.fetch_add(len, Ordering::Relaxed);
    }
    // The copies are plain writes: the destination flushes them before the rebuild counts as done (the caller
    // then drops the records of what it missed, and a volatile cache losing power must not take the copies along).
    // Bounded and cancellable as the copies are: a destination whose disk stopped answering must not hold the
    // rebuild, and the nexus's shutdown waiting for it, for as long as it stalls.
    let flushed = tokio::select! {
        r = bounded_io(config.io_timeout, "flush", dst.flush()) => r,
        _ = cancel.cancelled() => return Err(RebuildError::Cancelled),
    };
    flushed.map_err(|e| RebuildError::Destination {
        offset: 0,
        reason: format!("flush after the copy: {e}"),
    })?;
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
        let s = Fixed(sources, Default::default());
        run_with(&s, dst, map, &RebuildConfig::default()).await
    }

    /// Runs a rebuild with a fresh lock, its own progress and no cancellation.
    async fn run_with(
        source: &dyn Source,
        dst: &Arc<dyn BlockDevice>,
        map: &SegmentMap,
        cfg: &RebuildConfig,
    ) -> Result<RebuildStats, RebuildError> {
        let p = Progress::new(map);
        run(
            source,
            dst,
            map,
            &RangeLock::new(),
            cfg,
            &p,
            &CancellationToken::new(),
        )
        .await
    }

    fn mem(size: u64) -> Arc<dyn BlockDevice> {
        Arc::new(MemoryDevice::new(size, 512))
    }

    /// A source whose allocation map never comes (its pool's metadata stalled); its data reads as usual.
    struct NoMap(Arc<dyn BlockDevice>);
    #[async_trait::async_trait]
    impl BlockDevice for NoMap {
        fn block_size(&self) -> u32 {
            self.0.block_size()
        }
        fn num_blocks(&self) -> u64 {
            self.0.num_blocks()
        }
        async fn read(&self, offset: u64, len: u64) -> Result<Bytes, crate::block::BlockError> {
            self.0.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: Bytes) -> Result<(), crate::block::BlockError> {
            self.0.write(offset, data).await
        }
        async fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
        ) -> Result<(), crate::block::BlockError> {
            self.0.write_zeroes(offset, len).await
        }
        async fn deallocate(&self, offset: u64, len: u64) -> Result<(), crate::block::BlockError> {
            self.0.deallocate(offset, len).await
        }
        async fn flush(&self) -> Result<(), crate::block::BlockError> {
            self.0.flush().await
        }
        async fn allocated_ranges(
            &self,
            _offset: u64,
            _len: u64,
        ) -> Result<Option<Vec<(u64, u64)>>, crate::block::BlockError> {
            std::future::pending().await
        }
    }

    /// A source that never answers for its allocation map is copied all the same, every segment read, within the
    /// I/O timeout of each question. Before, the rebuild waited for the map for ever (holding a segment's range
    /// lock, and with it the application's writes there).
    #[tokio::test(start_paused = true)]
    async fn a_source_whose_allocation_map_never_comes_is_copied_all_the_same() {
        let size = 4 << 20;
        let src = mem(size);
        src.write(1 << 20, Bytes::from(vec![7u8; 4096]))
            .await
            .unwrap();
        let dst = mem(size);
        let map = SegmentMap::full(size, 1 << 20);
        let cfg = RebuildConfig {
            io_timeout: Some(Duration::from_secs(1)),
            ..RebuildConfig::default()
        };
        let s = Fixed(vec![Arc::new(NoMap(src.clone()))], Default::default());
        let done = tokio::time::timeout(Duration::from_secs(60), run_with(&s, &dst, &map, &cfg))
            .await
            .expect("the rebuild waited for the allocation map for ever");
        done.unwrap();
        assert_eq!(
            dst.read(0, size).await.unwrap(),
            src.read(0, size).await.unwrap()
        );
    }

    /// A destination that takes a millisecond per write and records how many were in flight at most, and how
    /// many flushes it had.
    struct Gauge {
        inner: Arc<dyn BlockDevice>,
        now: std::sync::atomic::AtomicUsize,
        max: std::sync::atomic::AtomicUsize,
        flushes: std::sync::atomic::AtomicUsize,
    }
    #[async_trait::async_trait]
    impl BlockDevice for Gauge {
        fn block_size(&self) -> u32 {
            self.inner.block_size()
        }
        fn num_blocks(&self) -> u64 {
            self.inner.num_blocks()
        }
        async fn read(&self, offset: u64, len: u64) -> Result<Bytes, crate::block::BlockError> {
            self.inner.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: Bytes) -> Result<(), crate::block::BlockError> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.inner.write(offset, data).await
        }
        async fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
        ) -> Result<(), crate::block::BlockError> {
            self.inner.write_zeroes(offset, len).await
        }
        async fn deallocate(&self, offset: u64, len: u64) -> Result<(), crate::block::BlockError> {
            self.inner.deallocate(offset, len).await
        }
        async fn flush(&self) -> Result<(), crate::block::BlockError> {
            // Only after every copy has finished.
            assert_eq!(self.now.load(Ordering::SeqCst), 0);
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A source whose application is always busy (or never).
    struct Busy(Arc<dyn BlockDevice>, bool);
    impl Source for Busy {
        fn pick(&self) -> Option<Arc<dyn BlockDevice>> {
            Some(self.0.clone())
        }
        fn failed(&self, _: &Arc<dyn BlockDevice>, _: &str) {}
        fn busy(&self) -> bool {
            self.1
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fewer_copies_run_at_once_while_the_application_is_busy() {
        let src = mem(64 << 20);
        src.write(0, Bytes::from(vec![5u8; 64 << 20]))
            .await
            .unwrap();
        for (busy, want) in [(false, 4), (true, 2)] {
            let g = Arc::new(Gauge {
                inner: mem(64 << 20),
                now: Default::default(),
                max: Default::default(),
                flushes: Default::default(),
            });
            let dst: Arc<dyn BlockDevice> = g.clone();
            let map = SegmentMap::full(64 << 20, 1 << 20);
            let cfg = RebuildConfig::default();
            assert_eq!((cfg.parallel, cfg.parallel_busy), (4, 2));
            run_with(&Busy(src.clone(), busy), &dst, &map, &cfg)
                .await
                .unwrap();
            assert_eq!(g.max.load(Ordering::SeqCst), want, "busy={busy}");
            // The copies are made durable before the rebuild counts as done.
            assert_eq!(g.flushes.load(Ordering::SeqCst), 1);
            assert_eq!(
                dst.read(0, 64 << 20).await.unwrap(),
                src.read(0, 64 << 20).await.unwrap()
            );
        }
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
        run_with(&s, &dst, &map, &RebuildConfig::default())
            .await
            .unwrap();
        assert!(dst.read(0, 4 << 20).await.unwrap().iter().all(|&b| b == 7));
    }

    /// The sources a nexus offers change while a copy waits for its range lock (a write holding it faulted one).
    struct Swappable(std::sync::Mutex<Vec<Arc<dyn BlockDevice>>>);
    impl Source for Swappable {
        fn pick(&self) -> Option<Arc<dyn BlockDevice>> {
            self.0.lock().unwrap().first().cloned()
        }
        fn failed(&self, _: &Arc<dyn BlockDevice>, _: &str) {}
    }

    #[tokio::test]
    async fn a_source_faulted_while_the_copy_waited_for_its_lock_is_not_read() {
        // `stale` missed the write that faulted it (under the lock); `current` has it.
        let stale = mem(1 << 20);
        stale
            .write(0, Bytes::from(vec![1u8; 1 << 20]))
            .await
            .unwrap();
        let current = mem(1 << 20);
        current
            .write(0, Bytes::from(vec![2u8; 1 << 20]))
            .await
            .unwrap();
        let source = Swappable(std::sync::Mutex::new(vec![stale]));
        let dst = mem(1 << 20);
        let map = SegmentMap::full(1 << 20, 1 << 20);
        let lock = RangeLock::new();
        let write = lock.exclusive(0..4096).await;
        let progress = Progress::new(&map);
        let cancel = CancellationToken::new();
        let cfg = RebuildConfig::default();
        let copy = run(&source, &dst, &map, &lock, &cfg, &progress, &cancel);
        let fault = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            *source.0.lock().unwrap() = vec![current.clone()];
            drop(write);
        };
        let (r, ()) = tokio::join!(copy, fault);
        r.unwrap();
        assert!(dst.read(0, 1 << 20).await.unwrap().iter().all(|&b| b == 2));
    }

    #[tokio::test]
    async fn a_failing_destination_ends_the_rebuild() {
        let src = mem(8 << 20);
        let dst = Arc::new(FaultDevice::new(mem(8 << 20)));
        dst.set_plan(FaultPlan {
            fail_after: Some(1),
            ..Default::default()
        });
        let dst: Arc<dyn BlockDevice> = dst;
        // Copies are 4 MiB: the first succeeds, the second fails.
        let map = SegmentMap::full(8 << 20, 1 << 20);
        let r = copy(vec![src], &dst, &map).await;
        assert!(matches!(r, Err(RebuildError::Destination { offset, .. }) if offset == 4 << 20));
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_paces_the_copy() {
        let src = mem(4 << 20);
        let dst = mem(4 << 20);
        let map = SegmentMap::full(4 << 20, 1 << 20);
        let cfg = RebuildConfig {
            segment_size: 1 << 20,
            copy_size: 1 << 20,
            rate_limit: Some(2 << 20),
            parallel: 1,
            parallel_busy: 1,
            io_timeout: None,
        };
        let s = Fixed(vec![src], Default::default());
        let stats = run_with(&s, &dst, &map, &cfg).await.unwrap();
        assert!(
            stats.duration >= Duration::from_millis(1990),
            "{:?}",
            stats.duration
        );
    }
}
