//! The commands a connection has in flight: futures run concurrently on the connection's own task.
//!
//! This is a `FuturesUnordered` that never wakes its task for nothing. When a `FuturesUnordered` has polled every
//! future it holds and all are still pending, it wakes its own task and returns `Pending`, so as not to starve
//! others. At low queue depth that is every poll -- one command in flight, polled once when it arrives and once
//! per remote child that answers -- and each such wake reschedules the connection task for no work; on the
//! multi-thread runtime it also displaces the task in the worker's LIFO slot and wakes the other worker to steal
//! it: a futex wake and two context switches per command. A future that is never ready stays in the set, so the set
//! never has polled all of its futures and only real wake-ups reach the task.

use std::future::Future;
use std::task::{Context, Waker};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;

pub(super) struct Inflight<T> {
    set: FuturesUnordered<BoxFuture<'static, T>>,
}

impl<T: Send + 'static> Inflight<T> {
    pub(super) fn new() -> Self {
        let mut set = FuturesUnordered::new();
        set.push(Box::pin(std::future::pending()) as BoxFuture<'static, T>);
        // Poll the sentinel once now: polled alone it is "every future", and the set would wake its task.
        let _ = set.poll_next_unpin(&mut Context::from_waker(Waker::noop()));
        Inflight { set }
    }

    pub(super) fn push(&mut self, f: impl Future<Output = T> + Send + 'static) {
        self.set.push(Box::pin(f));
    }

    /// Futures in flight.
    pub(super) fn len(&self) -> usize {
        self.set.len() - 1
    }

    /// The next finished future's output; pending while none has finished (also when the set is empty).
    pub(super) async fn next(&mut self) -> T {
        match self.set.next().await {
            Some(out) => out,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Poll, Wake};

    use super::*;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_pending_command_does_not_wake_the_connection_task() {
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut set = Inflight::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        set.push(async move { rx.await.unwrap_or(0) });
        assert_eq!(set.len(), 1);
        {
            let next = pin!(set.next());
            assert!(next.poll(&mut cx).is_pending());
        }
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            0,
            "polling a pending command woke the task"
        );
        tx.send(7).unwrap();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        let next = pin!(set.next());
        assert_eq!(next.poll(&mut cx), Poll::Ready(7));
    }

    #[test]
    fn an_empty_set_is_pending_without_waking() {
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut set = Inflight::<u32>::new();
        assert_eq!(set.len(), 0);
        let next = pin!(set.next());
        assert!(next.poll(&mut cx).is_pending());
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
    }
}
