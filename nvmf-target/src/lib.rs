//! Keelson's data plane: a userspace NVMe/TCP target and initiator on tokio.
//!
//! - [`protocol`]: NVMe and NVMe/TCP wire formats (pure).
//! - [`block`]: the [`block::BlockDevice`] seam and its backends (memory, file, fault-injecting).
//! - [`metrics`]: the Prometheus `/metrics` endpoint, read from the engine at scrape time.
//! - [`nexus`]: a replicated device over N children: fan-out writes, round-robin reads, faults, rebuilds.
//! - [`pool`]: pools on a file or block device: thin replicas, snapshots, clones, crash-safe metadata.
//! - [`rebuild`]: copies a device onto another while I/O goes on (full or only marked segments).
//! - [`target`]: the NVMe/TCP server: listeners, connections, controllers, subsystems, discovery, ANA.
//! - [`transport`]: socket helpers shared by target and initiator.
//! - [`io_threads`]: the threads the data path runs on (target connections, the initiator's I/O queues).
//! - [`config`]: export specs and sizes for io-engine's flags and config file.
//! - [`engine`]: owns the target and what backs each namespace; the one place that wires them.
//! - [`api`]: the engine gRPC API over [`engine::Engine`].

pub mod api;
pub mod block;
pub mod config;
pub mod engine;
pub mod initiator;
pub mod io_threads;
pub mod metrics;
pub mod nexus;
pub mod pool;
pub mod protocol;
pub mod rebuild;
pub mod target;
pub mod transport;
