//! A pool's metadata as a value: its volumes (replicas and snapshots) with their cluster maps, the records that
//! change it, and the checks that make sure a loaded copy is sound before it is used.
//!
//! Every change is a [`Record`]; [`PoolMeta::apply`] is the one function that changes state, used both when a
//! change is made and when the journal is replayed, so the two can never disagree. Reference counts per physical
//! cluster are derived (never stored): a cluster shared by a replica and its snapshot has a count of 2 and is copied
//! before it is written.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{PoolError, PoolObject};
use crate::block::MissedWrites;

/// A logical cluster with no physical cluster behind it reads as zeroes.
pub const UNMAPPED: u32 = u32::MAX;
/// Metadata bytes a volume's missed-writes records may take (a few hundred ranges); beyond it they are coarsened.
pub const MISSED_BUDGET: usize = 8 << 10;

/// The most a volume's share may take in the metadata (its hosts' NQNs, encoded): a handful of hosts of the longest
/// NQNs. A share naming more is refused: its record would be journaled, and the checkpoint it grew would no longer
/// fit its area (every later commit refused, the pool never imported again).
pub const SHARE_BUDGET: usize = 2 << 10;

/// The most a volume's reservation state may take, encoded (the target keeps at most 64 registrants: about 5 KiB).
pub const RESERVATION_BUDGET: usize = 8 << 10;

fn share_bytes(s: &Option<Share>) -> usize {
    s.as_ref().map_or(0, |s| {
        s.hosts.iter().map(|h| h.len() + 3).sum::<usize>() + 12
    })
}

fn reservation_bytes(r: &Option<serde_json::Value>) -> usize {
    r.as_ref().map_or(0, |v| {
        serde_json::to_vec(v).map_or(RESERVATION_BUDGET + 1, |b| b.len())
    })
}

/// Refuses a share or reservation state larger than its budget.
fn within_budget(what: &str, volume: &Uuid, bytes: usize, budget: usize) -> Result<(), PoolError> {
    if bytes > budget {
        return Err(PoolError::InvalidArgument(format!(
            "volume {volume}'s {what} would take {bytes} bytes of the pool's metadata; at most {budget}"
        )));
    }
    Ok(())
}
/// The most children a volume keeps missed writes for (a nexus has at most 16 children). With names of at most
/// [`crate::block::MAX_CHILD_NAME`] bytes, that many one-range records stay within [`MISSED_BUDGET`].
pub const MAX_MISSED_CHILDREN: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Host NQNs allowed to connect; empty means any host.
    pub hosts: Vec<String>,
}

/// A replica (writable) or a snapshot (read-only) in a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub uuid: Uuid,
    pub size: u64,
    /// For a snapshot: the replica it was taken of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_of: Option<Uuid>,
    /// For a clone: the snapshot it was created from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<Uuid>,
    /// Seconds since the epoch when it was created.
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<Share>,
    /// NVMe reservation state of the exported namespace, opaque to the pool (the target defines it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<serde_json::Value>,
    /// Writes other children of the volume missed, as recorded here by the nexus (by child).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub missed: BTreeMap<String, MissedWrites>,
    /// Logical cluster -> physical cluster, [`UNMAPPED`] for never written. Stored as runs.
    #[serde(with = "runs")]
    pub map: Vec<u32>,
}

impl VolumeMeta {
    /// A copy of it without its cluster map (left empty).
    pub fn header(&self) -> VolumeMeta {
        VolumeMeta {
            uuid: self.uuid,
            size: self.size,
            snapshot_of: self.snapshot_of,
            clone_of: self.clone_of,
            created: self.created,
            share: self.share.clone(),
            reservation: self.reservation.clone(),
            missed: self.missed.clone(),
            map: Vec::new(),
        }
    }

    /// Keeps the missed-writes records within [`MISSED_BUDGET`] by coarsening the longest one, so a long outage
    /// with scattered writes cannot outgrow the metadata area: at worst its partial rebuild copies more.
    fn fit_missed(&mut self) {
        loop {
            let total: usize = self.missed.values().map(|m| m.encoded_bound()).sum();
            if total <= MISSED_BUDGET {
                return;
            }
            let Some(longest) = self.missed.values_mut().max_by_key(|m| m.ranges.len()) else {
                return;
            };
            if longest.ranges.len() <= 1 {
                return;
            }
            let half = longest.ranges.len() / 2;
            longest.coarsen(half);
        }
    }

    pub fn is_snapshot(&self) -> bool {
        self.snapshot_of.is_some()
    }
    pub fn mapped(&self) -> u64 {
        self.map.iter().filter(|p| **p != UNMAPPED).count() as u64
    }
}

