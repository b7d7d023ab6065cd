//! The etcd store: the same [`Store`] over a real etcd cluster (the `etcd-client` crate, etcd's v3 gRPC API), for
//! several cluster agents that share state and elect a leader. Keys, revisions, transactions, watches and leases
//! are etcd's own; this module only translates.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as ECompare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    KeyValue, PutOptions, Txn as ETxn, TxnOp, WatchOptions,
};
use futures_util::StreamExt;

use super::{
    Compare, Event, LeaseId, Op, Revision, Store, StoreError, Txn, TxnResult, Versioned, Watch,
};

/// How long a call waits for etcd before the store counts as unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to an etcd cluster; cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

/// An error of a call about `lease`: etcd says "lease not found" for a lease that expired or was revoked.
fn lease_error(e: etcd_client::Error, lease: LeaseId) -> StoreError {
    if e.to_string().contains("lease not found") {
        StoreError::LeaseExpired(lease)
    } else {
        unavailable(e)
    }
}

fn versioned(kv: &KeyValue) -> Versioned {
    Versioned {
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: Some(kv.lease()).filter(|l| *l != 0),
    }
}

fn key_of(kv: &KeyValue) -> Result<String, StoreError> {
    kv.key_str()
        .map(str::to_string)
        .map_err(|e| StoreError::Corrupt(format!("a key that is not UTF-8: {e}")))
}

/// Keys per read of a listing: each response stays far below gRPC's 4 MiB message limit.
const PAGE: i64 = 500;

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdStore {
    /// Every key under `prefix` at one revision, read [`PAGE`] keys at a time, and that revision.
    async fn range(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Versioned)>, Revision), StoreError> {
        let mut c = self.client.clone();
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut revision: Revision = 0;
        let mut all = Vec::new();
        loop {
            let opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE)
                .with_revision(revision);
            let r = c.get(from.clone(), Some(opts)).await.map_err(unavailable)?;
            if revision == 0 {
                revision = r.header().map_or(0, |h| h.revision());
            }
            for kv in r.kvs() {
                all.push((key_of(kv)?, versioned(kv)));
            }
            match r.kvs().last() {
                Some(last) if r.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((all, revision)),
            }
        }
    }

    /// Connects to `endpoints` (`http://host:port`); fails if none answers.
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            // A member cut off from the quorum fails calls and ends watches rather than serve them stale: a candidate
            // watching the leader key through it would otherwise never see the key go.
            .with_require_leader(true);
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(unavailable)?;
        let s = EtcdStore { client };
        // Connecting is lazy; one read proves the cluster answers.
        s.get("/keelson/").await?;
        Ok(s)
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let r = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(unavailable)?;
        Ok(r.kvs().first().map(versioned))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        Ok(self.range(prefix).await?.0)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        txn.validate()?;
        let when: Vec<ECompare> = txn
            .when
            .iter()
            .map(|c| match c {
                Compare::ModRevision { key, revision } => {
                    ECompare::mod_revision(key.as_str(), CompareOp::Equal, *revision)
                }
                Compare::Value { key, value } => {
                    ECompare::value(key.as_str(), CompareOp::Equal, value.clone())
                }
            })
            .collect();
        let leases: Vec<LeaseId> = txn
            .then
            .iter()
            .filter_map(|o| match o {
                Op::Put { lease, .. } => *lease,
                _ => None,
            })
            .collect();
        let then: Vec<TxnOp> = txn
            .then
            .into_iter()
            .map(|o| match o {
                Op::Put { key, value, lease } => {
                    TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l)))
                }
                Op::Delete { key } => TxnOp::delete(key, None),
                Op::DeletePrefix { prefix } => {
                    TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix()))
                }
            })
            .collect();
        let r = self
            .client
            .clone()
            .txn(ETxn::new().when(when).and_then(then))
            .await
            .map_err(|e| lease_error(e, leases.first().copied().unwrap_or(0)))?;
        Ok(TxnResult {
            succeeded: r.succeeded(),
            revision: r.header().map_or(0, |h| h.revision()),
        })
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        let mut c = self.client.clone();
        let (initial, revision) = self.range(prefix).await?;
        let stream = c
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .map_err(unavailable)?;
        let events = stream
            .map(|r| -> Vec<Result<Event, StoreError>> {
                let r = match r {
                    Ok(r) => r,
                    Err(e) => return vec![Err(unavailable(e))],
                };
                if r.canceled() {
                    return vec![Err(StoreError::WatchLost(format!(
                        "etcd ended the watch (compacted to {}): {}",
                        r.compact_revision(),
                        r.cancel_reason()
                    )))];
                }
                r.events()
                    .iter()
                    .filter_map(|e| {
                        let kv = e.kv()?;
                        Some(key_of(kv).map(|key| match e.event_type() {
                            EventType::Put => Event::Put {
                                key,
                                value: versioned(kv),
                            },
                            EventType::Delete => Event::Delete {
                                key,
                                revision: kv.mod_revision(),
                            },
                        }))
                    })
                    .collect()
            })
            .flat_map(futures_util::stream::iter)
            .boxed();
        Ok(Watch {
            initial,
            revision,
            events,
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::InvalidArgument("a lease needs a TTL".into()));
        }
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let r = self
            .client
            .clone()
            .lease_grant(secs as i64, None)
            .await
            .map_err(unavailable)?;
        Ok(r.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let (mut keeper, mut answers) = self
            .client
            .clone()
            .lease_keep_alive(lease)
            .await
            .map_err(|e| lease_error(e, lease))?;
        keeper
            .keep_alive()
            .await
            .map_err(|e| lease_error(e, lease))?;
        match answers.message().await.map_err(|e| lease_error(e, lease))? {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseExpired(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.client
            .clone()
            .lease_revoke(lease)
            .await
            .map(drop)
            .map_err(|e| lease_error(e, lease))
    }
}
