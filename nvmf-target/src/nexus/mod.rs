//! The nexus: a volume's device over N children (local replicas or remote namespaces). Writes go to every child
//! that takes writes and complete when all have; reads go round-robin over healthy children. A child whose I/O
//! fails or times out is faulted and gets no more I/O; children can be added (and are rebuilt while I/O goes on)
//! and removed online. The nexus is a [`BlockDevice`], so the target exports it like any namespace.
//!
//! - [`child`]: a child and its state.
//! - `io`: the I/O paths (fan-out, round robin, fault policy).
//! - `resync`: rebuild orchestration and history (the copy itself is in [`crate::rebuild`]).
//! - `recover`: a new nexus finds, on its children, what a previous nexus recorded about absent children, and
//!   rebuilds those (partially when it can).
//! - `snapshot`: crash-consistent volume snapshots (quiesce, flush, snapshot every healthy child).
//! - `gate`: faulting a child only with the cluster agent's consent ([`FaultGate`]).
//! - `grow`: online growth to the size the children were grown to.
//! - `lease`: reads served only while every healthy remote child answered within the read lease.

pub mod child;
mod gate;
mod grow;
mod io;
mod lease;
mod recover;
mod resync;
mod snapshot;

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::block::BlockDevice;
use crate::block::range_lock::RangeLock;
use crate::rebuild::{RebuildConfig, SegmentMap};

use child::{Child, ChildInfo, ChildState};
pub use gate::{FaultConsent, FaultGate, Fenced};
pub use lease::READ_LEASE;
pub use resync::{DURATION_BOUNDS, HISTORY_KEPT, RebuildKind, RebuildRecord, RebuildTotals};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NexusError {
    #[error("a nexus needs at least one child")]
    NoChildren,
    #[error("child {name}: block size {got} differs from the nexus's {want}")]
    BlockSize { name: String, got: u32, want: u32 },
    #[error("child {name} is {got} bytes, smaller than the nexus ({want} bytes)")]
    TooSmall { name: String, got: u64, want: u64 },
    #[error("child {0} already exists")]
    DuplicateChild(String),
    #[error("no child {0}")]
    NoSuchChild(String),
    #[error("removing {0} would leave no healthy child")]
    LastHealthyChild(String),
    #[error("no healthy child")]
    NoHealthyChild,
    #[error("snapshot of child {child} failed: {reason}")]
    Snapshot { child: String, reason: String },
    #[error("cannot grow to {size} bytes: {why}")]
    BadSize { size: u64, why: String },
    /// A child is not (yet) as large as the nexus is asked to grow to: grow it first.
    #[error("cannot grow to {want} bytes: child {name} is {got} bytes")]
    ChildNotGrown { name: String, got: u64, want: u64 },
    #[error("cannot grow while child {0} is being rebuilt")]
    Rebuilding(String),
    /// The nexus stopped (destroyed, or replaced by a newer one) while the request waited.
    #[error("the nexus stopped")]
    Stopped,
    /// A write waits for the cluster agent's consent to fault a child: a step that waits for every write (a
    /// snapshot, a growth) is given up, to be asked again (the agent answers once the step's call returned).
    #[error("a write waits for the cluster agent's consent to fault a child; ask again")]
    ConsentPending,
}

/// Volume-level state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NexusState {
    /// Every child healthy.
    Online,
    /// Some children healthy, others faulted or rebuilding.
    Degraded,
    /// No healthy child: I/O fails.
    Faulted,
    /// Shut down: I/O fails whatever the children's state.
    Shutdown,
}

/// Where a nexus says that one of its children changed state: its name (the volume's UUID) marked in a feed that
/// many nexuses share.
#[derive(Clone, Debug)]
pub struct ChangeNotice {
    pub feed: Arc<ChangeFeed>,
    pub name: String,
}

/// The names of the nexuses whose children changed state since the feed was last read, and a wake-up for whoever
/// reads it (the engine's registration, which tells the cluster agent which volumes to heal now).
#[derive(Debug, Default)]
pub struct ChangeFeed {
    changed: Mutex<std::collections::BTreeSet<String>>,
    wake: tokio::sync::Notify,
}