/// One metadata change. Journal transactions are lists of records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    CreateReplica {
        uuid: Uuid,
        size: u64,
        created: u64,
        share: Option<Share>,
    },
    /// Points a replica's logical cluster at a physical one (first write, or a copy-on-write).
    Map {
        volume: Uuid,
        logical: u32,
        physical: u32,
    },
    /// Drops a logical cluster (deallocated by the host).
    Unmap {
        volume: Uuid,
        logical: u32,
    },
    Snapshot {
        replica: Uuid,
        snapshot: Uuid,
        created: u64,
    },
    Clone {
        snapshot: Uuid,
        replica: Uuid,
        created: u64,
        share: Option<Share>,
    },
    SetShare {
        volume: Uuid,
        share: Option<Share>,
    },
    /// Grows a replica to `size` bytes; the new clusters are unmapped (read as zeroes).
    Resize {
        volume: Uuid,
        size: u64,
    },
    SetReservation {
        volume: Uuid,
        state: Option<serde_json::Value>,
    },
    NoteMissed {
        volume: Uuid,
        missed: MissedWrites,
    },
    ForgetMissed {
        volume: Uuid,
        child: String,
    },
    Destroy {
        volume: Uuid,
    },
}

impl Record {
    /// Whether it creates a replica, a snapshot or a clone (refused while the pool is being destroyed).
    pub fn creates_volume(&self) -> bool {
        matches!(
            self,
            Record::CreateReplica { .. } | Record::Snapshot { .. } | Record::Clone { .. }
        )
    }

    /// Whether the record adds to what the metadata may have to describe (a volume, or clusters of one).
    pub fn describes_more(&self) -> bool {
        self.creates_volume() || matches!(self, Record::Resize { .. })
    }
}

/// What records admitted but not applied yet do to volumes: (size, is a snapshot) of those they create or resize,
/// `None` for those they destroy; and the children they start keeping missed writes for, per volume. See
/// [`PoolMeta::admit`].
#[derive(Clone, Debug, Default)]
pub struct Pending {
    volumes: BTreeMap<Uuid, Option<(u64, bool)>>,
    missed_children: BTreeMap<Uuid, std::collections::BTreeSet<String>>,
}

/// A pool's whole metadata state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMeta {
    pub volumes: BTreeMap<Uuid, VolumeMeta>,
    #[serde(skip)]
    refs: Vec<u32>,
    /// Clusters with a reference: kept with `refs`, so the pool's space is known without a scan of every cluster.
    #[serde(skip)]
    used: u64,
    #[serde(skip)]
    cluster_size: u64,
}

impl PoolMeta {
    pub fn new(cluster_size: u32, data_clusters: u64) -> PoolMeta {
        PoolMeta {
            volumes: BTreeMap::new(),
            refs: vec![0; data_clusters as usize],
            used: 0,
            cluster_size: u64::from(cluster_size),
        }
    }

    /// Rebuilds the derived state of a deserialized copy and checks that it is sound.
    pub fn load(mut self, cluster_size: u32, data_clusters: u64) -> Result<PoolMeta, PoolError> {
        self.cluster_size = u64::from(cluster_size);
        self.refs = vec![0; data_clusters as usize];
        self.used = 0;
        let volumes = std::mem::take(&mut self.volumes);
        for (id, v) in volumes {
            if id != v.uuid {
                return Err(PoolError::CorruptMetadata(format!(
                    "volume {} is filed under {id}",
                    v.uuid
                )));
            }
            self.check_map(&v)?;
            self.add_refs(&v.map);
            self.volumes.insert(id, v);
        }
        Ok(self)
    }

    fn check_map(&self, v: &VolumeMeta) -> Result<(), PoolError> {
        if v.map.len() as u64 != v.size.div_ceil(self.cluster_size) {
            return Err(PoolError::CorruptMetadata(format!(
                "volume {} of {} bytes has a map of {} clusters",
                v.uuid,
                v.size,
                v.map.len()
            )));
        }
        if let Some(p) = v
            .map
            .iter()
            .find(|p| **p != UNMAPPED && **p as usize >= self.refs.len())
        {
            return Err(PoolError::CorruptMetadata(format!(
                "volume {} maps cluster {p}, beyond the pool's {} clusters",
                v.uuid,
                self.refs.len()
            )));
        }
        Ok(())
    }

    fn add_refs(&mut self, map: &[u32]) {
        for p in map.iter().filter(|p| **p != UNMAPPED) {
            let r = &mut self.refs[*p as usize];
            if *r == 0 {
                self.used += 1;
            }
            *r += 1;
        }
    }

    fn drop_refs(&mut self, map: &[u32]) {
        for p in map.iter().filter(|p| **p != UNMAPPED) {
            let r = &mut self.refs[*p as usize];
            if *r == 1 {
                self.used -= 1;
            }
            *r = r.saturating_sub(1);
        }
    }

