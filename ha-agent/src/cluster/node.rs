//! A storage node as the cluster agent keeps it: what its io-engine registered (spec) and what the agent observed
//! (state), stored as one JSON record under `/keelson/nodes/<name>`. Liveness itself (when a heartbeat last
//! arrived) stays in the leader's memory: only changes of state reach the store, not every heartbeat.

use serde::{Deserialize, Serialize};

/// Key prefix of node records.
pub const PREFIX: &str = "/keelson/nodes/";

pub fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub name: String,
    pub uuid: String,
    pub disk: String,
    pub capacity: u64,
    pub allocated: u64,
    pub committed: u64,
    /// I/O errors its disk returned since the engine imported it (non-zero: failing, nothing new goes there).
    #[serde(default)]
    pub disk_errors: u64,
    /// Its labels, as its io-engine declares them.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// What its replicas show hosts (512 in records from before it was kept).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Its disk had no room for a new cluster when last asked (a full file system under a pool file).
    #[serde(default)]
    pub disk_full: bool,
    /// Bytes the pool can still fill beyond `allocated` with the storage under a pool file (its file system's free
    /// space and the file's own unused space), rounded down by [`coarse_room`]; `None` for a block device (or an
    /// engine that did not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_room: Option<u64>,
    /// Bytes of new replicas the pool can still take, as its engine tells it (free clusters and `disk_room`, less
    /// what its replicas may still take: a snapshot's shared clusters are copied on their first overwrite), rounded
    /// down by [`coarse_replica_room`]; `None` from an older engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_room: Option<u64>,
    /// Which state of the pool these figures are of, as its engine tells it: (import incarnation, metadata changes
    /// applied since); `None` from an older engine. Placement's promises end once it reaches a new replica's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<(u64, u64)>,
}

/// A pool's `disk_room` as node records keep it: rounded down to a step of a sixteenth to an eighth of it (at
/// least 64 MiB), so that a record changes when the room does by that much, not at every heartbeat after some
/// write on the file system.
pub fn coarse_room(room: u64) -> u64 {
    rounded(room, 64 << 20)
}

/// A pool's `replica_room` as node records keep it. Where it may move with the file system's free space (a pool
/// file with less room than its free capacity), rounded down to a step of a sixteenth to an eighth of it, at least
/// 1 MiB (a small pool's must not round to nothing); else exact: a block device's, or a pool file's that its free
/// capacity bounds, stays put under writes, and rounding it would keep replicas off capacity the pool has.
pub fn coarse_replica_room(room: u64, on_a_file: bool, free_capacity: u64) -> u64 {
    if !on_a_file || room >= free_capacity {
        room
    } else {
        rounded(room, 1 << 20)
    }
}

fn rounded(room: u64, least: u64) -> u64 {
    let step = (room / 16).next_power_of_two().max(least);
    room - room % step
}

impl PoolSpec {
    /// A pool as its engine lists it now, figures exact (for a decision that cannot wait for the next heartbeat:
    /// a clone placed just after the snapshot it copies shrank the room).
    pub fn from_engine(p: &proto::engine::Pool) -> PoolSpec {
        PoolSpec {
            name: p.name.clone(),
            uuid: p.uuid.clone(),
            disk: p.disk.clone(),
            capacity: p.capacity,
            allocated: p.allocated,
            committed: p.committed,
            disk_errors: p.disk_errors,
            labels: Default::default(),
            block_size: if p.block_size == 0 { 512 } else { p.block_size },
            disk_full: p.disk_full,
            disk_room: p.disk_room,
            replica_room: p.replica_room,
            generation: (p.incarnation > 0).then_some((p.incarnation, p.applied)),
        }
    }

    /// What the pool's replicas' sizes may add up to: its capacity, or less when the engine says it has room for
    /// less (`replica_room` beyond what its replicas have; from an older engine, the file system under a pool file:
    /// its allocated bytes and `disk_room`).
    pub fn usable_capacity(&self) -> u64 {
        match (self.replica_room, self.disk_room) {
            (Some(room), _) => self.capacity.min(self.committed.saturating_add(room)),
            (None, Some(room)) => self.capacity.min(self.allocated.saturating_add(room)),
            (None, None) => self.capacity,
        }
    }
}

fn default_block_size() -> u32 {
    512
}

/// What an io-engine says of itself when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub engine_endpoint: String,
    pub nvmf_listeners: Vec<String>,
    pub cntlid_min: u32,
    pub cntlid_max: u32,
    /// Which start of the io-engine process registered last.
    pub instance: String,
    /// The node's labels, as its io-engine declares them.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl NodeSpec {
    /// What selectors and topology segments match: its labels, and `topology.keelson.io/node` = its name, or for a
    /// name no topology value can be, one made from it (`proto::names::topology_node_value`, what the CSI node
    /// plugin reports), which no label overrides.
    pub fn placement_labels(&self) -> std::collections::BTreeMap<String, String> {
        let mut l = self.labels.clone();
        l.insert(
            proto::names::TOPOLOGY_NODE_KEY.into(),
            proto::names::topology_node_value(&self.name),
        );
        l
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Online,
    Offline,
}

