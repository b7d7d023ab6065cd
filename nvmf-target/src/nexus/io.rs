//! The nexus I/O paths.
//!
//! Writes (and write zeroes, deallocate) lock their byte range exclusively, go to every child that takes writes in
//! parallel, and succeed when at least one healthy child succeeded; a child that fails or times out is faulted,
//! unless every child failed for lack of space (the volume is full: Capacity Exceeded, nobody's fault). The lock is
//! exclusive because two overlapping writes in flight at once could otherwise reach the children in different
//! orders and leave replicas that disagree; it also keeps a rebuild's copy of a segment from interleaving with
//! application writes to it. Writes to disjoint ranges still run in parallel. A rebuilding child gets only the
//! writes its rebuild has already copied past (or will not copy): the rest reach it through the copy.
//!
//! Reads go round-robin over healthy children and move on to the next one on error; a child is faulted after too
//! many read errors or one timeout. A healthy child is faulted with the fault gate's consent when there is one
//! (`gate`), the I/O waiting for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::{BoxFuture, join_all};

use crate::block::timing::{self, Stage};
use crate::block::{BlockDevice, BlockError, MissedWrites, check_range};

use super::child::{self, Child, ChildState};
use super::lease;
use super::{Nexus, NexusState};

type Op = dyn Fn(Arc<dyn BlockDevice>) -> BoxFuture<'static, Result<(), BlockError>> + Send + Sync;

impl Nexus {
    /// What I/O gets from a stopped nexus (shut down, fenced, or replaced): a path error (NVMe: ANA Inaccessible),
    /// so that the host's kernel retries it on its path to the volume's next nexus instead of failing it.
    pub(super) fn stopped_error(&self) -> BlockError {
        BlockError::Relocated(format!("nexus {} has stopped", self.name))
    }

    pub(super) fn healthy(&self) -> Vec<Arc<Child>> {
        self.list()
            .into_iter()
            .filter(|c| c.state() == ChildState::Healthy)
            .collect()
    }

