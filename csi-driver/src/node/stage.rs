//! NodeStageVolume and NodeUnstageVolume: the kernel's paths to the volume, its file system at the staging path.

use super::*;
use std::time::Instant;

/// What NodeStageVolume needs, taken from the request.
pub(super) struct Stage {
    pub(super) uuid: Uuid,
    pub(super) nqn: String,
    pub(super) addresses: Vec<String>,
    pub(super) host_nqn: String,
    pub(super) staging: PathBuf,
    pub(super) cap: VolumeCapability,
    pub(super) fs_default: Option<String>,
    pub(super) probing: mounts::Probing,
}

/// How long the first read of a staged volume's device may take.
const PROBE_WAIT: Duration = Duration::from_secs(60);

pub(super) fn stage(k: &Kernel, mt: &Mounts, s: Stage) -> Result<(), Status> {
    match std::fs::metadata(&s.staging) {
        Ok(m) if !m.is_dir() => {
            return Err(invalid(format!(
                "staging_target_path {} is not a directory",
                s.staging.display()
            )));
        }
        Ok(_) => {}
        Err(_) => std::fs::create_dir_all(&s.staging)
            .map_err(|e| Status::internal(format!("creating {}: {e}", s.staging.display())))?,
    }
    let mount = match &s.cap.access_type {
        Some(AccessType::Mount(m)) => Some(m.clone()),
        _ => None,
    };
    // The file system asked for: the capability's, else the volume's class's. Neither (a volume made outside a
    // StorageClass, a static PersistentVolume with no fsType): whichever the volume holds, ext4 on a blank one.
    let asked = mount
        .as_ref()
        .map(|m| m.fs_type.clone())
        .filter(|f| !f.is_empty())
        .or(s.fs_default.clone());
    // A staging mount whose device is gone (the volume's paths all removed, and its device made again since under
    // another number) is no live volume's: detached, and the volume staged afresh. Before, every stage was
    // ALREADY_EXISTS ("another device mounted") until the node was cleaned by hand. Pods' binds of the old mount keep
    // it (their I/O fails: its device is gone) until they are unpublished.
    let mut staged = mt.at(&s.staging);
    for _ in 0..MAX_STACKED {
        match &staged {
            Some(m) if gone(k, m, k.device(&s.uuid.to_string()).as_ref()) => {
                tracing::warn!(volume = %s.uuid, mount = %m.dev, staging = %s.staging.display(), "the staging mount's device is gone: detaching it lazily and staging again");
                mt.umount_lazy(&s.staging)?;
                staged = mt.at(&s.staging);
            }
            _ => break,
        }
    }
    // Already staged (a retry, or a restarted plugin): the same volume the same way is done, anything else is not.
    if let Some(m) = &staged {
        let dev = k.device(&s.uuid.to_string());
        let same_device = dev.as_ref().is_some_and(|d| d.dev == m.dev);
        return match (&mount, same_device) {
            (Some(_), true)
                if asked.as_ref().is_none_or(|fs| m.fs_type == *fs)
                    && m.read_only() == staged_read_only(&s.cap) =>
            {
                Ok(())
            }
            (Some(_), true) => Err(Status::already_exists(format!(
                "volume {} is staged at {} as {} ({}); asked for {}{}",
                s.uuid,
                s.staging.display(),
                m.fs_type,
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                },
                asked.as_deref().unwrap_or(&m.fs_type),
                if staged_read_only(&s.cap) {
                    ", read-only"
                } else {
                    ""
                }
            ))),
            (None, true) => Err(Status::already_exists(format!(
                "volume {} is staged at {} as a file system; asked for a raw block volume",
                s.uuid,
                s.staging.display()
            ))),
            (_, false) => Err(Status::already_exists(format!(
                "{} has another device mounted ({})",
                s.staging.display(),
                m.source
            ))),
        };
    }
    if k.native_multipath() == Some(false) {
        return Err(Status::failed_precondition(
            ha_agent::node::sysfs::NO_MULTIPATH,
        ));
    }
    let errors = k
        .connect(&s.nqn, &s.addresses, &s.host_nqn)
        .map_err(|e| Status::unavailable(format!("connecting volume {}: {e}", s.uuid)))?;
    if !errors.is_empty() {
        tracing::warn!(volume = %s.uuid, ?errors, "some paths did not connect");
    }
    let dev = k
        .wait_device(&s.uuid.to_string(), DEVICE_WAIT)
        .ok_or_else(|| {
            Status::unavailable(format!(
                "connected to {}, but the kernel shows no namespace with UUID {} (paths: {})",
                s.nqn,
                s.uuid,
                k.paths(&s.nqn)
            ))
        })?;
    let Some(MountVolume { mount_flags, .. }) = mount else {
        tracing::info!(volume = %s.uuid, device = %dev.path.display(), "staged a raw block volume");
        return Ok(());
    };
    let content = mounts::probe_within(&dev.path, PROBE_WAIT, &s.probing).map_err(|e| {
        let msg = format!(
            "reading {} (paths: {}): {e}",
            dev.path.display(),
            k.paths(&s.nqn)
        );
        match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                Status::unavailable(msg)
            }
            _ => Status::internal(msg),
        }
    })?;
    let made = matches!(content, Content::Blank);
    let fs = match content {
        Content::Blank if staged_read_only(&s.cap) => {
            // Formatting writes to a volume the CO asked to have read-only, and the file system would be empty.
            return Err(Status::failed_precondition(format!(
                "volume {} is blank and asked for read-only: it holds no file system to mount, and is not \
                 formatted read-only",
                s.uuid
            )));
        }
        Content::Blank => {
            let fs = asked.unwrap_or_else(|| "ext4".into());
            tracing::info!(volume = %s.uuid, device = %dev.path.display(), fs, "making a file system on a blank volume");
            mounts::mkfs(&fs, &dev.path)?;
            fs
        }
        Content::Fs(have) if asked.as_ref().is_none_or(|fs| *fs == have) => have,
        Content::Fs(have) => {
            return Err(Status::failed_precondition(format!(
                "volume {} holds an {have} file system; asked for {} (it is never reformatted)",
                s.uuid,
                asked.unwrap_or_default()
            )));
        }
        Content::Unknown => {
            return Err(Status::failed_precondition(format!(
                "volume {} holds data that is neither an ext4 nor an xfs file system; it is not formatted",
                s.uuid
            )));
        }
    };
    let opts = mount_options(&fs, mount_flags, read_only_mode(&s.cap));
    mt.mount(&dev.path.to_string_lossy(), &s.staging, &fs, &opts)?;
    // A file system the volume brought may be smaller than it: one restored from a snapshot into a larger claim, or
    // grown while it was not staged. It fills the volume (a no-op when it does); one that cannot grow now still
    // serves at its size.
    if !made
        && !staged_read_only(&s.cap)
        && let Err(e) = mounts::grow_fs(&fs, &dev.path, &s.staging)
    {
        tracing::warn!(volume = %s.uuid, fs, error = %e, "the file system was not grown to fill the volume");
    }
    // Neither secrets nor the paths the CO chose are logged: the volume and device say what happened.
    tracing::info!(volume = %s.uuid, device = %dev.path.display(), fs, "staged");
    Ok(())
}

