//! Exclusive use of a disk on this machine: one opener per disk, whatever path names it.
//!
//! - A regular file is locked with `flock` on the open file. The lock is the kernel's, on the file itself (so a
//!   symlink or a hard link names the same lock), and it goes away with the process, kill -9 included: a crashed
//!   io-engine never leaves a stale lock behind.
//! - A block device is opened `O_EXCL` (done by the caller), which the kernel enforces against mounts and every
//!   other exclusive opener, through any device node or `/dev/disk/by-*` link.
//! - A loop device stands for its backing file: opening a loop device also locks its backing file, and opening a
//!   file also takes every loop device attached to it (`O_EXCL`). So the file, a loop device over it, and two loop
//!   devices over one file all count as one disk.
//!
//! A refusal says who holds the disk where the kernel tells (`/proc/locks` names the process holding a file).

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::BlockError;

/// Major number of Linux loop devices.
const LOOP_MAJOR: u32 = 7;

/// What keeps a disk ours: the locked files and the loop devices held open exclusively. Dropped with the device
/// that owns it, which unlocks explicitly: a child process forked meanwhile (and not yet exec'd) may still share
/// the open file, and must not keep the disk locked after us.
#[derive(Debug, Default)]
pub struct DiskLock {
    held: Vec<File>,
}

impl Drop for DiskLock {
    fn drop(&mut self) {
        for f in &self.held {
            let _ = f.unlock();
        }
    }
}

fn in_use(msg: String) -> BlockError {
    BlockError::InUse(msg)
}

/// Locks what `file` (opened from `path`; a block device already opened `O_EXCL`) stands for.
pub fn lock(file: &File, path: &Path) -> Result<DiskLock, BlockError> {
    let meta = file.metadata()?;
    // Built first, so that an error half-way unlocks what was locked already.
    let mut lock = DiskLock::default();
    if meta.file_type().is_block_device() {
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        if major == LOOP_MAJOR
            && let Some(backing) = loop_backing_file(major, minor)
        {
            let f = File::open(&backing)?;
            try_flock(&f, &backing).map_err(|e| match e {
                BlockError::InUse(why) => in_use(format!(
                    "{} is a loop device over {}, and {why}",
                    path.display(),
                    backing.display()
                )),
                e => e,
            })?;
            lock.held.push(f);
        }
    } else {
        try_flock(file, path)?;
        lock.held.push(file.try_clone()?);
        for dev in loop_devices_over(&meta) {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(&dev)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EBUSY) => in_use(format!(
                        "{} backs loop device {}, which is in use (mounted, or opened exclusively by another \
                         program)",
                        path.display(),
                        dev.display()
                    )),
                    _ => BlockError::Io(e),
                })?;
            lock.held.push(f);
        }
    }
    Ok(lock)
}

/// The error for a block device whose `O_EXCL` open failed with `EBUSY`; for a loop device it names the process
/// holding its backing file, when one does.
pub fn busy_block_device(path: &Path) -> BlockError {
    let backing_holder = std::fs::metadata(path).ok().and_then(|m| {
        let (major, minor) = (libc::major(m.rdev()), libc::minor(m.rdev()));
        let backing = (major == LOOP_MAJOR).then(|| loop_backing_file(major, minor))??;
        let holder = flock_holder(&std::fs::metadata(&backing).ok()?)?;
        Some(format!(
            ": it is a loop device over {}, which is locked by {holder}",
            backing.display()
        ))
    });
    in_use(format!(
        "block device {} is in use (mounted, or opened exclusively by another program such as an io-engine){}",
        path.display(),
        backing_holder.unwrap_or_default()
    ))
}

/// How long a lock left by a process that has died is waited for: the kernel keeps a killed process's files open
/// until its I/O in flight (io_uring's above all) is finished or cancelled, a moment after the process is gone.
const DEAD_HOLDER_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

fn try_flock(file: &File, path: &Path) -> Result<(), BlockError> {
    let start = std::time::Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(TryLockError::WouldBlock) => {
                let pid = file.metadata().ok().and_then(|m| {
                    find_flock_holder(
                        &std::fs::read_to_string("/proc/locks").ok()?,
                        m.dev(),
                        m.ino(),
                    )
                });
                if pid.is_none_or(|p| !alive(p)) && start.elapsed() < DEAD_HOLDER_GRACE {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    continue;
                }
                let holder = file
                    .metadata()
                    .ok()
                    .and_then(|m| flock_holder(&m))
                    .unwrap_or_else(|| "another process".to_string());
                return Err(in_use(format!("{} is locked by {holder}", path.display())));
            }
            Err(TryLockError::Error(e)) => return Err(BlockError::Io(e)),
        }
    }
}

/// Whether process `pid` is running (not gone, not a zombie or dying).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain anything.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z' | 'X' | 'x'))
}

/// "process PID (COMM)" of the holder of a `flock` on the file, from `/proc/locks`.
fn flock_holder(meta: &std::fs::Metadata) -> Option<String> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = find_flock_holder(&locks, meta.dev(), meta.ino())?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    Some(format!("process {pid} ({})", comm.trim()))
}

