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

/// The topology key of a node: CSI's accessible topology, and a label every node carries for placement. Its value
/// is [`topology_node_value`].
pub const TOPOLOGY_NODE_KEY: &str = "topology.keelson.io/node";

/// The longest topology value CSI and Kubernetes labels allow.
const TOPOLOGY_VALUE_MAX: usize = 63;

/// The value of [`TOPOLOGY_NODE_KEY`] for `node`: its name when that is a valid topology value (CSI's, the same as a
/// Kubernetes label value's: at most 63 characters of alphanumerics, `-`, `_` and `.`, beginning and ending with an
/// alphanumeric); else the name's first characters (others made `-`), a `-` and 16 hex digits of a hash of the
/// whole name. A node name may be up to 195 bytes (its host NQNs end there; a Kubernetes node name, up to 253,
/// beyond that can take no volume): with its name as the value, the kubelet could not label the node, and its node
/// plugin would never register.
pub fn topology_node_value(node: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let alnum = |c: char| c.is_ascii_alphanumeric();
    if node.len() <= TOPOLOGY_VALUE_MAX
        && node.chars().all(allowed)
        && node.starts_with(alnum)
        && node.ends_with(alnum)
    {
        return node.to_string();
    }
    let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, node.as_bytes())
        .simple()
        .to_string();
    let hash = &hash[..16];
    let head: String = node
        .chars()
        .map(|c| if allowed(c) { c } else { '-' })
        .take(TOPOLOGY_VALUE_MAX - 1 - hash.len())
        .collect();
    match head.trim_matches(|c: char| !alnum(c)) {
        "" => hash.to_string(),
        head => format!("{head}-{hash}"),
    }
}

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

    #[test]
    fn a_node_name_no_topology_value_can_be_gets_a_valid_one_of_its_own() {
        let valid = |v: &str| {
            v.len() <= 63
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())
        };
        assert_eq!(topology_node_value("worker-7"), "worker-7");
        let at_limit = "a".repeat(63);
        assert_eq!(topology_node_value(&at_limit), at_limit);
        let past = topology_node_value(&"a".repeat(64));
        assert!(valid(&past) && past.starts_with(&"a".repeat(46)), "{past}");
        assert!(valid(&topology_node_value("")));
        let wide = topology_node_value(&"é".repeat(100));
        assert!(valid(&wide), "{wide}");
        assert_eq!(topology_node_value(&past), past, "a value is its own value");
        // Kubernetes node names (DNS subdomains) past 63 characters, differing only at their ends.
        let long = |end: &str| {
            format!(
                "{}.{end}",
                "pool-a.rack-12.zone-b.example-cloud.internal".repeat(2)
            )
        };
        let (a, b) = (
            topology_node_value(&long("a")),
            topology_node_value(&long("b")),
        );
        assert!(valid(&a) && valid(&b), "{a} {b}");
        assert_ne!(a, b);
        assert!(a.starts_with("pool-a.rack-12."), "{a}");
        assert_eq!(a, topology_node_value(&long("a")), "the same on every call");
        for odd in ["-x-", "node_", "nœud-1", "--", "."] {
            let v = topology_node_value(odd);
            assert!(valid(&v), "{odd:?}: {v}");
        }
        assert_ne!(topology_node_value("--"), topology_node_value("."));
    }
}
