//! A [`Store`] whose every write holds only while this agent still leads: each transaction also asks that the
//! leader key is the one this agent wrote when it won (same `mod_revision`). An agent that lost leadership without
//! noticing yet (a long pause, a partition) can then not overwrite what the new leader decided; its write fails with
//! [`StoreError::NotLeader`]. Reads, watches and leases pass through.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Compare, LeaseId, Revision, Store, StoreError, Txn, TxnResult, Versioned, Watch};

pub struct FencedStore {
    inner: Arc<dyn Store>,
    key: String,
    revision: Revision,
}

impl FencedStore {
    /// Writes through `inner` while `key` has the `revision` this agent's winning write gave it.
    pub fn new(inner: Arc<dyn Store>, key: &str, revision: Revision) -> FencedStore {
        FencedStore {
            inner,
            key: key.to_string(),
            revision,
        }
    }
}

#[async_trait]
impl Store for FencedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.inner.list(prefix).await
    }

    async fn txn(&self, mut txn: Txn) -> Result<TxnResult, StoreError> {
        txn.when.push(Compare::ModRevision {
            key: self.key.clone(),
            revision: self.revision,
        });
        let r = self.inner.txn(txn).await?;
        if !r.succeeded {
            let now = self.inner.get(&self.key).await?.map(|v| v.mod_revision);
            if now != Some(self.revision) {
                return Err(StoreError::NotLeader);
            }
        }
        Ok(r)
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        self.inner.watch(prefix).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke_lease(lease).await
    }
}
