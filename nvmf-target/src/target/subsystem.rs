//! NVM subsystems: identity (NQN, serial, model), namespaces and the block devices behind them, the host allow-list,
//! and the registry of live controllers with controller-ID allocation from this node's range.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};

use crate::block::BlockDevice;
use crate::protocol::nqn::Nqn;

use super::TargetError;
use super::ana::MAX_GROUPS;
use super::controller::Controller;
use super::reservation::Reservations;
use super::stats::IoStats;

/// Highest NSID a subsystem may hold (NN and MNAN in Identify Controller).
pub const MAX_NSID: u32 = 256;

/// A namespace: an NSID bound to a block device, with the identity hosts use to group paths.
pub struct Namespace {
    pub nsid: u32,
    pub uuid: uuid::Uuid,
    pub ana_group: u32,
    pub device: Arc<dyn BlockDevice>,
    pub reservations: Reservations,
    pub stats: IoStats,
}

impl Namespace {
    /// NGUID: the UUID's bytes, so every node serving the volume reports the same identity.
    pub fn nguid(&self) -> [u8; 16] {
        *self.uuid.as_bytes()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubsystemKind {
    Discovery,
    Nvm,
}

struct Config {
    namespaces: BTreeMap<u32, Arc<Namespace>>,
    allowed_hosts: BTreeSet<String>,
    allow_any_host: bool,
}

pub struct Subsystem {
    pub nqn: Nqn,
    pub serial: String,
    pub model: String,
    pub kind: SubsystemKind,
    /// A host's reservation change through one of its controllers ends its others (`SubsystemSpec::single_path`).
    pub single_path: bool,
    config: RwLock<Config>,
    controllers: Mutex<BTreeMap<u16, Arc<Controller>>>,
}

impl Subsystem {
    pub fn new(
        nqn: Nqn,
        serial: String,
        model: String,
        kind: SubsystemKind,
        allow_any_host: bool,
        single_path: bool,
    ) -> Subsystem {
        Subsystem {
            nqn,
            serial,
            model,
            kind,
            single_path,
            config: RwLock::new(Config {
                namespaces: BTreeMap::new(),
                allowed_hosts: BTreeSet::new(),
                allow_any_host,
            }),
            controllers: Mutex::new(BTreeMap::new()),
        }
    }

    fn cfg(&self) -> std::sync::RwLockReadGuard<'_, Config> {
        self.config.read().unwrap_or_else(|e| e.into_inner())
    }
    fn cfg_mut(&self) -> std::sync::RwLockWriteGuard<'_, Config> {
        self.config.write().unwrap_or_else(|e| e.into_inner())
    }
    fn ctrls(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, Arc<Controller>>> {
        self.controllers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.cfg().namespaces.get(&nsid).cloned()
    }

    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        self.cfg().namespaces.values().cloned().collect()
    }

    /// Adds a namespace; `nsid` 0 takes the lowest free one. Returns the NSID. Its reservations live in memory.
    pub fn add_namespace(
        &self,
        nsid: u32,
        uuid: uuid::Uuid,
        ana_group: u32,
        device: Arc<dyn BlockDevice>,
    ) -> Result<u32, TargetError> {
        self.add_namespace_with(nsid, uuid, ana_group, device, Reservations::default())
    }

    /// Adds a namespace whose reservations start from (and are saved to) `reservations`.
    pub fn add_namespace_with(
        &self,
        nsid: u32,
        uuid: uuid::Uuid,
        ana_group: u32,
        device: Arc<dyn BlockDevice>,
        reservations: Reservations,
    ) -> Result<u32, TargetError> {
        if self.kind == SubsystemKind::Discovery {
            return Err(TargetError::InvalidArgument(
                "a discovery subsystem has no namespaces".into(),
            ));
        }
        if ana_group == 0 || ana_group > MAX_GROUPS {
            return Err(TargetError::InvalidArgument(format!(
                "ANA group {ana_group} is not in 1..={MAX_GROUPS}"
            )));
        }
        let mut c = self.cfg_mut();
        let nsid = if nsid == 0 {
            (1..=MAX_NSID)
                .find(|n| !c.namespaces.contains_key(n))
                .ok_or_else(|| {
                    TargetError::Exhausted(format!(
                        "{} already has {MAX_NSID} namespaces",
                        self.nqn
                    ))
                })?
        } else {
            nsid
        };
        if nsid > MAX_NSID {
            return Err(TargetError::InvalidArgument(format!(
                "NSID {nsid} is not in 1..={MAX_NSID}"
            )));
        }
        if c.namespaces.contains_key(&nsid) {
            return Err(TargetError::AlreadyExists(format!(
                "namespace {nsid} of {}",
                self.nqn
            )));
        }
        if c.namespaces.values().any(|n| n.uuid == uuid) {
            return Err(TargetError::AlreadyExists(format!(
                "a namespace with UUID {uuid} in {}",
                self.nqn
            )));
        }
        c.namespaces.insert(
            nsid,
            Arc::new(Namespace {
                nsid,
                uuid,
                ana_group,
                device,
                reservations,
                stats: IoStats::default(),
            }),
        );
        drop(c);
        self.notify_namespace_changed(nsid);
        Ok(nsid)
    }

    /// Serves `ns` (its NSID, device, reservations and statistics), one this subsystem's earlier self served and
    /// something still uses: an export made again keeps one set of reservation rules for every path to the device.
    pub fn attach_namespace(&self, ns: Arc<Namespace>) -> Result<(), TargetError> {
        let mut c = self.cfg_mut();
        if self.kind == SubsystemKind::Discovery
            || c.namespaces.contains_key(&ns.nsid)
            || c.namespaces.values().any(|n| n.uuid == ns.uuid)
        {
            return Err(TargetError::AlreadyExists(format!(
                "namespace {} ({}) in {}",
                ns.nsid, ns.uuid, self.nqn
            )));
        }
        let nsid = ns.nsid;
        c.namespaces.insert(nsid, ns);
        drop(c);
        self.notify_namespace_changed(nsid);
        Ok(())
    }

