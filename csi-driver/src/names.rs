//! CSI names and ids. A CreateVolume `name` (the CO's, e.g. `pvc-<uid>`) becomes the volume's UUID by a name-based
//! UUID (v5), so the same name always means the same volume: a retried CreateVolume finds what the first made, even
//! across driver restarts, with no table to keep. Snapshots likewise. A CSI node id is the Kubernetes node's name;
//! the kernel on that node connects with `proto::names::kernel_host_nqn(node)`.

use uuid::Uuid;

/// Namespace of volume names (any fixed UUID; it must never change).
const VOLUME_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_736f_4e00_8000_0000_0000_0001);
/// Namespace of snapshot names.
const SNAPSHOT_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_736f_4e00_8000_0000_0000_0002);

/// Longest name or id accepted (the CSI spec's size limit for strings it passes).
pub const MAX_NAME: usize = 128;

/// Longest node id accepted: the spec lets `NodeGetInfoResponse.node_id` (a Kubernetes node's name, up to 253
/// characters) exceed the general limit, up to 256 bytes, and the attacher passes it back as is.
pub const MAX_NODE_ID: usize = 256;

pub fn volume_uuid(name: &str) -> Uuid {
    Uuid::new_v5(&VOLUME_NAMESPACE, name.as_bytes())
}

pub fn snapshot_uuid(name: &str) -> Uuid {
    Uuid::new_v5(&SNAPSHOT_NAMESPACE, name.as_bytes())
}

/// The node a kernel host NQN belongs to (a volume's `host_nqn` when the CSI controller published it).
pub fn node_of_host(host_nqn: &str) -> Option<&str> {
    host_nqn
        .strip_prefix(proto::names::NQN_PREFIX)?
        .strip_prefix("host-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_stable_distinct_uuids() {
        assert_eq!(volume_uuid("pvc-1"), volume_uuid("pvc-1"));
        assert_ne!(volume_uuid("pvc-1"), volume_uuid("pvc-2"));
        assert_ne!(volume_uuid("x"), snapshot_uuid("x"));
        // Fixed forever: a changed namespace would orphan every existing volume.
        assert_eq!(
            volume_uuid("pvc-1").to_string(),
            Uuid::new_v5(&VOLUME_NAMESPACE, b"pvc-1").to_string()
        );
    }

    #[test]
    fn host_nqns_name_their_node() {
        let h = proto::names::kernel_host_nqn("worker-1");
        assert_eq!(node_of_host(&h), Some("worker-1"));
        assert_eq!(node_of_host(&proto::names::node_host_nqn("worker-1")), None);
        assert_eq!(node_of_host("nqn.2014-08.org.nvmexpress:uuid:1"), None);
    }
}
