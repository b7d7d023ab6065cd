//! Mounts and file systems on this node, read from what the node can see (`/proc/self/mountinfo`, the device's
//! first bytes) so that a restarted plugin knows what is staged and published, and changed with the system's own
//! tools (`mount`, `umount`, `mkfs.ext4`, `mkfs.xfs`, `resize2fs`, `xfs_growfs`). A file system is made only on a blank device: one whose
//! first MiB is zeros (a new thin volume reads zeros); anything else that is not ext4 or xfs is left alone.
//! [`Mounts`] is the mount table and the tools that change it, as a value (the system's, or a test's), like
//! [`crate::kernel::Kernel`] for sysfs; paths go to `mount` and `umount` after `--`, never as options.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// One line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mounted device.
    pub dev: String,
    /// The path inside the mounted file system that is mounted here (`/` for a whole file system; a bind mount of
    /// a device node shows the node's path).
    pub root: String,
    pub target: PathBuf,
    /// Per-mount options (`rw`, `ro`, `noatime`, ...).
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
}

impl Mount {
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = |j: usize| {
            b.get(j)
                .filter(|c| (b'0'..=b'7').contains(c))
                .map(|c| u16::from(c - b'0'))
        };
        if b[i] == b'\\'
            && let (Some(x), Some(y), Some(z)) = (octal(i + 1), octal(i + 2), octal(i + 3))
        {
            out.push(((x << 6) | (y << 3) | z) as u8);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let f: Vec<&str> = pre.split(' ').collect();
            let p: Vec<&str> = post.split(' ').collect();
            Some(Mount {
                dev: f.get(2)?.to_string(),
                root: unescape(f.get(3)?),
                target: PathBuf::from(unescape(f.get(4)?)),
                options: f.get(5)?.split(',').map(String::from).collect(),
                fs_type: p.first()?.to_string(),
                source: unescape(p.get(1).unwrap_or(&"")),
            })
        })
        .collect()
}

/// Runs a tool: program, arguments, how long it may take (see [`run`]).
pub type Tool = Arc<dyn Fn(&str, &[&str], Duration) -> Result<(), ToolError> + Send + Sync>;

/// A tool that failed, or did not finish in its time and was killed: what it was doing may still happen (a mount
/// completing, an unmount writing what the file system held), so a CO is told the outcome is uncertain
/// (DEADLINE_EXCEEDED, which the kubelet follows with a cleanup call) rather than that it failed for good (INTERNAL,
/// after which a mount that completed late would be left behind).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolError {
    pub message: String,
    /// Killed at its time limit, not ended by itself.
    pub unfinished: bool,
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for ToolError {
    fn from(message: String) -> Self {
        ToolError {
            message,
            unfinished: false,
        }
    }
}

impl From<&str> for ToolError {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

impl From<ToolError> for tonic::Status {
    fn from(e: ToolError) -> Self {
        if e.unfinished {
            tonic::Status::deadline_exceeded(e.message)
        } else {
            tonic::Status::internal(e.message)
        }
    }
}

/// The mount table this process sees and the tools that change it.
#[derive(Clone)]
pub struct Mounts {
    /// `/proc/self/mountinfo`.
    pub mountinfo: PathBuf,
    /// Runs `mount` and `umount`: [`run`].
    pub tool: Tool,
}

impl Mounts {
    /// This process's mount namespace and the system's tools.
    pub fn system() -> Mounts {
        Mounts {
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            tool: Arc::new(run),
        }
    }

    /// The mounts, in mountinfo's order (a mount stacked on another comes after it).
    pub fn table(&self) -> Vec<Mount> {
        parse(&std::fs::read_to_string(&self.mountinfo).unwrap_or_default())
    }

    /// The topmost mount at `path`, if any.
    pub fn at(&self, path: &Path) -> Option<Mount> {
        let path = canonical(path);
        self.table().into_iter().rev().find(|m| m.target == path)
    }