impl ChangeFeed {
    /// Marks `name` as changed and wakes the reader.
    pub fn mark(&self, name: &str) {
        self.changed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        self.wake.notify_one();
    }

    /// What changed since the last call (empty if nothing did).
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.changed.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect()
    }

    /// Waits until something is marked (returns at once if something was marked since the last wait).
    pub async fn marked(&self) {
        self.wake.notified().await
    }
}

#[derive(Clone, Debug)]
pub struct NexusConfig {
    /// A child I/O that takes longer faults the child.
    pub io_timeout: Duration,
    /// Read errors after which a child is faulted (each failed read is retried on another child).
    pub read_error_limit: u32,
    pub rebuild: RebuildConfig,
    /// A faulted child that comes back within this window gets only the segments written meanwhile.
    pub partial_rebuild_window: Duration,
    /// Told whenever a child changes state (faulted, rebuilt): the engine passes it on to the cluster agent at once.
    pub on_change: Option<ChangeNotice>,
    /// Asked before a healthy child is faulted on the I/O path (see [`FaultGate`]); none: faulted at once.
    pub fault_gate: Option<Arc<dyn FaultGate>>,
    /// Told when a newer nexus fenced this one (see [`Fenced`]).
    pub on_fenced: Option<Arc<dyn Fenced>>,
}

impl Default for NexusConfig {
    fn default() -> NexusConfig {
        NexusConfig {
            io_timeout: Duration::from_secs(30),
            read_error_limit: 3,
            rebuild: RebuildConfig::default(),
            partial_rebuild_window: Duration::from_secs(600),
            on_change: None,
            fault_gate: None,
            on_fenced: None,
        }
    }
}

pub struct Nexus {
    pub name: String,
    block_size: u32,
    /// Grows online ([`Nexus::grow`]), never shrinks.
    num_blocks: std::sync::atomic::AtomicU64,
    config: NexusConfig,
    children: RwLock<Vec<Arc<Child>>>,
    next_read: AtomicUsize,
    /// Application I/Os started (reads and writes), so a rebuild can tell whether the volume is in use.
    app_ios: std::sync::atomic::AtomicU64,
    lock: RangeLock,
    history: Mutex<resync::History>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Set by [`Nexus::shutdown`]: every I/O fails from then on.
    stopped: std::sync::atomic::AtomicBool,
    /// A write failed after some child took it (the children may differ where it went): an end is never clean.
    torn: std::sync::atomic::AtomicBool,
    /// Cancelled when a shutdown begins: I/Os waiting for the fault gate give up.
    halt: CancellationToken,
    /// Held while the fault gate is asked (one question at a time).
    confirming: tokio::sync::Mutex<()>,
    /// One read lease check at a time ([`lease`]).
    renewing: tokio::sync::Mutex<()>,
    /// Held while the last healthy child is faulted without asking and while a rebuilt child turns healthy: the two
    /// decisions see each other (see [`Nexus::fault_unasked`]).
    health: Mutex<()>,
    consent: gate::ConsentCounters,
}

impl Nexus {
    /// A nexus over children that already hold the same data (a new volume, or a restart with known-good
    /// children). Its size is the smallest child's.
    pub fn new(
        name: &str,
        children: Vec<(String, Arc<dyn BlockDevice>)>,
        config: NexusConfig,
    ) -> Result<Arc<Nexus>, NexusError> {
        Nexus::new_at_most(name, children, config, None)
    }

