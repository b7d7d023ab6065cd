//! Pools: the storage a node offers, carved into thin replicas, their snapshots and clones.
//!
//! - `label`: the first 4 KiB of the device (identity and layout, checksummed).
//! - `meta`: the metadata as a value (volumes, cluster maps, records, soundness checks).
//! - `journal`: how that metadata is kept on the device (double-buffered checkpoints and a journal).
//! - `commit`: group commit (changes made at the same time share one journal write and flush).
//! - `stock`: free clusters zeroed ahead of allocations, so that most first writes need no flush of their own.
//! - `volume`: a replica or snapshot as a [`BlockDevice`] (thin allocation, copy-on-write).
//!
//! A pool has one owner at a time: every import (and the creation) claims it for a node by rewriting the label
//! with that node's name and a new incarnation number. An import by another node than the label's owner is
//! refused unless forced (a disk moved between machines); the displaced owner, if still running, stops at its
//! next metadata commit (`journal`) and closes its volumes. Keeping a second process on the same machine from
//! opening the disk at all is the opener's part ([`crate::block::file::FileDevice::open_exclusive`]).
//!
//! A pool sits on any [`BlockDevice`]: a file or block device in production, memory in tests. Every metadata change
//! is journaled, durable before the call that made it returns (changes made at once share a transaction).
//! Cluster-freeing changes (destroy, unmap) wait for in-flight I/O of the pool to drain (the `gate`), so a freed
//! cluster is never still being read or written; a snapshot waits only for its own volume's I/O
//! (`PoolVolume::quiesce`), so it sees every acknowledged write while other volumes' I/O goes on. Such a change
//! holds its lock until its records are applied, in a task of its own that a caller who goes away does not cut
//! short (`PoolInner::commit_holding`).
//!
//! Fail-stop: once a metadata write (journal write, flush or checkpoint) fails, the pool is faulted (`fuse`): every
//! later write, write-zeroes, deallocate, flush and metadata change of its volumes fails with an I/O error, reads
//! go on, and [`Pool::fault`] says why (the engine API reports it with the pool), until the pool is imported again.
//! A transaction that failed may still become durable, so nothing written after it may count on it not being.

mod ahead;
mod commit;
mod fuse;
mod journal;
pub mod label;
pub mod meta;
mod release;
pub mod room;
mod stock;
mod volume;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_abandoned;
#[cfg(test)]
mod tests_cow;
#[cfg(test)]
mod tests_release;
#[cfg(test)]
mod tests_stock;
#[cfg(test)]
mod tests_thin;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::block::BlockDevice;
use commit::GroupCommit;
use journal::Journal;
use label::{LABEL_LEN, Label};
use meta::{PoolMeta, Record, Share, VolumeMeta};
pub use volume::PoolVolume;

/// How long freeing or sharing clusters waits for the disk to end the operations handed to it before.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a reservation short of free clusters waits for other writes' reservations to be used or given back
/// before it fails its write for space (see [`PoolVolume`]'s `reserve`).
const RESERVE_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, thiserror::Error)]
pub enum PoolError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the device has no pool label")]
    NoLabel,
    #[error("the pool label is corrupt: {0}")]
    CorruptLabel(String),
    #[error("the pool metadata is corrupt: {0}")]
    CorruptMetadata(String),
    #[error("the device holds data that is not a Keelson pool; refusing to overwrite it")]
    ForeignData,
    #[error("no space: {0}")]
    NoSpace(String),
    #[error("pool metadata is full: {0}")]
    MetadataFull(String),
    #[error("{0} not found")]
    NotFound(PoolObject),
    #[error("{what} already exists: {detail}")]
    AlreadyExists { what: PoolObject, detail: String },
    #[error("pool {pool} still has {volumes} replicas or snapshots")]
    NotEmpty { pool: String, volumes: usize },
    #[error("pool {pool} is being destroyed: no replica, snapshot or clone is created in it")]
    Destroying { pool: String },
    #[error(
        "pool {pool} belongs to node {owner:?} (incarnation {incarnation}); import it on that node, or force the \
         import if that node is gone or the disk has moved"
    )]
    OwnedByAnotherNode {
        pool: String,
        owner: String,
        incarnation: u64,
    },
    #[error("pool {pool} was imported elsewhere: {now}; this io-engine no longer writes to it")]
    OwnershipLost { pool: String, now: String },
    #[error("pool device i/o: {0}")]
    Io(String),
    #[error(
        "pool {pool} is faulted (a metadata write failed: {why}); it takes no writes until it is imported again"
    )]
    Faulted { pool: String, why: String },
}

/// What a not-found or already-exists error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolObject {
    Pool(String),
    Disk(String),
    /// A replica or a snapshot, when the call does not say which.
    Volume(Uuid),
    Replica(Uuid),
    Snapshot(Uuid),
}

impl std::fmt::Display for PoolObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolObject::Pool(n) => write!(f, "pool {n}"),
            PoolObject::Disk(d) => write!(f, "disk {d}"),
            PoolObject::Volume(u) => write!(f, "volume {u}"),
            PoolObject::Replica(u) => write!(f, "replica {u}"),
            PoolObject::Snapshot(u) => write!(f, "snapshot {u}"),
        }
    }
}

/// Who imports a pool: the importing node, and whether it may take the pool from another node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub node: String,
    /// Import even when the label names another node as owner (that node is gone, or the disk has moved).
    pub force: bool,
}

impl Claim {
    pub fn new(node: &str) -> Claim {
        Claim {
            node: node.to_string(),
            force: false,
        }
    }

    pub fn forced(node: &str) -> Claim {
        Claim {
            node: node.to_string(),
            force: true,
        }
    }
}

/// Capacity of a pool, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes available for data (the device less metadata).
    pub capacity: u64,
    /// Bytes in clusters some volume uses.
    pub allocated: u64,
    /// Sum of the sizes of the pool's replicas (what they could grow to).
    pub committed: u64,
    /// Writes failed because no cluster was free, or the disk had no room for a new one, since the pool was
    /// opened.
    pub no_space_errors: u64,
    /// The disk had no room for the last new cluster asked of it (the file system under a file pool is full):
    /// whatever the pool's own free clusters, it takes nothing new until it has room again.
    pub disk_full: bool,
    /// I/O errors the disk returned since the pool was opened (at least one once the pool is faulted): the disk is
    /// failing, put nothing new here.
    pub disk_errors: u64,
    /// Bytes the pool can still fill beyond `allocated` with the storage under its disk: a pool file's file system's
    /// free space, and the file's own space not in use (preallocated, stocked or not given back yet); `None` for a
    /// disk whose space is all its own (a block device). Pools whose files share a file system each count its
    /// whole free space here; [`room::share_disk_room`] shares it out among them.
    pub disk_room: Option<u64>,
    /// The file system `disk_room` draws on ([`BlockDevice::room_of`]).
    pub disk_room_of: Option<u64>,
    /// Of `disk_room`, what is the pool file's own (space it holds and does not use), which no other pool can take.
    pub own_room: u64,
    /// Bytes of new clusters the pool's replicas may still take: each one's clusters that are not its own (unmapped,
    /// or shared with a snapshot or clone: copied on its first write), at most the pool's free clusters. Without
    /// snapshots or clones, their sizes less the pool's allocated bytes.
    pub may_take: u64,
    /// Bytes of new replicas the pool can still take: its free clusters and `disk_room`, each less `may_take`
    /// (set by [`room::share_disk_room`]; until then, from the free clusters alone).
    pub replica_room: u64,
    /// Metadata changes applied since the pool was imported, counted with the state these figures are of: with the
    /// label's incarnation, [`Pool::generation`].
    pub applied: u64,
}

