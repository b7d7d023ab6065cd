//! NodeExpandVolume and NodeGetVolumeStats: growing a mounted file system after the namespace grew, and the
//! volume's usage and condition.

use super::*;

/// After the controller grew the volume: the kernel rescans it (for at most `wait`), and a mounted file system
/// grows to fill it. Returns the device's size. More than the volume holds, once a live path has been rescanned, is
/// OUT_OF_RANGE, as the spec asks of a capacity the plugin cannot give; with no live path it is UNAVAILABLE.
pub(super) fn expand(
    k: &Kernel,
    mt: &Mounts,
    uuid: Uuid,
    path: &Path,
    staging: Option<&Path>,
    want: u64,
    wait: Duration,
) -> Result<u64, Status> {
    let meta = std::fs::metadata(path)
        .map_err(|_| Status::not_found(format!("{} does not exist", path.display())))?;
    let nqn = proto::names::volume_nqn(&uuid.to_string());
    let before = k
        .device(&uuid.to_string())
        .ok_or_else(|| Status::not_found(format!("volume {uuid} has no device on this node")))?;
    // A file system volume: the mount at the path must be this volume's.
    let mount = if meta.is_dir() {
        let m = mt.at(path).ok_or_else(|| {
            Status::not_found(format!(
                "volume {uuid} is not mounted at {}",
                path.display()
            ))
        })?;
        if m.dev != before.dev {
            return Err(Status::not_found(format!(
                "{} holds another device ({}), not volume {uuid}",
                path.display(),
                m.source
            )));
        }
        Some(m)
    } else {
        None
    };
    let dev = k
        .rescan(&nqn, &uuid.to_string(), want, wait)
        .map_err(|e| Status::unavailable(format!("rescanning volume {uuid}: {e}")))?;
    if dev.size_bytes < want && k.live(&nqn) {
        return Err(Status::out_of_range(format!(
            "volume {uuid} holds {} bytes, less than the {want} asked for (ControllerExpandVolume grows it)",
            dev.size_bytes
        )));
    }
    if dev.size_bytes < want {
        return Err(Status::unavailable(format!(
            "volume {uuid}'s device is {} bytes, not yet the {want} asked for (paths: {})",
            dev.size_bytes,
            k.paths(&nqn)
        )));
    }
    if let Some(m) = mount {
        // The staging mount is the whole file system; the published path is a bind of it.
        let at = staging
            .filter(|s| mt.at(s).is_some_and(|s| s.dev == m.dev))
            .unwrap_or(path);
        mounts::grow_fs(&m.fs_type, &dev.path, at)?;
        tracing::info!(volume = %uuid, fs = %m.fs_type, from = before.size_bytes, to = dev.size_bytes, "file system grown");
    }
    Ok(dev.size_bytes)
}

pub(super) fn stats(
    k: &Kernel,
    mt: &Mounts,
    uuid: Uuid,
    path: &Path,
) -> Result<NodeGetVolumeStatsResponse, Status> {
    let meta = std::fs::metadata(path)
        .map_err(|_| Status::not_found(format!("{} does not exist", path.display())))?;
    let nqn = proto::names::volume_nqn(&uuid.to_string());
    let usage = if meta.is_dir() {
        // Mounted there, and (while the volume has a device) its file system: not another volume's usage under
        // this one's name.
        let device = k.device(&uuid.to_string());
        let mounted = mt
            .at(path)
            .is_some_and(|m| device.as_ref().is_none_or(|d| belongs::fs_of(&m, d)));
        if !mounted {
            return Err(Status::not_found(format!(
                "volume {uuid} is not mounted at {}",
                path.display()
            )));
        }
        let s = nix::sys::statvfs::statvfs(path)
            .map_err(|e| Status::internal(format!("statvfs {}: {e}", path.display())))?;
        let frag = s.fragment_size() as i64;
        vec![
            VolumeUsage {
                available: s.blocks_available() as i64 * frag,
                total: s.blocks() as i64 * frag,
                used: (s.blocks() - s.blocks_free()) as i64 * frag,
                unit: volume_usage::Unit::Bytes as i32,
            },
            VolumeUsage {
                available: s.files_available() as i64,
                total: s.files() as i64,
                used: (s.files() - s.files_free()) as i64,
                unit: volume_usage::Unit::Inodes as i32,
            },
        ]
    } else {
        let d = k.device(&uuid.to_string()).ok_or_else(|| {
            Status::not_found(format!("volume {uuid} has no device on this node"))
        })?;
        vec![VolumeUsage {
            available: 0,
            total: d.size_bytes as i64,
            used: 0,
            unit: volume_usage::Unit::Bytes as i32,
        }]
    };
    let live = k.live(&nqn);
    Ok(NodeGetVolumeStatsResponse {
        usage,
        volume_condition: Some(VolumeCondition {
            abnormal: !live,
            message: if live {
                format!("paths: {}", k.paths(&nqn))
            } else {
                format!("no live path to the volume (paths: {})", k.paths(&nqn))
            },
        }),
    })
}
