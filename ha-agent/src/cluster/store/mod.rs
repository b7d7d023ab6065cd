//! The cluster agent's store: a versioned key-value space with atomic conditional transactions, prefix reads, a
//! gapless watch and leases, behind one [`Store`] trait. The store knows nothing of volumes or nodes: the model
//! above it stores its records as bytes under its own keys.
//!
//! - [`embedded`]: redb in one file under the agent's data directory (one agent, no etcd): the default.
//! - [`etcd`]: a real etcd cluster (several agents, one leader).
//! - [`fenced`]: a store whose writes hold only while this agent leads (what a leader acts through).
//! - [`metered`]: a store wrapped to time every request (the agent's store-latency metric).
//! - [`schema`]: the schema version kept in the store; an agent refuses a store written by a newer schema.
//! - The conformance suite both implementations pass is in `tests/it/store` (etcd there is a real one).
//!
//! Revisions are etcd's: one store-wide counter, bumped by every transaction that writes; a key's `mod_revision` is
//! the revision that last wrote it, 0 when it does not exist (which is how "create only if absent" is asked).

pub mod embedded;
pub mod etcd;
pub mod fenced;
pub mod metered;
pub mod schema;

use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

/// A store-wide revision.
pub type Revision = i64;
/// A lease: keys put with it disappear when it expires or is revoked.
pub type LeaseId = i64;

/// Why a store call failed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The store cannot be reached or failed the call; it may work again later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The lease is gone (expired or revoked), or never existed.
    #[error("lease {0:x} is gone")]
    LeaseExpired(LeaseId),
    /// A watch fell behind what the store keeps (compacted history, or a consumer too slow): list again.
    #[error("watch fell behind the store: {0}")]
    WatchLost(String),
    #[error(
        "the store was written by schema version {found}; this agent knows versions up to {supported}"
    )]
    NewerSchema { found: u32, supported: u32 },
    /// A write of an agent that no longer leads (another agent holds the leader key now).
    #[error("this cluster agent no longer leads: its write was refused")]
    NotLeader,
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("invalid store request: {0}")]
    InvalidArgument(String),
}

/// A key's value with its revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    /// The revision that created the key (kept across updates).
    pub create_revision: Revision,
    /// The revision that last wrote it.
    pub mod_revision: Revision,
    /// The lease it was put with.
    pub lease: Option<LeaseId>,
}

/// A condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key was last written at exactly `revision` (0: the key does not exist).
    ModRevision { key: String, revision: Revision },
    /// The key exists and holds exactly `value`.
    Value { key: String, value: Vec<u8> },
}

/// A write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
    DeletePrefix {
        prefix: String,
    },
}

/// Writes applied together, all or none, when every condition holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub when: Vec<Compare>,
    pub then: Vec<Op>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    pub fn when(mut self, c: Compare) -> Txn {
        self.when.push(c);
        self
    }

    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Txn {
        self.then.push(Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        });
        self
    }

    pub fn put_leased(
        mut self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Txn {
        self.then.push(Op::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        });
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Txn {
        self.then.push(Op::Delete { key: key.into() });
        self
    }

    pub fn delete_prefix(mut self, prefix: impl Into<String>) -> Txn {
        self.then.push(Op::DeletePrefix {
            prefix: prefix.into(),
        });
        self
    }

    /// Checks the keys: non-empty, and a prefix delete never empty (it would erase the whole store).
    pub fn validate(&self) -> Result<(), StoreError> {
        let keys = self.when.iter().map(|c| match c {
            Compare::ModRevision { key, .. } | Compare::Value { key, .. } => key,
        });
        let writes = self.then.iter().map(|o| match o {
            Op::Put { key, .. } | Op::Delete { key } => key,
            Op::DeletePrefix { prefix } => prefix,
        });
        if keys.chain(writes).any(|k| k.is_empty()) {
            return Err(StoreError::InvalidArgument("empty key or prefix".into()));
        }
        Ok(())
    }
}

/// What a transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the conditions held (and the writes were applied).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put { key: String, value: Versioned },
    Delete { key: String, revision: Revision },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put { key, .. } | Event::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            Event::Put { value, .. } => value.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// The keys under a prefix at one revision, and every change after it, in order, with no gap between the two.
pub struct Watch {
    pub initial: Vec<(String, Versioned)>,
    pub revision: Revision,
    pub events: BoxStream<'static, Result<Event, StoreError>>,
}

/// The cluster agent's store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;

    /// Applies `txn.then` atomically if every condition of `txn.when` holds; nothing otherwise.
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError>;

    /// The keys under `prefix` now and the changes after them.
    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError>;

    /// A lease that lives `ttl` past its last keep-alive (etcd rounds up to whole seconds, at least its minimum).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews a lease; [`StoreError::LeaseExpired`] if it is already gone.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Ends a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        Ok(self.txn(Txn::new().put(key, value)).await?.revision)
    }

    /// Deletes `key`; whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let Some(v) = self.get(key).await? else {
            return Ok(false);
        };
        let t = Txn::new()
            .when(Compare::ModRevision {
                key: key.into(),
                revision: v.mod_revision,
            })
            .delete(key);
        Ok(self.txn(t).await?.succeeded)
    }

    /// Puts `value` at `key` only if `key` was last written at `revision` (0: only if absent); whether it did.
    async fn compare_and_put(
        &self,
        key: &str,
        revision: Revision,
        value: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let t = Txn::new()
            .when(Compare::ModRevision {
                key: key.into(),
                revision,
            })
            .put(key, value);
        Ok(self.txn(t).await?.succeeded)
    }
}