    /// Mounts `source` at `target` with type `fs` (empty: none, e.g. a bind) and `options`.
    pub fn mount(
        &self,
        source: &str,
        target: &Path,
        fs: &str,
        options: &[String],
    ) -> Result<(), ToolError> {
        let t = target.to_string_lossy();
        let opts = options.join(",");
        let mut args: Vec<&str> = Vec::new();
        if !fs.is_empty() {
            args.extend(["-t", fs]);
        }
        if !opts.is_empty() {
            args.extend(["-o", &opts]);
        }
        args.extend(["--", source, &t]);
        (self.tool)("mount", &args, Duration::from_secs(120))
    }

    /// Makes the bind mount at `target` read-only.
    pub fn remount_read_only(&self, target: &Path) -> Result<(), ToolError> {
        (self.tool)(
            "mount",
            &["-o", "remount,bind,ro", "--", &target.to_string_lossy()],
            Duration::from_secs(60),
        )
    }

    /// Unmounts the topmost mount at `target` within `limit`.
    pub fn umount(&self, target: &Path, limit: Duration) -> Result<(), ToolError> {
        (self.tool)("umount", &["--", &target.to_string_lossy()], limit)
    }

    /// Detaches the topmost mount at `target` now, however busy (the file system goes once unused).
    pub fn umount_lazy(&self, target: &Path) -> Result<(), ToolError> {
        (self.tool)(
            "umount",
            &["-l", "--", &target.to_string_lossy()],
            Duration::from_secs(30),
        )
    }
}

/// `path` as mountinfo names it: symbolic links resolved (as given when it does not exist).
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// What a device holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Blank,
    Fs(String),
    /// Data that is not a file system Keelson makes: a partition table, another file system, anything.
    Unknown,
}

/// Devices whose probe has not finished (see [`probe_within`]).
pub type Probing = Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>;

/// [`probe`], giving up after `limit`: a device whose target accepts the connect but never answers a read would
/// otherwise hold the call (and the volume's other calls, which wait for it) for ever. The read goes on in a thread
/// of its own until the device answers or goes away; meanwhile `busy` names the device, and another probe of it
/// fails at once, so threads cannot pile up.
pub fn probe_within(dev: &Path, limit: Duration, busy: &Probing) -> std::io::Result<Content> {
    if !busy
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(dev.into())
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "an earlier read of the device has not finished",
        ));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let (path, held) = (dev.to_path_buf(), busy.clone());
    let spawned = std::thread::Builder::new()
        .name("keelson-probe".into())
        .spawn(move || {
            let r = probe(&path);
            held.lock().unwrap_or_else(|e| e.into_inner()).remove(&path);
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        busy.lock().unwrap_or_else(|e| e.into_inner()).remove(dev);
        return Err(e);
    }
    rx.recv_timeout(limit).unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer to a read in {limit:?}"),
        ))
    })
}

/// How much of a device is read to tell what it holds. Blank only if all of it is zero: file systems and volume
/// managers keep their signatures in the first megabyte (btrfs and reiserfs at 64 KiB, ZFS's labels from 128 KiB,
/// ISO 9660 at 32 KiB, LVM and GPT at 512 bytes), so a device with any of them is never taken for blank and
/// formatted. Before, only the first 64 KiB were read, and a btrfs volume counted as blank.
pub const PROBE_LEN: usize = 1 << 20;

/// Reads what `dev` holds from its first [`PROBE_LEN`] bytes.
pub fn probe(dev: &Path) -> std::io::Result<Content> {
    let mut f = std::fs::File::open(dev)?;
    let mut buf = vec![0u8; PROBE_LEN];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(classify(&buf[..n]))
}

pub fn classify(head: &[u8]) -> Content {
    if head.len() >= 4 && &head[..4] == b"XFSB" {
        return Content::Fs("xfs".into());
    }
    // ext2/3/4: the superblock at 1024, its magic 0xEF53 at offset 56.
    if head.len() >= 1082 && head[1080] == 0x53 && head[1081] == 0xEF {
        return Content::Fs("ext4".into());
    }
    if head.iter().all(|b| *b == 0) {
        Content::Blank
    } else {
        Content::Unknown
    }
}

