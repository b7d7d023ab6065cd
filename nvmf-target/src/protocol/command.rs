//! The 64-byte NVMe submission queue entry (SQE), its SGL descriptor, and the opcodes Keelson speaks.
//! [`Sqe`] is a thin typed view over the raw bytes, so a command built by the initiator is exactly what goes on the
//! wire and a command received by the target is never copied into another shape.

use bytes::{Buf, BufMut};

pub const SQE_LEN: usize = 64;

/// Admin command opcodes.
pub mod admin {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0A;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    pub const KEEP_ALIVE: u8 = 0x18;
    pub const FABRICS: u8 = 0x7F;
}

/// NVM command set (I/O queue) opcodes.
pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    pub const RESERVATION_REGISTER: u8 = 0x0D;
    pub const RESERVATION_REPORT: u8 = 0x0E;
    pub const RESERVATION_ACQUIRE: u8 = 0x11;
    pub const RESERVATION_RELEASE: u8 = 0x15;

    /// Whether `opcode` is one of the four reservation commands.
    pub const fn is_reservation(opcode: u8) -> bool {
        matches!(
            opcode,
            RESERVATION_REGISTER | RESERVATION_REPORT | RESERVATION_ACQUIRE | RESERVATION_RELEASE
        )
    }
    /// Keelson vendor command (controller-to-host data): which LBAs of a range hold data (format in
    /// [`crate::protocol::vendor`]).
    pub const KEELSON_ALLOCATED: u8 = 0x82;
    /// Keelson vendor command (host-to-controller data): snapshot the namespace. The host quiesces its own writes
    /// first; the snapshot holds every write completed before it.
    pub const KEELSON_SNAPSHOT: u8 = 0x81;
    /// Keelson vendor commands for a nexus's persisted write log: note (host-to-controller: one record, merged),
    /// forget (host-to-controller: the child's name), read (controller-to-host: every record).
    pub const KEELSON_MISSED_NOTE: u8 = 0x85;
    pub const KEELSON_MISSED_FORGET: u8 = 0x89;
    pub const KEELSON_MISSED_READ: u8 = 0x8A;
}

/// What an I/O command does to its namespace: the class that access checks (reservations, ANA) decide on. Every
/// path to a namespace (NVMe/TCP and a local nexus child) classifies its commands with this and asks one check
/// (`target::access`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads user data, or which of it is allocated.
    ReadsData,
    /// Reads replica metadata (missed-writes records).
    ReadsMetadata,
    /// Changes user data, or makes it durable: write, write zeroes, deallocate, flush.
    WritesData,
    /// Changes replica metadata: missed-writes records, snapshots.
    WritesMetadata,
    /// A reservation command: governed by the reservation rules themselves.
    Reservation,
}

impl Access {
    /// The class of I/O opcode `opcode`; `None` for an opcode Keelson does not serve.
    pub fn of(opcode: u8) -> Option<Access> {
        Some(match opcode {
            io::READ | io::KEELSON_ALLOCATED => Access::ReadsData,
            io::KEELSON_MISSED_READ => Access::ReadsMetadata,
            io::WRITE | io::WRITE_ZEROES | io::DATASET_MANAGEMENT | io::FLUSH => Access::WritesData,
            io::KEELSON_SNAPSHOT | io::KEELSON_MISSED_NOTE | io::KEELSON_MISSED_FORGET => {
                Access::WritesMetadata
            }
            io::RESERVATION_REGISTER
            | io::RESERVATION_REPORT
            | io::RESERVATION_ACQUIRE
            | io::RESERVATION_RELEASE => Access::Reservation,
            _ => return None,
        })
    }

    /// Whether the command changes the namespace (data or metadata).
    pub fn modifies(self) -> bool {
        matches!(self, Access::WritesData | Access::WritesMetadata)
    }
}

/// Reservation command fields: actions (CDW10 bits 2:0) and reservation types (CDW10 bits 15:8).
pub mod resv {
    pub const REGISTER: u8 = 0;
    pub const UNREGISTER: u8 = 1;
    pub const REPLACE: u8 = 2;
    pub const ACQUIRE: u8 = 0;
    pub const PREEMPT: u8 = 1;
    pub const PREEMPT_AND_ABORT: u8 = 2;
    pub const RELEASE: u8 = 0;
    pub const CLEAR: u8 = 1;
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 2;
    pub const WRITE_EXCLUSIVE_REG_ONLY: u8 = 3;
    pub const EXCLUSIVE_ACCESS_REG_ONLY: u8 = 4;
    pub const WRITE_EXCLUSIVE_ALL_REGS: u8 = 5;
    pub const EXCLUSIVE_ACCESS_ALL_REGS: u8 = 6;
    /// CDW10 bit 3: ignore the existing key.
    pub const IEKEY: u32 = 1 << 3;
}

/// Fabrics command types (SQE byte 4 when the opcode is [`admin::FABRICS`]).
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTH_SEND: u8 = 0x05;
    pub const AUTH_RECV: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

/// Which way a command moves data, from the low two bits of its opcode (or fabrics command type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    None,
    HostToController,
    ControllerToHost,
    Bidirectional,
}

impl Direction {
    pub fn of(code: u8) -> Direction {
        match code & 0b11 {
            0b00 => Direction::None,
            0b01 => Direction::HostToController,
            0b10 => Direction::ControllerToHost,
            _ => Direction::Bidirectional,
        }
    }
}

