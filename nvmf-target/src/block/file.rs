//! A block device backed by a regular file or a block device node. With `direct`, the file is opened O_DIRECT
//! (falling back to buffered I/O where the file system refuses it, e.g. tmpfs) and data moves through 4 KiB-aligned
//! buffers ([`super::aligned`]); reads, writes and flushes of such a device go through io_uring ([`super::uring`])
//! when the kernel allows it, so many are in flight at once without a thread each. Otherwise (and for zeroing and
//! deallocation, which are rare) I/O runs on tokio's blocking pool with positional reads and writes.
//! `KEELSON_IO_URING=off` keeps every device on the blocking pool (to compare).
//!
//! A file may be sparse, on a file system that fills up before the file does: a write or zeroing that finds no
//! room there (`ENOSPC`, or `EDQUOT` past a quota) fails with [`BlockError::NoSpace`], an out-of-space device and
//! not a failing one, which a pool turns into Capacity Exceeded as when it is full itself.
//! [`BlockDevice::preallocate`] reserves the space of a range ahead (`fallocate`). Space released
//! ([`BlockDevice::release`]) is punched out of a file, and discarded on a block device (`BLKDISCARD`) until the
//! device refuses a discard.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use nix::fcntl::{FallocateFlags, fallocate};

use super::aligned::{self, AlignedBuf};
use super::discard;
use super::exclusive::{self, DiskLock};
use super::inflight::InFlight;
use super::uring::{HeldFile, Ring};
use super::{BlockDevice, BlockError, check_range};

/// Largest piece written at once when zeroing by writes.
const ZERO_CHUNK: u64 = 1 << 20;

/// An error of a write or a zeroing that found no room in the file system under the file: [`BlockError::NoSpace`].
fn out_of_space(e: BlockError) -> BlockError {
    match &e {
        BlockError::Io(io) if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
            BlockError::NoSpace
        }
        _ => e,
    }
}

/// An open disk and, when it was opened exclusively, the lock that says so: held by the device and by each of its
/// operations in a ring, the last one closing it and letting the lock go.
struct OpenDisk {
    file: Arc<File>,
    _lock: Option<DiskLock>,
}

impl std::os::fd::AsRawFd for OpenDisk {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

pub struct FileDevice {
    file: Arc<File>,
    /// The same file with its exclusive lock, held by each operation in flight (in a ring, or on a blocking
    /// thread): neither the descriptor nor the lock goes while one may still reach the disk.
    disk: Arc<OpenDisk>,
    /// `disk`, as a ring holds it.
    held: HeldFile,
    path: PathBuf,
    block_size: u32,
    num_blocks: u64,
    direct: bool,
    /// What the offset and length of each I/O must be a multiple of for O_DIRECT (1 when buffered).
    direct_unit: u32,
    /// A block device: all its space is there already (nothing to preallocate).
    is_block: bool,
    /// A block device that has not refused a discard: released ranges are discarded (a thin LUN or an SSD under
    /// it gets the space back). Cleared at the first refusal.
    discards: AtomicBool,
    /// Whether its reads, writes and flushes go through io_uring (the issuing thread's ring, [`Ring::local`]): it
    /// is open O_DIRECT and io_uring is available.
    uring: bool,
    /// Its reads, writes and flushes handed to the kernel or a blocking thread that have not ended.
    inflight: InFlight,
    /// Why a flush failed, once one did: what was written before it may never reach the disk, and the kernel tells
    /// of a writeback error once (the next flush succeeds over the lost writes), so every later flush and write
    /// fails until the device is opened again.
    flush_failed: std::sync::OnceLock<String>,
}

/// Whether a device opened O_DIRECT goes through io_uring: unless io_uring is off or unavailable (then the
/// blocking pool serves it).
fn uses_ring(path: &Path) -> bool {
    if std::env::var("KEELSON_IO_URING").is_ok_and(|v| v == "off") {
        return false;
    }
    match Ring::local() {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "io_uring unavailable: the device's I/O goes through threads");
            false
        }
    }
}

/// The unit of direct I/O on `file`, opened O_DIRECT: what offsets and lengths must be multiples of (the disk's
/// logical block size: 4096 on a 4Kn disk, and for a file of a file system on one). Found by asking: a direct read
/// of one unit at an offset of one unit fails with EINVAL where the unit is larger. Beyond 4096 (no block size
/// works), 65536.
fn direct_io_unit(file: &File) -> u32 {
    for unit in [512u32, 4096] {
        let mut b = AlignedBuf::for_filling(unit as usize);
        match file.read_at(b.bytes_mut(), u64::from(unit)) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            _ => return unit,
        }
    }
    65536
}

