//! The engine: owns this node's target, remembers what backs each exported namespace, and owns the nexuses. It is
//! the one place that wires block devices, nexuses and the target together; the gRPC API and the binary go
//! through it.
//!
//! - `claims`: one holder per key at a time (a nexus's UUID while it is created or given a child).
//! - `fault_gate`: nexuses that fault children only with the cluster agent's consent ([`FaultConfirmer`]).
//! - `local`: a nexus child on this node, used directly but subject to its namespace's reservations.
//! - `nexus`: nexus creation, children, publishing, reservations on children.
//! - `pending`: pools of the node's configuration that did not open at start, tried again in the background.
//! - `pools`: pools, replicas (exported with allow-lists), snapshots and clones.
//! - `uri`: child URIs (`nvmf://`, `local:///`).

mod claims;
mod fault_gate;
mod local;
mod nexus;
mod pending;
mod pools;
#[cfg(test)]
mod tests;
pub mod uri;

pub use fault_gate::FaultConfirmer;
pub use nexus::{NexusOptions, ReservationKeys};
pub use pending::{Configured, PendingPool};
pub use pools::{DEFAULT_CLUSTER, PoolEntry, ReplicaInfo, SnapshotInfo};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::block::BlockError;
use crate::block::fault::{FaultDevice, FaultPlan};
use crate::config::ExportSpec;
use crate::pool::PoolError;
use crate::protocol::nqn::Nqn;
use crate::target::{SubsystemSpec, Target, TargetConfig, TargetError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("opening the backend: {0}")]
    Backend(#[from] BlockError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{0} not found")]
    NotFound(Resource),
    #[error("{resource} already exists {conflict}")]
    AlreadyExists {
        resource: Resource,
        /// How the existing one differs from what was asked.
        conflict: String,
    },
    #[error("nexus {uuid}: {source}")]
    Nexus {
        uuid: uuid::Uuid,
        #[source]
        source: crate::nexus::NexusError,
    },
    #[error("child {uri}: {what} is not on this node")]
    ChildMissing { uri: String, what: Resource },
    #[error("child {uri}: cannot connect: {source}")]
    ChildUnreachable {
        uri: String,
        #[source]
        source: crate::initiator::InitiatorError,
    },
    #[error("child {uri}: cannot take its reservation: {source}")]
    ChildReservation {
        uri: String,
        #[source]
        source: BlockError,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("disk {disk} is in use: {why}{owner}")]
    DiskInUse {
        disk: String,
        why: String,
        /// What the disk's pool label says of its owner, when it has one.
        owner: String,
    },
}

/// An object an engine call names, in not-found and already-exists errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    Subsystem(String),
    Namespace { nqn: String, nsid: u32 },
    Nexus(uuid::Uuid),
    Child { nexus: uuid::Uuid, uri: String },
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Subsystem(nqn) => write!(f, "subsystem {nqn}"),
            Resource::Namespace { nqn, nsid } => write!(f, "namespace {nsid} of {nqn}"),
            Resource::Nexus(uuid) => write!(f, "nexus {uuid}"),
            Resource::Child { nexus, uri } => write!(f, "child {uri} of nexus {nexus}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub node_name: String,
    pub target: TargetConfig,
}