pub(crate) struct PoolInner {
    dev: Arc<dyn BlockDevice>,
    /// The device under the fuse, counting its disk errors: the journal and label I/O go here ([`Disk`]).
    disk: Arc<crate::block::error_count::ErrorCount>,
    /// Under both: where a disk fault is injected (`InjectFault` on the pool), for data and metadata alike.
    fault: Arc<crate::block::fault::FaultDevice>,
    label: Label,
    meta: RwLock<PoolMeta>,
    journal: GroupCommit,
    /// Clusters picked for an allocation whose mapping is not committed yet.
    reserved: Mutex<BTreeSet<u32>>,
    /// Told when clusters leave `reserved` (mapped by a commit, or given back).
    unreserved: tokio::sync::Notify,
    cursor: AtomicU64,
    /// Counts the commits that took a volume's mapping off a cluster (a copy-on-write's, an unmap, a destroy),
    /// changed under the metadata's write lock: after one, the old cluster may be written for another volume, so a
    /// read that looked its cluster up before and sees the count moved when its data is back looks again (see
    /// [`volume::PoolVolume`]'s `read_piece`).
    moved: AtomicU64,
    /// Commits applied so far: what [`Pool::stats`]'s walk of the cluster maps was last done for, with its result
    /// (`may_take`, walked only while snapshots or clones share clusters).
    applied: AtomicU64,
    may_take_walked: Mutex<Option<(u64, u64)>>,
    /// Reserved clusters whose zeroing is durable, for allocations to take (`stock`).
    stock: Mutex<Vec<u32>>,
    /// An allocation is filling the stock.
    stocking: AtomicBool,
    /// Told when a filling of the stock ends.
    stock_ready: tokio::sync::Notify,
    /// Set when the volumes are closed (the pool is destroyed, shut down or taken by another import): a filling of
    /// the stock that has not started zeroing never does.
    closed: AtomicBool,
    /// Between `dev` and the disk: blown when a metadata write fails, then no write or flush reaches the disk.
    fuse: Arc<fuse::Fuse>,
    /// I/O holds it shared; snapshot, destroy and unmap hold it exclusively.
    gate: Arc<tokio::sync::RwLock<()>>,
    volumes: Mutex<BTreeMap<Uuid, Arc<PoolVolume>>>,
    /// Set once a commit found the pool claimed by another import; every volume is closed then.
    lost: AtomicBool,
    /// Set while a destroy makes sure the pool is empty, and for good once it is: no commit that creates a volume
    /// is admitted, so none is acknowledged and then lost with the label.
    destroying: AtomicBool,
    no_space: AtomicU64,
    last_no_space_log: Mutex<Option<Instant>>,
    /// The disk had no room for a new cluster it was asked for (a file system full under a file pool); cleared
    /// once the storage under it has room for a cluster again ([`PoolInner::disk_room`]).
    disk_full: AtomicBool,
    /// Freed clusters whose space goes back to the file system under the pool (`release`).
    releases: release::Releases,
    /// The pool file had all its space when the pool was made (`fallocate`; [`Label::keeps_space`]): it keeps it,
    /// nothing is given back (`release`).
    keeps_space: bool,
}

/// Opens a pool a destroy closed again when dropped before the destroy reached the label.
struct OpenAgainUnlessDestroyed<'a> {
    closed: &'a AtomicBool,
    destroyed: bool,
}

impl Drop for OpenAgainUnlessDestroyed<'_> {
    fn drop(&mut self) {
        if !self.destroyed {
            self.closed.store(false, Ordering::Release);
        }
    }
}

/// Refuses creates in a pool ([`PoolInner::destroying`]) while a destroy makes sure it is empty: until dropped, or
/// for good once the destroy touches the label.
struct RefusingCreates<'a>(Option<&'a AtomicBool>);

impl<'a> RefusingCreates<'a> {
    fn set(flag: &'a AtomicBool) -> RefusingCreates<'a> {
        flag.store(true, Ordering::SeqCst);
        RefusingCreates(Some(flag))
    }

    fn for_good(mut self) {
        self.0 = None;
    }
}

impl Drop for RefusingCreates<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.store(false, Ordering::SeqCst);
        }
    }
}

/// How long destroying the pool waits for commits asked for before it ([`PoolInner::caught_up`]).
const CAUGHT_UP_WAIT: Duration = Duration::from_secs(5);

impl PoolInner {
    fn meta(&self) -> RwLockReadGuard<'_, PoolMeta> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes records durable, then applies them; records that no longer apply to the metadata (a volume destroyed
    /// or created meanwhile) are refused before they are written. When another import has taken the pool, closes
    /// every volume; when a metadata write failed, faults the pool (see `fuse`).
    async fn commit(self: &Arc<Self>, records: Vec<Record>) -> Result<(), PoolError> {
        commit::commit(self, records).await
    }

    /// Waits until every commit queued or being written before now is applied (whatever its result): what the
    /// metadata says then includes every change asked for before. A change that finds nothing to do (a volume to
    /// destroy that is not there, a share it has already) looks again after this, as one still on its way (a
    /// create whose caller went away, a share asked just before) would otherwise be missed and apply after it. A
    /// change that has something to do needs no wait: its commit queues behind those.
    async fn caught_up(self: &Arc<Self>) {
        let _ = self.commit(Vec::new()).await;
    }

    /// Commits `batches` in order, in a task of its own that holds `held` (the locks its caller took so that the
    /// change is safe: the gate, a volume's quiesce lock) until they are applied, and runs `then` once all are,
    /// still holding them. A caller that goes away meanwhile (a gRPC client that hung up, a command's future
    /// dropped) thus neither lets I/O in before its records are applied nor leaves them to be applied later,
    /// outside its locks, by someone else's commit: freeing clusters under writes in flight, or sharing them with
    /// a snapshot under writes that then miss their copy-on-write. The caller takes the locks itself, so that
    /// giving up while it waits for them still works. `then`'s answer (what the caller reports, read under the
    /// locks) comes back with the result.
    async fn commit_holding<H: Send + 'static, T: Send + 'static>(
        self: &Arc<Self>,
        held: H,
        batches: Vec<Vec<Record>>,
        then: impl FnOnce(&PoolInner) -> T + Send + 'static,
    ) -> Result<T, PoolError> {
        let inner = self.clone();
        let task = tokio::spawn(async move {
            for records in batches {
                inner.commit(records).await?;
            }
            let answer = then(&inner);
            drop(held);
            Ok(answer)
        });
        task.await
            .unwrap_or_else(|e| Err(PoolError::Io(format!("a commit ended early: {e}"))))
    }

