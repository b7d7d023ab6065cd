//! Names every Keelson process builds the same way: NQNs of volumes, replicas and node hosts, and nexus child URIs.
//! The engine parses what the control plane builds here.

/// The NQN prefix of everything Keelson exports.
pub const NQN_PREFIX: &str = "nqn.2026-11.io.keelson:";

/// The subsystem a published volume is, `nqn...:vol-<uuid>`.
pub fn volume_nqn(uuid: &str) -> String {
    format!("{NQN_PREFIX}vol-{uuid}")
}

/// The subsystem a shared replica is, `nqn...:replica-<uuid>`.
pub fn replica_nqn(uuid: &str) -> String {
    format!("{NQN_PREFIX}replica-{uuid}")
}

/// The host NQN a nexus on `node` connects to its remote children with.
pub fn node_host_nqn(node: &str) -> String {
    format!("{NQN_PREFIX}node-{node}")
}

/// The child URI of a replica on the nexus's own node.
pub fn local_child_uri(replica_uuid: &str) -> String {
    format!("local:///{}", replica_nqn(replica_uuid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_formats() {
        assert_eq!(volume_nqn("u"), "nqn.2026-11.io.keelson:vol-u");
        assert_eq!(node_host_nqn("n1"), "nqn.2026-11.io.keelson:node-n1");
        assert_eq!(
            local_child_uri("r"),
            "local:///nqn.2026-11.io.keelson:replica-r"
        );
    }
}