/// Runs a system tool; `Err` carries its stderr. `limit`: how long it may take (a mount of a device whose paths
/// are gone can wait for I/O forever); past it the tool is killed and the error says it did not finish
/// ([`ToolError::unfinished`]). Its stderr is read as it comes (a tool saying much is not held up by a full pipe), and
/// a killed tool is reaped by a thread of its own once it ends (one in the middle of an unmount ends only when the
/// file system is done), so none is left a zombie.
pub fn run(program: &str, args: &[&str], limit: Duration) -> Result<(), ToolError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut err = String::new();
            let _ = e.read_to_string(&mut err);
            err
        })
    });
    let t = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => {
                let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
                return Err(format!("{program} {}: {st}: {}", args.join(" "), err.trim()).into());
            }
            Ok(None) if t.elapsed() > limit => {
                let _ = child.kill();
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
                return Err(ToolError {
                    message: format!("{program} {} did not finish in {limit:?}", args.join(" ")),
                    unfinished: true,
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{program}: {e}").into()),
        }
    }
}

/// Makes file system `fs` (ext4 or xfs) on `dev`.
pub fn mkfs(fs: &str, dev: &Path) -> Result<(), ToolError> {
    let d = dev.to_string_lossy();
    match fs {
        "ext4" => run(
            "mkfs.ext4",
            &["-q", "-F", "-E", "nodiscard", &d],
            Duration::from_secs(600),
        ),
        "xfs" => run("mkfs.xfs", &["-q", "-K", &d], Duration::from_secs(600)),
        other => Err(format!("cannot make file system {other:?}").into()),
    }
}