struct Inner {
    config: EngineConfig,
    target: Target,
    backends: Mutex<BTreeMap<(String, u32), ExportSpec>>,
    nexuses: Mutex<Vec<nexus::NexusEntry>>,
    /// The nexuses being created or given a child, by UUID: a second such call for one waits for the first.
    changing: claims::Claims<uuid::Uuid>,
    /// The replicas being made, destroyed, shared or unshared, by UUID: a second such call for one waits, so the
    /// share kept in the pool and the export agree.
    sharing: claims::Claims<uuid::Uuid>,
    /// Held while a nexus or replica export is looked up and made or removed, so two calls at once cannot both
    /// find none and the loser tear the winner's down.
    exporting: Mutex<()>,
    /// Each replica's exported namespace, kept while anything holds it (a local nexus child): exported again, a
    /// replica serves that same namespace, so its reservations stay one and a nexus fenced through the new export
    /// is fenced for its local child too.
    replica_namespaces:
        Mutex<BTreeMap<uuid::Uuid, std::sync::Weak<crate::target::subsystem::Namespace>>>,
    faults: Mutex<BTreeMap<(String, u32), Arc<FaultDevice>>>,
    pools: Mutex<BTreeMap<String, PoolEntry>>,
    /// Configured pools not open yet, by name (`pending`).
    pending_pools: Mutex<BTreeMap<String, PendingPool>>,
    /// Set when the engine shuts down: no pending pool opens after.
    pools_closed: std::sync::atomic::AtomicBool,
    /// Pool create, import and destroy claim their disk (`disk:<path>`), then their pool's name (`pool:<name>`):
    /// operations on one disk or one name wait for each other, those on other disks do not (a disk that hangs
    /// holds up only its own).
    pool_admin: claims::Claims<String>,
    /// The nexuses whose children changed state, for the cluster agent.
    nexus_changes: Arc<crate::nexus::ChangeFeed>,
    /// Set when the engine registers with a cluster agent: nexuses made with `confirm_faults` ask it.
    fault_confirmer: Mutex<Option<Arc<dyn FaultConfirmer>>>,
    /// Set by [`Engine::shutdown`]: the nexuses that did not drain.
    torn: Mutex<Option<Vec<uuid::Uuid>>>,
    /// Set (under the nexus list's lock) when the engine starts shutting down: no nexus is created after.
    stopping: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("node", &self.config.node_name)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Engine {
        let target = Target::new(config.target.clone());
        Engine {
            inner: Arc::new(Inner {
                config,
                target,
                backends: Mutex::new(BTreeMap::new()),
                nexuses: Mutex::new(Vec::new()),
                changing: claims::Claims::default(),
                sharing: claims::Claims::default(),
                exporting: Mutex::new(()),
                replica_namespaces: Mutex::new(BTreeMap::new()),
                faults: Mutex::new(BTreeMap::new()),
                pools: Mutex::new(BTreeMap::new()),
                pending_pools: Mutex::new(BTreeMap::new()),
                pools_closed: std::sync::atomic::AtomicBool::new(false),
                pool_admin: claims::Claims::default(),
                nexus_changes: Arc::default(),
                fault_confirmer: Mutex::new(None),
                torn: Mutex::new(None),
                stopping: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// The nexuses whose children changed state since registration last told the cluster agent (at once, not at
    /// the next heartbeat).
    pub fn nexus_changes(&self) -> Arc<crate::nexus::ChangeFeed> {
        self.inner.nexus_changes.clone()
    }

    /// Who nexuses made with `confirm_faults` ask before they fault a child (the cluster agent).
    pub fn set_fault_confirmer(&self, c: Arc<dyn FaultConfirmer>) {
        *self
            .inner
            .fault_confirmer
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(c);
    }

    fn fault_confirmer(&self) -> Option<Arc<dyn FaultConfirmer>> {
        self.inner
            .fault_confirmer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn target(&self) -> &Target {
        &self.inner.target
    }

    pub fn node_name(&self) -> &str {
        &self.inner.config.node_name
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Held while an export is checked for and made or removed ([`Inner::exporting`]).
    fn exporting(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .exporting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn backends(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u32), ExportSpec>> {
        self.inner
            .backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Exports a namespace as `spec` says, creating its subsystem if needed. Returns the NSID.
    pub fn export(&self, spec: &ExportSpec) -> Result<u32, EngineError> {
        spec.validate().map_err(EngineError::InvalidArgument)?;
        let nqn = Nqn::parse(&spec.nqn).map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
        if self.target().subsystem(nqn.as_str()).is_none() {
            self.target().create_subsystem(SubsystemSpec {
                nqn: nqn.clone(),
                serial: String::new(),
                model: String::new(),
                allow_any_host: spec.hosts.is_empty(),
                allowed_hosts: spec.hosts.clone(),
                single_path: false,
            })?;
        }
        self.add_namespace(spec)
    }

    /// Adds a namespace to an existing subsystem. Repeating the same request returns the same NSID.
    pub fn add_namespace(&self, spec: &ExportSpec) -> Result<u32, EngineError> {
        let sub = self
            .target()
            .subsystem(&spec.nqn)
            .ok_or_else(|| EngineError::NotFound(Resource::Subsystem(spec.nqn.clone())))?;
        if let Some((nsid, ns)) = spec
            .nsid
            .filter(|n| *n != 0)
            .and_then(|n| Some((n, sub.namespace(n)?)))
        {
            let mut want = spec.clone();
            want.uuid = Some(spec.uuid.unwrap_or(ns.uuid));
            if self.backends().get(&(spec.nqn.clone(), nsid)) == Some(&want) {
                return Ok(nsid);
            }
            return Err(EngineError::AlreadyExists {
                resource: Resource::Namespace {
                    nqn: spec.nqn.clone(),
                    nsid,
                },
                conflict: "with other parameters".into(),
            });
        }
        let mut device = spec.open_device()?;
        if spec.fault {
            let f = Arc::new(FaultDevice::new(device));
            self.faults()
                .insert((spec.nqn.clone(), spec.nsid.unwrap_or(0)), f.clone());
            device = f;
        }
        let uuid = spec.uuid.unwrap_or_else(uuid::Uuid::new_v4);
        let nsid = sub.add_namespace(
            spec.nsid.unwrap_or(0),
            uuid,
            spec.ana_group.unwrap_or(1),
            device,
        )?;
        if spec.fault {
            let mut f = self.faults();
            if let Some(d) = f.remove(&(spec.nqn.clone(), spec.nsid.unwrap_or(0))) {
                f.insert((spec.nqn.clone(), nsid), d);
            }
        }
        let mut stored = spec.clone();
        stored.nsid = Some(nsid);
        stored.uuid = Some(uuid);
        self.backends().insert((spec.nqn.clone(), nsid), stored);
        Ok(nsid)
    }

    pub fn remove_namespace(&self, nqn: &str, nsid: u32) -> Result<(), EngineError> {
        self.target().remove_namespace(nqn, nsid)?;
        self.backends().remove(&(nqn.to_string(), nsid));
        self.faults().remove(&(nqn.to_string(), nsid));
        Ok(())
    }

    pub fn delete_subsystem(&self, nqn: &str) -> Result<(), EngineError> {
        self.target().delete_subsystem(nqn)?;
        self.backends().retain(|(n, _), _| n != nqn);
        // Its fault-injecting devices go with it (one kept would keep its file open, and held).
        self.faults().retain(|(n, _), _| n != nqn);
        Ok(())
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u32), Arc<FaultDevice>>> {
        self.inner.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the fault plan of a namespace exported with fault injection; returns how many I/Os it failed so far.
    pub fn inject_fault(
        &self,
        nqn: &str,
        nsid: u32,
        plan: Option<FaultPlan>,
    ) -> Result<u64, EngineError> {
        let f = self
            .faults()
            .get(&(nqn.to_string(), nsid))
            .cloned()
            .ok_or_else(|| {
                EngineError::FailedPrecondition(format!(
                    "namespace {nsid} of {nqn} was not exported with fault=true"
                ))
            })?;
        f.set_plan(plan.unwrap_or_default());
        Ok(f.injected())
    }

    /// What backs a namespace, as it was exported.
    pub fn backend(&self, nqn: &str, nsid: u32) -> Option<ExportSpec> {
        self.backends().get(&(nqn.to_string(), nsid)).cloned()
    }

    /// Shuts the engine down: nexuses first, each drained while the target still carries its answers, then the
    /// target, then the pools. `true`: every nexus drained (a clean end: its children agree); those that did not
    /// are [`Engine::torn_nexuses`].
    pub async fn shutdown(&self) -> bool {
        let nexuses = {
            // Under the list's lock: a create either put its nexus in the list before, or sees the flag and ends it.
            let list = self.nexuses_mut();
            self.inner
                .stopping
                .store(true, std::sync::atomic::Ordering::Release);
            list.iter()
                .map(|e| (e.uuid, e.nexus.clone()))
                .collect::<Vec<_>>()
        };
        let mut torn = Vec::new();
        for (uuid, n) in nexuses {
            if !n.shutdown().await {
                tracing::warn!(nexus = %uuid, "the nexus did not drain: its children may differ where writes were in flight");
                torn.push(uuid);
            }
        }
        self.target().shutdown().await;
        self.close_pools();
        let drained = torn.is_empty();
        *self.inner.torn.lock().unwrap_or_else(|e| e.into_inner()) = Some(torn);
        drained
    }

    /// After [`Engine::shutdown`], the nexuses (by volume UUID) that did not drain; `None` before it ended.
    pub fn torn_nexuses(&self) -> Option<Vec<uuid::Uuid>> {
        self.inner
            .torn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
