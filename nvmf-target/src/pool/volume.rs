//! A pool volume as a [`BlockDevice`]: a thin replica (or a read-only snapshot) whose logical clusters map to the
//! pool's physical clusters.
//!
//! - A read of a never-written cluster returns zeroes without touching the device.
//! - A write to a cluster the volume owns alone goes straight to the device.
//! - A write to an unmapped cluster, or to one shared with a snapshot or clone, takes a free cluster, fills it
//!   (zeroes around the new data, or a copy of the shared cluster with the new data over it), flushes it, and
//!   only then commits the new mapping to the journal. A crash before the commit leaves the old mapping and a free
//!   cluster; the write was never acknowledged. The old contents of a reused cluster can never show through.
//!   A never-mapped cluster takes a stocked cluster instead when there is one (`stock`: zeroed and flushed
//!   before), and writes only its data before the commit: one flush, the commit's. A writer going in order gets
//!   its next clusters mapped by the same commit (`ahead`).
//! - A write reserves every new cluster it needs before it writes any: with too few free clusters it fails with
//!   [`BlockError::NoSpace`] (NVMe "Capacity Exceeded") and changes nothing, so replicas that all ran out of
//!   space still agree.
//! - A write that allocates runs as a task of its own, to the end, whoever waits for it: its caller may go (a
//!   nexus's child timeout, a request deadline) while the disk still has its writes to the new cluster, and only
//!   the allocation knows when the cluster may go back to the free ones. (Dropped half way, it kept the cluster
//!   reserved, lost to the pool until the next import.) Writes to clusters the volume owns alone stay inline.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use uuid::Uuid;

use super::ahead::Ahead;
use super::meta::{MISSED_BUDGET, Record, UNMAPPED};
use super::{PoolError, PoolInner, RESERVE_WAIT};
use crate::block::range_lock::{RangeGuard, RangeLock};
use crate::block::{BlockDevice, BlockError, MissedWrites, check_range};

pub struct PoolVolume {
    pub(super) pool: Arc<PoolInner>,
    pub(super) uuid: Uuid,
    /// Bytes; grows (never shrinks) when the replica is resized.
    pub(super) size: AtomicU64,
    pub(super) read_only: bool,
    pub(super) closed: AtomicBool,
    /// Serializes allocations and copy-on-writes of one logical cluster (a range of cluster indexes); those
    /// of different clusters run at once.
    pub(super) alloc: RangeLock,
    /// This volume's I/O holds it shared; a snapshot of the volume holds it exclusively, so the snapshot sees
    /// every acknowledged write and no write lands in a cluster after it became shared. Other volumes' I/O goes on.
    pub(super) quiesce: Arc<tokio::sync::RwLock<()>>,
    /// Allocations of this volume under way (see [`PoolVolume::sole`]).
    pub(super) allocating: AtomicU64,
    /// Its run of clusters allocated in order, for mapping ahead (`ahead`).
    pub(super) stream: super::ahead::Stream,
    /// This volume, for the tasks its allocating writes run as.
    pub(super) me: Weak<PoolVolume>,
    /// Those tasks that have not ended ([`PoolVolume::detached`]): one whose caller went away still hands the disk
    /// its later pieces, so settling waits for them too.
    pub(super) detached: crate::block::inflight::InFlight,
}

/// How a write went: done here, or it needs a new cluster and, run inline, wrote nothing (the caller runs it again
/// as a task of its own, [`PoolVolume::detached`]).
enum Here {
    Done,
    MustAllocate,
}

/// One cluster's part of a request: logical cluster, offset within it, and the byte range of the request.
struct Piece {
    logical: u32,
    within: u64,
    range: std::ops::Range<usize>,
}

fn pieces(offset: u64, len: u64, cs: u64) -> impl Iterator<Item = Piece> {
    let mut done = 0u64;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done;
        let n = (cs - pos % cs).min(len - done);
        let p = Piece {
            logical: (pos / cs) as u32,
            within: pos % cs,
            range: done as usize..(done + n) as usize,
        };
        done += n;
        Some(p)
    })
}