    pub fn remove_namespace(&self, nsid: u32) -> Result<(), TargetError> {
        if self.cfg_mut().namespaces.remove(&nsid).is_none() {
            return Err(TargetError::NotFound(format!(
                "namespace {nsid} of {}",
                self.nqn
            )));
        }
        self.notify_namespace_changed(nsid);
        Ok(())
    }

    /// Tells every connected host that namespace `nsid` changed (added, removed, or resized): each controller
    /// raises a Namespace Attribute Changed notice and lists it in the Changed Namespace List log.
    pub fn notify_namespace_changed(&self, nsid: u32) {
        for c in self.controllers() {
            c.namespace_changed(nsid);
        }
    }

    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        let c = self.cfg();
        self.kind == SubsystemKind::Discovery
            || c.allow_any_host
            || c.allowed_hosts.contains(hostnqn)
    }

    pub fn allow_host(&self, hostnqn: &str) {
        self.cfg_mut().allowed_hosts.insert(hostnqn.to_string());
    }

    /// Lets any host connect, or only those on the allow-list; controllers of hosts no longer allowed are ended.
    pub fn set_allow_any_host(&self, any: bool) {
        self.cfg_mut().allow_any_host = any;
        if !any {
            for c in self
                .controllers()
                .into_iter()
                .filter(|c| !self.host_allowed(&c.hostnqn))
            {
                c.shutdown("any host is no longer allowed");
            }
        }
    }

    /// Removes a host from the allow-list and disconnects its controllers.
    pub fn disallow_host(&self, hostnqn: &str) {
        self.cfg_mut().allowed_hosts.remove(hostnqn);
        if !self.host_allowed(hostnqn) {
            for c in self
                .controllers()
                .into_iter()
                .filter(|c| c.hostnqn == hostnqn)
            {
                c.shutdown("host removed from the allow-list");
            }
        }
    }

    /// Ends every controller of `ctrl`'s host but `ctrl` (a reservation change through it on a single-path
    /// subsystem): their connections close, and their commands not admitted yet are refused.
    pub fn end_other_controllers_of_host(&self, ctrl: &Controller) {
        for c in self
            .controllers()
            .into_iter()
            .filter(|c| c.hostid == ctrl.hostid && c.cntlid != ctrl.cntlid)
        {
            c.shutdown("its host changed the reservation through a newer controller");
        }
    }

    pub fn allowed_hosts(&self) -> Vec<String> {
        self.cfg().allowed_hosts.iter().cloned().collect()
    }

    pub fn allow_any_host(&self) -> bool {
        self.cfg().allow_any_host
    }

    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        self.ctrls().values().cloned().collect()
    }

    pub fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.ctrls().get(&cntlid).cloned()
    }

    /// Registers a controller built by `make` under the lowest free ID in `range`.
    /// Registers a new controller under a free ID of `range`, searched from a random point of it: the same
    /// subsystem is exported by another node's nexus after a switch-over, and the host refuses a second controller
    /// with an ID it still holds, so two nodes must not both hand out the lowest free one. Disjoint ranges per node
    /// (`--cntlid-range`) rule a clash out; without them one is as unlikely as two random picks meeting.
    pub fn add_controller(
        &self,
        range: std::ops::RangeInclusive<u16>,
        make: impl FnOnce(u16) -> Arc<Controller>,
    ) -> Option<Arc<Controller>> {
        let mut m = self.ctrls();
        let id = free_id(range, random(), |id| m.contains_key(&id))?;
        let c = make(id);
        m.insert(id, c.clone());
        Some(c)
    }

    /// Forgets `ctrl`; not another controller given its ID since (an ended controller's queues end later).
    pub fn remove_controller(&self, ctrl: &Controller) {
        let mut ctrls = self.ctrls();
        if ctrls
            .get(&ctrl.cntlid)
            .is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), ctrl))
        {
            ctrls.remove(&ctrl.cntlid);
        }
    }
}

/// A random number (std's per-instance hasher keys come from the OS's random source).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The first ID of `range`, going round from `seed`, that is not `taken`.
fn free_id(
    range: std::ops::RangeInclusive<u16>,
    seed: u64,
    taken: impl Fn(u16) -> bool,
) -> Option<u16> {
    let (lo, hi) = (u32::from(*range.start()), u32::from(*range.end()));
    if hi < lo {
        return None;
    }
    let n = hi - lo + 1;
    let start = (seed % u64::from(n)) as u32;
    (0..n)
        .map(|i| (lo + (start + i) % n) as u16)
        .find(|id| !taken(*id))
}

#[cfg(test)]
mod cntlid_tests {
    use super::*;

    #[test]
    fn ids_come_from_the_range_from_a_random_start_until_it_is_full() {
        let mut held = BTreeSet::new();
        for seed in [7u64, 0, u64::MAX] {
            let id = free_id(10..=12, seed, |id| held.contains(&id)).unwrap();
            assert!((10..=12).contains(&id));
            held.insert(id);
        }
        assert_eq!(held.len(), 3);
        assert_eq!(free_id(10..=12, 5, |id| held.contains(&id)), None);
        assert_eq!(free_id(5..=5, 99, |_| false), Some(5));
        // Two nodes exporting one subsystem do not both start at the lowest ID.
        let firsts: BTreeSet<u16> = (0..20)
            .map(|_| free_id(1..=0xFFEF, random(), |_| false).unwrap())
            .collect();
        assert!(firsts.len() > 1, "{firsts:?}");
    }
}