    /// [`Nexus::new`] no larger than `size` bytes (whole blocks): a child larger than the volume (made at the size
    /// of a growth undone since) does not make the nexus larger than the volume.
    pub fn new_at_most(
        name: &str,
        children: Vec<(String, Arc<dyn BlockDevice>)>,
        config: NexusConfig,
        size: Option<u64>,
    ) -> Result<Arc<Nexus>, NexusError> {
        let (first_name, first) = children.first().ok_or(NexusError::NoChildren)?;
        let block_size = first.block_size();
        let _ = first_name;
        let smallest = children
            .iter()
            .map(|(_, d)| d.num_blocks())
            .min()
            .unwrap_or(0);
        let num_blocks = size.map_or(smallest, |s| smallest.min(s / u64::from(block_size)));
        if size.is_some() && num_blocks == 0 {
            return Err(NexusError::TooSmall {
                name: name.to_string(),
                got: 0,
                want: u64::from(block_size),
            });
        }
        let mut list: Vec<Arc<Child>> = Vec::new();
        for (n, d) in children {
            if d.block_size() != block_size {
                return Err(NexusError::BlockSize {
                    name: n,
                    got: d.block_size(),
                    want: block_size,
                });
            }
            if list.iter().any(|c| c.name == n) {
                return Err(NexusError::DuplicateChild(n));
            }
            let geometry = (
                num_blocks * u64::from(block_size),
                config.rebuild.segment_size,
            );
            list.push(Arc::new(Child::new(n, d, ChildState::Healthy, geometry)));
        }
        Ok(Arc::new(Nexus {
            name: name.to_string(),
            block_size,
            num_blocks: std::sync::atomic::AtomicU64::new(num_blocks),
            config,
            children: RwLock::new(list),
            next_read: AtomicUsize::new(0),
            app_ios: std::sync::atomic::AtomicU64::new(0),
            lock: RangeLock::new(),
            history: Mutex::new(Default::default()),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            torn: std::sync::atomic::AtomicBool::new(false),
            halt: CancellationToken::new(),
            confirming: tokio::sync::Mutex::new(()),
            renewing: tokio::sync::Mutex::new(()),
            health: Mutex::new(()),
            consent: gate::ConsentCounters::default(),
        }))
    }

    fn list(&self) -> Vec<Arc<Child>> {
        self.children
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn child(&self, name: &str) -> Option<Arc<Child>> {
        self.list().into_iter().find(|c| c.name == name)
    }

    pub fn state(&self) -> NexusState {
        if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return NexusState::Shutdown;
        }
        let list = self.list();
        let healthy = list
            .iter()
            .filter(|c| c.state() == ChildState::Healthy)
            .count();
        match healthy {
            0 => NexusState::Faulted,
            n if n == list.len() => NexusState::Online,
            _ => NexusState::Degraded,
        }
    }

    pub fn children(&self) -> Vec<ChildInfo> {
        self.list().iter().map(|c| c.info()).collect()
    }

