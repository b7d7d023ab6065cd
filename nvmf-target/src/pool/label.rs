//! The pool label: the first 4 KiB of a pool's device. It names the pool and fixes the layout (where the journal,
//! the two checkpoint areas and the data clusters are), and says who owns it: the node that imported it last and
//! that import's incarnation number, bumped at every import. It is written when the pool is created and rewritten
//! (one atomic sector) at every import; it is checked (magic, version, CRC32C, layout against the device size) every
//! time the pool is imported, and its owner before every metadata commit (see `journal`).
//!
//! Version 2 added the owner and incarnation; a version 1 label (no owner) still imports, and is rewritten as
//! version 2 by that import, which older io-engines then refuse to import.
//!
//! ```text
//! 0        label (4 KiB)
//! 4 KiB    journal (JOURNAL_LEN)
//!          checkpoint A (ckpt_len)
//!          checkpoint B (ckpt_len)
//! data     clusters (cluster-aligned), cluster i at data_offset + i * cluster_size
//! ```

use bytes::{Buf, BufMut, BytesMut};
use uuid::Uuid;

use super::PoolError;

pub const LABEL_LEN: u64 = 4096;
/// The label's contents and checksum fit the first 512-byte sector, which a device writes atomically: a torn
/// label write leaves either the old sector or the new one.
const SECTOR: usize = 512;
const MAGIC: &[u8; 8] = b"KEELPOOL";
pub const VERSION: u32 = 2;
/// The oldest label version this io-engine imports.
const OLDEST_VERSION: u32 = 1;
const NAME_LEN: usize = 64;
/// Room for the owner's node name (a Kubernetes node name is at most 253 bytes).
const OWNER_LEN: usize = 256;
/// Journal size: room for 1024 one-block transactions between checkpoints.
pub const JOURNAL_LEN: u64 = 4 << 20;
/// Metadata budget per data cluster in each checkpoint area (volume maps are stored as runs; see `meta`).
pub const CKPT_BYTES_PER_CLUSTER: u64 = 256;
const CKPT_MIN: u64 = 1 << 20;

/// Smallest and largest cluster sizes a pool accepts.
pub const MIN_CLUSTER: u32 = 64 << 10;
pub const MAX_CLUSTER: u32 = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub uuid: Uuid,
    pub name: String,
    pub block_size: u32,
    pub cluster_size: u32,
    pub device_size: u64,
    pub journal_offset: u64,
    pub journal_len: u64,
    pub ckpt_offset: [u64; 2],
    pub ckpt_len: u64,
    pub data_offset: u64,
    pub data_clusters: u64,
    /// The node that imported (or created) the pool last; empty in a version 1 label.
    pub owner: String,
    /// Bumped at every import: which import of the pool this is.
    pub incarnation: u64,
    /// Whether the pool keeps all its disk's space (a file given its space up front, `fallocate`) rather than giving
    /// freed clusters' space back: found when the pool is made (or, for a pool made before it was recorded, at its
    /// first import since) and kept, since a file the pool itself once wrote through looks the same. `None` where
    /// not recorded yet. Kept in the label's flags word (older io-engines ignore it).
    pub keeps_space: Option<bool>,
}