/// Finds the pid of a FLOCK on (`dev`, `ino`) in the text of `/proc/locks`, whose lines read
/// `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF` (device major and minor in hex, inode in decimal).
fn find_flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Lines of waiters start "1: -> FLOCK ..."; only holders count.
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

/// The backing file of loop device `major:minor`, if it has one that still exists.
fn loop_backing_file(major: u32, minor: u32) -> Option<PathBuf> {
    let s = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/loop/backing_file"))
        .ok()?;
    let p = PathBuf::from(s.trim_end_matches('\n'));
    p.exists().then_some(p)
}

/// Every loop device attached to the file `meta` describes.
fn loop_devices_over(meta: &std::fs::Metadata) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| {
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let b = std::fs::metadata(backing.trim_end_matches('\n')).ok()?;
            (b.dev() == meta.dev() && b.ino() == meta.ino())
                .then(|| Path::new("/dev").join(e.file_name()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_of_a_flock_is_read_from_proc_locks() {
        let dev = libc::makedev(0xfd, 0x01);
        let locks = "1: POSIX  ADVISORY  WRITE 77 fd:01:5678 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 fd:01:5678 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 99 fd:01:5678 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 55 fd:01:9999 0 EOF\n";
        assert_eq!(find_flock_holder(locks, dev, 5678), Some(4242));
        assert_eq!(find_flock_holder(locks, dev, 1), None);
        assert_eq!(find_flock_holder("", dev, 5678), None);
    }

    #[test]
    fn only_a_running_process_counts_as_alive() {
        assert!(alive(std::process::id()));
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        assert!(!alive(pid), "a reaped child");
        assert!(!alive(u32::MAX));
    }

    #[test]
    fn a_locked_file_is_refused_through_any_name_until_its_holder_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let link = dir.path().join("by-id");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let first = File::options().read(true).write(true).open(&path).unwrap();
        let held = lock(&first, &path).unwrap();

        let again = File::options().read(true).write(true).open(&link).unwrap();
        let e = lock(&again, &link).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, BlockError::InUse(_)), "{msg}");
        assert!(
            msg.contains(&format!("process {}", std::process::id())),
            "{msg}"
        );

        drop((held, first));
        lock(&again, &link).unwrap();
    }

    fn losetup(img: &Path) -> PathBuf {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    }

    fn detach(dev: &Path) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(dev)
            .status();
    }

    fn open_locked(path: &Path) -> Result<(File, DiskLock), BlockError> {
        let is_block = std::fs::metadata(path)
            .unwrap()
            .file_type()
            .is_block_device();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(if is_block { libc::O_EXCL } else { 0 })
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => busy_block_device(path),
                _ => BlockError::Io(e),
            })?;
        let l = lock(&f, path)?;
        Ok((f, l))
    }

    /// Needs root (loop devices): a file and the loop devices over it are one disk, whichever is opened first.
    #[test]
    fn a_file_and_loop_devices_over_it_are_one_disk() {
        if !e2e::privileged::allowed("a_file_and_loop_devices_over_it_are_one_disk") {
            return;
        }
        let _loops = crate::block::LOOP_DEVICES
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let (l0, l1) = (losetup(&img), losetup(&img));
        let result = std::panic::catch_unwind(|| {
            // The file first: both loop devices are refused, naming the file's holder.
            let held = open_locked(&img).unwrap();
            for l in [&l0, &l1] {
                let e = open_locked(l).unwrap_err().to_string();
                let attached = std::process::Command::new("losetup")
                    .arg("-a")
                    .output()
                    .unwrap();
                assert!(
                    e.contains("loop device") && e.contains("disk.img"),
                    "{e}\n{}\n{}",
                    String::from_utf8_lossy(&attached.stdout),
                    std::fs::read_to_string("/proc/locks").unwrap_or_default()
                );
                assert!(
                    e.contains(&format!("process {}", std::process::id())),
                    "{e}"
                );
            }
            drop(held);
            // A loop device first: the file and the other loop device over it are refused. (The refused opens above
            // held it exclusively for a moment: the kernel may still count that claim just after their close.)
            let t = std::time::Instant::now();
            let held = loop {
                match open_locked(&l0) {
                    Err(BlockError::InUse(_))
                        if t.elapsed() < std::time::Duration::from_secs(2) =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                    r => break r.unwrap(),
                }
            };
            let e = open_locked(&img).unwrap_err().to_string();
            assert!(e.contains("in use"), "{e}");
            let e = open_locked(&l1).unwrap_err().to_string();
            assert!(e.contains("locked by"), "{e}");
            // The same loop device again: the kernel's O_EXCL.
            let e = open_locked(&l0).unwrap_err().to_string();
            assert!(e.contains("block device") && e.contains("in use"), "{e}");
            drop(held);
            open_locked(&l1).unwrap();
        });
        detach(&l0);
        detach(&l1);
        result.unwrap();
    }
}
