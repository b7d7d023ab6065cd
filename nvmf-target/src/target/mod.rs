//! The NVMe/TCP target: listeners (ports), NVM subsystems with their namespaces and host allow-lists, the discovery
//! subsystem, controllers and their queues, and ANA state per port. [`Target`] is the handle the engine and the
//! management API use; the modules below it each own one part of the protocol.
//!
//! The target knows block devices, never pools or nexuses.

pub mod access;
mod admin;
pub mod ana;
mod connection;
pub mod controller;
mod discovery;
mod fabrics;
mod inflight;
mod io;
#[cfg(test)]
mod io_tests;
mod listener;
pub mod reservation;
mod response;
pub mod stats;
pub mod subsystem;
mod writer;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::block::BlockDevice;
use crate::io_threads::IoThreads;
use crate::protocol::log::AnaState;
use crate::protocol::nqn::Nqn;

use ana::{AnaTable, MAX_GROUPS};
use subsystem::{Subsystem, SubsystemKind};

/// Errors of target management calls.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("exhausted: {0}")]
    Exhausted(String),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Tunables of the target.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// Controller IDs this node hands out; give every node serving a subsystem a disjoint range.
    pub cntlid_min: u16,
    pub cntlid_max: u16,
    /// Queue entries allowed per queue (MQES + 1, MAXCMD).
    pub queue_entries: u16,
    /// I/O queues per controller.
    pub max_io_queues: u16,
    /// In-capsule data accepted on I/O queues (IOCCSZ = this / 16 + 4).
    pub in_capsule_data: u32,
    /// Largest H2CData payload (MAXH2CDATA).
    pub maxh2cdata: u32,
    /// Maximum data transfer size as a power of two of 4 KiB pages.
    pub mdts: u8,
    /// The threads that serve accepted connections ([`crate::io_threads`]); none: the runtime that runs the target.
    pub io_threads: Option<Arc<IoThreads>>,
}

impl Default for TargetConfig {
    fn default() -> TargetConfig {
        TargetConfig {
            cntlid_min: 1,
            cntlid_max: 0xFFEF,
            queue_entries: 128,
            max_io_queues: 64,
            // Writes up to 128 KiB come inside their command, which saves each one a round trip (the R2T and its
            // answer): 128 KiB writes to a pool replica went from 263 to 198 us at QD1 on the 2-core machine, 16 KiB
            // writes at QD8 from 20.7k to 29.4k per second. It exposes no more memory than R2T does: every write
            // gets its R2T at once, for up to `maxh2cdata`.
            in_capsule_data: 128 << 10,
            // As large as the largest transfer: a write's data comes in one H2CData PDU, received page-aligned
            // straight into the buffer the backing file is written from (as Linux's own target does).
            maxh2cdata: 4 << 20,
            // 4 MiB: a rebuild copies a whole pool cluster in one command, so the destination allocates it
            // with one write (no zeroing around partial writes, no waiting behind the first of four).
            mdts: 10,
            io_threads: None,
        }
    }
}

impl TargetConfig {
    /// Largest transfer of one command, in bytes.
    pub fn max_transfer(&self) -> u64 {
        4096u64 << self.mdts
    }
}

/// A listener as reported to callers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerInfo {
    pub port_id: u16,
    pub address: SocketAddr,
}

struct Port {
    info: ListenerInfo,
    cancel: CancellationToken,
}

/// State shared by every task of the target.
pub(crate) struct Shared {
    config: TargetConfig,
    subsystems: RwLock<BTreeMap<String, Arc<Subsystem>>>,
    discovery: Arc<Subsystem>,
    ports: RwLock<BTreeMap<u16, Port>>,
    ana: AnaTable,
    generation: AtomicU64,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Shared {
    fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        if nqn == self.discovery.nqn.as_str() {
            return Some(self.discovery.clone());
        }
        self.subsystems
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(nqn)
            .cloned()
    }

    fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.subsystems
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn listeners(&self) -> Vec<ListenerInfo> {
        self.ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|p| p.info.clone())
            .collect()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The discovery log changed: bump its generation and tell discovery controllers.
    fn discovery_changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        for c in self.discovery.controllers() {
            c.discovery_changed();
        }
    }
}

/// What a new subsystem looks like.
#[derive(Clone, Debug)]
pub struct SubsystemSpec {
    pub nqn: Nqn,
    /// Empty: derived from the NQN (the same on every node).
    pub serial: String,
    pub model: String,
    pub allow_any_host: bool,
    pub allowed_hosts: Vec<String>,
    /// A host reaches this subsystem through one controller at a time: a reservation change through a controller
    /// first ends the host's other controllers of it, whose commands not yet admitted are then refused. For a
    /// replica, whose one host is a nexus with one controller to it, and a second only when it replaces the first:
    /// a controller the nexus gave up on (a connection lost, or stalled past its I/O timeout while its keep-alives
    /// passed) may still hold writes on their way, and none may land once the nexus has opened the replica again
    /// (a rejoin, or its initiator's reconnect, each taking the reservation again) and writes over them.
    /// Not for a volume's subsystem, whose Linux hosts keep a controller per path.
    pub single_path: bool,
}

