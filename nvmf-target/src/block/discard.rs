//! Discarding a range of a block device (`BLKDISCARD`), as `fstrim` and LVM do: the device may unmap it, so a
//! thin-provisioned LUN gives the space back and an SSD learns the blocks are free. What the range reads afterwards
//! is the device's choice (zeroes or what it held).
//!
//! Unsafe code, one call: the ioctl reads two `u64`s (start and length in bytes) through a pointer to an array on
//! this function's stack, which outlives the call; the kernel keeps no reference to it.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

// BLKDISCARD is _IO(0x12, 119), though it reads its argument.
nix::ioctl_write_ptr_bad!(blkdiscard_ioctl, 0x1277, [u64; 2]);

/// Discards `len` bytes at `offset` of the block device `file` (blocking). `Ok(false)`: the device takes no discards.
pub fn blkdiscard(file: &impl AsRawFd, offset: u64, len: u64) -> std::io::Result<bool> {
    let range = [offset, len];
    // SAFETY: see the module's doc.
    match unsafe { blkdiscard_ioctl(file.as_raw_fd(), &range) } {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOTTY) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
