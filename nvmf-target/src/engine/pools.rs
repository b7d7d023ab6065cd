//! The engine's pools, replicas and snapshots: opening disks, creating or importing pools on them, and exporting
//! shared replicas as `nqn...:replica-<uuid>` subsystems with their host allow-lists. What is shared, and to whom,
//! is kept in the pool's metadata, so importing a pool after a restart exports its replicas again.
//!
//! A pool's disk is opened exclusively ([`FileDevice::open_exclusive`]: one io-engine per disk on a machine,
//! whatever path names it) and the pool is claimed for this engine's node name; a pool another node owns is
//! refused unless the import is forced.

use std::path::Path;
use std::sync::Arc;

use uuid::Uuid;

use crate::block::file::FileDevice;
use crate::block::{BlockDevice, BlockError};
use crate::pool::meta::{Share, VolumeMeta};
use crate::pool::room::share_disk_room;
use crate::pool::{Claim, Pool, PoolError, PoolObject, PoolSpec, PoolStats, Probe};
use crate::protocol::nqn::Nqn;
use crate::target::SubsystemSpec;
use crate::target::reservation::{ReservationState, ReservationStore, Reservations};

use super::{Engine, EngineError};

/// Default cluster size of a new pool.
pub const DEFAULT_CLUSTER: u32 = 4 << 20;

/// A pool as the engine keeps it.
#[derive(Clone)]
pub struct PoolEntry {
    pub pool: Pool,
    pub disk: String,
}

/// A replica as the API shows it.
#[derive(Clone, Debug)]
pub struct ReplicaInfo {
    /// Its metadata; without its cluster map when listed ([`Pool::volume_headers`]).
    pub meta: VolumeMeta,
    pub pool: String,
    pub allocated: u64,
    /// Bytes of its clusters no snapshot or clone shares ([`Pool::volume_usage`]).
    pub unshared: u64,
    /// Its pool's [`Pool::generation`] when this was read.
    pub pool_generation: (u64, u64),
    /// Set when the replica is exported.
    pub nqn: Option<Nqn>,
}

/// A snapshot as the API shows it.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub meta: VolumeMeta,
    pub pool: String,
    pub referenced: u64,
}

async fn open_disk(disk: &str, block_size: u32) -> Result<Arc<FileDevice>, EngineError> {
    let path = Path::new(disk).to_path_buf();
    if disk.is_empty() || !path.is_absolute() {
        return Err(EngineError::InvalidArgument(format!(
            "disk {disk:?} must be an absolute path to a file or block device"
        )));
    }
    if !path.exists() {
        return Err(EngineError::InvalidArgument(format!(
            "disk {disk} does not exist"
        )));
    }
    let p = path.clone();
    let opened =
        tokio::task::spawn_blocking(move || FileDevice::open_exclusive(&p, block_size, true))
            .await
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
    match opened {
        Ok(dev) => Ok(Arc::new(dev)),
        Err(BlockError::InUse(why)) => Err(EngineError::DiskInUse {
            disk: disk.to_string(),
            why,
            owner: label_owner(path).await,
        }),
        Err(e) => Err(e.into()),
    }
}

/// The subsystem a replica is exported in: its NQN, to the hosts `share` names (any host when none).
fn replica_subsystem(nqn: Nqn, share: &Share) -> SubsystemSpec {
    SubsystemSpec {
        nqn,
        serial: String::new(),
        model: String::new(),
        allow_any_host: share.hosts.is_empty(),
        allowed_hosts: share.hosts.clone(),
        single_path: true,
    }
}

/// `dev` (open on `disk`) with `block_size`-byte blocks: itself, or the disk opened again. A pool whose blocks
/// are smaller than the disk's unit of direct I/O (made before pools were checked for it) is warned of: its
/// writes smaller than the unit fail.
async fn reopen(
    dev: Arc<FileDevice>,
    disk: &str,
    block_size: u32,
) -> Result<Arc<FileDevice>, EngineError> {
    let smallest = dev.smallest_block_size();
    if block_size < smallest {
        tracing::warn!(
            disk,
            block_size,
            smallest,
            "the pool's blocks are smaller than the disk's unit of direct I/O: writes of less than that fail"
        );
    }
    if dev.block_size() == block_size {
        return Ok(dev);
    }
    drop(dev); // the exclusive claim on the disk goes before it is taken again
    open_disk(disk, block_size).await
}

/// Whether `disk` holds a pool, or anything but zeroes where a label would be, or cannot be read: what must not
/// be formatted without being asked. A missing disk holds nothing.
pub(super) async fn holds_something(disk: &str) -> bool {
    // A missing or empty file holds nothing.
    if std::fs::metadata(disk).is_ok_and(|m| m.is_file() && m.len() == 0)
        || !Path::new(disk).exists()
    {
        return false;
    }
    match open_disk(disk, 512).await {
        Ok(dev) => !matches!(Pool::probe(dev.as_ref()).await, Ok(Probe::Blank)),
        Err(_) => true,
    }
}

/// What the label of a disk another process holds says of its owner ("" when it cannot be read).
async fn label_owner(path: std::path::PathBuf) -> String {
    let Ok(Ok(dev)) =
        tokio::task::spawn_blocking(move || FileDevice::open(&path, 0, 512, false)).await
    else {
        return String::new();
    };
    match Pool::probe(&dev).await {
        Ok(Probe::Pool(l)) if !l.owner.is_empty() => format!(
            "; it holds pool {} owned by node {:?} (incarnation {})",
            l.name, l.owner, l.incarnation
        ),
        Ok(Probe::Pool(l)) => format!("; it holds pool {}", l.name),
        _ => String::new(),
    }
}

