//! The NVMe/TCP initiator (host side): connects to a subsystem with an admin queue and N I/O queues, keeps the
//! association alive, reconnects with backoff, and exposes a remote namespace as a [`BlockDevice`]. The nexus
//! reaches remote replicas through it; `nvmf-perf` measures the target with it.
//!
//! - [`queue`]: one TCP connection: command IDs, R2T answering, C2H data reassembly.
//! - [`controller`]: admin bring-up (Connect, CC.EN, Identify, queues), I/O queues, keep-alive.
//! - [`namespace`]: [`namespace::RemoteNamespace`], the `BlockDevice` with reconnect.
//! - [`discovery`]: reads a discovery controller's log.
//!
//! [`BlockDevice`]: crate::block::BlockDevice

pub mod controller;
pub mod discovery;
pub mod namespace;
pub mod queue;
pub mod reservation;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::io_threads::IoThreads;
use crate::protocol::status::Status;

#[derive(Debug, thiserror::Error, Clone)]
pub enum InitiatorError {
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("protocol violation by the target: {0}")]
    Protocol(String),
    #[error("command failed: {0}")]
    Status(Status),
    #[error("connection lost")]
    Disconnected,
    #[error("command timed out")]
    Timeout,
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub addr: SocketAddr,
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// I/O queues to ask for.
    pub io_queues: u16,
    /// Entries per I/O queue (outstanding commands per queue).
    pub queue_depth: u16,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Keep-alive timeout sent in Connect; keep-alives go out every half of it. Zero disables keep-alive.
    pub kato: Duration,
    /// How long one command may take before the connection is declared dead.
    pub command_timeout: Duration,
    /// Where the I/O queues run: queue `i` on I/O thread `i`; none: the runtime that connects.
    pub io_threads: Option<Arc<IoThreads>>,
}

impl ConnectOptions {
    pub fn new(addr: SocketAddr, subnqn: &str) -> ConnectOptions {
        let hostid = *uuid::Uuid::new_v4().as_bytes();
        ConnectOptions {
            addr,
            subnqn: subnqn.to_string(),
            hostnqn: format!(
                "nqn.2014-08.org.nvmexpress:uuid:{}",
                uuid::Uuid::from_bytes(hostid)
            ),
            hostid,
            io_queues: 1,
            queue_depth: 128,
            header_digest: false,
            data_digest: false,
            kato: Duration::from_secs(5),
            command_timeout: Duration::from_secs(30),
            io_threads: None,
        }
    }
}
