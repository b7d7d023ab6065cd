//! A nexus child: a block device (local replica or remote namespace) and its state. Healthy children take reads
//! and writes; a Rebuilding child takes writes only, until its rebuild completes; a Faulted child takes nothing.
//!
//! A child also remembers which segments it took writes to since its last flush ([`Unflushed`]): its device may
//! hold them in a volatile cache, and a child that went away (power lost, connection lost) may have lost them
//! although it acknowledged them. The write log of a faulted child starts with those segments, so a partial
//! rebuild brings them back too.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::block::{BlockDevice, MissedWrites};
use crate::rebuild::{Progress, SegmentMap};

/// Segments written while a child was faulted, so that it can catch up with a partial rebuild.
#[derive(Clone, Debug)]
pub struct WriteLog {
    pub map: SegmentMap,
    pub since: Instant,
    /// `since` as wall-clock milliseconds, for the copy kept on the other children.
    pub since_ms: u64,
    /// The segments of `map` that no record on the other children is known to name yet: those the child had not
    /// flushed when it was faulted, those a write marked whose record is still on its way, and those whose record
    /// failed. A write touching one is acknowledged only once a record names them all.
    unrecorded: SegmentMap,
}

/// Segments a child took writes to that no completed flush has covered yet. A flush covers the writes completed
/// before it started: `newer` moves into `older` when one starts, and `older` is cleared when the last flush
/// started completes.
struct Unflushed {
    older: SegmentMap,
    newer: SegmentMap,
    flushes_started: u64,
}

/// Every child in sync lost its connection since it joined (`children`, in the nexus's order): none is known to
/// hold what another may have lost, and faulting them all would stop the volume. If none had writes unflushed, none
/// lost any: all are kept. Otherwise only the first is kept: the others stay lost, to be faulted (or left out) by
/// the caller as any child whose connection was lost, each with every range any of them had not flushed added to
/// its own (whichever of them lost a write there, the kept one may differ from it there), so that their catch-up
/// from the kept one makes them agree with it. Keeping all would leave children that lost different unflushed
/// writes (one engine restarted cleanly, another lost its power) disagreeing for good: reads would return one
/// version and then the other.
pub fn keep_after_every_loss(children: &[&Arc<Child>]) {
    let Some((first, others)) = children.split_first() else {
        return;
    };
    let mut unflushed = first.unflushed_map();
    for c in others {
        unflushed.union(&c.unflushed_map());
    }
    if unflushed.count() == 0 {
        children.iter().for_each(|c| c.accept_reconnect());
        return;
    }
    tracing::warn!(child = %first.name, "every child lost its connection with writes not flushed: keeping one, the others catch up from it");
    first.accept_reconnect();
    for c in others {
        c.unflushed().newer.union(&unflushed);
    }
}

/// At a nexus's end, its `healthy` children that lost their connection since it was last used: those that had
/// writes unflushed then, which may be gone, to be faulted so that the records the others keep of them name those
/// writes (no I/O of this nexus will fault them any more, and the next one would trust them); all but one of them
/// if every child lost its connection ([`keep_after_every_loss`]). The others are kept.
pub fn lost_at_end(healthy: &[Arc<Child>]) -> Vec<Arc<Child>> {
    if !healthy.is_empty() && healthy.iter().all(|c| c.lost_connection()) {
        keep_after_every_loss(&healthy.iter().collect::<Vec<_>>());
    }
    let mut lost = Vec::new();
    for c in healthy.iter().filter(|c| c.lost_connection()) {
        if c.unflushed_map().count() == 0 {
            c.accept_reconnect();
        } else {
            lost.push(c.clone());
        }
    }
    lost
}

/// A child's identity across nexuses and nodes: its URI without scheme and host (`NQN`, plus `?nsid=N` unless
/// 1), or the name itself when it is not a URI.
pub fn stable_key(name: &str) -> String {
    let path = match name.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map_or(rest, |(_, p)| p),
        None => name,
    };
    path.strip_suffix("?nsid=1").unwrap_or(path).to_string()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildState {
    Healthy,
    Rebuilding,
    Faulted,
}