/// The NVMe/TCP target of one node.
#[derive(Clone)]
pub struct Target {
    shared: Arc<Shared>,
}

fn serial_from(nqn: &Nqn) -> String {
    // FNV-1a of the NQN: stable across nodes and restarts, 16 hex digits fit SN's 20 bytes.
    let h = nqn.as_str().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

impl Target {
    pub fn new(config: TargetConfig) -> Target {
        let discovery = Arc::new(Subsystem::new(
            Nqn::discovery(),
            "discovery".into(),
            "Keelson discovery".into(),
            SubsystemKind::Discovery,
            true,
            false,
        ));
        Target {
            shared: Arc::new(Shared {
                config,
                subsystems: RwLock::new(BTreeMap::new()),
                discovery,
                ports: RwLock::new(BTreeMap::new()),
                ana: AnaTable::default(),
                generation: AtomicU64::new(1),
                cancel: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        }
    }

    pub fn config(&self) -> &TargetConfig {
        &self.shared.config
    }

    /// Starts listening on `address` (port 0 picks a free port). `port_id` 0 takes the next free ID.
    pub async fn add_listener(
        &self,
        address: SocketAddr,
        port_id: u16,
    ) -> Result<ListenerInfo, TargetError> {
        if let Some(l) = self.listeners().into_iter().find(|l| l.address == address) {
            if port_id == 0 || port_id == l.port_id {
                return Ok(l);
            }
            return Err(TargetError::AlreadyExists(format!(
                "listener on {address} has port id {}",
                l.port_id
            )));
        }
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| TargetError::Listen { address, source })?;
        let address = listener
            .local_addr()
            .map_err(|source| TargetError::Listen { address, source })?;
        let mut ports = self.shared.ports.write().unwrap_or_else(|e| e.into_inner());
        let port_id = if port_id == 0 {
            (1..=u16::MAX).find(|p| !ports.contains_key(p)).unwrap_or(0)
        } else {
            port_id
        };
        if port_id == 0 || ports.contains_key(&port_id) {
            return Err(TargetError::AlreadyExists(format!("port id {port_id}")));
        }
        let info = ListenerInfo { port_id, address };
        let cancel = self.shared.cancel.child_token();
        ports.insert(
            port_id,
            Port {
                info: info.clone(),
                cancel: cancel.clone(),
            },
        );
        drop(ports);
        self.shared.tracker.spawn(listener::accept_loop(
            self.shared.clone(),
            listener,
            port_id,
            cancel,
        ));
        tracing::info!(port_id, %address, "listening");
        self.shared.discovery_changed();
        Ok(info)
    }

    /// Stops a listener and closes every connection that came through it.
    pub fn remove_listener(&self, port_id: u16) -> Result<(), TargetError> {
        let port = self
            .shared
            .ports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&port_id);
        let port = port.ok_or_else(|| TargetError::NotFound(format!("port {port_id}")))?;
        port.cancel.cancel();
        self.shared.ana.remove_port(port_id);
        self.shared.discovery_changed();
        Ok(())
    }

    pub fn listeners(&self) -> Vec<ListenerInfo> {
        self.shared.listeners()
    }

    /// Creates a subsystem; the same spec again returns the existing one.
    pub fn create_subsystem(&self, spec: SubsystemSpec) -> Result<Arc<Subsystem>, TargetError> {
        if spec.nqn.is_discovery() {
            return Err(TargetError::InvalidArgument(
                "the discovery NQN is reserved".into(),
            ));
        }
        for h in &spec.allowed_hosts {
            Nqn::parse(h).map_err(|e| TargetError::InvalidArgument(format!("host NQN: {e}")))?;
        }
        let serial = if spec.serial.is_empty() {
            serial_from(&spec.nqn)
        } else {
            spec.serial.clone()
        };
        if serial.len() > 20 || !serial.is_ascii() {
            return Err(TargetError::InvalidArgument(
                "serial must be at most 20 ASCII characters".into(),
            ));
        }
        let model = if spec.model.is_empty() {
            "Keelson".to_string()
        } else {
            spec.model.clone()
        };
        if model.len() > 40 || !model.is_ascii() {
            return Err(TargetError::InvalidArgument(
                "model must be at most 40 ASCII characters".into(),
            ));
        }
        let mut subs = self
            .shared
            .subsystems
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(s) = subs.get(spec.nqn.as_str()) {
            let mut hosts = spec.allowed_hosts.clone();
            hosts.sort();
            hosts.dedup();
            if s.serial == serial
                && s.model == model
                && s.allow_any_host() == spec.allow_any_host
                && s.allowed_hosts() == hosts
                && s.single_path == spec.single_path
            {
                return Ok(s.clone());
            }
            return Err(TargetError::AlreadyExists(format!(
                "subsystem {} with other parameters",
                spec.nqn
            )));
        }
        let s = Arc::new(Subsystem::new(
            spec.nqn.clone(),
            serial,
            model,
            SubsystemKind::Nvm,
            spec.allow_any_host,
            spec.single_path,
        ));
        for h in &spec.allowed_hosts {
            s.allow_host(h);
        }
        subs.insert(spec.nqn.to_string(), s.clone());
        drop(subs);
        tracing::info!(nqn = %spec.nqn, "subsystem created");
        self.shared.discovery_changed();
        Ok(s)
    }

    /// Deletes a subsystem and disconnects its controllers.
    pub fn delete_subsystem(&self, nqn: &str) -> Result<(), TargetError> {
        let s = self
            .shared
            .subsystems
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(nqn);
        let s = s.ok_or_else(|| TargetError::NotFound(format!("subsystem {nqn}")))?;
        for c in s.controllers() {
            c.shutdown("subsystem deleted");
        }
        tracing::info!(nqn, "subsystem deleted");
        self.shared.discovery_changed();
        Ok(())
    }

    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.shared
            .subsystems
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(nqn)
            .cloned()
    }

    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.shared.subsystems()
    }

    fn nvm_subsystem(&self, nqn: &str) -> Result<Arc<Subsystem>, TargetError> {
        self.subsystem(nqn)
            .ok_or_else(|| TargetError::NotFound(format!("subsystem {nqn}")))
    }

    /// Adds a namespace backed by `device`; `nsid` 0 picks one. Returns the NSID.
    pub fn add_namespace(
        &self,
        nqn: &str,
        nsid: u32,
        uuid: uuid::Uuid,
        ana_group: u32,
        device: Arc<dyn BlockDevice>,
    ) -> Result<u32, TargetError> {
        self.nvm_subsystem(nqn)?
            .add_namespace(nsid, uuid, ana_group, device)
    }

    pub fn remove_namespace(&self, nqn: &str, nsid: u32) -> Result<(), TargetError> {
        self.nvm_subsystem(nqn)?.remove_namespace(nsid)
    }

    pub fn allow_host(&self, nqn: &str, host: &str) -> Result<(), TargetError> {
        Nqn::parse(host).map_err(|e| TargetError::InvalidArgument(format!("host NQN: {e}")))?;
        self.nvm_subsystem(nqn)?.allow_host(host);
        self.shared.discovery_changed();
        Ok(())
    }

    /// Lets `hosts` (or any host, if `any`) connect to subsystem `nqn` and no other, and tells discovery
    /// controllers. Hosts that stay allowed are never left out on the way (their controllers would be ended): any
    /// host first when that is the aim, the new hosts before the old go, any host off last.
    pub fn set_hosts(&self, nqn: &str, any: bool, hosts: &[String]) -> Result<(), TargetError> {
        for h in hosts {
            Nqn::parse(h).map_err(|e| TargetError::InvalidArgument(format!("host NQN: {e}")))?;
        }
        let sub = self.nvm_subsystem(nqn)?;
        if any {
            sub.set_allow_any_host(true);
        }
        for h in hosts {
            sub.allow_host(h);
        }
        let want: std::collections::BTreeSet<&String> = hosts.iter().collect();
        for h in sub.allowed_hosts() {
            if !want.contains(&h) {
                sub.disallow_host(&h);
            }
        }
        sub.set_allow_any_host(any);
        self.shared.discovery_changed();
        Ok(())
    }

    pub fn disallow_host(&self, nqn: &str, host: &str) -> Result<(), TargetError> {
        self.nvm_subsystem(nqn)?.disallow_host(host);
        self.shared.discovery_changed();
        Ok(())
    }

    /// Sets the ANA state of `group` as seen through `port_id`, and tells the hosts connected through that port.
    pub fn set_ana_state(
        &self,
        port_id: u16,
        group: u32,
        state: AnaState,
    ) -> Result<(), TargetError> {
        if group == 0 || group > MAX_GROUPS {
            return Err(TargetError::InvalidArgument(format!(
                "ANA group {group} is not in 1..={MAX_GROUPS}"
            )));
        }
        if !self
            .shared
            .ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&port_id)
        {
            return Err(TargetError::NotFound(format!("port {port_id}")));
        }
        if self.shared.ana.set(port_id, group, state) {
            tracing::info!(port_id, group, ?state, "ANA state changed");
            for s in self.subsystems() {
                for c in s.controllers().into_iter().filter(|c| c.port_id == port_id) {
                    c.ana_changed();
                }
            }
        }
        Ok(())
    }

    pub fn ana_state(&self, port_id: u16, group: u32) -> AnaState {
        self.shared.ana.state(port_id, group)
    }

    /// Closes every listener and connection and waits for their tasks.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}