fn check_block_size(block_size: u32) -> Result<(), BlockError> {
    if !matches!(block_size, 512 | 4096) {
        return Err(BlockError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("block size {block_size} is not 512 or 4096"),
        )));
    }
    Ok(())
}

impl FileDevice {
    /// Opens `path`; a missing regular file is created with `create_size` bytes (0 refuses to create).
    pub fn open(
        path: &Path,
        create_size: u64,
        block_size: u32,
        direct: bool,
    ) -> Result<FileDevice, BlockError> {
        check_block_size(block_size)?;
        if !path.exists() && create_size > 0 {
            let f = File::create(path)?;
            f.set_len(create_size)?;
        }
        Self::open_with(path, block_size, direct, false)
    }

    /// Opens an existing file or block device for this process alone ([`exclusive`]): a disk another opener holds
    /// (through this path or any other: a symlink, a loop device over the same file) fails with
    /// [`BlockError::InUse`] saying who holds it. The claim lasts as long as the device.
    pub fn open_exclusive(
        path: &Path,
        block_size: u32,
        direct: bool,
    ) -> Result<FileDevice, BlockError> {
        Self::open_with(path, block_size, direct, true)
    }

    fn open_with(
        path: &Path,
        block_size: u32,
        direct: bool,
        exclusive: bool,
    ) -> Result<FileDevice, BlockError> {
        check_block_size(block_size)?;
        // O_EXCL without O_CREAT means "exclusive" only for block devices; a regular file ignores it.
        let is_block = std::fs::metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device()
        });
        let excl = if is_block && exclusive {
            libc::O_EXCL
        } else {
            0
        };
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            o.custom_flags(if direct { libc::O_DIRECT | excl } else { excl });
            o.open(path)
        };
        let (mut file, direct) = match open(direct) {
            Ok(f) => (f, direct),
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => (open(false)?, false),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && excl != 0 => {
                return Err(exclusive::busy_block_device(path));
            }
            Err(e) => return Err(e.into()),
        };
        let lock = if exclusive {
            Some(exclusive::lock(&file, path)?)
        } else {
            None
        };
        let size = file.seek(SeekFrom::End(0))?;
        let num_blocks = size / u64::from(block_size);
        if num_blocks == 0 {
            return Err(BlockError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is smaller than one block", path.display()),
            )));
        }
        let direct_unit = if direct { direct_io_unit(&file) } else { 1 };
        let file = Arc::new(file);
        let disk = Arc::new(OpenDisk {
            file: file.clone(),
            _lock: lock,
        });
        Ok(FileDevice {
            held: disk.clone(),
            disk,
            file,
            path: path.to_path_buf(),
            block_size,
            num_blocks,
            direct,
            direct_unit,
            is_block,
            discards: AtomicBool::new(
                is_block && !std::env::var("KEELSON_DISCARD").is_ok_and(|v| v == "off"),
            ),
            uring: direct && uses_ring(path),
            inflight: InFlight::new(),
            flush_failed: std::sync::OnceLock::new(),
        })
    }

    /// Refuses once a flush failed ([`FileDevice::flush_failed`]).
    fn check_flushes(&self) -> Result<(), BlockError> {
        match self.flush_failed.get() {
            Some(why) => Err(BlockError::Io(std::io::Error::other(format!(
                "a flush of {} failed ({why}): writes before it may be lost; open it again",
                self.path.display()
            )))),
            None => Ok(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether O_DIRECT is in effect.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The smallest block size that works on this device: with O_DIRECT, the disk's unit of direct I/O (4096 on
    /// a 4Kn disk, where 512-byte I/O fails), else 512.
    pub fn smallest_block_size(&self) -> u32 {
        self.direct_unit.max(512)
    }

    /// Whether its I/O goes through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.uring
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, BlockError> {
        let disk = self.disk.clone();
        // Ends with the closure, which runs to the end whether or not anyone still waits for it.
        let ticket = self.inflight.start();
        match tokio::task::spawn_blocking(move || {
            let _ticket = ticket;
            f(&disk.file)
        })
        .await
        {
            Ok(r) => r.map_err(BlockError::from),
            Err(_) => Err(BlockError::Closed),
        }
    }

    async fn zero_by_writes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let mut done = 0;
        while done < len {
            let n = ZERO_CHUNK.min(len - done);
            self.write(offset + done, Bytes::from(vec![0u8; n as usize]))
                .await?;
            done += n;
        }
        Ok(())
    }

    async fn try_fallocate(
        &self,
        flags: FallocateFlags,
        offset: u64,
        len: u64,
    ) -> Result<bool, BlockError> {
        let r = self
            .blocking(
                move |f| match fallocate(f, flags, offset as i64, len as i64) {
                    Ok(()) => Ok(true),
                    Err(
                        nix::errno::Errno::EOPNOTSUPP
                        | nix::errno::Errno::ENODEV
                        | nix::errno::Errno::EINVAL,
                    ) => Ok(false),
                    Err(e) => Err(std::io::Error::from(e)),
                },
            )
            .await?;
        Ok(r)
    }
}

impl FileDevice {
    /// Discards the range of a block device (`BLKDISCARD`): the device may unmap it (a thin LUN gives the space
    /// back, an SSD learns the blocks are free). What the range reads afterwards is the device's choice. `Ok(false)`
    /// once the device has refused one, for whatever reason (no discard support, or one it advertises and fails:
    /// a bridge or a SAN refusing UNMAP): later releases ask nothing, and a refusal is no I/O error of the disk
    /// (its data is untouched). `KEELSON_DISCARD=off` in the environment at open asks none.
    async fn discard(&self, offset: u64, len: u64) -> Result<bool, BlockError> {
        if !self.discards.load(Ordering::Relaxed) {
            return Ok(false);
        }
        if len == 0 {
            return Ok(true);
        }
        let r = self
            .blocking(move |f| discard::blkdiscard(f, offset, len))
            .await;
        match r {
            Ok(true) => Ok(true),
            Ok(false) | Err(_) => {
                self.discards.store(false, Ordering::Relaxed);
                let why = match &r {
                    Err(e) => e.to_string(),
                    _ => "not supported".to_string(),
                };
                tracing::warn!(device = %self.path.display(), %why, "the block device refused a discard: freed clusters stay mapped on it, and no more discards are asked");
                Ok(false)
            }
        }
    }

    /// Writes `data` at `offset`, through the ring when there is one.
    async fn write_data(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        check_range(
            offset,
            data.len() as u64,
            self.block_size,
            self.size_bytes(),
        )?;
        let direct = self.direct;
        if let Some(r) = self.ring() {
            let data = if aligned::is_aligned(&data) {
                data
            } else {
                aligned::concat([&data[..]], data.len())
            };
            return Ok(r
                .write(&self.held, offset, data, Some(&self.inflight))
                .await?);
        }
        self.blocking(move |f| {
            if direct && !aligned::is_aligned(&data) {
                f.write_all_at(&aligned::concat([&data[..]], data.len()), offset)
            } else {
                f.write_all_at(&data, offset)
            }
        })
        .await
    }

    /// The ring to issue an I/O on, if the device uses io_uring (and this thread has one; if not, the blocking
    /// pool serves the I/O).
    fn ring(&self) -> Option<Arc<Ring>> {
        if !self.uring {
            return None;
        }
        Ring::local()
            .inspect_err(|e| tracing::debug!(error = %e, "no io_uring on this thread"))
            .ok()
    }
}

#[async_trait]
impl BlockDevice for FileDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        if let Some(r) = self.ring() {
            return Ok(r
                .read(&self.held, offset, len as usize, Some(&self.inflight))
                .await?);
        }
        let direct = self.direct;
        self.blocking(move |f| {
            if direct {
                let mut b = AlignedBuf::for_filling(len as usize);
                f.read_exact_at(b.bytes_mut(), offset)?;
                Ok(b.freeze())
            } else {
                let mut v = vec![0u8; len as usize];
                f.read_exact_at(&mut v, offset)?;
                Ok(Bytes::from(v))
            }
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        self.check_flushes()?;
        self.write_data(offset, data).await.map_err(out_of_space)
    }

    /// `FALLOC_FL_ZERO_RANGE` over the whole range, holes included: it also gives a sparse file's holes their
    /// space (unwritten, reading as zeroes), so a pool's cluster zeroed here never finds the file system full
    /// when it is written in place later. Skipping the holes (they read as zeroes already) was tried and undone:
    /// a replica's writes into clusters it has then failed with ENOSPC on a full file system.
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        self.check_flushes()?;
        if len == 0
            || self
                .try_fallocate(FallocateFlags::FALLOC_FL_ZERO_RANGE, offset, len)
                .await
                .map_err(out_of_space)?
        {
            return Ok(());
        }
        self.zero_by_writes(offset, len).await
    }

    fn room(&self) -> Option<u64> {
        if self.is_block {
            return None;
        }
        let s = nix::sys::statvfs::fstatvfs(&*self.file).ok()?;
        Some(s.blocks_available().saturating_mul(s.fragment_size()))
    }

    fn room_of(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        if self.is_block {
            return None;
        }
        Some(self.file.metadata().ok()?.dev())
    }

    fn backed(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        if self.is_block {
            return None;
        }
        Some(self.file.metadata().ok()?.blocks().saturating_mul(512))
    }

    async fn preallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        if len > 0 && !self.is_block {
            // Mode 0 allocates what is not allocated and leaves the rest as it is; a block device or a file
            // system that cannot do it has nothing to reserve.
            self.try_fallocate(FallocateFlags::empty(), offset, len)
                .await
                .map_err(out_of_space)?;
        }
        Ok(())
    }

    fn releases_space(&self) -> bool {
        !self.is_block || self.discards.load(Ordering::Relaxed)
    }

    async fn release(&self, offset: u64, len: u64) -> Result<bool, BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        if self.is_block {
            return self.discard(offset, len).await;
        }
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        // A punch can need room for the file's extent tree: a full file system is not a failing disk.
        self.try_fallocate(punch, offset, len)
            .await
            .map_err(out_of_space)
    }

    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        self.check_flushes()?;
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        // A punch can need room for the file's extent tree: a full file system is no failing disk (as in
        // `release`).
        if len == 0
            || self
                .try_fallocate(punch, offset, len)
                .await
                .map_err(out_of_space)?
        {
            return Ok(());
        }
        self.zero_by_writes(offset, len).await.map_err(out_of_space)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.check_flushes()?;
        let r = if let Some(r) = self.ring() {
            r.fdatasync(&self.held, Some(&self.inflight))
                .await
                .map_err(BlockError::from)
        } else {
            self.blocking(|f| f.sync_data()).await
        };
        if let Err(e) = &r {
            let _ = self.flush_failed.set(e.to_string());
        }
        r
    }

    async fn settle(&self) {
        self.inflight.settle().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::conformance;

    /// A write whose submission the kernel refused, its asker and its device gone before the ring's retry: the
    /// disk stays claimed (another exclusive open is refused) until the write is done, and the write lands in it.
    /// Before, the claim went with the device, and a new opener could take the disk with that write still to come.
    #[tokio::test]
    async fn a_dropped_devices_pending_write_keeps_its_disk_claimed_until_it_is_done() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk");
        std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
        let d = FileDevice::open_exclusive(&p, 4096, true).unwrap();
        if d.ring().is_none() {
            assert!(
                std::env::var_os(e2e::privileged::REQUIRE_VAR).is_none(),
                "no io_uring here"
            );
            eprintln!("skipped: no io_uring here");
            return;
        }
        // The submission and the ring's next retries are refused: the write waits in the queue.
        crate::block::uring::FAIL_SUBMITS.with(|n| n.set(20));
        let mut b = AlignedBuf::for_filling(4096);
        b.bytes_mut().fill(5);
        assert!(d.write(0, b.freeze()).now_or_never().is_none());
        drop(d);
        assert!(
            matches!(
                FileDevice::open_exclusive(&p, 4096, true),
                Err(BlockError::InUse(_))
            ),
            "the disk was free while a write to it was still to come"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let d = loop {
            match FileDevice::open_exclusive(&p, 4096, true) {
                Ok(d) => break d,
                Err(BlockError::InUse(_)) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the write never ended"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert!(d.read(0, 4096).await.unwrap().iter().all(|&x| x == 5));
    }

    #[tokio::test]
    async fn conforms_buffered_and_direct() {
        let dir = tempfile::tempdir().unwrap();
        for (i, direct) in [false, true].into_iter().enumerate() {
            for bs in [512, 4096] {
                let p = dir.path().join(format!("dev{i}-{bs}"));
                let d = FileDevice::open(&p, 4 << 20, bs, direct).unwrap();
                conformance::run(&d).await;
            }
        }
    }

    /// Needs root: attaches a loop device (as storage nodes in tests do) and runs the conformance suite on it
    /// with O_DIRECT.
    #[tokio::test]
    #[allow(clippy::await_holding_lock)] // the lock only keeps other test threads' losetup away
    async fn conforms_on_a_loop_block_device_with_o_direct() {
        if !e2e::privileged::allowed("conforms_on_a_loop_block_device_with_o_direct") {
            return;
        }
        let _loops = crate::block::LOOP_DEVICES
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("loop.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let path = PathBuf::from(&dev);
        let result = async move {
            let d = FileDevice::open(&path, 0, 4096, true).unwrap();
            assert!(d.is_direct(), "a block device takes O_DIRECT");
            assert!(d.uses_io_uring(), "io_uring is available on this kernel");
            assert_eq!(d.size_bytes(), 8 << 20);
            conformance::run(&d).await;
        };
        let r = tokio::spawn(result).await;
        std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status()
            .unwrap();
        r.unwrap();
    }

    #[test]
    fn refuses_bad_block_size_and_tiny_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FileDevice::open(&dir.path().join("a"), 1 << 20, 1000, false).is_err());
        std::fs::write(dir.path().join("b"), [0u8; 100]).unwrap();
        assert!(FileDevice::open(&dir.path().join("b"), 0, 512, false).is_err());
        assert!(FileDevice::open(&dir.path().join("missing"), 0, 512, false).is_err());
    }
}
