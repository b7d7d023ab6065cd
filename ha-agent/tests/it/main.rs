//! Integration tests of the control plane: the store conformance suite on the embedded store and on a real etcd,
//! the schema check, and leader election.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod crash;
mod edges;
mod etcd;
mod expand;
mod heal;
mod keep;
mod leader;
mod metrics;
mod node_agent;
mod pools;
mod registry;
mod restart;
mod scenarios;
mod snapshots;
mod store;
mod switchover;
mod switchover_restart;
mod volumes;
