//! A volume as the cluster agent keeps it, one JSON record under `/keelson/volumes/<uuid>`: the spec (size,
//! replica count) and everything decided or done for it: the replicas placed (and whether the engine confirmed
//! each), the nexus (where, with which reservation key, published to whom). Every multi-step operation writes the
//! record before each engine call, so a crashed agent finds in it what to resume.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub const PREFIX: &str = "/keelson/volumes/";

pub fn key(uuid: &Uuid) -> String {
    format!("{PREFIX}{uuid}")
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub size: u64,
    pub replicas: u32,
    /// Where its replicas may go.
    #[serde(default)]
    pub placement: Placement,
    /// Made from this snapshot (its replicas are clones of the snapshot's copies).
    #[serde(default)]
    pub source_snapshot: Option<Uuid>,
    /// Made from this volume (through a snapshot of it taken for the purpose, `source_snapshot`).
    #[serde(default)]
    pub source_volume: Option<Uuid>,
    /// Kept for its creator, opaque to the agent (the CSI driver's volume context: its file system).
    #[serde(default)]
    pub context: BTreeMap<String, String>,
}

impl VolumeSpec {
    /// Whether creating the volume again with `asked` asks for this one: the same spec, except that a volume kept
    /// without a context (made by keelctl, or before contexts were kept) takes any.
    pub fn matches(&self, asked: &VolumeSpec) -> bool {
        self.context.is_empty()
            && *self
                == VolumeSpec {
                    context: BTreeMap::new(),
                    ..asked.clone()
                }
            || self == asked
    }
}

/// Constraints on where a volume's replicas go, by node labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// A replica's node carries every one of these labels.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// A replica's node matches one of these segments (every label of it); empty: any node.
    #[serde(default)]
    pub topology: Vec<BTreeMap<String, String>>,
    /// A replica's pool carries every one of these labels.
    #[serde(default)]
    pub pool_selector: BTreeMap<String, String>,
}

impl Placement {
    /// Whether a pool with `labels` may hold a replica.
    pub fn admits_pool(&self, labels: &BTreeMap<String, String>) -> bool {
        self.pool_selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }

