//! One acting cluster agent among several that share a store: the leader is whoever holds `key`, put with its
//! lease. A candidate that finds the key taken waits for it to be deleted (the leader resigned, or its lease
//! expired because it died or was cut off) and tries again. The leader renews its lease every third of the TTL,
//! counted from the last renewal that succeeded (a renewal the store failed is asked again soon); the moment the
//! store says the lease is gone, or no renewal has succeeded for the TTL less one renewal period (a hung store
//! call does not delay it), [`Leader::lost`] fires and the agent must stop acting, since another may soon lead.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::store::{Compare, Event, LeaseId, Store, StoreError, Txn};

/// Leadership, held until dropped, resigned, or lost.
pub struct Leader {
    pub lease: LeaseId,
    /// The leader key's revision from the write that won.
    pub revision: super::store::Revision,
    lost: CancellationToken,
    store: Arc<dyn Store>,
    _renewal: DropGuard,
}

impl Leader {
    /// Fires when leadership is lost (a renewal failed): stop acting at once.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// The store as this leader must write it: every write refused ([`StoreError::NotLeader`]) once another
    /// agent holds the leader key, even before this one notices it lost.
    pub fn fenced(&self, key: &str) -> Arc<dyn Store> {
        Arc::new(super::store::fenced::FencedStore::new(
            self.store.clone(),
            key,
            self.revision,
        ))
    }

    /// Gives leadership up now (the key goes with the lease), so another agent takes over without waiting a TTL.
    pub async fn resign(self) -> Result<(), StoreError> {
        self.lost.cancel();
        self.store.revoke_lease(self.lease).await
    }
}

/// Waits until this agent (`me`) leads, or `stop` fires (then `Ok(None)`).
pub async fn campaign(
    store: Arc<dyn Store>,
    key: &str,
    me: &str,
    ttl: Duration,
    stop: &CancellationToken,
) -> Result<Option<Leader>, StoreError> {
    loop {
        // The lease's time runs from before it was asked for: a slow grant or transaction spends the margin too.
        let granted = tokio::time::Instant::now();
        let lease = store.grant_lease(ttl).await?;
        let t = Txn::new()
            .when(Compare::ModRevision {
                key: key.into(),
                revision: 0,
            })
            .put_leased(key, me.as_bytes().to_vec(), lease);
        let won = store.txn(t).await?;
        if won.succeeded {
            tracing::info!(key, me, "leading");
            let lost = CancellationToken::new();
            let renewal = CancellationToken::new();
            tokio::spawn(renew(
                store.clone(),
                lease,
                ttl,
                granted,
                lost.clone(),
                renewal.clone(),
            ));
            return Ok(Some(Leader {
                lease,
                revision: won.revision,
                lost,
                store,
                _renewal: renewal.drop_guard(),
            }));
        }
        let _ = store.revoke_lease(lease).await;
        let mut w = store.watch(key).await?;
        if !w.initial.iter().any(|(k, _)| k == key) {
            continue;
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(None),
                // Looked at again every TTL, whatever the watch says: a watch served by a store member that stopped
                // hearing of changes must not keep a candidate waiting for a leader long dead.
                _ = tokio::time::sleep(ttl) => {
                    match store.get(key).await {
                        Ok(None) => break,
                        Ok(Some(_)) => {}
                        // The store busy (an etcd election): looked at again next time, the watch still on.
                        Err(e) => tracing::debug!(error = %e, "cannot look at the leader key"),
                    }
                }
                e = w.events.next() => match e {
                    Some(Ok(Event::Delete { key: k, .. })) if k == key => break,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => return Err(StoreError::Unavailable("the watch of the leader key ended".into())),
                },
            }
        }
    }
}

