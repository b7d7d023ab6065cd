//! The node agent, on every node that mounts volumes: it watches the kernel's NVMe paths to Keelson's volumes,
//! reports a broken one to the cluster agent, connects the path to the replacement nexus the cluster agent answers
//! with, and removes the dead one.
//!
//! - [`sysfs`]: the kernel's view of Keelson's subsystems, controllers and paths (plain file reads).
//! - [`paths`]: which paths are broken and since when, from successive scans (pure).
//! - [`fabrics`]: connect through `/dev/nvme-fabrics`, delete through `delete_controller`.
//! - [`metrics`]: path states, switch-overs and their durations, for Prometheus.
//! - [`unpublished`]: removes the dead paths of a volume no longer published to this node.
//! - [`agent`]: the loop that ties them together.

pub mod agent;
pub mod fabrics;
pub mod metrics;
pub mod paths;
pub mod sysfs;
pub mod unpublished;
