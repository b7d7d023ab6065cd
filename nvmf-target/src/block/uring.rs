//! io_uring for file devices: reads, writes and flushes are submitted, from whichever task issues them, to the ring
//! of the thread it runs on ([`Ring::local`], one per thread for every device), and completed by that ring's reaper
//! task, which the kernel wakes through an eventfd. The kernel finishes an I/O as task work of the thread that
//! submitted it, and the reaper runs on that thread's runtime: on one of the engine's I/O threads (`io_threads`) the
//! command, its disk I/O and its completion never leave the thread, and there the kernel holds the completions
//! until the thread enters it (the reaper asks for them; a submission while some wait runs them too) rather than
//! interrupting the thread for each ([`defer_completions_here`]). No thread per I/O (the blocking pool's hand-off
//! and wake-up each way was most of a small pool I/O's cost), no polling: an idle ring costs nothing. Two
//! alternatives measured slower on this project's two-core machine (the doc of [`Ring::submit`] says why): a thread
//! per ring that submits and waits (two more wake-ups per I/O), and deferring submissions to batch them into one
//! enter (a later try, holding a connection's submissions to the end of its task's turn, entered the kernel 10x
//! less often for no more IOPS). Where the kernel refuses io_uring (`kernel.io_uring_disabled`, a seccomp filter,
//! an old kernel) [`Ring::new`] fails and the device keeps its blocking path.
//!
//! The crate's unsafe code is here and in [`super::discard`] (one ioctl): a submission entry carries a raw pointer into a buffer that the kernel
//! reads or fills later. It is sound by one rule: the buffer belongs to the ring's table of operations in flight
//! from before its entry is pushed until its completion is reaped, whatever becomes of the future that asked (a
//! dropped future leaves it there), and the ring outlives every operation in flight (the reaper holds it until the
//! table is empty; a ring whose reaper went with its runtime waits for what is in flight when it is dropped, and
//! leaks the memory of what never ends). The file an entry names is held by the table too, until the completion is
//! reaped: an entry the kernel has not taken yet (a refused submission waits for the reaper's retry) names a file
//! descriptor by its number, and a file closed meanwhile would let that number go to the next file opened, which
//! the entry's write would then reach.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use io_uring::{IoUring, opcode, squeue, types};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, Semaphore, oneshot};

use super::aligned::AlignedBuf;
use super::inflight::{InFlight, Ticket};
use super::timing::{self, Stage};

/// Submission queue entries; at most this many operations are in flight per ring (the completion queue has room
/// for twice as many, so it never overflows).
const ENTRIES: u32 = 256;

/// Bytes one read or write entry asks for at most: its length field is 32 bits (a remainder of exactly 4 GiB cast
/// to it asked for nothing, and the operation failed as if at the end of the file), and Linux moves at most
/// 2 GiB - 4 KiB per call anyway. Aligned, so the pieces of an O_DIRECT transfer stay aligned.
const ONE_OP_MAX: usize = 1 << 30;

fn one_op(rest: usize) -> u32 {
    rest.min(ONE_OP_MAX) as u32
}

/// The memory an operation reads into or writes from, owned by the ring while the kernel may use it.
enum Buffer {
    /// Filled by a read.
    Fill(AlignedBuf),
    /// Read by a write: only held, so the memory stays until the kernel is done with it.
    Data {
        _held: Bytes,
    },
    Empty,
}

/// A file an operation names, held open until the operation is reaped.
pub type HeldFile = Arc<dyn AsRawFd + Send + Sync>;

struct Op {
    buf: Buffer,
    /// The file its entry names by descriptor number: kept open (the number not reused) while the entry may still
    /// be waiting to be submitted.
    _file: HeldFile,
    done: oneshot::Sender<Done>,
    /// When it was handed to the kernel, if its stages are timed ([`timing`]).
    timed: Option<Instant>,
    /// Its device's count of operations not ended ([`super::inflight`]): held until the completion is reaped.
    _ticket: Option<Ticket>,
}

/// A completion: the kernel's result, the buffer back, and when it was reaped (if timed).
struct Done {
    res: i32,
    buf: Buffer,
    reaped: Option<Instant>,
}

