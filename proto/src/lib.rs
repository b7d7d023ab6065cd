//! Generated gRPC contracts. Processes in Keelson talk to each other only through these types.
//!
//! - [`engine`]: the management API of `io-engine` (subsystems, namespaces, listeners, hosts, ANA).

#![allow(clippy::all, missing_docs)]

/// `keelson.engine.v1`: the management API served by every `io-engine`.
pub mod engine {
    tonic::include_proto!("keelson.engine.v1");
}
