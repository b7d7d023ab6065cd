//! The data formats of Keelson's vendor I/O commands (opcodes in [`super::command::io`]), defined once: the target
//! decodes what the initiator encodes with these same functions, and each has a round-trip test.
//!
//! - Snapshot (0x81, host to controller): the snapshot's 16-byte UUID.
//! - Allocated ranges (0x82, controller to host): the query in CDW10-13 (first LBA, number of LBAs); the answer a
//!   16-byte header (u32 extent count, u32 reserved, u64 LBA to continue from or `u64::MAX` when done) and then
//!   (u64 LBA, u64 block count) extents, zero-padded to the transfer length.
//! - Missed-writes note (0x85, host to controller): one record as JSON. Forget (0x89): the child's name, UTF-8.
//!   Read (0x8A, controller to host): u32 length, then a JSON array of records, zero-padded. The record type is
//!   the caller's (`block::MissedWrites`): this module frames it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::command::Sqe;

/// A vendor command's data that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VendorError {
    #[error("{what}: {len} bytes, too short")]
    Short { what: &'static str, len: usize },
    #[error("{what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("{what}: needs {need} bytes, the transfer has {room}")]
    NoRoom {
        what: &'static str,
        need: usize,
        room: usize,
    },
}

fn malformed(what: &'static str, why: impl std::fmt::Display) -> VendorError {
    VendorError::Malformed {
        what,
        why: why.to_string(),
    }
}

/// Data of a snapshot command.
pub fn snapshot_data(id: uuid::Uuid) -> Bytes {
    Bytes::copy_from_slice(id.as_bytes())
}

pub fn parse_snapshot(data: &[u8]) -> Result<uuid::Uuid, VendorError> {
    uuid::Uuid::from_slice(data).map_err(|e| malformed("snapshot id", e))
}

/// The range an allocated-ranges query asks about, in LBAs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocatedQuery {
    pub slba: u64,
    pub nlb: u64,
}

impl AllocatedQuery {
    pub fn write_to(self, sqe: &mut Sqe) {
        sqe.set_cdw(10, self.slba as u32);
        sqe.set_cdw(11, (self.slba >> 32) as u32);
        sqe.set_cdw(12, self.nlb as u32);
        sqe.set_cdw(13, (self.nlb >> 32) as u32);
    }

    pub fn read_from(sqe: &Sqe) -> AllocatedQuery {
        AllocatedQuery {
            slba: u64::from(sqe.cdw(10)) | (u64::from(sqe.cdw(11)) << 32),
            nlb: u64::from(sqe.cdw(12)) | (u64::from(sqe.cdw(13)) << 32),
        }
    }
}

/// Smallest transfer an allocated-ranges answer needs (the header and one extent).
pub const ALLOCATED_MIN_LEN: usize = 32;
const ALLOCATED_HEADER: usize = 16;
const EXTENT: usize = 16;

/// An allocated-ranges answer: extents in LBAs and where to continue (`None`: all of the range was answered).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatedAnswer {
    pub extents: Vec<(u64, u64)>,
    pub next: Option<u64>,
}

impl AllocatedAnswer {
    /// Encodes as many `extents` (LBA, count) as fit `len` bytes; `next` says where the rest starts.
    pub fn encode(extents: &[(u64, u64)], len: usize) -> Bytes {
        let room = len.saturating_sub(ALLOCATED_HEADER) / EXTENT;
        let shown = &extents[..extents.len().min(room)];
        let next = if shown.len() < extents.len() {
            shown.last().map_or(u64::MAX, |(s, n)| s + n)
        } else {
            u64::MAX
        };
        let mut b = BytesMut::with_capacity(len);
        b.put_u32_le(shown.len() as u32);
        b.put_u32_le(0);
        b.put_u64_le(next);
        for (s, n) in shown {
            b.put_u64_le(*s);
            b.put_u64_le(*n);
        }
        b.resize(len.max(ALLOCATED_HEADER), 0);
        b.freeze()
    }

    pub fn decode(mut d: Bytes) -> Result<AllocatedAnswer, VendorError> {
        const WHAT: &str = "allocated-ranges answer";
        if d.len() < ALLOCATED_HEADER {
            return Err(VendorError::Short {
                what: WHAT,
                len: d.len(),
            });
        }
        let count = d.get_u32_le() as usize;
        d.advance(4);
        let next = d.get_u64_le();
        if d.len() / EXTENT < count {
            return Err(VendorError::Short {
                what: WHAT,
                len: d.len() + ALLOCATED_HEADER,
            });
        }
        let extents = (0..count)
            .map(|_| (d.get_u64_le(), d.get_u64_le()))
            .collect();
        Ok(AllocatedAnswer {
            extents,
            next: (next != u64::MAX).then_some(next),
        })
    }
}

/// Data of a missed-writes note: one record.
pub fn note_data<T: Serialize>(record: &T) -> Result<Bytes, VendorError> {
    serde_json::to_vec(record)
        .map(Bytes::from)
        .map_err(|e| malformed("missed-writes record", e))
}

