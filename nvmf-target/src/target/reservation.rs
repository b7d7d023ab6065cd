//! NVMe reservations of one namespace, as a pure state machine: Register, Acquire (acquire, preempt), Release
//! (release, clear), Report, and the check every I/O command passes. Hosts are identified by their 128-bit Host
//! Identifier (from Connect), so every controller of a host shares its registration.
//!
//! This is how a new nexus fences an old one: it registers its key and preempts the old nexus's key with a Write
//! Exclusive reservation; from then on the old nexus's writes fail with Reservation Conflict. The state is small
//! and serializable so that the owner of the namespace (a pool replica) can keep it across restarts.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::protocol::status::Status;

pub use crate::protocol::command::resv as rtype;
use crate::protocol::command::resv::{
    ACQUIRE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER, RELEASE, REPLACE, UNREGISTER,
};

/// Reservation Capabilities (Identify Namespace RESCAP): persist through power loss, all six types, IEKEY. A
/// namespace whose reservations are kept nowhere (a nexus's: a new nexus starts with none) leaves out bit 0, the
/// persistence ([`Reservations::capabilities`]).
pub const RESCAP: u8 = 0xFF;

/// The most hosts registered with one namespace at once. The owner keeps the whole state with every change (a pool
/// writes it to its journal), so a host registering under ever new Host Identifiers must not grow it without end
/// and fill the pool's metadata. A nexus and its successor during a switch-over need two; a new registration
/// beyond this is refused with Internal Error, as SPDK's target refuses one past its own 16.
pub const MAX_REGISTRANTS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registrant {
    pub host: Uuid,
    pub key: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationState {
    /// Incremented by every successful Register and by every preempt that removes registrants.
    pub generation: u32,
    pub registrants: Vec<Registrant>,
    /// 0: no reservation.
    pub rtype: u8,
    /// The holder, for types other than all-registrants (where every registrant holds it).
    pub holder: Option<Uuid>,
}

fn all_regs(t: u8) -> bool {
    matches!(
        t,
        rtype::WRITE_EXCLUSIVE_ALL_REGS | rtype::EXCLUSIVE_ACCESS_ALL_REGS
    )
}

fn conflict<T>() -> Result<T, Status> {
    Err(Status::RESERVATION_CONFLICT)
}

impl ReservationState {
    fn key_of(&self, host: Uuid) -> Option<u64> {
        self.registrants
            .iter()
            .find(|r| r.host == host)
            .map(|r| r.key)
    }

    /// The key of the reservation's holder (none for all-registrants types, or without a reservation).
    pub fn holder_key(&self) -> Option<u64> {
        self.holder.and_then(|h| self.key_of(h))
    }

    /// Whether `host` holds the reservation (for all-registrants types: is registered while one exists).
    pub fn is_holder(&self, host: Uuid) -> bool {
        self.rtype != 0
            && if all_regs(self.rtype) {
                self.key_of(host).is_some()
            } else {
                self.holder == Some(host)
            }
    }

    /// The host must be registered with `crkey` (unless `iekey`).
    fn check_key(&self, host: Uuid, iekey: bool, crkey: u64) -> Result<(), Status> {
        match self.key_of(host) {
            Some(k) if iekey || k == crkey => Ok(()),
            _ => conflict(),
        }
    }

    fn remove(&mut self, keep: impl Fn(&Registrant) -> bool) -> usize {
        let before = self.registrants.len();
        self.registrants.retain(keep);
        let removed = before - self.registrants.len();
        if self.holder.is_some_and(|h| self.key_of(h).is_none()) {
            self.holder = None;
            if !all_regs(self.rtype) {
                self.rtype = 0;
            }
        }
        if self.registrants.is_empty() {
            self.rtype = 0;
            self.holder = None;
        }
        removed
    }

    /// A new registrant, unless [`MAX_REGISTRANTS`] are there already.
    fn add(&mut self, host: Uuid, key: u64) -> Result<(), Status> {
        if self.registrants.len() >= MAX_REGISTRANTS {
            return Err(Status::INTERNAL_ERROR);
        }
        self.registrants.push(Registrant { host, key });
        Ok(())
    }

    /// Reservation Register.
    pub fn register(
        &mut self,
        host: Uuid,
        action: u8,
        iekey: bool,
        crkey: u64,
        nrkey: u64,
    ) -> Result<(), Status> {
        match action {
            REGISTER => match self.key_of(host) {
                Some(k) if k == nrkey => return Ok(()),
                Some(_) => return conflict(),
                None if nrkey == 0 => return Err(Status::INVALID_FIELD),
                None => self.add(host, nrkey)?,
            },
            UNREGISTER => {
                self.check_key(host, iekey, crkey)?;
                self.remove(|r| r.host != host);
            }
            // A registrant may replace its key with 0, as the Linux target lets it (a Linux host's unregister
            // through the block layer, `pr_register(old, 0)`, sends that). A host not registered is registered by
            // a Replace that ignores the current key (Keelson's nexuses register so), never with key 0.
            REPLACE => match self.key_of(host) {
                Some(_) => {
                    self.check_key(host, iekey, crkey)?;
                    for r in self.registrants.iter_mut().filter(|r| r.host == host) {
                        r.key = nrkey;
                    }
                }
                None if nrkey == 0 => return Err(Status::INVALID_FIELD),
                None if iekey || crkey == 0 => self.add(host, nrkey)?,
                None => return conflict(),
            },
            _ => return Err(Status::INVALID_FIELD),
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    /// Reservation Acquire (acquire, preempt, preempt and abort; commands in flight are not aborted).
    pub fn acquire(
        &mut self,
        host: Uuid,
        action: u8,
        iekey: bool,
        crkey: u64,
        prkey: u64,
        rtype: u8,
    ) -> Result<(), Status> {
        // IEKEY only for Register since NVMe 1.3, as RESCAP bit 7 says (and Linux's target answers).
        if iekey || !(rtype::WRITE_EXCLUSIVE..=rtype::EXCLUSIVE_ACCESS_ALL_REGS).contains(&rtype) {
            return Err(Status::INVALID_FIELD);
        }
        self.check_key(host, iekey, crkey)?;
        match action {
            ACQUIRE => {
                if self.rtype == 0 {
                    self.rtype = rtype;
                    self.holder = (!all_regs(rtype)).then_some(host);
                    Ok(())
                } else if self.is_holder(host) && self.rtype == rtype {
                    Ok(())
                } else {
                    conflict()
                }
            }
            PREEMPT | PREEMPT_AND_ABORT => {
                let holder_key = self.holder.and_then(|h| self.key_of(h));
                if self.rtype != 0 && all_regs(self.rtype) && prkey == 0 {
                    // Everyone else loses their registration; the reservation becomes ours.
                    self.remove(|r| r.host == host);
                    self.rtype = rtype;
                    self.holder = (!all_regs(rtype)).then_some(host);
                } else if self.rtype != 0 && !all_regs(self.rtype) && holder_key == Some(prkey) {
                    self.registrants
                        .retain(|r| r.key != prkey || r.host == host);
                    self.rtype = rtype;
                    self.holder = (!all_regs(rtype)).then_some(host);
                } else {
                    if prkey == 0 {
                        return Err(Status::INVALID_FIELD);
                    }
                    if self.remove(|r| r.key != prkey || r.host == host) == 0 {
                        return conflict();
                    }
                }
                self.generation = self.generation.wrapping_add(1);
                Ok(())
            }
            _ => Err(Status::INVALID_FIELD),
        }
    }

    /// Reservation Release (release, clear).
    pub fn release(
        &mut self,
        host: Uuid,
        action: u8,
        iekey: bool,
        crkey: u64,
        rtype: u8,
    ) -> Result<(), Status> {
        // IEKEY only for Register since NVMe 1.3 (RESCAP bit 7): a Clear needs the registrant's key.
        if iekey {
            return Err(Status::INVALID_FIELD);
        }
        self.check_key(host, iekey, crkey)?;
        match action {
            RELEASE => {
                if self.rtype == 0 || !self.is_holder(host) {
                    return Ok(());
                }
                if self.rtype != rtype {
                    return Err(Status::INVALID_FIELD);
                }
                self.rtype = 0;
                self.holder = None;
                Ok(())
            }
            CLEAR => {
                self.registrants.clear();
                self.rtype = 0;
                self.holder = None;
                self.generation = self.generation.wrapping_add(1);
                Ok(())
            }
            _ => Err(Status::INVALID_FIELD),
        }
    }

    /// Whether `host` may run a command that reads (`write` false) or modifies (`write` true) the namespace.
    pub fn check(&self, host: Uuid, write: bool) -> Result<(), Status> {
        if self.rtype == 0 || self.is_holder(host) {
            return Ok(());
        }
        let registered = self.key_of(host).is_some();
        let allowed = match self.rtype {
            rtype::WRITE_EXCLUSIVE => !write,
            rtype::EXCLUSIVE_ACCESS => false,
            rtype::WRITE_EXCLUSIVE_REG_ONLY | rtype::WRITE_EXCLUSIVE_ALL_REGS => {
                !write || registered
            }
            _ => registered,
        };
        if allowed { Ok(()) } else { conflict() }
    }

    /// The Reservation Report data structure with 128-bit host identifiers (EDS), cut to `len` bytes; `persists`:
    /// whether the state persists through power loss (PTPLS).
    pub fn report(&self, len: usize, persists: bool) -> Bytes {
        let mut b = BytesMut::with_capacity(64 + 64 * self.registrants.len());
        b.put_u32_le(self.generation);
        b.put_u8(self.rtype);
        b.put_u16_le(self.registrants.len() as u16);
        b.put_u16_le(0);
        b.put_u8(u8::from(persists)); // PTPLS
        b.put_bytes(0, 64 - 10);
        for r in &self.registrants {
            // CNTLID 0xFFFF: the registration belongs to the host, not one controller.
            b.put_u16_le(0xFFFF);
            b.put_u8(u8::from(self.is_holder(r.host)));
            b.put_bytes(0, 5);
            b.put_u64_le(r.key);
            b.put_slice(r.host.as_bytes());
            b.put_bytes(0, 32);
        }
        b.resize(len, 0);
        b.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> (Uuid, Uuid, Uuid) {
        (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4())
    }

    #[test]
    fn a_new_holder_fences_the_old_one_by_preempting_its_key() {
        let (a, b, reader) = hosts();
        let mut s = ReservationState::default();
        s.register(a, REGISTER, false, 0, 0xA).unwrap();
        s.acquire(a, ACQUIRE, false, 0xA, 0, rtype::WRITE_EXCLUSIVE)
            .unwrap();
        assert!(s.check(a, true).is_ok());
        assert_eq!(s.check(reader, true), conflict());
        assert!(
            s.check(reader, false).is_ok(),
            "Write Exclusive lets others read"
        );

        s.register(b, REGISTER, false, 0, 0xB).unwrap();
        assert_eq!(
            s.acquire(b, ACQUIRE, false, 0xB, 0, rtype::WRITE_EXCLUSIVE),
            conflict()
        );
        s.acquire(b, PREEMPT, false, 0xB, 0xA, rtype::WRITE_EXCLUSIVE)
            .unwrap();
        assert_eq!(s.holder, Some(b));
        assert_eq!(s.check(a, true), conflict(), "the old holder's writes fail");
        assert_eq!(s.key_of(a), None, "and it is no longer registered");
        // It cannot take the reservation back with its old key.
        assert_eq!(
            s.acquire(a, PREEMPT, false, 0xA, 0xB, rtype::WRITE_EXCLUSIVE),
            conflict()
        );
        assert_eq!(s.generation, 3);
    }

    #[test]
    fn registration_rules() {
        let (a, b, _) = hosts();
        let mut s = ReservationState::default();
        assert_eq!(
            s.register(a, REGISTER, false, 0, 0),
            Err(Status::INVALID_FIELD)
        );
        s.register(a, REGISTER, false, 0, 5).unwrap();
        s.register(a, REGISTER, false, 0, 5).unwrap();
        assert_eq!(s.register(a, REGISTER, false, 0, 6), conflict());
        assert_eq!(s.register(a, REPLACE, false, 4, 6), conflict());
        s.register(a, REPLACE, false, 5, 6).unwrap();
        s.register(b, REPLACE, true, 0, 9).unwrap();
        // A registrant replaces its key with 0 (a Linux host's unregister sends that); one not registered may not
        // register with it.
        s.register(b, REPLACE, false, 9, 0).unwrap();
        assert_eq!(s.key_of(b), Some(0));
        s.register(b, REPLACE, false, 0, 9).unwrap();
        assert_eq!(
            s.register(Uuid::new_v4(), REPLACE, true, 0, 0),
            Err(Status::INVALID_FIELD)
        );
        assert_eq!(s.registrants.len(), 2);
        s.acquire(a, ACQUIRE, false, 6, 0, rtype::EXCLUSIVE_ACCESS)
            .unwrap();
        assert_eq!(
            s.check(b, false),
            conflict(),
            "Exclusive Access blocks reads too"
        );
        s.register(a, UNREGISTER, false, 6, 0).unwrap();
        assert_eq!(
            s.rtype, 0,
            "unregistering the holder releases the reservation"
        );
        assert!(s.check(b, true).is_ok());
    }

    #[test]
    fn registrants_are_capped_and_a_full_namespace_still_serves_its_registrants() {
        let mut s = ReservationState::default();
        let first = Uuid::new_v4();
        s.register(first, REGISTER, false, 0, 1).unwrap();
        for i in 1..MAX_REGISTRANTS {
            let action = if i % 2 == 0 { REGISTER } else { REPLACE };
            s.register(Uuid::new_v4(), action, true, 0, 100 + i as u64)
                .unwrap();
        }
        let generation = s.generation;
        let late = Uuid::new_v4();
        assert_eq!(
            s.register(late, REGISTER, false, 0, 7),
            Err(Status::INTERNAL_ERROR)
        );
        assert_eq!(
            s.register(late, REPLACE, true, 0, 7),
            Err(Status::INTERNAL_ERROR)
        );
        assert_eq!(s.registrants.len(), MAX_REGISTRANTS);
        assert_eq!(
            s.generation, generation,
            "a refused register changes nothing"
        );
        // Those registered keep every right: re-register, replace, acquire; one leaving makes room.
        s.register(first, REGISTER, false, 0, 1).unwrap();
        s.register(first, REPLACE, false, 1, 2).unwrap();
        s.acquire(first, ACQUIRE, false, 2, 0, rtype::WRITE_EXCLUSIVE)
            .unwrap();
        assert!(s.check(late, false).is_ok() && s.check(late, true).is_err());
        s.register(first, UNREGISTER, false, 2, 0).unwrap();
        s.register(late, REGISTER, false, 0, 7).unwrap();
        assert_eq!(s.registrants.len(), MAX_REGISTRANTS);
    }

    #[test]
    fn ignore_existing_key_is_refused_on_acquire_and_release() {
        let mut s = ReservationState::default();
        let a = Uuid::new_v4();
        s.register(a, REGISTER, false, 0, 7).unwrap();
        assert_eq!(
            s.acquire(a, ACQUIRE, true, 0, 0, rtype::WRITE_EXCLUSIVE),
            Err(Status::INVALID_FIELD)
        );
        s.acquire(a, ACQUIRE, false, 7, 0, rtype::WRITE_EXCLUSIVE)
            .unwrap();
        // A Clear without the key (IEKEY) would take every registration away.
        assert_eq!(s.release(a, CLEAR, true, 0, 0), Err(Status::INVALID_FIELD));
        assert_eq!(
            s.release(a, RELEASE, true, 0, rtype::WRITE_EXCLUSIVE),
            Err(Status::INVALID_FIELD)
        );
        assert_eq!(s.holder, Some(a));
        assert_eq!(s.registrants.len(), 1);
    }

    #[test]
    fn all_registrants_types_and_release_and_clear() {
        let (a, b, c) = hosts();
        let mut s = ReservationState::default();
        s.register(a, REGISTER, false, 0, 1).unwrap();
        s.register(b, REGISTER, false, 0, 2).unwrap();
        s.acquire(a, ACQUIRE, false, 1, 0, rtype::WRITE_EXCLUSIVE_ALL_REGS)
            .unwrap();
        assert!(s.check(b, true).is_ok());
        assert_eq!(s.check(c, true), conflict());
        s.acquire(b, ACQUIRE, false, 2, 0, rtype::WRITE_EXCLUSIVE_ALL_REGS)
            .unwrap();
        assert_eq!(
            s.release(b, RELEASE, false, 2, rtype::WRITE_EXCLUSIVE),
            Err(Status::INVALID_FIELD)
        );
        s.release(b, RELEASE, false, 2, rtype::WRITE_EXCLUSIVE_ALL_REGS)
            .unwrap();
        assert_eq!(s.rtype, 0);
        assert_eq!(
            s.release(c, CLEAR, false, 0, 0),
            conflict(),
            "only registrants clear"
        );
        s.release(a, CLEAR, false, 1, 0).unwrap();
        assert!(s.registrants.is_empty());
    }

    #[test]
    fn the_report_lists_registrants_with_their_host_ids() {
        let (a, b, _) = hosts();
        let mut s = ReservationState::default();
        s.register(a, REGISTER, false, 0, 0x11).unwrap();
        s.register(b, REGISTER, false, 0, 0x22).unwrap();
        s.acquire(b, ACQUIRE, false, 0x22, 0, rtype::WRITE_EXCLUSIVE)
            .unwrap();
        let r = s.report(4096, true);
        assert_eq!(r.len(), 4096);
        assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 2);
        assert_eq!((r[4], u16::from_le_bytes([r[5], r[6]])), (1, 2));
        assert_eq!(r[64 + 2], 0, "a does not hold it");
        assert_eq!(&r[64 + 16..64 + 32], a.as_bytes());
        assert_eq!(r[128 + 2], 1, "b holds it");
        assert_eq!(
            u64::from_le_bytes(r[128 + 8..128 + 16].try_into().unwrap()),
            0x22
        );
        assert_eq!(s.report(10, true).len(), 10);
        assert_eq!(r[9], 1, "PTPLS");
        assert_eq!(s.report(64, false)[9], 0);
    }

    /// Reservations kept nowhere (a nexus's) do not claim to persist through power loss, as Linux hosts ask for
    /// at every Register: RESCAP leaves bit 0 out. Those a store keeps (a replica's, in its pool) claim it.
    #[test]
    fn only_reservations_kept_in_a_store_claim_to_persist() {
        struct Nowhere;
        #[async_trait::async_trait]
        impl ReservationStore for Nowhere {
            async fn save(&self, _: &ReservationState) -> Result<(), String> {
                Ok(())
            }
        }
        let memory = Reservations::default();
        assert!(!memory.persists());
        assert_eq!(memory.capabilities(), 0xFE);
        let kept = Reservations::new(ReservationState::default(), std::sync::Arc::new(Nowhere));
        assert!(kept.persists());
        assert_eq!(kept.capabilities(), RESCAP);
    }
}

/// Keeps a namespace's reservation state across restarts (the engine backs it with the replica's pool metadata).
#[async_trait::async_trait]
pub trait ReservationStore: Send + Sync + 'static {
    async fn save(&self, state: &ReservationState) -> Result<(), String>;
}

/// How long a reservation change waits for the commands admitted before it to end (and for the device to end what
/// they handed it); past it the change is refused with Namespace Not Ready and nothing changes.
const FENCE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A namespace's reservations: the state, and where changes are made durable before they take effect.
///
/// A change takes effect only once no command admitted before it still changes the namespace: commands that change
/// it hold the fence shared from their reservation check to their end ([`Reservations::admit_change`]), a change
/// holds it exclusively, and then waits for the device to end what those commands handed it, even for a command
/// whose caller went away. Without it a new nexus's preempt could complete while a write of the nexus it fences,
/// checked just before, was still on its way to the disk, and land after the new nexus's own writes.
#[derive(Default)]
pub struct Reservations {
    state: std::sync::RwLock<ReservationState>,
    /// Serializes changes (each is saved before it applies).
    change: tokio::sync::Mutex<()>,
    fence: tokio::sync::RwLock<()>,
    store: Option<std::sync::Arc<dyn ReservationStore>>,
}

impl Reservations {
    pub fn new(
        state: ReservationState,
        store: std::sync::Arc<dyn ReservationStore>,
    ) -> Reservations {
        Reservations {
            state: std::sync::RwLock::new(state),
            change: tokio::sync::Mutex::new(()),
            fence: tokio::sync::RwLock::new(()),
            store: Some(store),
        }
    }

    pub fn state(&self) -> ReservationState {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the state is kept through power loss (saved to a store before each change applies).
    pub fn persists(&self) -> bool {
        self.store.is_some()
    }

    /// RESCAP for this namespace: [`RESCAP`], less persistence where the state is kept nowhere.
    pub fn capabilities(&self) -> u8 {
        if self.persists() { RESCAP } else { RESCAP & !1 }
    }

    /// Whether `host` may read (`write` false) or change (`write` true) the namespace now. Callers ask
    /// [`super::access::admit`], which classifies the command first.
    pub fn may(&self, host: Uuid, write: bool) -> bool {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .check(host, write)
            .is_ok()
    }

    /// For a command of `host` that changes the namespace: the reservation check, made under the fence, and the
    /// guard the command holds until it has ended, so that a reservation change waits for it.
    pub async fn admit_change(
        &self,
        host: Uuid,
    ) -> Result<tokio::sync::RwLockReadGuard<'_, ()>, Status> {
        let fence = self.fence.read().await;
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .check(host, true)?;
        Ok(fence)
    }

    /// Applies `f` to a copy of the state, saves the result, then makes it current, once the commands admitted
    /// to change the namespace before it have ended.
    pub async fn change(
        &self,
        f: impl FnOnce(&mut ReservationState) -> Result<(), Status>,
    ) -> Result<(), Status> {
        self.change_settled(async {}, f).await
    }

    /// [`Self::change`], also waiting for `settled`: the device ending what it was handed before (a command whose
    /// caller went away may have left a write on its way to the disk; `BlockDevice::settle`). A change that changes
    /// nothing (a nexus opening its child again with its key: a rejoin) waits all the same: what it does next (a
    /// rebuild writing the blocks it missed) must come after every write the host had in flight before, or a late
    /// one would land over it.
    pub async fn change_settled(
        &self,
        settled: impl std::future::Future<Output = ()>,
        f: impl FnOnce(&mut ReservationState) -> Result<(), Status>,
    ) -> Result<(), Status> {
        self.change_through(|| Ok(()), settled, f).await
    }

    /// [`Self::change_settled`] for a command of a controller: `through` runs once the change is found valid, in
    /// turn with the other changes and before the fence is taken. It refuses the change of a controller that has
    /// ended, and may end others (a single-path subsystem's older controllers of the host), whose commands not
    /// admitted yet are then refused and those admitted waited for. A change refused as invalid ends no one.
    pub async fn change_through(
        &self,
        through: impl FnOnce() -> Result<(), Status>,
        settled: impl std::future::Future<Output = ()>,
        f: impl FnOnce(&mut ReservationState) -> Result<(), Status>,
    ) -> Result<(), Status> {
        let _serial = self.change.lock().await;
        let mut next = self.state();
        f(&mut next)?;
        through()?;
        let unchanged = next == self.state();
        let fenced = async {
            let fence = self.fence.write().await;
            settled.await;
            fence
        };
        let Ok(_fence) = tokio::time::timeout(FENCE_WAIT, fenced).await else {
            tracing::warn!(
                "a reservation change waited {FENCE_WAIT:?} for commands in flight on the namespace; refused"
            );
            return Err(Status::NAMESPACE_NOT_READY);
        };
        if unchanged {
            return Ok(());
        }
        if let Some(store) = &self.store
            && let Err(e) = store.save(&next).await
        {
            tracing::warn!(error = %e, "cannot save the reservation state");
            return Err(Status::INTERNAL_ERROR);
        }
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }
}
