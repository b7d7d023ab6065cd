//! Integration tests of nvmf-target over real loopback TCP: the initiator against the target, a raw PDU client for
//! malformed input, the engine gRPC API, and the io-engine binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod bad_input;
mod binary;
mod disconnect;
mod disks;
mod durability;
mod edges;
mod events;
mod fencing;
mod flow_control;
mod harness;
mod initiator;
mod metrics;
mod ownership;
mod pools;
mod replication;
