//! Volume snapshots, persist-then-act like every volume operation: the snapshot is recorded (Creating) before any
//! engine is asked; then taken, through the volume's nexus when it is published (the nexus holds writes, flushes
//! and snapshots every healthy replica at one point, so the copies are crash-consistent) or on every replica when
//! it is not (no writer); then the copies are found by asking each replica's engine, and recorded (Created). A
//! crash in between is resumed by taking it again (each engine's snapshot is idempotent by uuid). Deleting marks
//! it Deleting, destroys every copy, then drops the record. Each copy lives in its replica's pool, so a volume made
//! from a snapshot gets its replicas as clones in those pools (see [`Volumes::create`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use proto::engine as epb;

use super::dataplane::NodeEngineError;
use super::failpoint;
use super::node::now_ms;
use super::volume::{VolumePhase, VolumeRecord};
use super::volumes::{VolumeError, Volumes, engine_error};

pub const PREFIX: &str = "/keelson/snapshots/";

pub fn key(uuid: &Uuid) -> String {
    format!("{PREFIX}{uuid}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotPhase {
    Creating,
    Created,
    Deleting,
}

/// One copy of a snapshot: in the pool of one of the volume's replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCopy {
    pub replica: Uuid,
    pub node: String,
    pub pool: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub uuid: Uuid,
    pub volume: Uuid,
    pub size: u64,
    pub phase: SnapshotPhase,
    pub copies: Vec<SnapshotCopy>,
    pub created_ms: u64,
    /// Taken to make this volume from its source volume: not listed, deleted with that volume.
    #[serde(default)]
    pub for_volume: Option<Uuid>,
    /// The nodes asked to take it, recorded before they are asked: where copies may be when its taking did not
    /// finish (the volume and its replicas may be gone by the time it is deleted).
    #[serde(default)]
    pub asked: Vec<String>,
    /// The pools of the volume's replicas on the nodes asked, when they were asked: a copy the record does not name
    /// may be in one, and while its engine has not imported it (restarted, its disk late) "not found" there does
    /// not tell the copy is gone.
    #[serde(default)]
    pub asked_pools: Vec<(String, String)>,
}

impl SnapshotRecord {
    /// The pools of `node` where a copy may be: its recorded copy's, and those of the replicas it was asked for.
    fn pools_on(&self, node: &str) -> Vec<String> {
        let mut pools: Vec<String> = self
            .copies
            .iter()
            .filter(|c| c.node == node)
            .map(|c| c.pool.clone())
            .chain(
                self.asked_pools
                    .iter()
                    .filter(|(n, _)| n == node)
                    .map(|(_, p)| p.clone()),
            )
            .collect();
        pools.sort();
        pools.dedup();
        pools
    }
}

/// The snapshot a volume made from another volume is cloned from (the same for every retry of its creation).
pub fn clone_source_snapshot(volume: &Uuid) -> Uuid {
    Uuid::new_v5(volume, b"keelson:volume-clone-source")
}

/// How long a snapshot taken for a volume's creation may wait for that volume before it counts as left behind.
const ORPHAN_AFTER_MS: u64 = 10 * 60 * 1000;

