//! Round-trip and robustness tests of the PDU codec.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

use super::*;
use crate::protocol::command::Sqe;
use crate::protocol::completion::Cqe;
use crate::protocol::pdu::*;
use crate::protocol::status::Status;

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_data_pdu() -> impl Strategy<Value = DataPdu> {
    (
        any::<u16>(),
        any::<u16>(),
        any::<u32>(),
        arb_bytes(9000),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(cccid, ttag, offset, data, last, success)| DataPdu {
            cccid,
            ttag,
            offset,
            data,
            last,
            success,
        })
}

fn arb_pdu() -> impl Strategy<Value = Pdu> {
    let digests =
        (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data });
    prop_oneof![
        (any::<u16>(), 0u8..32, digests.clone(), any::<u32>()).prop_map(
            |(pfv, hpda, digests, maxr2t)| Pdu::IcReq(IcReq {
                pfv,
                hpda,
                digests,
                maxr2t
            })
        ),
        (any::<u16>(), 0u8..32, digests, any::<u32>()).prop_map(
            |(pfv, cpda, digests, maxh2cdata)| {
                Pdu::IcResp(IcResp {
                    pfv,
                    cpda,
                    digests,
                    maxh2cdata,
                })
            }
        ),
        (any::<u16>(), any::<u32>(), arb_bytes(129))
            .prop_map(|(fes, fei, header)| Pdu::C2HTermReq(TermReq { fes, fei, header })),
        (prop::collection::vec(any::<u8>(), 64), arb_bytes(9000)).prop_map(|(sqe, data)| {
            Pdu::CapsuleCmd(CapsuleCmd {
                sqe: Sqe::from_slice(&sqe).unwrap(),
                data,
            })
        }),
        (
            any::<u64>(),
            any::<u16>(),
            any::<u16>(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(result, sqhd, sqid, cid, st)| {
                Pdu::CapsuleResp(Cqe {
                    result,
                    sqhd,
                    sqid,
                    cid,
                    status: Status::from_wire(st & !(1 | 0x3000)),
                })
            }),
        arb_data_pdu().prop_map(Pdu::H2CData),
        arb_data_pdu().prop_map(Pdu::C2HData),
        (any::<u16>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
            |(cccid, ttag, offset, length)| Pdu::R2t(R2t {
                cccid,
                ttag,
                offset,
                length
            })
        ),
    ]
}

fn codec(header: bool, data: bool) -> PduCodec {
    let mut c = PduCodec::new(16 * 1024);
    c.set_digests(Digests { header, data });
    c
}

/// TermReq headers longer than 128 bytes are cut when encoded; normalise for comparison.
fn normalise(p: Pdu) -> Pdu {
    match p {
        Pdu::C2HTermReq(mut t) => {
            t.header = t.header.slice(..t.header.len().min(128));
            Pdu::C2HTermReq(t)
        }
        other => other,
    }
}

