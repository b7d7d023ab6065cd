//! Generated gRPC contracts. Processes in Keelson talk to each other only through these types.
//!
//! - [`engine`]: the management API of `io-engine` (subsystems, namespaces, listeners, hosts, ANA).
//! - [`cluster`]: the cluster agent's API (the node registry, pools and volumes).
//! - [`csi`]: the Container Storage Interface, as Kubernetes' sidecars and kubelet speak it.
//! - [`unix`]: dialling a gRPC server on a Unix socket (a CSI plugin).
//! - [`names`]: NQNs and child URIs every process builds the same way.
//! - [`leader`]: how a cluster agent that does not lead refuses, as its clients tell it.
//! - [`READ_LEASE`]: the read lease an old nexus keeps and a new one waits out.

#![allow(clippy::all, missing_docs)]

pub mod leader;
pub mod names;
pub mod unix;

/// How long a nexus may serve reads on the strength of its children's last answers, and so how long the cluster
/// agent waits, after a new nexus fenced the children of one whose end it could not confirm, before the new one
/// takes writes. A nexus whose node is cut off from the cluster (not dead) still reaches its local replica, which the
/// new nexus cannot fence: it would go on serving reads from it, older than the new nexus's writes. So a nexus serves
/// a read only while every healthy remote child answered a command sent less than this long before the read ended
/// (a fenced child refuses every command with a Reservation Conflict, and then the nexus stops), and the agent
/// waits this long before the new nexus takes writes: every read the old nexus serves ends before any of them.
pub const READ_LEASE: std::time::Duration = std::time::Duration::from_secs(1);

/// `keelson.engine.v1`: the management API served by every `io-engine`.
pub mod engine {
    tonic::include_proto!("keelson.engine.v1");
}

/// `keelson.cluster.v1`: the cluster agent's API.
pub mod cluster {
    tonic::include_proto!("keelson.cluster.v1");
}

/// `csi.v1`: the Container Storage Interface (Identity, Controller, Node), written from the CSI spec (see the
/// header of `proto/csi.proto` for the version); the CSI driver serves it.
pub mod csi {
    tonic::include_proto!("csi.v1");
}