#[derive(Default)]
struct Table {
    next: u64,
    ops: HashMap<u64, Op>,
}

struct Shared {
    ring: Mutex<IoUring>,
    table: Mutex<Table>,
    wake: AsyncFd<EventFd>,
    /// One permit per operation that may be in flight.
    slots: Semaphore,
    closed: AtomicBool,
    close: Notify,
    /// Told when a submission failed (its entry stays queued): the reaper submits it again, and again every
    /// [`SUBMIT_RETRY`] until the kernel takes it, as a ring with nothing else in flight has no completion to
    /// wake the reaper.
    kick: Notify,
    /// Set up with deferred completions: the kernel runs them only when this thread enters it (the reaper's
    /// [`run_deferred`], or a submission while some wait).
    defer: bool,
}

impl Shared {
    fn ring(&self) -> MutexGuard<'_, IoUring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A ring and its reaper task. Dropping it lets the reaper finish what is in flight and end.
pub struct Ring {
    shared: Arc<Shared>,
}

fn closed() -> io::Error {
    io::Error::other("the device's io_uring is closed")
}

impl Ring {
    /// Sets up a ring and starts its reaper on the current tokio runtime (it must be called inside one).
    pub fn new() -> io::Result<Ring> {
        // Only where the reaper will run on this thread: the runtime the caller is in is a single-threaded one.
        let single_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        let mut plain = IoUring::builder();
        plain.setup_cqsize(ENTRIES * 2);
        let deferred = if DEFER_HERE.with(Cell::get) && single_threaded {
            plain
                .clone()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .build(ENTRIES)
                .inspect_err(
                    |e| tracing::debug!(error = %e, "io_uring without deferred completions"),
                )
                .ok()
        } else {
            None
        };
        let defer = deferred.is_some();
        let ring = match deferred {
            Some(r) => r,
            // Completions run as task work of the submitting thread, which the kernel interrupts for it
            // (cooperative task running, without the interrupt, measured no better here).
            None => plain.build(ENTRIES)?,
        };
        let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let shared = Arc::new(Shared {
            ring: Mutex::new(ring),
            table: Mutex::new(Table::default()),
            // SAFETY: the EventFd owns its descriptor, which stays open and the same until the AsyncFd drops it.
            wake: unsafe { AsyncFd::register_with_interest(efd, Interest::READABLE) }?,
            slots: Semaphore::new(ENTRIES as usize),
            closed: AtomicBool::new(false),
            close: Notify::new(),
            kick: Notify::new(),
            defer,
        });
        tokio::spawn(reap(shared.clone()));
        Ok(Ring { shared })
    }

    /// Reads `len` bytes at `offset` of `file` into a new aligned buffer. Each operation handed to the kernel holds
    /// a ticket of `inflight` (the device's) and the file until it ends, here and in the writes and flushes below.
    pub async fn read(
        &self,
        file: &HeldFile,
        offset: u64,
        len: usize,
        inflight: Option<&InFlight>,
    ) -> io::Result<Bytes> {
        let mut buf = AlignedBuf::for_filling(len);
        let mut done = 0;
        while done < len {
            let ptr = buf.bytes_mut()[done..].as_mut_ptr();
            let entry = opcode::Read::new(types::Fd(file.as_raw_fd()), ptr, one_op(len - done))
                .offset(offset + done as u64)
                .build();
            let (n, back) = self
                .submit(
                    entry,
                    file,
                    Buffer::Fill(buf),
                    inflight.map(InFlight::start),
                )
                .await?;
            let Buffer::Fill(b) = back else {
                return Err(io::Error::other("io_uring returned another buffer"));
            };
            buf = b;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(buf.freeze())
    }

    /// Writes all of `data` at `offset` of `file` (aligned if the file is open O_DIRECT).
    pub async fn write(
        &self,
        file: &HeldFile,
        offset: u64,
        data: Bytes,
        inflight: Option<&InFlight>,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let rest = data.slice(done..);
            let entry = opcode::Write::new(
                types::Fd(file.as_raw_fd()),
                rest.as_ptr(),
                one_op(rest.len()),
            )
            .offset(offset + done as u64)
            .build();
            let (n, _) = self
                .submit(
                    entry,
                    file,
                    Buffer::Data { _held: rest },
                    inflight.map(InFlight::start),
                )
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n;
        }
        Ok(())
    }

