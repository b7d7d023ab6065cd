//! Keelson's control plane.
//!
//! - [`cluster`]: the cluster agent: its store (embedded or etcd, one [`cluster::store::Store`] trait), leader
//!   election among agents sharing a store, and, as they land, the registry of nodes, the volume model and the
//!   reconcilers that place, heal and scale volumes.
//!
//! - [`node`]: the node agent: the kernel's NVMe paths watched, broken ones reported, replacements connected.
//! - [`metrics_http`]: `/metrics` for both agents.
//!
//! The control plane talks to `io-engine` only through the engine API in the `proto` crate.

pub mod cluster;
pub mod metrics_http;
pub mod node;
