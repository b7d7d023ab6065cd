//! A [`Store`] that times every request to the store under it and hands the time to an observer (the agent's
//! store-latency histogram), by request: get, list, txn (every write), watch, and the lease requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{LeaseId, Store, StoreError, Txn, TxnResult, Versioned, Watch};

/// Told each request's name and how long it took.
pub type Observer = Arc<dyn Fn(&'static str, Duration) + Send + Sync>;

pub struct MeteredStore {
    inner: Arc<dyn Store>,
    observe: Observer,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn Store>, observe: Observer) -> MeteredStore {
        MeteredStore { inner, observe }
    }

    async fn timed<T>(&self, request: &'static str, f: impl Future<Output = T>) -> T {
        let t = Instant::now();
        let r = f.await;
        (self.observe)(request, t.elapsed());
        r
    }
}

#[async_trait]
impl Store for MeteredStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.timed("get", self.inner.get(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.timed("list", self.inner.list(prefix)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        self.timed("txn", self.inner.txn(txn)).await
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        self.timed("watch", self.inner.watch(prefix)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.timed("grant_lease", self.inner.grant_lease(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.timed("keep_alive", self.inner.keep_alive(lease)).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.timed("revoke_lease", self.inner.revoke_lease(lease))
            .await
    }
}