    /// fdatasync(2) of `file`: every write completed before it is durable.
    pub async fn fdatasync(&self, file: &HeldFile, inflight: Option<&InFlight>) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.submit(entry, file, Buffer::Empty, inflight.map(InFlight::start))
            .await
            .map(drop)
    }

    /// Files `buf` under a new operation, pushes `entry` and waits for its completion: bytes done, and the buffer.
    ///
    /// Each operation enters the kernel at once, from the asking task. On the two-core machine, one ring thread
    /// per device submitting and waiting in one enter (completions then run in that thread's wait, as in fio) was
    /// slower at every depth, 4 KiB reads at QD32 by a quarter: the hand-off to the thread and back are two more
    /// wake-ups per I/O. Batching — queueing entries and letting a submitter task enter once for all that a
    /// connection's commands queued — was slower too (QD32 by a fifth): a virtual disk starts each request when it
    /// is told, so holding the first back costs more than the doorbells saved. Measured again on I/O threads (a
    /// flusher task on the thread, woken by the first push, entering once for all pushed before it ran): one enter
    /// per ~16 I/Os at QD32 and a fifth less engine CPU per I/O (io_uring_enter was half of it), but 3-5 % fewer
    /// IOPS at QD32 and 3 us more at QD1 over six alternating rounds: the disk, not the engine's CPU, sets the pace.
    /// Again with the disk at 156k IOPS under fio (its submissions held to the end of the connection task's poll
    /// while the ring had others in flight): 7 I/Os per enter and a seventh of the interrupts, but 4 KiB reads at
    /// QD32 fell from 75-80k to 60-70k IOPS, as the virtual disk then completed in clumps. Handing the
    /// submissions to the kernel's workers instead (`IOSQE_ASYNC`, so another CPU does the block layer's part):
    /// 72k against 77k, and more CPU.
    async fn submit(
        &self,
        entry: squeue::Entry,
        file: &HeldFile,
        buf: Buffer,
        ticket: Option<Ticket>,
    ) -> io::Result<(usize, Buffer)> {
        let s = &self.shared;
        // Given back by the reaper when the operation completes, not when this future ends.
        s.slots.acquire().await.map_err(|_| closed())?.forget();
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut t = s.table();
            let id = t.next;
            t.next += 1;
            t.ops.insert(
                id,
                Op {
                    buf,
                    _file: file.clone(),
                    done: tx,
                    timed: timing::start(timing::Layer::Disk),
                    _ticket: ticket,
                },
            );
            id
        };
        let entry = entry.user_data(id);
        {
            let mut ring = s.ring();
            // SAFETY: the buffer `entry` points into is owned by the table under `id` until the reaper takes the
            // completion of `id`, and the ring lives until the table is empty (see the module's rule).
            while unsafe { ring.submission().push(&entry) }.is_err() {
                // Full (cannot happen with at most ENTRIES in flight, but be sure): hand the queue to the kernel.
                if let Err(e) = submit_queued(&ring) {
                    // Never queued: the operation leaves the table, its slot goes back.
                    s.table().ops.remove(&id);
                    s.slots.add_permits(1);
                    return Err(e);
                }
            }
            // A failed submit (the kernel short of memory: EAGAIN, ENOMEM) leaves the entry queued, for the reaper.
            if let Err(e) = submit_queued(&ring) {
                tracing::debug!(error = %e, "io_uring submit deferred to the reaper");
                s.kick.notify_one();
            }
        }
        if let Some(t) = s.table().ops.get_mut(&id).and_then(|op| op.timed.as_mut()) {
            *t = timing::record_since(Stage::DiskSubmit, *t);
        }
        let Done { res, buf, reaped } = rx.await.map_err(|_| closed())?;
        if let Some(t) = reaped {
            timing::record_since(Stage::DiskWake, t);
        }
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        Ok((res as usize, buf))
    }
}