    pub fn refs(&self, physical: u32) -> u32 {
        self.refs.get(physical as usize).copied().unwrap_or(0)
    }

    pub fn data_clusters(&self) -> u64 {
        self.refs.len() as u64
    }

    pub fn used_clusters(&self) -> u64 {
        self.used
    }

    /// The first cluster at or after `from` (wrapping) that is unreferenced and not in `busy`.
    pub fn find_free(&self, from: u64, busy: &std::collections::BTreeSet<u32>) -> Option<u32> {
        let n = self.refs.len();
        (0..n)
            .map(|i| ((from as usize + i) % n) as u32)
            .find(|c| self.refs[*c as usize] == 0 && !busy.contains(c))
    }

    fn volume_mut(&mut self, id: &Uuid) -> Result<&mut VolumeMeta, PoolError> {
        self.volumes
            .get_mut(id)
            .ok_or_else(|| PoolError::CorruptMetadata(format!("record names unknown volume {id}")))
    }

    /// Points a volume's logical cluster at `physical` (or [`UNMAPPED`]), moving the references.
    fn remap(&mut self, volume: &Uuid, logical: u32, physical: u32) -> Result<(), PoolError> {
        let v = self.volume_mut(volume)?;
        let Some(slot) = v.map.get_mut(logical as usize) else {
            return Err(PoolError::CorruptMetadata(format!(
                "volume {volume} has no logical cluster {logical}"
            )));
        };
        let old = std::mem::replace(slot, physical);
        self.drop_refs(&[old]);
        self.add_refs(&[physical]);
        Ok(())
    }

    /// A new volume `uuid` sharing every cluster of `src` (a snapshot of a replica, or a clone of a snapshot). It
    /// starts with its own share, and no reservation or missed-writes records.
    fn derive(
        &mut self,
        src: &Uuid,
        uuid: Uuid,
        snapshot_of: Option<Uuid>,
        clone_of: Option<Uuid>,
        created: u64,
        share: Option<Share>,
    ) -> Result<(), PoolError> {
        if self.volumes.contains_key(&uuid) {
            return Err(PoolError::CorruptMetadata(format!(
                "volume {uuid} created twice"
            )));
        }
        let src = self.volume_mut(src)?.clone();
        let v = VolumeMeta {
            uuid,
            snapshot_of,
            clone_of,
            created,
            share,
            reservation: None,
            missed: BTreeMap::new(),
            ..src
        };
        self.add_refs(&v.map);
        self.volumes.insert(uuid, v);
        Ok(())
    }

    /// Whether applying `r` takes a volume's mapping off a cluster, which may then be written for another volume.
    pub fn moves_off_a_cluster(&self, r: &Record) -> bool {
        let mapped = |volume: &Uuid, logical: u32| {
            self.volumes
                .get(volume)
                .and_then(|v| v.map.get(logical as usize))
                .is_some_and(|p| *p != UNMAPPED)
        };
        match r {
            Record::Map {
                volume, logical, ..
            }
            | Record::Unmap { volume, logical } => mapped(volume, *logical),
            Record::Destroy { .. } => true,
            _ => false,
        }
    }