/// Grows the mounted file system `fs` on `dev` (mounted at `mountpoint`) to fill the device, online.
pub fn grow_fs(fs: &str, dev: &Path, mountpoint: &Path) -> Result<(), ToolError> {
    match fs {
        "ext4" | "ext3" | "ext2" => run(
            "resize2fs",
            &[&dev.to_string_lossy()],
            Duration::from_secs(600),
        ),
        "xfs" => run(
            "xfs_growfs",
            &[&mountpoint.to_string_lossy()],
            Duration::from_secs(600),
        ),
        other => Err(format!("cannot grow file system {other:?}").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let t = "22 1 0:21 / /proc rw,nosuid shared:5 - proc proc rw\n\
                 98 30 259:1 / /var/lib/kubelet/plugins/x/globalmount rw,relatime shared:50 - ext4 /dev/nvme0n1 rw\n\
                 99 30 0:5 /nvme0n1 /var/lib/kubelet/pods/p/volumeDevices/v ro,relatime - devtmpfs udev rw\n\
                 100 30 259:1 / /mnt/with\\040space rw - xfs /dev/nvme0n1 rw\n";
        let m = parse(t);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].dev, "259:1");
        assert_eq!(m[1].fs_type, "ext4");
        assert_eq!(m[1].source, "/dev/nvme0n1");
        assert!(!m[1].read_only());
        assert_eq!(m[2].root, "/nvme0n1");
        assert!(m[2].read_only());
        assert_eq!(m[3].target, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn only_a_blank_device_is_blank() {
        let mut head = vec![0u8; 64 << 10];
        assert_eq!(classify(&head), Content::Blank);
        head[1080] = 0x53;
        head[1081] = 0xEF;
        assert_eq!(classify(&head), Content::Fs("ext4".into()));
        let mut x = vec![0u8; 64 << 10];
        x[..4].copy_from_slice(b"XFSB");
        assert_eq!(classify(&x), Content::Fs("xfs".into()));
        let mut mbr = vec![0u8; 64 << 10];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        assert_eq!(classify(&mbr), Content::Unknown);
    }

    #[test]
    fn a_device_with_a_signature_past_64_kib_is_not_blank() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        // btrfs: its superblock at 64 KiB, the magic 64 bytes into it; the first 64 KiB are zeros.
        let mut img = vec![0u8; 4 << 20];
        img[(64 << 10) + 64..(64 << 10) + 72].copy_from_slice(b"_BHRfS_M");
        std::fs::write(&dev, &img).unwrap();
        assert_eq!(probe(&dev).unwrap(), Content::Unknown);
        std::fs::write(&dev, vec![0u8; 4 << 20]).unwrap();
        assert_eq!(probe(&dev).unwrap(), Content::Blank);
    }

    #[test]
    fn tools_report_failure_and_timeouts() {
        assert!(run("true", &[], Duration::from_secs(5)).is_ok());
        let e = run(
            "sh",
            &["-c", "echo nope >&2; exit 3"],
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(e.message.contains("nope") && !e.unfinished, "{e}");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Internal);
        let e = run("sleep", &["5"], Duration::from_millis(100)).unwrap_err();
        assert!(e.message.contains("did not finish") && e.unfinished, "{e}");
        // Uncertain, not failed: the kubelet calls again to clean up what the tool may still have done.
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::DeadlineExceeded);
    }

    /// A tool that writes more to stderr than a pipe holds, then ends: it ends (its stderr read as it comes), and a
    /// failing one's error keeps what it said. Before, it blocked on the full pipe until killed at the limit.
    #[test]
    fn a_tool_saying_much_on_stderr_is_not_held_up() {
        let loud = "head -c 200000 /dev/zero | tr '\\0' x >&2";
        run("sh", &["-c", loud], Duration::from_secs(20)).unwrap();
        let e = run(
            "sh",
            &["-c", &format!("{loud}; exit 1")],
            Duration::from_secs(20),
        )
        .unwrap_err();
        assert!(
            !e.unfinished && e.message.len() > 100_000,
            "{}",
            e.message.len()
        );
    }

    /// A device that never answers (a FIFO no one writes to: its open blocks) fails the probe after the limit, and
    /// a second probe at once while the first still waits; once it answers, the device can be probed again.
    #[test]
    fn a_probe_of_a_device_that_never_answers_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("dev");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let busy = Probing::default();
        let t = std::time::Instant::now();
        let e = probe_within(&fifo, Duration::from_millis(200), &busy).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5));
        let e = probe_within(&fifo, Duration::from_millis(200), &busy).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        // The device answers (a writer opens it and closes it: end of file).
        drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
        for _ in 0..100 {
            if busy.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(busy.lock().unwrap().is_empty());
        let blank = dir.path().join("blank");
        std::fs::write(&blank, vec![0u8; 64 << 10]).unwrap();
        assert_eq!(
            probe_within(&blank, Duration::from_secs(5), &busy).unwrap(),
            Content::Blank
        );
    }

    #[test]
    fn paths_reach_the_tools_after_a_double_dash() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = calls.clone();
        let dir = tempfile::tempdir().unwrap();
        let mountinfo = dir.path().join("mountinfo");
        std::fs::write(
            &mountinfo,
            "1 0 254:0 / / rw - ext4 /dev/vda rw\n\
             2 1 259:1 / /-o rw - ext4 /dev/nvme0n1 rw\n\
             3 2 259:1 / /-o ro - ext4 /dev/nvme0n1 rw\n",
        )
        .unwrap();
        let m = Mounts {
            mountinfo,
            tool: Arc::new(move |program: &str, args: &[&str], _| {
                seen.lock()
                    .unwrap()
                    .push(format!("{program} {}", args.join(" ")));
                Ok(())
            }),
        };
        m.mount("/dev/nvme0n1", Path::new("/-o"), "ext4", &["ro".into()])
            .unwrap();
        m.mount("/-o", Path::new("/pods/-t"), "", &["bind".into()])
            .unwrap();
        m.remount_read_only(Path::new("/-o")).unwrap();
        m.umount(Path::new("/-o"), Duration::from_secs(1)).unwrap();
        m.umount_lazy(Path::new("/-o")).unwrap();
        assert_eq!(
            *calls.lock().unwrap(),
            [
                "mount -t ext4 -o ro -- /dev/nvme0n1 /-o",
                "mount -o bind -- /-o /pods/-t",
                "mount -o remount,bind,ro -- /-o",
                "umount -- /-o",
                "umount -l -- /-o",
            ]
        );
        // The topmost of the mounts stacked at a path.
        assert!(m.at(Path::new("/-o")).unwrap().read_only());
        assert_eq!(m.table().len(), 3);
        assert!(m.at(Path::new("/nowhere")).is_none());
    }
}
