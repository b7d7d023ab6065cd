//! Generated gRPC contracts. Processes in Keelson talk to each other only through these types.
//!
//! - [`engine`]: the management API of `io-engine` (subsystems, namespaces, listeners, hosts, ANA).
//! - [`cluster`]: the cluster agent's API (the node registry, pools and volumes).
//! - [`csi`]: the Container Storage Interface, as Kubernetes' sidecars and kubelet speak it.
//! - [`unix`]: dialling a gRPC server on a Unix socket (a CSI plugin).
//! - [`names`]: NQNs and child URIs every process builds the same way.
//! - [`leader`]: how a cluster agent that does not lead refuses, as its clients tell it.

#![allow(clippy::all, missing_docs)]

pub mod leader;
pub mod names;
pub mod unix;

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
