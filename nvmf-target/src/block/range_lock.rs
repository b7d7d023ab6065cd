//! Byte-range locks with shared and exclusive holders, granted first-come first-served: a request waits for every
//! overlapping holder it conflicts with and for every earlier waiter it conflicts with, so a stream of shared
//! holders cannot starve an exclusive one. The nexus locks each application write's range exclusively (overlapping writes
//! must reach every child in the same order) and the rebuild locks the segment it copies, which makes "read from a
//! healthy child, write to the new one" atomic with respect to application writes.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

struct Entry {
    id: u64,
    range: Range<u64>,
    exclusive: bool,
}

impl Entry {
    fn conflicts(&self, range: &Range<u64>, exclusive: bool) -> bool {
        (self.exclusive || exclusive)
            && self.range.start < range.end
            && range.start < self.range.end
    }
}

#[derive(Default)]
struct State {
    next_id: u64,
    held: Vec<Entry>,
    waiting: Vec<(Entry, oneshot::Sender<()>)>,
}

impl State {
    fn grantable(&self, upto: usize, range: &Range<u64>, exclusive: bool) -> bool {
        !self.held.iter().any(|h| h.conflicts(range, exclusive))
            && !self.waiting[..upto]
                .iter()
                .any(|(w, _)| w.conflicts(range, exclusive))
    }

    /// Grants every waiter that no longer conflicts, in order.
    fn wake(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            let (range, exclusive) = (self.waiting[i].0.range.clone(), self.waiting[i].0.exclusive);
            if self.grantable(i, &range, exclusive) {
                let (e, tx) = self.waiting.remove(i);
                if tx.send(()).is_ok() {
                    self.held.push(e);
                }
            } else {
                i += 1;
            }
        }
    }
}

#[derive(Clone, Default)]
pub struct RangeLock {
    state: Arc<Mutex<State>>,
}

/// Releases its range when dropped.
pub struct RangeGuard {
    state: Arc<Mutex<State>>,
    id: u64,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.held.retain(|e| e.id != self.id);
        s.waiting.retain(|(e, _)| e.id != self.id);
        s.wake();
    }
}

impl RangeLock {
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    pub async fn shared(&self, range: Range<u64>) -> RangeGuard {
        self.lock(range, false).await
    }

    pub async fn exclusive(&self, range: Range<u64>) -> RangeGuard {
        self.lock(range, true).await
    }