    /// Sends `op` to every child that takes writes to `offset..offset+len` (all of them for a `flush`), under the
    /// range's lock, and decides from their answers: acknowledged if a healthy child took it, children that failed
    /// faulted (with consent), what absent children missed recorded on those that hold it.
    async fn fan_out(
        &self,
        offset: u64,
        len: u64,
        what: &str,
        flush: bool,
        op: &Op,
    ) -> Result<(), BlockError> {
        if self.state() == NexusState::Shutdown {
            return Err(self.stopped_error());
        }
        self.app_ios.fetch_add(1, Ordering::Relaxed);
        let sampled = timing::start(timing::Layer::Nexus);
        let _guard = if len > 0 {
            Some(self.lock.exclusive(offset..offset + len).await)
        } else {
            None
        };
        let locked = sampled.map(|t| timing::record_since(Stage::NexusLock, t));
        // Shut down while it waited: a shutdown that drained must not see a write start after it.
        if self.state() == NexusState::Shutdown {
            return Err(self.stopped_error());
        }
        let targets: Vec<Arc<Child>> = self
            .list()
            .into_iter()
            .filter(|c| c.takes_write(offset, len))
            .collect();
        if !targets.iter().any(|c| c.state() == ChildState::Healthy) {
            return Err(BlockError::Remote(format!(
                "nexus {} has no healthy child",
                self.name
            )));
        }
        // Which were healthy when it was sent: one of those that took it but is faulted by the time its answers are
        // weighed (another I/O's fault) still holds it.
        let sent_healthy: Vec<bool> = targets
            .iter()
            .map(|c| c.state() == ChildState::Healthy)
            .collect();
        // A flush covers what each child took before it started.
        let flushes: Vec<u64> = if flush {
            targets.iter().map(|c| c.flush_started()).collect()
        } else {
            Vec::new()
        };
        let timeout = self.config.io_timeout;
        // Armed before the write is sent: if this future is dropped while children have it (its connection ended and
        // the grace for commands in flight ran out), some children may hold it and others not, with nothing else to
        // tell. The guard then marks the nexus's end unclean and names the range in the write log of children that
        // are away, as an error after sending would.
        let mut torn = TornUnlessAcknowledged {
            torn: (!flush).then_some(&self.torn),
            abandoned: (!flush && len > 0).then_some((self, offset, len)),
        };
        let sent = lease::now();
        let results = join_all(targets.iter().map(|c| {
            let io = tokio::time::timeout(timeout, op(c.device.clone()));
            async move {
                let r = io.await;
                (r, locked.map(|_| Instant::now()))
            }
        }))
        .await;
        if let Some(t0) = locked {
            let done = results.iter().filter_map(|r| r.1);
            if let (Some(first), Some(last)) = (done.clone().min(), done.max()) {
                timing::record(Stage::NexusFirstChild, first - t0);
                timing::record(Stage::NexusLastChild, last - t0);
            }
        }
        let last_done = results.iter().filter_map(|r| r.1).max();
        // Until it is acknowledged: a write that fails after some child took it leaves the children differing there,
        // which makes this nexus's end unclean.
        // A child that timed out or failed otherwise may still have taken it (a command the target runs after the
        // host gave up on it, a write the disk half did): only a refusal that changes nothing counts as not taken.
        let took_any = results.iter().any(|r| match &r.0 {
            Ok(Ok(())) | Err(_) => true,
            Ok(Err(e)) => !e.changed_nothing(),
        });
        if !took_any {
            torn.torn = None;
        }
        let results: Vec<_> = results.into_iter().map(|r| r.0).collect();
        let mut healthy_ok = 0;
        // Children not in sync (rebuilding) that took it.
        let mut others_ok: Vec<&Arc<Child>> = Vec::new();
        let mut holders: Vec<Arc<Child>> = Vec::new();
        let mut faulted_holder = false;
        let mut failed: Vec<(&Arc<Child>, String, BlockError)> = Vec::new();
        // A child that lost its connection is trusted no more, unless every child in sync when the write was sent
        // did (see `accept_reconnect`), those whose write failed included: one that failed this write without
        // losing its connection still holds the earlier writes the others may have lost.
        let answered: Vec<&Arc<Child>> = targets
            .iter()
            .zip(&results)
            .filter(|(_, r)| matches!(r, Ok(Ok(()))))
            .map(|(c, _)| c)
            .collect();
        let in_sync_all_lost = targets
            .iter()
            .zip(&sent_healthy)
            .filter(|(_, h)| **h)
            .all(|(c, _)| c.lost_connection());
        // Of them, one healthy when it was sent and still is is the one kept (a rebuilding child is no copy to keep).
        let in_sync_answered: Vec<&Arc<Child>> = targets
            .iter()
            .zip(&results)
            .zip(&sent_healthy)
            .filter(|((c, r), h)| {
                **h && matches!(r, Ok(Ok(()))) && c.state() == ChildState::Healthy
            })
            .map(|((c, _), _)| c)
            .collect();
        if !in_sync_answered.is_empty()
            && in_sync_all_lost
            && answered.iter().all(|c| c.lost_connection())
        {
            tracing::warn!(nexus = %self.name, "every child lost its connection");
            child::keep_after_every_loss(&in_sync_answered);
        }
        for (i, (c, r)) in targets.iter().zip(results).enumerate() {
            match r {
                // Its connection was lost and made again since it joined: what it had not flushed may be gone.
                Ok(Ok(())) if c.lost_connection() => failed.push((
                    c,
                    format!(
                        "{what} after the child's connection was lost: unflushed writes may be gone"
                    ),
                    BlockError::Remote("connection lost".into()),
                )),
                Ok(Ok(())) => {
                    if flush {
                        c.flush_done(flushes[i]);
                    } else {
                        c.note_written(offset, len);
                    }
                    c.note_write();
                    c.note_proof(sent);
                    if c.state() == ChildState::Healthy {
                        healthy_ok += 1;
                        holders.push(c.clone());
                    } else {
                        faulted_holder |= sent_healthy[i];
                        others_ok.push(c);
                    }
                }
                Ok(Err(e)) => failed.push((c, format!("{what} failed: {e}"), e)),
                Err(_) => failed.push((
                    c,
                    format!("{what} timed out after {timeout:?}"),
                    BlockError::Remote(format!("{what} timed out")),
                )),
            }
        }
        // A child refused for a reservation conflict: a newer nexus of the volume preempted this one. It stops at
        // once (every later I/O fails), so that at most one nexus writes; no child is at fault. The host gets a path
        // error, never the conflict (which the Linux host fails to the application): its I/O goes to the new nexus.
        if failed
            .iter()
            .any(|f| matches!(f.2, BlockError::ReservationConflict))
        {
            return Err(self.fenced());
        }
        // Every healthy child out of space: the volume is full, no replica is at fault. The host gets Capacity
        // Exceeded. A child not in sync (rebuilding, past the copy there) that took the write anyway now holds what
        // the others refused, and one that failed otherwise may hold anything: both are faulted (rebuilt again
        // later) rather than brought online differing from the others.
        let mut healthy_failed = failed.iter().filter(|f| f.0.state() == ChildState::Healthy);
        if healthy_ok == 0
            && failed.iter().any(|f| f.0.state() == ChildState::Healthy)
            && healthy_failed.all(|f| matches!(f.2, BlockError::NoSpace))
        {
            let diverged = others_ok.into_iter().chain(
                failed
                    .iter()
                    .filter(|f| {
                        f.0.state() != ChildState::Healthy && !matches!(f.2, BlockError::NoSpace)
                    })
                    .map(|f| f.0),
            );
            for c in diverged {
                if c.fault("a write every healthy child refused for lack of space reached it") {
                    self.changed();
                }
            }
            // The children that took it are faulted: the healthy ones agree (unless one that took it was faulted
            // before this write was weighed, whose log does not name the range).
            if !faulted_holder {
                torn.torn = None;
            }
            return Err(BlockError::NoSpace);
        }
        let mut last_err = None;
        // Every child that took it faulted by other I/Os (before its answers were weighed, or while it waited for
        // consent): it fails, and the healthy children that failed it are kept (they are what the volume goes on
        // with; faulting the last of them would leave none holding every acknowledged write).
        let mut orphaned = healthy_ok == 0 && faulted_holder;
        for (c, reason, e) in failed {
            c.note_write_error();
            if orphaned && c.state() == ChildState::Healthy {
                // Kept.
            } else if orphaned {
                // Not in sync anyway (rebuilding): the write may still land there, past its copy.
                if c.fault(&reason) {
                    self.changed();
                }
            } else if healthy_ok > 0 {
                // The write is acknowledged without this child: only with the gate's consent.
                orphaned = !self.fault_confirmed(c, &reason, Some(&holders)).await?;
            } else {
                // Not acknowledged: faulted without asking if it is the last healthy child (or not healthy);
                // asked if another one is (turned healthy meanwhile, a rebuild finishing), which goes on without it.
                self.fault_confirmed(c, &reason, None).await?;
            }
            last_err = Some(e);
        }
        if healthy_ok > 0 {
            holders.retain(|h| h.state() == ChildState::Healthy);
            orphaned |= holders.is_empty();
        }
        if orphaned {
            // The write fails, and the children kept did not take it: a child rebuilding past its range that took it
            // would join them differing there (its copy does not come back to that range), so it is rebuilt again.
            for c in &others_ok {
                if c.fault("it took a write that failed: the children kept do not hold it") {
                    self.changed();
                }
            }
        }
        // Children that are away (including any this write just faulted) remember the range for a partial rebuild,
        // kept by the healthy children that took it, or by those the volume goes on with if it fails.
        if len > 0 {
            torn.abandoned = None;
            let logged: Vec<(Arc<Child>, MissedWrites)> = self
                .list()
                .into_iter()
                .filter_map(|c| c.log_write(offset, len).map(|m| (c, m)))
                .collect();
            let new: Vec<MissedWrites> = logged.iter().map(|(_, m)| m.clone()).collect();
            if !new.is_empty() && healthy_ok > 0 {
                let keepers = if orphaned { self.healthy() } else { holders };
                match persist_missed(&keepers, &new, self.config.io_timeout).await {
                    Err(BlockError::ReservationConflict) => return Err(self.fenced()),
                    r => r?,
                }
                for (c, m) in &logged {
                    c.log_recorded(m);
                }
            }
        }
        if let Some(t) = last_done {
            timing::record_since(Stage::NexusFinish, t);
        }
        if orphaned {
            return Err(BlockError::Relocated(format!(
                "nexus {}: every child that took the {what} was faulted meanwhile",
                self.name
            )));
        }
        if healthy_ok > 0 {
            torn.torn = None;
            Ok(())
        } else {
            Err(last_err.unwrap_or_else(|| {
                BlockError::Remote(format!("nexus {} has no healthy child", self.name))
            }))
        }
    }
}