proptest! {
    #[test]
    fn every_pdu_round_trips(pdu in arb_pdu(), hd in any::<bool>(), dd in any::<bool>()) {
        let mut c = codec(hd, dd);
        let mut buf = BytesMut::new();
        c.encode(pdu.clone(), &mut buf).unwrap();
        let decoded = c.decode(&mut buf).unwrap().unwrap();
        prop_assert_eq!(decoded, normalise(pdu));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn pdus_decode_from_any_split(pdus in prop::collection::vec(arb_pdu(), 1..5), cut in any::<prop::sample::Index>()) {
        let mut c = codec(true, true);
        let mut wire = BytesMut::new();
        for p in &pdus {
            c.encode(p.clone(), &mut wire).unwrap();
        }
        let cut = cut.index(wire.len() + 1);
        let mut buf = BytesMut::from(&wire[..cut]);
        let mut out = Vec::new();
        while let Some(p) = c.decode(&mut buf).unwrap() { out.push(p); }
        buf.extend_from_slice(&wire[cut..]);
        while let Some(p) = c.decode(&mut buf).unwrap() { out.push(p); }
        prop_assert_eq!(out, pdus.into_iter().map(normalise).collect::<Vec<_>>());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), hd in any::<bool>(), dd in any::<bool>()) {
        let mut c = codec(hd, dd);
        let mut buf = BytesMut::from(&bytes[..]);
        for _ in 0..64 {
            match c.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn corrupted_valid_pdus_never_panic(pdu in arb_pdu(), pos in any::<prop::sample::Index>(), val in any::<u8>()) {
        let mut c = codec(true, true);
        let mut buf = BytesMut::new();
        c.encode(pdu, &mut buf).unwrap();
        let i = pos.index(buf.len());
        buf[i] = val;
        let _ = c.decode(&mut buf);
    }
}

fn encode(c: &mut PduCodec, pdu: Pdu) -> BytesMut {
    let mut b = BytesMut::new();
    c.encode(pdu, &mut b).unwrap();
    b
}

fn fes_of(r: Result<Option<Pdu>, CodecError>) -> (u16, u32) {
    match r {
        Err(CodecError::Protocol { fes, fei, .. }) => (fes, fei),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn wrong_hlen_is_an_invalid_header_field() {
    let mut c = codec(false, false);
    let mut b = encode(
        &mut c,
        Pdu::R2t(R2t {
            cccid: 1,
            ttag: 2,
            offset: 0,
            length: 4096,
        }),
    );
    b[2] = 23;
    assert_eq!(fes_of(c.decode(&mut b)), (fes::INVALID_HEADER_FIELD, 2));
}

#[test]
fn plen_beyond_limit_is_data_limit_exceeded() {
    let mut c = codec(false, false);
    let mut b = encode(
        &mut c,
        Pdu::H2CData(DataPdu {
            cccid: 1,
            ttag: 0,
            offset: 0,
            data: Bytes::from(vec![0; 64]),
            last: true,
            success: false,
        }),
    );
    b[4..8].copy_from_slice(&(1u32 << 30).to_le_bytes());
    assert_eq!(fes_of(c.decode(&mut b)), (fes::DATA_LIMIT_EXCEEDED, 4));
}

#[test]
fn pdo_inside_header_is_rejected() {
    let mut c = codec(false, false);
    let mut b = encode(
        &mut c,
        Pdu::H2CData(DataPdu {
            cccid: 1,
            ttag: 0,
            offset: 0,
            data: Bytes::from(vec![7; 64]),
            last: true,
            success: false,
        }),
    );
    b[3] = 8;
    assert_eq!(fes_of(c.decode(&mut b)), (fes::INVALID_HEADER_FIELD, 3));
}

#[test]
fn datal_disagreeing_with_plen_is_rejected() {
    let mut c = codec(false, false);
    let mut b = encode(
        &mut c,
        Pdu::H2CData(DataPdu {
            cccid: 1,
            ttag: 0,
            offset: 0,
            data: Bytes::from(vec![7; 64]),
            last: true,
            success: false,
        }),
    );
    b[16..20].copy_from_slice(&65u32.to_le_bytes());
    assert_eq!(fes_of(c.decode(&mut b)), (fes::INVALID_HEADER_FIELD, 16));
}

#[test]
fn header_digest_mismatch_is_detected() {
    let mut c = codec(true, false);
    let mut b = encode(
        &mut c,
        Pdu::R2t(R2t {
            cccid: 1,
            ttag: 2,
            offset: 0,
            length: 4096,
        }),
    );
    b[12] ^= 0xFF;
    assert_eq!(fes_of(c.decode(&mut b)), (fes::HEADER_DIGEST_ERROR, 24));
}

#[test]
fn data_digest_mismatch_is_its_own_error() {
    let mut c = codec(false, true);
    let mut b = encode(
        &mut c,
        Pdu::H2CData(DataPdu {
            cccid: 1,
            ttag: 0,
            offset: 0,
            data: Bytes::from(vec![7; 64]),
            last: true,
            success: false,
        }),
    );
    b[30] ^= 1;
    assert!(matches!(
        c.decode(&mut b),
        Err(CodecError::DataDigest { .. })
    ));
}

#[test]
fn unknown_type_is_rejected_at_byte_zero() {
    let mut c = codec(false, false);
    let mut b = BytesMut::from(&[0x08u8, 0, 24, 0, 24, 0, 0, 0][..]);
    assert_eq!(fes_of(c.decode(&mut b)), (fes::INVALID_HEADER_FIELD, 0));
}

#[test]
fn partial_pdu_waits_and_reserves() {
    let mut c = codec(false, false);
    let full = encode(
        &mut c,
        Pdu::H2CData(DataPdu {
            cccid: 1,
            ttag: 0,
            offset: 0,
            data: Bytes::from(vec![7; 8192]),
            last: true,
            success: false,
        }),
    );
    let mut b = BytesMut::from(&full[..100]);
    assert!(c.decode(&mut b).unwrap().is_none());
    assert!(b.capacity() >= full.len());
}

#[test]
fn large_data_arriving_in_pieces_decodes_page_aligned() {
    for (hd, dd) in [(false, false), (true, true)] {
        let mut c = PduCodec::new(1 << 20);
        c.set_digests(Digests {
            header: hd,
            data: dd,
        });
        let data: Bytes = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        let big = Pdu::H2CData(DataPdu {
            cccid: 3,
            ttag: 1,
            offset: 0,
            data: data.clone(),
            last: true,
            success: false,
        });
        let small = Pdu::CapsuleResp(Cqe::new(9, Status::SUCCESS));
        let mut wire = BytesMut::new();
        for p in [small.clone(), big.clone(), big.clone(), small.clone()] {
            c.encode(p, &mut wire).unwrap();
        }
        // Reads as FramedRead makes them: at most 60,001 bytes and never more than the buffer's spare room (it
        // reserves more only when the buffer is full), landing wherever the previous PDU left the buffer.
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            if buf.len() == buf.capacity() {
                buf.reserve(8 * 1024);
            }
            let n = rest.len().min(60_001).min(buf.capacity() - buf.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some(p) = c.decode(&mut buf).unwrap() {
                out.push(p);
            }
        }
        assert_eq!(out, vec![small.clone(), big.clone(), big, small], "hd={hd}");
        for p in &out[1..3] {
            let Pdu::H2CData(d) = p else { unreachable!() };
            assert_eq!(d.data.as_ptr() as usize % DATA_ALIGN, 0, "hd={hd}");
        }
    }
}

#[test]
fn icresp_layout_matches_linux_expectations() {
    let mut c = codec(false, false);
    let b = encode(
        &mut c,
        Pdu::IcResp(IcResp {
            pfv: 0,
            cpda: 0,
            digests: Digests {
                header: true,
                data: false,
            },
            maxh2cdata: 131072,
        }),
    );
    assert_eq!(b.len(), 128);
    assert_eq!(&b[..8], &[0x01, 0, 128, 0, 128, 0, 0, 0]);
    assert_eq!(b[11], 1);
    assert_eq!(&b[12..16], &131072u32.to_le_bytes());
}

#[test]
fn encode_parts_matches_encode() {
    let c = codec(true, true);
    let pdu = Pdu::C2HData(DataPdu {
        cccid: 3,
        ttag: 0,
        offset: 4096,
        data: Bytes::from(vec![9; 4096]),
        last: true,
        success: false,
    });
    let mut parts = Vec::new();
    c.encode_parts(&pdu, &mut BytesMut::new(), &mut parts);
    assert_eq!(parts.len(), 3);
    let joined: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    assert_eq!(&joined[..], &encode(&mut c.clone(), pdu)[..]);
}