thread_local! {
    /// This thread's ring, and the runtime its reaper runs on.
    static LOCAL: RefCell<Option<(tokio::runtime::Id, Arc<Ring>)>> = const { RefCell::new(None) };
    /// Whether rings made on this thread defer their completions ([`defer_completions_here`]).
    static DEFER_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as one that runs a single-threaded runtime of its own and nothing else (an engine's
/// I/O thread): the rings made on it from now on let the kernel queue their completions until this thread enters
/// it for them — the ring's reaper asks, or a submission runs those waiting (`IORING_SETUP_DEFER_TASKRUN`, which
/// also makes this thread the ring's only submitter) — instead of interrupting the thread to run each as it comes. On the two-core machine, 4 KiB random
/// writes at QD32 to a pool replica went from 46-62k to 62-76k IOPS over nine alternating rounds, and the engine's
/// CPU per write from 15-20 to 12-15 us; reads at QD32 and QD1 stayed as they were, within the rounds' spread.
/// Only for such a thread: a ring that defers takes submissions and runs completions on its own thread alone, and a
/// reaper spawned elsewhere (a multi-threaded runtime, a blocking thread of a single-threaded one) would never see
/// its completions. Where the kernel refuses the flags (before Linux 6.1) the ring completes as task work, as
/// elsewhere.
pub fn defer_completions_here() {
    DEFER_HERE.with(|d| d.set(true));
}

/// Runs completions a deferring ring holds, so they are in its completion queue: `io_uring_enter` with GETEVENTS
/// and no minimum.
fn run_deferred(ring: &IoUring) -> io::Result<()> {
    const GETEVENTS: u32 = 1;
    // SAFETY: nothing to submit, no argument, and GETEVENTS with no minimum never waits.
    match unsafe {
        ring.submitter()
            .enter::<libc::sigset_t>(0, 0, GETEVENTS, None)
    } {
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
        r => r.map(drop),
    }
}

impl Ring {
    /// The ring of the calling thread, made on its first use there (for the runtime it is running then: a thread
    /// that runs another runtime later gets a new one). Whoever issues an I/O submits it on its own thread's ring,
    /// so the kernel completes it on that thread and its reaper wakes there: a connection served on an I/O thread
    /// of its own keeps its disk I/O on that thread too, with no wake-up of another.
    pub fn local() -> io::Result<Arc<Ring>> {
        let id = tokio::runtime::Handle::try_current()
            .map_err(io::Error::other)?
            .id();
        LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            if let Some((rt, ring)) = l.as_ref()
                && *rt == id
            {
                return Ok(ring.clone());
            }
            let ring = Arc::new(Ring::new()?);
            *l = Some((id, ring.clone()));
            Ok(ring)
        })
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.close.notify_one();
    }
}

/// The longest a ring dropped with operations in flight waits for them before it gives their memory up for lost.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

impl Drop for Shared {
    /// The reaper normally holds the ring until nothing is in flight. It goes earlier only when its runtime ends
    /// (the thread's runtime shut down with I/O still in flight): then the kernel may still read or fill the
    /// buffers of what is left, so wait here for their completions (bounded), and leak the memory of any that
    /// never come rather than free memory the kernel may still use. Each waited-for operation's ticket ends only
    /// when the kernel is done, so a device's `settle` stays true. A ring that defers its completions can wait
    /// only on its own thread, where an I/O thread drops it (its runtime's tasks, then its thread-local ring);
    /// elsewhere the wait fails at once and what is in flight is leaked.
    fn drop(&mut self) {
        let ring = self.ring.get_mut().unwrap_or_else(|e| e.into_inner());
        let ops = &mut self.table.get_mut().unwrap_or_else(|e| e.into_inner()).ops;
        let deadline = Instant::now() + DRAIN_LIMIT;
        while !ops.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let ts = types::Timespec::from(left);
            let args = types::SubmitArgs::new().timespec(&ts);
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for a dropped io_uring's operations failed");
                    break;
                }
            }
            for c in ring.completion() {
                ops.remove(&c.user_data());
            }
        }
        if !ops.is_empty() {
            tracing::error!(
                operations = ops.len(),
                "an io_uring was dropped with operations the kernel never finished; their memory is leaked"
            );
            for (_, op) in ops.drain() {
                std::mem::forget(op);
            }
        }
    }
}

/// How often the reaper tries again to submit entries the kernel refused.
const SUBMIT_RETRY: Duration = Duration::from_millis(1);