impl Volumes {
    pub async fn snapshot(&self, uuid: Uuid) -> Result<Option<SnapshotRecord>, VolumeError> {
        let k = key(&uuid);
        match self.store().get(&k).await? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v.value)
                .map(Some)
                .map_err(|source| VolumeError::Corrupt { key: k, source }),
        }
    }

    async fn save_snapshot(&self, s: &SnapshotRecord) -> Result<(), VolumeError> {
        let bytes = serde_json::to_vec(s).unwrap_or_default();
        self.store().put(&key(&s.uuid), bytes).await?;
        Ok(())
    }

    pub async fn list_snapshots(
        &self,
        volume: Option<Uuid>,
    ) -> Result<Vec<SnapshotRecord>, VolumeError> {
        Ok(self
            .all_snapshots()
            .await?
            .into_iter()
            .filter(|s| volume.is_none_or(|u| u == s.volume) && s.for_volume.is_none())
            .collect())
    }

    /// Every snapshot record, those taken to make a volume (not listed) too; one that does not decode is an error.
    pub(super) async fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, VolumeError> {
        let mut out = Vec::new();
        for (k, v) in self.store().list(PREFIX).await? {
            let s: SnapshotRecord = serde_json::from_slice(&v.value)
                .map_err(|source| VolumeError::Corrupt { key: k, source })?;
            out.push(s);
        }
        Ok(out)
    }

    /// Takes snapshot `uuid` of `volume` (the same request again returns it); `for_volume`: taken to make that
    /// volume (hidden).
    pub async fn create_snapshot(
        &self,
        volume: Uuid,
        uuid: Uuid,
        for_volume: Option<Uuid>,
    ) -> Result<SnapshotRecord, VolumeError> {
        let lock = self.lock_of(volume);
        let _held = lock.lock().await;
        let r = self.get(volume).await?;
        // A new snapshot holds placements off from its room check until it is taken (it takes room they see).
        let mut _placing = None;
        // The room it takes in each pool, promised once it is taken.
        let mut takes = Vec::new();
        let s = match self.snapshot(uuid).await? {
            Some(s) if s.volume != volume => {
                return Err(VolumeError::SnapshotExists {
                    uuid,
                    volume: s.volume,
                });
            }
            Some(s) if s.phase == SnapshotPhase::Created => return Ok(s),
            Some(s) if s.phase == SnapshotPhase::Deleting => {
                return Err(VolumeError::Conflict {
                    uuid: volume,
                    why: format!("snapshot {uuid} is being deleted"),
                });
            }
            Some(s) => s,
            None => {
                if r.phase != VolumePhase::Created {
                    return Err(VolumeError::FailedPrecondition {
                        uuid: volume,
                        why: format!("it is {:?}", r.phase),
                    });
                }
                if r.growth.is_some() {
                    return Err(VolumeError::FailedPrecondition {
                        uuid: volume,
                        why: format!("it is being expanded to {} bytes", r.spec.size),
                    });
                }
                _placing = Some(self.placing.lock().await);
                takes = self.room_for_snapshot(&r).await?;
                let s = SnapshotRecord {
                    uuid,
                    volume,
                    size: r.spec.size,
                    phase: SnapshotPhase::Creating,
                    copies: Vec::new(),
                    created_ms: now_ms(),
                    for_volume,
                    asked: Vec::new(),
                    asked_pools: Vec::new(),
                };
                if !self
                    .store()
                    .compare_and_put(&key(&uuid), 0, serde_json::to_vec(&s).unwrap_or_default())
                    .await?
                {
                    return Err(VolumeError::Conflict {
                        uuid: volume,
                        why: format!("snapshot {uuid} was created meanwhile"),
                    });
                }
                failpoint::at(failpoint::SNAPSHOT_RECORDED);
                s
            }
        };
        let taken = self
            .take_snapshot(&r, s)
            .await
            .map_err(|e| super::volumes::not_the_volume_missing(volume, e));
        // Taken or not (a failed taking may have made copies), its room counts until the nodes' figures show it.
        for ((node, pool), bytes) in takes {
            self.promise_room(&node, &pool, bytes);
        }
        taken
    }

    /// Refuses a new snapshot of `r` that a replica's pool has no room for: once the snapshot shares a replica's
    /// clusters, each is copied at its first overwrite, so the pool must keep room for those it does not share yet
    /// (`Replica.unshared`) beside what it keeps for its replicas already (`Pool.replica_room`); else the volume's
    /// writes could fail for want of space. By the engines' figures at that moment, for the replicas recorded in
    /// sync (those a copy is taken of: a nexus snapshots its healthy children, and without one only those are
    /// asked; a child faulted for a full pool does not hold snapshots off). The pools' room is placement's
    /// ([`super::room`]: less what records promise); the caller holds [`Volumes::placing`]. An engine that cannot be
    /// asked now, or one that does not tell those figures, is not checked (logged).
    async fn room_for_snapshot(
        &self,
        r: &VolumeRecord,
    ) -> Result<Vec<((String, String), u64)>, VolumeError> {
        let ask: Vec<String> = r.replicas.iter().map(|x| x.node.clone()).collect();
        let view = self.placement_view(&ask).await?;
        // What each pool must keep room for: its replicas' unshared bytes (one replica per node, normally).
        let mut need: BTreeMap<(String, String), (u64, Vec<String>)> = BTreeMap::new();
        let mut rooms: BTreeMap<(String, String), u64> = BTreeMap::new();
        for rep in r.replicas.iter().filter(|x| x.created && x.synced) {
            let asked = match self.engine(&rep.node).await {
                Ok(_) if !view.answered.contains(&rep.node) => {
                    Err(VolumeError::FailedPrecondition {
                        uuid: r.uuid,
                        why: format!("{} did not give its pools' figures", rep.node),
                    })
                }
                Ok(mut c) => c
                    .list_replicas(epb::ListReplicasRequest {})
                    .await
                    .map(|l| l.into_inner())
                    .map_err(|s| engine_error(&rep.node, s)),
                Err(e) => Err(e),
            };
            let replicas = match asked {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(volume = %r.uuid, replica = %rep.uuid, node = %rep.node, error = %e, "room for a snapshot not checked on this replica's pool: its engine cannot be asked");
                    continue;
                }
            };
            let id = rep.uuid.to_string();
            let unshared = replicas
                .replicas
                .into_iter()
                .find(|x| x.uuid == id)
                .and_then(|x| x.unshared);
            let room = view.pool(&rep.node, &rep.pool).and_then(|p| p.replica_room);
            if let (Some(unshared), Some(room)) = (unshared, room) {
                let at = (rep.node.clone(), rep.pool.clone());
                let n = need.entry(at.clone()).or_default();
                n.0 = n.0.saturating_add(unshared);
                n.1.push(id);
                rooms.insert(at, room);
            }
        }
        let mut short = Vec::new();
        let takes: Vec<((String, String), u64)> =
            need.iter().map(|(at, (u, _))| (at.clone(), *u)).collect();
        for ((node, pool), (unshared, ids)) in need {
            let room = rooms[&(node.clone(), pool.clone())];
            if unshared > room {
                short.push(format!(
                    "replica {} may copy {unshared} bytes, and pool {pool} on {node} has room for {room}",
                    ids.join(", ")
                ));
            }
        }
        if short.is_empty() {
            return Ok(takes);
        }
        Err(VolumeError::NoRoomForSnapshot(format!(
            "no room for a snapshot of volume {}: once shared with it, a replica's clusters are copied at their \
             first overwrite: {}",
            r.uuid,
            short.join("; ")
        )))
    }

    /// Takes the snapshot (again: idempotent per copy), then records the copies the engines hold.
    async fn take_snapshot(
        &self,
        r: &VolumeRecord,
        mut s: SnapshotRecord,
    ) -> Result<SnapshotRecord, VolumeError> {
        // Copies are of one size, the volume's: not while it grows (some replicas would be grown, some not), and a
        // taking resumed after a growth is of the grown size.
        if r.growth.is_some() {
            return Err(VolumeError::FailedPrecondition {
                uuid: r.uuid,
                why: format!("it is being expanded to {} bytes", r.spec.size),
            });
        }
        let resized = s.size != r.spec.size;
        s.size = r.spec.size;
        let id = s.uuid.to_string();
        // A taking that did not finish (the agent died, a child failed) may have left copies on some nodes: asked
        // again, those would keep that earlier moment while the others take this one, and a clone's replicas would
        // disagree. They go first; a node that cannot be reached now keeps its copy out of the record.
        let mut uncleared = Vec::new();
        for node in s.asked.clone() {
            // Not found in a pool its engine has not imported yet (restarted, its disk late): not known to be gone.
            let pools: Vec<String> = s
                .pools_on(&node)
                .into_iter()
                .chain(
                    r.replicas
                        .iter()
                        .filter(|x| x.node == node)
                        .map(|x| x.pool.clone()),
                )
                .collect();
            let cleared = match self.engine(&node).await {
                Ok(mut c) => {
                    let mut e = c.clone();
                    let d = e.destroy_snapshot(epb::DestroySnapshotRequest { uuid: id.clone() });
                    super::garbage::destroyed_unless_pending(
                        self.store(),
                        &mut c,
                        &node,
                        &pools,
                        r.uuid,
                        d,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = cleared {
                tracing::warn!(snapshot = %id, %node, error = %e, "an earlier copy not cleared: that node's copy is left out");
                uncleared.push(node);
            }
        }
        // Persist, then act: every node that may make a copy is recorded before it is asked.
        let before = (s.asked.len(), s.asked_pools.len());
        for x in &r.replicas {
            if !s.asked.contains(&x.node) {
                s.asked.push(x.node.clone());
            }
            let at = (x.node.clone(), x.pool.clone());
            if !s.asked_pools.contains(&at) {
                s.asked_pools.push(at);
            }
        }
        if (s.asked.len(), s.asked_pools.len()) != before || resized {
            self.save_snapshot(&s).await?;
        }
        // The moment the copies are taken (a retry after a taking that failed takes them now, not when the record
        // was made): CSI's creation_time, by which backup tools order and prune snapshots. Saved with the Created
        // phase below.
        s.created_ms = now_ms();
        let through = self.live_nexus_node(r).await?;
        let published = through.is_some();
        // Without a nexus, only the replicas recorded in sync hold the volume: one placed empty by a scale-up, or
        // left half rebuilt, would give a copy a clone takes for the volume's data. (A nexus snapshots only its
        // healthy children.)
        let current = |x: &&super::volume::ReplicaRecord| published || x.synced;
        match through {
            Some(node) => {
                self.engine(&node)
                    .await?
                    .snapshot_nexus(epb::SnapshotNexusRequest {
                        uuid: r.uuid.to_string(),
                        snapshot_uuid: id.clone(),
                    })
                    .await
                    .map_err(|e| engine_error(&node, e))?;
            }
            None => {
                for rep in r.replicas.iter().filter(|x| x.created).filter(current) {
                    // With no nexus nothing writes: every replica in sync holds the same data, and one whose node
                    // is down is left out (the copies made are checked below). Asked again until it returned, the
                    // snapshot (and a clone of the volume, its expansion) would wait as long, while an unpublished
                    // volume's replica is not replaced.
                    let mut engine = match self.engine(&rep.node).await {
                        Err(VolumeError::Node(NodeEngineError::NotOnline { state, .. })) => {
                            tracing::warn!(volume = %r.uuid, snapshot = %id, node = %rep.node, ?state, "the node of a replica in sync is not online: no copy there");
                            continue;
                        }
                        e => e?,
                    };
                    engine
                        .create_snapshot(epb::CreateSnapshotRequest {
                            replica: rep.uuid.to_string(),
                            uuid: id.clone(),
                        })
                        .await
                        .map_err(|e| engine_error(&rep.node, e))?;
                    if r.resync {
                        // The last nexus did not end cleanly (it may even write still, unfenced until the next
                        // publish): its replicas may differ where its last writes went. One copy, of one of them, is
                        // one point in time; copies of several would give a clone replicas that disagree.
                        break;
                    }
                }
            }
        }
        failpoint::at(failpoint::SNAPSHOT_TAKEN);
        s.copies.clear();
        for rep in r
            .replicas
            .iter()
            .filter(current)
            .filter(|x| !uncleared.contains(&x.node))
        {
            let Ok(mut c) = self.engine(&rep.node).await else {
                continue;
            };
            let Ok(list) = c.list_snapshots(epb::ListSnapshotsRequest {}).await else {
                continue;
            };
            if let Some(found) = list
                .into_inner()
                .snapshots
                .into_iter()
                .find(|x| x.uuid == id)
            {
                s.copies.push(SnapshotCopy {
                    replica: rep.uuid,
                    node: rep.node.clone(),
                    pool: found.pool,
                });
            }
        }
        if s.copies.is_empty() {
            return Err(VolumeError::FailedPrecondition {
                uuid: r.uuid,
                why: format!("no replica holds snapshot {id}"),
            });
        }
        s.phase = SnapshotPhase::Created;
        self.save_snapshot(&s).await?;
        tracing::info!(volume = %r.uuid, snapshot = %id, copies = s.copies.len(), "snapshot taken");
        Ok(s)
    }

    /// Records snapshot `uuid` as Deleting (none: nothing to do); the snapshot reconciler destroys it if no one
    /// else does ([`Volumes::delete_snapshot`]).
    pub(super) async fn mark_snapshot_deleting(&self, uuid: Uuid) -> Result<(), VolumeError> {
        let Some(s) = self.snapshot(uuid).await? else {
            return Ok(());
        };
        let lock = self.lock_of(s.volume);
        let _held = lock.lock().await;
        if let Some(mut s) = self.snapshot(uuid).await?
            && s.phase != SnapshotPhase::Deleting
        {
            s.phase = SnapshotPhase::Deleting;
            self.save_snapshot(&s).await?;
        }
        Ok(())
    }

    pub async fn delete_snapshot(&self, uuid: Uuid) -> Result<(), VolumeError> {
        let s = self
            .snapshot(uuid)
            .await?
            .ok_or(VolumeError::SnapshotNotFound(uuid))?;
        let lock = self.lock_of(s.volume);
        let _held = lock.lock().await;
        let Some(mut s) = self.snapshot(uuid).await? else {
            return Ok(());
        };
        if s.phase != SnapshotPhase::Deleting {
            s.phase = SnapshotPhase::Deleting;
            self.save_snapshot(&s).await?;
        }
        // A node gone or a pool not imported yet is something the deletion waits for, not the snapshot missing
        // (NOT_FOUND, which CSI takes for deleted).
        self.drive_delete_snapshot(s)
            .await
            .map_err(|e| super::volumes::not_the_volume_missing(uuid, e))
    }

    /// Destroys every copy: those recorded, and (for a snapshot whose taking did not finish) any on the volume's
    /// replicas' nodes; then drops the record. A copy on a node deleted from the cluster went with it. When a node
    /// fails, the others are still done and taken off the record before the error returns.
    async fn drive_delete_snapshot(&self, s: SnapshotRecord) -> Result<(), VolumeError> {
        // Each node where a copy may be, with the pools it may be in (its recorded copy's, its replica's).
        let mut pools: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for node in s.copies.iter().map(|c| &c.node).chain(&s.asked) {
            pools.insert(node.clone(), s.pools_on(node));
        }
        // Records from before `asked` was kept do not say which nodes were asked: the replicas' nodes may have been.
        // (Any other record names every node asked: one added to the volume since, maybe down now, holds no copy.)
        if s.asked.is_empty()
            && let Some(r) = self.read(s.volume).await?
        {
            for x in r.replicas {
                pools.entry(x.node).or_default().push(x.pool);
            }
        }
        // Every node is tried, whichever fail: those done are taken off the record, so the record names only what
        // may still be there and one node that is down (or gone from the cluster) holds up no other's copy.
        let mut done = Vec::new();
        let mut first_error = None;
        for (node, pools) in pools {
            let destroyed = async {
                let mut c = self.engine(&node).await?;
                let mut e = c.clone();
                let r = e.destroy_snapshot(epb::DestroySnapshotRequest {
                    uuid: s.uuid.to_string(),
                });
                // Not found in a pool the engine has not imported yet (its disk late at start): not known to be
                // gone, and the record is what would destroy it once the pool is back.
                super::garbage::destroyed_unless_pending(
                    self.store(),
                    &mut c,
                    &node,
                    &pools,
                    s.volume,
                    r,
                )
                .await
            };
            match destroyed.await {
                Ok(()) => done.push(node),
                // A node deleted from the cluster (DeleteNode) took what it held with it, as it does its garbage.
                Err(VolumeError::Node(super::dataplane::NodeEngineError::NotFound(_))) => {
                    tracing::info!(snapshot = %s.uuid, node, "the node of a copy was deleted from the cluster: the copy went with it");
                    done.push(node)
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            let mut left = s;
            left.copies.retain(|c| !done.contains(&c.node));
            left.asked.retain(|n| !done.contains(n));
            left.asked_pools.retain(|(n, _)| !done.contains(n));
            if !done.is_empty() {
                self.save_snapshot(&left).await?;
            }
            return Err(e);
        }
        self.store().delete(&key(&s.uuid)).await?;
        tracing::info!(snapshot = %s.uuid, volume = %s.volume, "snapshot deleted");
        Ok(())
    }

    /// Resumes snapshots left Creating (taken again, or deleted if their volume is gone) or Deleting, and deletes
    /// snapshots taken for a volume's creation once that volume is gone (or never came).
    pub async fn reconcile_snapshots(&self) -> Result<(), VolumeError> {
        let mut all = Vec::new();
        for (k, v) in self.store().list(PREFIX).await? {
            // One that does not decode is left out, not in the way of the others.
            match serde_json::from_slice::<SnapshotRecord>(&v.value) {
                Ok(s) => all.push(s),
                Err(e) => {
                    tracing::error!(key = %k, error = %e, "snapshot record left out: it does not decode")
                }
            }
        }
        for s in all {
            let uuid = s.uuid;
            // One that cannot be resumed now (its volume's record unreadable, a node down) waits; the others go on.
            if let Err(e) = self.resume_snapshot(s).await {
                tracing::debug!(snapshot = %uuid, error = %e, "snapshot operation still waiting");
            }
        }
        Ok(())
    }

    /// The node of the volume's nexus that may take writes: the published one, or one recorded but not (yet, or
    /// any more) published whose engine confirmed it (its key is the fence key) and still lists it. A publish cut
    /// short after the export, or an unpublish before the end, leaves such a nexus exported while the record says
    /// unpublished; its hosts may write through it, so the replicas are copied through it, at one moment, not one
    /// after another under its writes.
    async fn live_nexus_node(&self, r: &VolumeRecord) -> Result<Option<String>, VolumeError> {
        let Some(n) = r.nexus.as_ref() else {
            return Ok(None);
        };
        if n.published {
            return Ok(Some(n.node.clone()));
        }
        if n.key != r.fence_key {
            return Ok(None);
        }
        // A node down is no nexus's to write through now (as for a published volume's replicas, see below).
        let mut engine = match self.engine(&n.node).await {
            Err(VolumeError::Node(NodeEngineError::NotOnline { .. })) => return Ok(None),
            e => e?,
        };
        let listed = engine
            .list_nexuses(epb::ListNexusesRequest {})
            .await
            .map_err(|e| engine_error(&n.node, e))?
            .into_inner()
            .nexuses
            .iter()
            .any(|x| x.uuid == r.uuid.to_string());
        Ok(listed.then(|| n.node.clone()))
    }

    /// One snapshot of [`Self::reconcile_snapshots`]: taken again, deleted, or left as it is.
    async fn resume_snapshot(&self, s: SnapshotRecord) -> Result<(), VolumeError> {
        if s.phase == SnapshotPhase::Created {
            let Some(owner) = s.for_volume else {
                return Ok(());
            };
            // An owner whose record does not read counts as there: nothing is deleted for it.
            if now_ms().saturating_sub(s.created_ms) < ORPHAN_AFTER_MS
                || self.read(owner).await?.is_some()
            {
                return Ok(());
            }
            tracing::info!(snapshot = %s.uuid, volume = %owner, "snapshot taken for a volume that is gone: deleted");
        }
        let Ok(_held) = self.lock_of(s.volume).try_lock_owned() else {
            return Ok(());
        };
        // Read again under the lock: a call that held it may have finished or deleted the snapshot since the
        // listing (taken again, a deleted one would come back; a finished one would be taken at a later moment).
        let Some(fresh) = self.snapshot(s.uuid).await? else {
            return Ok(());
        };
        if fresh.phase != s.phase {
            return Ok(());
        }
        match (fresh.phase, self.read(fresh.volume).await?) {
            (SnapshotPhase::Creating, Some(r)) if r.phase == VolumePhase::Created => {
                self.take_snapshot(&r, fresh).await.map(drop)
            }
            _ => self.drive_delete_snapshot(fresh).await,
        }
    }
}

/// Snapshots resumed, as a reconciler (see [`super::reconcile`]).
pub struct SnapshotReconciler(pub std::sync::Arc<Volumes>);

#[async_trait::async_trait]
impl super::reconcile::Reconciler for SnapshotReconciler {
    fn name(&self) -> &'static str {
        "snapshots"
    }

    async fn pass(&self) -> Result<(), String> {
        self.0
            .reconcile_snapshots()
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node asked for a copy that the record does not name (its answer was lost): the copy may be in the pool of
    /// the replica it was asked for, which its deletion must find imported before "not found" counts as gone. A
    /// record from before the pools were kept reads with none.
    #[test]
    fn a_copy_may_be_in_the_pools_its_node_was_asked_for() {
        let s = SnapshotRecord {
            uuid: Uuid::new_v4(),
            volume: Uuid::new_v4(),
            size: 1 << 20,
            phase: SnapshotPhase::Created,
            copies: vec![SnapshotCopy {
                replica: Uuid::new_v4(),
                node: "a".into(),
                pool: "pa".into(),
            }],
            created_ms: 1,
            for_volume: None,
            asked: vec!["a".into(), "b".into()],
            asked_pools: vec![("a".into(), "pa".into()), ("b".into(), "pb".into())],
        };
        assert_eq!(s.pools_on("a"), vec!["pa".to_string()]);
        assert_eq!(s.pools_on("b"), vec!["pb".to_string()]);
        assert!(s.pools_on("c").is_empty());
        let mut old = serde_json::to_value(&s).unwrap();
        old.as_object_mut().unwrap().remove("asked_pools");
        let old: SnapshotRecord = serde_json::from_value(old).unwrap();
        assert!(old.asked_pools.is_empty());
        assert!(old.pools_on("b").is_empty());
    }
}