pub fn parse_note<T: DeserializeOwned>(data: &[u8]) -> Result<T, VendorError> {
    serde_json::from_slice(data).map_err(|e| malformed("missed-writes record", e))
}

/// Data of a missed-writes forget: the child's name.
pub fn forget_data(child: &str) -> Bytes {
    Bytes::copy_from_slice(child.as_bytes())
}

pub fn parse_forget(data: &[u8]) -> Result<&str, VendorError> {
    std::str::from_utf8(data).map_err(|e| malformed("child name", e))
}

/// A missed-writes read answer of exactly `len` bytes.
pub fn missed_answer<T: Serialize>(records: &[T], len: usize) -> Result<Bytes, VendorError> {
    let json = serde_json::to_vec(records).map_err(|e| malformed("missed-writes records", e))?;
    if json.len() + 4 > len {
        return Err(VendorError::NoRoom {
            what: "missed-writes records",
            need: json.len() + 4,
            room: len,
        });
    }
    let mut b = BytesMut::with_capacity(len);
    b.put_u32_le(json.len() as u32);
    b.put_slice(&json);
    b.resize(len, 0);
    Ok(b.freeze())
}

pub fn parse_missed_answer<T: DeserializeOwned>(mut d: Bytes) -> Result<Vec<T>, VendorError> {
    const WHAT: &str = "missed-writes answer";
    if d.len() < 4 {
        return Err(VendorError::Short {
            what: WHAT,
            len: d.len(),
        });
    }
    let n = d.get_u32_le() as usize;
    let json = d.get(..n).ok_or(VendorError::Short {
        what: WHAT,
        len: d.len() + 4,
    })?;
    serde_json::from_slice(json).map_err(|e| malformed(WHAT, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Record {
        child: String,
        ranges: Vec<(u64, u64)>,
    }

    #[test]
    fn snapshot_and_forget_round_trip() {
        let id = uuid::Uuid::new_v4();
        assert_eq!(parse_snapshot(&snapshot_data(id)), Ok(id));
        assert!(parse_snapshot(&[1, 2, 3]).is_err());
        assert_eq!(
            parse_forget(&forget_data("nvmf://a/b?nsid=1")),
            Ok("nvmf://a/b?nsid=1")
        );
        assert!(parse_forget(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn the_allocated_query_lives_in_cdw10_to_13() {
        let q = AllocatedQuery {
            slba: 0x1_2345_6789,
            nlb: 0xA_0000_0001,
        };
        let mut sqe = Sqe::new(super::super::command::io::KEELSON_ALLOCATED, 1);
        q.write_to(&mut sqe);
        assert_eq!(AllocatedQuery::read_from(&sqe), q);
    }

    #[test]
    fn an_allocated_answer_too_long_for_its_transfer_says_where_to_go_on() {
        let extents: Vec<(u64, u64)> = (0..5).map(|i| (i * 100, 10)).collect();
        let full = AllocatedAnswer::decode(AllocatedAnswer::encode(&extents, 4096)).unwrap();
        assert_eq!(
            full,
            AllocatedAnswer {
                extents: extents.clone(),
                next: None
            }
        );
        let cut = AllocatedAnswer::decode(AllocatedAnswer::encode(&extents, 48)).unwrap();
        assert_eq!(cut.extents, extents[..2]);
        assert_eq!(cut.next, Some(110));
        assert!(AllocatedAnswer::decode(Bytes::from_static(&[1, 0, 0, 0])).is_err());
        let mut lying = BytesMut::from(&AllocatedAnswer::encode(&extents, 48)[..]);
        lying[0] = 200;
        assert!(AllocatedAnswer::decode(lying.freeze()).is_err());
    }

    #[test]
    fn missed_records_round_trip_and_refuse_a_transfer_too_small() {
        let rs = vec![Record {
            child: "c".into(),
            ranges: vec![(0, 4096), (1 << 20, 512)],
        }];
        let note = note_data(&rs[0]).unwrap();
        assert_eq!(parse_note::<Record>(&note).unwrap(), rs[0]);
        assert!(parse_note::<Record>(b"{").is_err());
        let answer = missed_answer(&rs, 4096).unwrap();
        assert_eq!(answer.len(), 4096);
        assert_eq!(parse_missed_answer::<Record>(answer).unwrap(), rs);
        assert!(matches!(
            missed_answer(&rs, 8),
            Err(VendorError::NoRoom { .. })
        ));
        assert!(parse_missed_answer::<Record>(Bytes::from_static(&[9, 0, 0, 0, b'['])).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = AllocatedAnswer::decode(Bytes::from(data.clone()));
            let _ = parse_missed_answer::<Record>(Bytes::from(data.clone()));
            let _ = parse_note::<Record>(&data);
            let _ = parse_snapshot(&data);
            let _ = parse_forget(&data);
        }

        #[test]
        fn allocated_answers_round_trip(extents in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..20)) {
            let a = AllocatedAnswer::decode(AllocatedAnswer::encode(&extents, 16 + 16 * extents.len())).unwrap();
            prop_assert_eq!(a.extents, extents);
            prop_assert_eq!(a.next, None);
        }
    }
}