impl Nexus {
    /// A newer nexus of the volume preempted this one: it stops (once), every later I/O fails, and the engine is
    /// told. The error for the I/O that found it.
    pub(super) fn fenced(&self) -> BlockError {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            tracing::error!(nexus = %self.name, "fenced by a newer nexus of the volume: this one stops");
            if let Some(f) = &self.config.on_fenced {
                f.fenced();
            }
        }
        self.stopped_error()
    }
}

/// Marks the nexus torn when dropped still holding its flag: a write that some child took (or may have taken: one
/// dropped while its children had it) ended without being acknowledged (an error, a shutdown while it waited, or
/// its caller gone). Dropped still holding `abandoned` (before the write's range was logged for the children that
/// are away), it logs it: they may have missed a write the others took.
struct TornUnlessAcknowledged<'a> {
    torn: Option<&'a std::sync::atomic::AtomicBool>,
    abandoned: Option<(&'a Nexus, u64, u64)>,
}

impl Drop for TornUnlessAcknowledged<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.torn {
            t.store(true, Ordering::Release);
        }
        if let Some((n, offset, len)) = self.abandoned {
            // Kept in memory for a rejoin in this nexus's life; recorded on the other children with the next
            // write that a child away misses (the end is unclean anyway: the next nexus resyncs).
            for c in n.list() {
                let _ = c.log_write(offset, len);
            }
        }
    }
}