    /// Why the pool takes no writes (a metadata write failed), if it doesn't.
    fn fault(&self) -> Option<&str> {
        self.fuse.blown()
    }

    fn faulted(&self, why: &str) -> PoolError {
        PoolError::Faulted {
            pool: self.label.name.clone(),
            why: why.to_string(),
        }
    }

    fn close_volumes(&self) {
        self.closed.store(true, Ordering::Release);
        for v in self
            .volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            v.closed.store(true, Ordering::Release);
        }
        // Writes waiting for reservations find the volumes closed now, not at their wait's end.
        self.unreserved.notify_waiters();
    }

    /// While the disk is full: whether the storage under it has room for a cluster again (asked each time the
    /// pool's stats are read: the engine API, the cluster agent's heartbeat, a metrics scrape).
    /// The storage's room under the disk ([`BlockDevice::room`]), read once for the stats.
    fn recheck_disk_room(&self) -> Option<u64> {
        let room = self.dev.room();
        if !self.disk_full.load(Ordering::Relaxed) {
            return room;
        }
        let stocked = !self
            .stock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if stocked || room.is_some_and(|r| r >= u64::from(self.label.cluster_size)) {
            self.disk_room(true);
        }
        room
    }

    /// Whether the disk had room for new clusters (see [`PoolStats::disk_full`]).
    fn disk_room(&self, room: bool) {
        let was_full = self.disk_full.swap(!room, Ordering::Relaxed);
        if room && was_full {
            tracing::info!(pool = %self.label.name, "the disk has room for new clusters again");
        } else if !room && !was_full {
            tracing::warn!(pool = %self.label.name, "the disk has no room for new clusters (is the file system under it full?)");
        }
    }

    /// A write failed because the disk had no room for its new cluster: counted, logged, and the disk is full.
    fn disk_full_for_write(&self) {
        self.disk_room(false);
        self.no_space(
            "the disk has no room for a new cluster (is the file system under it full?): writes that need one fail \
             with Capacity Exceeded",
        );
    }

    /// Counts a write failed for want of space, and says why (at most every 10 s).
    fn no_space(&self, why: &str) {
        self.no_space.fetch_add(1, Ordering::Relaxed);
        let mut last = self
            .last_no_space_log
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(
                pool = %self.label.name,
                failed_writes = self.no_space.load(Ordering::Relaxed),
                "{why}"
            );
        }
    }

    /// The disk's space under `clusters` (see [`BlockDevice::preallocate`]); NoSpace, counted, when it is not
    /// there.
    async fn preallocate(&self, clusters: &[u32]) -> Result<(), PoolError> {
        let cs = u64::from(self.label.cluster_size);
        // Runs of adjacent clusters: one call each.
        for (c, n) in release::runs(clusters) {
            match self
                .dev
                .preallocate(self.label.cluster_offset(c), n * cs)
                .await
            {
                Ok(()) => {}
                Err(crate::block::BlockError::NoSpace) => {
                    self.disk_full_for_write();
                    return Err(PoolError::NoSpace(format!(
                        "the disk under pool {} has no room for {n} new clusters from cluster {c}",
                        self.label.name
                    )));
                }
                Err(e) => return Err(PoolError::Io(format!("reserving a cluster's space: {e}"))),
            }
        }
        Ok(())
    }

    async fn reserve_cluster(&self) -> Result<u32, PoolError> {
        Ok(self.reserve_clusters(1).await?[0])
    }

    /// Picks `n` free clusters for allocations, all or none: a write that needs several new clusters either gets
    /// them all before it writes anything, or fails with nothing changed. Short of free clusters, the stock is
    /// given back first.
    async fn reserve_clusters(&self, n: usize) -> Result<Vec<u32>, PoolError> {
        match self.try_reserve(n).await {
            Some(picked) => Ok(picked),
            None => Err(self.out_of_space(n)),
        }
    }

    /// `n` free clusters, all or none, the stock given back first if that is what it takes.
    async fn try_reserve(&self, n: usize) -> Option<Vec<u32>> {
        if let Some(picked) = self.pick_all(n) {
            return Some(picked);
        }
        if self.drain_stock().await {
            return self.pick_all(n);
        }
        None
    }

    /// A write that needs `n` new clusters fails for space: counted, logged, and its error.
    fn out_of_space(&self, n: usize) -> PoolError {
        self.no_space("pool is full: writes that need a new cluster fail with Capacity Exceeded");
        PoolError::NoSpace(format!(
            "pool {} has {} free clusters ({} more reserved by writes under way), the write needs {n}",
            self.label.name,
            self.unreserved_free(),
            self.reserved_by_writes()
        ))
    }

    /// Reserves `n` free clusters from the cursor on, or none if fewer are free: a reservation short of clusters
    /// never holds some while it waits for more (two such would keep each other short).
    fn pick_all(&self, n: usize) -> Option<Vec<u32>> {
        Some(self.pick(n, true)).filter(|p| p.len() == n)
    }

    /// Clusters reserved for writes under way (and fillings of the stock): those that may yet be given back.
    fn reserved_by_writes(&self) -> usize {
        // Both at one moment (an allocation taking a stocked cluster and giving its spare back between two separate
        // reads made it look as if nobody held any). `stock` is never held while `reserved` is taken.
        let reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let stocked = self.stock.lock().unwrap_or_else(|e| e.into_inner()).len();
        reserved.len().saturating_sub(stocked)
    }

    /// Reserves up to `n` free clusters, from the cursor on.
    fn pick_free(&self, n: usize) -> Vec<u32> {
        self.pick(n, false)
    }

    /// Reserves `n` free clusters from the cursor on; fewer if fewer are free, unless `all` (then none).
    fn pick(&self, n: usize, all: bool) -> Vec<u32> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let mut from = self.cursor.load(Ordering::Relaxed);
        let mut picked = Vec::with_capacity(n);
        let meta = self.meta();
        while picked.len() < n {
            let Some(c) = meta.find_free(from, &reserved) else {
                break;
            };
            reserved.insert(c);
            picked.push(c);
            from = u64::from(c) + 1;
        }
        if all && picked.len() < n {
            for c in picked.drain(..) {
                reserved.remove(&c);
            }
            return picked;
        }
        self.cursor.store(from, Ordering::Relaxed);
        picked
    }

    /// Clusters free and not reserved.
    fn unreserved_free(&self) -> u64 {
        let reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let meta = self.meta();
        meta.data_clusters()
            .saturating_sub(meta.used_clusters())
            .saturating_sub(reserved.len() as u64)
    }

    /// Waits for the disk to end every operation handed to it before (a caller may have stopped waiting for a
    /// write that the disk still has): due before clusters are freed or shared, so that a late write never lands
    /// in clusters that are someone else's. Bounded by [`SETTLE_WAIT`]: past it the change is refused (the disk is
    /// hanging), to be tried again.
    async fn settle(&self) -> Result<(), PoolError> {
        tokio::time::timeout(SETTLE_WAIT, self.dev.settle())
            .await
            .map_err(|_| {
                PoolError::Io(format!(
                    "the disk has not ended writes handed to it more than {} s ago; its clusters cannot be freed \
                     or shared until it does: try again",
                    SETTLE_WAIT.as_secs()
                ))
            })
    }

    /// Unreserves a cluster reserved and never written ([`Self::release_cluster`]), and moves the cursor back to
    /// it: the next allocation takes it, so a volume written in order lies in order on the disk, without holes
    /// left behind for the cursor to come back to after going round the pool.
    fn release_unused(&self, c: u32) {
        self.release_cluster(c);
        self.cursor.fetch_min(u64::from(c), Ordering::Relaxed);
    }

    fn release_cluster(&self, c: u32) {
        if self.fault().is_some() {
            // The failed commit that held it may still map it at the next import: it is never reused. (Writes
            // waiting for reservations are told all the same: they find the pool faulted.)
            self.unreserved.notify_waiters();
            return;
        }
        self.reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&c);
        self.unreserved.notify_waiters();
    }
}