/// Clusters reserved for one request's allocations; those it did not use go back when it ends.
struct Reserved<'a> {
    pool: &'a PoolInner,
    clusters: Vec<u32>,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        for c in self.clusters.drain(..) {
            self.pool.release_unused(c);
        }
    }
}

/// The disk's out-of-space error from a write that may have changed data already: into a cluster the volume has
/// (a file system that copies on write, a short write, a zeroing that punched before it allocated), or after
/// another piece of the same write was written. Not the clean NoSpace, which changes nothing and which replicas
/// that all return it agree on: an I/O error (a nexus faults the child and rebuilds it).
fn partly_written(e: BlockError) -> BlockError {
    match e {
        BlockError::NoSpace => BlockError::Io(std::io::Error::other(
            "the disk ran out of space part way through a write",
        )),
        e => e,
    }
}

fn pool_err(e: PoolError) -> BlockError {
    match e {
        PoolError::NoSpace(_) => BlockError::NoSpace,
        other => BlockError::Io(std::io::Error::other(other.to_string())),
    }
}

impl PoolVolume {
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The volume's size in bytes now.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn cs(&self) -> u64 {
        u64::from(self.pool.label.cluster_size)
    }

    fn check_open(&self) -> Result<(), BlockError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(BlockError::Closed);
        }
        Ok(())
    }

    /// Open, and its pool not faulted (see `fuse`).
    fn check_writable(&self) -> Result<(), BlockError> {
        self.check_open()?;
        self.pool.fuse.check()
    }

    /// The physical cluster behind `logical` and whether this volume is its only user.
    pub(super) fn lookup(&self, logical: u32) -> Result<Option<(u32, bool)>, BlockError> {
        Ok(self.lookup_moved(logical)?.0)
    }

    /// How many logical clusters the volume has (mapped or not).
    pub(super) fn mapped_len(&self) -> Result<u32, BlockError> {
        let meta = self.pool.meta();
        let v = meta.volumes.get(&self.uuid).ok_or(BlockError::Closed)?;
        Ok(v.map.len() as u32)
    }

    /// [`Self::lookup`], with the pool's count of mappings moved off a cluster as of that lookup.
    fn lookup_moved(&self, logical: u32) -> Result<(Option<(u32, bool)>, u64), BlockError> {
        let meta = self.pool.meta();
        // Changed only under the metadata's write lock: consistent with the mapping read here.
        let moved = self.pool.moved.load(Ordering::Acquire);
        let v = meta.volumes.get(&self.uuid).ok_or(BlockError::Closed)?;
        let p = v.map.get(logical as usize).copied().unwrap_or(UNMAPPED);
        if p == UNMAPPED {
            return Ok((None, moved));
        }
        Ok((Some((p, meta.refs(p) == 1)), moved))
    }

    /// Reads `p` (under the caller's gate and quiesce locks) from the cluster it maps to when the data comes back.
    ///
    /// A read in flight can outlive its cluster's mapping: this volume's copy-on-write commits and the old cluster
    /// becomes another clone's alone, which writes into it, or is freed and reused. If any mapping moved off a
    /// cluster while the data was on its way, the cluster is looked up again, and a piece whose cluster changed is
    /// read again. One whose cluster is unchanged is good: while this read holds the locks, a logical cluster moves
    /// at most once (moving it again needs a snapshot or an unmap, which wait for them), so it was never away.
    async fn read_piece(&self, p: &Piece) -> Result<Bytes, BlockError> {
        let n = p.range.len() as u64;
        let (mut at, mut moved) = self.lookup_moved(p.logical)?;
        loop {
            let Some((phys, _)) = at else {
                return Ok(Bytes::from(vec![0u8; n as usize]));
            };
            let off = self.pool.label.cluster_offset(phys) + p.within;
            let data = self.pool.dev.read(off, n).await?;
            if self.pool.moved.load(Ordering::Acquire) == moved {
                return Ok(data);
            }
            let (now, seen) = self.lookup_moved(p.logical)?;
            if now.map(|(c, _)| c) == Some(phys) {
                return Ok(data);
            }
            (at, moved) = (now, seen);
        }
    }

    /// Byte ranges of the volume that have a cluster behind them (the rest reads as zeroes), merged.
    pub fn mapped_ranges(&self) -> Vec<(u64, u64)> {
        let meta = self.pool.meta();
        let Some(v) = meta.volumes.get(&self.uuid) else {
            return Vec::new();
        };
        let cs = self.cs();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (l, p) in v.map.iter().enumerate() {
            if *p == UNMAPPED {
                continue;
            }
            let start = l as u64 * cs;
            let len = cs.min(v.size - start);
            match out.last_mut() {
                Some((s, n)) if *s + *n == start => *n += len,
                _ => out.push((start, len)),
            }
        }
        out
    }

    /// Reserves the new clusters a write of `pieces` needs ([`Self::allocations`]) before it writes any: a write
    /// that spans clusters is all or nothing on a full pool. Short of free clusters while other writes hold
    /// reservations, it waits for those (up to [`RESERVE_WAIT`]) and counts again: many writes at once into the
    /// same never-mapped cluster (a file system's writeback) each reserve one before the first maps it, and all
    /// but that one give theirs back unused, or find the cluster mapped before they reserve. Only with no other
    /// reservation to wait for does a write fail for space.
    async fn reserve(&self, pieces: &[Piece], unmapped: bool) -> Result<Reserved<'_>, BlockError> {
        let deadline = tokio::time::Instant::now() + RESERVE_WAIT;
        loop {
            // Enabled before counting: a reservation mapped or given back after the count wakes it.
            let unreserved = self.pool.unreserved.notified();
            tokio::pin!(unreserved);
            unreserved.as_mut().enable();
            // Faulted or closed while it waited: that, not a want of space.
            self.check_writable()?;
            let n = self.allocations(pieces, unmapped)?;
            if n == 0 {
                return Ok(Reserved {
                    pool: &self.pool,
                    clusters: Vec::new(),
                });
            }
            if let Some(clusters) = self.pool.try_reserve(n).await {
                return Ok(Reserved {
                    pool: &self.pool,
                    clusters,
                });
            }
            // Told already (a reservation went between the count and here): counted again at once.
            if futures_util::FutureExt::now_or_never(unreserved.as_mut()).is_some() {
                continue;
            }
            if self.pool.reserved_by_writes() == 0
                || tokio::time::timeout_at(deadline, unreserved).await.is_err()
            {
                // Closed or faulted meanwhile (nothing released wakes it then): that, not a want of space.
                self.check_writable()?;
                return Err(pool_err(self.pool.out_of_space(n)));
            }
        }
    }

    /// How many of `pieces` need a new cluster: those unmapped (when `unmapped` counts) or shared with a snapshot.
    fn allocations(&self, pieces: &[Piece], unmapped: bool) -> Result<usize, BlockError> {
        let mut n = 0;
        for p in pieces {
            match self.lookup(p.logical)? {
                Some((_, true)) => {}
                Some((_, false)) => n += 1,
                None if unmapped => n += 1,
                None => {}
            }
        }
        Ok(n)
    }

    /// Writes `data` at `within` of logical cluster `logical` into a newly allocated cluster: one from `spare`
    /// if the caller reserved it, else one reserved here.
    async fn allocate_write(
        &self,
        logical: u32,
        within: u64,
        data: Bytes,
        spare: &mut Reserved<'_>,
    ) -> Result<(), BlockError> {
        // Counted before the cluster's mapping is looked at (see `sole`).
        let _under_way = UnderWay::new(&self.allocating);
        let _serial = self
            .alloc
            .exclusive(u64::from(logical)..u64::from(logical) + 1)
            .await;
        let old = self.lookup(logical)?;
        let dev = &self.pool.dev;
        if let Some((p, true)) = old {
            // Another writer allocated it while we waited: the cluster reserved for this piece goes back now, for
            // writes short of one that wait for it (see `PoolInner::reserve`).
            if let Some(c) = spare.clusters.pop() {
                self.pool.release_unused(c);
            }
            return dev
                .write(self.pool.label.cluster_offset(p) + within, data)
                .await
                .map_err(partly_written);
        }
        // A never-mapped cluster takes a stocked one (zeroed durably) when there is one: only its data to write.
        let stocked = match old {
            None => self.pool.take_stocked_refilling(),
            Some(_) => None,
        };
        let spared = spare.clusters.pop();
        if let (Some(_), Some(c)) = (stocked, spared) {
            // The cluster reserved for this piece is not needed.
            self.pool.release_unused(c);
        }
        let new = match stocked.or(spared) {
            Some(c) => c,
            None => self.pool.reserve_cluster().await.map_err(pool_err)?,
        };
        let mut ahead = Ahead::default();
        let result = async {
            // Free to this import, maybe not to one that displaced it: nothing is written there unless the pool is
            // still ours (see `ensure_ours`).
            self.pool.ensure_ours().await.map_err(pool_err)?;
            let base = self.pool.label.cluster_offset(new);
            let cs = self.cs();
            let end = within + data.len() as u64;
            match old {
                Some((shared, _)) => {
                    let src = self.pool.label.cluster_offset(shared);
                    let mut buf = BytesMut::from(&dev.read(src, cs).await?[..]);
                    buf[within as usize..end as usize].copy_from_slice(&data);
                    dev.write(base, buf.freeze()).await?;
                    dev.flush().await?;
                }
                None if stocked.is_some() => dev.write(base + within, data).await?,
                None => {
                    // Zeroing the stock here too costs no flush more than this cluster's own.
                    let filling = self.pool.reserve_for_stock().await;
                    let stock = filling.as_ref().map_or(&[][..], |f| &f.clusters[..]);
                    let filled = async {
                        if within > 0 {
                            dev.write_zeroes(base, within).await?;
                        }
                        if end < cs {
                            dev.write_zeroes(base + end, cs - end).await?;
                        }
                        dev.write(base + within, data).await?;
                        // The stock is not this write's: where the disk has no room for it (a file system
                        // filling up), this write still goes through.
                        let stocked = match self.pool.zero_for_stock(stock).await {
                            Ok(()) => true,
                            Err(e) => {
                                tracing::debug!(pool = %self.pool.label.name, error = %e, "filling the stock failed");
                                false
                            }
                        };
                        dev.flush().await.map(|()| stocked)
                    }
                    .await;
                    if let Some(f) = filling {
                        f.end(matches!(filled, Ok(true)));
                    }
                    filled?;
                }
            }
            if old.is_none() {
                ahead = self.take_ahead(logical)?;
            }
            let records = std::iter::once((logical, new))
                .chain(ahead.maps.iter().copied())
                .map(|(logical, physical)| Record::Map {
                    volume: self.uuid,
                    logical,
                    physical,
                })
                .collect();
            self.pool.commit(records).await.map_err(pool_err)
        }
        .await;
        self.pool.release_cluster(new);
        match &result {
            Ok(()) => {
                if old.is_none() {
                    self.allocated_in_order(logical, ahead.maps.len());
                }
                ahead.committed(self);
            }
            Err(e) => {
                if matches!(e, BlockError::NoSpace) {
                    self.pool.disk_full_for_write();
                }
                ahead.release(self)
            }
        }
        result
    }

    /// A write under the volume's locks; unless `may_allocate`, one that needs a new cluster writes nothing and
    /// says so.
    async fn write_here(
        &self,
        offset: u64,
        data: Bytes,
        may_allocate: bool,
    ) -> Result<Here, BlockError> {
        let _io = self.pool.gate.read().await;
        let _vol = self.quiesce.read().await;
        self.check_writable()?;
        let pieces: Vec<Piece> = pieces(offset, data.len() as u64, self.cs()).collect();
        let needed = self.allocations(&pieces, true)?;
        if !may_allocate && needed > 0 {
            return Ok(Here::MustAllocate);
        }
        let mut spare = self.reserve(&pieces, true).await?;
        self.back_new_clusters(&pieces, &spare).await?;
        for (i, p) in pieces.iter().enumerate() {
            let part = data.slice(p.range.clone());
            let written = self.write_piece(p, part, &mut spare).await;
            written.map_err(|e| if i > 0 { partly_written(e) } else { e })?;
        }
        Ok(Here::Done)
    }

    /// A write of several pieces that allocates: the disk's space under every cluster reserved for it, before any
    /// piece is written, so that running out (a file system filling up) fails the write with nothing changed, not
    /// half way. A write of one piece needs none: it changes nothing until its cluster's mapping is committed.
    async fn back_new_clusters(
        &self,
        pieces: &[Piece],
        spare: &Reserved<'_>,
    ) -> Result<(), BlockError> {
        if pieces.len() < 2 || spare.clusters.is_empty() {
            return Ok(());
        }
        self.pool
            .preallocate(&spare.clusters)
            .await
            .map_err(pool_err)
    }

    /// Zeroes under the volume's locks, as [`Self::write_here`] (a cluster shared with a snapshot is copied).
    async fn write_zeroes_here(
        &self,
        offset: u64,
        len: u64,
        may_allocate: bool,
    ) -> Result<Here, BlockError> {
        let _io = self.pool.gate.read().await;
        let _vol = self.quiesce.read().await;
        self.check_writable()?;
        let pieces: Vec<Piece> = pieces(offset, len, self.cs()).collect();
        let needed = self.allocations(&pieces, false)?;
        if !may_allocate && needed > 0 {
            return Ok(Here::MustAllocate);
        }
        let mut spare = self.reserve(&pieces, false).await?;
        self.back_new_clusters(&pieces, &spare).await?;
        for (i, p) in pieces.iter().enumerate() {
            let zeroed = self.zero_piece(p, &mut spare).await;
            zeroed.map_err(|e| if i > 0 { partly_written(e) } else { e })?;
        }
        Ok(Here::Done)
    }

    async fn zero_piece(&self, p: &Piece, spare: &mut Reserved<'_>) -> Result<(), BlockError> {
        let n = p.range.len() as u64;
        if let Some((phys, _cluster)) = self.sole(p.logical).await? {
            let off = self.pool.label.cluster_offset(phys) + p.within;
            return self
                .pool
                .dev
                .write_zeroes(off, n)
                .await
                .map_err(partly_written);
        }
        match self.lookup(p.logical)? {
            None => Ok(()),
            Some(_) => {
                let zeroes = Bytes::from(vec![0u8; n as usize]);
                self.allocate_write(p.logical, p.within, zeroes, spare)
                    .await
            }
        }
    }

    /// Runs an allocating write as a task of its own and waits for it: if this caller goes, the write still ends,
    /// and gives back what it reserved only once the disk is done with it. The task holds a ticket of `detached`
    /// until it ends: a settle (a reservation change fencing this caller, a snapshot) waits for the pieces it has
    /// yet to hand the disk, not only for those the disk has.
    async fn detached<F, Fut>(&self, write: F) -> Result<(), BlockError>
    where
        F: FnOnce(Arc<PoolVolume>) -> Fut,
        Fut: Future<Output = Result<Here, BlockError>> + Send + 'static,
    {
        let me = self.me.upgrade().ok_or(BlockError::Closed)?;
        let ticket = self.detached.start();
        let task = write(me);
        match tokio::spawn(async move {
            let r = task.await;
            drop(ticket);
            r
        })
        .await
        {
            Ok(r) => r.map(drop),
            Err(e) => Err(BlockError::Io(std::io::Error::other(format!(
                "allocating write ended early: {e}"
            )))),
        }
    }

    async fn write_piece(
        &self,
        p: &Piece,
        data: Bytes,
        spare: &mut Reserved<'_>,
    ) -> Result<(), BlockError> {
        if let Some((phys, _cluster)) = self.sole(p.logical).await? {
            let off = self.pool.label.cluster_offset(phys) + p.within;
            return self.pool.dev.write(off, data).await.map_err(partly_written);
        }
        self.allocate_write(p.logical, p.within, data, spare).await
    }

    /// The physical cluster behind `logical` if this volume is its only user, with the cluster's allocations held
    /// off while the caller writes it. A copy-on-write of the cluster in progress ends first: the old cluster
    /// becomes this volume's alone when another volume's copy of it commits, and a write landing in it before this
    /// volume's own copy commits would be lost under the copy's mapping (and the old cluster freed under it).
    /// Such a copy was counted in `allocating` before it looked the cluster up, so before this lookup saw the
    /// cluster unshared; it may also have committed (moving this volume's mapping off the cluster, and freeing it)
    /// and ended between this lookup and the count's check, which the pool's count of moved mappings then shows.
    /// With none under way and no mapping moved since the lookup, nothing is taken.
    async fn sole(&self, logical: u32) -> Result<Option<(u32, Option<RangeGuard>)>, BlockError> {
        let (Some((phys, true)), moved) = self.lookup_moved(logical)? else {
            return Ok(None);
        };
        if self.allocating.load(Ordering::SeqCst) == 0
            && self.pool.moved.load(Ordering::Acquire) == moved
        {
            return Ok(Some((phys, None)));
        }
        let held = self
            .alloc
            .shared(u64::from(logical)..u64::from(logical) + 1)
            .await;
        match self.lookup(logical)? {
            Some((phys, true)) => Ok(Some((phys, Some(held)))),
            _ => Ok(None),
        }
    }
}