impl ChildState {
    pub fn as_str(self) -> &'static str {
        match self {
            ChildState::Healthy => "healthy",
            ChildState::Rebuilding => "rebuilding",
            ChildState::Faulted => "faulted",
        }
    }
}

/// Per-child I/O counters.
#[derive(Default, Debug)]
pub struct ChildCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_errors: AtomicU32,
    pub write_errors: AtomicU32,
}

struct Status {
    state: ChildState,
    reason: Option<String>,
    rebuild: Option<Arc<Progress>>,
    /// Kept while faulted, if the child was complete (healthy) when it went away.
    log: Option<WriteLog>,
}

pub struct Child {
    /// The URI or name the child was added with.
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
    pub counters: ChildCounters,
    status: Mutex<Status>,
    /// Device size and segment size of the write log (the size grows with the nexus).
    log_geometry: Mutex<(u64, u64)>,
    unflushed: Mutex<Unflushed>,
    /// The device's connection losses when it became this child (see [`Child::lost_connection`]).
    losses_seen: AtomicU64,
    /// Its rebuild's task, if one was started, and what stops it: a fault stops it, and a rejoin of the child
    /// waits for it to end (see [`Child::end_rebuild`]).
    rebuild_run: Mutex<(Option<CancellationToken>, Option<JoinHandle<()>>)>,
    /// When the latest command it answered successfully was sent ([`super::lease`]'s clock): its reservation was
    /// still this nexus's then.
    proof: AtomicU64,
}

/// A snapshot of a child for callers.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildInfo {
    pub name: String,
    pub state: ChildState,
    pub reason: Option<String>,
    pub rebuild_done_bytes: Option<u64>,
    pub rebuild_total_bytes: Option<u64>,
}

impl Child {
    /// `log_geometry`: (device size, segment size) of the write log kept while faulted.
    pub fn new(
        name: String,
        device: Arc<dyn BlockDevice>,
        state: ChildState,
        log_geometry: (u64, u64),
    ) -> Child {
        let (size, segment) = log_geometry;
        Child {
            name,
            losses_seen: AtomicU64::new(device.connection_losses()),
            device,
            counters: ChildCounters::default(),
            status: Mutex::new(Status {
                state,
                reason: None,
                rebuild: None,
                log: None,
            }),
            log_geometry: Mutex::new(log_geometry),
            rebuild_run: Mutex::new((None, None)),
            // Made as the nexus took its reservation, or as it joined (then answered only as it turns healthy).
            proof: AtomicU64::new(super::lease::now()),
            unflushed: Mutex::new(Unflushed {
                older: SegmentMap::empty(size, segment),
                newer: SegmentMap::empty(size, segment),
                flushes_started: 0,
            }),
        }
    }

    fn unflushed(&self) -> std::sync::MutexGuard<'_, Unflushed> {
        self.unflushed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The child took a write to `offset..offset+len`: it is unflushed until a flush started after it completes.
    pub fn note_written(&self, offset: u64, len: u64) {
        self.unflushed().newer.mark(offset, len);
    }

    /// A flush of the child starts; returns its number for [`Child::flush_done`].
    pub fn flush_started(&self) -> u64 {
        let mut u = self.unflushed();
        let u = &mut *u;
        u.older.union(&u.newer);
        u.newer.clear_all();
        u.flushes_started += 1;
        u.flushes_started
    }

    /// Flush number `n` completed: what was written before the last flush started is durable, if that was `n`.
    pub fn flush_done(&self, n: u64) {
        let mut u = self.unflushed();
        if u.flushes_started == n {
            u.older.clear_all();
        }
    }

    /// A command sent at `sent` ([`super::lease::now`]'s clock) succeeded on it.
    pub fn note_proof(&self, sent: u64) {
        self.proof.fetch_max(sent, Ordering::Relaxed);
    }

    /// When the latest command it answered successfully was sent ([`super::lease::now`]'s clock).
    pub fn proof(&self) -> u64 {
        self.proof.load(Ordering::Relaxed)
    }

    /// Whether the device lost its connection since it became this child (and came back, or I/O would fail):
    /// writes it had not flushed may be gone, so the child is not trusted with reads or as complete any more.
    pub fn lost_connection(&self) -> bool {
        self.device.connection_losses() != self.losses_seen.load(Ordering::Relaxed)
    }

