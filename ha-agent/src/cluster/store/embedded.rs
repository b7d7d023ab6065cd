//! The embedded store: redb in one file, for a cluster agent that runs alone (a single node, `scripts/run.sh`).
//!
//! Every write is one redb transaction, durable when it returns (redb commits with fsync). A store-wide revision
//! in the `meta` table gives etcd's ordering. Watches are fed from an in-process channel; a mutex makes "commit
//! and publish" and "read a snapshot and subscribe" exclusive, so a watch sees every change after its snapshot
//! and none twice. Leases live in memory: a lease cannot outlive the process that holds it, so opening the store
//! deletes every key a lease of an earlier process had put. redb locks its file, so a second agent on the same data
//! directory is refused.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{
    Compare, Event, LeaseId, Op, Revision, Store, StoreError, Txn, TxnResult, Versioned, Watch,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
/// Bytes before a value in the kv table: create revision, mod revision, lease (0 = none), little-endian i64s.
const HEADER: usize = 24;
/// Change batches a watch may fall behind by before it is told to list again.
const WATCH_BACKLOG: usize = 4096;
/// How often expired leases are looked for.
const LEASE_TICK: Duration = Duration::from_millis(50);

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// A watch's snapshot, its revision, and the changes after it.
type Subscription = (
    Vec<(String, Versioned)>,
    Revision,
    broadcast::Receiver<Arc<Vec<Event>>>,
);

struct Inner {
    db: Database,
    /// Held while committing and publishing a change, and while a watch takes its snapshot and subscribes.
    publish: Mutex<()>,
    events: broadcast::Sender<Arc<Vec<Event>>>,
    leases: Mutex<HashMap<LeaseId, LeaseState>>,
}

/// The embedded store; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn encode(v: &Versioned) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + v.value.len());
    b.extend_from_slice(&v.create_revision.to_le_bytes());
    b.extend_from_slice(&v.mod_revision.to_le_bytes());
    b.extend_from_slice(&v.lease.unwrap_or(0).to_le_bytes());
    b.extend_from_slice(&v.value);
    b
}

fn decode(key: &str, b: &[u8]) -> Result<Versioned, StoreError> {
    if b.len() < HEADER {
        return Err(StoreError::Corrupt(format!(
            "record of {key} is {} bytes",
            b.len()
        )));
    }
    let int = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i * 8..i * 8 + 8]);
        i64::from_le_bytes(a)
    };
    Ok(Versioned {
        create_revision: int(0),
        mod_revision: int(1),
        lease: Some(int(2)).filter(|l| *l != 0),
        value: b[HEADER..].to_vec(),
    })
}

/// The end of the key range that starts with `prefix` (exclusive), or `None` for "to the end".
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(c) = chars.pop() {
        if let Some(next) = char::from_u32(c as u32 + 1) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `path`. Must run inside a tokio runtime (lease expiry is a task).
    pub async fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let p = path.to_path_buf();
        let db = tokio::task::spawn_blocking(move || Database::create(&p))
            .await
            .map_err(unavailable)?
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                    "{} is in use by another cluster agent",
                    path.display()
                )),
                e => StoreError::Unavailable(format!("opening {}: {e}", path.display())),
            })?;
        let (events, _) = broadcast::channel(WATCH_BACKLOG);
        let inner = Arc::new(Inner {
            db,
            publish: Mutex::new(()),
            events,
            leases: Mutex::new(HashMap::new()),
        });
        let i = inner.clone();
        tokio::task::spawn_blocking(move || i.forget_dead_leases())
            .await
            .map_err(unavailable)??;
        tokio::spawn(expire_leases(Arc::downgrade(&inner)));
        Ok(EmbeddedStore { inner })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(unavailable)?
    }
}

