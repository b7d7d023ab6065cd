//! Keelson's CSI driver, `csi.keelson.io`: how Kubernetes provisions, attaches and snapshots Keelson volumes.
//! The CO's sidecars call it over a Unix socket; it turns CSI calls into the cluster agent's API, holding the CSI
//! spec's rules (idempotency, error codes, one call at a time per volume) on the way.
//!
//! - [`identity`]: the Identity service (plugin name, capabilities, Probe).
//! - [`controller`]: the Controller service (volumes, publishing to nodes, capacity, snapshots).
//! - [`node`]: the Node service (stage: connect, find the device, make a file system on a blank one, mount;
//!   publish: bind mounts; stats).
//! - [`kernel`]: the kernel's NVMe/TCP host: connect, find a volume's device by UUID, path state, disconnect.
//! - [`mounts`]: mountinfo, what a device holds, mkfs, mount and umount.
//! - [`params`]: StorageClass parameters and volume capabilities: what Keelson accepts, and why not.
//! - [`names`]: CSI names → Keelson UUIDs (deterministic, so a repeated call finds its volume), node ids ↔ host NQNs.
//! - [`agent`]: the cluster agent client (several addresses, failing over on UNAVAILABLE).
//! - [`serial`]: at most one call per volume or snapshot at a time (ABORTED for the others, as CSI asks).
//! - [`server`]: serves the services on a Unix socket.
//!
//! The CSI contract itself is `proto/proto/csi.proto` (package `csi.v1`), written from the CSI spec.

pub mod agent;
pub mod controller;
pub mod identity;
pub mod kernel;
pub mod mounts;
pub mod names;
pub mod node;
pub mod params;
pub mod serial;
pub mod server;

/// The driver's name, as Kubernetes' CSIDriver object and StorageClasses name it.
pub const DRIVER_NAME: &str = "csi.keelson.io";
