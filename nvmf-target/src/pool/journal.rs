//! Where a pool's metadata lives on its device: two checkpoint areas (double-buffered) and a journal.
//!
//! A checkpoint is the whole [`PoolMeta`] with a generation number. A journal transaction is a list of
//! [`Record`]s stamped with the generation (epoch) of the checkpoint it follows and its block number. A change is
//! made durable by writing one transaction into fresh journal blocks and flushing; nothing already written is ever
//! overwritten until a newer checkpoint is durable. When the journal is full (and on every import) the state is
//! written as a new checkpoint into the *other* area and the journal restarts under the new epoch.
//!
//! Loading takes the valid checkpoint with the highest generation, then replays transactions of that epoch in
//! order, stopping at the first block that is missing, stale or fails its checksum: that transaction never
//! completed, so it was never acknowledged. A torn checkpoint write falls back to the other area, whose journal
//! is still intact.
//!
//! Formatting a new pool clears the whole journal (4 MiB) and the header block of both checkpoint areas (a
//! checkpoint is only ever read through its header), so a pool created where another was destroyed never sees
//! that pool's transactions or checkpoints, whatever their epochs.
//!
//! Before every transaction (and the checkpoint a full journal writes), the journal reads the label back from the
//! device: if another import has claimed the pool since this one (another owner or incarnation), it writes nothing
//! and fails with [`PoolError::OwnershipLost`], so an owner displaced by a forced import stops at its next commit
//! instead of interleaving its metadata with the new owner's.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::PoolError;
use super::label::{LABEL_LEN, Label};
use super::meta::{PoolMeta, Record};
use crate::block::BlockDevice;

const BLOCK: u64 = 4096;
const CKPT_MAGIC: &[u8; 8] = b"KPCKPT01";
const TXN_MAGIC: &[u8; 8] = b"KPJRNL01";
const TXN_HEADER: usize = 32;

pub struct Journal {
    dev: Arc<dyn BlockDevice>,
    label: Label,
    epoch: u64,
    /// Area holding the checkpoint of `epoch`.
    area: usize,
    /// Next free journal block.
    next: u64,
}

fn io(what: &str, e: impl std::fmt::Display) -> PoolError {
    PoolError::Io(format!("{what}: {e}"))
}

impl Journal {
    /// Writes the metadata of a new, empty pool. The label is the caller's to write afterwards.
    pub async fn format(dev: Arc<dyn BlockDevice>, label: &Label) -> Result<Journal, PoolError> {
        let meta = PoolMeta::new(label.cluster_size, label.data_clusters);
        // Nothing left on the device may be mistaken for this pool's metadata, least of all a destroyed pool's
        // (a new pool starts again at epoch 1, block 0, where an old transaction of that epoch and block parses).
        // A checkpoint is read only through its header, the first block of its area: those two are cleared. The
        // whole journal is (4 MiB): replay goes on past this pool's last transaction into whatever follows it.
        // The checkpoint below flushes both before the label makes the pool exist.
        for off in label.ckpt_offset {
            dev.write_zeroes(off, BLOCK)
                .await
                .map_err(|e| io("clearing a checkpoint", e))?;
        }
        dev.write_zeroes(label.journal_offset, label.journal_len)
            .await
            .map_err(|e| io("clearing the journal", e))?;
        let mut j = Journal {
            dev,
            label: label.clone(),
            epoch: 0,
            area: 1,
            next: 0,
        };
        j.checkpoint(&meta).await?;
        Ok(j)
    }

    /// Loads the newest sound state, replays the journal and compacts it into a fresh checkpoint.
    pub async fn open(
        dev: Arc<dyn BlockDevice>,
        label: &Label,
    ) -> Result<(Journal, PoolMeta), PoolError> {
        let mut best: Option<(u64, usize, PoolMeta)> = None;
        let mut errors = Vec::new();
        for area in 0..2 {
            match read_checkpoint(dev.as_ref(), label, area).await {
                Ok((generation, meta)) => {
                    if best.as_ref().is_none_or(|(g, _, _)| generation > *g) {
                        best = Some((generation, area, meta));
                    }
                }
                Err(e) => errors.push(format!("checkpoint {}: {e}", ["A", "B"][area])),
            }
        }
        let Some((epoch, area, mut meta)) = best else {
            return Err(PoolError::CorruptMetadata(errors.join("; ")));
        };
        let journal = dev
            .read(label.journal_offset, label.journal_len)
            .await
            .map_err(|e| io("reading the journal", e))?;
        // The older area is the state to start from only if the newer one never took transactions: once the journal
        // holds one of a later epoch, that epoch's checkpoint was durable, and starting from the older one would
        // undo every change since (and the next checkpoint would overwrite the good copy with that stale state).
        if let Some(later) = first_txn_epoch(&journal).filter(|e| *e > epoch) {
            return Err(PoolError::CorruptMetadata(format!(
                "the journal holds transactions of epoch {later} but the newest readable checkpoint is of epoch \
                 {epoch} ({})",
                errors.join("; ")
            )));
        }
        let mut next = 0u64;
        while let Some((records, blocks)) = parse_txn(&journal, epoch, next)? {
            for r in &records {
                meta.apply(r)?;
            }
            next += blocks;
        }
        tracing::debug!(pool = %label.name, epoch, transactions_blocks = next, "replayed the pool journal");
        let mut j = Journal {
            dev,
            label: label.clone(),
            epoch,
            area,
            next,
        };
        // Still the owner, as before every commit: an import displaced between writing its label and reading the
        // journal (another node forced an import meanwhile) would otherwise compact the new owner's journal into a
        // checkpoint of a newer epoch, and the new owner's later transactions (of the older epoch) would not be
        // replayed at its next import.
        j.check_owner().await?;
        j.checkpoint(&meta).await?;
        Ok((j, meta))
    }