    /// Whether a node with `labels` ([`super::node::NodeSpec::placement_labels`]) may hold a replica; `Err` says
    /// why not. A node's topology label may be named by its value or by the node's name (they differ for a name no
    /// label value can be: `proto::names::topology_node_value`).
    pub fn admits(&self, labels: &BTreeMap<String, String>) -> Result<(), String> {
        let has = |(k, v): (&String, &String)| {
            labels.get(k) == Some(v)
                || (k == proto::names::TOPOLOGY_NODE_KEY
                    && labels.get(k) == Some(&proto::names::topology_node_value(v)))
        };
        if let Some((k, v)) = self.node_selector.iter().find(|kv| !has(*kv)) {
            return Err(format!("lacks the node selector's label {k}={v}"));
        }
        if !self.topology.is_empty() && !self.topology.iter().any(|seg| seg.iter().all(has)) {
            return Err("is in none of the volume's topology segments".into());
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumePhase {
    /// Placed and recorded; replicas being created.
    Creating,
    Created,
    /// Nexus and replicas being destroyed.
    Deleting,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub uuid: Uuid,
    pub node: String,
    pub pool: String,
    /// The engine confirmed the replica exists.
    pub created: bool,
    /// When the replica last rejoined the nexus after a fault (milliseconds since the epoch; 0: never). A replica
    /// that faults again soon after is replaced, not rejoined once more.
    #[serde(default)]
    pub rejoined_ms: u64,
    /// Holds every acknowledged write, as far as the agent knows: created with the volume, or seen Healthy in the
    /// nexus since. (A volume made from a snapshot with too few usable copies has replicas made empty beside its
    /// clones: out of sync from the start, and made empty, not cloned, for that reason.) Cleared (and recorded) before it is added to a nexus to be rebuilt, when a nexus is made
    /// without it, and when it is seen faulted or rebuilding. Only such replicas make up a new nexus; the others
    /// join it afterwards and are rebuilt.
    #[serde(default = "in_sync_by_default")]
    pub synced: bool,
    /// Recorded out of sync by a fault the agent consented to, which the nexus applies only once the answer reaches
    /// it: until the nexus shows the child not healthy (faulted, or rebuilding), a listing that still shows it
    /// healthy is from before the fault and does not count it in sync again. Only for the nexus that asked: cleared
    /// when a nexus is made without the replica and when the replica is added or rejoined to be rebuilt, or a later
    /// nexus that rebuilt it and shows it Healthy would never count it in sync.
    #[serde(default)]
    pub fault_confirmed: bool,
}

/// Records from before `synced` existed: their replicas were made with the volume or seen healthy.
fn in_sync_by_default() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NexusRecord {
    pub node: String,
    /// This nexus's reservation key; a later nexus preempts it.
    pub key: u64,
    pub host_nqn: String,
    /// The engine confirmed the nexus is created and published.
    pub published: bool,
    pub nqn: String,
    pub addresses: Vec<String>,
    /// The io-engine instance (one start of the process) the nexus was made in: if that instance ended cleanly,
    /// so did the nexus.
    #[serde(default)]
    pub instance: String,
    /// Other hosts the nexus is exported to (multi-host publishes: a raw block volume several nodes write).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_hosts: Vec<String>,
    /// An unpublish began (recorded before the nexus is ended): the nexus is ended, never made again nor published
    /// again; healing, or the next publish, finishes the unpublish (`Volumes::end_publication`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unpublishing: bool,
    /// Its engine ended it cleanly (drained: every acknowledged write is on each of its children), recorded before
    /// the next nexus is made: that one needs no resync, even if the agent making it dies first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ended_clean: bool,
}

impl NexusRecord {
    /// Every host the nexus is exported to, `host_nqn` first.
    pub fn hosts(&self) -> Vec<String> {
        std::iter::once(self.host_nqn.clone())
            .chain(self.more_hosts.iter().cloned())
            .collect()
    }

    pub fn has_host(&self, host: &str) -> bool {
        self.host_nqn == host || self.more_hosts.iter().any(|h| h == host)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub uuid: Uuid,
    pub spec: VolumeSpec,
    pub phase: VolumePhase,
    pub replicas: Vec<ReplicaRecord>,
    pub nexus: Option<NexusRecord>,
    /// The highest reservation key any nexus of this volume was given.
    pub last_key: u64,
    /// The key of the last nexus the engine confirmed: the one holding the replicas' reservations, which the next
    /// nexus preempts (0: none yet).
    #[serde(default)]
    pub fence_key: u64,
    /// Why the last operation did not finish, if it did not.
    pub reason: String,
    /// The last nexus did not end cleanly (its engine was killed, or it was left fenced on a node that was down):
    /// writes in flight may have reached some replicas and not others, so the next nexus resyncs them from one.
    #[serde(default)]
    pub resync: bool,
    /// A switch-over in flight: the nexus is moving off `from` because a host reported its path broken.
    #[serde(default)]
    pub switchover: Option<SwitchoverRecord>,
    /// An expansion in flight: the spec already has the new size; what is grown so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub growth: Option<GrowthRecord>,
    /// The volume's first publication (to a host while it had none) asked for a mode several nodes may share:
    /// only then may more hosts be added.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// The block size of its replicas' pools, one for all as its nexus needs (0 in records from before it was
    /// kept: then the pools of its replicas say).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub block_size: u32,
    /// The key of a nexus with no healthy child whose restart from the replicas in sync was recorded (their rejoin
    /// times stamped, which limits such restarts to one per `REJOIN_AGAIN_AFTER`): while the record still names
    /// that nexus, the restart was cut short (its agent died, the old nexus's destroy failed) and is finished
    /// without waiting that limit out (0: none).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub restarting_key: u64,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

impl VolumeRecord {
    /// The block size a new replica of this volume must have: the record's, or that of its replicas' pools.
    pub fn replica_block_size(&self, nodes: &[super::node::NodeRecord]) -> Option<u32> {
        if self.block_size != 0 {
            return Some(self.block_size);
        }
        super::scheduler::block_size_of(
            nodes,
            self.replicas
                .iter()
                .map(|x| (x.node.as_str(), x.pool.as_str())),
        )
    }
}

/// An expansion to `spec.size`, recorded before any engine is asked and after each stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrowthRecord {
    /// The size hosts saw before (the nexus's size until it grows).
    pub from: u64,
    /// Replicas their engines confirmed grown. Replicas created after the growth began have the new size already.
    pub grown: Vec<Uuid>,
    /// Those of `grown` created at the new size (replacements made by healing while the growth waited), not grown.
    #[serde(default)]
    pub born_grown: Vec<Uuid>,
}

impl GrowthRecord {
    /// Whether no replica that was there before the growth has grown yet: a refusal for good may still undo it (a
    /// replica created at the new size since is only larger than the volume then).
    pub fn none_grew_in_place(&self) -> bool {
        self.grown.iter().all(|u| self.born_grown.contains(u))
    }
}

/// A host's report that its path to the volume's nexus broke, recorded before anything moves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverRecord {
    /// The node whose nexus the host lost: the new nexus goes elsewhere and leaves out its replica.
    pub from: String,
    /// The reporting node and the address it lost.
    pub reporter: String,
    pub address: String,
    /// When the node agent saw the failure (ms since the epoch, its clock).
    pub seen_ms: u64,
    /// When the agent recorded the report (ms since the epoch).
    pub reported_ms: u64,
    /// How the old nexus ended, once its engine ended it: `Some(clean)`. `None`: not ended by its engine (it did not
    /// answer): it may still write to its node's replicas, which the new nexus therefore never uses. Kept across
    /// retries: an attempt after the one that ended it must know it may use those replicas (maybe the only copies).
    #[serde(default)]
    pub old_ended: Option<bool>,
    /// The attempt last started makes the new nexus without the old node's replicas, which are disowned once it is
    /// published (recorded before the publish, so an agent that dies after it disowns them when it resumes).
    #[serde(default)]
    pub old_replicas_left: bool,
}

impl VolumeRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<VolumeRecord, serde_json::Error> {
        serde_json::from_slice(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An expansion that waited while healing made a replacement at the new size is still undone by a refusal for
    /// good: only a replica that grew in place keeps it from being undone.
    #[test]
    fn a_replica_born_at_the_new_size_does_not_keep_a_growth_from_being_undone() {
        let (old, born) = (Uuid::new_v4(), Uuid::new_v4());
        let mut g = GrowthRecord {
            from: 1 << 20,
            grown: vec![born],
            born_grown: vec![born],
        };
        assert!(g.none_grew_in_place());
        g.grown.push(old);
        assert!(!g.none_grew_in_place());
        let before: GrowthRecord = serde_json::from_str(r#"{"from":1048576,"grown":[]}"#).unwrap();
        assert!(before.none_grew_in_place());
    }

    #[test]
    fn a_spec_matches_the_same_and_a_spec_kept_without_context_matches_any_context() {
        let xfs = VolumeSpec {
            size: 1 << 20,
            replicas: 3,
            context: labels(&[("fsType", "xfs")]),
            ..VolumeSpec::default()
        };
        let ext4 = VolumeSpec {
            context: labels(&[("fsType", "ext4")]),
            ..xfs.clone()
        };
        let none = VolumeSpec {
            context: BTreeMap::new(),
            ..xfs.clone()
        };
        assert!(xfs.matches(&xfs));
        assert!(!xfs.matches(&ext4));
        assert!(!xfs.matches(&none));
        assert!(none.matches(&xfs) && none.matches(&none));
        assert!(!none.matches(&VolumeSpec {
            replicas: 1,
            ..xfs.clone()
        }));
    }

    #[test]
    fn a_record_from_before_block_sizes_reads_as_unknown_and_a_known_one_is_kept() {
        let old = r#"{"uuid":"00000000-0000-4000-8000-000000000001","spec":{"size":1048576,"replicas":1},
            "phase":"Created","replicas":[],"nexus":null,"last_key":0,"reason":""}"#;
        let mut r: VolumeRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.block_size, 0);
        assert_eq!(r.replica_block_size(&[]), None);
        r.block_size = 4096;
        let back: VolumeRecord = serde_json::from_slice(&r.encode()).unwrap();
        assert_eq!(back.replica_block_size(&[]), Some(4096));
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn placement_admits_nodes_by_selector_and_topology() {
        let any = Placement::default();
        assert!(any.admits(&labels(&[])).is_ok());
        let p = Placement {
            node_selector: labels(&[("disk", "ssd")]),
            topology: vec![
                labels(&[("zone", "a")]),
                labels(&[("zone", "b"), ("rack", "1")]),
            ],
            pool_selector: labels(&[("media", "ssd")]),
        };
        assert!(p.admits_pool(&labels(&[("media", "ssd"), ("x", "y")])));
        assert!(!p.admits_pool(&labels(&[("media", "hdd")])));
        assert!(p.admits(&labels(&[("disk", "ssd"), ("zone", "a")])).is_ok());
        assert!(
            p.admits(&labels(&[("disk", "ssd"), ("zone", "b"), ("rack", "1")]))
                .is_ok()
        );
        assert_eq!(
            p.admits(&labels(&[("zone", "a")])),
            Err("lacks the node selector's label disk=ssd".into())
        );
        assert_eq!(
            p.admits(&labels(&[("disk", "ssd"), ("zone", "b")])),
            Err("is in none of the volume's topology segments".into())
        );
    }

    #[test]
    fn a_long_node_name_is_admitted_by_its_name_and_by_its_topology_value() {
        let name = "n".repeat(100);
        let value = proto::names::topology_node_value(&name);
        assert_ne!(value, name);
        let node = labels(&[(proto::names::TOPOLOGY_NODE_KEY, value.as_str())]);
        for asked in [&name, &value] {
            let by = |key: &str| labels(&[(key, asked.as_str())]);
            let selector = Placement {
                node_selector: by(proto::names::TOPOLOGY_NODE_KEY),
                ..Placement::default()
            };
            let topology = Placement {
                topology: vec![by(proto::names::TOPOLOGY_NODE_KEY)],
                ..Placement::default()
            };
            assert!(selector.admits(&node).is_ok(), "{asked}");
            assert!(topology.admits(&node).is_ok(), "{asked}");
        }
        let other = Placement {
            node_selector: labels(&[(proto::names::TOPOLOGY_NODE_KEY, "m".repeat(100).as_str())]),
            ..Placement::default()
        };
        assert!(other.admits(&node).is_err());
    }

    #[test]
    fn records_without_placement_still_decode() {
        let old = br#"{"size":512,"replicas":1}"#;
        let s: VolumeSpec = serde_json::from_slice(old).unwrap();
        assert_eq!(s.placement, Placement::default());
    }
}
