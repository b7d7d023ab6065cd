//! Volume operations, persist-then-act: create (place all replicas or none, record the plan, create each replica
//! and record it), delete (nexus, then each replica, recorded as they go); publishing is in `publish`, growth in
//! `expand`. Operations on one volume are serialised by a per-volume lock; different volumes proceed in parallel.
//! [`Volumes::reconcile`] resumes what a crashed or failed operation left Creating or Deleting.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::engine as epb;
use proto::engine::engine_client::EngineClient;
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

use super::dataplane::{self, NodeEngineError};
use super::failpoint;
use super::metrics::{AgentMetrics, VolumeObservation};
use super::node::NodeState;
use super::pool::PoolOpError;
use super::registry::{Registry, RegistryError};
use super::scheduler::{self, NoRoom};
use super::store::{Store, StoreError};
use super::volume::{self, NexusRecord, ReplicaRecord, VolumePhase, VolumeRecord, VolumeSpec};

/// Volume sizes are multiples of this (the engine's block size).
pub const BLOCK: u64 = 512;
/// Most replicas a volume may ask for.
pub const MAX_REPLICAS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("volume {0} not found")]
    NotFound(Uuid),
    #[error("volume {uuid} exists with {} bytes and {} replicas", existing.size, existing.replicas)]
    AlreadyExists {
        uuid: Uuid,
        existing: Box<VolumeSpec>,
    },
    #[error("cannot place volume: {0}")]
    NoRoom(#[from] NoRoom),
    /// A replica's pool has no room for the growth asked for.
    #[error("{0}")]
    CannotGrow(String),
    /// A size no pool of the volume's replicas could ever hold (larger than the pool itself).
    #[error("{0}")]
    TooLarge(String),
    #[error("snapshot {0} not found")]
    SnapshotNotFound(Uuid),
    #[error("snapshot {uuid} exists, of volume {volume}")]
    SnapshotExists { uuid: Uuid, volume: Uuid },
    /// A volume made from a snapshot can have replicas only where the snapshot has copies.
    #[error("{0}")]
    NoCopies(String),
    /// A replica's pool has no room for the copies its replica may make once a snapshot shares its clusters.
    #[error("{0}")]
    NoRoomForSnapshot(String),
    #[error("volume {uuid}: {why}")]
    FailedPrecondition { uuid: Uuid, why: String },
    /// A path report from a host the volume is not published to (FAILED_PRECONDITION, marked for the node agent:
    /// its paths to the volume are stale).
    #[error("volume {uuid} is not published to {host}{}", if published_to.is_empty() { String::new() } else { format!(" but to {}", published_to.join(", ")) })]
    NotPublishedTo {
        uuid: Uuid,
        host: String,
        published_to: Vec<String>,
    },
    /// Another operation on the volume is in flight, or it is being deleted.
    #[error("volume {uuid}: {why}")]
    Conflict { uuid: Uuid, why: String },
    #[error("node {node}: {message}")]
    Engine {
        node: String,
        code: Code,
        message: String,
    },
    #[error(transparent)]
    Node(#[from] NodeEngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("volume record {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// How a destroy of a nexus went.
pub(super) enum NexusEnd {
    /// The engine destroyed it; `clean`: its I/O drained and its children flushed (they agree).
    Destroyed { clean: bool },
    /// The engine did not have it (it restarted, or it was destroyed before).
    Gone,
    /// Its node is not Online: not asked.
    NodeDown,
}

/// Whether pool `pool` on `node` can take a clone of `size` bytes, by the figures its engine gave the view (a node
/// record's may predate the snapshot, whose shared clusters already took room): a clone may copy every cluster it
/// shares, so it needs the room of a new replica ([`scheduler::room_for`]; a faulted pool counts a disk error).
/// Why not, when not.
fn room_for_clone(
    view: &super::room::PlacementView,
    node: &str,
    pool: &str,
    size: u64,
) -> Result<(), CloneRoom> {
    if !view.answered.contains(node) {
        return Err(CloneRoom::NotAsked(
            "its engine did not give its pools' figures".into(),
        ));
    }
    let p = view
        .pool(node, pool)
        .ok_or_else(|| CloneRoom::NotAsked(format!("pool {pool} is not imported")))?;
    scheduler::room_for(p, size).map_err(CloneRoom::NoRoom)
}

/// The generation of a replica's pool an engine answered with (`None` from an engine that does not tell it): figures
/// of the pool at least that recent count the replica ([`super::room`]).
pub(super) fn generation_of(r: &epb::Replica) -> Option<(u64, u64)> {
    (r.pool_incarnation > 0).then_some((r.pool_incarnation, r.pool_applied))
}

/// Why a snapshot's copy cannot take a clone now.
enum CloneRoom {
    /// Its pool has no room, or cannot take one.
    NoRoom(String),
    /// Its engine, or its pool, cannot be asked now.
    NotAsked(String),
}

/// An engine's answer to a destroy: done, or already gone.
pub(super) fn destroyed<T>(node: &str, r: Result<T, tonic::Status>) -> Result<(), VolumeError> {
    match r {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(engine_error(node, s)),
    }
}

pub(super) fn engine_error(node: &str, s: tonic::Status) -> VolumeError {
    VolumeError::Engine {
        node: node.to_string(),
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// Whether a volume may be changed (scaled, grown): created, and not being deleted.
pub(super) fn created(r: &VolumeRecord) -> Result<(), VolumeError> {
    match r.phase {
        VolumePhase::Created => Ok(()),
        VolumePhase::Creating => Err(VolumeError::FailedPrecondition {
            uuid: r.uuid,
            why: "still being created".into(),
        }),
        VolumePhase::Deleting => Err(VolumeError::Conflict {
            uuid: r.uuid,
            why: "it is being deleted".into(),
        }),
    }
}

/// `e`, met while working on volume `uuid`, as its caller should read it: an engine's NOT_FOUND (a pool not imported
/// yet, a replica its engine lost) or a node no longer registered is not the volume missing, which NOT_FOUND says
/// to a caller (CSI takes it for the volume gone), but a precondition the operation waits for.
pub(crate) fn not_the_volume_missing(uuid: Uuid, e: VolumeError) -> VolumeError {
    match e {
        VolumeError::Engine {
            code: Code::NotFound,
            ..
        }
        | VolumeError::Node(super::dataplane::NodeEngineError::NotFound(_)) => {
            VolumeError::FailedPrecondition {
                uuid,
                why: e.to_string(),
            }
        }
        e => e,
    }
}

/// Whether the engine refused for a reason that asking again will not change.
/// Whether `e` says the replica's node is not there to make it (not Online, or no such node): it was never made.
pub(super) fn node_gone(e: &VolumeError) -> bool {
    matches!(
        e,
        VolumeError::Node(NodeEngineError::NotOnline { .. } | NodeEngineError::NotFound(_))
    )
}

pub(super) fn refused(e: &VolumeError) -> bool {
    matches!(
        e,
        VolumeError::Engine {
            code: Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::AlreadyExists
                | Code::ResourceExhausted
                | Code::NotFound
                | Code::Internal
                | Code::DataLoss,
            ..
        }
    )
}

/// One lock per volume, made when first asked for. Those no one holds or waits for (only the table has them) are
/// dropped as the table grows, so that it stays the size of the volumes in use, not of every UUID ever asked about
/// (deleted volumes, refused creates, stale nexuses' UUIDs).
#[derive(Default)]
struct VolumeLocks {
    /// The locks, and the size at which the table is swept next.
    table: Mutex<(HashMap<Uuid, VolumeLock>, usize)>,
}

type VolumeLock = Arc<tokio::sync::Mutex<()>>;

impl VolumeLocks {
    /// Below this many, the table is never swept.
    const SWEPT_FROM: usize = 1024;

    fn of(&self, uuid: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (map, sweep_at) = &mut *t;
        if map.len() >= (*sweep_at).max(Self::SWEPT_FROM) {
            // A lock held, or waited for, has a clone outside the table: kept. Twice what is left before the next
            // sweep: a sweep costs the table's size, once per as many new entries.
            map.retain(|_, l| Arc::strong_count(l) > 1);
            *sweep_at = 2 * map.len();
        }
        map.entry(uuid).or_default().clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).0.len()
    }
}

pub struct Volumes {
    store: Arc<dyn Store>,
    pub(super) registry: Arc<Registry>,
    engine_timeout: Duration,
    locks: VolumeLocks,
    /// Held by a placement from reading the pools' room until its record is written ([`super::room`]).
    pub(super) placing: tokio::sync::Mutex<()>,
    /// Replicas placed whose bytes their node's record may not count yet ([`super::room`]).
    pub(super) promises: super::room::Promises,
    pub(super) metrics: Arc<AgentMetrics>,
    /// Each volume as the last healing pass saw it (for the metrics).
    pub(super) observed: Mutex<HashMap<Uuid, VolumeObservation>>,
}

impl Volumes {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        engine_timeout: Duration,
        metrics: Arc<AgentMetrics>,
    ) -> Volumes {
        Volumes {
            store,
            registry,
            engine_timeout,
            locks: VolumeLocks::default(),
            placing: tokio::sync::Mutex::new(()),
            promises: Default::default(),
            metrics,
            observed: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The volume's lock and its record as it is now, when no operation holds the lock (reconcilers skip a
    /// volume whose operation is in flight).
    pub(super) async fn claim_idle(
        &self,
        uuid: Uuid,
    ) -> Result<Option<(tokio::sync::OwnedMutexGuard<()>, VolumeRecord)>, VolumeError> {
        let Ok(held) = self.lock_of(uuid).try_lock_owned() else {
            return Ok(None);
        };
        Ok(self.read(uuid).await?.map(|r| (held, r)))
    }

    pub(super) fn lock_of(&self, uuid: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.of(uuid)
    }

    pub async fn get(&self, uuid: Uuid) -> Result<VolumeRecord, VolumeError> {
        self.read(uuid).await?.ok_or(VolumeError::NotFound(uuid))
    }

    pub(super) async fn read(&self, uuid: Uuid) -> Result<Option<VolumeRecord>, VolumeError> {
        let k = volume::key(&uuid);
        match self.store.get(&k).await? {
            None => Ok(None),
            Some(v) => {
                Ok(Some(VolumeRecord::decode(&v.value).map_err(|source| {
                    VolumeError::Corrupt { key: k, source }
                })?))
            }
        }
    }

    pub async fn list(&self) -> Result<Vec<VolumeRecord>, VolumeError> {
        self.store
            .list(volume::PREFIX)
            .await?
            .into_iter()
            .map(|(k, v)| {
                VolumeRecord::decode(&v.value)
                    .map_err(|source| VolumeError::Corrupt { key: k, source })
            })
            .collect()
    }

    /// The volumes and snapshots with a replica or copy in pool `pool` of `node`, as their records say (what a
    /// pool's delete must leave alone).
    pub async fn held_in_pool(&self, node: &str, pool: &str) -> Result<Vec<String>, VolumeError> {
        let (volumes, corrupt) = self.list_decodable().await?;
        if corrupt > 0 {
            return Err(VolumeError::FailedPrecondition {
                uuid: Uuid::nil(),
                why: format!(
                    "{corrupt} volume records cannot be read: whether pool {node}/{pool} holds their replicas is not known"
                ),
            });
        }
        let mut held: Vec<String> = volumes
            .into_iter()
            .filter(|v| v.replicas.iter().any(|r| r.node == node && r.pool == pool))
            .map(|v| format!("volume {}", v.uuid))
            .collect();
        held.extend(
            self.all_snapshots()
                .await?
                .into_iter()
                .filter(|s| s.copies.iter().any(|c| c.node == node && c.pool == pool))
                .map(|s| format!("snapshot {}", s.uuid)),
        );
        Ok(held)
    }

    /// [`Volumes::held_in_pool`], for the pools' operations: whatever is not a store's error refuses the delete.
    pub async fn pool_holders(&self, node: &str, pool: &str) -> Result<Vec<String>, PoolOpError> {
        self.held_in_pool(node, pool).await.map_err(|e| match e {
            VolumeError::Store(e) => PoolOpError::Store(e),
            VolumeError::Corrupt { key, source } => PoolOpError::Corrupt { key, source },
            e => PoolOpError::FailedPrecondition(e.to_string()),
        })
    }

    /// Every volume record that decodes; a corrupt one is logged and skipped, so it stops no one else's healing.
    pub(super) async fn list_sound(&self) -> Result<Vec<VolumeRecord>, VolumeError> {
        Ok(self.list_decodable().await?.0)
    }

    /// Every volume record that decodes, and how many did not (each logged).
    pub(super) async fn list_decodable(&self) -> Result<(Vec<VolumeRecord>, usize), VolumeError> {
        let mut corrupt = 0;
        let sound = self
            .store
            .list(volume::PREFIX)
            .await?
            .into_iter()
            .filter_map(|(k, v)| match VolumeRecord::decode(&v.value) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(key = %k, error = %e, "corrupt volume record skipped");
                    corrupt += 1;
                    None
                }
            })
            .collect();
        Ok((sound, corrupt))
    }

    /// Records `r` (the caller holds the volume's lock, so it overwrites its own last write).
    pub(super) async fn save(&self, r: &VolumeRecord) -> Result<(), VolumeError> {
        self.store.put(&volume::key(&r.uuid), r.encode()).await?;
        Ok(())
    }

    pub(super) async fn engine(&self, node: &str) -> Result<EngineClient<Channel>, VolumeError> {
        Ok(dataplane::node_engine(&self.registry, node, self.engine_timeout).await?)
    }

    pub async fn create(&self, uuid: Uuid, spec: VolumeSpec) -> Result<VolumeRecord, VolumeError> {
        if spec.size == 0 || !spec.size.is_multiple_of(BLOCK) {
            return Err(VolumeError::InvalidArgument(format!(
                "size {} must be a non-zero multiple of {BLOCK} bytes",
                spec.size
            )));
        }
        if spec.replicas == 0 || spec.replicas > MAX_REPLICAS {
            return Err(VolumeError::InvalidArgument(format!(
                "replica count {} must be 1 to {MAX_REPLICAS}",
                spec.replicas
            )));
        }
        let lock = self.lock_of(uuid);
        let _held = lock.lock().await;
        let record = match self.read(uuid).await? {
            Some(r) if !r.spec.matches(&spec) => {
                return Err(VolumeError::AlreadyExists {
                    uuid,
                    existing: Box::new(r.spec.clone()),
                });
            }
            Some(r) if r.phase == VolumePhase::Deleting => {
                return Err(VolumeError::Conflict {
                    uuid,
                    why: "it is being deleted".into(),
                });
            }
            Some(r) if r.phase == VolumePhase::Created => return Ok(r),
            Some(r) => r,
            None => {
                // Until its replicas are promised: the next placement sees them.
                let placing = self.placing.lock().await;
                // A clone's room is its copies' pools' at this moment: their engines are asked.
                let ask: Vec<String> = match spec.source_snapshot {
                    Some(snap) => self
                        .snapshot(snap)
                        .await?
                        .map(|s| s.copies.into_iter().map(|c| c.node).collect())
                        .unwrap_or_default(),
                    None => Vec::new(),
                };
                let view = self.placement_view(&ask).await?;
                let nodes = &view.nodes;
                // With each choice, whether it holds the data already (a clone of a snapshot's copy, or any
                // replica of a new empty volume) or is made empty beside the clones, out of sync until rebuilt.
                let choices: Vec<(scheduler::Choice, bool)> = match spec.source_snapshot {
                    Some(snap) => self.place_clones(&view, &spec, snap).await?,
                    None => scheduler::place(
                        nodes,
                        spec.size,
                        spec.replicas as usize,
                        &BTreeSet::new(),
                        &spec.placement,
                    )?
                    .into_iter()
                    .map(|c| (c, true))
                    .collect(),
                };
                let block_size = scheduler::block_size_of(
                    nodes,
                    choices
                        .iter()
                        .map(|(c, _)| (c.node.as_str(), c.pool.as_str())),
                )
                .unwrap_or(0);
                let r = VolumeRecord {
                    block_size,
                    uuid,
                    spec,
                    phase: VolumePhase::Creating,
                    replicas: choices
                        .into_iter()
                        .map(|(c, synced)| ReplicaRecord {
                            uuid: Uuid::new_v4(),
                            node: c.node,
                            pool: c.pool,
                            created: false,
                            rejoined_ms: 0,
                            synced,
                            fault_confirmed: false,
                        })
                        .collect(),
                    nexus: None,
                    last_key: 0,
                    fence_key: 0,
                    reason: String::new(),
                    resync: false,
                    switchover: None,
                    growth: None,
                    shared: false,
                    restarting_key: 0,
                };
                // Promised before they are recorded, so that the next placement need not wait for the store.
                self.promise_replicas(&r, false);
                drop(placing);
                let written = self
                    .store
                    .compare_and_put(&volume::key(&uuid), 0, r.encode())
                    .await;
                match written {
                    Ok(true) => {}
                    Ok(false) => {
                        self.unpromise_replicas(&r);
                        return Err(VolumeError::Conflict {
                            uuid,
                            why: "created by another request meanwhile".into(),
                        });
                    }
                    // It may be written all the same (a store timeout): promised as written, the sweep decides.
                    Err(e) => {
                        self.promise_replicas(&r, true);
                        return Err(e.into());
                    }
                }
                self.promise_replicas(&r, true);
                failpoint::at(failpoint::CREATE_PLACED);
                tracing::info!(%uuid, replicas = ?r.replicas.iter().map(|x| (&x.node, &x.pool)).collect::<Vec<_>>(), "volume placed");
                r
            }
        };
        self.drive_create(record).await
    }

    /// Creates volume `uuid` from volume `source` as it is now: a snapshot of the source taken for the purpose (the
    /// same one for every retry, so a retry after a crash finds it), then the volume made from it.
    pub async fn create_from_volume(
        &self,
        uuid: Uuid,
        mut spec: VolumeSpec,
        source: Uuid,
    ) -> Result<VolumeRecord, VolumeError> {
        if source == uuid || spec.source_snapshot.is_some() {
            return Err(VolumeError::InvalidArgument(
                "a volume is made from one other volume, or from a snapshot".into(),
            ));
        }
        let snap = super::snapshots::clone_source_snapshot(&uuid);
        spec.source_snapshot = Some(snap);
        spec.source_volume = Some(source);
        if self.read(uuid).await?.is_none() {
            let src = self.get(source).await?;
            if src.spec.size != spec.size {
                return Err(VolumeError::InvalidArgument(format!(
                    "a volume made from volume {source} has its size, {} bytes, not {}",
                    src.spec.size, spec.size
                )));
            }
            self.create_snapshot(source, snap, Some(uuid)).await?;
        }
        let made = self.create(uuid, spec).await;
        if let Err(VolumeError::NoCopies(why)) = &made
            && self.read(uuid).await?.is_none()
        {
            // Refused for room: the hidden snapshot would pin room (the source's overwrites copy what it shares)
            // for nothing until the orphan sweep; it goes now, and a retry takes a new one.
            if let Err(e) = self.delete_snapshot(snap).await {
                tracing::warn!(volume = %uuid, snapshot = %snap, refused = %why, error = %e, "the hidden snapshot of a refused volume is left to the orphan sweep");
            }
        }
        made
    }

    /// Whether `e`, the engine's answer to making `rep`, means it will not be made there however often it is asked:
    /// [`refused`], its node gone, or UNAVAILABLE from a pool its node reports failing (a pool that faulted after
    /// the placement, on the metadata write of this very creation perhaps: it stays faulted until it is imported
    /// again, and a plan on it would wait for that for ever, holding its room).
    pub(super) async fn never_made_there(&self, rep: &ReplicaRecord, e: &VolumeError) -> bool {
        if refused(e) || node_gone(e) {
            return true;
        }
        if !matches!(
            e,
            VolumeError::Engine {
                code: Code::Unavailable,
                ..
            }
        ) {
            return false;
        }
        self.registry.get(&rep.node).await.is_ok_and(|n| {
            n.record
                .status
                .pools
                .iter()
                .any(|p| p.name == rep.pool && p.disk_errors > 0)
        })
    }

    /// Asks `rep`'s engine for the replica (idempotent: the same request again is a no-op).
    /// Its pool's generation with it ([`generation_of`]).
    pub(super) async fn create_replica(
        &self,
        rep: &ReplicaRecord,
        size: u64,
    ) -> Result<Option<(u64, u64)>, VolumeError> {
        let mut c = self.engine(&rep.node).await?;
        c.create_replica(epb::CreateReplicaRequest {
            pool: rep.pool.clone(),
            uuid: rep.uuid.to_string(),
            size,
            share: false,
            allowed_hosts: vec![],
        })
        .await
        .map(|r| generation_of(&r.into_inner()))
        .map_err(|s| engine_error(&rep.node, s))
    }

    /// Where a volume made from snapshot `snap` can have its replicas: clones in the pools holding the snapshot's
    /// copies, on Online, uncordoned nodes its placement admits (`true`), and, where the snapshot has fewer such
    /// copies than the spec asks for replicas (taken of a Degraded volume, a copy's node down or cordoned, its pool
    /// full), empty replicas placed beside them as any replacement is (`false`), out of sync until a nexus rebuilds
    /// them from the clones. All of them, or none: none without a usable copy, and none while an engine holding a
    /// copy has not answered (asked again soon, it may take a clone rather than a full copy).
    async fn place_clones(
        &self,
        view: &super::room::PlacementView,
        spec: &VolumeSpec,
        snap: Uuid,
    ) -> Result<Vec<(scheduler::Choice, bool)>, VolumeError> {
        let s = self
            .snapshot(snap)
            .await?
            .filter(|s| s.phase == super::snapshots::SnapshotPhase::Created)
            .ok_or(VolumeError::SnapshotNotFound(snap))?;
        if spec.size != s.size {
            return Err(VolumeError::InvalidArgument(format!(
                "a volume made from snapshot {snap} has its size, {} bytes, not {}",
                s.size, spec.size
            )));
        }
        let mut why = Vec::new();
        let mut out = Vec::new();
        // An engine not answering now: the create may succeed when asked again (UNAVAILABLE, not exhausted).
        let mut unanswered = None;
        for c in &s.copies {
            match view.nodes.iter().find(|n| n.spec.name == c.node) {
                Some(n) if n.status.state != NodeState::Online => {
                    why.push(format!("{} is {:?}", c.node, n.status.state))
                }
                Some(n) if n.cordoned => why.push(format!("{} is cordoned", c.node)),
                Some(n) => match spec.placement.admits(&n.spec.placement_labels()) {
                    Ok(()) => match room_for_clone(view, &c.node, &c.pool, s.size) {
                        Ok(()) => out.push(scheduler::Choice {
                            node: c.node.clone(),
                            pool: c.pool.clone(),
                        }),
                        Err(CloneRoom::NoRoom(e)) => why.push(format!("on {}: {e}", c.node)),
                        Err(CloneRoom::NotAsked(e)) => {
                            why.push(format!("on {}: {e}", c.node));
                            unanswered.get_or_insert(c.node.clone());
                        }
                    },
                    Err(e) => why.push(format!("{} {e}", c.node)),
                },
                None => why.push(format!("{} is unknown", c.node)),
            }
        }
        let wanted = spec.replicas as usize;
        if out.len() < wanted && (out.is_empty() || unanswered.is_some()) {
            let message = format!(
                "a volume made from snapshot {snap} needs a usable copy of it for a replica ({} of {} usable): {}",
                out.len(),
                s.copies.len(),
                why.join("; ")
            );
            if let Some(node) = unanswered {
                return Err(VolumeError::Engine {
                    node,
                    code: Code::Unavailable,
                    message,
                });
            }
            return Err(VolumeError::NoCopies(message));
        }
        out.truncate(wanted);
        let holding: BTreeSet<String> = out.iter().map(|c| c.node.clone()).collect();
        let block_size = scheduler::block_size_of(
            &view.nodes,
            out.iter().map(|c| (c.node.as_str(), c.pool.as_str())),
        );
        let empty = scheduler::place_alongside(
            &view.nodes,
            s.size,
            wanted - out.len(),
            &holding,
            &spec.placement,
            block_size,
        )
        .map_err(|e| {
            VolumeError::NoCopies(format!(
                "{wanted} replicas of a volume made from snapshot {snap}: {} from usable copies of it ({}), and \
                 the others cannot be placed: {e}",
                out.len(),
                why.join("; ")
            ))
        })?;
        if !empty.is_empty() {
            tracing::info!(snapshot = %snap, clones = out.len(), empty = empty.len(), why = %why.join("; "), "the snapshot has too few usable copies: the other replicas are made empty and rebuilt once published");
        }
        Ok(out
            .into_iter()
            .map(|c| (c, true))
            .chain(empty.into_iter().map(|c| (c, false)))
            .collect())
    }

    /// Asks `rep`'s engine for a clone of snapshot `snap` as the replica (idempotent).
    async fn create_clone(
        &self,
        rep: &ReplicaRecord,
        snap: Uuid,
    ) -> Result<Option<(u64, u64)>, VolumeError> {
        let mut c = self.engine(&rep.node).await?;
        c.create_clone(epb::CreateCloneRequest {
            snapshot: snap.to_string(),
            uuid: rep.uuid.to_string(),
            share: false,
            allowed_hosts: vec![],
        })
        .await
        .map(|r| generation_of(&r.into_inner()))
        .map_err(|s| engine_error(&rep.node, s))
    }

    /// Creates the replicas still to create, recording each; rolls back on a refusal, keeps the plan otherwise.
    async fn drive_create(&self, mut r: VolumeRecord) -> Result<VolumeRecord, VolumeError> {
        for i in 0..r.replicas.len() {
            if r.replicas[i].created {
                continue;
            }
            let rep = r.replicas[i].clone();
            // A replica made from a snapshot is a clone of its copy, unless it was placed out of sync beside the
            // clones (the snapshot had too few usable copies): made empty, rebuilt once published.
            let res = match r.spec.source_snapshot {
                Some(snap) if rep.synced => self.create_clone(&rep, snap).await,
                _ => self.create_replica(&rep, r.spec.size).await,
            };
            match res {
                Ok(generation) => {
                    failpoint::at(failpoint::CREATE_REPLICA_CREATED);
                    r.replicas[i].created = true;
                    self.save(&r).await?;
                    self.replica_created(&rep.uuid, generation);
                }
                // Refused, or its node went down after the placement (it would wait for that node for ever): all
                // replicas or none, so the volume is rolled back and the caller's retry placed again.
                Err(e) if self.never_made_there(&rep, &e).await => {
                    tracing::warn!(uuid = %r.uuid, error = %e, "replica not made: rolling the volume back");
                    r.phase = VolumePhase::Deleting;
                    r.reason = format!("creation refused: {e}");
                    self.save(&r).await?;
                    let _ = self.drive_delete(r).await;
                    return Err(e);
                }
                Err(e) => {
                    r.reason = format!("creation waits: {e}");
                    self.save(&r).await?;
                    return Err(e);
                }
            }
        }
        r.phase = VolumePhase::Created;
        r.reason.clear();
        let empty = r.replicas.iter().filter(|x| !x.synced).count();
        if empty > 0 {
            r.reason = format!(
                "{empty} of its replicas made empty beside the clones of its snapshot (too few usable copies): \
                 rebuilt from them once the volume is published"
            );
        }
        self.save(&r).await?;
        tracing::info!(uuid = %r.uuid, "volume created");
        Ok(r)
    }

    pub async fn delete(&self, uuid: Uuid) -> Result<(), VolumeError> {
        let lock = self.lock_of(uuid);
        let _held = lock.lock().await;
        let mut r = self.get(uuid).await?;
        if r.phase != VolumePhase::Deleting {
            r.phase = VolumePhase::Deleting;
            self.save(&r).await?;
            failpoint::at(failpoint::DELETE_MARKED);
        }
        self.drive_delete(r).await
    }

    /// Destroys the nexus (when its node answers; a nexus on a node that is down stays fenced by the reservation
    /// keys), then retires each replica (recorded as garbage first, so one on a node that is down is destroyed when
    /// it returns); the record goes last.
    async fn drive_delete(&self, mut r: VolumeRecord) -> Result<(), VolumeError> {
        if let Some(n) = r.nexus.clone() {
            self.destroy_nexus(r.uuid, &n.node).await?;
            failpoint::at(failpoint::DELETE_NEXUS_DESTROYED);
            r.nexus = None;
            self.save(&r).await?;
        }
        while !r.replicas.is_empty() {
            let last = r.replicas.len() - 1;
            self.retire(&mut r, last).await?;
        }
        // The snapshot taken to make it from another volume goes with it: marked Deleting before the record goes.
        // Its UUID comes from the volume's (which CSI makes from the volume's name): left Created by a crash after
        // the record went, a volume made again under the same name from the same source would take it, with the
        // source's data of the first time.
        let hidden = r
            .spec
            .source_snapshot
            .filter(|_| r.spec.source_volume.is_some());
        if let Some(snap) = hidden {
            self.mark_snapshot_deleting(snap).await?;
        }
        self.store.delete(&volume::key(&r.uuid)).await?;
        tracing::info!(uuid = %r.uuid, "volume deleted");
        failpoint::at(failpoint::DELETE_RECORD_DROPPED);
        // Destroyed now, or later by the snapshot reconciler.
        if let Some(snap) = hidden
            && let Err(e) = self.delete_snapshot(snap).await
            && !matches!(e, VolumeError::SnapshotNotFound(_))
        {
            tracing::warn!(uuid = %r.uuid, snapshot = %snap, error = %e, "its source snapshot is left for later");
        }
        Ok(())
    }

    /// Whether the nexus `n` of volume `uuid` ended cleanly without the agent destroying it: its engine instance shut down cleanly
    /// (deregistered after shutting its nexuses down, `n` not among those that did not drain) and another instance
    /// runs on the node now.
    pub(super) async fn ended_cleanly(&self, uuid: Uuid, n: &NexusRecord) -> bool {
        self.registry
            .get(&n.node)
            .await
            .is_ok_and(|v| v.record.nexus_ended_cleanly(&n.instance, &uuid.to_string()))
    }

    /// Destroys the volume's nexus `n` and says whether it ended cleanly: destroyed now (its I/O drained), or gone
    /// already after a clean shutdown of its engine. A node that is not Online is skipped (not clean): the nexus
    /// there stays fenced by the next one's reservation key.
    pub(super) async fn end_nexus(&self, uuid: Uuid, n: &NexusRecord) -> Result<bool, VolumeError> {
        match self.destroy_nexus(uuid, &n.node).await? {
            NexusEnd::Destroyed { clean } => Ok(clean),
            NexusEnd::Gone => Ok(self.ended_cleanly(uuid, n).await),
            NexusEnd::NodeDown => Ok(false),
        }
    }

    /// Destroys the volume's nexus on `node`; a node that is not Online is skipped.
    pub(super) async fn destroy_nexus(
        &self,
        uuid: Uuid,
        node: &str,
    ) -> Result<NexusEnd, VolumeError> {
        match self.engine(node).await {
            Ok(mut c) => match c
                .destroy_nexus(epb::DestroyNexusRequest {
                    uuid: uuid.to_string(),
                })
                .await
            {
                Ok(r) => Ok(NexusEnd::Destroyed {
                    clean: r.into_inner().clean,
                }),
                Err(s) if s.code() == Code::NotFound => Ok(NexusEnd::Gone),
                Err(s) => Err(engine_error(node, s)),
            },
            Err(VolumeError::Node(
                NodeEngineError::NotOnline { .. } | NodeEngineError::NotFound(_),
            )) => {
                tracing::warn!(%uuid, node, "the nexus's node is down: its nexus stays fenced, not destroyed");
                Ok(NexusEnd::NodeDown)
            }
            Err(e) => Err(e),
        }
    }

    /// The volume's state (its nexus's when published: Online, Degraded, Faulted; else from its replicas' nodes),
    /// and its nexus as the engine lists it, when published and reachable.
    pub async fn state(&self, r: &VolumeRecord) -> (&'static str, Option<epb::Nexus>) {
        if let Some(n) = r.nexus.as_ref().filter(|n| n.published) {
            let Ok(mut c) = self.engine(&n.node).await else {
                return ("Faulted", None);
            };
            let Ok(list) = c.list_nexuses(epb::ListNexusesRequest {}).await else {
                return ("Faulted", None);
            };
            let found = list
                .into_inner()
                .nexuses
                .into_iter()
                .find(|x| x.uuid == r.uuid.to_string());
            let mut state = nexus_state(r, found.as_ref());
            // A replica whose node is down is not noticed by the nexus until its next write to it.
            if state == "Online" && !self.replicas_on_down_nodes(r).await.is_empty() {
                state = "Degraded";
            }
            return (state, found);
        }
        (self.unpublished_state(r).await, None)
    }

    /// The nodes of `r`'s replicas that are not Online in the registry.
    pub async fn replicas_on_down_nodes(&self, r: &VolumeRecord) -> Vec<String> {
        let mut down = Vec::new();
        for rep in &r.replicas {
            let online = self
                .registry
                .get(&rep.node)
                .await
                .is_ok_and(|v| v.record.status.state == NodeState::Online);
            if !online {
                down.push(rep.node.clone());
            }
        }
        down
    }

    /// An unpublished volume's state: Online with every replica in sync on an Online node, Faulted with none (a
    /// replica out of sync, one left half rebuilt or placed by a scale-up, holds no copy a host could use).
    pub(super) async fn unpublished_state(&self, r: &VolumeRecord) -> &'static str {
        let mut up = 0;
        for rep in &r.replicas {
            if rep.created
                && rep.synced
                && self
                    .registry
                    .get(&rep.node)
                    .await
                    .is_ok_and(|v| v.record.status.state == NodeState::Online)
            {
                up += 1;
            }
        }
        match up {
            0 => "Faulted",
            n if n == r.replicas.len() && n == r.spec.replicas as usize => "Online",
            _ => "Degraded",
        }
    }

    /// Resumes volumes left Creating or Deleting (by a crash or a failure worth retrying). Skips volumes whose
    /// operation is in flight.
    pub async fn reconcile(&self) -> Result<(), VolumeError> {
        let read_at = std::time::Instant::now();
        let records = self.list_sound().await?;
        self.sync_promises(&records, read_at);
        for r in records {
            if r.phase == VolumePhase::Created {
                continue;
            }
            let Some((_held, r)) = self.claim_idle(r.uuid).await? else {
                continue;
            };
            let uuid = r.uuid;
            let res = match r.phase {
                VolumePhase::Creating => self.drive_create(r).await.map(drop),
                VolumePhase::Deleting => self.drive_delete(r).await,
                VolumePhase::Created => Ok(()),
            };
            if let Err(e) = res {
                tracing::debug!(%uuid, error = %e, "volume operation still waiting");
            }
        }
        Ok(())
    }
}

/// A published volume's state from its nexus as the engine lists it (`None`: the engine has no such nexus).
pub(super) fn nexus_state(r: &VolumeRecord, nexus: Option<&epb::Nexus>) -> &'static str {
    // Every child healthy, but fewer than the spec asks for (one retired, its replacement not in yet).
    let healthy = nexus.map_or(0, |x| {
        x.children
            .iter()
            .filter(|c| c.state == epb::ChildState::Healthy as i32)
            .count()
    });
    let complete = healthy >= r.spec.replicas as usize;
    match nexus.and_then(|x| epb::NexusState::try_from(x.state).ok()) {
        Some(epb::NexusState::Online) if !complete => "Degraded",
        Some(epb::NexusState::Online) => "Online",
        Some(epb::NexusState::Degraded) => "Degraded",
        _ => "Faulted",
    }
}

/// Volume creates and deletes resumed, as a reconciler (see [`super::reconcile`]).
pub struct VolumeOperations(pub Arc<Volumes>);

#[async_trait::async_trait]
impl super::reconcile::Reconciler for VolumeOperations {
    fn name(&self) -> &'static str {
        "volume_operations"
    }

    async fn pass(&self) -> Result<(), String> {
        self.0.reconcile().await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Locks no one holds are dropped as the table grows; one held (or waited for) is kept, and is the one the next
    /// caller gets. Before, every UUID ever asked about kept an entry for the agent's life.
    #[test]
    fn volume_locks_keep_only_those_in_use() {
        let locks = VolumeLocks::default();
        let held_id = Uuid::new_v4();
        let held = locks.of(held_id);
        let guard = held.try_lock().unwrap();
        for _ in 0..10 * VolumeLocks::SWEPT_FROM {
            drop(locks.of(Uuid::new_v4()));
        }
        assert!(
            locks.len() <= VolumeLocks::SWEPT_FROM + 1,
            "{}",
            locks.len()
        );
        assert!(Arc::ptr_eq(&held, &locks.of(held_id)));
        drop(guard);
    }
}