impl commit::Metadata for PoolInner {
    fn group(&self) -> &GroupCommit {
        &self.journal
    }

    fn admit(&self, batch: &[&[Record]]) -> Vec<Result<(), PoolError>> {
        let m = self.meta();
        let mut pending = meta::Pending::default();
        // Read once per batch: a destroy that set it after this waits for the batch before it counts volumes.
        let destroying = self.destroying.load(Ordering::SeqCst);
        batch
            .iter()
            .map(|r| {
                if destroying && r.iter().any(Record::creates_volume) {
                    return Err(PoolError::Destroying {
                        pool: self.label.name.clone(),
                    });
                }
                let before = r
                    .iter()
                    .any(Record::describes_more)
                    .then(|| pending.clone());
                m.admit(&mut pending, r)?;
                if let Some(before) = before
                    && m.worst_case_bytes_after(&pending) + 2 * LABEL_LEN > self.label.ckpt_len
                {
                    pending = before;
                    return Err(PoolError::MetadataFull(format!(
                        "pool {} cannot describe this change beside those committed with it",
                        self.label.name
                    )));
                }
                Ok(())
            })
            .collect()
    }

    fn state(&self) -> Result<Vec<u8>, PoolError> {
        journal::encode_state(&self.meta())
    }

    /// Applies the records, then queues the clusters they freed to be given back (`release`): here, in the
    /// journal's task, so that a destroy or deallocate whose caller went away while its records waited for the
    /// journal or were written still gives them back, when they are applied.
    fn apply(self: &Arc<Self>, records: &[Record]) -> Result<(), PoolError> {
        let mut m = self.meta.write().unwrap_or_else(|e| e.into_inner());
        let mut moved = false;
        let mut unreferenced = Vec::new();
        let applied = records.iter().try_for_each(|r| {
            moved |= m.moves_off_a_cluster(r);
            unreferenced.extend(m.unreferenced_by(r));
            m.apply(r)
        });
        if moved {
            self.moved.fetch_add(1, Ordering::Release);
        }
        unreferenced.retain(|c| m.refs(*c) == 0);
        // Under the write lock: a reader that sees this state sees this count.
        self.applied.fetch_add(1, Ordering::Release);
        drop(m);
        self.release_behind(release::runs(&unreferenced));
        applied
    }

    fn halted(&self) -> Option<PoolError> {
        self.fault().map(|why| self.faulted(why))
    }

