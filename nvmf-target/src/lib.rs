//! Keelson's data plane: a userspace NVMe/TCP target and initiator on tokio.
//!
//! - [`protocol`]: NVMe and NVMe/TCP wire formats (pure).
//! - [`block`]: the [`block::BlockDevice`] seam and its backends (memory, file, fault-injecting).
//! - [`target`]: the NVMe/TCP server: listeners, connections, controllers, subsystems, discovery, ANA.
//! - [`initiator`]: the NVMe/TCP client, exposing a remote namespace as a `BlockDevice`.
//! - [`api`]: the engine gRPC API over the target.

pub mod block;
pub mod protocol;