/// The options a volume's file system `fs` is mounted with: the capability's flags, `ro` for a read-only mode, and
/// for XFS `nouuid`: a volume made from a snapshot or volume holds its source's file system, UUID and all, and XFS
/// refuses to mount a file system whose UUID is mounted already, so a clone on its source's node would never mount.
pub(super) fn mount_options(fs: &str, flags: Vec<String>, read_only: bool) -> Vec<String> {
    let mut opts = flags;
    if read_only {
        opts.push("ro".into());
    }
    if fs == "xfs" && !opts.iter().any(|o| o == "nouuid") {
        opts.push("nouuid".into());
    }
    opts
}

/// Unstages volume `uuid` from `staging`: its file system unmounted there, then its paths removed. Only this volume's
/// mount is taken down. When nothing of the volume is at `staging` but it is mounted elsewhere, its paths stay
/// (FAILED_PRECONDITION): the path is wrong, and removing them would fail that mount's I/O. With the volume at
/// `staging` and also elsewhere, the staging mount is taken off first: its copies seen through a bind of the
/// kubelet's (shared) directory go with it, and a mount still holding the file system after that is a publish the
/// CO has not taken back, which keeps the paths (FAILED_PRECONDITION) until it is unpublished.
pub(super) fn unstage(
    k: &Kernel,
    mt: &Mounts,
    uuid: Uuid,
    staging: &Path,
    wait: &UnstageWait,
) -> Result<(), Status> {
    let r = unstage_once(k, mt, uuid, staging, wait);
    if r.as_ref().is_ok() {
        wait.pathless(uuid, false);
    }
    r
}