    /// Fails unless the label on the device is still the one this import wrote.
    async fn check_owner(&self) -> Result<(), PoolError> {
        let block = self
            .dev
            .read(0, LABEL_LEN)
            .await
            .map_err(|e| io("reading the label back", e))?;
        let lost = |now: String| PoolError::OwnershipLost {
            pool: self.label.name.clone(),
            now,
        };
        match Label::decode(&block, self.dev.size_bytes()) {
            Ok(l) if l.owner == self.label.owner && l.incarnation == self.label.incarnation => {
                Ok(())
            }
            Ok(l) => Err(lost(format!(
                "node {:?} imported it (incarnation {}; this import was {})",
                l.owner, l.incarnation, self.label.incarnation
            ))),
            Err(e) => Err(lost(format!("its label now reads: {e}"))),
        }
    }

    /// Makes `records` durable. `state` encodes the state they follow; it is called (and written out as a
    /// checkpoint) only when the journal is full. The caller applies the records to its state after this returns.
    pub async fn commit(
        &mut self,
        state: impl FnOnce() -> Result<Vec<u8>, PoolError>,
        records: &[Record],
    ) -> Result<(), PoolError> {
        let payload = serde_json::to_vec(records).map_err(|e| io("encoding records", e))?;
        let blocks = (TXN_HEADER + payload.len()).div_ceil(BLOCK as usize) as u64;
        let capacity = self.label.journal_len / BLOCK;
        if blocks > capacity {
            return Err(PoolError::MetadataFull(format!(
                "a transaction of {} bytes does not fit the journal",
                payload.len()
            )));
        }
        self.check_owner().await?;
        if self.next + blocks > capacity {
            self.write_checkpoint(state()?).await?;
        }
        let mut b = BytesMut::with_capacity((blocks * BLOCK) as usize);
        b.put_slice(TXN_MAGIC);
        b.put_u64_le(self.epoch);
        b.put_u64_le(self.next);
        b.put_u32_le(payload.len() as u32);
        let mut crc = crc32c::crc32c(&b);
        crc = crc32c::crc32c_append(crc, &payload);
        b.put_u32_le(crc);
        b.put_slice(&payload);
        b.resize((blocks * BLOCK) as usize, 0);
        let off = self.label.journal_offset + self.next * BLOCK;
        self.dev
            .write(off, b.freeze())
            .await
            .map_err(|e| io("writing the journal", e))?;
        self.dev
            .flush()
            .await
            .map_err(|e| io("flushing the journal", e))?;
        self.next += blocks;
        Ok(())
    }

    /// Writes `meta` as the checkpoint of the next epoch into the other area; the journal then starts over.
    pub async fn checkpoint(&mut self, meta: &PoolMeta) -> Result<(), PoolError> {
        self.write_checkpoint(encode_state(meta)?).await
    }

