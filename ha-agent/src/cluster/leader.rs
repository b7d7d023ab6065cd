//! One acting cluster agent among several that share a store: the leader is whoever holds `key`, put with its
//! lease. A candidate that finds the key taken waits for it to be deleted (the leader resigned, or its lease
//! expired because it died or was cut off) and tries again. The leader renews its lease every third of the TTL;
//! the moment a renewal fails, or no renewal has succeeded for the TTL less one renewal period (a hung store call
//! counts as a failure), [`Leader::lost`] fires and the agent must stop acting, since another may soon lead.

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
    // The lease may run out on the store's side at `last_renewed + ttl`; stop acting a renewal period before that,
    // whatever a slow or hung renewal call is doing meanwhile.
    let mut last_renewed = granted;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let asked = tokio::time::Instant::now();
        match tokio::time::timeout(every, store.keep_alive(lease)).await {
            Ok(Ok(())) => last_renewed = asked,
            Ok(Err(e)) => {
                tracing::warn!(lease, error = %e, "leadership lost: the lease could not be renewed");
                lost.cancel();
                return;
            }
            Err(_) => tracing::warn!(lease, "a lease renewal took longer than {every:?}"),
        }
        if last_renewed.elapsed() + every >= ttl {
            tracing::warn!(
                lease,
                "leadership lost: no renewal for {:?}",
                last_renewed.elapsed()
            );
            lost.cancel();
            return;
        }
    }
}