/// SGL descriptor types (byte 15 of the descriptor) that NVMe/TCP uses.
pub mod sgl_kind {
    /// Data Block, subtype Offset: data is in the command capsule at `address`.
    pub const IN_CAPSULE: u8 = 0x01;
    /// Transport Data Block, transport specific: data moves by R2T/H2CData or C2HData.
    pub const TRANSPORT: u8 = 0x5A;
}

/// The SGL descriptor in DPTR (SQE bytes 24..40).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sgl {
    pub address: u64,
    pub length: u32,
    pub kind: u8,
}

impl Sgl {
    pub fn in_capsule(length: u32) -> Sgl {
        Sgl {
            address: 0,
            length,
            kind: sgl_kind::IN_CAPSULE,
        }
    }
    pub fn transport(length: u32) -> Sgl {
        Sgl {
            address: 0,
            length,
            kind: sgl_kind::TRANSPORT,
        }
    }
}

/// A submission queue entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sqe(pub [u8; SQE_LEN]);

impl std::fmt::Debug for Sqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sqe(opc={:#04x}, cid={}, nsid={}, cdw10={:#x})",
            self.opcode(),
            self.cid(),
            self.nsid(),
            self.cdw(10)
        )
    }
}

impl Sqe {
    pub fn new(opcode: u8, nsid: u32) -> Sqe {
        let mut s = Sqe([0; SQE_LEN]);
        s.0[0] = opcode;
        s.0[1] = 0x40; // PSDT = SGL for data
        s.set_nsid(nsid);
        s
    }

    pub fn from_slice(b: &[u8]) -> Option<Sqe> {
        let arr: [u8; SQE_LEN] = b.get(..SQE_LEN)?.try_into().ok()?;
        Some(Sqe(arr))
    }

    pub fn opcode(&self) -> u8 {
        self.0[0]
    }
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn cid(&self) -> u16 {
        (&self.0[2..4]).get_u16_le()
    }
    pub fn set_cid(&mut self, cid: u16) {
        (&mut self.0[2..4]).put_u16_le(cid);
    }
    pub fn nsid(&self) -> u32 {
        (&self.0[4..8]).get_u32_le()
    }
    pub fn set_nsid(&mut self, nsid: u32) {
        (&mut self.0[4..8]).put_u32_le(nsid);
    }
    /// Fabrics command type; meaningful only for opcode 0x7F (it overlays NSID byte 0).
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
    /// Command dword `n` (0..16).
    pub fn cdw(&self, n: usize) -> u32 {
        (&self.0[n * 4..n * 4 + 4]).get_u32_le()
    }
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        (&mut self.0[n * 4..n * 4 + 4]).put_u32_le(v);
    }
    pub fn sgl(&self) -> Sgl {
        let mut b = &self.0[24..40];
        let address = b.get_u64_le();
        let length = b.get_u32_le();
        Sgl {
            address,
            length,
            kind: self.0[39],
        }
    }
    pub fn set_sgl(&mut self, sgl: Sgl) {
        let mut b = &mut self.0[24..40];
        b.put_u64_le(sgl.address);
        b.put_u32_le(sgl.length);
        b.put_bytes(0, 3);
        b.put_u8(sgl.kind);
    }

    /// Direction of data transfer for this command.
    pub fn direction(&self) -> Direction {
        if self.opcode() == admin::FABRICS {
            Direction::of(self.fctype())
        } else {
            Direction::of(self.opcode())
        }
    }

    /// Starting LBA of a Read/Write/Write Zeroes.
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw(10)) | (u64::from(self.cdw(11)) << 32)
    }
    /// Number of logical blocks (the wire value is 0's based).
    pub fn nlb(&self) -> u32 {
        (self.cdw(12) & 0xFFFF) + 1
    }
    /// Force Unit Access bit of a Read, Write or Write Zeroes.
    pub fn fua(&self) -> bool {
        self.cdw(12) & (1 << 30) != 0
    }

    /// A Read or Write of `nlb` blocks at `slba`.
    pub fn rw(opcode: u8, nsid: u32, slba: u64, nlb: u32, data_len: u32, in_capsule: bool) -> Sqe {
        let mut s = Sqe::new(opcode, nsid);
        s.set_cdw(10, slba as u32);
        s.set_cdw(11, (slba >> 32) as u32);
        s.set_cdw(12, nlb.saturating_sub(1) & 0xFFFF);
        s.set_sgl(if in_capsule {
            Sgl::in_capsule(data_len)
        } else {
            Sgl::transport(data_len)
        });
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_land_at_spec_offsets() {
        let mut s = Sqe::rw(io::WRITE, 7, 0x1_0000_0002, 8, 4096, true);
        s.set_cid(0x1234);
        assert_eq!(s.0[0], 0x01);
        assert_eq!(&s.0[2..4], &[0x34, 0x12]);
        assert_eq!(s.nsid(), 7);
        assert_eq!(s.slba(), 0x1_0000_0002);
        assert_eq!(s.nlb(), 8);
        assert_eq!(s.sgl(), Sgl::in_capsule(4096));
        assert_eq!(s.0[39], 0x01);
        assert_eq!(s.direction(), Direction::HostToController);
        assert_eq!(
            Sqe::new(io::READ, 1).direction(),
            Direction::ControllerToHost
        );
    }
}