    /// Keeps the child after a lost connection (see [`keep_after_every_loss`]).
    fn accept_reconnect(&self) {
        self.losses_seen
            .store(self.device.connection_losses(), Ordering::Relaxed);
    }

    /// What it took and had not flushed (not durable: gone if its connection was lost to a power cut).
    fn unflushed_map(&self) -> SegmentMap {
        let u = self.unflushed();
        let mut map = u.older.clone();
        map.union(&u.newer);
        map
    }

    fn st(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> ChildState {
        self.st().state
    }

    /// Whether a write to `offset..offset+len` must go to this child. A healthy one takes every write; a
    /// rebuilding one only those reaching segments its rebuild has copied or will not copy: a segment still to
    /// be copied gets the data from the copy, after this write (the caller holds the range lock the copy takes).
    pub fn takes_write(&self, offset: u64, len: u64) -> bool {
        let s = self.st();
        match s.state {
            ChildState::Healthy => true,
            ChildState::Rebuilding => !s.rebuild.as_ref().is_some_and(|p| p.pending(offset, len)),
            ChildState::Faulted => false,
        }
    }

    /// Faults the child; returns true if it was not faulted before.
    pub fn fault(&self, reason: &str) -> bool {
        let mut s = self.st();
        if s.state == ChildState::Faulted {
            return false;
        }
        tracing::warn!(child = %self.name, reason, "child faulted");
        // Only a child that was complete can catch up from a log; one faulted mid-rebuild needs a full copy.
        // It starts with what the child had not flushed: that may be lost with it.
        if s.state == ChildState::Healthy {
            let (size, segment) = *self.log_geometry.lock().unwrap_or_else(|e| e.into_inner());
            let mut map = SegmentMap::empty(size, segment);
            {
                let u = self.unflushed();
                map.union(&u.older);
                map.union(&u.newer);
            }
            s.log = Some(WriteLog {
                unrecorded: map.clone(),
                map,
                since: Instant::now(),
                since_ms: now_ms(),
            });
        }
        s.state = ChildState::Faulted;
        s.reason = Some(reason.to_string());
        drop(s);
        // Its rebuild, if any, stops at its next step.
        if let Some(stop) = &self.run().0 {
            stop.cancel();
        }
        true
    }

    /// Records a write the child missed (no-op unless it is faulted with a log). Returns the record to keep on the
    /// other children before the write is acknowledged, if the write touches a segment no record is known to name
    /// yet: every such segment of the log, including those of other writes whose records are still on their way or
    /// failed (a later write to a segment must not be acknowledged ahead of the record an earlier one is still
    /// waiting for). [`Child::log_recorded`] is told once it is kept.
    pub fn log_write(&self, offset: u64, len: u64) -> Option<MissedWrites> {
        let mut s = self.st();
        if s.state != ChildState::Faulted {
            return None;
        }
        let log = s.log.as_mut()?;
        if let Some(new) = log.map.mark_new(offset, len) {
            log.unrecorded.mark(new.start, new.end - new.start);
        }
        if !log.unrecorded.overlaps(offset, len) {
            return None;
        }
        Some(self.record_of(log.since_ms, &log.unrecorded))
    }

    /// The record naming the segments of `map` as missed since `since_ms`.
    fn record_of(&self, since_ms: u64, map: &SegmentMap) -> MissedWrites {
        MissedWrites {
            child: stable_key(&self.name),
            since_ms,
            ranges: map
                .runs(u64::MAX)
                .map(|r| (r.start, r.end - r.start))
                .collect(),
        }
    }

    /// The record of the segments of this faulted child's log that no kept record names yet (what it had not
    /// flushed when it was faulted, or what a failed record was to name), if there are any: made without waiting for
    /// a write there, so a clean end never leaves them unnamed.
    pub fn unrecorded(&self) -> Option<MissedWrites> {
        let s = self.st();
        if s.state != ChildState::Faulted {
            return None;
        }
        let log = s.log.as_ref()?;
        Some(self.record_of(log.since_ms, &log.unrecorded)).filter(|m| !m.ranges.is_empty())
    }

    /// The record of every segment this faulted child missed (its whole log), if it keeps one: what a child that
    /// just caught up must hold about it, as the others do.
    pub fn missed_record(&self) -> Option<MissedWrites> {
        let s = self.st();
        if s.state != ChildState::Faulted {
            return None;
        }
        let log = s.log.as_ref()?;
        Some(self.record_of(log.since_ms, &log.map))
    }

    /// The record `m` that [`Child::log_write`] returned is kept on the other children: its segments are named.
    pub fn log_recorded(&self, m: &MissedWrites) {
        let mut s = self.st();
        if let Some(log) = s.log.as_mut()
            && log.since_ms == m.since_ms
        {
            for (start, len) in &m.ranges {
                log.unrecorded.clear(*start..start + len);
            }
        }
    }

    /// The nexus grew to `size` bytes: a write log kept from now on, or kept already, covers all of it.
    pub fn grow_log(&self, size: u64) {
        let mut s = self.st();
        self.log_geometry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0 = size;
        if let Some(log) = s.log.as_mut() {
            log.map.grow(size);
            log.unrecorded.grow(size);
        }
        let mut u = self.unflushed();
        u.older.grow(size);
        u.newer.grow(size);
    }

    /// Takes the write log (the child is about to be replaced by its returning self).
    pub fn take_log(&self) -> Option<WriteLog> {
        self.st().log.take()
    }

    /// The child is rebuilt, by the task `spawn` starts, which `stop` stops. Kept together under one lock, so that
    /// [`Child::end_rebuild`] never finds the one without the other. `false`, and nothing started, if the child was
    /// faulted since it joined: a write sent to it in between (before its copy's progress existed, every range
    /// takes writes) failed there and was acknowledged without it, and no log of a child that was not complete names
    /// that write: rebuilt from the map it joined with, it would turn healthy without it.
    pub fn start_rebuild(
        &self,
        progress: Arc<Progress>,
        stop: CancellationToken,
        spawn: impl FnOnce() -> JoinHandle<()>,
    ) -> bool {
        // Under the state's lock throughout: a fault takes it first, so it finds the stop set (it takes the run's
        // lock after the state's, as here).
        let mut s = self.st();
        if s.state == ChildState::Faulted {
            return false;
        }
        s.state = ChildState::Rebuilding;
        s.reason = None;
        s.rebuild = Some(progress);
        let mut run = self.run();
        run.0 = Some(stop);
        run.1 = Some(spawn());
        true
    }

    fn run(
        &self,
    ) -> std::sync::MutexGuard<'_, (Option<CancellationToken>, Option<JoinHandle<()>>)> {
        self.rebuild_run.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops its rebuild, if one runs, and waits until the rebuild's task has ended: a faulted child's rebuild
    /// must not go on writing to the device a rejoin hands to a new one (a copy it gave up on may still land after
    /// the new rebuild copied there, and after writes since).
    pub async fn end_rebuild(&self) {
        let task = {
            let mut run = self.run();
            if let Some(stop) = run.0.take() {
                stop.cancel();
            }
            run.1.take()
        };
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// A finished rebuild makes the child healthy, unless it was faulted meanwhile.
    pub fn rebuild_done(&self) -> bool {
        let mut s = self.st();
        s.rebuild = None;
        if s.state == ChildState::Rebuilding {
            s.state = ChildState::Healthy;
            return true;
        }
        false
    }

    pub fn rebuild_progress(&self) -> Option<Arc<Progress>> {
        self.st().rebuild.clone()
    }

    pub fn info(&self) -> ChildInfo {
        let s = self.st();
        ChildInfo {
            name: self.name.clone(),
            state: s.state,
            reason: s.reason.clone(),
            rebuild_done_bytes: s.rebuild.as_ref().map(|p| p.done_bytes()),
            rebuild_total_bytes: s.rebuild.as_ref().map(|p| p.total_bytes),
        }
    }

    pub fn note_read(&self) {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
    }
    pub fn note_write(&self) {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
    }
    /// Counts a read error; returns the total so far.
    pub fn note_read_error(&self) -> u32 {
        self.counters.read_errors.fetch_add(1, Ordering::Relaxed) + 1
    }
    pub fn note_write_error(&self) {
        self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
    }
}
