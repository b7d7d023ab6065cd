//! NVMe completion status: status code type (SCT), status code (SC), More and Do-Not-Retry, and the named statuses
//! Keelson returns. The wire form is the CQE's 16-bit status field (bit 0 is the phase tag, always 0 on fabrics).

use std::fmt;

/// A completion status. `dnr` tells the host not to retry the command.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub more: bool,
    pub dnr: bool,
}

/// Status code types.
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
    pub const PATH: u8 = 3;
}

const fn st(sct: u8, sc: u8, dnr: bool) -> Status {
    Status {
        sct,
        sc,
        more: false,
        dnr,
    }
}

impl Status {
    pub const SUCCESS: Status = st(sct::GENERIC, 0x00, false);
    pub const INVALID_OPCODE: Status = st(sct::GENERIC, 0x01, true);
    pub const INVALID_FIELD: Status = st(sct::GENERIC, 0x02, true);
    pub const COMMAND_ID_CONFLICT: Status = st(sct::GENERIC, 0x03, true);
    pub const DATA_TRANSFER_ERROR: Status = st(sct::GENERIC, 0x04, false);
    pub const INTERNAL_ERROR: Status = st(sct::GENERIC, 0x06, false);
    pub const ABORTED_BY_REQUEST: Status = st(sct::GENERIC, 0x07, false);
    pub const ABORTED_SQ_DELETION: Status = st(sct::GENERIC, 0x08, false);
    pub const INVALID_NAMESPACE: Status = st(sct::GENERIC, 0x0B, true);
    pub const COMMAND_SEQUENCE_ERROR: Status = st(sct::GENERIC, 0x0C, true);
    pub const SGL_DATA_LENGTH_INVALID: Status = st(sct::GENERIC, 0x0F, true);
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Status = st(sct::GENERIC, 0x11, true);
    pub const SGL_OFFSET_INVALID: Status = st(sct::GENERIC, 0x16, true);
    pub const KEEP_ALIVE_EXPIRED: Status = st(sct::GENERIC, 0x19, false);
    pub const KEEP_ALIVE_INVALID: Status = st(sct::GENERIC, 0x1A, true);
    pub const HOST_ID_INCONSISTENT_FORMAT: Status = st(sct::GENERIC, 0x18, true);
    pub const NAMESPACE_WRITE_PROTECTED: Status = st(sct::GENERIC, 0x20, true);
    pub const LBA_OUT_OF_RANGE: Status = st(sct::GENERIC, 0x80, true);
    pub const CAPACITY_EXCEEDED: Status = st(sct::GENERIC, 0x81, true);
    pub const NAMESPACE_NOT_READY: Status = st(sct::GENERIC, 0x82, false);
    pub const RESERVATION_CONFLICT: Status = st(sct::GENERIC, 0x83, true);

    pub const INVALID_QUEUE_IDENTIFIER: Status = st(sct::COMMAND_SPECIFIC, 0x01, true);
    pub const ASYNC_EVENT_LIMIT_EXCEEDED: Status = st(sct::COMMAND_SPECIFIC, 0x05, true);
    pub const INVALID_LOG_PAGE: Status = st(sct::COMMAND_SPECIFIC, 0x09, true);
    pub const FEATURE_NOT_SAVEABLE: Status = st(sct::COMMAND_SPECIFIC, 0x0D, true);
    pub const FEATURE_NOT_CHANGEABLE: Status = st(sct::COMMAND_SPECIFIC, 0x0E, true);
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status = st(sct::COMMAND_SPECIFIC, 0x80, true);
    pub const CONNECT_CONTROLLER_BUSY: Status = st(sct::COMMAND_SPECIFIC, 0x81, false);
    pub const CONNECT_INVALID_PARAMETERS: Status = st(sct::COMMAND_SPECIFIC, 0x82, true);
    pub const CONNECT_RESTART_DISCOVERY: Status = st(sct::COMMAND_SPECIFIC, 0x83, true);
    pub const CONNECT_INVALID_HOST: Status = st(sct::COMMAND_SPECIFIC, 0x84, true);

    pub const WRITE_FAULT: Status = st(sct::MEDIA, 0x80, false);
    pub const UNRECOVERED_READ_ERROR: Status = st(sct::MEDIA, 0x81, false);

    /// Path errors never carry DNR: the host must fail the I/O over to another path.
    pub const PATH_INTERNAL: Status = st(sct::PATH, 0x00, false);
    pub const ANA_PERSISTENT_LOSS: Status = st(sct::PATH, 0x01, false);
    pub const ANA_INACCESSIBLE: Status = st(sct::PATH, 0x02, false);
    pub const ANA_TRANSITION: Status = st(sct::PATH, 0x03, false);
    pub const HOST_ABORTED: Status = st(sct::PATH, 0x71, false);

    pub const fn is_success(self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// The same status as `named` (its type and code), whatever its More and Do Not Retry bits: how a host reads
    /// what a controller answered (a Reservation Conflict is one with or without DNR).
    pub const fn is(self, named: Status) -> bool {
        self.sct == named.sct && self.sc == named.sc
    }

    pub const fn without_dnr(self) -> Status {
        Status { dnr: false, ..self }
    }

    /// The CQE status field (phase tag 0).
    pub const fn to_wire(self) -> u16 {
        ((self.sc as u16) << 1)
            | (((self.sct & 0x7) as u16) << 9)
            | ((self.more as u16) << 14)
            | ((self.dnr as u16) << 15)
    }

    pub const fn from_wire(v: u16) -> Status {
        Status {
            sc: (v >> 1) as u8,
            sct: ((v >> 9) & 0x7) as u8,
            more: v & (1 << 14) != 0,
            dnr: v & (1 << 15) != 0,
        }
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Status(sct={:#x}, sc={:#04x}{})",
            self.sct,
            self.sc,
            if self.dnr { ", dnr" } else { "" }
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match (self.sct, self.sc) {
            (0, 0x00) => "success",
            (0, 0x01) => "invalid opcode",
            (0, 0x02) => "invalid field",
            (0, 0x04) => "data transfer error",
            (0, 0x06) => "internal error",
            (0, 0x07) => "aborted",
            (0, 0x0B) => "invalid namespace",
            (0, 0x0C) => "command sequence error",
            (0, 0x19) => "keep alive expired",
            (0, 0x80) => "LBA out of range",
            (0, 0x18) => "host identifier inconsistent format",
            (0, 0x20) => "namespace is write protected",
            (0, 0x81) => "capacity exceeded",
            (0, 0x83) => "reservation conflict",
            (1, 0x82) => "connect: invalid parameters",
            (1, 0x84) => "connect: host not allowed",
            (2, 0x80) => "write fault",
            (2, 0x81) => "unrecovered read error",
            (3, 0x02) => "ANA inaccessible",
            (3, 0x01) => "ANA persistent loss",
            (3, 0x03) => "ANA transition",
            (3, _) => "path error",
            _ => "error",
        };
        write!(f, "{name} ({self:?})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_value_matches_linux_constant() {
        // Linux stores status >> 1; its NVME_SC_ANA_INACCESSIBLE is 0x302.
        assert_eq!(Status::ANA_INACCESSIBLE.to_wire() >> 1, 0x302);
        assert_eq!(Status::INVALID_FIELD.to_wire(), 0x8004);
    }

    #[test]
    fn round_trip_every_bit_pattern() {
        for v in 0..=u16::MAX {
            let v = v & !1; // phase bit is not part of Status
            let v = v & !(0b11 << 12); // CRD is not modelled
            assert_eq!(Status::from_wire(v).to_wire(), v);
        }
    }
}
