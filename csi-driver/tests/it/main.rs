//! The CSI driver against a real cluster agent and io-engines, over its Unix socket: every Controller and Identity
//! call, each rule of the CSI spec it must keep (idempotency, error codes, paging, capacity, snapshots, clones,
//! volume condition). Needs the workspace's binaries built (`cargo build --workspace --bins`; the test script does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller;
mod harness;
mod identity;
mod snapshots;