/// Longer than any pause of a CO between its retries of an unstage (the kubelet's backoff stops at about two
/// minutes): calls further apart than this are not one stretch without a live path.
const STRETCH_PAUSE: Duration = Duration::from_secs(600);

/// How unstages wait for a volume's live path, and since when each volume's found none.
pub struct UnstageWait {
    /// Per call.
    live: Duration,
    /// From the first call that found none.
    give_up: Duration,
    /// A pause between two calls that found no live path longer than this ends their stretch (see
    /// [`Self::pathless`]).
    pause: Duration,
    /// Per volume, when a call first found no live path and when one last did.
    since: std::sync::Mutex<std::collections::BTreeMap<Uuid, (Instant, Instant)>>,
}

impl UnstageWait {
    pub fn new(live: Duration, give_up: Duration) -> UnstageWait {
        UnstageWait {
            live,
            give_up,
            pause: give_up.max(STRETCH_PAUSE),
            since: Default::default(),
        }
    }

    /// Notes that `uuid` has a live path (`false`: forgets it) or has none (`true`): how long it has had none, as
    /// unstages saw it. Calls that found none count as one stretch only while each comes within [`STRETCH_PAUSE`]
    /// (or the give-up time, if longer) of the one before: a call long after the CO stopped asking (the volume used
    /// again meanwhile) starts a stretch of its own, instead of giving the page cache up at once.
    fn pathless(&self, uuid: Uuid, none: bool) -> Duration {
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        if !none {
            since.remove(&uuid);
            return Duration::ZERO;
        }
        let now = Instant::now();
        let (first, last) = since.entry(uuid).or_insert((now, now));
        if now.duration_since(*last) > self.pause {
            *first = now;
        }
        *last = now;
        now.duration_since(*first)
    }

    /// Whether the calls for `uuid` have found no live path for the give-up time ([`Self::pathless`]); noted as
    /// one more such call. UNAVAILABLE, saying what it waits for, while not.
    fn given_up(&self, uuid: Uuid, k: &Kernel, nqn: &str, doing: &str) -> Result<(), Status> {
        let none_for = self.pathless(uuid, true);
        if none_for < self.give_up {
            return Err(Status::unavailable(format!(
                "volume {uuid} has no live path ({}): {doing} needs one to write what the page cache holds; \
                 waiting for its target's replacement (given up {:?} after the first try, {none_for:?} ago)",
                k.paths(nqn),
                self.give_up
            )));
        }
        Ok(())
    }
}