    /// The device of child `name`, when there is one.
    pub fn child_device(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        self.list()
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.device.clone())
    }

    pub fn config(&self) -> &NexusConfig {
        &self.config
    }

    /// Says that a child changed state, to whoever listens ([`NexusConfig::on_change`]).
    pub(super) fn changed(&self) {
        if let Some(n) = &self.config.on_change {
            n.feed.mark(&n.name);
        }
    }

    /// Adds a child and rebuilds it in full from the healthy ones while I/O goes on.
    pub fn add_child(
        self: &Arc<Self>,
        name: &str,
        device: Arc<dyn BlockDevice>,
    ) -> Result<(), NexusError> {
        if device.block_size() != self.block_size {
            return Err(NexusError::BlockSize {
                name: name.into(),
                got: device.block_size(),
                want: self.block_size,
            });
        }
        // The size checked and the copy sized under the children's lock: a growth (which changes the size under it)
        // cannot come in between and leave the new child short of the grown space's writes.
        let (child, map) = {
            let mut list = self.children.write().unwrap_or_else(|e| e.into_inner());
            if device.size_bytes() < self.size_bytes() {
                return Err(NexusError::TooSmall {
                    name: name.into(),
                    got: device.size_bytes(),
                    want: self.size_bytes(),
                });
            }
            if list.iter().any(|c| c.name == name) {
                return Err(NexusError::DuplicateChild(name.into()));
            }
            let map = SegmentMap::full(self.size_bytes(), self.config.rebuild.segment_size);
            let c = Arc::new(Child::new(
                name.to_string(),
                device,
                ChildState::Rebuilding,
                self.log_geometry(),
            ));
            list.push(c.clone());
            (c, map)
        };
        self.start_rebuild(child, map, RebuildKind::Full);
        Ok(())
    }

    fn log_geometry(&self) -> (u64, u64) {
        (self.size_bytes(), self.config.rebuild.segment_size)
    }

    /// A faulted child comes back (reconnected, disk replaced by the same data, ...). Within the partial-rebuild
    /// window it gets only the segments written while it was away; otherwise a full rebuild.
    pub async fn rejoin_child(
        self: &Arc<Self>,
        name: &str,
        device: Arc<dyn BlockDevice>,
    ) -> Result<RebuildKind, NexusError> {
        if device.block_size() != self.block_size || device.size_bytes() < self.size_bytes() {
            return Err(NexusError::TooSmall {
                name: name.into(),
                got: device.size_bytes(),
                want: self.size_bytes(),
            });
        }
        // A rebuild of the faulted child ends first (it stops at its next step), and what the device still has in
        // flight (a copy or a write given up on at its timeout) lands before anything is copied to it again.
        if let Some(old) = self
            .child(name)
            .filter(|c| c.state() == ChildState::Faulted)
        {
            old.end_rebuild().await;
            old.device.settle().await;
        }
        device.settle().await;
        // Writes in flight are not waited for: one may be waiting for the cluster agent's consent to fault another
        // child, an answer the agent gives under the volume's lock, which its call here holds. Instead, a write still
        // under way when the child is handed over (it was not sent to the child, and ends by logging its range in
        // the children away, which the child no longer is) has its range copied too, once it ends: the copy takes
        // the range's lock. A write that takes its range's lock after the hand-over sends to the child as to any
        // child being rebuilt. (Under the children's lock, so a growth cannot change the size meanwhile.)
        let (child, map, kind) = {
            let mut list = self.children.write().unwrap_or_else(|e| e.into_inner());
            let idx = list
                .iter()
                .position(|c| c.name == name)
                .ok_or_else(|| NexusError::NoSuchChild(name.into()))?;
            if list[idx].state() != ChildState::Faulted {
                return Err(NexusError::DuplicateChild(name.into()));
            }
            if device.size_bytes() < self.size_bytes() {
                return Err(NexusError::TooSmall {
                    name: name.into(),
                    got: device.size_bytes(),
                    want: self.size_bytes(),
                });
            }
            let (mut map, kind) = match list[idx].take_log() {
                Some(log) if log.since.elapsed() <= self.config.partial_rebuild_window => {
                    (log.map, RebuildKind::Partial)
                }
                _ => (
                    SegmentMap::full(self.size_bytes(), self.config.rebuild.segment_size),
                    RebuildKind::Full,
                ),
            };
            let c = Arc::new(Child::new(
                name.to_string(),
                device,
                ChildState::Rebuilding,
                self.log_geometry(),
            ));
            list[idx] = c.clone();
            // After the swap: a write that takes its lock from now on sees the child.
            let size = self.size_bytes();
            for r in self.lock.held_ranges() {
                let end = r.end.min(size);
                if r.start < end {
                    map.mark(r.start, end - r.start);
                }
            }
            (c, map, kind)
        };
        self.start_rebuild(child, map, kind);
        Ok(kind)
    }

    /// Removes a child. The last healthy child is never removed: it holds the only good copy (destroy the nexus
    /// instead).
    pub fn remove_child(&self, name: &str) -> Result<(), NexusError> {
        let mut list = self.children.write().unwrap_or_else(|e| e.into_inner());
        let idx = list
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| NexusError::NoSuchChild(name.into()))?;
        let healthy_others = list
            .iter()
            .enumerate()
            .filter(|(i, c)| *i != idx && c.state() == ChildState::Healthy)
            .count();
        if list[idx].state() == ChildState::Healthy && healthy_others == 0 {
            return Err(NexusError::LastHealthyChild(name.into()));
        }
        let c = list.remove(idx);
        c.fault("removed");
        drop(list);
        // Whatever the other children recorded for it is of no use any more.
        let nexus_name = name.to_string();
        let others: Vec<Arc<Child>> = self.list();
        self.tasks.spawn(async move {
            let key = child::stable_key(&nexus_name);
            for o in others {
                let _ = o.device.forget_missed(&key).await;
            }
        });
        Ok(())
    }

    /// Faults a child on request (an operator's): as a failed I/O would, with the cluster agent's consent when the
    /// nexus has a fault gate and the child is healthy, and what it had not flushed recorded on the others. (Faulted
    /// without asking, writes acknowledged without it while the agent still counted its replica in sync would be
    /// lost if the volume were made again from it.) `Stopped` if the nexus stops meanwhile (shut down, or replaced: a
    /// refusal of the gate waits for the engine to take it down).
    pub async fn fault_child(&self, name: &str, reason: &str) -> Result<(), NexusError> {
        let c = self
            .child(name)
            .ok_or_else(|| NexusError::NoSuchChild(name.into()))?;
        self.fault_confirmed(&c, reason, None)
            .await
            .map_err(|_| NexusError::Stopped)?;
        Ok(())
    }

    /// Stops the nexus: new I/O fails, the writes in flight are waited for (up to the I/O timeout and a second),
    /// rebuilds stop (waited for up to two I/O timeouts; one still stuck then makes the end unclean), a healthy
    /// child whose connection was lost and made again since with writes not flushed is faulted (and recorded as
    /// any faulted child: [`child::lost_at_end`]), and the healthy children flush. `true`: a clean end: every write it took either completed on
    /// its children or never started, and they made it durable, so the children agree, whatever happens to them
    /// next; `false`: some write was still in flight when it gave up, one failed after some children took it (they
    /// may differ there: a write that waited for consent to fault a child, given up at this shutdown, is one), a
    /// faulted child's unflushed writes could not be recorded on the others, or a child's flush failed. (The next nexus
    /// knows nothing of what this one's children had not flushed: a child that lost it in a power cut would
    /// disagree with the others for good, and no rebuild would ever look there.)
    pub async fn shutdown(&self) -> bool {
        self.stopped
            .store(true, std::sync::atomic::Ordering::Release);
        self.halt.cancel();
        let drained = tokio::time::timeout(
            self.config.io_timeout + std::time::Duration::from_secs(1),
            self.lock.exclusive_all(),
        )
        .await
        .is_ok();
        if !drained {
            tracing::warn!(nexus = %self.name, "shut down with writes still in flight");
        }
        self.cancel.cancel();
        self.tasks.close();
        // Cancelled, its rebuilds end at their next step; one stuck in a child's I/O that no timeout bounds is not
        // waited for past two I/O timeouts (the end is then not clean: it may still act on its child).
        let settled = tokio::time::timeout(2 * self.config.io_timeout, self.tasks.wait())
            .await
            .is_ok();
        if !settled {
            tracing::warn!(nexus = %self.name, "shut down with a rebuild still stuck in a child's I/O: not a clean end");
        }
        for c in child::lost_at_end(&self.healthy()) {
            c.fault("its connection was lost: unflushed writes may be gone");
            self.changed();
        }
        let torn = self.torn.load(std::sync::atomic::Ordering::Acquire);
        if torn {
            tracing::warn!(nexus = %self.name, "shut down after a write failed that some children took: not a clean end");
        }
        // A child faulted with writes it had not flushed, and no write there since: its record is kept now, or the
        // end is not clean (a later nexus would trust the child there).
        let recorded = self.record_unrecorded().await;
        if !recorded {
            tracing::warn!(nexus = %self.name, "shut down without recording what a faulted child missed: not a clean end");
        }
        // Flushed whatever else failed: what the children took is made durable all the same.
        let flushed = self.flush_on_end().await;
        drained && settled && recorded && flushed && !torn
    }

    /// Flushes every healthy child (each within the I/O timeout): whether all did.
    async fn flush_on_end(&self) -> bool {
        let healthy: Vec<Arc<Child>> = self
            .list()
            .into_iter()
            .filter(|c| c.state() == ChildState::Healthy)
            .collect();
        let flushes = healthy.iter().map(|c| async move {
            match tokio::time::timeout(self.config.io_timeout, c.device.flush()).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::warn!(nexus = %self.name, child = %c.name, error = %e, "a child's flush at the end failed");
                    false
                }
                Err(_) => {
                    tracing::warn!(nexus = %self.name, child = %c.name, "a child's flush at the end timed out");
                    false
                }
            }
        });
        futures_util::future::join_all(flushes)
            .await
            .into_iter()
            .all(|ok| ok)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_lease;
#[cfg(test)]
mod tests_missed;
#[cfg(test)]
mod tests_unflushed;