/// The label's flags: the space policy is recorded, and what it is.
const FLAG_SPACE_RECORDED: u32 = 1;
const FLAG_KEEPS_SPACE: u32 = 2;

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Label {
    /// Lays out a new pool on a device of `device_size` bytes.
    pub fn layout(
        uuid: Uuid,
        name: &str,
        block_size: u32,
        cluster_size: u32,
        device_size: u64,
    ) -> Result<Label, PoolError> {
        check_name("pool name", name, NAME_LEN)?;
        if !cluster_size.is_power_of_two()
            || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cluster_size)
            || cluster_size < block_size
        {
            return Err(PoolError::InvalidArgument(format!(
                "cluster size {cluster_size} must be a power of two from {MIN_CLUSTER} to {MAX_CLUSTER}"
            )));
        }
        let cs = u64::from(cluster_size);
        // Cluster numbers are 32-bit, the last one meaning unmapped: a device with more clusters than that needs
        // larger ones (and its checkpoint areas would not fit a sane size anyway).
        let max_clusters = device_size / cs;
        if max_clusters >= u64::from(super::meta::UNMAPPED) {
            return Err(PoolError::InvalidArgument(format!(
                "a device of {device_size} bytes has {max_clusters} clusters of {cluster_size} bytes; at most {} \
                 (use larger clusters)",
                u64::from(super::meta::UNMAPPED) - 1
            )));
        }
        let ckpt_len = align_up(
            CKPT_MIN.max(max_clusters * CKPT_BYTES_PER_CLUSTER),
            LABEL_LEN,
        );
        let journal_offset = LABEL_LEN;
        let ckpt_a = journal_offset + JOURNAL_LEN;
        let ckpt_b = ckpt_a + ckpt_len;
        let data_offset = align_up(ckpt_b + ckpt_len, cs);
        let data_clusters = device_size.saturating_sub(data_offset) / cs;
        if data_clusters == 0 {
            return Err(PoolError::InvalidArgument(format!(
                "a device of {device_size} bytes is too small for a pool with {cluster_size}-byte clusters \
                 (metadata needs {data_offset} bytes)"
            )));
        }
        Ok(Label {
            uuid,
            name: name.to_string(),
            block_size,
            cluster_size,
            device_size,
            journal_offset,
            journal_len: JOURNAL_LEN,
            ckpt_offset: [ckpt_a, ckpt_b],
            ckpt_len,
            data_offset,
            data_clusters,
            owner: String::new(),
            incarnation: 0,
            keeps_space: None,
        })
    }

    /// The label as `node` imports it: owned by `node`, one incarnation later.
    pub fn claimed_by(&self, node: &str) -> Result<Label, PoolError> {
        check_name("node name", node, OWNER_LEN)?;
        Ok(Label {
            owner: node.to_string(),
            incarnation: self.incarnation + 1,
            ..self.clone()
        })
    }

    pub fn capacity(&self) -> u64 {
        self.data_clusters * u64::from(self.cluster_size)
    }

    pub fn cluster_offset(&self, cluster: u32) -> u64 {
        self.data_offset + u64::from(cluster) * u64::from(self.cluster_size)
    }

    pub fn encode(&self) -> BytesMut {
        let mut b = BytesMut::with_capacity(LABEL_LEN as usize);
        b.put_slice(MAGIC);
        b.put_u32_le(VERSION);
        b.put_u32_le(match self.keeps_space {
            None => 0,
            Some(false) => FLAG_SPACE_RECORDED,
            Some(true) => FLAG_SPACE_RECORDED | FLAG_KEEPS_SPACE,
        });
        b.put_slice(self.uuid.as_bytes());
        put_name(&mut b, &self.name, NAME_LEN);
        b.put_u32_le(self.block_size);
        b.put_u32_le(self.cluster_size);
        for v in [
            self.device_size,
            self.journal_offset,
            self.journal_len,
            self.ckpt_offset[0],
            self.ckpt_offset[1],
            self.ckpt_len,
            self.data_offset,
            self.data_clusters,
        ] {
            b.put_u64_le(v);
        }
        put_name(&mut b, &self.owner, OWNER_LEN);
        b.put_u64_le(self.incarnation);
        b.resize(SECTOR - 4, 0);
        let crc = crc32c::crc32c(&b);
        b.put_u32_le(crc);
        b.resize(LABEL_LEN as usize, 0);
        b
    }

    /// Whether the block looks like a pool label at all (the magic), corrupt or not.
    pub fn has_magic(block: &[u8]) -> bool {
        block.len() >= MAGIC.len() && &block[..MAGIC.len()] == MAGIC
    }

    /// Decodes and checks a label read from a device of `device_size` bytes.
    pub fn decode(block: &[u8], device_size: u64) -> Result<Label, PoolError> {
        let corrupt = |why: String| PoolError::CorruptLabel(why);
        if block.len() < LABEL_LEN as usize {
            return Err(PoolError::NoLabel);
        }
        let block = &block[..LABEL_LEN as usize];
        if !Self::has_magic(block) {
            return Err(PoolError::NoLabel);
        }
        let stored = u32::from_le_bytes(block[SECTOR - 4..SECTOR].try_into().unwrap_or([0; 4]));
        let crc = crc32c::crc32c(&block[..SECTOR - 4]);
        if stored != crc {
            return Err(corrupt(format!(
                "checksum mismatch (stored {stored:#010x}, computed {crc:#010x})"
            )));
        }
        let mut b = &block[MAGIC.len()..];
        let version = b.get_u32_le();
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(corrupt(format!(
                "on-disk version {version}, this io-engine reads versions {OLDEST_VERSION} to {VERSION}"
            )));
        }
        let flags = b.get_u32_le();
        let keeps_space =
            (flags & FLAG_SPACE_RECORDED != 0).then_some(flags & FLAG_KEEPS_SPACE != 0);
        let uuid = Uuid::from_slice(&b[..16]).map_err(|e| corrupt(e.to_string()))?;
        b.advance(16);
        let name = get_name(&mut b, NAME_LEN).map_err(|_| corrupt("name is not UTF-8".into()))?;
        let block_size = b.get_u32_le();
        let cluster_size = b.get_u32_le();
        let mut v = [0u64; 8];
        for x in v.iter_mut() {
            *x = b.get_u64_le();
        }
        let (owner, incarnation) = if version >= 2 {
            let owner =
                get_name(&mut b, OWNER_LEN).map_err(|_| corrupt("owner is not UTF-8".into()))?;
            (owner, b.get_u64_le())
        } else {
            (String::new(), 0)
        };
        let label = Label {
            uuid,
            name,
            block_size,
            cluster_size,
            device_size: v[0],
            journal_offset: v[1],
            journal_len: v[2],
            ckpt_offset: [v[3], v[4]],
            ckpt_len: v[5],
            data_offset: v[6],
            data_clusters: v[7],
            owner,
            incarnation,
            keeps_space,
        };
        // The layout must be the one this version would have made for the recorded device size.
        let expect = Label::layout(
            uuid,
            &label.name,
            block_size,
            cluster_size,
            label.device_size,
        )
        .map_err(|e| corrupt(format!("impossible layout: {e}")))?;
        let expect = Label {
            owner: label.owner.clone(),
            incarnation: label.incarnation,
            keeps_space: label.keeps_space,
            ..expect
        };
        if expect != label {
            return Err(corrupt("layout does not match its own parameters".into()));
        }
        if label.device_size > device_size {
            return Err(corrupt(format!(
                "the pool was {} bytes but the device is now {device_size} bytes",
                label.device_size
            )));
        }
        Ok(label)
    }
}