    fn failed(&self, e: &PoolError) {
        match e {
            PoolError::OwnershipLost { .. } => {
                if !self.lost.swap(true, Ordering::AcqRel) {
                    tracing::error!(pool = %self.label.name, error = %e, "pool taken over by another import: closing its volumes");
                    self.close_volumes();
                }
            }
            // Refused before anything was written.
            PoolError::MetadataFull(_) | PoolError::Faulted { .. } => {}
            _ => {
                if self.fuse.blow(e.to_string()) {
                    tracing::error!(pool = %self.label.name, error = %e, "a pool metadata write failed: the pool takes no writes until it is imported again");
                    // Writes waiting for reservations find it faulted now.
                    self.unreserved.notify_waiters();
                }
            }
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the first block of a device says.
#[derive(Debug)]
pub enum Probe {
    /// All zeroes: free to format.
    Blank,
    Pool(Label),
}

/// A pool's identity and parameters, as asked for at creation.
#[derive(Clone, Debug)]
pub struct PoolSpec {
    pub name: String,
    pub uuid: Uuid,
    pub cluster_size: u32,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

/// The layers over a pool's device that all its I/O goes through, the label's and the journal's too, as a failing
/// disk fails them all: where `InjectFault` fails or delays it, and over that the count of its errors.
struct Disk {
    fault: Arc<crate::block::fault::FaultDevice>,
    counted: Arc<crate::block::error_count::ErrorCount>,
    /// What the journal and the volumes write through: one fuse, so that their flushes are one sequence.
    fuse: Arc<fuse::Fuse>,
}

impl Disk {
    fn over(dev: Arc<dyn BlockDevice>) -> Disk {
        let fault = Arc::new(crate::block::fault::FaultDevice::new(dev));
        let counted = Arc::new(crate::block::error_count::ErrorCount::new(fault.clone()));
        let fuse = Arc::new(fuse::Fuse::new(counted.clone()));
        Disk {
            fault,
            counted,
            fuse,
        }
    }

    fn counted(&self) -> Arc<dyn BlockDevice> {
        self.counted.clone()
    }

    fn fused(&self) -> Arc<dyn BlockDevice> {
        self.fuse.clone()
    }
}

impl Pool {
    /// Reads the device's label block: blank, a sound label, or an error (corrupt label, foreign data).
    pub async fn probe(dev: &dyn BlockDevice) -> Result<Probe, PoolError> {
        let block = dev
            .read(0, LABEL_LEN)
            .await
            .map_err(|e| PoolError::Io(format!("reading the label: {e}")))?;
        match Label::decode(&block, dev.size_bytes()) {
            Ok(l) => Ok(Probe::Pool(l)),
            Err(PoolError::NoLabel) if block.iter().all(|b| *b == 0) => Ok(Probe::Blank),
            Err(PoolError::NoLabel) => Err(PoolError::ForeignData),
            Err(e) => Err(e),
        }
    }

    /// Formats a blank device as a new, empty pool owned by `claim.node`. The label is written last: a crash before
    /// it leaves a device that still probes blank.
    pub async fn create(
        dev: Arc<dyn BlockDevice>,
        spec: &PoolSpec,
        claim: &Claim,
    ) -> Result<Pool, PoolError> {
        match Self::probe(dev.as_ref()).await? {
            Probe::Blank => {}
            Probe::Pool(l) => {
                return Err(PoolError::AlreadyExists {
                    what: PoolObject::Pool(l.name.clone()),
                    detail: format!("the device holds it ({})", l.uuid),
                });
            }
        }
        let label = Label::layout(
            spec.uuid,
            &spec.name,
            dev.block_size(),
            spec.cluster_size,
            dev.size_bytes(),
        )?
        .claimed_by(&claim.node)?;
        // Given all its space up front (before the pool wrote anything): the pool keeps it.
        let label = Label {
            keeps_space: Some(dev.backed().is_some_and(|b| b >= dev.size_bytes())),
            ..label
        };
        // The metadata is written in place for the pool's life: it must never find the disk out of space.
        dev.preallocate(0, label.data_offset)
            .await
            .map_err(|e| match e {
                crate::block::BlockError::NoSpace => PoolError::NoSpace(format!(
                    "the file system under the disk has no room for the pool's {} bytes of metadata",
                    label.data_offset
                )),
                e => PoolError::Io(format!("reserving the metadata's space: {e}")),
            })?;
        let disk = Disk::over(dev);
        let journal = Journal::format(disk.fused(), &label).await?;
        let io = |e: crate::block::BlockError| PoolError::Io(format!("writing the label: {e}"));
        let dev = disk.counted();
        dev.write(0, label.encode().freeze()).await.map_err(io)?;
        dev.flush().await.map_err(io)?;
        let meta = PoolMeta::new(label.cluster_size, label.data_clusters);
        tracing::info!(pool = %label.name, uuid = %label.uuid, capacity = label.capacity(), owner = %label.owner, "created pool");
        Ok(Self::assemble(disk, label, journal, meta))
    }

    /// Opens the pool on a device for `claim.node`: checks the label and its owner, claims the pool (a new
    /// incarnation, durable before anything else is written), then loads and replays the metadata and compacts it.
    pub async fn import(dev: Arc<dyn BlockDevice>, claim: &Claim) -> Result<Pool, PoolError> {
        let found = match Self::probe(dev.as_ref()).await? {
            Probe::Pool(l) => l,
            Probe::Blank => return Err(PoolError::NoLabel),
        };
        if found.block_size != dev.block_size() {
            return Err(PoolError::CorruptLabel(format!(
                "the pool has {}-byte blocks but the device was opened with {}",
                found.block_size,
                dev.block_size()
            )));
        }
        let disk = Disk::over(dev.clone());
        let label = Self::claim(disk.counted().as_ref(), &found, claim).await?;
        // A pool created before its metadata was preallocated gets it now; if the file system under it is full,
        // the import goes on, and fails only if a metadata write then finds no room.
        if let Err(e) = dev.preallocate(0, label.data_offset).await {
            tracing::warn!(pool = %label.name, error = %e, "could not reserve the space of the pool's metadata");
        }
        let (journal, meta) = Journal::open(disk.fused(), &label).await?;
        tracing::info!(
            pool = %label.name,
            uuid = %label.uuid,
            volumes = meta.volumes.len(),
            epoch = journal.epoch(),
            incarnation = label.incarnation,
            "imported pool"
        );
        let pool = Self::assemble(disk, label, journal, meta);
        // Free clusters whose space a process that died first never gave back, or that predate giving it back. On a
        // file only: a block device's import would discard its whole free space (terabytes, under the gate, at every
        // start); it is told of clusters as they are freed.
        if pool.inner.disk.backed().is_some() {
            pool.inner.release_behind(pool.inner.free_runs());
        }
        Ok(pool)
    }

    /// Writes the label that makes `claim.node` the owner, one incarnation after `found`.
    async fn claim(
        dev: &dyn BlockDevice,
        found: &Label,
        claim: &Claim,
    ) -> Result<Label, PoolError> {
        if !found.owner.is_empty() && found.owner != claim.node {
            if !claim.force {
                return Err(PoolError::OwnedByAnotherNode {
                    pool: found.name.clone(),
                    owner: found.owner.clone(),
                    incarnation: found.incarnation,
                });
            }
            tracing::warn!(
                pool = %found.name,
                previous_owner = %found.owner,
                incarnation = found.incarnation,
                "forced import: taking the pool from another node"
            );
        }
        let mut label = found.claimed_by(&claim.node)?;
        if label.keeps_space.is_none() {
            // Made before the space policy was recorded: what the file looks like now, recorded from now on.
            label.keeps_space = Some(dev.backed().is_some_and(|b| b >= dev.size_bytes()));
        }
        let io = |e: crate::block::BlockError| PoolError::Io(format!("claiming the pool: {e}"));
        dev.write(0, label.encode().freeze()).await.map_err(io)?;
        dev.flush().await.map_err(io)?;
        Ok(label)
    }

    fn assemble(disk: Disk, label: Label, journal: Journal, meta: PoolMeta) -> Pool {
        let keeps_space = label.keeps_space == Some(true);
        let fuse = disk.fuse.clone();
        let inner = Arc::new(PoolInner {
            dev: fuse.clone(),
            disk: disk.counted,
            fault: disk.fault,
            fuse,
            label,
            meta: RwLock::new(meta),
            journal: GroupCommit::new(journal),
            reserved: Mutex::new(BTreeSet::new()),
            unreserved: tokio::sync::Notify::new(),
            cursor: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            may_take_walked: Mutex::new(None),
            stock: Mutex::new(Vec::new()),
            stocking: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stock_ready: tokio::sync::Notify::new(),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            volumes: Mutex::new(BTreeMap::new()),
            lost: AtomicBool::new(false),
            destroying: AtomicBool::new(false),
            no_space: AtomicU64::new(0),
            last_no_space_log: Mutex::new(None),
            disk_full: AtomicBool::new(false),
            releases: release::Releases::default(),
            keeps_space,
        });
        Pool { inner }
    }

    /// Makes the pool's disk fail (or delay) I/O as `plan` says, as a failing disk would; `None` heals it. How many
    /// I/Os were failed so far.
    pub fn inject_disk_fault(&self, plan: Option<crate::block::fault::FaultPlan>) -> u64 {
        self.inner.fault.set_plan(plan.unwrap_or_default());
        self.inner.fault.injected()
    }

    pub fn label(&self) -> &Label {
        &self.inner.label
    }

    pub fn name(&self) -> &str {
        &self.inner.label.name
    }

    pub fn uuid(&self) -> Uuid {
        self.inner.label.uuid
    }

    /// Which state of the pool's metadata this is: (the label's incarnation, changes applied since that import).
    /// A later state has a greater one; figures of a state (`stats`) at or after a change's own generation
    /// (read once the change is applied) count it. The cluster agent tells by it whether a node's heartbeat counts
    /// a replica it just created.
    pub fn generation(&self) -> (u64, u64) {
        let _m = self.inner.meta();
        (
            self.inner.label.incarnation,
            self.inner.applied.load(Ordering::Acquire),
        )
    }

    pub fn stats(&self) -> PoolStats {
        let fs_room = self.inner.recheck_disk_room();
        let m = self.inner.meta();
        // Read under the metadata lock (it changes only under its write lock): the count of this state.
        let applied = self.inner.applied.load(Ordering::Acquire);
        let cs = u64::from(self.inner.label.cluster_size);
        let spare = if fs_room.is_some() {
            let in_use = self.inner.label.data_offset + m.used_clusters() * cs;
            self.inner
                .dev
                .backed()
                .map_or(0, |b| b.saturating_sub(in_use))
        } else {
            0
        };
        let disk_room = fs_room.map(|room| room.saturating_add(spare));
        let capacity = self.inner.label.capacity();
        let allocated = m.used_clusters() * cs;
        let committed: u64 = m
            .volumes
            .values()
            .filter(|v| !v.is_snapshot())
            .map(|v| v.size)
            .sum();
        // Without snapshots or clones every mapped cluster is one replica's own: no need to walk the maps (a
        // large pool's take milliseconds under the metadata lock, at every heartbeat and scrape); with them, the
        // maps are walked once per change of the metadata. Either way a partial last cluster takes a whole one.
        let may_take = if !m
            .volumes
            .values()
            .any(|v| v.is_snapshot() || v.clone_of.is_some())
        {
            let whole: u64 = m.volumes.values().map(|v| v.map.len() as u64 * cs).sum();
            whole.saturating_sub(allocated)
        } else if let Some((at, v)) = *self
            .inner
            .may_take_walked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            && at == applied
        {
            v
        } else {
            let mut may_take: u64 = 0;
            for v in m.volumes.values().filter(|v| !v.is_snapshot()) {
                let own = v
                    .map
                    .iter()
                    .filter(|p| **p != meta::UNMAPPED && m.refs(**p) == 1)
                    .count() as u64;
                let mapped = v.map.iter().filter(|p| **p != meta::UNMAPPED).count() as u64;
                // Its unmapped clusters and those it shares, each a whole new cluster (a partial last one too).
                let unmapped = (v.map.len() as u64).saturating_sub(mapped);
                may_take = may_take.saturating_add((unmapped + mapped - own) * cs);
            }
            *self
                .inner
                .may_take_walked
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some((applied, may_take));
            may_take
        };
        // A new replica needs its clusters described too: a pool whose metadata is (nearly) full has no room for
        // one, whatever its data area has (else the agent placed there again and again, each try refused).
        let describable = m
            .room_for_one_more(self.inner.label.ckpt_len.saturating_sub(2 * LABEL_LEN))
            .saturating_mul(cs);
        PoolStats {
            applied,
            capacity,
            allocated,
            may_take: may_take.min(capacity.saturating_sub(allocated)),
            replica_room: capacity
                .saturating_sub(allocated)
                .saturating_sub(may_take)
                .min(describable),
            committed,
            no_space_errors: self.inner.no_space.load(Ordering::Relaxed),
            disk_full: self.inner.disk_full.load(Ordering::Relaxed),
            // A faulted pool's disk failed a metadata write, which the count of data I/O errors does not see: at
            // least one, so that the cluster agent places no new replica on it.
            disk_errors: self
                .inner
                .disk
                .errors()
                .max(u64::from(self.inner.fault().is_some())),
            disk_room,
            disk_room_of: fs_room.and(self.inner.dev.room_of()),
            own_room: spare,
        }
    }

    /// Every volume's metadata (replicas and snapshots).
    pub fn volumes(&self) -> Vec<VolumeMeta> {
        self.inner.meta().volumes.values().cloned().collect()
    }

    /// Every volume's metadata without its cluster map (left empty): what listings, metrics and heartbeats need,
    /// without copying every map (a cluster's entry each, millions in a large pool) under the metadata lock that
    /// the I/O path takes too.
    pub fn volume_headers(&self) -> Vec<VolumeMeta> {
        self.inner
            .meta()
            .volumes
            .values()
            .map(VolumeMeta::header)
            .collect()
    }

    pub fn volume_meta(&self, uuid: &Uuid) -> Option<VolumeMeta> {
        self.inner.meta().volumes.get(uuid).cloned()
    }

    /// Bytes of clusters one volume maps, and of those only it maps (no snapshot or clone shares them: what a
    /// snapshot of it taken now would add to what its pool must keep room for, since once shared each is copied at
    /// its first overwrite); one walk of its map.
    pub fn volume_usage(&self, uuid: &Uuid) -> (u64, u64) {
        let m = self.inner.meta();
        let (mapped, own) = m.volumes.get(uuid).map_or((0, 0), |v| {
            v.map
                .iter()
                .filter(|p| **p != meta::UNMAPPED)
                .fold((0u64, 0u64), |(n, own), p| {
                    (n + 1, own + u64::from(m.refs(*p) == 1))
                })
        });
        let cs = u64::from(self.inner.label.cluster_size);
        (mapped * cs, own * cs)
    }

    /// Bytes of clusters mapped by one volume.
    pub fn volume_allocated(&self, uuid: &Uuid) -> u64 {
        let m = self.inner.meta();
        m.volumes.get(uuid).map(|v| v.mapped()).unwrap_or(0)
            * u64::from(self.inner.label.cluster_size)
    }

    /// The block device of a volume (one per volume, shared).
    pub fn open_volume(&self, uuid: &Uuid) -> Result<Arc<PoolVolume>, PoolError> {
        // The volume is looked up under the handles' lock: a destroy applies its record before it takes that lock
        // to close the handle, so a volume found here has not passed that step, and its handle made here is closed
        // by it. (Looked up before the lock, a destroy could end in between: a handle of the destroyed volume
        // stayed, open, for a replica made again under the same name, with the old one's size.)
        let mut vols = self.inner.volumes.lock().unwrap_or_else(|e| e.into_inner());
        let meta = self
            .volume_meta(uuid)
            .ok_or(PoolError::NotFound(PoolObject::Volume(*uuid)))?;
        #[cfg(test)]
        tests::after_lookup(uuid);
        let v = vols.entry(*uuid).or_insert_with(|| {
            Arc::new_cyclic(|me| PoolVolume {
                pool: self.inner.clone(),
                uuid: *uuid,
                size: AtomicU64::new(meta.size),
                read_only: meta.is_snapshot(),
                // Closed from birth in a pool closed already (shut down, or adopted and let go while the engine
                // stops): a handle made after the pool's volumes were closed would otherwise take I/O.
                closed: AtomicBool::new(
                    self.is_lost() || self.inner.closed.load(Ordering::Acquire),
                ),
                alloc: crate::block::range_lock::RangeLock::new(),
                allocating: AtomicU64::new(0),
                stream: Default::default(),
                quiesce: Arc::new(tokio::sync::RwLock::new(())),
                me: me.clone(),
                detached: Default::default(),
            })
        });
        Ok(v.clone())
    }

    /// Whether a replica of `size` bytes (with `mapped` clusters in its map already) fits the pool and its metadata.
    fn check_room(&self, size: u64, mapped: u64) -> Result<(), PoolError> {
        let capacity = self.inner.label.capacity();
        if size > capacity {
            return Err(PoolError::NoSpace(format!(
                "replica of {size} bytes does not fit pool {} of {capacity} bytes",
                self.name()
            )));
        }
        let cs = u64::from(self.inner.label.cluster_size);
        self.check_fits(size.div_ceil(cs) - mapped)
    }

    fn check_fits(&self, extra_clusters: u64) -> Result<(), PoolError> {
        let need = self.inner.meta().worst_case_bytes(extra_clusters) + 2 * LABEL_LEN;
        if need > self.inner.label.ckpt_len {
            return Err(PoolError::MetadataFull(format!(
                "pool {} cannot describe another {extra_clusters} clusters",
                self.name()
            )));
        }
        Ok(())
    }

    /// Creates a thin replica. Repeating the same request returns the existing replica.
    pub async fn create_replica(
        &self,
        uuid: Uuid,
        size: u64,
        share: Option<Share>,
    ) -> Result<Arc<PoolVolume>, PoolError> {
        let bs = u64::from(self.inner.label.block_size);
        if size == 0 || !size.is_multiple_of(bs) {
            return Err(PoolError::InvalidArgument(format!(
                "replica size {size} must be a non-zero multiple of the {bs}-byte block size"
            )));
        }
        let existing = |v: VolumeMeta| {
            if v.is_snapshot() || v.size != size {
                return Err(PoolError::AlreadyExists {
                    what: PoolObject::Volume(uuid),
                    detail: format!(
                        "with other parameters ({} bytes{})",
                        v.size,
                        if v.is_snapshot() { ", a snapshot" } else { "" }
                    ),
                });
            }
            self.open_volume(&uuid)
        };
        if let Some(v) = self.volume_meta(&uuid) {
            return existing(v);
        }
        self.check_room(size, 0)?;
        let r = self
            .inner
            .commit(vec![Record::CreateReplica {
                uuid,
                size,
                created: now_secs(),
                share,
            }])
            .await;
        // The same request, made at the same time, created it first.
        if let Err(PoolError::AlreadyExists { .. }) = &r
            && let Some(v) = self.volume_meta(&uuid)
        {
            return existing(v);
        }
        r?;
        tracing::info!(pool = %self.name(), replica = %uuid, size, "created replica");
        self.open_volume(&uuid)
    }

    /// Grows a replica to `size` bytes online: the new space is thin (reads as zeroes) and is usable by I/O as soon
    /// as this returns. Growing to the size it has is a no-op; replicas never shrink. Snapshots keep their size.
    pub async fn resize_replica(&self, uuid: Uuid, size: u64) -> Result<VolumeMeta, PoolError> {
        let v = self
            .volume_meta(&uuid)
            .ok_or(PoolError::NotFound(PoolObject::Replica(uuid)))?;
        if v.is_snapshot() {
            return Err(PoolError::InvalidArgument(format!(
                "{uuid} is a snapshot; snapshots keep their size"
            )));
        }
        let bs = u64::from(self.inner.label.block_size);
        if size == 0 || !size.is_multiple_of(bs) {
            return Err(PoolError::InvalidArgument(format!(
                "replica size {size} must be a non-zero multiple of the {bs}-byte block size"
            )));
        }
        let vol = self.open_volume(&uuid)?;
        // One resize of the volume at a time, and none while a snapshot is being taken of it.
        let excl = vol.quiesce.clone().write_owned().await;
        let v = self
            .volume_meta(&uuid)
            .ok_or(PoolError::NotFound(PoolObject::Replica(uuid)))?;
        if size < v.size {
            return Err(PoolError::InvalidArgument(format!(
                "replica {uuid} is {} bytes; replicas grow, never shrink (asked for {size})",
                v.size
            )));
        }
        if size == v.size {
            return Ok(v);
        }
        self.check_room(size, v.map.len() as u64)?;
        // The open volume takes its new size with the record, even if this caller goes.
        let grown = vol.clone();
        let from = v.size;
        self.inner
            .commit_holding(
                excl,
                vec![vec![Record::Resize { volume: uuid, size }]],
                move |inner| {
                    grown.size.store(size, Ordering::Release);
                    tracing::info!(pool = %inner.label.name, replica = %uuid, from, to = size, "grew replica");
                    inner.meta().volumes.get(&uuid).cloned()
                },
            )
            .await?
            .ok_or(PoolError::NotFound(PoolObject::Replica(uuid)))
    }

    /// Takes a crash-consistent snapshot of a replica: in-flight writes finish first, new ones wait.
    pub async fn snapshot(&self, replica: Uuid, snapshot: Uuid) -> Result<VolumeMeta, PoolError> {
        let src = self
            .volume_meta(&replica)
            .ok_or(PoolError::NotFound(PoolObject::Replica(replica)))?;
        if src.is_snapshot() {
            return Err(PoolError::InvalidArgument(format!(
                "{replica} is a snapshot; snapshots are taken of replicas"
            )));
        }
        let existing = |v: VolumeMeta| {
            if v.snapshot_of == Some(replica) {
                return Ok(v);
            }
            Err(PoolError::AlreadyExists {
                what: PoolObject::Volume(snapshot),
                detail: format!("and is not a snapshot of {replica}"),
            })
        };
        if let Some(v) = self.volume_meta(&snapshot) {
            return existing(v);
        }
        self.check_fits(src.map.len() as u64)?;
        let vol = self.open_volume(&replica)?;
        let excl = vol.quiesce.clone().write_owned().await;
        // A write the snapshot does not see must not land in the clusters it now shares: none in flight, and none
        // until the snapshot is applied, even if this caller goes.
        self.inner.settle().await?;
        let record = Record::Snapshot {
            replica,
            snapshot,
            created: now_secs(),
        };
        let r = self
            .inner
            .commit_holding(excl, vec![vec![record]], move |inner| {
                tracing::info!(pool = %inner.label.name, %replica, %snapshot, "took snapshot");
                inner.meta().volumes.get(&snapshot).cloned()
            })
            .await;
        if let Err(PoolError::AlreadyExists { .. }) = &r
            && let Some(v) = self.volume_meta(&snapshot)
        {
            return existing(v);
        }
        r?.ok_or(PoolError::NotFound(PoolObject::Snapshot(snapshot)))
    }

    /// Creates a writable replica from a snapshot; it shares the snapshot's clusters until it writes them.
    pub async fn clone_snapshot(
        &self,
        snapshot: Uuid,
        replica: Uuid,
        share: Option<Share>,
    ) -> Result<Arc<PoolVolume>, PoolError> {
        let src = self
            .volume_meta(&snapshot)
            .ok_or(PoolError::NotFound(PoolObject::Snapshot(snapshot)))?;
        if !src.is_snapshot() {
            return Err(PoolError::InvalidArgument(format!(
                "{snapshot} is not a snapshot"
            )));
        }
        let existing = |v: VolumeMeta| {
            if v.clone_of == Some(snapshot) {
                return self.open_volume(&replica);
            }
            Err(PoolError::AlreadyExists {
                what: PoolObject::Volume(replica),
                detail: format!("and is not a clone of {snapshot}"),
            })
        };
        if let Some(v) = self.volume_meta(&replica) {
            return existing(v);
        }
        self.check_fits(src.map.len() as u64)?;
        let r = self
            .inner
            .commit(vec![Record::Clone {
                snapshot,
                replica,
                created: now_secs(),
                share,
            }])
            .await;
        if let Err(PoolError::AlreadyExists { .. }) = &r
            && let Some(v) = self.volume_meta(&replica)
        {
            return existing(v);
        }
        r?;
        tracing::info!(pool = %self.name(), %snapshot, clone = %replica, "created clone");
        self.open_volume(&replica)
    }

    /// Holds the journal as a commit being written would: commits queue behind it until the guard is dropped.
    #[cfg(test)]
    pub(crate) async fn hold_journal(&self) -> tokio::sync::MutexGuard<'_, Journal> {
        self.inner.journal.hold().await
    }

    /// Callers' records waiting for the journal.
    #[cfg(test)]
    pub(crate) fn queued_commits(&self) -> usize {
        self.inner.journal.queued()
    }

    /// Waits until every commit asked for before now is applied (see [`PoolInner::caught_up`]).
    pub async fn caught_up(&self) {
        self.inner.caught_up().await;
    }

    /// Keeps whether and to whom a replica is exported, for the next import. Asking for what it has already
    /// writes nothing.
    pub async fn set_share(&self, uuid: Uuid, share: Option<Share>) -> Result<(), PoolError> {
        let has = |v: &VolumeMeta| v.share == share;
        let record = Record::SetShare {
            volume: uuid,
            share: share.clone(),
        };
        self.change_unless_it_has(uuid, has, record).await
    }

    /// Commits `record`, a change of volume `uuid`, unless the volume has it already (`has`), looked at again once
    /// what was asked before is applied: another change of it on its way would apply after this answer. A change
    /// it does not have yet needs no wait: its commit queues behind those.
    async fn change_unless_it_has(
        &self,
        uuid: Uuid,
        has: impl Fn(&VolumeMeta) -> bool,
        record: Record,
    ) -> Result<(), PoolError> {
        let has = || -> Result<bool, PoolError> {
            let v = self
                .volume_meta(&uuid)
                .ok_or(PoolError::NotFound(PoolObject::Volume(uuid)))?;
            Ok(has(&v))
        };
        if has()? {
            self.inner.caught_up().await;
            if has()? {
                return Ok(());
            }
        }
        self.inner.commit(vec![record]).await
    }

    /// Saves the reservation state of a replica's namespace (opaque to the pool).
    pub async fn set_reservation(
        &self,
        uuid: Uuid,
        state: Option<serde_json::Value>,
    ) -> Result<(), PoolError> {
        let has = |v: &VolumeMeta| v.reservation == state;
        let record = Record::SetReservation {
            volume: uuid,
            state: state.clone(),
        };
        self.change_unless_it_has(uuid, has, record).await
    }

    /// Destroys a replica or snapshot and frees the clusters no other volume uses. Its device handle fails all
    /// further I/O with `Closed`. A volume that is not there (or that a destroy at the same time took first) is
    /// `NotFound`.
    pub async fn destroy_volume(&self, uuid: Uuid) -> Result<(), PoolError> {
        if self.volume_meta(&uuid).is_none() {
            // A create of it on its way (its caller gone) would leave it behind this answer, for ever.
            self.inner.caught_up().await;
            if self.volume_meta(&uuid).is_none() {
                return Err(PoolError::NotFound(PoolObject::Volume(uuid)));
            }
        }
        // Its clusters are freed as this applies: no I/O of the pool may still be in flight, and none may start
        // until the volume is gone, even if this caller goes (see [`PoolInner::commit_holding`]).
        let excl = self.inner.gate.clone().write_owned().await;
        self.inner.settle().await?;
        // Its clusters no other volume shares are free once this commits: the commit gives their space back to
        // the file system (`release`).
        self.inner
            .commit_holding(
                excl,
                vec![vec![Record::Destroy { volume: uuid }]],
                move |inner| {
                    if let Some(v) = inner
                        .volumes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&uuid)
                    {
                        v.closed.store(true, Ordering::Release);
                    }
                    tracing::info!(pool = %inner.label.name, volume = %uuid, "destroyed volume");
                },
            )
            .await
    }

    /// Closes every volume handle (the pool is being exported or destroyed).
    pub fn close(&self) {
        self.inner.close_volumes();
    }

    /// Why the pool is faulted, if it is: a metadata write failed, so it takes no writes (data or metadata) until
    /// it is imported again. Reads go on.
    pub fn fault(&self) -> Option<String> {
        self.inner.fault().map(str::to_string)
    }

    /// Whether another import has taken this pool (found at a metadata commit); its volumes are closed.
    pub fn is_lost(&self) -> bool {
        self.inner.lost.load(Ordering::Acquire)
    }

    /// Destroys the pool: refuses while it has volumes, then wipes the label so the device probes blank. From the
    /// moment it is called, creates of replicas, snapshots and clones in the pool are refused
    /// ([`PoolError::Destroying`]), until it refuses (the pool has volumes) or for good.
    pub async fn destroy(&self) -> Result<(), PoolError> {
        // Set before waiting for the commits on their way (a create whose caller went away among them): those are
        // counted below, and every create admitted after is refused, so none is acknowledged and then wiped. Cleared
        // again when the destroy refuses or its caller goes away before the label is touched (a client's timeout
        // drops the call: the pool stays, and takes creates again).
        let refusing = RefusingCreates::set(&self.inner.destroying);
        if tokio::time::timeout(CAUGHT_UP_WAIT, self.inner.caught_up())
            .await
            .is_err()
        {
            return Err(PoolError::Io(format!(
                "the pool's journal has not answered for {} s: try again",
                CAUGHT_UP_WAIT.as_secs()
            )));
        }
        let n = self.inner.meta().volumes.len();
        if n > 0 {
            return Err(PoolError::NotEmpty {
                pool: self.name().to_string(),
                volumes: n,
            });
        }
        self.close();
        // The caller gone before the label is touched (while the gate is waited for): the pool goes on, open again
        // (closed, its stock and releases stayed stopped, and every replica made after it took no I/O).
        let mut reopen = OpenAgainUnlessDestroyed {
            closed: &self.inner.closed,
            destroyed: false,
        };
        // A filling of the stock in a task of its own ends before the label goes: none zeroes a thing after.
        let _excl = self.inner.gate.write().await;
        let dev = &self.inner.dev;
        let io = |e: crate::block::BlockError| PoolError::Io(format!("wiping the label: {e}"));
        // From here the label may be gone whatever becomes of this call: no create is taken again.
        refusing.for_good();
        reopen.destroyed = true;
        dev.write_zeroes(0, LABEL_LEN).await.map_err(io)?;
        dev.flush().await.map_err(io)?;
        tracing::info!(pool = %self.name(), "destroyed pool");
        Ok(())
    }
}