/// What the agent observed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub state: NodeState,
    pub reason: String,
    /// When `state` last changed, milliseconds since the epoch.
    pub since_ms: u64,
    pub pools: Vec<PoolSpec>,
    /// The io-engine instance that last ended cleanly (deregistered after shutting its nexuses down, no write in
    /// flight); an instance that went silent instead ended uncleanly.
    #[serde(default)]
    pub clean_exit: Option<String>,
    /// The nexuses (by volume UUID) of that instance that did not drain as it shut down: they ended uncleanly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub torn_nexuses: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub spec: NodeSpec,
    pub status: NodeStatus,
    /// An operator's: the node gets no new replica or nexus.
    #[serde(default)]
    pub cordoned: bool,
    /// An operator's drain: cordoned, and its nexuses are being moved to other nodes.
    #[serde(default)]
    pub draining: bool,
}

impl NodeRecord {
    /// Whether the nexus of volume `volume` that engine `instance` ran ended cleanly: that instance shut down
    /// cleanly (deregistered after shutting its nexuses down) without naming it among those that did not drain, and
    /// another instance runs on the node now.
    pub fn nexus_ended_cleanly(&self, instance: &str, volume: &str) -> bool {
        self.spec.instance != instance
            && self.status.clean_exit.as_deref() == Some(instance)
            && !self.status.torn_nexuses.iter().any(|t| t == volume)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<NodeRecord, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether `name` can be a node name: what Kubernetes allows (a DNS subdomain: 1-253 characters of lower-case
/// letters, digits, '-' and '.'), so it also works as a store key.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_room_is_kept_coarse_so_records_change_with_the_room_not_with_every_write() {
        const M: u64 = 1 << 20;
        const G: u64 = 1 << 30;
        // 45 GiB free: steps of 4 GiB; a few MiB written or freed change nothing.
        assert_eq!(coarse_room(45 * G), 44 * G);
        assert_eq!(coarse_room(45 * G - 5 * M), 44 * G);
        assert_eq!(coarse_room(45 * G + 7 * M), 44 * G);
        // Small rooms: steps of 64 MiB, never more than there is.
        assert_eq!(coarse_room(100 * M), 64 * M);
        assert_eq!(coarse_room(10 * M), 0);
        for r in [0, 1, 63 * M, 3 * G + 1, 100 * G, u64::MAX / 2] {
            assert!(coarse_room(r) <= r, "{r}");
            assert!(r < 64 * M || coarse_room(r) >= r - r / 7, "{r}");
        }
        // A pool's room for replicas: exact where its free capacity bounds it or it is a block device (a 100 GiB
        // pool keeps all of it); rounded where a file system's room may move it, small figures kept.
        assert_eq!(
            coarse_replica_room(99 * G + 5, true, 99 * G + 5),
            99 * G + 5
        );
        assert_eq!(coarse_replica_room(99 * G + 5, false, 200 * G), 99 * G + 5);
        assert_eq!(coarse_replica_room(28 * M, true, G), 28 * M);
        assert_eq!(coarse_replica_room(10 * M + 5, true, G), 10 * M);
        assert_eq!(coarse_replica_room(45 * G + 7 * M, true, 100 * G), 44 * G);
        assert_eq!(coarse_replica_room(M - 1, true, G), 0);
    }

    #[test]
    fn node_names_are_dns_subdomains() {
        assert!(valid_name("node-1.example"));
        assert!(!valid_name(""));
        assert!(!valid_name("Node"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("-a"));
        assert!(!valid_name(&"a".repeat(254)));
    }

    #[test]
    fn records_round_trip() {
        let r = NodeRecord {
            spec: NodeSpec {
                name: "n1".into(),
                engine_endpoint: "http://127.0.0.1:1".into(),
                nvmf_listeners: vec!["127.0.0.1:4420".into()],
                cntlid_min: 1,
                cntlid_max: 100,
                instance: "i".into(),
                labels: [("zone".to_string(), "a".to_string())].into(),
            },
            status: NodeStatus {
                state: NodeState::Online,
                reason: String::new(),
                since_ms: 5,
                pools: vec![],
                clean_exit: Some("h".into()),
                torn_nexuses: Vec::new(),
            },
            cordoned: true,
            draining: true,
        };
        assert_eq!(NodeRecord::decode(&r.encode()).unwrap(), r);
    }
}
