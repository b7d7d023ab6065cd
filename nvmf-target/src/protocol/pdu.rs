//! NVMe/TCP PDUs (NVMe/TCP transport spec, "PDU formats") as typed values. Framing, digests and validation of
//! lengths live in [`super::codec`]; this module only knows each PDU's fixed header layout.

use bytes::{Buf, BufMut, Bytes};

use super::command::Sqe;
use super::completion::Cqe;

/// Length of the common header every PDU starts with.
pub const CH_LEN: usize = 8;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// Most bytes of an offending PDU header a TermReq carries.
pub const TERM_REQ_MAX_DATA: usize = 128;

/// Common-header flag bits.
pub mod flags {
    pub const HDGSTF: u8 = 0x01;
    pub const DDGSTF: u8 = 0x02;
    pub const LAST_PDU: u8 = 0x04;
    pub const SUCCESS: u8 = 0x08;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PduType {
    IcReq = 0x00,
    IcResp = 0x01,
    H2CTermReq = 0x02,
    C2HTermReq = 0x03,
    CapsuleCmd = 0x04,
    CapsuleResp = 0x05,
    H2CData = 0x06,
    C2HData = 0x07,
    R2T = 0x09,
}

impl PduType {
    pub fn from_u8(v: u8) -> Option<PduType> {
        Some(match v {
            0x00 => PduType::IcReq,
            0x01 => PduType::IcResp,
            0x02 => PduType::H2CTermReq,
            0x03 => PduType::C2HTermReq,
            0x04 => PduType::CapsuleCmd,
            0x05 => PduType::CapsuleResp,
            0x06 => PduType::H2CData,
            0x07 => PduType::C2HData,
            0x09 => PduType::R2T,
            _ => return None,
        })
    }

    /// HLEN: the fixed header length of this PDU type (without header digest).
    pub fn header_len(self) -> usize {
        match self {
            PduType::IcReq | PduType::IcResp => 128,
            PduType::CapsuleCmd => 72,
            _ => 24,
        }
    }

    /// Whether a negotiated header digest applies to this type.
    pub fn has_header_digest(self) -> bool {
        !matches!(
            self,
            PduType::IcReq | PduType::IcResp | PduType::H2CTermReq | PduType::C2HTermReq
        )
    }

    /// Whether this type may carry data (and so a data digest).
    pub fn carries_data(self) -> bool {
        matches!(
            self,
            PduType::CapsuleCmd | PduType::H2CData | PduType::C2HData
        )
    }
}

/// Digests enabled on a connection (ICReq/ICResp DGST field).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

impl Digests {
    pub fn from_bits(b: u8) -> Digests {
        Digests {
            header: b & 1 != 0,
            data: b & 2 != 0,
        }
    }
    pub fn bits(self) -> u8 {
        u8::from(self.header) | (u8::from(self.data) << 1)
    }
}

/// Initialize Connection Request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcReq {
    pub pfv: u16,
    pub hpda: u8,
    pub digests: Digests,
    pub maxr2t: u32,
}

/// Initialize Connection Response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcResp {
    pub pfv: u16,
    pub cpda: u8,
    pub digests: Digests,
    pub maxh2cdata: u32,
}

/// Fatal error status of a TermReq.
pub mod fes {
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// H2CTermReq / C2HTermReq: a fatal error; the sender closes the connection after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TermReq {
    pub fes: u16,
    pub fei: u32,
    /// Up to 128 bytes of the offending PDU header.
    pub header: Bytes,
}

/// A command capsule: the SQE and any in-capsule data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapsuleCmd {
    pub sqe: Sqe,
    pub data: Bytes,
}

/// H2CData or C2HData.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataPdu {
    pub cccid: u16,
    /// Transfer tag (H2CData only; echoes the R2T).
    pub ttag: u16,
    /// Offset of `data` within the command's data.
    pub offset: u32,
    pub data: Bytes,
    pub last: bool,
    /// C2HData only: the command completed successfully, no CapsuleResp follows.
    pub success: bool,
}

/// Ready to Transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    pub cccid: u16,
    pub ttag: u16,
    pub offset: u32,
    pub length: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pdu {
    IcReq(IcReq),
    IcResp(IcResp),
    H2CTermReq(TermReq),
    C2HTermReq(TermReq),
    CapsuleCmd(CapsuleCmd),
    CapsuleResp(Cqe),
    H2CData(DataPdu),
    C2HData(DataPdu),
    R2t(R2t),
}

impl Pdu {
    pub fn pdu_type(&self) -> PduType {
        match self {
            Pdu::IcReq(_) => PduType::IcReq,
            Pdu::IcResp(_) => PduType::IcResp,
            Pdu::H2CTermReq(_) => PduType::H2CTermReq,
            Pdu::C2HTermReq(_) => PduType::C2HTermReq,
            Pdu::CapsuleCmd(_) => PduType::CapsuleCmd,
            Pdu::CapsuleResp(_) => PduType::CapsuleResp,
            Pdu::H2CData(_) => PduType::H2CData,
            Pdu::C2HData(_) => PduType::C2HData,
            Pdu::R2t(_) => PduType::R2T,
        }
    }

