//! Who may do what to a namespace: the one access decision every path to a namespace asks, NVMe/TCP commands
//! ([`super::io`]) and a local nexus child (`engine::local`) alike. A command is classified once
//! ([`Access::of`]); the path's ANA state and the namespace's reservation decide. Every class that changes a
//! replica, data and metadata (missed-writes records, snapshots), is refused to a host the reservation fences.

use uuid::Uuid;

use crate::block::BlockError;
use crate::protocol::command::Access;
use crate::protocol::log::AnaState;
use crate::protocol::status::Status;

use super::subsystem::Namespace;

/// How a command reaches the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Through a port of this target, whose ANA state for the namespace's group is given.
    Port(AnaState),
    /// From inside this io-engine (a nexus child on the same node): no port, no ANA.
    Local,
}

/// Why a command was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// Another host holds a reservation that excludes this one (fenced).
    Reservation,
    /// The port's ANA state lets no command through (the status says which state).
    Path(Status),
}

impl From<Denied> for Status {
    fn from(d: Denied) -> Status {
        match d {
            Denied::Reservation => Status::RESERVATION_CONFLICT,
            Denied::Path(s) => s,
        }
    }
}

impl From<Denied> for BlockError {
    fn from(d: Denied) -> BlockError {
        match d {
            Denied::Reservation => BlockError::ReservationConflict,
            Denied::Path(s) => BlockError::Remote(s.to_string()),
        }
    }
}

/// Whether `host` may run a command of class `access` on `ns` through `path`.
pub fn admit(ns: &Namespace, host: Uuid, access: Access, path: Path) -> Result<(), Denied> {
    if let Path::Port(state) = path {
        match state {
            AnaState::Optimized | AnaState::NonOptimized => {}
            AnaState::Inaccessible => return Err(Denied::Path(Status::ANA_INACCESSIBLE)),
            AnaState::PersistentLoss => return Err(Denied::Path(Status::ANA_PERSISTENT_LOSS)),
            AnaState::Change => return Err(Denied::Path(Status::ANA_TRANSITION)),
        }
    }
    match access {
        Access::Reservation => Ok(()),
        a if ns.reservations.may(host, a.modifies()) => Ok(()),
        _ => Err(Denied::Reservation),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::block::memory::MemoryDevice;
    use crate::protocol::command::{io, resv};
    use crate::target::reservation::Reservations;
    use crate::target::stats::IoStats;

    fn namespace() -> Namespace {
        Namespace {
            nsid: 1,
            uuid: Uuid::new_v4(),
            ana_group: 1,
            device: Arc::new(MemoryDevice::new(1 << 20, 512)),
            reservations: Reservations::default(),
            stats: IoStats::default(),
        }
    }

    #[tokio::test]
    async fn a_fenced_host_may_read_but_change_nothing_and_the_holder_may_do_all() {
        let ns = namespace();
        let (holder, fenced) = (Uuid::new_v4(), Uuid::new_v4());
        let r = &ns.reservations;
        r.change(|s| s.register(holder, resv::REGISTER, false, 0, 7))
            .await
            .unwrap();
        r.change(|s| s.acquire(holder, resv::ACQUIRE, false, 7, 0, resv::WRITE_EXCLUSIVE))
            .await
            .unwrap();
        for op in [
            io::READ,
            io::WRITE,
            io::WRITE_ZEROES,
            io::DATASET_MANAGEMENT,
            io::FLUSH,
            io::KEELSON_ALLOCATED,
            io::KEELSON_SNAPSHOT,
            io::KEELSON_MISSED_NOTE,
            io::KEELSON_MISSED_FORGET,
            io::KEELSON_MISSED_READ,
            io::RESERVATION_REPORT,
        ] {
            let a = Access::of(op).unwrap();
            for path in [Path::Local, Path::Port(AnaState::Optimized)] {
                assert_eq!(
                    admit(&ns, holder, a, path),
                    Ok(()),
                    "holder, opcode {op:#x}"
                );
                let want = if a.modifies() {
                    Err(Denied::Reservation)
                } else {
                    Ok(())
                };
                assert_eq!(admit(&ns, fenced, a, path), want, "fenced, opcode {op:#x}");
            }
        }
        assert_eq!(Access::of(0x7E), None);
    }

    #[test]
    fn a_path_that_is_not_accessible_refuses_every_class() {
        let ns = namespace();
        for (state, st) in [
            (AnaState::Inaccessible, Status::ANA_INACCESSIBLE),
            (AnaState::PersistentLoss, Status::ANA_PERSISTENT_LOSS),
            (AnaState::Change, Status::ANA_TRANSITION),
        ] {
            for op in [
                io::READ,
                io::WRITE,
                io::KEELSON_MISSED_NOTE,
                io::RESERVATION_REGISTER,
            ] {
                let a = Access::of(op).unwrap();
                assert_eq!(
                    admit(&ns, Uuid::nil(), a, Path::Port(state)),
                    Err(Denied::Path(st))
                );
            }
        }
        assert_eq!(
            admit(&ns, Uuid::nil(), Access::WritesData, Path::Local),
            Ok(())
        );
    }
}