/// Counts one allocation under way while it lives.
struct UnderWay<'a>(&'a AtomicU64);

impl<'a> UnderWay<'a> {
    fn new(count: &'a AtomicU64) -> UnderWay<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        UnderWay(count)
    }
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl BlockDevice for PoolVolume {
    fn block_size(&self) -> u32 {
        self.pool.label.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.size() / u64::from(self.pool.label.block_size)
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        check_range(offset, len, self.block_size(), self.size())?;
        let _io = self.pool.gate.read().await;
        let _vol = self.quiesce.read().await;
        self.check_open()?;
        let mut out = BytesMut::new();
        for p in pieces(offset, len, self.cs()) {
            let n = p.range.len() as u64;
            let data = self.read_piece(&p).await?;
            if n == len {
                return Ok(data);
            }
            out.extend_from_slice(&data);
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        check_range(offset, data.len() as u64, self.block_size(), self.size())?;
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        match self.write_here(offset, data.clone(), false).await? {
            Here::Done => Ok(()),
            Here::MustAllocate => {
                self.detached(move |v| async move { v.write_here(offset, data, true).await })
                    .await
            }
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.block_size(), self.size())?;
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        match self.write_zeroes_here(offset, len, false).await? {
            Here::Done => Ok(()),
            Here::MustAllocate => {
                self.detached(move |v| async move { v.write_zeroes_here(offset, len, true).await })
                    .await
            }
        }
    }

    /// Whole clusters are unmapped (given back to the pool); partial ones are zeroed.
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.block_size(), self.size())?;
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.check_writable()?;
        let cs = self.cs();
        let mut whole = Vec::new();
        // The partial clusters at each end are zeroed one after the other: once one is, running out of space for
        // the other is no longer the NoSpace that changed nothing.
        let mut zeroed = false;
        let mut tail = None;
        for p in pieces(offset, len, cs) {
            let n = p.range.len() as u64;
            let is_tail = u64::from(p.logical) * cs + n == self.size();
            if p.within == 0 && (n == cs || is_tail) {
                whole.push(p.logical);
                if n < cs {
                    tail = Some((p.logical, n));
                }
            } else {
                let at = u64::from(p.logical) * cs + p.within;
                let r = self.write_zeroes(at, n).await;
                r.map_err(|e| if zeroed { partly_written(e) } else { e })?;
                zeroed = true;
            }
        }
        if whole.is_empty() {
            return Ok(());
        }
        // Unmapping frees clusters another volume may reuse: no I/O of ours may still be in flight on them, not
        // even a write whose caller went away, and none may start until the unmapping is applied, even if this
        // caller goes (see `PoolInner::commit_holding`).
        let mut excl = self.pool.gate.clone().write_owned().await;
        // A partial last cluster counted whole as the volume's end: a resize since (it takes no gate) put the end
        // further, and a write beyond the range, acknowledged meanwhile, may be in that cluster. It is zeroed over
        // the range instead, outside the gate, and the rest unmapped.
        if let Some((logical, n)) = tail
            && u64::from(logical) * cs + n != self.size()
        {
            drop(excl);
            whole.retain(|l| *l != logical);
            let r = self.write_zeroes(u64::from(logical) * cs, n).await;
            r.map_err(|e| if zeroed { partly_written(e) } else { e })?;
            if whole.is_empty() {
                return Ok(());
            }
            excl = self.pool.gate.clone().write_owned().await;
        }
        self.check_open()?;
        self.pool.settle().await.map_err(pool_err)?;
        let records: Vec<Record> = whole
            .into_iter()
            .filter_map(|logical| match self.lookup(logical) {
                Ok(Some(_)) => Some(Record::Unmap {
                    volume: self.uuid,
                    logical,
                }),
                _ => None,
            })
            .collect();
        // What each commit frees (a cluster a snapshot shares is not) goes back to the file system as it is
        // applied (`release`).
        let batches = records.chunks(64).map(<[Record]>::to_vec).collect();
        self.pool
            .commit_holding(excl, batches, |_| {})
            .await
            .map_err(pool_err)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.check_writable()?;
        self.pool.dev.flush().await
    }