    /// The data this PDU carries (empty if none). TermReq's offending header is not "data" for digests.
    pub fn data(&self) -> Option<&Bytes> {
        match self {
            Pdu::CapsuleCmd(c) if !c.data.is_empty() => Some(&c.data),
            Pdu::H2CData(d) | Pdu::C2HData(d) => Some(&d.data),
            _ => None,
        }
    }

    /// Type-specific flag bits (LAST_PDU, SUCCESS).
    pub(super) fn type_flags(&self) -> u8 {
        match self {
            Pdu::H2CData(d) | Pdu::C2HData(d) => {
                (if d.last { flags::LAST_PDU } else { 0 })
                    | (if d.success { flags::SUCCESS } else { 0 })
            }
            _ => 0,
        }
    }

    /// Writes the PDU-specific header bytes that follow the common header (HLEN - 8 bytes).
    pub(super) fn put_specific_header(&self, dst: &mut impl BufMut) {
        match self {
            Pdu::IcReq(r) => {
                dst.put_u16_le(r.pfv);
                dst.put_u8(r.hpda);
                dst.put_u8(r.digests.bits());
                dst.put_u32_le(r.maxr2t);
                dst.put_bytes(0, 112);
            }
            Pdu::IcResp(r) => {
                dst.put_u16_le(r.pfv);
                dst.put_u8(r.cpda);
                dst.put_u8(r.digests.bits());
                dst.put_u32_le(r.maxh2cdata);
                dst.put_bytes(0, 112);
            }
            Pdu::H2CTermReq(t) | Pdu::C2HTermReq(t) => {
                dst.put_u16_le(t.fes);
                dst.put_u32_le(t.fei);
                dst.put_bytes(0, 10);
            }
            Pdu::CapsuleCmd(c) => dst.put_slice(&c.sqe.0),
            Pdu::CapsuleResp(cqe) => cqe.encode(dst),
            Pdu::H2CData(d) | Pdu::C2HData(d) => {
                dst.put_u16_le(d.cccid);
                dst.put_u16_le(d.ttag);
                dst.put_u32_le(d.offset);
                dst.put_u32_le(d.data.len() as u32);
                dst.put_u32_le(0);
            }
            Pdu::R2t(r) => {
                dst.put_u16_le(r.cccid);
                dst.put_u16_le(r.ttag);
                dst.put_u32_le(r.offset);
                dst.put_u32_le(r.length);
                dst.put_u32_le(0);
            }
        }
    }

    /// Parses the type-specific header (`hdr` is the whole HLEN header) with the PDU's data already cut out.
    /// Returns `Err(offset)` with the offset of a bad field.
    pub(super) fn from_parts(
        ty: PduType,
        flag_bits: u8,
        hdr: &[u8],
        data: Bytes,
    ) -> Result<Pdu, u32> {
        let mut b = &hdr[CH_LEN..];
        Ok(match ty {
            PduType::IcReq => Pdu::IcReq(IcReq {
                pfv: b.get_u16_le(),
                hpda: b.get_u8(),
                digests: Digests::from_bits(b.get_u8()),
                maxr2t: b.get_u32_le(),
            }),
            PduType::IcResp => Pdu::IcResp(IcResp {
                pfv: b.get_u16_le(),
                cpda: b.get_u8(),
                digests: Digests::from_bits(b.get_u8()),
                maxh2cdata: b.get_u32_le(),
            }),
            PduType::H2CTermReq | PduType::C2HTermReq => {
                let t = TermReq {
                    fes: b.get_u16_le(),
                    fei: b.get_u32_le(),
                    header: data,
                };
                if ty == PduType::H2CTermReq {
                    Pdu::H2CTermReq(t)
                } else {
                    Pdu::C2HTermReq(t)
                }
            }
            PduType::CapsuleCmd => {
                let sqe = Sqe::from_slice(b).ok_or(8u32)?;
                Pdu::CapsuleCmd(CapsuleCmd { sqe, data })
            }
            PduType::CapsuleResp => Pdu::CapsuleResp(Cqe::decode(b).ok_or(8u32)?),
            PduType::H2CData | PduType::C2HData => {
                let cccid = b.get_u16_le();
                let ttag = b.get_u16_le();
                let offset = b.get_u32_le();
                let datal = b.get_u32_le();
                if datal as usize != data.len() {
                    return Err(16);
                }
                let d = DataPdu {
                    cccid,
                    ttag,
                    offset,
                    data,
                    last: flag_bits & flags::LAST_PDU != 0,
                    success: flag_bits & flags::SUCCESS != 0,
                };
                if ty == PduType::H2CData {
                    Pdu::H2CData(d)
                } else {
                    Pdu::C2HData(d)
                }
            }
            PduType::R2T => Pdu::R2t(R2t {
                cccid: b.get_u16_le(),
                ttag: b.get_u16_le(),
                offset: b.get_u32_le(),
                length: b.get_u32_le(),
            }),
        })
    }
}