/// Keeps a replica namespace's reservations in its pool, so they survive a restart.
struct PoolReservations {
    pool: Pool,
    uuid: Uuid,
}

#[async_trait::async_trait]
impl ReservationStore for PoolReservations {
    async fn save(&self, state: &ReservationState) -> Result<(), String> {
        let v = serde_json::to_value(state).map_err(|e| e.to_string())?;
        self.pool
            .set_reservation(self.uuid, Some(v))
            .await
            .map_err(|e| e.to_string())
    }
}

/// How long a destroy of a volume no pool has waits for the pools' journals ([`Engine::find_volume_caught_up`]).
const CAUGHT_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Engine {
    fn pools_map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, PoolEntry>> {
        self.inner.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pools(&self) -> Vec<PoolEntry> {
        self.pools_map().values().cloned().collect()
    }

    /// Every open pool with its stats, the room of a file system that several of their files share shared out
    /// among them (`pool::room`): what the API, the cluster agent and the metrics are told.
    pub fn pools_with_stats(&self) -> Vec<(PoolEntry, PoolStats)> {
        let pools = self.pools();
        let mut stats: Vec<PoolStats> = pools.iter().map(|e| e.pool.stats()).collect();
        share_disk_room(&mut stats);
        pools.into_iter().zip(stats).collect()
    }

    /// The stats of pool `name`, as [`Self::pools_with_stats`] tells them.
    pub fn pool_stats(&self, name: &str) -> Option<PoolStats> {
        self.pools_with_stats()
            .into_iter()
            .find(|(e, _)| e.pool.name() == name)
            .map(|(_, s)| s)
    }

    pub fn pool(&self, name: &str) -> Result<PoolEntry, EngineError> {
        self.pools_map()
            .get(name)
            .cloned()
            .ok_or_else(|| PoolError::NotFound(PoolObject::Pool(name.to_string())).into())
    }

    /// Formats a blank disk as pool `name`, or imports the pool `name` already on it. Repeating it is a no-op.
    pub async fn create_pool(
        &self,
        name: &str,
        disk: &str,
        uuid: Option<Uuid>,
        cluster_size: u32,
        block_size: u32,
    ) -> Result<PoolEntry, EngineError> {
        self.open_pool(name, disk, uuid, cluster_size, block_size, true)
            .await
    }

    /// [`Self::create_pool`]; a blank disk is formatted only if `may_format`, else FAILED_PRECONDITION.
    pub(super) async fn open_pool(
        &self,
        name: &str,
        disk: &str,
        uuid: Option<Uuid>,
        cluster_size: u32,
        block_size: u32,
        may_format: bool,
    ) -> Result<PoolEntry, EngineError> {
        let _disk = self.claim_disk(disk).await;
        let _name = self.claim_pool_name(name).await;
        if self
            .inner
            .pools_closed
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(EngineError::Unavailable(
                "the engine is shutting down".into(),
            ));
        }
        // 0: whatever the pool has (the default for a new one), as for the block size: a retry of a request that
        // imported a pool of another cluster size is the same request.
        let asked_cluster = cluster_size;
        let cluster_size = if cluster_size == 0 {
            DEFAULT_CLUSTER
        } else {
            cluster_size
        };
        if let Some(e) = self.pools_map().get(name).cloned() {
            let l = e.pool.label();
            if e.disk != disk
                || (asked_cluster != 0 && l.cluster_size != asked_cluster)
                || (block_size != 0 && l.block_size != block_size)
                || uuid.is_some_and(|u| u != l.uuid)
            {
                return Err(PoolError::AlreadyExists {
                    what: PoolObject::Pool(name.to_string()),
                    detail: format!(
                        "on {} ({} clusters of {} bytes, uuid {})",
                        e.disk, l.data_clusters, l.cluster_size, l.uuid
                    ),
                }
                .into());
            }
            return Ok(e);
        }
        self.check_disk_free(disk)?;
        let dev = open_disk(disk, 512).await?;
        let pool = match Pool::probe(dev.as_ref()).await? {
            Probe::Blank if !may_format => {
                return Err(EngineError::FailedPrecondition(format!(
                    "disk {disk} is blank now, but held a pool or data (or could not be read) when pool {name} \
                     was first tried: a retry does not format it (CreatePool does)"
                )));
            }
            Probe::Blank => {
                let smallest = dev.smallest_block_size();
                let block_size = if block_size == 0 {
                    smallest
                } else {
                    block_size
                };
                if block_size < smallest {
                    return Err(EngineError::InvalidArgument(format!(
                        "disk {disk} takes direct I/O in units of {smallest} bytes: a pool on it needs blocks of \
                         at least that (asked {block_size}; 0 picks it)"
                    )));
                }
                let dev = reopen(dev, disk, block_size).await?;
                // Opened again: still blank (nothing came in between).
                if !matches!(Pool::probe(dev.as_ref()).await?, Probe::Blank) {
                    return Err(EngineError::FailedPrecondition(format!(
                        "disk {disk} changed while it was being opened"
                    )));
                }
                let spec = PoolSpec {
                    name: name.to_string(),
                    uuid: uuid.unwrap_or_else(Uuid::new_v4),
                    cluster_size,
                };
                Pool::create(dev, &spec, &self.claim(false)).await?
            }
            Probe::Pool(l) if l.name == name && uuid.is_none_or(|u| u == l.uuid) => {
                if asked_cluster != 0 && asked_cluster != l.cluster_size {
                    return Err(PoolError::AlreadyExists {
                        what: PoolObject::Pool(l.name.clone()),
                        detail: format!("on {disk} with {}-byte clusters", l.cluster_size),
                    }
                    .into());
                }
                if block_size != 0 && block_size != l.block_size {
                    return Err(PoolError::AlreadyExists {
                        what: PoolObject::Pool(l.name.clone()),
                        detail: format!("on {disk} with {}-byte blocks", l.block_size),
                    }
                    .into());
                }
                let dev = reopen(dev, disk, l.block_size).await?;
                Pool::import(dev, &self.claim(false)).await?
            }
            Probe::Pool(l) => {
                return Err(PoolError::AlreadyExists {
                    what: PoolObject::Pool(l.name.clone()),
                    detail: format!("disk {disk} holds it ({})", l.uuid),
                }
                .into());
            }
        };
        self.adopt_pool(pool, disk)
    }

    /// Held by a pool create, import or destroy on `disk` (taken before [`Self::claim_pool_name`]).
    async fn claim_disk(&self, disk: &str) -> super::claims::Claim<'_, String> {
        self.inner.pool_admin.claim(format!("disk:{disk}")).await
    }

    /// Held by a pool create, import or destroy of the pool `name`.
    async fn claim_pool_name(&self, name: &str) -> super::claims::Claim<'_, String> {
        self.inner.pool_admin.claim(format!("pool:{name}")).await
    }

    /// This node's claim on the pools it imports.
    fn claim(&self, force: bool) -> Claim {
        Claim {
            node: self.node_name().to_string(),
            force,
        }
    }

    /// Imports the pool on `disk` (never formats); `force` takes it even from another node (see [`Claim`]).
    pub async fn import_pool(&self, disk: &str, force: bool) -> Result<PoolEntry, EngineError> {
        let _disk = self.claim_disk(disk).await;
        if let Some(e) = self.pools_map().values().find(|e| e.disk == disk).cloned() {
            return Ok(e);
        }
        let mut dev = open_disk(disk, 512).await?;
        let mut _name = None;
        if let Probe::Pool(l) = Pool::probe(dev.as_ref()).await? {
            _name = Some(self.claim_pool_name(&l.name).await);
            if self.pools_map().contains_key(&l.name) {
                return Err(PoolError::AlreadyExists {
                    what: PoolObject::Pool(l.name.clone()),
                    detail: format!(
                        "imported from another disk; {disk} holds one of that name too"
                    ),
                }
                .into());
            }
            dev = reopen(dev, disk, l.block_size).await?;
        }
        let pool = Pool::import(dev, &self.claim(force)).await?;
        if self.pools_map().contains_key(pool.name()) {
            return Err(PoolError::AlreadyExists {
                what: PoolObject::Pool(pool.name().to_string()),
                detail: "imported from another disk".into(),
            }
            .into());
        }
        self.adopt_pool(pool, disk)
    }

    fn check_disk_free(&self, disk: &str) -> Result<(), EngineError> {
        if let Some(e) = self.pools_map().values().find(|e| e.disk == disk) {
            return Err(PoolError::AlreadyExists {
                what: PoolObject::Disk(disk.to_string()),
                detail: format!("in use by pool {}", e.pool.name()),
            }
            .into());
        }
        Ok(())
    }

    /// Registers an opened pool and exports its shared replicas.
    fn adopt_pool(&self, pool: Pool, disk: &str) -> Result<PoolEntry, EngineError> {
        let entry = PoolEntry {
            pool: pool.clone(),
            disk: disk.to_string(),
        };
        self.pools_map()
            .insert(pool.name().to_string(), entry.clone());
        // Opened while the engine shut down (after close_pools looked): closed like the others.
        if self
            .inner
            .pools_closed
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            pool.close();
        }
        for v in pool.volume_headers() {
            if let Some(share) = &v.share
                && let Err(e) = self.export_replica(&pool, v.uuid, share)
            {
                tracing::error!(pool = %pool.name(), replica = %v.uuid, error = %e, "cannot export replica");
            }
        }
        Ok(entry)
    }

    /// Destroys an empty pool and wipes its label. A pool of that name being created or imported is waited for
    /// and destroyed once made (answering NotFound, the pool would appear after the answer).
    pub async fn destroy_pool(&self, name: &str) -> Result<(), EngineError> {
        let disk = match self.pool(name) {
            Ok(e) => e.disk,
            Err(_) => {
                // A create or import under way holds the name's claim until its pool is registered or it fails.
                drop(self.claim_pool_name(name).await);
                self.pool(name)?.disk
            }
        };
        let _disk = self.claim_disk(&disk).await;
        let _name = self.claim_pool_name(name).await;
        let e = self.pool(name)?;
        if e.disk != disk {
            return Err(EngineError::Unavailable(format!(
                "pool {name} was made again on {} meanwhile: ask again",
                e.disk
            )));
        }
        e.pool.destroy().await?;
        self.pools_map().remove(name);
        Ok(())
    }

    /// Closes every pool (shutdown).
    pub fn close_pools(&self) {
        self.inner
            .pools_closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for e in self.pools_map().values() {
            e.pool.close();
        }
    }

    /// The pool holding volume `uuid` (replica or snapshot) and its metadata.
    fn find_volume(&self, uuid: &Uuid) -> Option<(Pool, VolumeMeta)> {
        self.pools_map()
            .values()
            .find_map(|e| Some((e.pool.clone(), e.pool.volume_meta(uuid)?)))
    }

    /// [`Self::find_volume`], and if no pool has it, again once every pool has applied the commits asked for
    /// before now: a create still on its way (its caller gone while it waited for the journal) is found, so that
    /// a destroy does not answer NotFound and leave it behind, a replica nobody knows of. A pool whose journal
    /// does not answer within [`CAUGHT_UP_WAIT`] (a hung disk) makes it an error to try again, not NotFound.
    async fn find_volume_caught_up(
        &self,
        uuid: &Uuid,
    ) -> Result<Option<(Pool, VolumeMeta)>, EngineError> {
        if let Some(found) = self.find_volume(uuid) {
            return Ok(Some(found));
        }
        let pools: Vec<Pool> = self.pools_map().values().map(|e| e.pool.clone()).collect();
        let all = futures_util::future::join_all(pools.iter().map(|p| p.caught_up()));
        if tokio::time::timeout(CAUGHT_UP_WAIT, all).await.is_err() {
            return Err(PoolError::Io(format!(
                "{uuid} is not found, but a pool's journal has not answered for {} s, so a create of it may \
                 still be on its way: try again",
                CAUGHT_UP_WAIT.as_secs()
            ))
            .into());
        }
        Ok(self.find_volume(uuid))
    }

    /// What owns subsystem `nqn`, if the engine manages it: a published nexus (`vol-<uuid>`) or a pool's replica or
    /// snapshot (`replica-<uuid>`). Such a subsystem changes only through its owner's calls (PublishNexus,
    /// ShareReplica, ...): changed behind its back, its owner's record of it would be wrong (a nexus's unpublish
    /// finding no subsystem, a share answering for a namespace that is not there).
    pub fn subsystem_owner(&self, nqn: &str) -> Option<String> {
        // A nexus's, published or not yet (its publish makes this subsystem).
        if let Some(n) = self.nexuses_mut().iter().find(|n| {
            n.nqn.as_ref().is_some_and(|q| q.as_str() == nqn)
                || crate::protocol::nqn::Nqn::volume(&n.uuid).as_str() == nqn
        }) {
            return Some(format!("nexus {}", n.uuid));
        }
        let uuid = nqn
            .strip_prefix(crate::protocol::nqn::KEELSON_PREFIX)?
            .strip_prefix("replica-")
            .and_then(|u| Uuid::parse_str(u).ok())?;
        self.find_volume(&uuid)
            .map(|_| format!("pool volume {uuid}"))
    }

    fn find_replica(&self, uuid: &Uuid) -> Result<(Pool, VolumeMeta), EngineError> {
        Self::replica_of(uuid, self.find_volume(uuid))
    }

    fn replica_of(
        uuid: &Uuid,
        found: Option<(Pool, VolumeMeta)>,
    ) -> Result<(Pool, VolumeMeta), EngineError> {
        match found {
            Some((p, v)) if !v.is_snapshot() => Ok((p, v)),
            Some(_) => Err(EngineError::InvalidArgument(format!(
                "{uuid} is a snapshot, not a replica"
            ))),
            None => Err(PoolError::NotFound(PoolObject::Replica(*uuid)).into()),
        }
    }

    fn replica_info(&self, pool: &Pool, meta: VolumeMeta) -> ReplicaInfo {
        let nqn = Nqn::replica(&meta.uuid);
        let exported = self.target().subsystem(nqn.as_str()).is_some();
        let pool_generation = pool.generation();
        let (allocated, unshared) = pool.volume_usage(&meta.uuid);
        ReplicaInfo {
            pool_generation,
            allocated,
            unshared,
            pool: pool.name().to_string(),
            nqn: exported.then_some(nqn),
            meta,
        }
    }

    pub fn replica(&self, uuid: &Uuid) -> Result<ReplicaInfo, EngineError> {
        let (pool, meta) = self.find_replica(uuid)?;
        Ok(self.replica_info(&pool, meta))
    }

    pub fn replicas(&self) -> Vec<ReplicaInfo> {
        let mut out = Vec::new();
        for e in self.pools() {
            for v in e
                .pool
                .volume_headers()
                .into_iter()
                .filter(|v| !v.is_snapshot())
            {
                out.push(self.replica_info(&e.pool, v));
            }
        }
        out
    }

    /// Creates a thin replica, shared with `share` if given. Repeating the same request is a no-op.
    pub async fn create_replica(
        &self,
        pool: &str,
        uuid: Uuid,
        size: u64,
        share: Option<Share>,
    ) -> Result<ReplicaInfo, EngineError> {
        let _sharing = self.inner.sharing.claim(uuid).await;
        if let Some((p, _)) = self.find_volume(&uuid)
            && p.name() != pool
        {
            return Err(PoolError::AlreadyExists {
                what: PoolObject::Replica(uuid),
                detail: format!("in pool {}", p.name()),
            }
            .into());
        }
        let e = self.pool(pool)?;
        if share.is_some() {
            // Refused before the replica is made, not after (its export would fail, the replica left behind). Under
            // the exports' lock: an import exporting this replica meanwhile is seen whole or not at all.
            let _exporting = self.exporting();
            self.no_stranger_under(&uuid)?;
        }
        if let Some(v) = e.pool.volume_meta(&uuid)
            && v.share != share
            && !v.is_snapshot()
            && v.size == size
        {
            return Err(PoolError::AlreadyExists {
                what: PoolObject::Replica(uuid),
                detail: format!("with other sharing ({:?})", v.share.map(|s| s.hosts)),
            }
            .into());
        }
        e.pool.create_replica(uuid, size, share.clone()).await?;
        if let Some(s) = &share {
            self.export_replica(&e.pool, uuid, s)?;
        }
        self.replica(&uuid)
    }

    /// Unexports and destroys a replica; its snapshots stay.
    pub async fn destroy_replica(&self, uuid: &Uuid) -> Result<(), EngineError> {
        let _sharing = self.inner.sharing.claim(*uuid).await;
        let (pool, _) = Self::replica_of(uuid, self.find_volume_caught_up(uuid).await?)?;
        self.unexport_replica(uuid);
        pool.destroy_volume(*uuid).await?;
        Ok(())
    }

    /// Exports a replica to `hosts` (empty: any host), or changes the allow-list of an exported one.
    pub async fn share_replica(
        &self,
        uuid: &Uuid,
        hosts: Vec<String>,
    ) -> Result<ReplicaInfo, EngineError> {
        let _sharing = self.inner.sharing.claim(*uuid).await;
        let (pool, _) = self.find_replica(uuid)?;
        for h in &hosts {
            Nqn::parse(h).map_err(|e| EngineError::InvalidArgument(format!("host {h}: {e}")))?;
        }
        let share = Share { hosts };
        pool.set_share(*uuid, Some(share.clone())).await?;
        self.export_replica(&pool, *uuid, &share)?;
        self.replica(uuid)
    }

    pub async fn unshare_replica(&self, uuid: &Uuid) -> Result<ReplicaInfo, EngineError> {
        let _sharing = self.inner.sharing.claim(*uuid).await;
        let (pool, _) = self.find_replica(uuid)?;
        pool.set_share(*uuid, None).await?;
        self.unexport_replica(uuid);
        self.replica(uuid)
    }

    /// Grows a replica online (never shrinks); a shared replica's hosts are told of its new size.
    pub async fn resize_replica(&self, uuid: &Uuid, size: u64) -> Result<ReplicaInfo, EngineError> {
        let (pool, _) = self.find_replica(uuid)?;
        pool.resize_replica(*uuid, size).await?;
        if let Some(sub) = self.target().subsystem(Nqn::replica(uuid).as_str()) {
            sub.notify_namespace_changed(1);
        }
        self.replica(uuid)
    }

    /// Fails if a subsystem under replica `uuid`'s name serves anything but that replica's volume: one made through
    /// the generic calls (CreateSubsystem, AddNamespace), whose namespace a nexus would read and write for the
    /// replica's had the export taken it for its own.
    fn no_stranger_under(&self, uuid: &Uuid) -> Result<(), EngineError> {
        let nqn = Nqn::replica(uuid);
        let Some(sub) = self.target().subsystem(nqn.as_str()) else {
            return Ok(());
        };
        let ours = sub.namespace(1).is_some_and(|ns| {
            self.inner
                .replica_namespaces
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(uuid)
                .and_then(std::sync::Weak::upgrade)
                .is_some_and(|held| Arc::ptr_eq(&held, &ns))
        });
        if ours {
            return Ok(());
        }
        Err(EngineError::FailedPrecondition(format!(
            "subsystem {nqn} exists and does not serve replica {uuid} (made through the generic subsystem calls?): \
             delete it first"
        )))
    }

    /// Exports a replica as `share` says, or changes an export's hosts to them (any host when there are none).
    fn export_replica(&self, pool: &Pool, uuid: Uuid, share: &Share) -> Result<(), EngineError> {
        let nqn = Nqn::replica(&uuid);
        let _exporting = self.exporting();
        self.no_stranger_under(&uuid)?;
        if self.target().subsystem(nqn.as_str()).is_some() {
            self.target()
                .set_hosts(nqn.as_str(), share.hosts.is_empty(), &share.hosts)?;
            return Ok(());
        }
        let device = pool.open_volume(&uuid)?;
        let held = self
            .inner
            .replica_namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&uuid)
            .and_then(std::sync::Weak::upgrade)
            // The same open volume: not one destroyed and made again since with this UUID.
            .filter(|ns| std::ptr::addr_eq(Arc::as_ptr(&ns.device), Arc::as_ptr(&device)));
        if let Some(ns) = held {
            let sub = self
                .target()
                .create_subsystem(replica_subsystem(nqn.clone(), share))?;
            if let Err(e) = sub.attach_namespace(ns) {
                let _ = self.target().delete_subsystem(nqn.as_str());
                return Err(e.into());
            }
            return Ok(());
        }
        let saved = pool
            .volume_meta(&uuid)
            .and_then(|v| v.reservation)
            .map(serde_json::from_value::<ReservationState>)
            .transpose()
            .map_err(|e| PoolError::CorruptMetadata(format!("reservation of {uuid}: {e}")))?
            .unwrap_or_default();
        let store = Arc::new(PoolReservations {
            pool: pool.clone(),
            uuid,
        });
        let sub = self
            .target()
            .create_subsystem(replica_subsystem(nqn.clone(), share))?;
        let reservations = Reservations::new(saved, store);
        if let Err(e) = sub.add_namespace_with(1, uuid, 1, device, reservations) {
            let _ = self.target().delete_subsystem(nqn.as_str());
            return Err(e.into());
        }
        if let Some(ns) = sub.namespace(1) {
            let mut held = self
                .inner
                .replica_namespaces
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            held.retain(|_, w| w.strong_count() > 0);
            held.insert(uuid, Arc::downgrade(&ns));
        }
        Ok(())
    }

    fn unexport_replica(&self, uuid: &Uuid) {
        let nqn = Nqn::replica(uuid);
        let _exporting = self.exporting();
        if self.target().subsystem(nqn.as_str()).is_some() {
            let _ = self.target().delete_subsystem(nqn.as_str());
        }
    }

    /// The reservation state of a replica's namespace, as kept in its pool.
    pub fn reservation(&self, uuid: &Uuid) -> Result<ReservationState, EngineError> {
        let (_, meta) = self.find_replica(uuid)?;
        meta.reservation
            .map(serde_json::from_value::<ReservationState>)
            .transpose()
            .map_err(|e| PoolError::CorruptMetadata(format!("reservation of {uuid}: {e}")).into())
            .map(Option::unwrap_or_default)
    }

    /// Takes a crash-consistent snapshot of a replica. Repeating the same request is a no-op.
    pub async fn create_snapshot(
        &self,
        replica: &Uuid,
        uuid: Uuid,
    ) -> Result<SnapshotInfo, EngineError> {
        if let Some((p, v)) = self.find_volume(&uuid)
            && v.snapshot_of == Some(*replica)
        {
            return Ok(self.snapshot_info(&p, v));
        }
        if self.find_volume(&uuid).is_some() {
            return Err(PoolError::AlreadyExists {
                what: PoolObject::Volume(uuid),
                detail: format!("and is not a snapshot of {replica}"),
            }
            .into());
        }
        let (pool, _) = self.find_replica(replica)?;
        let meta = pool.snapshot(*replica, uuid).await?;
        Ok(self.snapshot_info(&pool, meta))
    }

    fn snapshot_info(&self, pool: &Pool, meta: VolumeMeta) -> SnapshotInfo {
        SnapshotInfo {
            referenced: pool.volume_allocated(&meta.uuid),
            pool: pool.name().to_string(),
            meta,
        }
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let mut out = Vec::new();
        for e in self.pools() {
            for v in e
                .pool
                .volume_headers()
                .into_iter()
                .filter(|v| v.is_snapshot())
            {
                out.push(self.snapshot_info(&e.pool, v));
            }
        }
        out
    }

    pub async fn destroy_snapshot(&self, uuid: &Uuid) -> Result<(), EngineError> {
        match self.find_volume_caught_up(uuid).await? {
            Some((pool, v)) if v.is_snapshot() => Ok(pool.destroy_volume(*uuid).await?),
            Some(_) => Err(EngineError::InvalidArgument(format!(
                "{uuid} is a replica, not a snapshot"
            ))),
            None => Err(PoolError::NotFound(PoolObject::Snapshot(*uuid)).into()),
        }
    }

    /// Creates a writable replica from a snapshot, in the snapshot's pool.
    pub async fn create_clone(
        &self,
        snapshot: &Uuid,
        uuid: Uuid,
        share: Option<Share>,
    ) -> Result<ReplicaInfo, EngineError> {
        let _sharing = self.inner.sharing.claim(uuid).await;
        let (pool, v) = self
            .find_volume(snapshot)
            .ok_or(PoolError::NotFound(PoolObject::Snapshot(*snapshot)))?;
        if !v.is_snapshot() {
            return Err(EngineError::InvalidArgument(format!(
                "{snapshot} is not a snapshot"
            )));
        }
        if let Some((p, _)) = self.find_volume(&uuid)
            && p.name() != pool.name()
        {
            return Err(PoolError::AlreadyExists {
                what: PoolObject::Volume(uuid),
                detail: format!("in pool {}", p.name()),
            }
            .into());
        }
        // The same clone asked again with other sharing: refused, as for a replica (its export would change while
        // the pool kept the first, and a restart would bring that back).
        if let Some(v) = pool.volume_meta(&uuid)
            && v.clone_of == Some(*snapshot)
            && v.share != share
        {
            return Err(PoolError::AlreadyExists {
                what: PoolObject::Replica(uuid),
                detail: format!("with other sharing ({:?})", v.share.map(|s| s.hosts)),
            }
            .into());
        }
        pool.clone_snapshot(*snapshot, uuid, share.clone()).await?;
        if let Some(s) = &share {
            self.export_replica(&pool, uuid, s)?;
        }
        self.replica(&uuid)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::EngineConfig;
    use crate::target::TargetConfig;

    /// A replica that a nexus on its own node uses (a local child) is unshared and shared again, and a newer
    /// nexus takes its reservation through the new export: the local nexus is fenced by it. Before, the new
    /// export had reservation rules of its own, and the old nexus kept writing under the first.
    #[tokio::test]
    async fn a_replica_exported_again_fences_its_local_nexus_through_the_new_export() {
        use crate::engine::local::LocalChild;
        use crate::engine::nexus::{NexusOptions, ReservationKeys};
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_with_pool(dir.path()).await;
        let r = Uuid::new_v4();
        engine
            .create_replica("p", r, 4 << 20, Some(Share { hosts: vec![] }))
            .await
            .unwrap();
        let nqn = Nqn::replica(&r);
        let options = NexusOptions {
            reservation: Some(ReservationKeys { key: 1, preempt: 0 }),
            ..Default::default()
        };
        let nexus = engine
            .create_nexus(Uuid::new_v4(), &[format!("local:///{nqn}?nsid=1")], options)
            .await
            .unwrap();
        let block = |b: u8| bytes::Bytes::from(vec![b; 4096]);
        nexus.write(0, block(1)).await.unwrap();
        engine.unshare_replica(&r).await.unwrap();
        engine.share_replica(&r, vec![]).await.unwrap();
        // A newer nexus, of another host, preempts through the new export.
        let ns = engine
            .target()
            .subsystem(nqn.as_str())
            .unwrap()
            .namespace(1)
            .unwrap();
        let newer = LocalChild::new(ns, Uuid::new_v4());
        crate::engine::nexus::reserve(&newer, ReservationKeys { key: 2, preempt: 1 })
            .await
            .unwrap();
        assert!(
            nexus.write(0, block(2)).await.is_err(),
            "a fenced nexus wrote"
        );
        let (pool, _) = engine.find_replica(&r).unwrap();
        let data = pool.open_volume(&r).unwrap().read(0, 4096).await.unwrap();
        assert_eq!(data, block(1));
    }

    /// An engine with pool "p" on a 64 MiB file in `dir`.
    async fn engine_with_pool(dir: &Path) -> Engine {
        let engine = Engine::new(EngineConfig {
            node_name: "node-a".into(),
            target: TargetConfig::default(),
        });
        add_pool(&engine, dir, "p").await;
        engine
    }

    /// A pool operation stuck on its disk (a probe of a disk that hangs: claimed here as such an operation claims
    /// it) holds up the operations on that disk and no other: another disk's pool is made, imported and
    /// destroyed meanwhile. Before, one lock served every disk of the engine.
    #[tokio::test]
    async fn a_pool_operation_stuck_on_its_disk_holds_up_no_other_disk() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_with_pool(dir.path()).await;
        let stuck = blank_disk(dir.path(), "stuck");
        let held = engine.claim_disk(&stuck).await;
        let waiting = {
            let (engine, stuck) = (engine.clone(), stuck.clone());
            tokio::spawn(async move { engine.create_pool("s", &stuck, None, 1 << 20, 512).await })
        };
        let others = async {
            add_pool(&engine, dir.path(), "q").await;
            engine.destroy_pool("q").await.unwrap();
            let p = engine.pool("p").unwrap().disk;
            engine.import_pool(&p, false).await.unwrap();
        };
        tokio::time::timeout(Duration::from_secs(10), others)
            .await
            .expect("another disk's pool operations waited for the stuck one");
        assert!(!waiting.is_finished(), "the stuck disk was taken twice");
        drop(held);
        waiting.await.unwrap().unwrap();
        assert!(engine.pool("s").is_ok());
    }

    /// A destroy asked while the pool's create is still under way waits for it and destroys the pool. Before, it
    /// answered NotFound and the pool appeared after the answer.
    #[tokio::test]
    async fn a_destroy_during_its_pools_create_destroys_the_pool_once_made() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_with_pool(dir.path()).await;
        let disk = blank_disk(dir.path(), "s");
        // The create has its disk and waits for the name, as one busy formatting would hold it.
        let held = engine.claim_pool_name("s").await;
        let create = {
            let (engine, disk) = (engine.clone(), disk.clone());
            tokio::spawn(async move { engine.create_pool("s", &disk, None, 1 << 20, 512).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let destroy = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.destroy_pool("s").await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !destroy.is_finished(),
            "the destroy answered before the create it met ended: {:?}",
            destroy.await.unwrap()
        );
        drop(held);
        create.await.unwrap().unwrap();
        destroy.await.unwrap().unwrap();
        assert!(engine.pool("s").is_err(), "the pool was destroyed");
        // A destroy of a pool nobody is making is NotFound, at once.
        let e = engine.destroy_pool("none").await.unwrap_err();
        assert!(
            matches!(e, EngineError::Pool(PoolError::NotFound(_))),
            "{e:?}"
        );
    }

    /// A new 64 MiB sparse file `name` in `dir`: its path.
    fn blank_disk(dir: &Path, name: &str) -> String {
        let disk = dir.join(name);
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        disk.to_str().unwrap().to_string()
    }

    /// Pool `name` on a new 64 MiB sparse file in `dir`.
    async fn add_pool(engine: &Engine, dir: &Path, name: &str) {
        let disk = blank_disk(dir, name);
        engine
            .create_pool(name, &disk, None, 1 << 20, 512)
            .await
            .unwrap();
    }

    /// The same CreatePool again with cluster size 0 ("whatever the pool has", what the cluster agent sends) is the
    /// pool made before with 1 MiB clusters, not another one in the way (before: ALREADY_EXISTS, and the agent's
    /// retry after a timeout failed for good). Another cluster size named is refused.
    #[tokio::test]
    async fn create_pool_again_without_a_cluster_size_is_the_same_pool() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_with_pool(dir.path()).await;
        add_pool(&engine, dir.path(), "q").await;
        let disk = dir.path().join("q").to_str().unwrap().to_string();
        engine.create_pool("q", &disk, None, 0, 0).await.unwrap();
        let e = engine
            .create_pool("q", &disk, None, 4 << 20, 0)
            .await
            .err()
            .expect("another cluster size named is refused");
        assert!(
            matches!(e, EngineError::Pool(PoolError::AlreadyExists { .. })),
            "{e:?}"
        );
    }

    /// Two pool files on one file system are not both offered its free space: the room the engine tells for each
    /// leaves out what the other's replicas may still take. Before, each told the whole free space, and the
    /// cluster agent could place replicas on both that together needed twice what the file system had.
    #[tokio::test]
    async fn pools_on_one_file_system_do_not_both_count_its_free_space() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_with_pool(dir.path()).await;
        add_pool(&engine, dir.path(), "q").await;
        engine
            .create_replica("p", Uuid::new_v4(), 48 * MIB, None)
            .await
            .unwrap();
        let stats = |name: &str| engine.pool_stats(name).unwrap();
        let (p, q) = (stats("p"), stats("q"));
        assert!(p.disk_room_of.is_some() && p.disk_room_of == q.disk_room_of);
        assert_eq!(p.committed, 48 * MIB);
        // p's replica may still take 48 MiB of the file system, q's none; the free space may change by a few MiB
        // between the two looks (other tests write to it).
        let (p_room, q_room) = (p.disk_room.unwrap(), q.disk_room.unwrap());
        assert!(
            p_room > q_room + 40 * MIB,
            "p {p_room}, q {q_room}: q's room counts what p's replica may still take"
        );
    }

    /// A replica written through and then snapshotted may take its whole size again (its first overwrites copy
    /// the clusters the snapshot shares): the room its pool offers new replicas leaves that out. Before, the agent
    /// counted the replica's allocated clusters as all it would need, and placed new replicas in its free clusters.
    #[tokio::test]
    async fn a_snapshot_keeps_room_for_the_copies_its_replica_may_still_make() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_with_pool(dir.path()).await;
        let r = Uuid::new_v4();
        engine.create_replica("p", r, 32 * MIB, None).await.unwrap();
        let vol = engine.pool("p").unwrap().pool.open_volume(&r).unwrap();
        vol.write(0, bytes::Bytes::from(vec![7u8; (32 * MIB) as usize]))
            .await
            .unwrap();
        let stats = || engine.pool_stats("p").unwrap();
        let before = stats();
        // The pool's free clusters (about 28 MiB of its 64) bound it here, not the file system.
        assert!(before.replica_room >= 20 * MIB, "{before:?}");
        engine.create_snapshot(&r, Uuid::new_v4()).await.unwrap();
        let after = stats();
        assert_eq!(after.may_take, before.replica_room, "{after:?}");
        assert_eq!(
            after.replica_room, 0,
            "the replica's overwrites may take every free cluster: {after:?}"
        );
    }

    /// A DestroyReplica after a CreateReplica whose client hung up while the create waited for the journal destroys
    /// the replica. Before, the engine looked for it, found nothing yet and answered NotFound, which the cluster
    /// agent takes as destroyed (it drops its garbage record); the create then applied: a replica nobody knew of,
    /// keeping its space for ever.
    #[tokio::test]
    async fn a_destroy_after_a_create_whose_client_hung_up_destroys_the_replica() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_with_pool(dir.path()).await;
        let pool = engine.pool("p").unwrap().pool;
        let uuid = Uuid::new_v4();
        let held = pool.hold_journal().await;
        let create = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.create_replica("p", uuid, 4 << 20, None).await })
        };
        for _ in 0..500 {
            if pool.queued_commits() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(pool.queued_commits(), 1, "the create waits for the journal");
        create.abort();
        assert!(create.await.unwrap_err().is_cancelled());
        let destroy = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.destroy_replica(&uuid).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        destroy.await.unwrap().unwrap();
        pool.caught_up().await;
        assert!(
            pool.volume_meta(&uuid).is_none(),
            "the replica was created after its destroy"
        );
    }

    /// Sharing an exported replica with named hosts ends the access of any other host, and sharing it with none
    /// opens it to any; hosts on both lists keep their connections. Before, an export made for any host stayed
    /// open to any host whatever the new list said (and one made for named hosts, shared with none, let no host in).
    #[tokio::test]
    async fn resharing_a_replica_changes_whether_any_host_may_connect() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_with_pool(dir.path()).await;
        let uuid = Uuid::new_v4();
        let (a, other) = (
            "nqn.2026-11.io.keelson:node-a".to_string(),
            "nqn.2026-11.io.keelson:node-other",
        );
        engine
            .create_replica("p", uuid, 4 << 20, Some(Share { hosts: vec![] }))
            .await
            .unwrap();
        let sub = || {
            engine
                .target()
                .subsystem(Nqn::replica(&uuid).as_str())
                .unwrap()
        };
        assert!(sub().host_allowed(other));
        engine.share_replica(&uuid, vec![a.clone()]).await.unwrap();
        assert!(sub().host_allowed(&a));
        assert!(!sub().host_allowed(other), "still open to any host");
        engine.share_replica(&uuid, vec![]).await.unwrap();
        assert!(sub().host_allowed(other) && sub().host_allowed(&a));
    }

    /// A pool's disk cannot be exported as a namespace beside it (hosts would write over its label and data), nor
    /// one file twice; before, a plain open of the file succeeded.
    #[tokio::test]
    async fn a_pools_disk_or_an_exported_file_is_not_exported_again() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_with_pool(dir.path()).await;
        let export = |nqn: &str, file: std::path::PathBuf| {
            engine.export(&crate::config::ExportSpec {
                nqn: nqn.into(),
                file: Some(file),
                ..Default::default()
            })
        };
        let e = export("nqn.2026-11.io.keelson:over-the-pool", dir.path().join("p")).unwrap_err();
        assert!(
            matches!(e, EngineError::Backend(BlockError::InUse(_))),
            "{e:?}"
        );
        let other = dir.path().join("other.img");
        std::fs::File::create(&other)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        export("nqn.2026-11.io.keelson:first", other.clone()).unwrap();
        assert!(export("nqn.2026-11.io.keelson:second", other).is_err());
    }

    /// A clone asked for again with other sharing is ALREADY_EXISTS, as a replica is; the same request again is
    /// answered with it. Before, the second changed the export but not what the pool kept.
    #[tokio::test]
    async fn a_clone_asked_again_with_other_sharing_already_exists() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_with_pool(dir.path()).await;
        let (r, snap, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        engine.create_replica("p", r, 4 << 20, None).await.unwrap();
        engine.create_snapshot(&r, snap).await.unwrap();
        engine.create_clone(&snap, c, None).await.unwrap();
        engine.create_clone(&snap, c, None).await.unwrap();
        let shared = Some(Share {
            hosts: vec!["nqn.2026-11.io.keelson:host-h".into()],
        });
        let e = engine.create_clone(&snap, c, shared).await.unwrap_err();
        assert!(
            matches!(e, EngineError::Pool(PoolError::AlreadyExists { .. })),
            "{e:?}"
        );
        assert!(
            engine
                .target()
                .subsystem(Nqn::replica(&c).as_str())
                .is_none()
        );
    }
}