impl Inner {
    fn revision(&self, t: &impl ReadableTable<&'static str, i64>) -> Result<Revision, StoreError> {
        Ok(t.get(REVISION)
            .map_err(unavailable)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    fn read_revision(&self) -> Result<Revision, StoreError> {
        let r = self.db.begin_read().map_err(unavailable)?;
        match r.open_table(META) {
            Ok(t) => self.revision(&t),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(unavailable(e)),
        }
    }

    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let r = self.db.begin_read().map_err(unavailable)?;
        let t = match r.open_table(KV) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(unavailable(e)),
        };
        let v = t.get(key).map_err(unavailable)?;
        v.map(|v| decode(key, v.value())).transpose()
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let r = self.db.begin_read().map_err(unavailable)?;
        let t = match r.open_table(KV) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(unavailable(e)),
        };
        let end = prefix_end(prefix);
        let range = match &end {
            Some(end) => t.range::<&str>(prefix..end.as_str()),
            None => t.range::<&str>(prefix..),
        }
        .map_err(unavailable)?;
        range
            .map(|item| {
                let (k, v) = item.map_err(unavailable)?;
                let key = k.value().to_string();
                let v = decode(&key, v.value())?;
                Ok((key, v))
            })
            .collect()
    }

    fn txn(&self, txn: &Txn) -> Result<TxnResult, StoreError> {
        let publish = lock(&self.publish);
        self.txn_locked(txn, &publish)
    }

    /// Applies a transaction: conditions, then writes, one redb transaction, then the events. The caller holds
    /// the publish lock.
    fn txn_locked(
        &self,
        txn: &Txn,
        _publish: &MutexGuard<'_, ()>,
    ) -> Result<TxnResult, StoreError> {
        txn.validate()?;
        let w = self.db.begin_write().map_err(unavailable)?;
        let mut events = Vec::new();
        let result = {
            let mut kv = w.open_table(KV).map_err(unavailable)?;
            let mut meta = w.open_table(META).map_err(unavailable)?;
            let now = self.revision(&meta)?;
            let current = |kv: &redb::Table<&str, &[u8]>,
                           key: &str|
             -> Result<Option<Versioned>, StoreError> {
                kv.get(key)
                    .map_err(unavailable)?
                    .map(|v| decode(key, v.value()))
                    .transpose()
            };
            let mut holds = true;
            for c in &txn.when {
                holds &= match c {
                    Compare::ModRevision { key, revision } => {
                        current(&kv, key)?.map_or(0, |v| v.mod_revision) == *revision
                    }
                    Compare::Value { key, value } => {
                        current(&kv, key)?.is_some_and(|v| v.value == *value)
                    }
                };
            }
            if !holds {
                return Ok(TxnResult {
                    succeeded: false,
                    revision: now,
                });
            }
            let mut leases = lock(&self.leases);
            for op in &txn.then {
                if let Op::Put { lease: Some(l), .. } = op
                    && !leases.contains_key(l)
                {
                    return Err(StoreError::LeaseExpired(*l));
                }
            }
            let rev = now + 1;
            for op in &txn.then {
                match op {
                    Op::Put { key, value, lease } => {
                        let old = current(&kv, key)?;
                        if let Some(l) = old.as_ref().and_then(|o| o.lease) {
                            leases.get_mut(&l).map(|s| s.keys.remove(key));
                        }
                        if let Some(l) = lease {
                            leases.get_mut(l).map(|s| s.keys.insert(key.clone()));
                        }
                        let v = Versioned {
                            value: value.clone(),
                            create_revision: old.map_or(rev, |o| o.create_revision),
                            mod_revision: rev,
                            lease: *lease,
                        };
                        kv.insert(key.as_str(), encode(&v).as_slice())
                            .map_err(unavailable)?;
                        events.push(Event::Put {
                            key: key.clone(),
                            value: v,
                        });
                    }
                    Op::Delete { key } => {
                        if let Some(old) = kv.remove(key.as_str()).map_err(unavailable)? {
                            let old = decode(key, old.value())?;
                            if let Some(l) = old.lease {
                                leases.get_mut(&l).map(|s| s.keys.remove(key));
                            }
                            events.push(Event::Delete {
                                key: key.clone(),
                                revision: rev,
                            });
                        }
                    }
                    Op::DeletePrefix { prefix } => {
                        let keys: Vec<String> = {
                            let end = prefix_end(prefix);
                            let range = match &end {
                                Some(end) => kv.range::<&str>(prefix.as_str()..end.as_str()),
                                None => kv.range::<&str>(prefix.as_str()..),
                            }
                            .map_err(unavailable)?;
                            range
                                .map(|i| i.map(|(k, _)| k.value().to_string()).map_err(unavailable))
                                .collect::<Result<_, _>>()?
                        };
                        for key in keys {
                            if let Some(old) = kv.remove(key.as_str()).map_err(unavailable)?
                                && let Some(l) = decode(&key, old.value())?.lease
                            {
                                leases.get_mut(&l).map(|s| s.keys.remove(&key));
                            }
                            events.push(Event::Delete { key, revision: rev });
                        }
                    }
                }
            }
            if events.is_empty() {
                // Nothing changed (deletes of absent keys): no new revision, as in etcd.
                TxnResult {
                    succeeded: true,
                    revision: now,
                }
            } else {
                meta.insert(REVISION, rev).map_err(unavailable)?;
                TxnResult {
                    succeeded: true,
                    revision: rev,
                }
            }
        };
        if events.is_empty() {
            w.abort().map_err(unavailable)?;
        } else {
            w.commit().map_err(unavailable)?;
            let _ = self.events.send(Arc::new(events));
        }
        Ok(result)
    }

    /// Deletes the keys of leases held by an earlier process (its leases ended with it).
    fn forget_dead_leases(&self) -> Result<(), StoreError> {
        let dead: Vec<String> = self
            .list("")?
            .into_iter()
            .filter(|(_, v)| v.lease.is_some())
            .map(|(k, _)| k)
            .collect();
        if !dead.is_empty() {
            let mut t = Txn::new();
            for k in dead {
                t = t.delete(k);
            }
            self.txn(&t)?;
        }
        Ok(())
    }

    /// Ends `lease`: forgets it and deletes the keys still put with it, in one step no other write slips into.
    fn end_lease(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let publish = lock(&self.publish);
        let Some(state) = lock(&self.leases).remove(&lease) else {
            return Ok(false);
        };
        if !state.keys.is_empty() {
            let mut t = Txn::new();
            for k in state.keys {
                t = t.delete(k);
            }
            self.txn_locked(&t, &publish)?;
        }
        Ok(true)
    }

    fn watch(&self, prefix: &str) -> Result<Subscription, StoreError> {
        let _publish = lock(&self.publish);
        let initial = self.list(prefix)?;
        let revision = self.read_revision()?;
        Ok((initial, revision, self.events.subscribe()))
    }
}

