//! Generated gRPC contracts. Processes in Keelson talk to each other only through these types.
//!
//! - [`engine`]: the management API of `io-engine` (subsystems, namespaces, listeners, hosts, ANA).
//! - [`cluster`]: the cluster agent's API (the node registry, for io-engines and operators).

#![allow(clippy::all, missing_docs)]

/// `keelson.engine.v1`: the management API served by every `io-engine`.
pub mod engine {
    tonic::include_proto!("keelson.engine.v1");
}

/// `keelson.cluster.v1`: the cluster agent's API.
pub mod cluster {
    tonic::include_proto!("keelson.cluster.v1");
}
