//! Pools the agent manages: created through the cluster API on a named node and disk, recorded under
//! `/keelson/pools/<node>/<name>` before the engine is asked (persist, then act), and driven to their phase by
//! [`Pools::reconcile`]: a pool Creating or Created that its node does not report is created (or imported: the
//! engine's CreatePool imports a pool of that name already on the disk) again, which is how a node whose io-engine
//! restarted empty gets its pools back; a pool Deleting (a delete the agent died in) is destroyed until the engine
//! confirms, if no volume or snapshot record names anything in it (one the engine does not have open is imported
//! first, so that it can refuse for the replicas it holds), and is put back as it was otherwise. A delete the engine did
//! not carry out leaves the pool as it was.

use std::sync::Arc;
use std::time::Duration;

use proto::engine as epb;
use serde::{Deserialize, Serialize};
use tonic::Code;

use proto::engine::engine_client::EngineClient;
use tonic::transport::Channel;

use super::dataplane::{self, NodeEngineError};
use super::failpoint;
use super::node::NodeState;
use super::registry::{Registry, RegistryError};
use super::store::{Store, StoreError, Txn};

pub const PREFIX: &str = "/keelson/pools/";

pub(super) fn key(node: &str, name: &str) -> String {
    format!("{PREFIX}{node}/{name}")
}

/// Pools the agent destroyed (their record dropped once the engine destroyed them, or found none to destroy): what
/// an engine answers NotFound for in such a pool is gone with it (`garbage::destroyed_unless_pending`). Kept by node
/// and name; one made again under the name has a record again, which counts first.
pub(super) const DESTROYED: &str = "/keelson/pools-destroyed/";

