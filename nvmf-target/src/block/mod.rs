//! Block devices: the async [`BlockDevice`] seam every namespace, replica and nexus child sits on, and its backends.
//!
//! - [`memory::MemoryDevice`]: thin, RAM-backed (tests, benchmarks, `--memory` namespaces).
//! - [`file::FileDevice`]: a regular file or a block device (loop devices in tests), O_DIRECT where allowed.
//! - [`exclusive`]: one opener per disk on a machine (`flock`, `O_EXCL`, loop devices as their backing files).
//! - [`error_count::ErrorCount`]: counts the I/O errors a disk returns (how a pool knows its disk is failing).
//! - [`fault::FaultDevice`]: wraps another device and fails or delays I/O on command (tests).
//! - [`inflight`]: the operations a device handed on that have not ended, whoever still waits for them.
//! - [`aligned`]: page-aligned buffers (what O_DIRECT needs), filled without a second copy.
//! - [`range_lock::RangeLock`]: shared/exclusive byte-range locks (nexus writes versus rebuild copies).
//! - [`timing`]: sampled stage timings of I/O through the layers (where a write's time goes).
//! - [`uring`]: io_uring submission and completion for file devices (no thread per I/O).
//!
//! Offsets and lengths are in bytes and must be multiples of the block size; [`check_range`] validates them.

pub mod aligned;
pub mod discard;
pub mod error_count;
pub mod exclusive;
pub mod fault;
pub mod file;
pub mod inflight;
pub mod memory;
pub mod range_lock;
pub mod timing;
pub mod uring;

/// Held by tests that attach loop devices, so that two of them never race for the same free device.
#[cfg(test)]
pub(crate) static LOOP_DEVICES: std::sync::Mutex<()> = std::sync::Mutex::new(());

use async_trait::async_trait;
use bytes::Bytes;

/// Why a block I/O failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("range {offset}+{len} is outside the device ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("range {offset}+{len} is not aligned to the {block_size}-byte block size")]
    Unaligned {
        offset: u64,
        len: u64,
        block_size: u32,
    },
    #[error("device i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("no space left to allocate on the device")]
    NoSpace,
    #[error("injected fault at offset {offset}")]
    Injected { offset: u64 },
    #[error("device is closed")]
    Closed,
    /// Not served here any more (a nexus replaced or shutting down while this I/O waited): the host should retry
    /// it on another path. NVMe: ANA Inaccessible, a path error the Linux host fails over on.
    #[error("not served here any more: {0}")]
    Relocated(String),
    #[error("disk in use: {0}")]
    InUse(String),
    #[error("device is read-only")]
    ReadOnly,
    #[error("reservation conflict: another host holds the reservation")]
    ReservationConflict,
    #[error("the device does not support this operation")]
    Unsupported,
    #[error("remote device: {0}")]
    Remote(String),
}

impl BlockError {
    /// Whether the failed operation is known to have changed nothing on the device: refused before it started (a bad
    /// range, a closed or read-only device, another host's reservation, no space to allocate, not supported), as
    /// opposed to one that failed or timed out part way (an I/O error, a remote device's failure), which may have
    /// written some of it.
    pub fn changed_nothing(&self) -> bool {
        matches!(
            self,
            BlockError::OutOfRange { .. }
                | BlockError::Unaligned { .. }
                | BlockError::NoSpace
                | BlockError::Closed
                | BlockError::ReadOnly
                | BlockError::ReservationConflict
                | BlockError::Unsupported
                | BlockError::InUse(_)
        )
    }
}

