//! A remote namespace as a [`BlockDevice`]. I/O is spread round-robin over the controller's I/O queues and split at
//! the controller's maximum transfer size. A supervisor task watches the controller; when it fails, I/O waits (up
//! to `reconnect_wait`) while the supervisor reconnects with exponential backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::block::{BlockDevice, BlockError, MissedWrites, check_range};
use crate::protocol::command::{Sgl, Sqe, io};
use crate::protocol::status::Status;
use crate::protocol::vendor::{self, AllocatedAnswer, AllocatedQuery};

use super::controller::Controller;
use super::{ConnectOptions, InitiatorError};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Commands moving at least this many bytes go to the bulk queue (see [`pick_queue`]).
const BULK_BYTES: u32 = 256 << 10;
/// Blocks per Write Zeroes / Dataset Management range.
const MAX_ZERO_BLOCKS: u64 = 1 << 16;

struct Shared {
    opts: ConnectOptions,
    nsid: u32,
    current: watch::Sender<Option<Arc<Controller>>>,
    next_queue: AtomicUsize,
    stop: CancellationToken,
    /// Controllers lost (each then reconnected, or tried to).
    losses: AtomicU64,
    /// The key of the reservation taken again through each reconnected controller (0: none).
    hold_key: AtomicU64,
    /// Taking it again found the key no longer this host's ([`super::reservation::HeldAgain::Fenced`]): I/O is
    /// refused with a reservation conflict here, whatever the target would let through, until a reservation is
    /// acquired again.
    fenced: std::sync::atomic::AtomicBool,
    /// Cancelled when the supervisor has returned.
    supervisor_done: CancellationToken,
}

impl Shared {
    /// Counts `c`'s failure as one loss, if it failed and no one counted it yet.
    fn count_loss(&self, c: &Controller) {
        if c.take_loss() {
            self.losses.fetch_add(1, Ordering::AcqRel);
        }
    }
}

pub struct RemoteNamespace {
    shared: Arc<Shared>,
    block_size: u32,
    /// Grows when the target grew the namespace and [`BlockDevice::rescan`] saw it.
    num_blocks: AtomicU64,
    max_transfer: u64,
    /// How long I/O waits for a reconnect before failing.
    pub reconnect_wait: Duration,
}

fn vendor_error(e: vendor::VendorError) -> BlockError {
    BlockError::Remote(e.to_string())
}

/// The block error for a failed command: the one mapping from NVMe statuses back to [`BlockError`] (the target's
/// `map_error` is its inverse).
fn to_block(e: InitiatorError) -> BlockError {
    match e {
        InitiatorError::Status(s) if s.is(Status::LBA_OUT_OF_RANGE) => BlockError::OutOfRange {
            offset: 0,
            len: 0,
            size: 0,
        },
        InitiatorError::Status(s) if s.is(Status::CAPACITY_EXCEEDED) => BlockError::NoSpace,
        InitiatorError::Status(s) if s.is(Status::NAMESPACE_WRITE_PROTECTED) => {
            BlockError::ReadOnly
        }
        InitiatorError::Status(s) if s.is(Status::INVALID_OPCODE) => BlockError::Unsupported,
        InitiatorError::Status(s) if s.is(Status::RESERVATION_CONFLICT) => {
            BlockError::ReservationConflict
        }
        other => BlockError::Remote(other.to_string()),
    }
}