/// Ends leases whose deadline passed; stops when the store is dropped.
async fn expire_leases(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(LEASE_TICK).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        let expired: Vec<LeaseId> = lock(&inner.leases)
            .iter()
            .filter(|(_, s)| s.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            continue;
        }
        let r = tokio::task::spawn_blocking(move || {
            for l in expired {
                if let Err(e) = inner.end_lease(l) {
                    tracing::warn!(lease = l, error = %e, "cannot delete the keys of an expired lease");
                }
            }
        })
        .await;
        if r.is_err() {
            return;
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let key = key.to_string();
        self.blocking(move |i| i.get(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |i| i.list(&prefix)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        self.blocking(move |i| i.txn(&txn)).await
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        let p = prefix.to_string();
        let (initial, revision, rx) = self.blocking(move |i| i.watch(&p)).await?;
        let prefix = prefix.to_string();
        let events = futures_util::stream::unfold(Some(rx), move |rx| {
            let prefix = prefix.clone();
            async move {
                let mut rx = rx?;
                match rx.recv().await {
                    Ok(batch) => {
                        let mine: Vec<Result<Event, StoreError>> = batch
                            .iter()
                            .filter(|e| e.key().starts_with(&prefix))
                            .cloned()
                            .map(Ok)
                            .collect();
                        Some((mine, Some(rx)))
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => Some((
                        vec![Err(StoreError::WatchLost(format!(
                            "{n} change batches behind"
                        )))],
                        None,
                    )),
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            }
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
        let id = (uuid::Uuid::new_v4().as_u64_pair().0 >> 1) as i64 | 1;
        lock(&self.inner.leases).insert(
            id,
            LeaseState {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut leases = lock(&self.inner.leases);
        let s = leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseExpired(lease))?;
        if s.deadline <= Instant::now() {
            return Err(StoreError::LeaseExpired(lease));
        }
        s.deadline = Instant::now() + s.ttl;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        if self.blocking(move |i| i.end_lease(lease)).await? {
            Ok(())
        } else {
            Err(StoreError::LeaseExpired(lease))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges_end_after_the_last_key_with_the_prefix() {
        assert_eq!(prefix_end("/a/"), Some("/a0".to_string()));
        assert_eq!(prefix_end("ab"), Some("ac".to_string()));
        assert_eq!(prefix_end(""), None);
    }

    #[test]
    fn records_round_trip_and_short_ones_are_corrupt() {
        let v = Versioned {
            value: b"x".to_vec(),
            create_revision: 3,
            mod_revision: 9,
            lease: Some(77),
        };
        assert_eq!(decode("k", &encode(&v)), Ok(v));
        assert!(matches!(decode("k", &[1, 2]), Err(StoreError::Corrupt(_))));
    }

    #[tokio::test]
    async fn a_second_agent_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let _first = EmbeddedStore::open(&path).await.unwrap();
        let e = EmbeddedStore::open(&path).await.err();
        assert!(
            matches!(&e, Some(StoreError::Unavailable(m)) if m.contains("in use")),
            "{e:?}"
        );
    }
}
