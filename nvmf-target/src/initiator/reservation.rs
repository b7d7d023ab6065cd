//! Reservation commands from the initiator: how a nexus registers its key on a replica, takes the Exclusive Access
//! reservation ([`REPLICA_RESERVATION`]), and preempts the key of the nexus it replaces (fencing it).

use bytes::{BufMut, Bytes, BytesMut};

use super::InitiatorError;
use super::controller::Controller;
use super::namespace::RemoteNamespace;
use crate::block::BlockError;
use crate::protocol::command::{Sqe, io, resv};
use crate::protocol::status::Status;

/// Registrants and holder as a Reservation Report shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub generation: u32,
    pub rtype: u8,
    /// (host identifier, key, holds the reservation)
    pub registrants: Vec<([u8; 16], u64, bool)>,
}

fn keys(a: u64, b: Option<u64>) -> Bytes {
    let mut d = BytesMut::with_capacity(16);
    d.put_u64_le(a);
    if let Some(b) = b {
        d.put_u64_le(b);
    }
    d.freeze()
}

/// Reservation Acquire of NSID `nsid`: `action` ([`resv::ACQUIRE`] or [`resv::PREEMPT`]) of a reservation of type
/// `rtype`; its data, the keys, go with it.
fn acquire_sqe(nsid: u32, action: u8, rtype: u8) -> Sqe {
    let mut sqe = Sqe::new(io::RESERVATION_ACQUIRE, nsid);
    sqe.set_cdw(10, u32::from(action) | (u32::from(rtype) << 8));
    sqe
}

/// The reservation a nexus holds on its children: Exclusive Access, so a nexus a newer one preempted can neither
/// write to them nor read from them (what it would read may be older than what the newer one wrote since).
pub const REPLICA_RESERVATION: u8 = resv::EXCLUSIVE_ACCESS;

/// How taking the reservation again through a reconnected controller went.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HeldAgain {
    /// Held (or none to hold), or refused for another reason than a conflict (the path inaccessible, ...): the
    /// controller serves, and its commands get that refusal.
    Served,
    /// Reservation Conflict: the key is no longer this host's (another nexus preempted it, or re-keyed this host's
    /// registration: one with the same host identifier, whose writes would still pass). The namespace is fenced.
    Fenced,
}

/// Takes the [`REPLICA_RESERVATION`] again under `key` (0: none to take) through a reconnected controller,
/// before it serves I/O ([`RemoteNamespace::hold_reservation`]). An error is one worth reconnecting for: the
/// connection went, or the target waited too long for the commands admitted before (Namespace Not Ready).
pub(super) async fn hold_again(
    ctrl: &Controller,
    nsid: u32,
    key: u64,
) -> Result<HeldAgain, InitiatorError> {
    if key == 0 {
        return Ok(HeldAgain::Served);
    }
    let sqe = acquire_sqe(nsid, resv::ACQUIRE, REPLICA_RESERVATION);
    match ctrl.io_queues()[0]
        .submit(sqe, Some(keys(key, Some(0))))
        .await
    {
        Ok(_) => Ok(HeldAgain::Served),
        Err(InitiatorError::Status(s)) if s.is(Status::NAMESPACE_NOT_READY) => {
            Err(InitiatorError::Status(s))
        }
        Err(InitiatorError::Status(s)) if s.is(Status::RESERVATION_CONFLICT) => {
            Ok(HeldAgain::Fenced)
        }
        Err(InitiatorError::Status(s)) => {
            tracing::warn!(status = %s, "taking the reservation again after a reconnect was refused");
            Ok(HeldAgain::Served)
        }
        Err(e) => Err(e),
    }
}

impl RemoteNamespace {
    fn resv_sqe(&self, opcode: u8, cdw10: u32) -> Sqe {
        let mut sqe = Sqe::new(opcode, self.nsid());
        sqe.set_cdw(10, cdw10);
        sqe
    }

    /// Registers `key` for this host, replacing any key it had (Register with Replace and IEKEY).
    pub async fn register_key(&self, key: u64) -> Result<(), BlockError> {
        let sqe = self.resv_sqe(
            io::RESERVATION_REGISTER,
            u32::from(resv::REPLACE) | resv::IEKEY,
        );
        self.submit(sqe, Some(keys(0, Some(key)))).await.map(drop)
    }

    /// Reservation Acquire: `action` is [`resv::ACQUIRE`] or [`resv::PREEMPT`] (of `preempt_key`).
    pub async fn acquire(
        &self,
        action: u8,
        key: u64,
        preempt_key: u64,
        rtype: u8,
    ) -> Result<(), BlockError> {
        let sqe = acquire_sqe(self.nsid(), action, rtype);
        self.submit(sqe, Some(keys(key, Some(preempt_key)))).await?;
        // Held (again): no longer fenced, if it was.
        self.unfence();
        Ok(())
    }

    pub async fn release(&self, key: u64, rtype: u8) -> Result<(), BlockError> {
        let sqe = self.resv_sqe(
            io::RESERVATION_RELEASE,
            u32::from(resv::RELEASE) | (u32::from(rtype) << 8),
        );
        self.submit(sqe, Some(keys(key, None))).await.map(drop)
    }

    /// Reservation Report (extended data structure).
    pub async fn report(&self) -> Result<Report, BlockError> {
        // Room for the header and 127 registrants: more than a Keelson target keeps (64).
        const LEN: u32 = 8192;
        let mut sqe = self.resv_sqe(io::RESERVATION_REPORT, LEN / 4 - 1);
        sqe.set_cdw(11, 1);
        sqe.set_sgl(crate::protocol::command::Sgl::transport(LEN));
        let d = self.submit(sqe, None).await?;
        let short = || BlockError::Remote("short reservation report".into());
        let head = d.get(..64).ok_or_else(short)?;
        let n = u16::from_le_bytes([head[5], head[6]]) as usize;
        let mut r = Report {
            generation: u32::from_le_bytes([head[0], head[1], head[2], head[3]]),
            rtype: head[4],
            registrants: Vec::new(),
        };
        for i in 0..n {
            let e = d.get(64 + i * 64..128 + i * 64).ok_or_else(short)?;
            let mut host = [0u8; 16];
            host.copy_from_slice(&e[16..32]);
            let mut key = [0u8; 8];
            key.copy_from_slice(&e[8..16]);
            r.registrants
                .push((host, u64::from_le_bytes(key), e[2] & 1 != 0));
        }
        Ok(r)
    }
}
