//! I/O threads: each runs a single-threaded tokio runtime. The data path lives on them: every connection the target
//! accepts is served on one (chosen in turn) with its writer and the commands it executes, and the I/O queues of the
//! engine's own connections (a nexus's remote children) run on them too, queue `i` on thread `i`, so a nexus command
//! on thread `t` sends to its children on the queues of thread `t` ([`current`]). A command's work then stays on one
//! thread: in the shared work-stealing runtime a command, its disk completion and its response passed between
//! workers, and each pass woke a parked thread. Everything else (the management API, admin queues, keep-alives,
//! rebuild and reconcile tasks) stays on the runtime that made the engine. After its data-path work ([`busy`]) a
//! thread may spin for a bounded window that adapts to the load before it sleeps (`io_threads/spin.rs`).

mod spin;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use spin::Spin;

thread_local! {
    /// The index of the I/O thread this is, if it is one.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
    /// The I/O thread's spin, if it spins.
    static SPIN: RefCell<Option<Rc<Spin>>> = const { RefCell::new(None) };
}

/// The index of the I/O thread the caller runs on, if it runs on one.
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// Notes data-path work on this thread (a command, a completion or a child's answer taken): an I/O thread that
/// spins ([`IoThreads::start`]) checks for events without sleeping for its window from now. Elsewhere, nothing.
pub fn busy() {
    SPIN.with(|s| {
        if let Some(s) = s.borrow().as_ref() {
            s.busy();
        }
    });
}

struct IoThread {
    handle: Handle,
    /// Dropped to stop the thread; its runtime then drops whatever tasks are left.
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A set of I/O threads (one per engine).
pub struct IoThreads {
    threads: Vec<IoThread>,
    next: AtomicUsize,
}

impl std::fmt::Debug for IoThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoThreads({})", self.threads.len())
    }
}

impl IoThreads {
    /// Starts `n` threads (at least one), each calling `setup` first (the engine marks them for its disk I/O:
    /// `block::uring::defer_completions_here`). With a `spin` above zero, each spins for up to that long after its
    /// data-path work ([`busy`]; the window adapts, see `io_threads/spin.rs`); zero: they sleep as soon as they are
    /// idle.
    pub fn start(n: usize, spin: Duration, setup: fn()) -> std::io::Result<IoThreads> {
        let mut threads = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("keelson-io-{i}"))
                .spawn(move || {
                    INDEX.with(|c| c.set(Some(i)));
                    setup();
                    if spin.is_zero() {
                        let _ = rt.block_on(stopped);
                        return;
                    }
                    let s = Rc::new(Spin::new(spin));
                    SPIN.with(|c| *c.borrow_mut() = Some(s.clone()));
                    let local = tokio::task::LocalSet::new();
                    local.spawn_local(s.run());
                    let _ = local.block_on(&rt, stopped);
                })?;
            threads.push(IoThread {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(IoThreads {
            threads,
            next: AtomicUsize::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// The runtime of the thread whose turn it is (new connections are spread in turn).
    pub fn pick(&self) -> &Handle {
        self.handle(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// The runtime of thread `i` (modulo their number).
    pub fn handle(&self, i: usize) -> &Handle {
        &self.threads[i % self.threads.len()].handle
    }
}

impl Drop for IoThreads {
    fn drop(&mut self) {
        for t in &mut self.threads {
            t.stop.take();
        }
        for t in &mut self.threads {
            // Not from one of these threads itself (a runtime cannot wait for its own end).
            if let Some(j) = t.thread.take()
                && j.thread().id() != std::thread::current().id()
            {
                let _ = j.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_take_the_threads_in_turn_and_the_threads_end_with_them() {
        let io = IoThreads::start(2, Duration::ZERO, || {}).unwrap();
        assert_eq!(io.len(), 2);
        assert_eq!(current(), None);
        let on: Vec<(String, Option<usize>)> = (0..4)
            .map(|_| {
                let (tx, rx) = std::sync::mpsc::channel();
                io.pick().spawn(async move {
                    let name = std::thread::current().name().unwrap_or("").to_string();
                    tx.send((name, current())).unwrap();
                });
                rx.recv().unwrap()
            })
            .collect();
        let want = |i: usize| (format!("keelson-io-{i}"), Some(i));
        assert_eq!(on, [want(0), want(1), want(0), want(1)]);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        io.handle(3).spawn(async move {
            assert_eq!(current(), Some(1));
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(io);
        // The task was dropped with its runtime: its sender is gone.
        assert!(rx.recv().is_err());
    }

    #[test]
    fn a_spinning_thread_spins_after_work_and_never_while_idle() {
        let io = IoThreads::start(1, Duration::from_millis(20), || {}).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        io.handle(0).spawn(async move {
            let turns = || SPIN.with(|s| s.borrow().as_ref().map(|s| s.turns()));
            let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
            let mut seen = vec![turns()];
            pause(100).await;
            seen.push(turns());
            busy();
            pause(5).await;
            seen.push(turns());
            pause(100).await;
            seen.push(turns());
            pause(100).await;
            seen.push(turns());
            tx.send(seen).unwrap();
        });
        let seen = rx.recv().unwrap();
        let seen: Vec<u64> = seen
            .into_iter()
            .map(|t| t.expect("the thread spins"))
            .collect();
        assert_eq!(seen[0], 0, "no spin before any work: {seen:?}");
        assert_eq!(seen[1], 0, "no spin while idle: {seen:?}");
        assert!(seen[2] > seen[1], "spins after work: {seen:?}");
        assert_eq!(
            seen[3], seen[4],
            "stops spinning once its window passed: {seen:?}"
        );
        assert!(SPIN.with(|s| s.borrow().is_none()), "only I/O threads spin");
        busy();
    }
}