fn unstage_once(
    k: &Kernel,
    mt: &Mounts,
    uuid: Uuid,
    staging: &Path,
    wait: &UnstageWait,
) -> Result<(), Status> {
    let nqn = proto::names::volume_nqn(&uuid.to_string());
    let dev = k.device(&uuid.to_string());
    let staged = mt.at(staging);
    if let Some(m) = &staged
        && !dev.as_ref().is_some_and(|d| fs_of(m, d))
    {
        // The mount's device is gone (the volume's paths removed by hand, maybe connected again since as a new
        // device): a file system left on a dead device, no live volume's. It is taken off, or the pod using it would
        // never end.
        if gone(k, m, dev.as_ref()) {
            tracing::warn!(volume = %uuid, mount = %m.dev, "the staging mount's device is gone: detaching it lazily");
            mt.umount_lazy(staging)?;
            let n = k.disconnect(&nqn).map_err(Status::internal)?;
            tracing::info!(volume = %uuid, paths = n, "unstaged");
            return Ok(());
        }
        return Err(Status::failed_precondition(not_this(
            staging,
            m,
            uuid,
            dev.as_ref(),
        )));
    }
    // Nothing of the volume at the staging path named, yet it is mounted elsewhere: a wrong path, and
    // disconnecting would fail the I/O of whoever uses it.
    if let (None, Some(d)) = (&staged, &dev) {
        let here = mounts::canonical(staging);
        let elsewhere: Vec<String> = mt
            .table()
            .iter()
            .filter(|m| m.target != here && holds(m, d))
            .map(|m| m.target.display().to_string())
            .collect();
        if !elsewhere.is_empty() {
            return Err(Status::failed_precondition(format!(
                "volume {uuid} is still mounted at {}: unpublish it there first",
                elsewhere.join(", ")
            )));
        }
    }
    let mut disconnected = false;
    if let (Some(_), Some(d)) = (staged, &dev) {
        // The unmount writes what the page cache holds. With no live path it would wait for I/O that never
        // completes, so the paths go first and that data is lost: first wait for one, as a target's switch-over
        // (the node agent connecting its replacement) takes seconds, and a new cluster agent leader longer. Each
        // call waits a while, then answers UNAVAILABLE (the CO calls again); the data is given up only once
        // unstages have found no live path for `give_up`.
        if k.live(&nqn) || k.wait_live(&nqn, wait.live) {
            // Back (or never gone): a later loss starts its own give-up time.
            wait.pathless(uuid, false);
        } else {
            wait.given_up(uuid, k, &nqn, "unmounting")?;
            still_published(mt, staging, d, uuid)?;
            tracing::warn!(volume = %uuid, paths = %k.paths(&nqn), "no live path for the give-up time: disconnecting before the unmount (what the page cache held for the volume is lost)");
            k.disconnect(&nqn).map_err(Status::internal)?;
            disconnected = true;
        }
        for _ in 0..MAX_STACKED {
            if !mt.at(staging).is_some_and(|m| fs_of(&m, d)) {
                break;
            }
            if let Err(e) = mt.umount(staging, Duration::from_secs(60)) {
                // With a live path the unmount can still write what it holds (a busy mount, or a long writeback
                // the timeout cut short): the volume stays connected and the CO asks again. Disconnecting would
                // throw that data away.
                if k.live(&nqn) {
                    return Err(Status::unavailable(format!(
                        "unmounting volume {uuid} at {} failed ({e}); it stays connected so that what it holds is \
                         written: try again",
                        staging.display()
                    )));
                }
                // No live path now (lost during the unmount: a switch-over under way): the same wait as before
                // the unmount, so a replacement path can still take what the page cache holds.
                if !disconnected {
                    wait.given_up(uuid, k, &nqn, "the unmount that failed")?;
                    still_published(mt, staging, d, uuid)?;
                }
                tracing::warn!(volume = %uuid, error = %e, "unmount failed without a live path for the give-up time; disconnecting and detaching lazily");
                k.disconnect(&nqn).map_err(Status::internal)?;
                disconnected = true;
                mt.umount_lazy(staging)?;
            }
        }
        // The staging mount is off, but the file system is still mounted: a publish the CO has not taken back
        // (a bind keeps it alive; the staging mount's copies seen through a bind of the kubelet's directory went
        // with it, the kubelet's directory being shared). Disconnecting would fail that mount's I/O and lose what
        // its page cache holds: the volume stays until it is unpublished there.
        if !disconnected {
            let still: Vec<String> = mt
                .table()
                .iter()
                .filter(|m| fs_of(m, d))
                .map(|m| m.target.display().to_string())
                .collect();
            if !still.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "volume {uuid} is unmounted at {} but still mounted at {}: unpublish it there first",
                    staging.display(),
                    still.join(", ")
                )));
            }
        }
    }
    // Unmounted, yet the device may still be held: an unmount killed at its time limit (or one in another mount
    // namespace) leaves the mount table at once and writes what the page cache held afterwards, holding the device
    // until it is done. Disconnecting now would fail those writes: the volume stays until it lets go.
    // With no live path for the give-up time, what holds it can write nothing anyway (its I/O waits for a path):
    // given up as an unmount without one is, or the unstage would wait for ever.
    if let Some(d) = dev.as_ref().filter(|d| !disconnected && k.held(d)) {
        if k.live(&nqn) || k.wait_live(&nqn, wait.live) {
            wait.pathless(uuid, false);
            return Err(Status::unavailable(format!(
                "volume {uuid}'s device {} is unmounted here but still held (a file system still writing what \
                 it held as it unmounts, or another exclusive user): it stays connected until it is let go; try \
                 again",
                d.path.display()
            )));
        }
        wait.given_up(uuid, k, &nqn, "the holder of the device")?;
        tracing::warn!(volume = %uuid, device = %d.path.display(), paths = %k.paths(&nqn), "the device is still held and had no live path for the give-up time: disconnecting (what its holder had not written is lost)");
    }
    let n = k.disconnect(&nqn).map_err(Status::internal)?;
    tracing::info!(volume = %uuid, paths = n, "unstaged");
    Ok(())
}