    /// `range` exclusively if nothing holds or waits for any of it now; never waits.
    pub fn try_exclusive(&self, range: Range<u64>) -> Option<RangeGuard> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = s.waiting.len();
        if !s.grantable(n, &range, true) {
            return None;
        }
        s.next_id += 1;
        let id = s.next_id;
        s.held.push(Entry {
            id,
            range,
            exclusive: true,
        });
        Some(RangeGuard {
            state: self.state.clone(),
            id,
        })
    }

    /// The ranges held now, other than whole-device holds ([`RangeLock::exclusive_all`]): the writes (and copies)
    /// under way, whose range a step that does not wait for them must still account for.
    pub fn held_ranges(&self) -> Vec<Range<u64>> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.held
            .iter()
            .filter(|e| e.range.end != u64::MAX)
            .map(|e| e.range.clone())
            .collect()
    }

    /// Excludes every other holder, at any offset: for a whole-device step (snapshot, growing, a rebuilt child
    /// turning healthy, shutting down). Sizing the range from the device before waiting would let a grow that finishes
    /// during the wait open offsets the guard does not cover.
    pub async fn exclusive_all(&self) -> RangeGuard {
        self.lock(0..u64::MAX, true).await
    }

    async fn lock(&self, range: Range<u64>, exclusive: bool) -> RangeGuard {
        let rx = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.next_id += 1;
            let id = s.next_id;
            let entry = Entry {
                id,
                range: range.clone(),
                exclusive,
            };
            let n = s.waiting.len();
            if s.grantable(n, &range, exclusive) {
                s.held.push(entry);
                return RangeGuard {
                    state: self.state.clone(),
                    id,
                };
            }
            let (tx, rx) = oneshot::channel();
            s.waiting.push((entry, tx));
            (id, rx)
        };
        // The guard exists before the wait so a cancelled waiter removes itself.
        let guard = RangeGuard {
            state: self.state.clone(),
            id: rx.0,
        };
        let _ = rx.1.await;
        guard
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn granted_soon<F: std::future::Future>(f: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .ok()
    }

    #[tokio::test]
    async fn held_ranges_name_what_is_held_but_no_waiter_nor_whole_device_hold() {
        let l = RangeLock::new();
        let a = l.exclusive(0..4096).await;
        let _b = l.exclusive(8192..12288).await;
        let all = tokio::spawn({
            let l = l.clone();
            async move { l.exclusive_all().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(l.held_ranges(), vec![0..4096, 8192..12288]);
        drop(a);
        assert_eq!(l.held_ranges(), vec![8192..12288]);
        drop(_b);
        let whole = all.await.unwrap();
        assert!(l.held_ranges().is_empty());
        drop(whole);
    }

    #[tokio::test]
    async fn shared_holders_coexist_and_exclusive_waits() {
        let l = RangeLock::new();
        let a = l.shared(0..100).await;
        let _b = granted_soon(l.shared(50..150))
            .await
            .expect("shared + shared");
        assert!(granted_soon(l.exclusive(90..95)).await.is_none());
        assert!(
            granted_soon(l.exclusive(200..300)).await.is_some(),
            "no overlap, no wait"
        );
        drop(a);
        drop(_b);
        assert!(granted_soon(l.exclusive(90..95)).await.is_some());
    }

    #[tokio::test]
    async fn a_try_takes_only_a_range_no_one_holds_or_waits_for() {
        let l = RangeLock::new();
        let held = l.shared(0..10).await;
        assert!(l.try_exclusive(5..15).is_none(), "overlaps a holder");
        let free = l.try_exclusive(10..20).expect("nothing there");
        assert!(
            granted_soon(l.shared(12..13)).await.is_none(),
            "a try's guard excludes like any other"
        );
        drop(free);
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.exclusive(5..25).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            l.try_exclusive(20..22).is_none(),
            "no one holds 20..22, but an earlier waiter wants it"
        );
        drop(held);
        drop(waiter.await.unwrap());
        assert!(l.try_exclusive(0..100).is_some(), "all free again");
    }

    #[tokio::test]
    async fn an_exclusive_waiter_is_not_starved_by_later_shared_requests() {
        let l = RangeLock::new();
        let first = l.shared(0..10).await;
        let l2 = l.clone();
        let ex = tokio::spawn(async move { l2.exclusive(0..10).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            granted_soon(l.shared(5..6)).await.is_none(),
            "queued behind the exclusive waiter"
        );
        drop(first);
        let g = ex.await.unwrap();
        drop(g);
        assert!(granted_soon(l.shared(5..6)).await.is_some());
    }

    #[tokio::test]
    async fn a_whole_lock_excludes_offsets_past_any_size() {
        let l = RangeLock::new();
        let write_past_the_old_end = l.exclusive(1 << 40..(1 << 40) + 4096).await;
        let l2 = l.clone();
        let all = tokio::spawn(async move { l2.exclusive_all().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!all.is_finished(), "waits for a holder at any offset");
        drop(write_past_the_old_end);
        let all = all.await.unwrap();
        assert!(
            granted_soon(l.shared(u64::MAX - 1..u64::MAX))
                .await
                .is_none()
        );
        drop(all);
        assert!(
            granted_soon(l.shared(u64::MAX - 1..u64::MAX))
                .await
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_block_others() {
        let l = RangeLock::new();
        let held = l.shared(0..10).await;
        assert!(granted_soon(l.exclusive(0..10)).await.is_none()); // times out, i.e. cancelled
        drop(held);
        assert!(granted_soon(l.shared(0..10)).await.is_some());
        assert!(granted_soon(l.exclusive(0..10)).await.is_some());
    }
}