async fn renew(
    store: Arc<dyn Store>,
    lease: LeaseId,
    ttl: Duration,
    granted: tokio::time::Instant,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let every = ttl / 3;
    // The lease may run out on the store's side at `last_renewed + ttl` (a renewal counts from when it was asked):
    // acting stops a renewal period before that, whatever a slow or hung renewal call is doing meanwhile, and
    // renewals are asked every period from the last one that succeeded, not from when a slow one returned.
    let mut last_renewed = granted;
    let mut next = granted + every;
    loop {
        let deadline = last_renewed + ttl - every;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(lease, "leadership lost: no renewal for {:?}", last_renewed.elapsed());
                lost.cancel();
                return;
            }
            _ = tokio::time::sleep_until(next) => {}
        }
        let asked = tokio::time::Instant::now();
        let renewed = tokio::select! {
            _ = stop.cancelled() => return,
            r = store.keep_alive(lease) => Some(r),
            _ = tokio::time::sleep_until(deadline) => None,
        };
        match renewed {
            Some(Ok(())) => {
                last_renewed = asked;
                next = asked + every;
            }
            // Gone for good: another agent may lead already.
            Some(Err(e @ StoreError::LeaseExpired(_))) => {
                tracing::warn!(lease, error = %e, "leadership lost: the lease is gone");
                lost.cancel();
                return;
            }
            // The store did not answer this time (an etcd election, a connection reset): asked again soon, until
            // the deadline.
            Some(Err(e)) => {
                tracing::warn!(lease, error = %e, "a lease renewal failed; asking again");
                next = tokio::time::Instant::now() + every / 4;
            }
            None => {
                tracing::warn!(
                    lease,
                    "leadership lost: a lease renewal took until {:?} after the last one",
                    ttl - every
                );
                lost.cancel();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::super::store::{Versioned, Watch};
    use super::*;

    /// How long a renewal takes and what it answers (`None`: it never does).
    type Renewal = (Duration, Option<Result<(), StoreError>>);

    /// Leads at once; each renewal takes the time and gives the answer scripted for it, in turn (then hangs);
    /// records when each was asked.
    struct Scripted {
        renewals: Mutex<std::collections::VecDeque<Renewal>>,
        asked: Mutex<Vec<tokio::time::Instant>>,
        /// Another agent holds the key; its watch never tells of a change.
        taken: std::sync::atomic::AtomicBool,
    }

    fn held() -> Versioned {
        Versioned {
            value: b"other".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            lease: Some(1),
        }
    }

    #[async_trait]
    impl Store for Scripted {
        async fn get(&self, _: &str) -> Result<Option<Versioned>, StoreError> {
            Ok(self
                .taken
                .load(std::sync::atomic::Ordering::SeqCst)
                .then(held))
        }
        async fn list(&self, _: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
            Ok(Vec::new())
        }
        async fn txn(&self, _: Txn) -> Result<super::super::store::TxnResult, StoreError> {
            Ok(super::super::store::TxnResult {
                succeeded: !self.taken.load(std::sync::atomic::Ordering::SeqCst),
                revision: 1,
            })
        }
        async fn watch(&self, key: &str) -> Result<Watch, StoreError> {
            Ok(Watch {
                initial: vec![(key.to_string(), held())],
                revision: 1,
                events: futures_util::stream::pending().boxed(),
            })
        }
        async fn grant_lease(&self, _: Duration) -> Result<LeaseId, StoreError> {
            Ok(7)
        }
        async fn keep_alive(&self, _: LeaseId) -> Result<(), StoreError> {
            self.asked.lock().unwrap().push(tokio::time::Instant::now());
            let next = self.renewals.lock().unwrap().pop_front();
            match next {
                Some((took, Some(answer))) => {
                    tokio::time::sleep(took).await;
                    answer
                }
                _ => std::future::pending().await,
            }
        }
        async fn revoke_lease(&self, _: LeaseId) -> Result<(), StoreError> {
            Ok(())
        }
    }

    async fn lead(
        renewals: Vec<Renewal>,
        ttl: Duration,
    ) -> (Arc<Scripted>, Leader, tokio::time::Instant) {
        let s = Arc::new(Scripted {
            renewals: Mutex::new(renewals.into()),
            asked: Mutex::new(Vec::new()),
            taken: Default::default(),
        });
        let t0 = tokio::time::Instant::now();
        let leader = campaign(s.clone(), "/leader", "me", ttl, &CancellationToken::new())
            .await
            .unwrap()
            .unwrap();
        (s, leader, t0)
    }

    const MS: Duration = Duration::from_millis(1);

    /// A renewal that succeeds late, then one that hangs: acting stops a renewal period before the lease can run out
    /// on the store's side (the last successful renewal's ask plus the TTL). Before, the next renewal was asked a
    /// period after the slow one returned and given a period more: leadership was given up just as the lease ran
    /// out (about when another agent may start acting), and later still with a late timer.
    #[tokio::test(start_paused = true)]
    async fn acting_stops_a_renewal_period_before_the_lease_can_run_out() {
        let ttl = 3000 * MS;
        let (s, leader, t0) = lead(vec![(990 * MS, Some(Ok(())))], ttl).await;
        leader.lost().cancelled().await;
        let lost = tokio::time::Instant::now();
        let asked = s.asked.lock().unwrap().clone();
        assert_eq!(asked[0] - t0, 1000 * MS);
        assert!(asked.len() >= 2, "{asked:?}");
        assert_eq!(
            asked[1] - t0,
            2000 * MS,
            "the next renewal is asked a period after the last good one was asked"
        );
        assert_eq!(
            lost - asked[0],
            ttl - ttl / 3,
            "given up a renewal period before the lease can run out"
        );
    }

    /// A renewal the store fails for now (an etcd election, a connection reset) is asked again, and leadership
    /// goes on; before, any failed renewal gave leadership up (and a restart with no leader for a TTL followed).
    #[tokio::test(start_paused = true)]
    async fn a_renewal_the_store_fails_for_now_is_asked_again() {
        let ttl = 3000 * MS;
        let busy = || Some(Err(StoreError::Unavailable("leader changed".into())));
        let ok = || Some(Ok(()));
        let (s, leader, _) = lead(
            vec![
                (10 * MS, busy()),
                (10 * MS, ok()),
                (10 * MS, ok()),
                (10 * MS, ok()),
            ],
            ttl,
        )
        .await;
        tokio::time::sleep(3500 * MS).await;
        assert!(
            !leader.lost().is_cancelled(),
            "{:?}",
            s.asked.lock().unwrap()
        );
        assert!(s.asked.lock().unwrap().len() >= 4);
    }

    /// The store saying the lease is gone ends leadership at once.
    #[tokio::test(start_paused = true)]
    async fn a_lease_the_store_says_is_gone_ends_leadership_at_once() {
        let ttl = 3000 * MS;
        let (_s, leader, t0) =
            lead(vec![(10 * MS, Some(Err(StoreError::LeaseExpired(7))))], ttl).await;
        leader.lost().cancelled().await;
        assert_eq!(tokio::time::Instant::now() - t0, 1010 * MS);
    }

    /// A candidate whose watch of the leader key never tells it the key went (a store member that stopped hearing of
    /// changes) looks again every TTL and leads once the key is gone; before, it waited for ever.
    #[tokio::test(start_paused = true)]
    async fn a_candidate_whose_watch_is_silent_still_leads_once_the_key_is_gone() {
        let ttl = 3000 * MS;
        let s = Arc::new(Scripted {
            renewals: Mutex::new(Default::default()),
            asked: Mutex::new(Vec::new()),
            taken: true.into(),
        });
        let t0 = tokio::time::Instant::now();
        let c = tokio::spawn({
            let s = s.clone();
            async move { campaign(s, "/leader", "me", ttl, &CancellationToken::new()).await }
        });
        tokio::time::sleep(100 * MS).await;
        s.taken.store(false, std::sync::atomic::Ordering::SeqCst);
        let won = tokio::time::timeout(10 * ttl, c)
            .await
            .expect("still waiting for a watch that never speaks")
            .unwrap()
            .unwrap();
        assert!(won.is_some());
        assert!(tokio::time::Instant::now() - t0 <= ttl + 100 * MS);
    }
}