/// A block device. Implementations are shared (`Arc<dyn BlockDevice>`) and take concurrent I/O.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    fn block_size(&self) -> u32;
    fn num_blocks(&self) -> u64;

    fn size_bytes(&self) -> u64 {
        self.num_blocks() * u64::from(self.block_size())
    }

    /// Asks the device for its size again, in blocks (a remote namespace identifies itself anew after its target
    /// grew it; a local device always knows its size).
    async fn rescan(&self) -> Result<u64, BlockError> {
        Ok(self.num_blocks())
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError>;
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError>;
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Releases the range; reading it afterwards returns zeroes.
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Makes every completed write durable.
    async fn flush(&self) -> Result<(), BlockError>;

    /// Backs the range with space now, so that no later write into it fails for want of space under the device
    /// (a file whose file system fills up); what it holds is unchanged. A device with nothing to reserve (memory,
    /// a block device, a remote namespace) does nothing. [`BlockError::NoSpace`] when the space is not there. A
    /// wrapper passes the call down.
    async fn preallocate(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Ok(())
    }

    /// The range's contents are no longer needed: a device whose space is shared with others (a file: its file
    /// system's) gives the space under the range back; a block device is told the range is free (a discard: a thin
    /// LUN gives the space back, an SSD learns it). What the range reads afterwards is unspecified (zeroes or what
    /// it held). `Ok(false)`: the device gives nothing back (memory, a block device that takes no discards, a file
    /// system that cannot punch holes), so asking again is no use. A wrapper passes the call down.
    async fn release(&self, _offset: u64, _len: u64) -> Result<bool, BlockError> {
        Ok(false)
    }

    /// Whether [`Self::release`] may give space back here (no I/O: what the device is). A wrapper passes the call
    /// down.
    fn releases_space(&self) -> bool {
        false
    }

    /// Bytes the storage under the device could still back (a file: its file system's free space); `None` where
    /// the device's space is all there already or it cannot tell. A wrapper passes the call down.
    fn room(&self) -> Option<u64> {
        None
    }

    /// Which storage [`Self::room`] counts, as an id that devices drawing on the same storage share (a file: its
    /// file system's device number), so that its room is not counted once per device; `None` with no room. A
    /// wrapper passes the call down.
    fn room_of(&self) -> Option<u64> {
        None
    }

    /// Bytes of the device with storage behind them already (a file: its allocated blocks); `None` where the
    /// device's space is all there (a block device) or it cannot tell. A wrapper passes the call down.
    fn backed(&self) -> Option<u64> {
        None
    }

    /// Waits until every operation this device started before the call has ended, including those whose callers
    /// stopped waiting: a dropped write may still reach the disk afterwards ([`inflight`]). A device whose
    /// operations end with their futures has nothing to wait for; a wrapper passes the call down.
    async fn settle(&self) {}

    /// Stops what the device does on its own before it is let go (a remote one: its reconnects, which take its
    /// reservation again and would end a newer connection of the same host), and waits until it has. A device
    /// doing nothing on its own has nothing to stop.
    async fn close(&self) {}

    /// How many times the device lost its connection since it was opened (a remote one reconnects by itself).
    /// Writes it had not flushed may have gone with the connection: its target may have lost power. A local
    /// device never does (0).
    fn connection_losses(&self) -> u64 {
        0
    }

    /// Whether the device is another node's, reached over the network: a newer nexus may take its reservation
    /// without this node hearing of it, so a nexus serves reads only while it answers (the read lease). A wrapper
    /// passes the call down.
    fn remote(&self) -> bool {
        false
    }

    /// The byte ranges within `offset..offset+len` that may hold data (the rest reads as zeroes), merged and in
    /// order; `None` when the device cannot tell (treat it all as data). A rebuild skips what is not listed.
    async fn allocated_ranges(
        &self,
        _offset: u64,
        _len: u64,
    ) -> Result<Option<Vec<(u64, u64)>>, BlockError> {
        Ok(None)
    }

    /// Records on this device that `missed.child` missed writes to `missed.ranges` (merged with what is already
    /// recorded for it). A nexus keeps its write log for an absent child on the children that stay, so that a
    /// restarted or replacement nexus finds it.
    async fn note_missed(&self, _missed: &MissedWrites) -> Result<(), BlockError> {
        Err(BlockError::Unsupported)
    }

    /// Drops what is recorded for `child` (it caught up, or left the volume).
    async fn forget_missed(&self, _child: &str) -> Result<(), BlockError> {
        Err(BlockError::Unsupported)
    }

    /// Every missed-writes record kept on this device.
    async fn missed(&self) -> Result<Vec<MissedWrites>, BlockError> {
        Err(BlockError::Unsupported)
    }

    /// Takes a crash-consistent snapshot named `id` of the device's current contents (pool replicas do; the
    /// caller quiesces writes first).
    async fn snapshot(&self, _id: uuid::Uuid) -> Result<(), BlockError> {
        Err(BlockError::Unsupported)
    }
}

