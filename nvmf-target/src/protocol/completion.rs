//! The 16-byte NVMe completion queue entry (CQE).

use bytes::{Buf, BufMut};

use super::status::Status;

pub const CQE_LEN: usize = 16;

/// A completion queue entry. `result` is DW0 (low half) and DW1 (high half).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    pub result: u64,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

impl Cqe {
    pub fn new(cid: u16, status: Status) -> Cqe {
        Cqe {
            result: 0,
            sqhd: 0,
            sqid: 0,
            cid,
            status,
        }
    }

    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u64_le(self.result);
        dst.put_u16_le(self.sqhd);
        dst.put_u16_le(self.sqid);
        dst.put_u16_le(self.cid);
        dst.put_u16_le(self.status.to_wire());
    }

    pub fn decode(mut src: &[u8]) -> Option<Cqe> {
        if src.len() < CQE_LEN {
            return None;
        }
        Some(Cqe {
            result: src.get_u64_le(),
            sqhd: src.get_u16_le(),
            sqid: src.get_u16_le(),
            cid: src.get_u16_le(),
            status: Status::from_wire(src.get_u16_le() & !1),
        })
    }

    pub fn dw0(&self) -> u32 {
        self.result as u32
    }
}