    async fn write_checkpoint(&mut self, payload: Vec<u8>) -> Result<(), PoolError> {
        if payload.len() as u64 + BLOCK > self.label.ckpt_len {
            return Err(PoolError::MetadataFull(format!(
                "the metadata ({} bytes) outgrew its {}-byte area",
                payload.len(),
                self.label.ckpt_len
            )));
        }
        let area = 1 - self.area;
        let epoch = self.epoch + 1;
        let mut b = BytesMut::with_capacity(BLOCK as usize + payload.len());
        b.put_slice(CKPT_MAGIC);
        b.put_u64_le(epoch);
        b.put_u64_le(payload.len() as u64);
        b.put_u32_le(crc32c::crc32c(&payload));
        let hcrc = crc32c::crc32c(&b);
        b.put_u32_le(hcrc);
        b.resize(BLOCK as usize, 0);
        b.put_slice(&payload);
        let padded = (b.len() as u64).div_ceil(BLOCK) * BLOCK;
        b.resize(padded as usize, 0);
        let off = self.label.ckpt_offset[area];
        self.dev
            .write(off, b.freeze())
            .await
            .map_err(|e| io("writing a checkpoint", e))?;
        self.dev
            .flush()
            .await
            .map_err(|e| io("flushing a checkpoint", e))?;
        self.epoch = epoch;
        self.area = area;
        self.next = 0;
        Ok(())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Journal blocks used since the last checkpoint.
    #[cfg(test)]
    pub fn used_blocks(&self) -> u64 {
        self.next
    }
}

pub fn encode_state(meta: &PoolMeta) -> Result<Vec<u8>, PoolError> {
    serde_json::to_vec(meta).map_err(|e| io("encoding a checkpoint", e))
}

async fn read_checkpoint(
    dev: &dyn BlockDevice,
    label: &Label,
    area: usize,
) -> Result<(u64, PoolMeta), PoolError> {
    let off = label.ckpt_offset[area];
    let head = dev
        .read(off, BLOCK)
        .await
        .map_err(|e| io("reading a checkpoint", e))?;
    let mut h = &head[..];
    if &h[..8] != CKPT_MAGIC {
        return Err(PoolError::CorruptMetadata("no checkpoint".into()));
    }
    h.advance(8);
    let generation = h.get_u64_le();
    let len = h.get_u64_le();
    let pcrc = h.get_u32_le();
    let hcrc = h.get_u32_le();
    if crc32c::crc32c(&head[..28]) != hcrc {
        return Err(PoolError::CorruptMetadata(
            "header checksum mismatch".into(),
        ));
    }
    if len
        .checked_add(BLOCK)
        .is_none_or(|end| end > label.ckpt_len)
    {
        return Err(PoolError::CorruptMetadata(format!(
            "length {len} beyond its area"
        )));
    }
    // Whole metadata blocks, as it was written: a smaller read fails on a disk of larger sectors.
    let padded = len.div_ceil(BLOCK) * BLOCK;
    let body = dev
        .read(off + BLOCK, padded.max(BLOCK))
        .await
        .map_err(|e| io("reading a checkpoint", e))?;
    let payload = &body[..len as usize];
    if crc32c::crc32c(payload) != pcrc {
        return Err(PoolError::CorruptMetadata(format!(
            "generation {generation}: payload checksum mismatch"
        )));
    }
    let meta: PoolMeta = serde_json::from_slice(payload)
        .map_err(|e| PoolError::CorruptMetadata(format!("generation {generation}: {e}")))?;
    Ok((
        generation,
        meta.load(label.cluster_size, label.data_clusters)?,
    ))
}

/// The epoch of the transaction in the journal's first block, if one whole transaction (checksum good) starts there:
/// the first one written after the checkpoint of that epoch.
fn first_txn_epoch(journal: &Bytes) -> Option<u64> {
    whole_txn(journal, 0).map(|(epoch, _)| epoch)
}

/// The transaction starting at journal block `block`, if a whole one (magic, sequence and checksum good) does:
/// its epoch and payload.
fn whole_txn(journal: &Bytes, block: u64) -> Option<(u64, &[u8])> {
    let start = (block * BLOCK) as usize;
    let mut h = journal.get(start..start + TXN_HEADER)?;
    if &h[..8] != TXN_MAGIC {
        return None;
    }
    h.advance(8);
    let (epoch, seq, len, crc) = (
        h.get_u64_le(),
        h.get_u64_le(),
        h.get_u32_le(),
        h.get_u32_le(),
    );
    if seq != block {
        return None;
    }
    let payload = journal.get(start + TXN_HEADER..start + TXN_HEADER + len as usize)?;
    let computed = crc32c::crc32c_append(
        crc32c::crc32c(&journal[start..start + TXN_HEADER - 4]),
        payload,
    );
    (computed == crc).then_some((epoch, payload))
}

/// Parses the transaction starting at journal block `block` if it is whole and belongs to `epoch`. A whole
/// transaction (checksum good) that does not decode is corrupt metadata, not the end of the journal.
fn parse_txn(
    journal: &Bytes,
    epoch: u64,
    block: u64,
) -> Result<Option<(Vec<Record>, u64)>, PoolError> {
    let Some(payload) = whole_txn(journal, block)
        .filter(|(e, _)| *e == epoch)
        .map(|(_, p)| p)
    else {
        return Ok(None);
    };
    let len = payload.len();
    let records: Vec<Record> = serde_json::from_slice(payload).map_err(|e| {
        PoolError::CorruptMetadata(format!("journal block {block} of epoch {epoch}: {e}"))
    })?;
    let blocks = (TXN_HEADER + len).div_ceil(BLOCK as usize) as u64;
    Ok(Some((records, blocks)))
}
