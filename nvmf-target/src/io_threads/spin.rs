//! The bounded, adaptive spin of an I/O thread. After data-path work ([`super::busy`]: a command, a completion or a
//! child's answer taken), the thread keeps checking for events without sleeping for a window; whatever comes in
//! that window (the host's next command, the disk's completion, a replica's answer) is taken at once, without the
//! wake-up a sleeping thread needs (tens of microseconds on a virtual machine), and the peer that sends it does not
//! pay for waking this thread either. An idle thread does not spin: the spin starts only after work.
//!
//! The window adapts as Linux's guest halt-polling does: when the next work came soon after a spin gave up (within
//! the longest window), a longer spin would have caught it, so the window doubles (up to the longest); when the
//! thread then slept longer than that, the spin was wasted, so it halves, and below [`START`] it stops until work
//! comes close together again. A thread serving a steady stream of I/O spins through its gaps; one serving an
//! occasional I/O does not spin at all.
//!
//! Each turn of the spin defers the spinning task, so the thread's runtime polls its driver without blocking and
//! runs whatever that made ready before the spin goes on (`tokio::task::yield_now` on a current-thread runtime).

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The shortest window worth spinning; a window halved below it becomes zero.
pub(super) const START: Duration = Duration::from_micros(10);

pub(super) struct Spin {
    /// The longest window.
    max: Duration,
    window: Cell<Duration>,
    /// The last work noted.
    last: Cell<Instant>,
    /// When the spin last gave up, while the spinning task waits for work.
    gave_up: Cell<Option<Instant>>,
    wake: Notify,
    /// Turns spun, for the tests.
    turns: Cell<u64>,
}

impl Spin {
    pub(super) fn new(max: Duration) -> Spin {
        let now = Instant::now();
        Spin {
            max,
            window: Cell::new(max),
            // No work yet: the spin starts with the first.
            last: Cell::new(now.checked_sub(max).unwrap_or(now)),
            gave_up: Cell::new(None),
            wake: Notify::new(),
            turns: Cell::new(0),
        }
    }

    pub(super) fn busy(&self) {
        let now = Instant::now();
        self.last.set(now);
        if let Some(at) = self.gave_up.take() {
            self.window
                .set(next_window(self.window.get(), now - at, self.max));
            self.wake.notify_one();
        }
    }

    /// The spinning task of the thread: runs until its runtime ends.
    pub(super) async fn run(self: Rc<Self>) {
        loop {
            while self.last.get().elapsed() < self.window.get() {
                self.turns.set(self.turns.get() + 1);
                // Lets any other thread that is ready for this CPU run first: a spin must not keep a peer (the
                // host, a replica's engine) from the CPU it needs to send what this thread waits for.
                std::thread::yield_now();
                tokio::task::yield_now().await;
            }
            self.gave_up.set(Some(Instant::now()));
            self.wake.notified().await;
        }
    }

    #[cfg(test)]
    pub(super) fn window(&self) -> Duration {
        self.window.get()
    }

    #[cfg(test)]
    pub(super) fn turns(&self) -> u64 {
        self.turns.get()
    }
}

/// The window after the spin gave up and the thread then slept for `slept` before the next work.
fn next_window(window: Duration, slept: Duration, max: Duration) -> Duration {
    if slept <= max {
        (window * 2).max(START).min(max)
    } else {
        let w = window / 2;
        if w < START { Duration::ZERO } else { w }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(100);

    #[test]
    fn the_window_grows_when_work_came_just_after_the_spin_and_shrinks_to_nothing_when_it_did_not()
    {
        let us = Duration::from_micros;
        assert_eq!(
            next_window(us(100), us(30), MAX),
            us(100),
            "never past the longest"
        );
        assert_eq!(next_window(us(20), us(30), MAX), us(40));
        assert_eq!(
            next_window(Duration::ZERO, us(30), MAX),
            START,
            "starts again from zero"
        );
        assert_eq!(next_window(us(100), us(500), MAX), us(50));
        assert_eq!(next_window(us(12), us(500), MAX), Duration::ZERO);
        assert_eq!(next_window(Duration::ZERO, us(500), MAX), Duration::ZERO);
    }

    #[test]
    fn occasional_work_stops_the_spin_and_close_work_brings_it_back() {
        let s = Spin::new(MAX);
        // Work each a millisecond after the spin gave up: the window halves away.
        for _ in 0..5 {
            s.gave_up
                .set(Instant::now().checked_sub(Duration::from_millis(1)));
            s.busy();
        }
        assert_eq!(s.window(), Duration::ZERO);
        s.gave_up.set(Some(Instant::now()));
        s.busy();
        assert_eq!(s.window(), START);
    }
}