/// FAILED_PRECONDITION if the file system on `d` is mounted other than at `staging`: a publish still bound (the CO's
/// order broken, or a publish rebuilt after a kubelet restart). Giving the page cache up then would fail the pod's
/// I/O under it (and lose what its own writes left there), where a path coming back later could still take it. A
/// mount at a path ending as `staging` does (its last two components: the kubelet's `<volume>/globalmount`) is the
/// staging mount itself seen through a bind of a directory above it (the kubelet's directory shared), not a publish.
fn still_published(mt: &Mounts, staging: &Path, d: &Device, uuid: Uuid) -> Result<(), Status> {
    let here = mounts::canonical(staging);
    let tail = |p: &Path| -> Vec<std::ffi::OsString> {
        p.components()
            .rev()
            .take(2)
            .map(|c| c.as_os_str().to_owned())
            .collect()
    };
    let binds: Vec<String> = mt
        .table()
        .iter()
        .filter(|m| fs_of(m, d) && m.target != here && tail(&m.target) != tail(&here))
        .map(|m| m.target.display().to_string())
        .collect();
    if binds.is_empty() {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "volume {uuid} has no live path, and is still published at {}: unpublish it there first (its paths are \
         kept meanwhile, so that one coming back can still take what the page cache holds)",
        binds.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls that found no live path make one stretch only while each comes within the pause of the one before
    /// (here 1 s); a later call starts its own. Before, an old call's time counted, and an unstage days later gave
    /// the page cache up at once.
    #[test]
    fn a_stretch_without_a_live_path_restarts_after_a_pause_past_the_give_up_time() {
        let give_up = Duration::from_millis(200);
        let mut w = UnstageWait::new(Duration::ZERO, give_up);
        w.pause = Duration::from_secs(1);
        let u = Uuid::new_v4();
        assert_eq!(w.pathless(u, true), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(120));
        assert!(w.pathless(u, true) >= Duration::from_millis(120));
        std::thread::sleep(Duration::from_millis(120));
        assert!(
            w.pathless(u, true) >= give_up,
            "calls within the pause of each other: one stretch"
        );
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(
            w.pathless(u, true),
            Duration::ZERO,
            "a call after a pause past the pause starts again"
        );
        assert_eq!(w.pathless(u, false), Duration::ZERO);
    }
}