/// The longest child name a missed-writes note may carry (a replica's NQN and NSID take about 80 bytes).
pub const MAX_CHILD_NAME: usize = 256;

/// Writes a child of a volume missed while it was away: the persisted form of a nexus's write log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MissedWrites {
    /// The child's stable identity (its NQN and NSID, the same from any node).
    pub child: String,
    /// When the child went away, in milliseconds since the epoch.
    pub since_ms: u64,
    /// Byte ranges written meanwhile, merged and in order.
    pub ranges: Vec<(u64, u64)>,
}

impl MissedWrites {
    /// Adds `other`'s ranges (same child) to these; the earlier `since` wins.
    pub fn merge(&mut self, other: &MissedWrites) {
        self.since_ms = self.since_ms.min(other.since_ms);
        let mut all: Vec<(u64, u64)> = self.ranges.iter().chain(&other.ranges).copied().collect();
        all.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
        for (s, n) in all {
            match out.last_mut() {
                Some((ps, pn)) if *ps + *pn >= s => *pn = (*pn).max(s + n - *ps),
                _ => out.push((s, n)),
            }
        }
        self.ranges = out;
    }

    /// Joins neighbouring ranges across the smallest gaps until at most `max` (at least one) remain. The result
    /// covers everything it covered before and more: a partial rebuild from it copies a little extra, never less.
    pub fn coarsen(&mut self, max: usize) {
        let max = max.max(1);
        if self.ranges.len() <= max {
            return;
        }
        // Gaps to close, smallest first; the `len - max` smallest go.
        let mut gaps: Vec<(u64, usize)> = self
            .ranges
            .windows(2)
            .enumerate()
            .map(|(i, w)| (w[1].0 - (w[0].0 + w[0].1), i))
            .collect();
        gaps.sort_unstable();
        let mut close = vec![false; self.ranges.len()];
        for (_, i) in &gaps[..self.ranges.len() - max] {
            close[*i] = true;
        }
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(max);
        let mut join = false;
        for (i, (s, n)) in self.ranges.iter().copied().enumerate() {
            match out.last_mut() {
                Some((ps, pn)) if join => *pn = s + n - *ps,
                _ => out.push((s, n)),
            }
            join = close[i];
        }
        self.ranges = out;
    }

    /// This note as a device of `size` bytes takes it from a host: its child's name at most [`MAX_CHILD_NAME`] bytes,
    /// every range inside the device, ranges merged and in order (a host may send them in any order). Why not, when
    /// it cannot be taken.
    pub fn checked(self, size: u64) -> Result<MissedWrites, String> {
        if self.child.is_empty() || self.child.len() > MAX_CHILD_NAME {
            return Err(format!(
                "a child's name is 1 to {MAX_CHILD_NAME} bytes, not {}",
                self.child.len()
            ));
        }
        if let Some((s, n)) = self
            .ranges
            .iter()
            .find(|(s, n)| s.checked_add(*n).is_none_or(|end| end > size))
        {
            return Err(format!("range {s}+{n} is outside the {size}-byte device"));
        }
        let mut out = MissedWrites {
            child: self.child,
            since_ms: self.since_ms,
            ranges: Vec::new(),
        };
        out.merge(&MissedWrites {
            child: String::new(),
            since_ms: self.since_ms,
            ranges: self.ranges.into_iter().filter(|(_, n)| *n > 0).collect(),
        });
        Ok(out)
    }

    /// An upper bound of this record's size in the pool's metadata (JSON).
    pub fn encoded_bound(&self) -> usize {
        self.child.len() + 64 + self.ranges.len() * 44
    }
}

/// Clips merged, ordered ranges to `offset..offset+len`.
pub fn clip_ranges(ranges: &[(u64, u64)], offset: u64, len: u64) -> Vec<(u64, u64)> {
    let end = offset.saturating_add(len);
    ranges
        .iter()
        .filter_map(|(s, n)| {
            let (a, b) = ((*s).max(offset), (s + n).min(end));
            (a < b).then(|| (a, b - a))
        })
        .collect()
}

/// Checks that `offset..offset+len` is block aligned and inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, block_size: u32, size: u64) -> Result<(), BlockError> {
    let bs = u64::from(block_size);
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(BlockError::Unaligned {
            offset,
            len,
            block_size,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
pub(crate) mod conformance;
