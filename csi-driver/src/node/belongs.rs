//! Whether a mount is a volume's: the file system on its device (a staging mount or a bind of one), or its device
//! node bound onto a file (a raw block publish); and whether a mount is of a device that is gone. Nothing else is
//! ever unmounted or refused as this volume's.

use super::*;

/// How many mounts stacked at one path unpublish or unstage takes off, at most.
pub(super) const MAX_STACKED: usize = 8;

/// Whether mount `m` is the file system on device `d`: a staging mount, or a bind of one (a publish).
pub(super) fn fs_of(m: &Mount, d: &Device) -> bool {
    m.dev == d.dev
}

/// Whether mount `m` is device `d`'s node bound onto a file (a raw block publish): mountinfo names the node's own
/// file system (devtmpfs) and the node's path in it, so the node at the mount point must be a block device with
/// `d`'s number.
pub(super) fn node_of(m: &Mount, d: &Device) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if Path::new(&m.root).file_name() != Some(std::ffi::OsStr::new(&d.name)) {
        return false;
    }
    std::fs::metadata(&m.target).is_ok_and(|meta| {
        let r = meta.rdev();
        meta.file_type().is_block_device()
            && format!("{}:{}", nix::sys::stat::major(r), nix::sys::stat::minor(r)) == d.dev
    })
}

/// Whether mount `m` is volume device `d`'s, in either way.
pub(super) fn holds(m: &Mount, d: &Device) -> bool {
    fs_of(m, d) || node_of(m, d)
}

/// "holds /dev/x (259:2), not volume …": what a refusal says about a mount that is not the volume's.
pub(super) fn not_this(at: &Path, m: &Mount, uuid: Uuid, dev: Option<&Device>) -> String {
    let why = match dev {
        Some(_) => String::new(),
        None => ", which has no device on this node".into(),
    };
    format!(
        "{} holds {} ({}), not volume {uuid}{why}: left as it is",
        at.display(),
        m.source,
        m.dev
    )
}

/// Whether mount `m` is of a device that is gone, so no live volume's. A file system's mount names its device,
/// which is gone if the kernel has no such block device (whether or not the volume has a device now); a raw block
/// volume's bind names the device-node file system instead, and counts as gone when the node it bound was removed
/// (mountinfo names its root `/nvme0n1//deleted`: the device went, even if one of that name came since) or the
/// volume has no device.
/// A file system on no block device (tmpfs, NFS, overlay: an anonymous device, major 0) is never a gone volume's:
/// such a mount at a path the CO named by mistake is left as it is, and the volume's paths with it.
pub(super) fn gone(k: &Kernel, m: &Mount, dev: Option<&Device>) -> bool {
    if m.fs_type == "devtmpfs" {
        return m.root.ends_with("//deleted") || dev.is_none() && !k.block_device_exists(&m.dev);
    }
    !m.dev.starts_with("0:") && !k.block_device_exists(&m.dev)
}