#[cfg(test)]
thread_local! {
    /// How many of this thread's next submissions fail as if the kernel were short of memory (tests).
    pub(super) static FAIL_SUBMITS: Cell<u32> = const { Cell::new(0) };
}

/// Hands the queued entries to the kernel (under test, fails while [`FAIL_SUBMITS`] counts down).
fn submit_queued(ring: &IoUring) -> io::Result<usize> {
    #[cfg(test)]
    if FAIL_SUBMITS.with(|n| n.replace(n.get().saturating_sub(1)) > 0) {
        return Err(io::Error::from_raw_os_error(libc::EAGAIN));
    }
    ring.submit()
}

/// Completes operations as the kernel finishes them, until the ring is dropped and nothing is in flight.
async fn reap(s: Arc<Shared>) {
    // Entries are queued that the kernel has not taken (a submission failed).
    let mut unsubmitted = false;
    loop {
        tokio::select! {
            ready = s.wake.readable() => match ready {
                Ok(mut g) => {
                    // Read the count before taking the completions: one posted after this writes it again, a new
                    // edge of the descriptor (the kernel's poll wakes on every write) that wakes us again. So the
                    // readiness seen here is cleared now, not by a second read finding the count empty: one system
                    // call per wake-up, not two. (Clearing never drops a newer edge: tokio clears only the
                    // readiness of the event this guard saw.)
                    let _ = g.get_ref().get_ref().read();
                    g.clear_ready();
                }
                Err(e) => {
                    tracing::error!(error = %e, "io_uring eventfd failed; its device's I/O stops");
                    return;
                }
            },
            _ = s.close.notified() => {}
            _ = s.kick.notified() => {}
            _ = tokio::time::sleep(SUBMIT_RETRY), if unsubmitted => {}
        }
        let finished: Vec<(u64, i32)> = {
            let mut ring = s.ring();
            let mut done = Vec::new();
            loop {
                if s.defer
                    && let Err(e) = run_deferred(&ring)
                {
                    tracing::error!(error = %e, "running an io_uring's deferred completions failed");
                }
                let before = done.len();
                done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
                // One call runs a bounded number (about 20 on Linux 6.18) and flags the ring when it left some
                // (IORING_SQ_TASKRUN): call again while it does and the last call brought completions, so about once
                // per 20 in flight. Not on the flag alone: the kernel raises it when it queues a completion to none,
                // which a call under way may already have run, and a call with nothing to run leaves it up (an
                // engine's thread spun on it). What a call that brought nothing leaves is run at the next wake (the
                // eventfd is written when a completion is queued to none, and when completions are posted) or by
                // the next submission, which enters with GETEVENTS while the flag is up.
                let more = s.defer && ring.submission().taskrun() && done.len() > before;
                if !more {
                    break;
                }
            }
            if !ring.submission().is_empty()
                && let Err(e) = submit_queued(&ring)
            {
                tracing::debug!(error = %e, "io_uring submit failed again; retrying");
            }
            unsubmitted = !ring.submission().is_empty();
            done
        };
        let mut now = None;
        for (id, res) in finished {
            let op = s.table().ops.remove(&id);
            s.slots.add_permits(1);
            if let Some(op) = op {
                let reaped = op.timed.map(|t| {
                    let now = *now.get_or_insert_with(Instant::now);
                    timing::record(Stage::DiskKernel, now.saturating_duration_since(t));
                    now
                });
                let done = Done {
                    res,
                    buf: op.buf,
                    reaped,
                };
                // The asker may be gone (its future dropped): the buffer is freed here, after the kernel is done.
                let _ = op.done.send(done);
            }
        }
        if s.closed.load(Ordering::Acquire) && s.table().ops.is_empty() {
            s.slots.close();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};

    /// A remainder of 4 GiB (or more) is asked for in aligned pieces, never as a length the 32-bit field wraps to 0.
    #[test]
    fn one_entry_asks_for_at_most_an_aligned_gib() {
        assert_eq!(one_op(4096), 4096);
        assert_eq!(one_op(4 << 30), 1 << 30);
        assert_eq!(one_op((4 << 30) + 4096), 1 << 30);
        assert_eq!(one_op(ONE_OP_MAX) % 4096, 0);
    }

    /// On a thread marked for deferred completions, many direct I/Os at once — more than one enter of the reaper
    /// runs — all complete, and go on completing after a pause (none is left queued in the kernel unseen) and under
    /// a steady load; and the idle thread then uses no CPU. Watched from another thread, so a thread that spins
    /// fails the test instead of hanging it. (The race that once left a reaper spinning on the kernel's flag, see
    /// `reap`, is not forced here: it came once in a minute of an engine's load.)
    #[test]
    fn a_deferring_ring_completes_more_at_once_than_one_call_runs() {
        let (finished, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            defer_completions_here();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Some(ring) = ring_or_skip() else {
                    return;
                };
                if !ring.shared.defer {
                    assert!(
                        std::env::var_os(e2e::privileged::REQUIRE_VAR).is_none(),
                        "the kernel refused IORING_SETUP_DEFER_TASKRUN"
                    );
                    eprintln!("skipped: no deferred completions here");
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                let f = match std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(dir.path().join("f"))
                {
                    Ok(f) => f,
                    Err(e) => {
                        assert!(
                            std::env::var_os(e2e::privileged::REQUIRE_VAR).is_none(),
                            "no O_DIRECT in the temporary directory: {e}"
                        );
                        eprintln!("skipped: no O_DIRECT in the temporary directory: {e}");
                        return;
                    }
                };
                f.set_len(4 << 20).unwrap();
                let fd: HeldFile = Arc::new(f);
                let ring = Arc::new(ring);
                for round in 0..3u8 {
                    let all: Vec<_> = (0..200u64)
                        .map(|i| {
                            let (ring, fd) = (ring.clone(), fd.clone());
                            tokio::spawn(async move {
                                let mut b = AlignedBuf::for_filling(4096);
                                b.bytes_mut()
                                    .fill(round.wrapping_mul(31).wrapping_add(i as u8));
                                let b = b.freeze();
                                ring.write(&fd, i * 4096, b.clone(), None).await.unwrap();
                                assert_eq!(ring.read(&fd, i * 4096, 4096, None).await.unwrap(), b);
                            })
                        })
                        .collect();
                    let all = futures_util::future::join_all(all);
                    for t in tokio::time::timeout(Duration::from_secs(20), all)
                        .await
                        .expect("every I/O completes")
                    {
                        t.unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // Then a steady load for a while: 32 at a time, each next one issued as one completes (completions
                // queued while the reaper runs others, the kernel's flag raised and lowered many times).
                let until = Instant::now() + Duration::from_millis(1500);
                let workers: Vec<_> = (0..32u64)
                    .map(|w| {
                        let (ring, fd) = (ring.clone(), fd.clone());
                        tokio::spawn(async move {
                            let mut n = 0u64;
                            while Instant::now() < until {
                                let at = ((w * 7919 + n * 104729) % 1024) * 4096;
                                if n.is_multiple_of(2) {
                                    ring.read(&fd, at, 4096, None).await.unwrap();
                                } else {
                                    let mut b = AlignedBuf::for_filling(4096);
                                    b.bytes_mut().fill(n as u8);
                                    ring.write(&fd, at, b.freeze(), None).await.unwrap();
                                }
                                n += 1;
                            }
                        })
                    })
                    .collect();
                for t in tokio::time::timeout(
                    Duration::from_secs(20),
                    futures_util::future::join_all(workers),
                )
                .await
                .expect("every I/O of the steady load completes")
                {
                    t.unwrap();
                }
                // This thread's user and system time, in clock ticks (/proc/thread-self/stat's 14th and 15th).
                let cpu = || -> u64 {
                    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
                    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
                    let f: Vec<&str> = after_name.split_whitespace().collect();
                    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
                };
                let before = cpu();
                tokio::time::sleep(Duration::from_millis(500)).await;
                let ticks = cpu() - before;
                assert!(
                    ticks < 10,
                    "the idle thread used {ticks} ticks of CPU in 500 ms"
                );
            });
            let _ = finished.send(());
        });
        done.recv_timeout(Duration::from_secs(60))
            .expect("the I/O thread finished (it neither failed nor spun)");
    }

    /// A new ring (inside a runtime), or `None` where the kernel refuses io_uring: the test is skipped, but never
    /// under scripts/test.sh (CI has it).
    fn ring_or_skip() -> Option<Ring> {
        match Ring::new() {
            Ok(r) => Some(r),
            Err(e) => {
                assert!(
                    std::env::var_os(e2e::privileged::REQUIRE_VAR).is_none(),
                    "io_uring unavailable: {e}"
                );
                eprintln!("skipped: io_uring unavailable here: {e}");
                None
            }
        }
    }

    /// An I/O whose submission the kernel refused (EAGAIN: short of memory) on an otherwise idle ring is submitted
    /// again by the reaper, with no other I/O to carry it, and completes.
    #[tokio::test]
    async fn an_io_whose_submission_failed_completes_on_an_idle_ring() {
        let Some(ring) = ring_or_skip() else {
            return;
        };
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let fd: HeldFile = Arc::new(f);
        // The submitter's, then the reaper's first two retries fail.
        FAIL_SUBMITS.with(|n| n.set(3));
        let data = Bytes::from(vec![7u8; 4096]);
        tokio::time::timeout(
            Duration::from_secs(5),
            ring.write(&fd, 0, data.clone(), None),
        )
        .await
        .expect("the refused submission was retried")
        .unwrap();
        assert_eq!(FAIL_SUBMITS.with(Cell::get), 0);
        assert_eq!(ring.read(&fd, 0, 4096, None).await.unwrap(), data);
    }

    /// A write whose submission the kernel refused, its asker then gone and its file dropped: the ring keeps the
    /// file open until the write is reaped, so the descriptor number the waiting entry names cannot pass to a file
    /// opened meanwhile (another pool's disk) and the retried write cannot land there. Before, the number was
    /// reused at once and the retry wrote into the new file.
    #[tokio::test]
    async fn a_refused_write_reaches_its_own_file_even_if_the_file_is_dropped_before_the_retry() {
        use futures_util::FutureExt;
        let Some(ring) = ring_or_skip() else {
            return;
        };
        let dropped = tempfile::NamedTempFile::new().unwrap();
        dropped.as_file().set_len(1 << 20).unwrap();
        let fd: HeldFile = Arc::new(dropped.reopen().unwrap());
        // The submitter's and the reaper's next retries fail: the entry waits in the queue.
        FAIL_SUBMITS.with(|n| n.set(20));
        let data = Bytes::from(vec![7u8; 4096]);
        // Polled once (queued, its submission refused), then dropped, and the file with it.
        assert!(ring.write(&fd, 0, data, None).now_or_never().is_none());
        drop(fd);
        let opened_after = tempfile::tempfile().unwrap();
        opened_after.set_len(1 << 20).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ring.shared.table().ops.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the refused write was never retried"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut after = vec![0u8; 4096];
        opened_after.read_exact_at(&mut after, 0).unwrap();
        assert!(
            after.iter().all(|&b| b == 0),
            "the retried write landed in a file opened after its own was dropped"
        );
        let mut own = vec![0u8; 4096];
        dropped.as_file().read_exact_at(&mut own, 0).unwrap();
        assert!(
            own.iter().all(|&b| b == 7),
            "the write reached its own file"
        );
    }

    #[tokio::test]
    async fn reads_writes_and_flushes_through_the_ring() {
        let Some(ring) = ring_or_skip() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let f = Arc::new(f);
        let fd: HeldFile = f.clone();
        let data = Bytes::from((0..65536u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        ring.write(&fd, 4096, data.clone(), None).await.unwrap();
        ring.fdatasync(&fd, None).await.unwrap();
        assert_eq!(ring.read(&fd, 4096, 65536, None).await.unwrap(), data);
        let mut direct = vec![0u8; 65536];
        f.read_exact_at(&mut direct, 4096).unwrap();
        assert_eq!(&direct[..], &data[..]);
        // Many at once, more than the ring holds.
        let ring = Arc::new(ring);
        let all: Vec<_> = (0..600u64)
            .map(|i| {
                let (ring, fd) = (ring.clone(), fd.clone());
                tokio::spawn(async move {
                    let b = Bytes::from(vec![(i % 200) as u8 + 1; 512]);
                    ring.write(&fd, i * 512, b.clone(), None).await.unwrap();
                    assert_eq!(ring.read(&fd, i * 512, 512, None).await.unwrap(), b);
                })
            })
            .collect();
        for t in all {
            t.await.unwrap();
        }
        // Reading past the end of the file is an error, not a short buffer.
        assert!(ring.read(&fd, (1 << 20) - 512, 4096, None).await.is_err());
        // A future dropped while its operation is in flight (polled once: submitted) leaves the buffer to the ring,
        // and the operation counts as in flight until the kernel is done with it.
        let inflight = InFlight::new();
        for _ in 0..20 {
            let read = ring.read(&fd, 0, 1 << 20, Some(&inflight));
            let _ = tokio::time::timeout(std::time::Duration::ZERO, read).await;
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), inflight.settle())
            .await
            .expect("the dropped reads end");
        assert!(inflight.is_empty());
        assert_eq!(ring.read(&fd, 512, 512, None).await.unwrap()[0], 2);
    }

    /// Memory that says when it is freed.
    struct Flagged {
        bytes: Vec<u8>,
        freed: Arc<AtomicBool>,
    }

    impl AsRef<[u8]> for Flagged {
        fn as_ref(&self) -> &[u8] {
            &self.bytes
        }
    }

    impl Drop for Flagged {
        fn drop(&mut self) {
            self.freed.store(true, Ordering::SeqCst);
        }
    }

    /// A runtime that ends (its reaper dropped with it) while a write is in flight, then the ring dropped: the
    /// write's buffer is freed only once the kernel is done with it, and the write delivers its own bytes. Before,
    /// the buffer was freed and the ring closed at once, and the kernel could still read that memory, by then
    /// another allocation's.
    #[test]
    fn a_ring_dropped_with_a_write_in_flight_frees_its_buffer_only_after_the_kernel_is_done() {
        use std::io::{Read, Write};
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        // A pipe holding one page, full: the ring's write waits for room.
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let nonblocking = |fd: &dyn std::os::fd::AsFd, on: bool| {
            let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL).unwrap());
            let flags = if on {
                flags | OFlag::O_NONBLOCK
            } else {
                flags - OFlag::O_NONBLOCK
            };
            fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags)).unwrap();
        };
        assert!(fcntl(&writer, FcntlArg::F_SETPIPE_SZ(4096)).unwrap() >= 4096);
        nonblocking(&writer, true);
        let mut filler = 0;
        while let Ok(n) = writer.write(&[1u8; 4096]) {
            filler += n;
        }
        nonblocking(&writer, false);
        let freed = Arc::new(AtomicBool::new(false));
        let data = Bytes::from_owner(Flagged {
            bytes: vec![7u8; 4096],
            freed: freed.clone(),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let writer = Arc::new(writer);
        let fd: HeldFile = writer.clone();
        let Some(ring) = rt.block_on(async { ring_or_skip() }) else {
            return;
        };
        let ring = Arc::new(ring);
        rt.block_on(async {
            let r = ring.clone();
            tokio::spawn(async move { r.write(&fd, 0, data, None).await });
            // Let the write reach the kernel.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        });
        drop(rt);
        assert!(!freed.load(Ordering::SeqCst), "freed while the ring lives");
        let drain = {
            let freed = freed.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(300));
                let freed_early = freed.load(Ordering::SeqCst);
                nonblocking(&reader, true);
                let mut got = Vec::new();
                let deadline = Instant::now() + std::time::Duration::from_secs(5);
                let mut buf = [0u8; 8192];
                while got.len() < filler + 4096 && Instant::now() < deadline {
                    match reader.read(&mut buf) {
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                    }
                }
                (freed_early, got)
            })
        };
        drop(ring);
        let (freed_early, got) = drain.join().unwrap();
        assert!(
            !freed_early,
            "the write's buffer was freed while the kernel still had the write"
        );
        assert_eq!(got.len(), filler + 4096, "the write in flight was lost");
        assert!(
            got[filler..].iter().all(|&b| b == 7),
            "the write delivered other bytes"
        );
        assert!(
            freed.load(Ordering::SeqCst),
            "freed once the kernel was done"
        );
    }
}
