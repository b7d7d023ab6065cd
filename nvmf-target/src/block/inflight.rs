//! Operations a device handed on (to the kernel's io_uring, to a blocking thread) that have not ended, whether or
//! not anyone still waits for them. A caller that stops waiting (a nexus's child timeout, a request deadline) does
//! not stop its write: the disk may still write it much later. Whoever is about to give those blocks to someone
//! else (a pool freeing clusters, a snapshot sharing them) first waits for what was handed on before
//! ([`InFlight::settle`]), so a late write never lands in blocks that are no longer its own.
//!
//! Each operation holds a [`Ticket`] from before it is handed on until it ends: the device moves it into the
//! operation (the ring's table, the blocking closure), not into the caller's future.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

#[derive(Default)]
struct State {
    next: u64,
    /// Sequence numbers of the operations that have not ended.
    open: BTreeSet<u64>,
    /// Tasks in [`InFlight::settle`]: an ending operation wakes them only if there are any.
    settling: usize,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    ended: Notify,
}

/// The operations of one device that have not ended.
#[derive(Clone, Default)]
pub struct InFlight {
    inner: Arc<Inner>,
}

/// One operation that has not ended; it ends when the ticket is dropped.
pub struct Ticket {
    inner: Arc<Inner>,
    seq: u64,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl InFlight {
    pub fn new() -> InFlight {
        InFlight::default()
    }

    /// A ticket for an operation about to be handed on.
    pub fn start(&self) -> Ticket {
        let mut s = self.inner.state();
        let seq = s.next;
        s.next += 1;
        s.open.insert(seq);
        Ticket {
            inner: self.inner.clone(),
            seq,
        }
    }

    /// Operations that have not ended.
    pub fn len(&self) -> usize {
        self.inner.state().open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until every operation started before this call has ended (later ones are not waited for, so a busy
    /// device cannot keep it waiting for ever).
    pub async fn settle(&self) {
        let target = {
            let mut s = self.inner.state();
            s.settling += 1;
            s.next
        };
        struct Leave<'a>(&'a Inner);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.state().settling -= 1;
            }
        }
        let _leave = Leave(&self.inner);
        loop {
            let ended = self.inner.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self
                .inner
                .state()
                .open
                .first()
                .is_none_or(|first| *first >= target)
            {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.inner.state();
        s.open.remove(&self.seq);
        let wake = s.settling > 0;
        drop(s);
        if wake {
            self.inner.ended.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn settling_waits_for_earlier_operations_only() {
        let f = InFlight::new();
        // Nothing in flight: settled at once.
        f.settle().await;
        let a = f.start();
        let b = f.start();
        let settle = f.settle();
        tokio::pin!(settle);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut settle)
                .await
                .is_err()
        );
        drop(b);
        // One started after the settle began is not waited for.
        let later = f.start();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut settle)
                .await
                .is_err(),
            "a is still in flight"
        );
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), &mut settle)
            .await
            .expect("settled once a and b ended, with a later one still in flight");
        assert_eq!(f.len(), 1);
        drop(later);
        assert!(f.is_empty());
    }
}