    /// This volume's allocating writes started before end (their later pieces handed on), then the pool's disk
    /// ends what it was handed before (by any volume of the pool), and the metadata changes asked for before (a
    /// note of missed writes whose caller went away: a reservation's new holder must find it when it reads them)
    /// are applied.
    async fn settle(&self) {
        self.detached.settle().await;
        self.pool.dev.settle().await;
        self.pool.caught_up().await
    }

    async fn allocated_ranges(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, u64)>>, BlockError> {
        self.check_open()?;
        Ok(Some(crate::block::clip_ranges(
            &self.mapped_ranges(),
            offset,
            len,
        )))
    }

    async fn note_missed(&self, missed: &MissedWrites) -> Result<(), BlockError> {
        self.check_open()?;
        // Coarsened to what the volume keeps (its missed-writes budget) before it is journaled: a host's note can name
        // hundreds of thousands of ranges (a 4 MiB command), and a record past the journal's room fails the whole
        // batch it is written with, other volumes' allocating writes included. Coarser names more: a partial
        // rebuild copies more, never less.
        let mut missed = missed.clone();
        missed.coarsen(MISSED_BUDGET.saturating_sub(missed.child.len() + 64) / 44);
        let rec = Record::NoteMissed {
            volume: self.uuid,
            missed,
        };
        self.pool.commit(vec![rec]).await.map_err(pool_err)
    }

