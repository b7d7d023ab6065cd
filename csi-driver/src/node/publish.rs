//! NodePublishVolume and NodeUnpublishVolume: the staged file system (or the device node) bound where the pod
//! wants it, and taken off again.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) fn publish(
    k: &Kernel,
    mt: &Mounts,
    sole: &SoleWriters,
    uuid: Uuid,
    staging: &Path,
    target: &Path,
    cap: &VolumeCapability,
    readonly: bool,
) -> Result<(), Status> {
    let ro = readonly || read_only_mode(cap);
    let block = matches!(cap.access_type, Some(AccessType::Block(_)));
    let not_staged =
        || Status::failed_precondition(format!("volume {uuid} is not staged on this node"));
    let dev = k.device(&uuid.to_string()).ok_or_else(not_staged)?;
    let source = if block {
        if !dev.path.exists() {
            return Err(not_staged());
        }
        dev.path.clone()
    } else {
        match mt.at(staging) {
            Some(m) if fs_of(&m, &dev) => staging.to_path_buf(),
            Some(m) => {
                return Err(Status::failed_precondition(not_this(
                    staging,
                    &m,
                    uuid,
                    Some(&dev),
                )));
            }
            None => {
                return Err(Status::failed_precondition(format!(
                    "volume {uuid} is not staged at {}",
                    staging.display()
                )));
            }
        }
    };
    // Published already: the same volume the same way is done; another volume, or this one another way, is "published
    // but incompatible".
    if let Some(m) = mt.at(target) {
        let same = if block {
            node_of(&m, &dev)
        } else {
            fs_of(&m, &dev)
        };
        if !same {
            return Err(Status::already_exists(format!(
                "{} holds {} ({}), not volume {uuid} as a {}",
                target.display(),
                m.source,
                m.dev,
                if block {
                    "raw block volume"
                } else {
                    "file system"
                }
            )));
        }
        // A bind of a read-only staging mount (its mount flags said `ro`) is read-only too, whatever was asked.
        let staged_ro = !block && mt.at(staging).is_some_and(|s| s.read_only());
        return if m.read_only() == (ro || staged_ro) {
            // Known from now on, if it was not (published before a plugin that kept no file).
            if single_writer(cap) && sole.elsewhere(mt, uuid, &dev, block, target).is_none() {
                sole.published(uuid, target);
            }
            Ok(())
        } else {
            Err(Status::already_exists(format!(
                "{} is published {}",
                target.display(),
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                }
            )))
        };
    }
    let single = single_writer(cap);
    if single && let Some(other) = sole.elsewhere(mt, uuid, &dev, block, target) {
        return Err(Status::failed_precondition(format!(
            "volume {uuid} is SINGLE_NODE_SINGLE_WRITER and is published at {} already: unpublish it there first",
            other.display()
        )));
    }
    let made = if block {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map(drop)
    } else {
        std::fs::create_dir_all(target)
    };
    made.map_err(|e| Status::internal(format!("creating {}: {e}", target.display())))?;
    mt.mount(&source.to_string_lossy(), target, "", &["bind".into()])?;
    if ro && let Err(e) = mt.remount_read_only(target) {
        // Not left writable behind the failure (a retry would find it published read-write, ALREADY_EXISTS for
        // ever): taken off, the retry publishes afresh.
        if let Err(u) = mt
            .umount(target, Duration::from_secs(30))
            .or_else(|_| mt.umount_lazy(target))
        {
            tracing::error!(volume = %uuid, target = %target.display(), error = %u, "cannot take off a bind left writable");
        }
        return Err(e.into());
    }
    if single {
        sole.published(uuid, target);
    }
    tracing::info!(volume = %uuid, ro, block, "published");
    Ok(())
}

/// Whether the access mode lets the volume be published at one target path only.
fn single_writer(cap: &VolumeCapability) -> bool {
    cap.access_mode
        .as_ref()
        .is_some_and(|m| m.mode == Mode::SingleNodeSingleWriter as i32)
}

/// Where each SINGLE_NODE_SINGLE_WRITER volume is published on this node, as this plugin published it. Kept by the
/// plugin rather than read from the mount table, where a node whose kubelet directory is also seen through a bind
/// shows every mount twice (each publish would find "another" one). With a file ([`SoleWriters::kept_in`]: the
/// binary keeps it beside its socket, in the kubelet's plugin directory) it outlives the plugin: a restarted plugin
/// still refuses a second target path for a volume published before the restart. An entry whose target no longer
/// holds the volume (the node rebooted, the mount taken off by hand) refuses nothing.
#[derive(Default)]
pub struct SoleWriters {
    map: std::sync::Mutex<std::collections::BTreeMap<Uuid, PathBuf>>,
    pub(super) file: Option<PathBuf>,
}