    /// The clusters `r` takes a reference off when applied (a destroyed volume's, an unmapped or remapped
    /// cluster's former one): those of them left with none are free once it is.
    pub fn unreferenced_by(&self, r: &Record) -> Vec<u32> {
        let mapped = |p: &u32| *p != UNMAPPED;
        match r {
            Record::Destroy { volume } => self
                .volumes
                .get(volume)
                .map(|v| v.map.iter().copied().filter(mapped).collect())
                .unwrap_or_default(),
            Record::Map {
                volume, logical, ..
            }
            | Record::Unmap { volume, logical } => self
                .volumes
                .get(volume)
                .and_then(|v| v.map.get(*logical as usize))
                .copied()
                .filter(mapped)
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Applies one record. An error means the record cannot follow this state: metadata is corrupt.
    pub fn apply(&mut self, r: &Record) -> Result<(), PoolError> {
        let bad = |why: String| Err(PoolError::CorruptMetadata(why));
        match r {
            Record::CreateReplica {
                uuid,
                size,
                created,
                share,
            } => {
                if self.volumes.contains_key(uuid) {
                    return bad(format!("volume {uuid} created twice"));
                }
                let map = vec![UNMAPPED; size.div_ceil(self.cluster_size) as usize];
                let v = VolumeMeta {
                    uuid: *uuid,
                    size: *size,
                    snapshot_of: None,
                    clone_of: None,
                    created: *created,
                    share: share.clone(),
                    reservation: None,
                    missed: BTreeMap::new(),
                    map,
                };
                self.volumes.insert(*uuid, v);
            }
            Record::Map {
                volume,
                logical,
                physical,
            } => {
                if *physical as usize >= self.refs.len() {
                    return bad(format!("cluster {physical} is beyond the pool"));
                }
                self.remap(volume, *logical, *physical)?;
            }
            Record::Unmap { volume, logical } => self.remap(volume, *logical, UNMAPPED)?,
            Record::Snapshot {
                replica,
                snapshot,
                created,
            } => self.derive(replica, *snapshot, Some(*replica), None, *created, None)?,
            Record::Clone {
                snapshot,
                replica,
                created,
                share,
            } => self.derive(
                snapshot,
                *replica,
                None,
                Some(*snapshot),
                *created,
                share.clone(),
            )?,
            Record::SetShare { volume, share } => {
                self.volume_mut(volume)?.share = share.clone();
            }
            Record::Resize { volume, size } => {
                let cs = self.cluster_size;
                let v = self.volume_mut(volume)?;
                if v.is_snapshot() || *size < v.size {
                    return bad(format!(
                        "resize of {volume} from {} to {size} bytes{}",
                        v.size,
                        if v.is_snapshot() { " (a snapshot)" } else { "" }
                    ));
                }
                v.size = *size;
                v.map.resize(size.div_ceil(cs) as usize, UNMAPPED);
            }
            Record::SetReservation { volume, state } => {
                self.volume_mut(volume)?.reservation = state.clone();
            }
            Record::NoteMissed { volume, missed } => {
                let v = self.volume_mut(volume)?;
                match v.missed.get_mut(&missed.child) {
                    Some(m) => m.merge(missed),
                    None => {
                        v.missed.insert(missed.child.clone(), missed.clone());
                    }
                }
                v.fit_missed();
            }
            Record::ForgetMissed { volume, child } => {
                self.volume_mut(volume)?.missed.remove(child);
            }
            Record::Destroy { volume } => {
                let v = self.volumes.remove(volume);
                match v {
                    Some(v) => self.drop_refs(&v.map),
                    None => return bad(format!("destroy of unknown volume {volume}")),
                }
            }
        }
        Ok(())
    }

    /// Checks that `records` can follow this state and the records `pending` stands for, all or none: admitted,
    /// their effects are added to `pending`; refused, `pending` is unchanged. A commit admits every record before
    /// it writes it, against the state as it will be when the record is applied (under the lock that orders
    /// commits), so a record that reaches the journal always applies, there and at every replay. The errors are
    /// those of the request the record came from: a volume that is gone is `NotFound`, one made in the meantime
    /// `AlreadyExists`.
    pub fn admit(&self, pending: &mut Pending, records: &[Record]) -> Result<(), PoolError> {
        let mut next = pending.clone();
        for r in records {
            self.admit_one(&mut next, r)?;
        }
        *pending = next;
        Ok(())
    }

    fn admit_one(&self, p: &mut Pending, r: &Record) -> Result<(), PoolError> {
        let view = |p: &Pending, id: &Uuid| match p.volumes.get(id) {
            Some(v) => *v,
            None => self.volumes.get(id).map(|v| (v.size, v.is_snapshot())),
        };
        let exists = |what: PoolObject, id: &Uuid| match view(p, id) {
            Some(v) => Ok(v),
            None => Err(PoolError::NotFound(what)),
        };
        let fresh = |id: &Uuid| match view(p, id) {
            Some(_) => Err(PoolError::AlreadyExists {
                what: PoolObject::Volume(*id),
                detail: "it was created meanwhile".into(),
            }),
            None => Ok(()),
        };
        let within = |volume: &Uuid, logical: u32| {
            let (size, snapshot) = exists(PoolObject::Volume(*volume), volume)?;
            if snapshot || u64::from(logical) >= size.div_ceil(self.cluster_size) {
                return Err(PoolError::InvalidArgument(format!(
                    "volume {volume} has no writable logical cluster {logical}"
                )));
            }
            Ok(())
        };
        match r {
            Record::CreateReplica {
                uuid, size, share, ..
            } => {
                fresh(uuid)?;
                within_budget("share", uuid, share_bytes(share), SHARE_BUDGET)?;
                p.volumes.insert(*uuid, Some((*size, false)));
            }
            Record::Map {
                volume,
                logical,
                physical,
            } => {
                if *physical as usize >= self.refs.len() {
                    return Err(PoolError::InvalidArgument(format!(
                        "cluster {physical} is beyond the pool"
                    )));
                }
                within(volume, *logical)?;
            }
            Record::Unmap { volume, logical } => within(volume, *logical)?,
            Record::Snapshot {
                replica, snapshot, ..
            } => {
                let (size, _) = exists(PoolObject::Replica(*replica), replica)?;
                fresh(snapshot)?;
                p.volumes.insert(*snapshot, Some((size, true)));
            }
            Record::Clone {
                snapshot,
                replica,
                share,
                ..
            } => {
                let (size, _) = exists(PoolObject::Snapshot(*snapshot), snapshot)?;
                fresh(replica)?;
                within_budget("share", replica, share_bytes(share), SHARE_BUDGET)?;
                p.volumes.insert(*replica, Some((size, false)));
            }
            Record::NoteMissed { volume, missed } => {
                exists(PoolObject::Volume(*volume), volume)?;
                // One record per child, and a nexus has a few: a host naming ever new ones would fill the metadata
                // (each record's ranges are kept within a budget, their number is not).
                // Those of records admitted with it count too: a batch of notes for new children would pass the
                // cap together.
                let kept = self.volumes.get(volume);
                let adding = p.missed_children.entry(*volume).or_default();
                let known = kept.is_some_and(|v| v.missed.contains_key(&missed.child))
                    || adding.contains(&missed.child);
                if !known {
                    if kept.map_or(0, |v| v.missed.len()) + adding.len() >= MAX_MISSED_CHILDREN {
                        return Err(PoolError::InvalidArgument(format!(
                            "volume {volume} keeps missed writes for {MAX_MISSED_CHILDREN} children already"
                        )));
                    }
                    adding.insert(missed.child.clone());
                }
            }
            Record::SetShare { volume, share } => {
                exists(PoolObject::Volume(*volume), volume)?;
                within_budget("share", volume, share_bytes(share), SHARE_BUDGET)?;
            }
            Record::SetReservation { volume, state } => {
                exists(PoolObject::Volume(*volume), volume)?;
                within_budget(
                    "reservation state",
                    volume,
                    reservation_bytes(state),
                    RESERVATION_BUDGET,
                )?;
            }
            Record::ForgetMissed { volume, .. } => {
                exists(PoolObject::Volume(*volume), volume)?;
            }
            Record::Resize { volume, size } => {
                let (now, snapshot) = exists(PoolObject::Replica(*volume), volume)?;
                if snapshot || *size < now {
                    return Err(PoolError::InvalidArgument(format!(
                        "replica {volume} is {now} bytes{}; it cannot become {size}",
                        if snapshot { " (a snapshot)" } else { "" }
                    )));
                }
                p.volumes.insert(*volume, Some((*size, false)));
            }
            Record::Destroy { volume } => {
                exists(PoolObject::Volume(*volume), volume)?;
                p.volumes.insert(*volume, None);
            }
        }
        Ok(())
    }

    /// An upper bound of the checkpoint size if every volume were fully written with no two clusters adjacent.
    pub fn worst_case_bytes(&self, extra_clusters: u64) -> u64 {
        let clusters: u64 = self.volumes.values().map(|v| v.map.len() as u64).sum();
        let snapshots = self.volumes.values().filter(|v| v.is_snapshot()).count() as u64;
        worst_case(
            self.volumes.len() as u64 - snapshots,
            snapshots,
            clusters + extra_clusters,
        )
    }

    /// How many clusters one more volume may have for the checkpoint's worst case to stay within `area` bytes.
    pub fn room_for_one_more(&self, area: u64) -> u64 {
        area.saturating_sub(self.worst_case_bytes(0))
            .saturating_sub(WORST_PER_REPLICA)
            / WORST_PER_CLUSTER
    }

    /// [`PoolMeta::worst_case_bytes`] of the state the records `pending` stands for will make: what a commit
    /// checks as it admits records that describe more, so that requests checked against the same state before
    /// they were committed (two snapshots at once) cannot fill the checkpoint area together.
    pub fn worst_case_bytes_after(&self, pending: &Pending) -> u64 {
        let (mut replicas, mut snapshots, mut clusters) = (0u64, 0u64, 0u64);
        let mut count = |snapshot: bool| {
            if snapshot {
                snapshots += 1;
            } else {
                replicas += 1;
            }
        };
        for (id, v) in &self.volumes {
            if !pending.volumes.contains_key(id) {
                count(v.is_snapshot());
                clusters += v.map.len() as u64;
            }
        }
        for (size, snapshot) in pending.volumes.values().flatten() {
            count(*snapshot);
            clusters += size.div_ceil(self.cluster_size);
        }
        worst_case(replicas, snapshots, clusters)
    }
}

/// What a snapshot takes in the worst case of a checkpoint, beside its clusters: its header and missed-writes
/// records at their budget.
const WORST_PER_SNAPSHOT: u64 = 512 + MISSED_BUDGET as u64;
/// What a replica (or clone) takes: a snapshot's, and its share and reservation state each at its budget (those
/// change with no admission check: a host's registration must not be refused for room the replica was admitted
/// with). A snapshot has neither.
const WORST_PER_REPLICA: u64 = WORST_PER_SNAPSHOT + (SHARE_BUDGET + RESERVATION_BUDGET) as u64;
/// What a cluster of a volume's map takes in the worst case of a checkpoint.
const WORST_PER_CLUSTER: u64 = 28;

/// The worst case of a checkpoint describing `replicas` replicas and `snapshots` snapshots of `clusters` clusters
/// in all.
fn worst_case(replicas: u64, snapshots: u64, clusters: u64) -> u64 {
    replicas * WORST_PER_REPLICA + snapshots * WORST_PER_SNAPSHOT + clusters * WORST_PER_CLUSTER
}

/// Serializes a cluster map as `[logical, physical, count]` runs of consecutive mapped clusters, plus its length.
mod runs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::UNMAPPED;

    #[derive(Serialize, Deserialize)]
    struct Runs {
        len: u32,
        runs: Vec<[u32; 3]>,
    }

    pub fn serialize<S: Serializer>(map: &[u32], s: S) -> Result<S::Ok, S::Error> {
        let mut runs: Vec<[u32; 3]> = Vec::new();
        for (l, p) in map.iter().enumerate() {
            if *p == UNMAPPED {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r[0] + r[2] == l as u32 && r[1].checked_add(r[2]) == Some(*p) => {
                    r[2] += 1
                }
                _ => runs.push([l as u32, *p, 1]),
            }
        }
        Runs {
            len: map.len() as u32,
            runs,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let r = Runs::deserialize(d)?;
        let mut map = vec![UNMAPPED; r.len as usize];
        for [l, p, n] in r.runs {
            for i in 0..n {
                let slot = l
                    .checked_add(i)
                    .and_then(|x| map.get_mut(x as usize))
                    .ok_or_else(|| serde::de::Error::custom("run beyond the map"))?;
                *slot = p
                    .checked_add(i)
                    .ok_or_else(|| serde::de::Error::custom("run beyond u32"))?;
            }
        }
        Ok(map)
    }
}

const _: () =
    assert!(MAX_MISSED_CHILDREN * (crate::block::MAX_CHILD_NAME + 64 + 44) <= MISSED_BUDGET);

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u32 = 1 << 20;

    fn create(m: &mut PoolMeta, size: u64) -> Uuid {
        let uuid = Uuid::new_v4();
        m.apply(&Record::CreateReplica {
            uuid,
            size,
            created: 1,
            share: None,
        })
        .unwrap();
        uuid
    }

    #[test]
    fn snapshots_and_clones_share_clusters_until_remapped() {
        let mut m = PoolMeta::new(CS, 16);
        let r = create(&mut m, 4 << 20);
        for (l, p) in [(0, 3), (1, 4), (3, 9)] {
            m.apply(&Record::Map {
                volume: r,
                logical: l,
                physical: p,
            })
            .unwrap();
        }
        assert_eq!(m.used_clusters(), 3);
        let s = Uuid::new_v4();
        m.apply(&Record::Snapshot {
            replica: r,
            snapshot: s,
            created: 2,
        })
        .unwrap();
        assert_eq!(m.refs(3), 2);
        let c = Uuid::new_v4();
        m.apply(&Record::Clone {
            snapshot: s,
            replica: c,
            created: 3,
            share: None,
        })
        .unwrap();
        assert_eq!(m.refs(3), 3);
        // Copy-on-write of the replica's cluster 0 into 5.
        m.apply(&Record::Map {
            volume: r,
            logical: 0,
            physical: 5,
        })
        .unwrap();
        assert_eq!((m.refs(3), m.refs(5)), (2, 1));
        m.apply(&Record::Destroy { volume: s }).unwrap();
        m.apply(&Record::Destroy { volume: c }).unwrap();
        assert_eq!((m.refs(3), m.refs(4)), (0, 1));
        assert_eq!(m.used_clusters(), 3);
        let mut busy = std::collections::BTreeSet::new();
        busy.insert(0);
        assert_eq!(m.find_free(0, &busy), Some(1));
        assert_eq!(m.find_free(4, &busy), Some(6));
    }

    #[test]
    fn a_host_s_missed_writes_note_is_checked_and_put_in_order() {
        let note = |child: &str, ranges: Vec<(u64, u64)>| MissedWrites {
            child: child.into(),
            since_ms: 1,
            ranges,
        };
        let m = note("c", vec![(8192, 4096), (0, 4096), (4096, 0), (2048, 4096)])
            .checked(1 << 20)
            .unwrap();
        assert_eq!(m.ranges, [(0, 6144), (8192, 4096)], "sorted and merged");
        for bad in [
            note("c", vec![(u64::MAX - 8, 16)]),
            note("c", vec![(1 << 20, 512)]),
            note(&"x".repeat(crate::block::MAX_CHILD_NAME + 1), vec![]),
            note("", vec![]),
        ] {
            assert!(bad.clone().checked(1 << 20).is_err(), "{bad:?}");
        }
    }

    /// A note that child `i` missed the first 4 KiB of volume `r`.
    fn note_for(r: Uuid, i: usize) -> Record {
        Record::NoteMissed {
            volume: r,
            missed: MissedWrites {
                child: format!("child-{i}"),
                since_ms: 1,
                ranges: vec![(0, 4096)],
            },
        }
    }

    #[test]
    fn a_volume_keeps_missed_writes_for_a_bounded_number_of_children() {
        let mut m = PoolMeta::new(CS, 16);
        let r = create(&mut m, 1 << 30);
        let note = |i: usize| note_for(r, i);
        for i in 0..MAX_MISSED_CHILDREN {
            m.admit(&mut Pending::default(), &[note(i)]).unwrap();
            m.apply(&note(i)).unwrap();
        }
        let e = m
            .admit(&mut Pending::default(), &[note(MAX_MISSED_CHILDREN)])
            .unwrap_err();
        assert!(matches!(e, PoolError::InvalidArgument(_)), "{e}");
        // A child it keeps already: taken.
        m.admit(&mut Pending::default(), &[note(0)]).unwrap();
    }

    /// Notes for new children admitted in one batch (a group commit of many callers) count against the cap
    /// together; before, each was checked against the applied state alone and a batch of 64 passed it.
    #[test]
    fn missed_writes_noted_in_one_batch_count_against_the_cap_together() {
        let mut m = PoolMeta::new(CS, 16);
        let r = create(&mut m, 1 << 30);
        let note = |i: usize| note_for(r, i);
        let mut p = Pending::default();
        for i in 0..MAX_MISSED_CHILDREN {
            m.admit(&mut p, &[note(i)]).unwrap();
        }
        assert!(m.admit(&mut p, &[note(MAX_MISSED_CHILDREN)]).is_err());
        m.admit(&mut p, &[note(3)]).unwrap();
    }

    #[test]
    fn missed_writes_of_a_long_outage_stay_within_budget_and_cover_every_write() {
        const MIB: u64 = 1 << 20;
        let mut m = PoolMeta::new(CS, 16);
        let r = create(&mut m, 1 << 40);
        let child =
            "nqn.2026-11.io.keelson:replica-00000000-0000-4000-8000-000000000001/1".to_string();
        // One megabyte written in every third: 10 000 separate ranges if nothing were merged.
        let written: Vec<u64> = (0..10_000u64).map(|i| i * 3 * MIB).collect();
        for at in &written {
            m.apply(&Record::NoteMissed {
                volume: r,
                missed: MissedWrites {
                    child: child.clone(),
                    since_ms: 5,
                    ranges: vec![(*at, MIB)],
                },
            })
            .unwrap();
        }
        let v = &m.volumes[&r];
        let kept = &v.missed[&child];
        assert!(
            kept.encoded_bound() <= MISSED_BUDGET,
            "{}",
            kept.encoded_bound()
        );
        assert!(serde_json::to_vec(&v.missed).unwrap().len() <= MISSED_BUDGET);
        assert!(kept.ranges.len() > 50, "{}", kept.ranges.len());
        assert_eq!(kept.since_ms, 5);
        for at in &written {
            assert!(
                kept.ranges
                    .iter()
                    .any(|(s, n)| s <= at && at + MIB <= s + n),
                "{at} lost"
            );
        }
        // Ordered and disjoint.
        assert!(kept.ranges.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
    }

    #[test]
    fn coarsening_closes_the_smallest_gaps_first() {
        let mut m = MissedWrites {
            child: "c".into(),
            since_ms: 0,
            ranges: vec![(0, 10), (12, 10), (100, 10), (111, 5), (500, 1)],
        };
        m.coarsen(3);
        assert_eq!(m.ranges, vec![(0, 22), (100, 16), (500, 1)]);
        m.coarsen(0);
        assert_eq!(m.ranges, vec![(0, 501)]);
    }

    #[test]
    fn serializes_as_runs_and_reloads_with_the_same_counts() {
        let mut m = PoolMeta::new(CS, 64);
        let r = create(&mut m, 40 << 20);
        for l in 0..30 {
            m.apply(&Record::Map {
                volume: r,
                logical: l,
                physical: l + 2,
            })
            .unwrap();
        }
        m.apply(&Record::Map {
            volume: r,
            logical: 35,
            physical: 50,
        })
        .unwrap();
        let s = Uuid::new_v4();
        m.apply(&Record::Snapshot {
            replica: r,
            snapshot: s,
            created: 2,
        })
        .unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.len() < 600, "{json}");
        let back: PoolMeta = serde_json::from_str(&json).unwrap();
        let back = back.load(CS, 64).unwrap();
        assert_eq!(back.volumes, m.volumes);
        assert_eq!(back.refs, m.refs);
    }

    #[test]
    fn a_record_admitted_after_a_batch_applies_after_it() {
        let mut m = PoolMeta::new(CS, 8);
        let r = create(&mut m, 2 << 20);
        let s = Uuid::new_v4();
        let mut p = Pending::default();
        let batch = [
            vec![Record::Destroy { volume: r }],
            vec![Record::Destroy { volume: r }],
            vec![Record::SetShare {
                volume: r,
                share: None,
            }],
            vec![Record::CreateReplica {
                uuid: s,
                size: 1 << 20,
                created: 0,
                share: None,
            }],
            // All or none: the map of the created volume is fine, the second create is not.
            vec![
                Record::Map {
                    volume: s,
                    logical: 0,
                    physical: 1,
                },
                Record::CreateReplica {
                    uuid: s,
                    size: 1 << 20,
                    created: 0,
                    share: None,
                },
            ],
            vec![Record::Map {
                volume: s,
                logical: 1,
                physical: 1,
            }],
            vec![Record::Map {
                volume: s,
                logical: 0,
                physical: 2,
            }],
        ];
        let verdicts: Vec<_> = batch.iter().map(|rs| m.admit(&mut p, rs)).collect();
        assert!(
            matches!(
                verdicts[..],
                [
                    Ok(()),
                    Err(PoolError::NotFound(PoolObject::Volume(_))),
                    Err(PoolError::NotFound(_)),
                    Ok(()),
                    Err(PoolError::AlreadyExists { .. }),
                    Err(PoolError::InvalidArgument(_)),
                    Ok(()),
                ]
            ),
            "{verdicts:?}"
        );
        for (rs, v) in batch.iter().zip(&verdicts) {
            if v.is_ok() {
                for rec in rs {
                    m.apply(rec).unwrap();
                }
            }
        }
        assert_eq!(m.volumes.keys().collect::<Vec<_>>(), vec![&s]);
        assert_eq!(m.refs(2), 1);
    }

    #[test]
    fn unsound_records_and_copies_are_refused() {
        let mut m = PoolMeta::new(CS, 8);
        let r = create(&mut m, 2 << 20);
        let bad = [
            Record::Map {
                volume: r,
                logical: 2,
                physical: 0,
            },
            Record::Map {
                volume: r,
                logical: 0,
                physical: 8,
            },
            Record::Map {
                volume: Uuid::new_v4(),
                logical: 0,
                physical: 0,
            },
            Record::Destroy {
                volume: Uuid::new_v4(),
            },
            Record::CreateReplica {
                uuid: r,
                size: 1 << 20,
                created: 0,
                share: None,
            },
        ];
        for rec in bad {
            assert!(
                matches!(m.apply(&rec), Err(PoolError::CorruptMetadata(_))),
                "{rec:?}"
            );
        }
        m.apply(&Record::Map {
            volume: r,
            logical: 1,
            physical: 7,
        })
        .unwrap();
        let json = serde_json::to_string(&m).unwrap();
        let parsed: PoolMeta = serde_json::from_str(&json).unwrap();
        assert!(matches!(
            parsed.load(CS, 4),
            Err(PoolError::CorruptMetadata(_))
        ));
    }

    #[test]
    fn the_count_of_used_clusters_follows_every_record_without_a_scan() {
        let mut m = PoolMeta::new(CS, 32);
        let recount = |m: &PoolMeta| m.refs.iter().filter(|r| **r > 0).count() as u64;
        let mut live = vec![create(&mut m, 8 * u64::from(CS))];
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for step in 0..2000u32 {
            let v = live[next(live.len() as u64) as usize];
            let writable = !m.volumes[&v].is_snapshot();
            let r = match next(6) {
                0..=2 if writable => Record::Map {
                    volume: v,
                    logical: next(8) as u32,
                    physical: next(32) as u32,
                },
                3 if writable => Record::Unmap {
                    volume: v,
                    logical: next(8) as u32,
                },
                4 if live.len() < 6 => {
                    let snapshot = Uuid::new_v4();
                    live.push(snapshot);
                    match writable {
                        true => Record::Snapshot {
                            replica: v,
                            snapshot,
                            created: 1,
                        },
                        false => Record::Clone {
                            snapshot: v,
                            replica: snapshot,
                            created: 1,
                            share: None,
                        },
                    }
                }
                5 if live.len() > 1 => {
                    live.retain(|x| *x != v);
                    Record::Destroy { volume: v }
                }
                _ => continue,
            };
            m.apply(&r).unwrap();
            assert_eq!(m.used_clusters(), recount(&m), "after step {step}: {r:?}");
        }
        let encoded = serde_json::to_vec(&m).unwrap();
        let back: PoolMeta = serde_json::from_slice(&encoded).unwrap();
        let back = back.load(CS, 32).unwrap();
        assert_eq!(back.used_clusters(), m.used_clusters());
    }
}
