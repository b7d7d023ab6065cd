//! Framing of NVMe/TCP PDUs for tokio-util: [`PduCodec`] decodes a byte stream into [`Pdu`]s (checking lengths,
//! offsets and CRC32C digests) and encodes PDUs, either into one buffer or as a list of segments for vectored writes
//! so that payloads are never copied.
//!
//! "Not enough bytes yet" is `Ok(None)` after reserving room for the whole PDU; anything malformed is a
//! [`CodecError::Protocol`] carrying the TermReq fatal error status (FES) and the offset of the offending field (FEI).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::pdu::{CH_LEN, DIGEST_LEN, Digests, Pdu, PduType, TERM_REQ_MAX_DATA, fes, flags};

/// Why a byte stream is not a valid PDU sequence.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("connection i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed PDU (FES {fes:#x}, field at byte {fei}): {reason}")]
    Protocol {
        fes: u16,
        fei: u32,
        reason: &'static str,
        /// Up to 128 bytes of the offending header, for the TermReq.
        header: Bytes,
    },
    #[error("data digest mismatch on PDU type {pdu_type:?}")]
    DataDigest { pdu_type: PduType },
}

/// Data payloads at least this long are received straight into page-aligned memory (see [`land_data_aligned`]).
const ALIGNED_DATA_MIN: usize = 64 * 1024;
/// The alignment large payloads are received at: a page, what O_DIRECT asks of the memory it writes from.
pub const DATA_ALIGN: usize = 4096;
/// Room kept after a large PDU's buffer for the header of the next one.
const NEXT_HEADER_ROOM: usize = 4096;

/// Moves the start of a large data PDU (its header and what of its data has arrived) into a buffer of its own, sized
/// to the whole PDU, where the data lands page-aligned. The rest of the payload is then read from the socket to its
/// final place: a write's data reaches an O_DIRECT file, and a read's data its caller, without another copy, and
/// the buffer never grows by copying. Only the bytes already received move, and since the buffer ends just past
/// this PDU, the next large PDU finds only its own header and a little data here to move.
fn land_data_aligned(src: &mut BytesMut, pdo: usize, plen: usize) {
    let data_at = src.as_ptr() as usize + pdo;
    if data_at.is_multiple_of(DATA_ALIGN) && src.capacity() >= plen {
        return;
    }
    let mut b = BytesMut::with_capacity(plen + NEXT_HEADER_ROOM + DATA_ALIGN);
    let pad = (DATA_ALIGN - (b.as_ptr() as usize + pdo) % DATA_ALIGN) % DATA_ALIGN;
    b.put_bytes(0, pad);
    b.advance(pad);
    b.extend_from_slice(src);
    *src = b;
}

/// Encoder and decoder of PDUs for one connection. Digests start off and are switched on after ICReq/ICResp.
#[derive(Clone, Debug)]
pub struct PduCodec {
    digests: Digests,
    max_data: usize,
}

/// CRC32C as NVMe/TCP uses it (seed and final XOR 0xFFFFFFFF), stored little-endian.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

impl PduCodec {
    /// `max_data`: the largest data payload one PDU may carry.
    pub fn new(max_data: usize) -> PduCodec {
        PduCodec {
            digests: Digests::default(),
            max_data,
        }
    }

    pub fn set_digests(&mut self, digests: Digests) {
        self.digests = digests;
    }

    pub fn digests(&self) -> Digests {
        self.digests
    }

    pub fn set_max_data(&mut self, max_data: usize) {
        self.max_data = max_data;
    }

    /// Encodes `pdu` as segments: header (with digest) from `scratch`, then the payload itself (not copied), then
    /// its digest. Appending these to a vectored write sends exactly what [`Encoder::encode`] would.
    pub fn encode_parts(&self, pdu: &Pdu, scratch: &mut BytesMut, out: &mut Vec<Bytes>) {
        let ty = pdu.pdu_type();
        let hlen = ty.header_len();
        let hd = self.digests.header && ty.has_header_digest();
        let term_data = match pdu {
            Pdu::H2CTermReq(t) | Pdu::C2HTermReq(t) => {
                Some(t.header.slice(..t.header.len().min(TERM_REQ_MAX_DATA)))
            }
            _ => None,
        };
        let data = pdu.data().filter(|d| !d.is_empty());
        let dd = self.digests.data && data.is_some();
        let data_len = data.map_or(0, Bytes::len) + term_data.as_ref().map_or(0, Bytes::len);
        let hdr_end = hlen + if hd { DIGEST_LEN } else { 0 };
        let plen = hdr_end + data_len + if dd { DIGEST_LEN } else { 0 };
        let pdo = if data.is_some() { hdr_end } else { 0 };

        scratch.reserve(hdr_end + DIGEST_LEN);
        let start = scratch.len();
        scratch.put_u8(ty as u8);
        scratch.put_u8(
            pdu.type_flags()
                | if hd { flags::HDGSTF } else { 0 }
                | if dd { flags::DDGSTF } else { 0 },
        );
        scratch.put_u8(hlen as u8);
        scratch.put_u8(pdo as u8);
        scratch.put_u32_le(plen as u32);
        pdu.put_specific_header(scratch);
        if hd {
            let crc = crc32c(&scratch[start..start + hlen]);
            scratch.put_u32_le(crc);
        }
        if let Some(t) = term_data {
            scratch.put_slice(&t);
        }
        out.push(scratch.split().freeze());
        if let Some(d) = data {
            out.push(d.clone());
            if dd {
                scratch.put_u32_le(crc32c(d));
                out.push(scratch.split().freeze());
            }
        }
    }