pub(super) fn destroyed_key(node: &str, name: &str) -> String {
    format!("{DESTROYED}{node}/{name}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolPhase {
    Creating,
    Created,
    Deleting,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub node: String,
    pub name: String,
    pub disk: String,
    pub phase: PoolPhase,
    pub uuid: String,
    /// The engine's last refusal or failure, if any.
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolOpError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("pool {node}/{name} exists on disk {disk}")]
    AlreadyExists {
        node: String,
        name: String,
        disk: String,
    },
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("pool {0} is being deleted")]
    Deleting(String),
    /// The engine refused or failed; its gRPC code is kept for the caller.
    #[error("node {node}: {message}")]
    Engine {
        node: String,
        code: Code,
        message: String,
    },
    #[error("node {node} cannot be reached: {why}")]
    Unreachable { node: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("pool record {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

pub struct Pools {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    engine_timeout: Duration,
}

/// A managed pool with what its node reports of it now.
pub struct PoolView {
    pub record: PoolRecord,
    pub reported: Option<super::node::PoolSpec>,
}

impl Pools {
    pub fn new(store: Arc<dyn Store>, registry: Arc<Registry>, engine_timeout: Duration) -> Pools {
        Pools {
            store,
            registry,
            engine_timeout,
        }
    }

    async fn read(&self, node: &str, name: &str) -> Result<Option<(i64, PoolRecord)>, PoolOpError> {
        let k = key(node, name);
        match self.store.get(&k).await? {
            None => Ok(None),
            Some(v) => {
                let r = serde_json::from_slice(&v.value)
                    .map_err(|source| PoolOpError::Corrupt { key: k, source })?;
                Ok(Some((v.mod_revision, r)))
            }
        }
    }

    /// Writes `r` if its key is still at `rev` (0: absent); whether it did.
    async fn write(&self, rev: i64, r: &PoolRecord) -> Result<bool, PoolOpError> {
        let bytes = serde_json::to_vec(r).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(self
            .store
            .compare_and_put(&key(&r.node, &r.name), rev, bytes)
            .await?)
    }

    /// The engine API of an Online node.
    async fn engine(&self, node: &str) -> Result<EngineClient<Channel>, PoolOpError> {
        dataplane::node_engine(&self.registry, node, self.engine_timeout)
            .await
            .map_err(|e| match e {
                NodeEngineError::NotFound(n) => PoolOpError::NotFound(format!("node {n}")),
                e @ NodeEngineError::NotOnline { .. } => {
                    PoolOpError::FailedPrecondition(e.to_string())
                }
                NodeEngineError::Unreachable { node, why } => {
                    PoolOpError::Unreachable { node, why }
                }
                NodeEngineError::Registry(e) => e.into(),
            })
    }

    /// Asks the engine for the pool (creating or importing it); returns its UUID.
    async fn engine_create(&self, r: &PoolRecord) -> Result<String, PoolOpError> {
        let mut c = self.engine(&r.node).await?;
        let req = epb::CreatePoolRequest {
            name: r.name.clone(),
            disk: r.disk.clone(),
            ..Default::default()
        };
        match c.create_pool(req).await {
            Ok(p) => Ok(p.into_inner().uuid),
            Err(s) => Err(engine_error(&r.node, s)),
        }
    }

    pub async fn create(
        &self,
        node: &str,
        name: &str,
        disk: &str,
    ) -> Result<PoolRecord, PoolOpError> {
        if name.is_empty() || name.len() > 63 || name.contains('/') {
            return Err(PoolOpError::InvalidArgument(format!(
                "pool name {name:?} must be 1-63 bytes without '/'"
            )));
        }
        if !disk.starts_with('/') {
            return Err(PoolOpError::InvalidArgument(format!(
                "disk {disk:?} must be an absolute path"
            )));
        }
        self.engine(node).await?;
        let mut record = match self.read(node, name).await? {
            Some((_, r)) if r.disk != disk => {
                return Err(PoolOpError::AlreadyExists {
                    node: node.into(),
                    name: name.into(),
                    disk: r.disk,
                });
            }
            Some((_, r)) if r.phase == PoolPhase::Deleting => {
                return Err(PoolOpError::Deleting(format!("{node}/{name}")));
            }
            Some((_, r)) if r.phase == PoolPhase::Created => return Ok(r),
            Some((_, r)) => r,
            None => {
                let r = PoolRecord {
                    node: node.into(),
                    name: name.into(),
                    disk: disk.into(),
                    phase: PoolPhase::Creating,
                    uuid: String::new(),
                    reason: String::new(),
                };
                if !self.write(0, &r).await? {
                    return Err(PoolOpError::FailedPrecondition(format!(
                        "pool {node}/{name} was created meanwhile; ask again"
                    )));
                }
                r
            }
        };
        match self.engine_create(&record).await {
            Ok(uuid) => {
                record.phase = PoolPhase::Created;
                record.uuid = uuid;
                record.reason.clear();
                self.settle(&record).await?;
                tracing::info!(node, pool = name, disk, uuid = %record.uuid, "pool created");
                Ok(record)
            }
            // A refusal the engine will repeat: nothing was made, so nothing is recorded.
            Err(e) if refused(&e) => {
                self.store.delete(&key(node, name)).await?;
                Err(e)
            }
            // Anything else may succeed later: the record stays Creating and the reconciler retries.
            Err(e) => {
                record.reason = e.to_string();
                self.settle(&record).await?;
                Err(e)
            }
        }
    }

    async fn settle(&self, r: &PoolRecord) -> Result<(), PoolOpError> {
        self.settle_with(r, false).await
    }

    /// Writes `r` over whatever version of its record is there, unless the record is gone or a delete has begun
    /// meanwhile (a create or reconcile that ran concurrently with a delete must not write the pool back); the
    /// delete itself, undoing its own phase, passes `undo_delete`.
    async fn settle_with(&self, r: &PoolRecord, undo_delete: bool) -> Result<(), PoolOpError> {
        loop {
            let rev = match self.read(&r.node, &r.name).await? {
                Some((_, cur)) if cur.phase == PoolPhase::Deleting && !undo_delete => return Ok(()),
                Some((rev, _)) => rev,
                None => return Ok(()),
            };
            if self.write(rev, r).await? {
                return Ok(());
            }
        }
    }

    /// Deletes a pool: refused while `holders` (the volumes the agent keeps a replica of in it, asked once the
    /// delete is on record) names any, or while its engine refuses (it holds replicas); otherwise destroyed on its
    /// engine and forgotten.
    pub async fn delete(
        &self,
        node: &str,
        name: &str,
        holders: impl std::future::Future<Output = Result<Vec<String>, PoolOpError>>,
    ) -> Result<(), PoolOpError> {
        let Some((rev, mut r)) = self.read(node, name).await? else {
            return Err(PoolOpError::NotFound(format!("pool {node}/{name}")));
        };
        let before = r.phase;
        r.phase = PoolPhase::Deleting;
        if !self.write(rev, &r).await? {
            return Err(PoolOpError::FailedPrecondition(format!(
                "pool {node}/{name} changed meanwhile; ask again"
            )));
        }
        failpoint::at(failpoint::POOL_DELETE_MARKED);
        // The volume records say, whatever the engine can tell: one that cannot import the pool now (its disk late
        // or failing after a restart) would take it for gone, and its replicas would be lost to the cluster.
        let held = match holders.await {
            Ok(v) if v.is_empty() => Ok(()),
            Ok(v) => Err(PoolOpError::FailedPrecondition(format!(
                "pool {node}/{name} holds replicas of {}",
                v.join(", ")
            ))),
            Err(e) => Err(e),
        };
        let result = match held {
            Ok(()) => self.engine_destroy(&r).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.forget(&r).await?;
                tracing::info!(node, pool = name, "pool deleted");
                Ok(())
            }
            Err(
                e @ PoolOpError::Engine {
                    code: Code::FailedPrecondition,
                    ..
                },
            ) => {
                // Still holds replicas: it stays as it was.
                r.phase = before;
                self.settle_with(&r, true).await?;
                Err(e)
            }
            Err(e) => {
                // Not done (its node down, its engine not answering): it stays as it was rather than be destroyed
                // behind the caller's back later, maybe once its engine restarted without it open, which could
                // not refuse for the replicas it holds. Asked again, it is tried again.
                r.phase = before;
                self.settle_with(&r, true).await?;
                Err(e)
            }
        }
    }

    /// Drops the record of a pool its engine destroyed, and notes it destroyed ([`DESTROYED`]), in one transaction.
    async fn forget(&self, r: &PoolRecord) -> Result<(), PoolOpError> {
        let t = Txn::new()
            .delete(key(&r.node, &r.name))
            .put(destroyed_key(&r.node, &r.name), r.uuid.clone().into_bytes());
        self.store.txn(t).await?;
        Ok(())
    }

    /// Destroys the pool on its engine. One the engine does not have open (it restarted and the pool is not
    /// imported again yet, or an earlier attempt destroyed it) is imported first, so that the engine, which refuses
    /// to destroy a pool holding replicas, can say so: gone only if its disk holds no pool to import any more.
    async fn engine_destroy(&self, r: &PoolRecord) -> Result<(), PoolOpError> {
        let mut c = self.engine(&r.node).await?;
        let destroy = |mut c: EngineClient<Channel>| async move {
            c.destroy_pool(epb::DestroyPoolRequest {
                name: r.name.clone(),
            })
            .await
        };
        match destroy(c.clone()).await {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(engine_error(&r.node, s)),
        }
        match c
            .import_pool(epb::ImportPoolRequest {
                disk: r.disk.clone(),
                force: false,
            })
            .await
        {
            Ok(p) if p.get_ref().name == r.name => {}
            // Another pool on the disk now: this one is not there.
            Ok(_) => return Ok(()),
            // The call itself did not get through: asked again later.
            Err(s) if matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled) => {
                return Err(engine_error(&r.node, s));
            }
            // No pool of this node's on the disk that the engine can open (wiped by the destroy, another
            // owner's, the disk gone or failing): nothing there for the engine to refuse for, as before it was
            // asked.
            Err(_) => return Ok(()),
        }
        match destroy(c).await {
            Ok(_) => Ok(()),
            Err(s) => Err(engine_error(&r.node, s)),
        }
    }

    pub async fn list(&self) -> Result<Vec<PoolView>, PoolOpError> {
        let nodes = self.registry.list().await?;
        let mut out = Vec::new();
        for (k, v) in self.store.list(PREFIX).await? {
            // One record that does not decode (written by hand, or by a newer agent) is left out, not in the way
            // of every other pool.
            let record: PoolRecord = match serde_json::from_slice(&v.value) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(key = %k, error = %e, "pool record left out: it does not decode");
                    continue;
                }
            };
            let reported = nodes
                .iter()
                .find(|n| {
                    n.record.spec.name == record.node && n.record.status.state == NodeState::Online
                })
                .and_then(|n| {
                    n.record
                        .status
                        .pools
                        .iter()
                        .find(|p| p.name == record.name)
                        .cloned()
                });
            out.push(PoolView { record, reported });
        }
        Ok(out)
    }

    /// Drives every managed pool of an Online node towards its phase (see the module docs). `holders(node, pool)`:
    /// the volumes and snapshots with anything in a pool, by their records.
    pub async fn reconcile<F, H>(&self, holders: F) -> Result<(), PoolOpError>
    where
        F: Fn(String, String) -> H,
        H: std::future::Future<Output = Result<Vec<String>, PoolOpError>>,
    {
        for v in self.list().await? {
            let node_online = self
                .registry
                .get(&v.record.node)
                .await
                .is_ok_and(|n| n.record.status.state == NodeState::Online);
            if !node_online {
                continue;
            }
            let mut r = v.record;
            match r.phase {
                PoolPhase::Creating | PoolPhase::Created if v.reported.is_none() => {
                    match self.engine_create(&r).await {
                        Ok(uuid) => {
                            tracing::info!(node = %r.node, pool = %r.name, "pool imported again");
                            r.phase = PoolPhase::Created;
                            r.uuid = uuid;
                            r.reason.clear();
                            self.settle(&r).await?;
                        }
                        Err(e) => {
                            if r.reason != e.to_string() {
                                tracing::warn!(node = %r.node, pool = %r.name, error = %e, "cannot create or import the pool");
                                r.reason = e.to_string();
                                self.settle(&r).await?;
                            }
                        }
                    }
                }
                PoolPhase::Creating => {
                    if let Some(p) = v.reported {
                        r.phase = PoolPhase::Created;
                        r.uuid = p.uuid;
                        r.reason.clear();
                        self.settle(&r).await?;
                    }
                }
                // A delete that did not finish (the agent died in it, or could not record that it was refused):
                // finished only if no volume or snapshot keeps anything in the pool, as the delete itself checks
                // (the engine cannot always tell: one that restarted and cannot import the pool now, its disk late,
                // would take it for gone). Otherwise it is as it was before: imported again if need be.
                PoolPhase::Deleting => match holders(r.node.clone(), r.name.clone()).await {
                    Ok(held) if held.is_empty() => match self.engine_destroy(&r).await {
                        Ok(()) => {
                            self.forget(&r).await?;
                        }
                        Err(e) => {
                            tracing::warn!(node = %r.node, pool = %r.name, error = %e, "cannot destroy the pool yet")
                        }
                    },
                    Ok(held) => {
                        let held = held.join(", ");
                        tracing::warn!(node = %r.node, pool = %r.name, %held, "a delete left unfinished is not finished: the pool holds replicas");
                        r.phase = if v.reported.is_some() {
                            PoolPhase::Created
                        } else {
                            PoolPhase::Creating
                        };
                        r.reason = format!("not deleted: it holds replicas of {held}");
                        self.settle_with(&r, true).await?;
                    }
                    Err(e) => {
                        tracing::warn!(node = %r.node, pool = %r.name, error = %e, "a delete left unfinished waits: what the pool holds is not known")
                    }
                },
                PoolPhase::Created => {}
            }
        }
        Ok(())
    }
}

/// Whether the engine refused for a reason that asking again will not change.
fn refused(e: &PoolOpError) -> bool {
    matches!(
        e,
        PoolOpError::Engine {
            code: Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::AlreadyExists
                | Code::DataLoss,
            ..
        }
    )
}

fn engine_error(node: &str, s: tonic::Status) -> PoolOpError {
    PoolOpError::Engine {
        node: node.to_string(),
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// Managed pools as a reconciler (see [`super::reconcile`]), asking the volumes what a pool holds.
pub struct PoolReconciler(pub Arc<Pools>, pub Arc<super::volumes::Volumes>);

#[async_trait::async_trait]
impl super::reconcile::Reconciler for PoolReconciler {
    fn name(&self) -> &'static str {
        "pools"
    }

    async fn pass(&self) -> Result<(), String> {
        let volumes = &self.1;
        self.0
            .reconcile(|node, pool| async move { volumes.pool_holders(&node, &pool).await })
            .await
            .map_err(|e| e.to_string())
    }
}