impl RemoteNamespace {
    /// Connects and identifies namespace `nsid` (0 = the first active one).
    pub async fn connect(
        opts: ConnectOptions,
        nsid: u32,
    ) -> Result<RemoteNamespace, InitiatorError> {
        let ctrl = Controller::connect(&opts).await?;
        if ctrl.io_queues().is_empty() {
            return Err(InitiatorError::Protocol(
                "controller granted no I/O queues".into(),
            ));
        }
        let nsid = if nsid == 0 {
            *ctrl
                .active_namespaces()
                .await?
                .first()
                .ok_or_else(|| InitiatorError::Protocol("no namespaces".into()))?
        } else {
            nsid
        };
        let ns = ctrl.identify_namespace(nsid).await?;
        if ns.nsze == 0 || !(9..=16).contains(&ns.lbads) {
            return Err(InitiatorError::Protocol(format!(
                "namespace {nsid} is not usable ({ns:?})"
            )));
        }
        let max_transfer = max_transfer_of(ctrl.data.mdts, 1 << ns.lbads);
        let (current, _) = watch::channel(Some(Arc::new(ctrl)));
        let shared = Arc::new(Shared {
            opts,
            nsid,
            current,
            next_queue: AtomicUsize::new(0),
            losses: AtomicU64::new(0),
            hold_key: AtomicU64::new(0),
            fenced: Default::default(),
            supervisor_done: CancellationToken::new(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(supervise(shared.clone()));
        Ok(RemoteNamespace {
            shared,
            block_size: 1 << ns.lbads,
            num_blocks: AtomicU64::new(ns.nsze),
            max_transfer,
            reconnect_wait: Duration::from_secs(10),
        })
    }

    pub fn nsid(&self) -> u32 {
        self.shared.nsid
    }

    /// From now on, each reconnected controller first takes the [`super::reservation::REPLICA_RESERVATION`] again
    /// under `key` (this host holds it already: nothing changes but the target's fence), before it serves I/O. The target then
    /// waits for the writes it admitted from the lost controller, and on a single-path subsystem (a replica's) ends
    /// that controller, so that none of its writes still on the way lands after the new controller's. Preempted
    /// meanwhile (the key refused), the namespace is fenced: its I/O gets a reservation conflict here, even where the
    /// target would let it through (another nexus of the same host identifier re-keyed the registration).
    pub fn hold_reservation(&self, key: u64) {
        self.shared.hold_key.store(key, Ordering::Release);
    }

    /// A reservation was acquired: I/O is no longer refused as fenced.
    pub(super) fn unfence(&self) {
        self.shared.fenced.store(false, Ordering::Release);
    }

    /// Largest I/O sent as one command.
    pub fn max_transfer(&self) -> u64 {
        self.max_transfer
    }

    /// Whether a live controller is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared
            .current
            .borrow()
            .as_ref()
            .is_some_and(|c| !c.is_failed())
    }

    /// Disconnects and stops reconnecting. Returns once the supervisor has returned: a reconnect under way has
    /// ended, its controller shut down unused, and what it asked the target (taking the reservation again) done.
    pub async fn close(&self) {
        self.shared.stop.cancel();
        let c = self.shared.current.send_replace(None);
        if let Some(c) = c {
            let _ = c.shutdown().await;
        }
        self.shared.supervisor_done.cancelled().await;
    }

    async fn controller(&self) -> Result<Arc<Controller>, BlockError> {
        let mut rx = self.shared.current.subscribe();
        let ready = |c: &Option<Arc<Controller>>| c.as_ref().is_some_and(|c| !c.is_failed());
        if let Some(c) = rx.borrow().as_ref().filter(|c| !c.is_failed()) {
            return Ok(c.clone());
        }
        if self.shared.stop.is_cancelled() {
            return Err(BlockError::Closed);
        }
        match tokio::time::timeout(self.reconnect_wait, rx.wait_for(ready)).await {
            Ok(Ok(c)) => c.clone().ok_or(BlockError::Closed),
            _ => Err(BlockError::Remote("not connected".into())),
        }
    }

    /// Sends a command on the next I/O queue. A command lost with its connection is sent again on the reconnected
    /// controller (as the Linux host retries path errors), until `reconnect_wait` runs out.
    pub(super) async fn submit(&self, sqe: Sqe, data: Option<Bytes>) -> Result<Bytes, BlockError> {
        let deadline = tokio::time::Instant::now() + self.reconnect_wait;
        loop {
            let c = self.controller().await?;
            // Checked once the controller is in hand: the supervisor marks the namespace fenced before it publishes
            // the controller that found the key refused.
            if self.shared.fenced.load(Ordering::Acquire) && !io::is_reservation(sqe.opcode()) {
                return Err(BlockError::ReservationConflict);
            }
            let qs = c.io_queues();
            let q = &qs[self.pick_queue(qs.len(), sqe.sgl().length)];
            match q.submit(sqe, data.clone()).await {
                Ok(done) => return Ok(done.data),
                Err(InitiatorError::Disconnected | InitiatorError::Timeout)
                    if tokio::time::Instant::now() < deadline
                        && !self.shared.stop.is_cancelled() =>
                {
                    c.failed().cancel();
                }
                Err(e) => return Err(to_block(e)),
            }
        }
    }

    fn pick_queue(&self, queues: usize, bytes: u32) -> usize {
        pick_queue(
            &self.shared.next_queue,
            queues,
            bytes,
            crate::io_threads::current(),
        )
    }

    fn lba(&self, offset: u64) -> u64 {
        offset / u64::from(self.block_size)
    }

    /// Splits a request into pieces of at most the target's transfer size: (offset, length).
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(len.div_ceil(self.max_transfer.max(1)) as usize);
        let mut done = 0;
        while done < len {
            let n = self.max_transfer.min(len - done);
            out.push((offset + done, n));
            done += n;
        }
        out
    }
}

/// The most one command moves for a target whose MDTS is `mdts` (in 4 KiB pages; 0: no limit, 1 MiB used): at most
/// 8 MiB, a whole number of `block_size` blocks, and at least one block, whatever the target says (an MDTS of 52 or
/// more wrapped the shift to 0, and the split of every I/O into pieces never ended).
fn max_transfer_of(mdts: u8, block_size: u64) -> u64 {
    const MOST: u64 = 8 << 20;
    let t = match mdts {
        0 => 1 << 20,
        m if m >= 11 => MOST,
        m => (4096u64 << m).min(MOST),
    };
    (t / block_size * block_size).max(block_size)
}

async fn supervise(shared: Arc<Shared>) {
    let _done = shared.supervisor_done.clone().drop_guard();
    loop {
        let Some(lost) = shared.current.borrow().clone() else {
            return;
        };
        let failed = lost.failed();
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = failed.cancelled() => {}
        }
        shared.count_loss(&lost);
        drop(lost);
        tracing::warn!(addr = %shared.opts.addr, subnqn = %shared.opts.subnqn, "controller lost; reconnecting");
        let mut backoff = BACKOFF_MIN;
        loop {
            tokio::select! {
                _ = shared.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            let connected = tokio::select! {
                _ = shared.stop.cancelled() => return,
                c = Controller::connect(&shared.opts) => c,
            };
            match connected {
                Ok(c) if !c.io_queues().is_empty() => {
                    // Not cut short by a close: the target carries out an acquire it was sent all the same, and a
                    // close waits for it, so that nothing its caller does next comes before it.
                    let key = shared.hold_key.load(Ordering::Acquire);
                    let held = super::reservation::hold_again(&c, shared.nsid, key).await;
                    if let Err(e) = held {
                        tracing::warn!(addr = %shared.opts.addr, error = %e, "reconnected, but the reservation was not taken again; reconnecting");
                        let _ = c.shutdown().await;
                    } else {
                        if matches!(held, Ok(super::reservation::HeldAgain::Fenced)) {
                            tracing::warn!(addr = %shared.opts.addr, key, "reconnected, but the reservation's key is no longer this host's: fenced");
                            shared.fenced.store(true, Ordering::Release);
                        }
                        let c = Arc::new(c);
                        // Published only while not closed (a close cancels `stop` before it takes the controller).
                        let published = shared.current.send_if_modified(|cur| {
                            if shared.stop.is_cancelled() {
                                return false;
                            }
                            *cur = Some(c.clone());
                            true
                        });
                        if !published {
                            let _ = c.shutdown().await;
                            return;
                        }
                        tracing::info!(addr = %shared.opts.addr, "reconnected");
                        break;
                    }
                }
                Ok(_) => tracing::warn!("reconnected without I/O queues"),
                Err(e) => tracing::debug!(error = %e, "reconnect failed"),
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

#[async_trait]
impl BlockDevice for RemoteNamespace {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }

    /// Identifies the namespace again. Its size may only grow: a namespace that shrank or changed its block size
    /// under us is an error, and the size in use stays as it was.
    async fn rescan(&self) -> Result<u64, BlockError> {
        let c = self.controller().await?;
        let ns = c
            .identify_namespace(self.shared.nsid)
            .await
            .map_err(to_block)?;
        let now = self.num_blocks();
        if 1u32.checked_shl(u32::from(ns.lbads)) != Some(self.block_size) || ns.nsze < now {
            return Err(BlockError::Remote(format!(
                "namespace {} changed from {now} blocks of {} bytes to {} blocks of 2^{} bytes",
                self.shared.nsid, self.block_size, ns.nsze, ns.lbads
            )));
        }
        self.num_blocks.store(ns.nsze, Ordering::Release);
        Ok(ns.nsze)
    }

    /// Requests above the target's transfer size go out as concurrent commands, one per piece.
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        let pieces = self.pieces(offset, len);
        let reads = pieces.iter().map(|&(off, n)| async move {
            let nlb = (n / u64::from(self.block_size)) as u32;
            let mut sqe = Sqe::rw(
                io::READ,
                self.shared.nsid,
                self.lba(off),
                nlb,
                n as u32,
                false,
            );
            sqe.set_sgl(Sgl::transport(n as u32));
            let d = self.submit(sqe, None).await?;
            if d.len() as u64 != n {
                return Err(BlockError::Remote(format!(
                    "short read: {} of {n} bytes",
                    d.len()
                )));
            }
            Ok(d)
        });
        let mut parts = futures_util::future::try_join_all(reads).await?;
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        Ok(crate::block::aligned::concat(
            parts.iter().map(|p| &p[..]),
            len as usize,
        ))
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        check_range(
            offset,
            data.len() as u64,
            self.block_size,
            self.size_bytes(),
        )?;
        let pieces = self.pieces(offset, data.len() as u64);
        let writes = pieces.iter().map(|&(off, n)| {
            let at = (off - offset) as usize;
            let part = data.slice(at..at + n as usize);
            async move {
                let nlb = (n / u64::from(self.block_size)) as u32;
                let sqe = Sqe::rw(
                    io::WRITE,
                    self.shared.nsid,
                    self.lba(off),
                    nlb,
                    n as u32,
                    false,
                );
                self.submit(sqe, Some(part)).await.map(drop)
            }
        });
        futures_util::future::try_join_all(writes).await.map(drop)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        let mut lba = self.lba(offset);
        let mut left = len / u64::from(self.block_size);
        while left > 0 {
            let n = left.min(MAX_ZERO_BLOCKS);
            let mut sqe = Sqe::rw(io::WRITE_ZEROES, self.shared.nsid, lba, n as u32, 0, false);
            sqe.set_sgl(Sgl::transport(0));
            self.submit(sqe, None).await?;
            lba += n;
            left -= n;
        }
        Ok(())
    }

    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        let mut lba = self.lba(offset);
        let mut left = len / u64::from(self.block_size);
        while left > 0 {
            let n = left.min(u64::from(u32::MAX));
            let mut range = BytesMut::with_capacity(16);
            range.put_u32_le(0);
            range.put_u32_le(n as u32);
            range.put_u64_le(lba);
            let mut sqe = Sqe::new(io::DATASET_MANAGEMENT, self.shared.nsid);
            sqe.set_cdw(10, 0);
            sqe.set_cdw(11, 1 << 2);
            self.submit(sqe, Some(range.freeze())).await?;
            lba += n;
            left -= n;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        let mut sqe = Sqe::new(io::FLUSH, self.shared.nsid);
        sqe.set_sgl(Sgl::transport(0));
        self.submit(sqe, None).await.map(|_| ())
    }

    fn connection_losses(&self) -> u64 {
        // A failure of the current controller counts at once, not only once the supervisor has woken: a write that
        // failed as the connection went must find the loss counted (see the nexus's "every child lost its
        // connection").
        if let Some(c) = self.shared.current.borrow().as_ref() {
            self.shared.count_loss(c);
        }
        self.shared.losses.load(Ordering::Acquire)
    }

    fn remote(&self) -> bool {
        true
    }

    async fn close(&self) {
        RemoteNamespace::close(self).await
    }

    async fn note_missed(&self, missed: &MissedWrites) -> Result<(), BlockError> {
        let data = vendor::note_data(missed).map_err(vendor_error)?;
        let sqe = Sqe::new(io::KEELSON_MISSED_NOTE, self.shared.nsid);
        self.submit(sqe, Some(data)).await.map(drop)
    }

    async fn forget_missed(&self, child: &str) -> Result<(), BlockError> {
        let sqe = Sqe::new(io::KEELSON_MISSED_FORGET, self.shared.nsid);
        self.submit(sqe, Some(vendor::forget_data(child)))
            .await
            .map(drop)
    }

    async fn missed(&self) -> Result<Vec<MissedWrites>, BlockError> {
        let len = self.max_transfer.min(1 << 20) as u32;
        let mut sqe = Sqe::new(io::KEELSON_MISSED_READ, self.shared.nsid);
        sqe.set_sgl(Sgl::transport(len));
        let d = self.submit(sqe, None).await?;
        vendor::parse_missed_answer(d).map_err(vendor_error)
    }

    async fn snapshot(&self, id: uuid::Uuid) -> Result<(), BlockError> {
        let sqe = Sqe::new(io::KEELSON_SNAPSHOT, self.shared.nsid);
        self.submit(sqe, Some(vendor::snapshot_data(id)))
            .await
            .map(drop)
    }

    /// Asks the target with Keelson's vendor command; a target that does not know it (or a device that cannot
    /// tell) answers Invalid Opcode, which means "unknown".
    async fn allocated_ranges(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, u64)>>, BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        const BUF: u32 = 4096;
        let bs = u64::from(self.block_size);
        let end = self.lba(offset + len);
        let mut lba = self.lba(offset);
        let mut out: Vec<(u64, u64)> = Vec::new();
        while lba < end {
            let mut sqe = Sqe::new(io::KEELSON_ALLOCATED, self.shared.nsid);
            AllocatedQuery {
                slba: lba,
                nlb: end - lba,
            }
            .write_to(&mut sqe);
            sqe.set_sgl(Sgl::transport(BUF));
            let d = match self.submit(sqe, None).await {
                Ok(d) => d,
                Err(BlockError::Unsupported) => return Ok(None),
                Err(e) => return Err(e),
            };
            let answer = AllocatedAnswer::decode(d).map_err(vendor_error)?;
            for (s, n) in answer.extents {
                let (s, n) = (s * bs, n * bs);
                match out.last_mut() {
                    Some((ps, pn)) if *ps + *pn == s => *pn += n,
                    _ => out.push((s, n)),
                }
            }
            match answer.next {
                Some(next) if next > lba => lba = next,
                _ => break,
            }
        }
        Ok(Some(out))
    }
}

impl Drop for RemoteNamespace {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        if let Some(c) = self.shared.current.send_replace(None) {
            c.close();
        }
    }
}

/// The queue for a command moving `bytes`: with two queues or more, bulk transfers (rebuild copies, large
/// application I/O) get the last one to themselves, so small I/O never waits behind megabytes of someone else's
/// data on the same connection; the rest go round-robin over the others.
/// On an I/O thread, small I/O takes the queue that runs on the same thread (queue `i` runs on I/O thread `i` when
/// the controller was connected with I/O threads; see [`crate::io_threads`]), so the command, its send and its
/// completion stay on one thread.
fn pick_queue(next: &AtomicUsize, queues: usize, bytes: u32, thread: Option<usize>) -> usize {
    if queues >= 2 && bytes >= BULK_BYTES {
        return queues - 1;
    }
    let n = if queues >= 2 {
        queues - 1
    } else {
        queues.max(1)
    };
    thread.unwrap_or_else(|| next.fetch_add(1, Ordering::Relaxed)) % n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target's status is read by its type and code: a Reservation Conflict without DNR (or with More) is still
    /// one (the nexus stops as fenced instead of faulting a healthy child), and so on.
    #[test]
    fn statuses_map_whatever_their_retry_and_more_bits() {
        for (dnr, more) in [(false, false), (true, true), (false, true)] {
            let s = |named: Status| InitiatorError::Status(Status { dnr, more, ..named });
            assert!(matches!(
                to_block(s(Status::RESERVATION_CONFLICT)),
                BlockError::ReservationConflict
            ));
            assert!(matches!(
                to_block(s(Status::CAPACITY_EXCEEDED)),
                BlockError::NoSpace
            ));
            assert!(matches!(
                to_block(s(Status::NAMESPACE_WRITE_PROTECTED)),
                BlockError::ReadOnly
            ));
            assert!(matches!(
                to_block(s(Status::INVALID_OPCODE)),
                BlockError::Unsupported
            ));
        }
    }

    #[test]
    fn a_hostile_mdts_never_makes_the_transfer_size_zero_or_less_than_a_block() {
        assert_eq!(max_transfer_of(0, 512), 1 << 20);
        assert_eq!(max_transfer_of(1, 512), 8192);
        for mdts in [11, 52, 63, 64, 200, 255] {
            assert_eq!(max_transfer_of(mdts, 512), 8 << 20, "mdts {mdts}");
        }
        assert_eq!(max_transfer_of(1, 65536), 65536, "at least one block");
    }

    #[test]
    fn bulk_transfers_get_the_last_queue_and_small_ones_the_others() {
        let next = AtomicUsize::new(0);
        let small: Vec<usize> = (0..6).map(|_| pick_queue(&next, 4, 4096, None)).collect();
        assert_eq!(small, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(pick_queue(&next, 4, 4 << 20, None), 3);
        assert_eq!(pick_queue(&next, 2, BULK_BYTES, None), 1);
        assert_eq!(pick_queue(&next, 2, 512, None), 0);
        // One queue carries everything.
        assert_eq!(
            (
                pick_queue(&next, 1, 4 << 20, None),
                pick_queue(&next, 1, 512, None)
            ),
            (0, 0)
        );
        // On I/O thread t, small I/O takes queue t (the one that runs there); bulk still the last.
        assert_eq!(pick_queue(&next, 4, 4096, Some(1)), 1);
        assert_eq!(pick_queue(&next, 4, 4096, Some(4)), 1);
        assert_eq!(pick_queue(&next, 4, 4 << 20, Some(1)), 3);
    }
}