    fn protocol_error(src: &[u8], fes: u16, fei: u32, reason: &'static str) -> CodecError {
        let n = src.len().min(TERM_REQ_MAX_DATA);
        CodecError::Protocol {
            fes,
            fei,
            reason,
            header: Bytes::copy_from_slice(&src[..n]),
        }
    }
}

impl Decoder for PduCodec {
    type Item = Pdu;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Pdu>, CodecError> {
        if src.len() < CH_LEN {
            return Ok(None);
        }
        let bad = |src: &[u8], fes: u16, fei: u32, reason| {
            Err(Self::protocol_error(src, fes, fei, reason))
        };
        let Some(ty) = PduType::from_u8(src[0]) else {
            return bad(src, fes::INVALID_HEADER_FIELD, 0, "unknown PDU type");
        };
        let flag_bits = src[1];
        let hlen = usize::from(src[2]);
        let pdo = usize::from(src[3]);
        let plen = (&src[4..8]).get_u32_le() as usize;
        if hlen != ty.header_len() {
            return bad(
                src,
                fes::INVALID_HEADER_FIELD,
                2,
                "HLEN does not match the PDU type",
            );
        }
        let hd = self.digests.header && ty.has_header_digest();
        if (flag_bits & flags::HDGSTF != 0) != hd {
            return bad(
                src,
                fes::INVALID_HEADER_FIELD,
                1,
                "header digest flag differs from what was negotiated",
            );
        }
        let dd = flag_bits & flags::DDGSTF != 0;
        if dd && !(self.digests.data && ty.carries_data()) {
            return bad(
                src,
                fes::INVALID_HEADER_FIELD,
                1,
                "data digest flag set where none was negotiated",
            );
        }
        let hdr_end = hlen + if hd { DIGEST_LEN } else { 0 };
        let max_plen = match ty {
            PduType::H2CTermReq | PduType::C2HTermReq => hlen + TERM_REQ_MAX_DATA,
            t if t.carries_data() => hdr_end + 255 + self.max_data + DIGEST_LEN,
            _ => hdr_end,
        };
        if plen < hdr_end || plen > max_plen {
            let fes = if plen > max_plen && ty.carries_data() {
                fes::DATA_LIMIT_EXCEEDED
            } else {
                fes::INVALID_HEADER_FIELD
            };
            return bad(src, fes, 4, "PLEN out of range for the PDU type");
        }
        if src.len() < plen {
            if ty.carries_data() && (hdr_end..plen).contains(&pdo) && plen - pdo >= ALIGNED_DATA_MIN
            {
                land_data_aligned(src, pdo, plen);
            }
            src.reserve(plen - src.len());
            return Ok(None);
        }
        let buf = src.split_to(plen).freeze();
        if hd {
            let want = (&buf[hlen..hlen + DIGEST_LEN]).get_u32_le();
            if crc32c(&buf[..hlen]) != want {
                return bad(
                    &buf,
                    fes::HEADER_DIGEST_ERROR,
                    hlen as u32,
                    "header digest mismatch",
                );
            }
        }
        let data = if matches!(ty, PduType::H2CTermReq | PduType::C2HTermReq) {
            buf.slice(hlen..)
        } else if plen > hdr_end {
            if pdo < hdr_end || pdo > plen {
                return bad(&buf, fes::INVALID_HEADER_FIELD, 3, "PDO outside the PDU");
            }
            let data_end = plen - if dd { DIGEST_LEN } else { 0 };
            if data_end < pdo {
                return bad(
                    &buf,
                    fes::INVALID_HEADER_FIELD,
                    4,
                    "PLEN too short for PDO and data digest",
                );
            }
            if data_end - pdo > self.max_data {
                return bad(
                    &buf,
                    fes::DATA_LIMIT_EXCEEDED,
                    4,
                    "data longer than allowed",
                );
            }
            if self.digests.data && !dd && data_end > pdo {
                return bad(&buf, fes::INVALID_HEADER_FIELD, 1, "data digest missing");
            }
            let data = buf.slice(pdo..data_end);
            if dd && crc32c(&data) != (&buf[data_end..]).get_u32_le() {
                return Err(CodecError::DataDigest { pdu_type: ty });
            }
            data
        } else {
            if dd {
                return bad(
                    &buf,
                    fes::INVALID_HEADER_FIELD,
                    1,
                    "data digest flag without data",
                );
            }
            Bytes::new()
        };
        match Pdu::from_parts(ty, flag_bits, &buf[..hlen], data) {
            Ok(pdu) => Ok(Some(pdu)),
            Err(fei) => bad(
                &buf,
                fes::INVALID_HEADER_FIELD,
                fei,
                "inconsistent PDU-specific header",
            ),
        }
    }
}

impl Encoder<Pdu> for PduCodec {
    type Error = CodecError;

    fn encode(&mut self, pdu: Pdu, dst: &mut BytesMut) -> Result<(), CodecError> {
        let mut parts = Vec::with_capacity(3);
        let mut scratch = BytesMut::new();
        self.encode_parts(&pdu, &mut scratch, &mut parts);
        for p in parts {
            dst.extend_from_slice(&p);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
