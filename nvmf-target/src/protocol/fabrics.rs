//! NVMe over Fabrics commands: Connect (command fields and the 1024-byte Connect data) and Property Get/Set with the
//! controller registers they reach (CAP, VS, CC, CSTS).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::command::{Sqe, admin, fctype};
use super::nqn::{read_cstr, write_cstr};

pub const CONNECT_DATA_LEN: usize = 1024;
/// Controller ID a host sends on an admin Connect to ask for any controller (dynamic model).
pub const CNTLID_DYNAMIC: u16 = 0xFFFF;
/// Connect CATTR bit 2: the host disables SQ flow control on the queue (the controller reports SQHD 0xFFFF and may
/// end a successful read with its data PDU alone).
pub const DISABLE_SQ_FLOW_CONTROL: u8 = 0x04;

/// Fields of a Connect command (SQE bytes 40..52).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    pub recfmt: u16,
    pub qid: u16,
    /// Submission queue size, 0's based.
    pub sqsize: u16,
    pub cattr: u8,
    /// Keep-alive timeout in milliseconds (admin queue only).
    pub kato: u32,
}

impl Connect {
    pub fn from_sqe(sqe: &Sqe) -> Connect {
        let b = &sqe.0;
        Connect {
            recfmt: u16::from_le_bytes([b[40], b[41]]),
            qid: u16::from_le_bytes([b[42], b[43]]),
            sqsize: u16::from_le_bytes([b[44], b[45]]),
            cattr: b[46],
            kato: u32::from_le_bytes([b[48], b[49], b[50], b[51]]),
        }
    }

    pub fn to_sqe(&self) -> Sqe {
        let mut s = Sqe::new(admin::FABRICS, 0);
        s.0[4] = fctype::CONNECT;
        s.0[40..42].copy_from_slice(&self.recfmt.to_le_bytes());
        s.0[42..44].copy_from_slice(&self.qid.to_le_bytes());
        s.0[44..46].copy_from_slice(&self.sqsize.to_le_bytes());
        s.0[46] = self.cattr;
        s.0[48..52].copy_from_slice(&self.kato.to_le_bytes());
        s.set_sgl(super::command::Sgl::in_capsule(CONNECT_DATA_LEN as u32));
        s
    }

    /// CATTR bit 2: the host disabled SQ flow control.
    pub fn sq_flow_control_disabled(&self) -> bool {
        self.cattr & DISABLE_SQ_FLOW_CONTROL != 0
    }
}

/// The Connect command's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

impl ConnectData {
    /// Byte offsets of fields, for the IPO of an "invalid parameters" Connect response.
    pub const OFFSET_HOSTID: u16 = 0;
    pub const OFFSET_CNTLID: u16 = 16;
    pub const OFFSET_SUBNQN: u16 = 256;
    pub const OFFSET_HOSTNQN: u16 = 512;

    pub fn decode(b: &[u8]) -> Option<ConnectData> {
        if b.len() < CONNECT_DATA_LEN {
            return None;
        }
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[..16]);
        Some(ConnectData {
            hostid,
            cntlid: u16::from_le_bytes([b[16], b[17]]),
            subnqn: read_cstr(&b[256..512]),
            hostnqn: read_cstr(&b[512..768]),
        })
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::zeroed(CONNECT_DATA_LEN);
        b[..16].copy_from_slice(&self.hostid);
        b[16..18].copy_from_slice(&self.cntlid.to_le_bytes());
        write_cstr(&mut b[256..512], &self.subnqn);
        write_cstr(&mut b[512..768], &self.hostnqn);
        b.freeze()
    }
}

/// Controller register offsets reached by Property Get/Set.
pub mod property {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1C;
    pub const NSSR: u32 = 0x20;
    pub const CRTO: u32 = 0x68;
}

/// Controller Configuration (CC) bits.
pub mod cc {
    pub const EN: u32 = 1;
    pub const SHN_MASK: u32 = 0b11 << 14;
}

/// Controller Status (CSTS) bits.
pub mod csts {
    pub const RDY: u32 = 1;
    pub const CFS: u32 = 1 << 1;
    pub const SHST_COMPLETE: u32 = 0b10 << 2;
}

/// A Property Get or Set command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Property {
    /// 8-byte access (else 4).
    pub wide: bool,
    pub offset: u32,
    pub value: u64,
}

impl Property {
    pub fn from_sqe(sqe: &Sqe) -> Property {
        let b = &sqe.0;
        Property {
            wide: b[40] & 0x7 == 1,
            offset: (&b[44..48]).get_u32_le(),
            value: (&b[48..56]).get_u64_le(),
        }
    }

    pub fn get_sqe(offset: u32, wide: bool) -> Sqe {
        let mut s = Sqe::new(admin::FABRICS, 0);
        s.0[4] = fctype::PROPERTY_GET;
        s.0[40] = u8::from(wide);
        (&mut s.0[44..48]).put_u32_le(offset);
        s
    }

    pub fn set_sqe(offset: u32, value: u64, wide: bool) -> Sqe {
        let mut s = Self::get_sqe(offset, wide);
        s.0[4] = fctype::PROPERTY_SET;
        (&mut s.0[48..56]).put_u64_le(value);
        s
    }
}

/// CAP register: MQES (0's based), CQR, timeout in 500 ms units, NVM command set, MPSMIN = MPSMAX = 4 KiB.
pub fn cap_register(mqes: u16, timeout_500ms: u8) -> u64 {
    u64::from(mqes) | (1 << 16) | (u64::from(timeout_500ms) << 24) | (1u64 << 37)
}

/// MQES (0's based) from a CAP register value.
pub fn cap_mqes(cap: u64) -> u16 {
    cap as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_round_trips() {
        let c = Connect {
            recfmt: 0,
            qid: 3,
            sqsize: 127,
            cattr: 4,
            kato: 0,
        };
        assert_eq!(Connect::from_sqe(&c.to_sqe()), c);
        assert!(c.sq_flow_control_disabled());
        let d = ConnectData {
            hostid: [7; 16],
            cntlid: 0xFFFF,
            subnqn: "nqn.a".into(),
            hostnqn: "nqn.b".into(),
        };
        assert_eq!(ConnectData::decode(&d.encode()), Some(d));
        assert_eq!(ConnectData::decode(&[0; 100]), None);
    }

    #[test]
    fn property_layout() {
        let s = Property::set_sqe(property::CC, 0x460001, false);
        let p = Property::from_sqe(&s);
        assert_eq!((p.wide, p.offset, p.value), (false, 0x14, 0x460001));
        assert!(Property::from_sqe(&Property::get_sqe(property::CAP, true)).wide);
        assert_eq!(cap_mqes(cap_register(127, 30)), 127);
    }
}