fn check_name(what: &str, name: &str, room: usize) -> Result<(), PoolError> {
    if name.is_empty() || name.len() >= room || name.contains('\0') {
        return Err(PoolError::InvalidArgument(format!(
            "{what} {name:?} must be 1 to {} bytes",
            room - 1
        )));
    }
    Ok(())
}

fn put_name(b: &mut BytesMut, name: &str, room: usize) {
    let mut raw = vec![0u8; room];
    raw[..name.len()].copy_from_slice(name.as_bytes());
    b.put_slice(&raw);
}

fn get_name(b: &mut &[u8], room: usize) -> Result<String, std::string::FromUtf8Error> {
    let raw = &b[..room];
    let end = raw.iter().position(|c| *c == 0).unwrap_or(room);
    let name = String::from_utf8(raw[..end].to_vec());
    b.advance(room);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device with more clusters than 32-bit cluster numbers hold is refused: before, its last cluster's number
    /// was the one meaning "unmapped", so a write placed there read back as zeroes.
    #[test]
    fn a_device_with_more_clusters_than_cluster_numbers_is_refused() {
        assert!(Label::layout(Uuid::nil(), "p", 512, 64 << 10, 1 << 49).is_err());
        assert!(Label::layout(Uuid::nil(), "p", 512, 64 << 10, 1 << 30).is_ok());
    }

    fn label() -> Label {
        Label::layout(Uuid::new_v4(), "pool-a", 512, 4 << 20, 1 << 30).unwrap()
    }

    #[test]
    fn round_trips_and_lays_out_cluster_aligned_data() {
        let l = label();
        assert_eq!(l.data_offset % (4 << 20), 0);
        assert!(l.ckpt_offset[1] + l.ckpt_len <= l.data_offset);
        assert_eq!(Label::decode(&l.encode(), 1 << 30).unwrap(), l);
        assert!(l.capacity() > (1 << 30) * 97 / 100);
    }

    #[test]
    fn owner_and_incarnation_round_trip_and_each_claim_bumps_the_incarnation() {
        let l = label().claimed_by("node-a").unwrap();
        assert_eq!((l.owner.as_str(), l.incarnation), ("node-a", 1));
        let l = l.claimed_by("node-b").unwrap();
        assert_eq!(Label::decode(&l.encode(), 1 << 30).unwrap(), l);
        assert_eq!((l.owner.as_str(), l.incarnation), ("node-b", 2));
        assert!(l.claimed_by("").is_err());
        assert!(l.claimed_by(&"n".repeat(253)).is_ok());
        assert!(l.claimed_by(&"n".repeat(OWNER_LEN)).is_err());
    }

    #[test]
    fn the_space_policy_round_trips_and_claims_keep_it() {
        for keeps in [None, Some(false), Some(true)] {
            let l = Label {
                keeps_space: keeps,
                ..label()
            };
            let back = Label::decode(&l.encode(), 1 << 30).unwrap();
            assert_eq!(back.keeps_space, keeps);
            assert_eq!(back.claimed_by("node-a").unwrap().keeps_space, keeps);
        }
    }

    #[test]
    fn a_version_1_label_reads_as_unowned() {
        let l = label();
        let mut old = l.encode();
        old[8..12].copy_from_slice(&1u32.to_le_bytes());
        // Version 1 had zeroes where the owner and incarnation now are.
        let crc = crc32c::crc32c(&old[..SECTOR - 4]);
        old[SECTOR - 4..SECTOR].copy_from_slice(&crc.to_le_bytes());
        let back = Label::decode(&old, 1 << 30).unwrap();
        assert_eq!((back.owner.as_str(), back.incarnation), ("", 0));
        assert_eq!(back, l);
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let l = label();
        let good = l.encode();
        for byte in [0usize, 9, 20, 40, 100, 120, 200, 300, 508, 511] {
            let mut bad = good.clone();
            bad[byte] ^= 0x10;
            let r = Label::decode(&bad, 1 << 30);
            assert!(
                matches!(r, Err(PoolError::CorruptLabel(_)) | Err(PoolError::NoLabel)),
                "byte {byte}: {r:?}"
            );
        }
    }

    #[test]
    fn refuses_bad_parameters_and_a_shrunk_device() {
        assert!(Label::layout(Uuid::nil(), "", 512, 4 << 20, 1 << 30).is_err());
        assert!(Label::layout(Uuid::nil(), "p", 512, 3 << 20, 1 << 30).is_err());
        assert!(Label::layout(Uuid::nil(), "p", 512, 4 << 20, 8 << 20).is_err());
        let l = label();
        assert!(matches!(
            Label::decode(&l.encode(), 1 << 29),
            Err(PoolError::CorruptLabel(_))
        ));
        assert!(matches!(
            Label::decode(&[0u8; 4096], 1 << 30),
            Err(PoolError::NoLabel)
        ));
    }
}