    async fn forget_missed(&self, child: &str) -> Result<(), BlockError> {
        self.check_open()?;
        let known = self
            .pool
            .meta()
            .volumes
            .get(&self.uuid)
            .is_some_and(|v| v.missed.contains_key(child));
        if !known {
            return Ok(());
        }
        let rec = Record::ForgetMissed {
            volume: self.uuid,
            child: child.to_string(),
        };
        self.pool.commit(vec![rec]).await.map_err(pool_err)
    }

    async fn missed(&self) -> Result<Vec<MissedWrites>, BlockError> {
        self.check_open()?;
        let meta = self.pool.meta();
        let v = meta.volumes.get(&self.uuid).ok_or(BlockError::Closed)?;
        Ok(v.missed.values().cloned().collect())
    }

    async fn snapshot(&self, id: Uuid) -> Result<(), BlockError> {
        self.check_open()?;
        let pool = super::Pool {
            inner: self.pool.clone(),
        };
        pool.snapshot(self.uuid, id)
            .await
            .map(drop)
            .map_err(|e| match e {
                e @ (PoolError::AlreadyExists { .. } | PoolError::InvalidArgument(_)) => {
                    BlockError::Io(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        e.to_string(),
                    ))
                }
                other => pool_err(other),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::pieces;

    #[test]
    fn pieces_split_on_cluster_boundaries() {
        let p: Vec<_> = pieces(3 * 1024, 10 * 1024, 4096 * 2)
            .map(|p| (p.logical, p.within, p.range))
            .collect();
        assert_eq!(p, vec![(0, 3072, 0..5120), (1, 0, 5120..10240)]);
    }
}