/// Keeps what absent children missed on the children that hold the data, before the write is acknowledged, so a
/// restarted or replacement nexus can still give them a partial rebuild. Children that cannot keep it (memory
/// devices) are skipped; if every one that could failed, the write fails rather than leave the log incomplete. A
/// holder that does not answer within `timeout` (its pool's journal stalled) counts as failed: the write, and its
/// range, never wait on it longer than on a child's I/O.
pub(super) async fn persist_missed(
    holders: &[Arc<Child>],
    new: &[MissedWrites],
    timeout: std::time::Duration,
) -> Result<(), BlockError> {
    for m in new {
        let results = join_all(holders.iter().map(|h| async move {
            tokio::time::timeout(timeout, h.device.note_missed(m))
                .await
                .unwrap_or_else(|_| {
                    Err(BlockError::Remote(format!(
                        "recording what a child missed timed out after {timeout:?}"
                    )))
                })
        }))
        .await;
        let kept = results.iter().filter(|r| r.is_ok()).count();
        let failures: Vec<&BlockError> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .filter(|e| !matches!(e, BlockError::Unsupported))
            .collect();
        // A holder that refused for a reservation conflict: a newer nexus took the volume over.
        if failures
            .iter()
            .any(|e| matches!(e, BlockError::ReservationConflict))
        {
            return Err(BlockError::ReservationConflict);
        }
        if kept == 0 && !failures.is_empty() {
            return Err(BlockError::Remote(format!(
                "cannot record the writes {} missed: {}",
                m.child, failures[0]
            )));
        }
    }
    Ok(())
}

#[async_trait]
impl BlockDevice for Nexus {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        if self.state() == NexusState::Shutdown {
            return Err(self.stopped_error());
        }
        self.app_ios.fetch_add(1, Ordering::Relaxed);
        let mut last_err = None;
        // Each healthy child gets a chance; faulted ones drop out of the list.
        for _ in 0..self.list().len().max(1) * 2 {
            let healthy = self.healthy();
            if healthy.is_empty() {
                break;
            }
            let c = &healthy[self.next_read.fetch_add(1, Ordering::Relaxed) % healthy.len()];
            if c.lost_connection() {
                if healthy.iter().all(|h| h.lost_connection()) {
                    tracing::warn!(nexus = %self.name, "every child lost its connection");
                    child::keep_after_every_loss(&healthy.iter().collect::<Vec<_>>());
                    continue;
                } else {
                    let why = "its connection was lost: unflushed writes may be gone";
                    self.fault_confirmed(c, why, None).await?;
                    continue;
                }
            }
            let sent = lease::now();
            match tokio::time::timeout(self.config.io_timeout, c.device.read(offset, len)).await {
                Ok(Ok(d)) => {
                    c.note_read();
                    c.note_proof(sent);
                    // Served only under the read lease (a newer nexus may have fenced the others meanwhile).
                    self.confirm_lease().await?;
                    return Ok(d);
                }
                // Replicas are reserved Exclusive Access: a newer nexus took them, and what this one would read
                // may be older than what that one wrote since.
                Ok(Err(BlockError::ReservationConflict)) => return Err(self.fenced()),
                Ok(Err(e)) => {
                    let n = c.note_read_error();
                    if n >= self.config.read_error_limit {
                        self.fault_confirmed(c, &format!("{n} read errors, last: {e}"), None)
                            .await?;
                    }
                    last_err = Some(e);
                }
                Err(_) => {
                    c.note_read_error();
                    let why = format!("read timed out after {:?}", self.config.io_timeout);
                    self.fault_confirmed(c, &why, None).await?;
                }
            }
        }
        Err(last_err.unwrap_or_else(|| {
            BlockError::Remote(format!("nexus {} has no healthy child", self.name))
        }))
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        let len = data.len() as u64;
        check_range(offset, len, self.block_size, self.size_bytes())?;
        let op = move |d: Arc<dyn BlockDevice>| -> BoxFuture<'static, _> {
            let data = data.clone();
            Box::pin(async move { d.write(offset, data).await })
        };
        self.fan_out(offset, len, "write", false, &op).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        let op = move |d: Arc<dyn BlockDevice>| -> BoxFuture<'static, _> {
            Box::pin(async move { d.write_zeroes(offset, len).await })
        };
        self.fan_out(offset, len, "write zeroes", false, &op).await
    }

    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        let op = move |d: Arc<dyn BlockDevice>| -> BoxFuture<'static, _> {
            Box::pin(async move { d.deallocate(offset, len).await })
        };
        self.fan_out(offset, len, "deallocate", false, &op).await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        let op = |d: Arc<dyn BlockDevice>| -> BoxFuture<'static, _> {
            Box::pin(async move { d.flush().await })
        };
        self.fan_out(0, 0, "flush", true, &op).await
    }
}