impl SoleWriters {
    /// Kept in `file` too: what it holds is read now (an unreadable or undecodable file is logged and taken as
    /// empty), and it is written again at each change.
    pub fn kept_in(file: PathBuf) -> SoleWriters {
        let map = match std::fs::read(&file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            read => read
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                .unwrap_or_else(|e| {
                    tracing::warn!(file = %file.display(), error = %e, "single-writer publishes not read: taken as none");
                    Default::default()
                }),
        };
        SoleWriters {
            map: std::sync::Mutex::new(map),
            file: Some(file),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<Uuid, PathBuf>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `map` to the file, if kept in one (a temporary file renamed over it: never half written).
    fn save(&self, map: &std::collections::BTreeMap<Uuid, PathBuf>) {
        let Some(file) = &self.file else { return };
        // Named by the process: two plugins on one node for a moment (a rolling update) never share one.
        let tmp = file.with_extension(format!("{}.tmp", std::process::id()));
        let r = serde_json::to_vec(map)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = r {
            tracing::warn!(file = %file.display(), error = %e, "single-writer publishes not saved: a restarted plugin will not know them");
        }
    }

    /// The other target path volume `uuid` (device `dev`) is published at and still holds it, if any.
    fn elsewhere(
        &self,
        mt: &Mounts,
        uuid: Uuid,
        dev: &Device,
        block: bool,
        target: &Path,
    ) -> Option<PathBuf> {
        let other = self.map().get(&uuid)?.clone();
        if mounts::canonical(&other) == mounts::canonical(target) {
            return None;
        }
        let holds = mt.at(&other).is_some_and(|m| {
            if block {
                node_of(&m, dev)
            } else {
                fs_of(&m, dev)
            }
        });
        holds.then_some(other)
    }

    fn published(&self, uuid: Uuid, target: &Path) {
        let mut map = self.map();
        map.insert(uuid, target.to_path_buf());
        self.save(&map);
    }

    fn unpublished(&self, uuid: Uuid, target: &Path) {
        let mut map = self.map();
        if map
            .get(&uuid)
            .is_some_and(|t| mounts::canonical(t) == mounts::canonical(target))
        {
            map.remove(&uuid);
            self.save(&map);
        }
    }
}

/// Unpublishes volume `uuid` from `target`: its mounts of this volume taken off, then what publish made there (an
/// empty directory, or an empty file for a raw block volume) removed. A mount of anything else, or anything else at
/// the path, is left as it is (FAILED_PRECONDITION: the path is sound, what the node holds there is not this
/// volume's publish); nothing there is done.
pub(super) fn unpublish(
    k: &Kernel,
    mt: &Mounts,
    sole: &SoleWriters,
    uuid: Uuid,
    target: &Path,
) -> Result<(), Status> {
    let r = unpublish_here(k, mt, uuid, target);
    if r.is_ok() {
        sole.unpublished(uuid, target);
    }
    r
}

fn unpublish_here(k: &Kernel, mt: &Mounts, uuid: Uuid, target: &Path) -> Result<(), Status> {
    let left = |why: &str| {
        Status::failed_precondition(format!(
            "{} {why}, not a publish of volume {uuid}: left as it is",
            target.display()
        ))
    };
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(volume = %uuid, "nothing published there: unpublished");
            return Ok(());
        }
        Err(e) => {
            return Err(Status::internal(format!(
                "reading {}: {e}",
                target.display()
            )));
        }
        Ok(m) if m.file_type().is_symlink() => return Err(left("is a symbolic link")),
        Ok(_) => {}
    }
    let dev = k.device(&uuid.to_string());
    for _ in 0..MAX_STACKED {
        let Some(m) = mt.at(target) else { break };
        // A bind of a file system whose device is gone (the volume's paths removed by hand, maybe connected again
        // since as a new device) is no live volume's: taken off, or the pod using it would never end.
        if gone(k, &m, dev.as_ref()) {
            tracing::warn!(volume = %uuid, mount = %m.dev, "the published mount's device is gone: detaching it lazily");
            mt.umount_lazy(target)?;
            continue;
        }
        if !dev.as_ref().is_some_and(|d| holds(&m, d)) {
            return Err(Status::failed_precondition(not_this(
                target,
                &m,
                uuid,
                dev.as_ref(),
            )));
        }
        mt.umount(target, Duration::from_secs(60))?;
    }
    if mt.at(target).is_some() {
        return Err(Status::internal(format!(
            "{} is still mounted after {MAX_STACKED} unmounts",
            target.display()
        )));
    }
    let meta = std::fs::symlink_metadata(target)
        .map_err(|e| Status::internal(format!("reading {}: {e}", target.display())))?;
    let removed = if meta.is_dir() {
        let empty = std::fs::read_dir(target)
            .map_err(|e| Status::internal(format!("reading {}: {e}", target.display())))?
            .next()
            .is_none();
        if !empty {
            return Err(left("is a directory that is not empty"));
        }
        std::fs::remove_dir(target)
    } else if meta.is_file() && meta.len() == 0 {
        std::fs::remove_file(target)
    } else {
        return Err(left("is not an empty file"));
    };
    removed.map_err(|e| Status::internal(format!("removing {}: {e}", target.display())))?;
    tracing::info!(volume = %uuid, "unpublished");
    Ok(())
}
