//! Names every Keelson process builds the same way: NQNs of volumes, replicas and node hosts, nexus child URIs, and
//! target addresses.
//! The engine parses what the control plane builds here.

/// The NQN prefix of everything Keelson exports.
pub const NQN_PREFIX: &str = "nqn.2026-11.io.keelson:";

/// The gRPC metadata key of a ReportPathFailure refusal because the volume is not published to the reporting host
/// (its value: that host NQN).
pub const NOT_PUBLISHED_TO: &str = "keelson-not-published-to";

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

/// The host NQN the Linux kernel on `node` connects to volumes with (the CSI node plugin sets it; the controller
/// publishes volumes to it). Not `node_host_nqn`: a kernel host must never reach replicas directly.
pub fn kernel_host_nqn(node: &str) -> String {
    format!("{NQN_PREFIX}host-{node}")
}

/// The topology key of a node: CSI's accessible topology, and a label every node carries for placement.
pub const TOPOLOGY_NODE_KEY: &str = "topology.keelson.io/node";

/// The child URI of a replica on the nexus's own node.
pub fn local_child_uri(replica_uuid: &str) -> String {
    format!("local:///{}", replica_nqn(replica_uuid))
}

/// A target's address as `ip:port` (`[ip]:port` for IPv6), from `ip:port` or the form the Linux host writes in sysfs
/// (`traddr=10.0.0.1,trsvcid=4420,src_addr=...`): how a node agent reports a path and the cluster agent records it.
pub fn target_address(a: &str) -> String {
    let field = |k: &str| {
        a.split(',')
            .find_map(|f| f.trim().strip_prefix(k))
            .map(str::to_string)
    };
    match (field("traddr="), field("trsvcid=")) {
        // An IPv6 address in brackets, as socket addresses and listeners write it.
        (Some(ip), Some(port)) if ip.contains(':') => format!("[{ip}]:{port}"),
        (Some(ip), Some(port)) => format!("{ip}:{port}"),
        _ => a.trim().to_string(),
    }
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

    #[test]
    fn the_kernels_address_form_and_ip_port_are_one_address() {
        assert_eq!(
            target_address("traddr=10.200.0.1,trsvcid=4420,src_addr=10.200.0.2"),
            "10.200.0.1:4420"
        );
        assert_eq!(target_address(" 127.0.0.2:4420 "), "127.0.0.2:4420");
        assert_eq!(
            target_address("traddr=fd00::1,trsvcid=4420,src_addr=fd00::2"),
            "[fd00::1]:4420",
            "as an IPv6 listener is written"
        );
        assert_eq!(target_address("trsvcid=4420"), "trsvcid=4420");
    }
}
