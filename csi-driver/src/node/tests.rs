//! The node service on a node in a temporary directory: a sysfs tree with two volumes' devices, a fake
//! `/dev/nvme-fabrics` (a plain file: what a connect writes stays there), and a mount table that fake `mount` and
//! `umount` tools edit as the real ones would, recording every call.

use std::sync::Mutex;

use proto::csi::volume_capability::{AccessMode, BlockVolume};
use tonic::Code;

use super::*;
use crate::mounts::Tool;

/// Volume A: device nvme0n1 (259:1), connected through controller nvme0.
const A: &str = "11111111-1111-4111-8111-111111111111";
/// Volume B: device nvme1n1 (259:2); no path of it in sysfs.
const B: &str = "22222222-2222-4222-8222-222222222222";
const HOST: &str = "nqn.2026-11.io.keelson:host-app-1";

struct Fake {
    dir: tempfile::TempDir,
    svc: NodeService,
    calls: Arc<Mutex<Vec<String>>>,
    mountinfo: PathBuf,
    /// Set: a read-only remount fails.
    remount_fails: Arc<std::sync::atomic::AtomicBool>,
    /// Every `umount` (not a lazy one) fails: a busy mount, or a writeback longer than its timeout.
    umount_fails: Arc<std::sync::atomic::AtomicBool>,
    /// Set with `umount_fails`: volume A's only path is lost while the unmount runs (its state `connecting`).
    umount_loses_path: Arc<std::sync::atomic::AtomicBool>,
}

/// `mount` and `umount` on the mount table in `mountinfo`: paths are read after `--` only.
fn fake_tools(
    mountinfo: PathBuf,
    sys: PathBuf,
    calls: Arc<Mutex<Vec<String>>>,
    remount_fails: Arc<std::sync::atomic::AtomicBool>,
    umount_fails: Arc<std::sync::atomic::AtomicBool>,
    umount_loses_path: Arc<std::sync::atomic::AtomicBool>,
) -> Tool {
    Arc::new(move |program: &str, args: &[&str], _| {
        // An unmount after volume A's paths were removed says so: what its page cache held was lost.
        let after =
            if program == "umount" && sys.join("class/nvme/nvme0/delete_controller").exists() {
                " (after the disconnect)"
            } else {
                ""
            };
        calls
            .lock()
            .unwrap()
            .push(format!("{program} {}{after}", args.join(" ")));
        let text = std::fs::read_to_string(&mountinfo).unwrap();
        let table = mounts::parse(&text);
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let paths: Vec<&str> = args
            .iter()
            .skip_while(|a| **a != "--")
            .skip(1)
            .copied()
            .collect();
        let top = |p: &str| {
            let p = mounts::canonical(Path::new(p));
            table
                .iter()
                .rposition(|m| m.target == p)
                .ok_or_else(|| format!("{} is not mounted", p.display()))
        };
        match (program, paths.as_slice()) {
            ("umount", _)
                if !args.contains(&"-l")
                    && umount_fails.load(std::sync::atomic::Ordering::SeqCst) =>
            {
                if umount_loses_path.load(std::sync::atomic::Ordering::SeqCst) {
                    std::fs::write(
                        sys.join("class/nvme-subsystem/nvme-subsys0/nvme0/state"),
                        "connecting\n",
                    )
                    .unwrap();
                }
                return Err("umount: timed out".into());
            }
            ("umount", [t]) => {
                lines.remove(top(t)?);
            }
            ("mount", [t]) if args.contains(&"remount,bind,ro") => {
                if remount_fails.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err("mount: timed out".into());
                }
                let i = top(t)?;
                lines[i] = lines[i].replacen(" rw - ", " ro - ", 1).replacen(
                    " rw,relatime - ",
                    " ro,relatime - ",
                    1,
                );
            }
            ("mount", [source, t]) => {
                let (dev, root, fs) = if args.contains(&"bind") {
                    match top(source) {
                        Ok(i) => (table[i].dev.clone(), "/".into(), table[i].fs_type.clone()),
                        Err(_) => {
                            let name = Path::new(source).file_name().unwrap();
                            (
                                "0:6".into(),
                                format!("/{}", name.to_string_lossy()),
                                "devtmpfs".into(),
                            )
                        }
                    }
                } else {
                    let name = Path::new(source).file_name().unwrap();
                    let dev = std::fs::read_to_string(sys.join("block").join(name).join("dev"));
                    let fs = args.iter().skip_while(|a| **a != "-t").nth(1).unwrap();
                    (dev.unwrap().trim().to_string(), "/".into(), fs.to_string())
                };
                lines.push(mountinfo_line(
                    lines.len() + 100,
                    &dev,
                    &root,
                    &mounts::canonical(Path::new(t)),
                    &fs,
                    source,
                ));
            }
            _ => return Err(format!("unexpected call: {program} {args:?}").into()),
        }
        std::fs::write(&mountinfo, lines.join("\n") + "\n").unwrap();
        Ok(())
    })
}

fn mountinfo_line(
    id: usize,
    dev: &str,
    root: &str,
    target: &Path,
    fs: &str,
    source: &str,
) -> String {
    format!(
        "{id} 1 {dev} {root} {} rw,relatime - {fs} {source} rw",
        target.display()
    )
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let (sys, dev) = (dir.path().join("sys"), dir.path().join("dev"));
        std::fs::create_dir_all(&dev).unwrap();
        for (name, uuid, majmin) in [("nvme0n1", A, "259:1"), ("nvme1n1", B, "259:2")] {
            let b = sys.join("block").join(name);
            std::fs::create_dir_all(&b).unwrap();
            std::fs::write(b.join("uuid"), format!("{uuid}\n")).unwrap();
            std::fs::write(b.join("dev"), format!("{majmin}\n")).unwrap();
            std::fs::write(b.join("size"), "2048\n").unwrap();
            std::fs::write(dev.join(name), "").unwrap();
            std::fs::create_dir_all(sys.join("dev/block").join(majmin)).unwrap();
        }
        std::fs::create_dir_all(sys.join("dev/block/254:0")).unwrap();
        let s = sys.join("class/nvme-subsystem/nvme-subsys0");
        std::fs::create_dir_all(s.join("nvme0")).unwrap();
        std::fs::write(s.join("subsysnqn"), proto::names::volume_nqn(A) + "\n").unwrap();
        std::fs::write(s.join("nvme0/state"), "live\n").unwrap();
        std::fs::create_dir_all(s.join("nvme0/nvme0c0n1")).unwrap();
        std::fs::write(s.join("nvme0/nvme0c0n1/ana_state"), "optimized\n").unwrap();
        std::fs::write(s.join("nvme0/address"), "traddr=127.0.0.1,trsvcid=4420\n").unwrap();
        std::fs::create_dir_all(sys.join("class/nvme/nvme0")).unwrap();
        std::fs::write(dir.path().join("fabrics"), "").unwrap();
        let mountinfo = dir.path().join("mountinfo");
        std::fs::write(&mountinfo, "1 0 254:0 / / rw,relatime - ext4 /dev/vda rw\n").unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let remount_fails = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let umount_fails = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let umount_loses_path = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mounts = Mounts {
            mountinfo: mountinfo.clone(),
            tool: fake_tools(
                mountinfo.clone(),
                sys.clone(),
                calls.clone(),
                remount_fails.clone(),
                umount_fails.clone(),
                umount_loses_path.clone(),
            ),
        };
        let kernel = Kernel::new(&sys, dir.path().join("fabrics"), &dev);
        Fake {
            svc: NodeService::new("app-1".into(), 0, kernel, mounts),
            dir,
            calls,
            mountinfo,
            remount_fails,
            umount_fails,
            umount_loses_path,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// The same, its unstages waiting `wait` for a live path per call and giving the page cache up `give_up`
    /// after the first call that found none.
    fn with_live_wait(self, wait: Duration, give_up: Duration) -> Fake {
        Fake {
            svc: self.svc.with_live_wait(wait, give_up),
            ..self
        }
    }

    fn p(&self, p: &str) -> String {
        self.path(p).display().to_string()
    }

    /// Takes the calls made so far.
    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn table(&self) -> String {
        std::fs::read_to_string(&self.mountinfo).unwrap()
    }

    /// Volume A's only path's controller state now (`live`, `connecting`, ...).
    fn path_state(&self, s: &str) {
        std::fs::write(
            self.path("sys/class/nvme-subsystem/nvme-subsys0/nvme0/state"),
            format!("{s}\n"),
        )
        .unwrap()
    }

    /// Whether the volume A's controller was deleted.
    fn disconnected(&self) -> bool {
        self.path("sys/class/nvme/nvme0/delete_controller").exists()
    }

    /// A mount as the kernel would list it (`at` made if missing: a directory).
    fn mounted(&self, dev: &str, root: &str, at: &str, fs: &str, source: &str) {
        let at = self.path(at);
        if !at.exists() {
            std::fs::create_dir_all(&at).unwrap();
        }
        let mut t = self.table();
        t.push_str(&mountinfo_line(
            t.lines().count() + 50,
            dev,
            root,
            &at,
            fs,
            source,
        ));
        t.push('\n');
        std::fs::write(&self.mountinfo, t).unwrap();
    }

    /// Volume A (or B) staged at `stage` with ext4: its device mounted there.
    fn staged(&self, vol: &str, stage: &str) {
        let (dev, name) = if vol == A {
            ("259:1", "nvme0n1")
        } else {
            ("259:2", "nvme1n1")
        };
        self.mounted(dev, "/", stage, "ext4", &self.p(&format!("dev/{name}")));
    }

    /// A bind of the file system on `dev` at `target`.
    fn bound(&self, dev: &str, target: &str) {
        self.mounted(dev, "/", target, "ext4", "/dev/whatever");
    }

    async fn unpublish(&self, vol: &str, target: &str) -> Result<(), Status> {
        self.svc
            .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
                volume_id: vol.into(),
                target_path: target.into(),
            }))
            .await
            .map(drop)
    }

    async fn unstage(&self, vol: &str, staging: &str) -> Result<(), Status> {
        self.svc
            .node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: staging.into(),
            }))
            .await
            .map(drop)
    }

    async fn publish(
        &self,
        vol: &str,
        staging: &str,
        target: &str,
        block: bool,
        readonly: bool,
    ) -> Result<(), Status> {
        self.svc
            .node_publish_volume(Request::new(NodePublishVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: staging.into(),
                target_path: target.into(),
                volume_capability: Some(capability(block)),
                readonly,
                ..Default::default()
            }))
            .await
            .map(drop)
    }

    async fn stage(&self, vol: &str, staging: &str, ctx: &[(&str, &str)]) -> Result<(), Status> {
        self.stage_as(vol, staging, ctx, capability(false)).await
    }

    /// Stages volume A at `stage-a` as a publish context names it (its target at 127.0.0.1:4420), with `cap`.
    async fn stage_a(&self, cap: VolumeCapability) -> Result<(), Status> {
        let nqn = proto::names::volume_nqn(A);
        let ctx = [
            ("nqn", nqn.as_str()),
            ("targetAddresses", "127.0.0.1:4420"),
            ("hostNqn", HOST),
        ];
        self.stage_as(A, &self.p("stage-a"), &ctx, cap).await
    }

    async fn stage_as(
        &self,
        vol: &str,
        staging: &str,
        ctx: &[(&str, &str)],
        cap: VolumeCapability,
    ) -> Result<(), Status> {
        self.svc
            .node_stage_volume(Request::new(NodeStageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: staging.into(),
                volume_capability: Some(cap),
                publish_context: ctx
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }))
            .await
            .map(drop)
    }
}

fn capability(block: bool) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            })
        }),
    }
}

fn code(r: Result<(), Status>) -> Code {
    r.err().map_or(Code::Ok, |s| s.code())
}

/// A block device node for `major:minor` at `path`, as a raw block publish shows at its target.
fn block_node(path: &Path, major: u64, minor: u64) {
    use nix::sys::stat::{Mode as Perm, SFlag, makedev, mknod};
    mknod(path, SFlag::S_IFBLK, Perm::S_IRUSR, makedev(major, minor)).unwrap();
}

#[tokio::test]
async fn paths_must_be_absolute_without_parent_components() {
    let f = Fake::new();
    f.staged(A, "stage-a");
    let ok = f.p("stage-a");
    let up = format!("{}/../stage-a", f.p("pod"));
    for bad in [
        "",
        "relative/dir",
        "-o",
        "../stage-a",
        up.as_str(),
        "/a/\0b",
    ] {
        assert_eq!(
            code(f.unpublish(A, bad).await),
            Code::InvalidArgument,
            "unpublish {bad:?}"
        );
        assert_eq!(
            code(f.unstage(A, bad).await),
            Code::InvalidArgument,
            "unstage {bad:?}"
        );
        assert_eq!(
            code(f.publish(A, bad, &f.p("pod/t"), false, false).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(f.publish(A, &ok, bad, false, false).await),
            Code::InvalidArgument,
            "publish {bad:?}"
        );
        let ctx = [
            ("nqn", proto::names::volume_nqn(B)),
            ("targetAddresses", "127.0.0.9:4420".into()),
            ("hostNqn", HOST.into()),
        ];
        let ctx: Vec<(&str, &str)> = ctx.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            code(f.stage(B, bad, &ctx).await),
            Code::InvalidArgument,
            "stage {bad:?}"
        );
        let stats = f
            .svc
            .node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
                volume_id: A.into(),
                volume_path: bad.into(),
                ..Default::default()
            }));
        assert_eq!(
            stats.await.err().map(|s| s.code()),
            Some(Code::InvalidArgument)
        );
        let expand = f
            .svc
            .node_expand_volume(Request::new(NodeExpandVolumeRequest {
                volume_id: A.into(),
                volume_path: bad.into(),
                ..Default::default()
            }));
        assert_eq!(
            expand.await.err().map(|s| s.code()),
            Some(Code::InvalidArgument)
        );
    }
    assert_eq!(f.calls(), Vec::<String>::new());
    assert!(!f.disconnected());
    assert_eq!(std::fs::read_to_string(f.path("fabrics")).unwrap(), "");
}

#[tokio::test]
async fn unpublish_removes_only_what_the_plugin_made() {
    let f = Fake::new();
    // What the plugin never made stays, whatever the volume.
    std::fs::write(f.path("hostname"), "app-1\n").unwrap();
    std::fs::create_dir_all(f.path("full")).unwrap();
    std::fs::write(f.path("full/data"), "x").unwrap();
    std::os::unix::fs::symlink(f.path("hostname"), f.path("link")).unwrap();
    std::os::unix::fs::symlink(f.path("nowhere"), f.path("dangling")).unwrap();
    for t in ["hostname", "full", "link", "dangling"] {
        assert_eq!(
            code(f.unpublish(A, &f.p(t)).await),
            Code::FailedPrecondition,
            "{t}"
        );
        assert!(std::fs::symlink_metadata(f.path(t)).is_ok(), "{t} removed");
    }
    assert_eq!(
        std::fs::read_to_string(f.path("hostname")).unwrap(),
        "app-1\n"
    );
    assert!(f.path("full/data").exists());
    // What it made (an empty directory, an empty file), mounted no more: removed. Nothing there: done.
    std::fs::create_dir_all(f.path("pod/mount")).unwrap();
    std::fs::write(f.path("pod/dev"), "").unwrap();
    for t in ["pod/mount", "pod/dev", "pod/never"] {
        assert_eq!(code(f.unpublish(A, &f.p(t)).await), Code::Ok, "{t}");
        assert!(!f.path(t).exists(), "{t} left");
    }
    assert_eq!(f.calls(), Vec::<String>::new());
}

#[tokio::test]
async fn unpublish_unmounts_only_this_volume() {
    let f = Fake::new();
    f.staged(A, "stage-a");
    f.staged(B, "stage-b");
    f.bound("259:2", "pod-b/mount");
    f.bound("259:1", "pod-a/mount");
    let before = f.table();
    // Another pod's mount of volume B, or B's staging mount, named with volume A: left as they are.
    for t in ["pod-b/mount", "stage-b"] {
        let r = f.unpublish(A, &f.p(t)).await;
        assert_eq!(code(r), Code::FailedPrecondition, "{t}");
        assert!(f.path(t).is_dir());
    }
    assert_eq!(f.calls(), Vec::<String>::new());
    assert_eq!(f.table(), before);
    // Volume A's publish: unmounted (the path after `--`) and its directory removed; again: nothing to do.
    f.unpublish(A, &f.p("pod-a/mount")).await.unwrap();
    assert_eq!(f.calls(), vec![format!("umount -- {}", f.p("pod-a/mount"))]);
    assert!(!f.path("pod-a/mount").exists());
    f.unpublish(A, &f.p("pod-a/mount")).await.unwrap();
    assert_eq!(f.calls(), Vec::<String>::new());
    assert!(f.table().contains(&f.p("stage-a")) && f.table().contains(&f.p("pod-b/mount")));
}

#[tokio::test]
async fn unstage_unmounts_only_this_volume_and_keeps_its_paths_for_a_wrong_staging_path() {
    let f = Fake::new();
    f.staged(A, "stage-a");
    f.staged(B, "stage-b");
    f.bound("259:1", "pod-a/mount");
    let before = f.table();
    // B's staging path, named with volume A: B stays mounted, A's paths stay.
    assert_eq!(
        code(f.unstage(A, &f.p("stage-b")).await),
        Code::FailedPrecondition
    );
    // A path where nothing of A is, while A is mounted elsewhere: its paths stay.
    assert_eq!(
        code(f.unstage(A, &f.p("nowhere")).await),
        Code::FailedPrecondition
    );
    assert_eq!(f.calls(), Vec::<String>::new());
    assert_eq!(f.table(), before);
    assert!(!f.disconnected());
    // Once unpublished: unmounted, then disconnected; again: done.
    f.unpublish(A, &f.p("pod-a/mount")).await.unwrap();
    f.calls();
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    assert_eq!(f.calls(), vec![format!("umount -- {}", f.p("stage-a"))]);
    assert!(f.disconnected());
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    assert_eq!(f.calls(), Vec::<String>::new());
    assert!(f.table().contains(&f.p("stage-b")));
}

/// A read-only publish whose remount fails leaves nothing mounted, so its retry publishes afresh. Before, the bind
/// stayed writable and every retry was ALREADY_EXISTS ("published read-write"): the pod never started.
#[tokio::test]
async fn a_read_only_publish_whose_remount_fails_leaves_no_writable_mount() {
    let f = Fake::new();
    f.staged(A, "stage-a");
    f.remount_fails
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (stage, target) = (f.p("stage-a"), f.p("pod-1/mount"));
    assert_eq!(
        code(f.publish(A, &stage, &target, false, true).await),
        Code::Internal
    );
    assert!(!f.table().contains(&target), "left mounted read-write");
    f.remount_fails
        .store(false, std::sync::atomic::Ordering::SeqCst);
    f.calls();
    f.publish(A, &stage, &target, false, true).await.unwrap();
    assert!(f.table().contains(&target));
    assert!(
        f.calls().iter().any(|c| c.contains("remount,bind,ro")),
        "published afresh, read-only"
    );
}

/// Volume statistics at a path where another volume is mounted are NOT_FOUND, not that volume's usage under this
/// one's name.
#[tokio::test]
async fn stats_at_another_volumes_mount_are_not_found() {
    let f = Fake::new();
    f.staged(B, "stage-b");
    let stats = |path: String| {
        f.svc
            .node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
                volume_id: A.into(),
                volume_path: path,
                ..Default::default()
            }))
    };
    assert_eq!(
        stats(f.p("stage-b")).await.err().map(|s| s.code()),
        Some(Code::NotFound)
    );
}

/// An unstage or unpublish naming a path where a file system on no block device is mounted (tmpfs here) leaves it
/// and the volume's paths as they are: before, any mount whose device number the kernel lists no block device for
/// counted as a vanished volume's, so it was unmounted and the volume, still used by a pod, disconnected.
#[tokio::test]
async fn a_tmpfs_at_a_wrong_path_is_no_vanished_volume() {
    let f = Fake::new();
    f.staged(A, "stage-a");
    f.bound("259:1", "pod-1/mount");
    f.mounted("0:50", "/", "other", "tmpfs", "tmpfs");
    let before = f.table();
    assert_eq!(
        code(f.unstage(A, &f.p("other")).await),
        Code::FailedPrecondition
    );
    assert!(!f.disconnected(), "a volume in use lost its paths");
    f.mounted("0:51", "/", "pod-2/mount", "tmpfs", "tmpfs");
    assert_eq!(
        code(f.unpublish(A, &f.p("pod-2/mount")).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        f.calls(),
        Vec::<String>::new(),
        "a foreign mount was taken off"
    );
    assert!(!f.disconnected(), "a volume in use lost its paths");
    assert!(f.table().starts_with(&before));
}

/// A volume unstaged while its target switches over (its only path reconnecting): the unmount waits for the
/// replacement path, so what the page cache holds is written. With no path for a call's whole wait, the call
/// answers UNAVAILABLE and changes nothing, and the next finds the path back; only once calls have found none for
/// the give-up time do the paths go first (the unmount would wait for ever).
#[tokio::test]
async fn an_unstage_waits_for_a_live_path_before_it_gives_the_page_cache_up() {
    let f = Fake::new().with_live_wait(Duration::from_secs(10), Duration::from_secs(300));
    f.staged(A, "stage-a");
    f.path_state("connecting");
    let sw = f.path("sys/class/nvme-subsystem/nvme-subsys0/nvme0/state");
    let switch_over = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(sw, "live\n").unwrap();
    });
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    switch_over.join().unwrap();
    assert_eq!(f.calls(), vec![format!("umount -- {}", f.p("stage-a"))]);
    assert!(f.disconnected());

    // The switch-over outlasts a call: UNAVAILABLE, nothing unmounted or disconnected; the next call, the path
    // back, unmounts first.
    let f = Fake::new().with_live_wait(Duration::from_millis(200), Duration::from_secs(300));
    f.staged(A, "stage-a");
    f.path_state("connecting");
    assert_eq!(code(f.unstage(A, &f.p("stage-a")).await), Code::Unavailable);
    assert_eq!(f.calls(), Vec::<String>::new());
    assert!(!f.disconnected());
    f.path_state("live");
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    assert_eq!(f.calls(), vec![format!("umount -- {}", f.p("stage-a"))]);
    assert!(f.disconnected());

    // No path for the give-up time: the paths go first.
    let f = Fake::new().with_live_wait(Duration::from_millis(100), Duration::from_millis(50));
    f.staged(A, "stage-a");
    f.path_state("connecting");
    assert_eq!(code(f.unstage(A, &f.p("stage-a")).await), Code::Unavailable);
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    assert_eq!(
        f.calls(),
        vec![format!(
            "umount -- {} (after the disconnect)",
            f.p("stage-a")
        )]
    );
}

/// An unmount that fails while the volume has a live path (a busy mount, or a writeback longer than the unmount's
/// timeout) leaves the volume connected, so what it holds can still be written: UNAVAILABLE, and the CO asks
/// again. Before, the paths went and the data with them.
#[tokio::test]
async fn an_unmount_that_fails_with_a_live_path_keeps_the_volume_connected() {
    let f = Fake::new();
    f.staged(A, "stage-a");
    f.umount_fails
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(code(f.unstage(A, &f.p("stage-a")).await), Code::Unavailable);
    assert!(!f.disconnected());
    assert!(f.table().contains("stage-a"));
    f.umount_fails
        .store(false, std::sync::atomic::Ordering::SeqCst);
    f.calls();
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    assert_eq!(f.calls(), vec![format!("umount -- {}", f.p("stage-a"))]);
    assert!(f.disconnected());
}

/// A file system unmounted, yet still holding its device: an unmount killed at its time limit leaves the mount
/// table at once and writes what the page cache held afterwards (as does one in another mount namespace). The
/// volume stays connected while the device is held (UNAVAILABLE, the unstage's next call finding nothing mounted
/// included), and is disconnected once it is let go. Before, the call after the unmount disconnected, failing those
/// writes. Needs root and losetup (a loop device stands for the volume's, held as a file system holds it).
#[tokio::test]
async fn an_unstage_keeps_the_volume_connected_while_its_device_is_still_held() {
    use std::os::unix::fs::OpenOptionsExt;
    let test = "an_unstage_keeps_the_volume_connected_while_its_device_is_still_held";
    if !e2e::privileged::allowed_with(test, &["root", "losetup"]) {
        return;
    }
    let f = Fake::new();
    let img = f.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let lo = e2e::loopdev::Loop::attach(&img);
    std::fs::remove_file(f.path("dev/nvme0n1")).unwrap();
    std::os::unix::fs::symlink(&lo.0, f.path("dev/nvme0n1")).unwrap();
    f.staged(A, "stage-a");
    let held_by_the_file_system = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(&lo.0)
        .unwrap();
    let r = f.unstage(A, &f.p("stage-a")).await;
    assert_eq!(code(r), Code::Unavailable);
    assert!(!f.table().contains("stage-a"));
    assert!(
        !f.disconnected(),
        "disconnected under a file system still writing"
    );
    let r = f.unstage(A, &f.p("stage-a")).await;
    assert_eq!(code(r), Code::Unavailable, "the call after the unmount");
    assert!(
        !f.disconnected(),
        "disconnected under a file system still writing"
    );
    drop(held_by_the_file_system);
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    assert!(f.disconnected());

    // Held, and no live path for the give-up time: what holds it can write nothing (its I/O waits for a path), so
    // the paths go as they do for an unmount without one. Before, every call answered UNAVAILABLE for ever.
    let f = Fake::new().with_live_wait(Duration::from_millis(100), Duration::from_millis(50));
    std::fs::remove_file(f.path("dev/nvme0n1")).unwrap();
    std::os::unix::fs::symlink(&lo.0, f.path("dev/nvme0n1")).unwrap();
    let _held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(&lo.0)
        .unwrap();
    f.path_state("connecting");
    assert_eq!(code(f.unstage(A, &f.p("stage-a")).await), Code::Unavailable);
    assert!(!f.disconnected());
    std::thread::sleep(Duration::from_millis(60));
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    assert!(f.disconnected());
}

/// An unmount cut short while the volume's only path was lost (its target switching over during a long writeback)
/// waits for a live path as a call that finds none before the unmount does: UNAVAILABLE, the volume left connected
/// and mounted, until calls have found none for the give-up time. Before, the paths went at once, and with them
/// what the page cache held.
#[tokio::test]
async fn an_unmount_that_fails_as_the_path_is_lost_waits_for_a_live_path() {
    use std::sync::atomic::Ordering::SeqCst;
    let f = Fake::new().with_live_wait(Duration::from_millis(100), Duration::from_secs(300));
    f.staged(A, "stage-a");
    f.umount_fails.store(true, SeqCst);
    f.umount_loses_path.store(true, SeqCst);
    assert_eq!(code(f.unstage(A, &f.p("stage-a")).await), Code::Unavailable);
    assert!(!f.disconnected(), "the paths went with the page cache");
    assert!(f.table().contains("stage-a"));
    // The replacement path is live: the next call unmounts, then disconnects.
    f.umount_fails.store(false, SeqCst);
    std::fs::write(
        f.path("sys/class/nvme-subsystem/nvme-subsys0/nvme0/state"),
        "live\n",
    )
    .unwrap();
    f.calls();
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    assert_eq!(f.calls(), vec![format!("umount -- {}", f.p("stage-a"))]);
    assert!(f.disconnected());

    // No path for the give-up time: the paths go and the mount is detached lazily.
    let f = Fake::new().with_live_wait(Duration::from_millis(100), Duration::from_millis(50));
    f.staged(A, "stage-a");
    f.umount_fails.store(true, SeqCst);
    f.umount_loses_path.store(true, SeqCst);
    assert_eq!(code(f.unstage(A, &f.p("stage-a")).await), Code::Unavailable);
    std::thread::sleep(Duration::from_millis(60));
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    assert!(f.disconnected());
    assert!(!f.table().contains("stage-a"));
}

/// An unstage while a publish of the volume is still bound (the CO's order broken, or a publish rebuilt after a
/// kubelet restart): the staging mount comes off, but the file system lives on in the bind, so the volume stays
/// connected (FAILED_PRECONDITION naming the mount) until the bind is gone. Before, the paths went, failing the
/// pod's I/O and losing what its page cache held.
#[tokio::test]
async fn an_unstage_under_a_publish_still_bound_keeps_the_volume_connected() {
    let f = Fake::new();
    f.staged(A, "stage-a");
    f.bound("259:1", "pod-a/mount");
    let e = f.unstage(A, &f.p("stage-a")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("pod-a/mount"), "{e:?}");
    assert!(
        !f.disconnected(),
        "the paths went under a mounted file system"
    );
    f.unpublish(A, &f.p("pod-a/mount")).await.unwrap();
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    assert!(f.disconnected());
}

/// The volume's paths were removed by hand and its device is gone, but its file system is still mounted: the
/// mounts of that dead device are taken off, so the pods using them can end. A live device's are not.
#[tokio::test]
async fn mounts_of_a_device_that_is_gone_are_taken_off() {
    let f = Fake::new();
    std::fs::remove_dir_all(f.path("sys/block/nvme0n1")).unwrap();
    f.mounted("259:9", "/", "stage-a", "ext4", "/dev/nvme0n1");
    f.bound("259:9", "pod-a/mount");
    f.bound("259:2", "pod-b/mount");
    f.unpublish(A, &f.p("pod-a/mount")).await.unwrap();
    assert!(!f.path("pod-a/mount").exists());
    assert_eq!(
        code(f.unpublish(A, &f.p("pod-b/mount")).await),
        Code::FailedPrecondition
    );
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    assert!(!f.table().contains(&f.p("stage-a")));
    assert!(f.table().contains(&f.p("pod-b/mount")));
}

/// The volume's device was recreated (its paths removed by hand, the node agent connecting it again: a new device
/// number) while its file system stayed mounted on the old one: the mounts of the device that is gone are taken
/// off, though the volume has a device now. Before, only a volume without any device had them taken off, and
/// unpublish and unstage failed on every retry (the pod stuck Terminating).
#[tokio::test]
async fn mounts_of_a_device_that_is_gone_are_taken_off_though_the_volume_has_a_new_one() {
    let f = Fake::new();
    // A's device is 259:1 now; its file system is still mounted from 259:9, which is gone.
    f.mounted("259:9", "/", "stage-a", "ext4", "/dev/nvme0n1");
    f.bound("259:9", "pod-a/mount");
    f.unpublish(A, &f.p("pod-a/mount")).await.unwrap();
    assert!(!f.path("pod-a/mount").exists());
    f.unstage(A, &f.p("stage-a")).await.unwrap();
    assert!(!f.table().contains(&f.p("stage-a")));
}

/// A volume staged read-only by its mount flags (a PersistentVolume's `mountOptions: [ro]`, mode
/// SINGLE_NODE_WRITER): the same NodeStage again, and the same NodePublish again (its bind of the read-only staging
/// mount read-only too), succeed. Before, both answered ALREADY_EXISTS, taking the mount's `ro` for another way of
/// staging or publishing, and a kubelet's retry or restart left the pod stuck.
#[tokio::test]
async fn a_volume_staged_read_only_by_its_mount_flags_is_staged_and_published_again() {
    let f = Fake::new();
    f.staged(A, "stage-a");
    f.bound("259:1", "pod-a/mount");
    let ro = f.table().replace(" rw,relatime - ", " ro,relatime - ");
    std::fs::write(&f.mountinfo, ro).unwrap();
    let nqn = proto::names::volume_nqn(A);
    let mut cap = capability(false);
    let stage = |cap: VolumeCapability| {
        f.svc
            .node_stage_volume(Request::new(NodeStageVolumeRequest {
                volume_id: A.into(),
                staging_target_path: f.p("stage-a"),
                volume_capability: Some(cap),
                publish_context: [
                    ("nqn", nqn.as_str()),
                    ("targetAddresses", "127.0.0.9:4420"),
                    ("hostNqn", HOST),
                ]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
                ..Default::default()
            }))
    };
    if let Some(AccessType::Mount(m)) = &mut cap.access_type {
        m.mount_flags = vec!["noatime,ro".into()];
    }
    stage(cap.clone()).await.expect("staged again");
    f.publish(A, &f.p("stage-a"), &f.p("pod-a/mount"), false, false)
        .await
        .expect("published again");
    // Asked read-write now (no `ro` among the flags): another way of staging.
    if let Some(AccessType::Mount(m)) = &mut cap.access_type {
        m.mount_flags = vec!["ro".into(), "rw".into()];
    }
    assert_eq!(
        stage(cap).await.map(drop).unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(f.calls(), Vec::<String>::new());
}

#[tokio::test]
async fn publish_binds_only_this_volumes_staging_mount() {
    let f = Fake::new();
    f.staged(B, "stage-b");
    f.bound("259:2", "pod-x/mount");
    // B's staging path named with volume A: A is not staged there.
    let r = f
        .publish(A, &f.p("stage-b"), &f.p("pod-1/mount"), false, false)
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    f.staged(A, "stage-a");
    // A target that holds volume B: published, incompatibly.
    let r = f
        .publish(A, &f.p("stage-a"), &f.p("pod-x/mount"), false, false)
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    assert_eq!(f.calls(), Vec::<String>::new());
    assert!(!f.path("pod-1/mount").exists());
    // Volume A: bound from its staging path; again: done; read-only now: incompatible.
    f.publish(A, &f.p("stage-a"), &f.p("pod-1/mount"), false, false)
        .await
        .unwrap();
    assert_eq!(
        f.calls(),
        vec![format!(
            "mount -o bind -- {} {}",
            f.p("stage-a"),
            f.p("pod-1/mount")
        )]
    );
    f.publish(A, &f.p("stage-a"), &f.p("pod-1/mount"), false, false)
        .await
        .unwrap();
    let r = f
        .publish(A, &f.p("stage-a"), &f.p("pod-1/mount"), false, true)
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    assert_eq!(f.calls(), Vec::<String>::new());
}

#[tokio::test]
async fn a_single_writer_volume_is_published_at_one_target_path_at_a_time() {
    let f = Fake::new();
    f.staged(A, "stage-a");
    let publish = |target: &str, mode: Mode| {
        f.svc
            .node_publish_volume(Request::new(NodePublishVolumeRequest {
                volume_id: A.into(),
                staging_target_path: f.p("stage-a"),
                target_path: f.p(target),
                volume_capability: Some(VolumeCapability {
                    access_mode: Some(AccessMode { mode: mode as i32 }),
                    ..capability(false)
                }),
                ..Default::default()
            }))
    };
    let single = Mode::SingleNodeSingleWriter;
    // The staging mount seen a second time through a bind of the kubelet's directory is no other publish.
    f.bound("259:1", "kubelet-view/stage-a");
    publish("pod-1/mount", single).await.unwrap();
    // The same publish again is done.
    publish("pod-1/mount", single).await.unwrap();
    // A second target path while the first holds it: refused, nothing made there.
    let r = publish("pod-2/mount", single).await.map(drop);
    assert_eq!(code(r), Code::FailedPrecondition);
    assert!(!f.path("pod-2/mount").exists());
    // Once the first is unpublished, the second is published.
    f.unpublish(A, &f.p("pod-1/mount")).await.unwrap();
    publish("pod-2/mount", single).await.unwrap();
    // The other single-node modes publish at many paths.
    publish("pod-3/mount", Mode::SingleNodeMultiWriter)
        .await
        .unwrap();
    publish("pod-4/mount", Mode::SingleNodeWriter)
        .await
        .unwrap();
}

/// The plugin restarted (a DaemonSet upgrade) while a single-writer volume is published: a second target path is
/// still refused, from the file it keeps its publishes in; once the first is unpublished, the second is published.
/// Before, the plugin forgot the publish at its restart and took the second.
#[tokio::test]
async fn a_restarted_plugin_still_publishes_a_single_writer_volume_at_one_target_path() {
    async fn publish(f: &Fake, svc: &NodeService, target: &str) -> Result<(), Status> {
        let req = NodePublishVolumeRequest {
            volume_id: A.into(),
            staging_target_path: f.p("stage-a"),
            target_path: f.p(target),
            volume_capability: Some(VolumeCapability {
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeSingleWriter as i32,
                }),
                ..capability(false)
            }),
            ..Default::default()
        };
        svc.node_publish_volume(Request::new(req)).await.map(drop)
    }
    let mut f = Fake::new();
    let file = f.path("plugin/keelson-single-writers.json");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    f.svc = f.svc.with_sole_writers_file(file);
    f.staged(A, "stage-a");
    publish(&f, &f.svc, "pod-1/mount").await.unwrap();
    let restarted = f.svc.restarted();
    assert_eq!(
        code(publish(&f, &restarted, "pod-2/mount").await),
        Code::FailedPrecondition
    );
    assert!(!f.path("pod-2/mount").exists());
    restarted
        .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
            volume_id: A.into(),
            target_path: f.p("pod-1/mount"),
        }))
        .await
        .unwrap();
    publish(&f, &restarted.restarted(), "pod-2/mount")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_raw_block_publish_is_known_by_its_device_node() {
    let f = Fake::new();
    std::fs::create_dir_all(f.path("pods")).unwrap();
    // Volume B's device node bound at one pod's target, volume A's at another's (mknod needs root).
    if !e2e::privileged::allowed("a_raw_block_publish_is_known_by_its_device_node") {
        return;
    }
    block_node(&f.path("pods/b"), 259, 2);
    block_node(&f.path("pods/a"), 259, 1);
    f.mounted("0:6", "/nvme1n1", "pods/b", "devtmpfs", "udev");
    f.mounted("0:6", "/nvme0n1", "pods/a", "devtmpfs", "udev");
    std::fs::create_dir_all(f.path("stage-a")).unwrap();
    let r = f
        .publish(A, &f.p("stage-a"), &f.p("pods/b"), true, false)
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    f.publish(A, &f.p("stage-a"), &f.p("pods/a"), true, false)
        .await
        .unwrap();
    assert_eq!(
        code(f.unpublish(A, &f.p("pods/b")).await),
        Code::FailedPrecondition
    );
    // Still published at pods/a: its paths stay.
    assert_eq!(
        code(f.unstage(A, &f.p("stage-a")).await),
        Code::FailedPrecondition
    );
    assert!(!f.disconnected());
    assert_eq!(f.calls(), Vec::<String>::new());
}

#[tokio::test]
async fn a_publish_context_cannot_add_connect_options() {
    let f = Fake::new();
    let nqn = proto::names::volume_nqn(B);
    let many = vec!["127.0.0.9:4420"; MAX_ADDRESSES + 1].join(",");
    let st = f.p("stage-b");
    for (addresses, host) in [
        (
            "127.0.0.9:4420",
            "nqn.2026-11.io.keelson:host-x,nr_io_queues=1",
        ),
        (
            "127.0.0.9:4420",
            "nqn.2026-11.io.keelson:host-x nr_io_queues=1",
        ),
        ("127.0.0.9:4420", "nqn.2026-11.io.keelson:host-x\nnqn=y"),
        ("127.0.0.9:4420", "nqn.2026-11.io.keelson:host=x"),
        ("127.0.0.9:4420", "not-an-nqn"),
        ("127.0.0.9:4420,trsvcid=1:4420", HOST),
        ("127.0.0.9 hostnqn:4420", HOST),
        ("127.0.0.9\t:4420", HOST),
        ("127.0.0.9:4420\u{1}", HOST),
        (many.as_str(), HOST),
        (",", HOST),
    ] {
        let ctx = [
            ("nqn", nqn.as_str()),
            ("targetAddresses", addresses),
            ("hostNqn", host),
        ];
        let r = f.stage(B, &st, &ctx).await;
        assert_eq!(code(r), Code::InvalidArgument, "{addresses:?} {host:?}");
    }
    assert_eq!(std::fs::read_to_string(f.path("fabrics")).unwrap(), "");
    assert!(!f.path("stage-b").exists());
    // A sound context reaches the kernel (the fake one answers nothing, so no path connects).
    let ctx = [
        ("nqn", nqn.as_str()),
        ("targetAddresses", "127.0.0.9:4420"),
        ("hostNqn", HOST),
    ];
    assert_eq!(code(f.stage(B, &st, &ctx).await), Code::Unavailable);
    let line = std::fs::read_to_string(f.path("fabrics")).unwrap();
    assert!(
        line.starts_with(&format!(
            "nqn={nqn},transport=tcp,traddr=127.0.0.9,trsvcid=4420,hostnqn={HOST},"
        )),
        "{line}"
    );
}

#[tokio::test]
async fn a_kernel_without_native_multipath_stages_nothing() {
    let f = Fake::new();
    let p = f.path("sys/module/nvme_core/parameters");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("multipath"), "N\n").unwrap();
    let nqn = proto::names::volume_nqn(B);
    let ctx = [
        ("nqn", nqn.as_str()),
        ("targetAddresses", "127.0.0.9:4420"),
        ("hostNqn", HOST),
    ];
    let e = f.stage(B, &f.p("stage-b"), &ctx).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("multipath"), "{e:?}");
    assert_eq!(
        std::fs::read_to_string(f.path("fabrics")).unwrap(),
        "",
        "nothing connected"
    );
}

#[test]
fn a_sound_publish_context_is_taken_as_it_is() {
    let uuid = Uuid::parse_str(B).unwrap();
    let nqn = proto::names::volume_nqn(B);
    let ctx: HashMap<String, String> = [
        ("nqn", nqn.as_str()),
        ("targetAddresses", " 127.0.0.9:4420, [fd00::1]:4420,,"),
        ("hostNqn", HOST),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (n, addresses, host) = context(&ctx, uuid).unwrap();
    assert_eq!((n.as_str(), host.as_str()), (nqn.as_str(), HOST));
    assert_eq!(addresses, ["127.0.0.9:4420", "[fd00::1]:4420"]);
    let mut other = ctx.clone();
    other.insert("nqn".into(), proto::names::volume_nqn(A));
    assert_eq!(
        context(&other, uuid).unwrap_err().code(),
        Code::InvalidArgument
    );
    other.remove("nqn");
    assert_eq!(
        context(&other, uuid).unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[test]
fn expanding_past_what_the_volume_holds_is_out_of_range_and_without_a_live_path_unavailable() {
    let f = Fake::new();
    let uuid = Uuid::parse_str(A).unwrap();
    let dev = f.path("raw-a");
    std::fs::write(&dev, "").unwrap();
    let wait = Duration::from_millis(100);
    let (k, mt) = (&f.svc.kernel, &f.svc.mounts);
    // Its device holds 2048 sectors: 1 MiB is what it has, 2 MiB more than it holds after a rescan.
    assert_eq!(
        expand(k, mt, uuid, &dev, None, 1 << 20, wait).unwrap(),
        1 << 20
    );
    assert!(f.path("sys/class/nvme/nvme0/rescan_controller").exists());
    let err = expand(k, mt, uuid, &dev, None, 2 << 20, wait).unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // With its only path down the kernel cannot know the size: try again later.
    std::fs::write(
        f.path("sys/class/nvme-subsystem/nvme-subsys0/nvme0/state"),
        "connecting\n",
    )
    .unwrap();
    let err = expand(k, mt, uuid, &dev, None, 2 << 20, wait).unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

#[test]
fn a_volume_is_staged_from_where_the_agent_says_its_target_is_now() {
    let v = |host: &str, addresses: &[&str]| proto::cluster::Volume {
        host_nqn: host.into(),
        host_nqns: vec![host.into()],
        target_addresses: addresses.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    // Moved by a switch-over since the publish: the new target.
    assert_eq!(
        addresses_now(&v(HOST, &["10.0.0.2:4420"]), HOST),
        Some(vec!["10.0.0.2:4420".to_string()])
    );
    // Published to several hosts (a multi-node raw block volume): this one among them.
    let mut multi = v("nqn.2026-11.io.keelson:host-app-2", &["10.0.0.2:4420"]);
    multi.host_nqns.push(HOST.into());
    assert!(addresses_now(&multi, HOST).is_some());
    // Not published to this host, not published at all, or addresses unfit for the connect options: the context's.
    assert_eq!(
        addresses_now(
            &v("nqn.2026-11.io.keelson:host-app-2", &["10.0.0.2:4420"]),
            HOST
        ),
        None
    );
    assert_eq!(addresses_now(&v(HOST, &[]), HOST), None);
    assert_eq!(
        addresses_now(&v(HOST, &["10.0.0.2:4420,hostnqn=x"]), HOST),
        None
    );
    assert_eq!(
        addresses_now(&proto::cluster::Volume::default(), HOST),
        None
    );
}

#[test]
fn xfs_is_mounted_without_its_uuid_check_so_a_clone_mounts_beside_its_source() {
    let flags = vec!["noatime".to_string()];
    assert_eq!(
        mount_options("xfs", flags.clone(), false),
        ["noatime", "nouuid"]
    );
    assert_eq!(mount_options("ext4", flags, true), ["noatime", "ro"]);
    assert_eq!(
        mount_options("xfs", vec!["nouuid".into()], false),
        ["nouuid"]
    );
}

/// A raw block volume's bind whose device node was removed (mountinfo names its root `/nvme0n1//deleted`), the volume
/// having a device again since (its paths connected again): unpublished, detached. Before, it was not the device's
/// (another node now has the name, or the number) nor gone (the volume has a device), and every unpublish was
/// FAILED_PRECONDITION: the pod stayed Terminating.
#[tokio::test]
async fn a_raw_block_bind_of_a_removed_device_node_is_unpublished() {
    let f = Fake::new();
    std::fs::create_dir_all(f.path("pods")).unwrap();
    std::fs::write(f.path("pods/a"), "").unwrap();
    f.mounted("0:6", "/nvme0n1//deleted", "pods/a", "devtmpfs", "udev");
    f.unpublish(A, &f.p("pods/a")).await.unwrap();
    assert!(!f.path("pods/a").exists());
    assert_eq!(f.calls(), vec![format!("umount -l -- {}", f.p("pods/a"))]);
}

/// The staging mount's device is gone (its number no block device's: the volume's device made again since): a stage
/// detaches it and stages afresh. Before, every stage was ALREADY_EXISTS ("another device mounted").
#[tokio::test]
async fn a_stage_over_a_staging_mount_whose_device_is_gone_stages_afresh() {
    let f = Fake::new();
    let mut head = vec![0u8; 4096];
    head[1080] = 0x53;
    head[1081] = 0xEF;
    std::fs::write(f.path("dev/nvme0n1"), &head).unwrap();
    f.mounted("259:9", "/", "stage-a", "ext4", &f.p("dev/nvme0n1"));
    f.stage_a(capability(false)).await.unwrap();
    let calls = f.calls();
    assert_eq!(
        calls[0],
        format!("umount -l -- {}", f.p("stage-a")),
        "{calls:?}"
    );
    assert!(
        calls[1].starts_with("mount -t ext4") && calls[1].ends_with(&f.p("stage-a")),
        "{calls:?}"
    );
    let last = f.table().lines().last().unwrap().to_string();
    assert!(last.contains(" 259:1 "), "{last}");
}

/// A stage naming no file system (a static PersistentVolume without fsType, a volume made outside a StorageClass)
/// mounts the one the volume holds. Before, ext4 was assumed, and a volume holding XFS was refused for ever.
#[tokio::test]
async fn a_stage_naming_no_file_system_mounts_the_one_the_volume_holds() {
    let f = Fake::new();
    let mut head = vec![0u8; 4096];
    head[..4].copy_from_slice(b"XFSB");
    std::fs::write(f.path("dev/nvme0n1"), &head).unwrap();
    let mut cap = capability(false);
    cap.access_type = Some(AccessType::Mount(MountVolume::default()));
    f.stage_a(cap.clone()).await.unwrap();
    let calls = f.calls();
    assert!(calls[0].starts_with("mount -t xfs"), "{calls:?}");
    // Again (a retry): already staged so, done.
    f.stage_a(cap).await.unwrap();
    // Asked for ext4 by name: refused, never reformatted.
    let e = f.stage_a(capability(false)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
}

/// A blank volume staged read-only is not formatted (that writes to a volume asked to be read-only, and would mount
/// an empty file system): FAILED_PRECONDITION, the volume left blank.
#[tokio::test]
async fn a_blank_volume_staged_read_only_is_not_formatted() {
    let f = Fake::new();
    std::fs::write(f.path("dev/nvme0n1"), vec![0u8; 1 << 20]).unwrap();
    let mut cap = capability(false);
    cap.access_mode = Some(AccessMode {
        mode: Mode::SingleNodeReaderOnly as i32,
    });
    let e = f.stage_a(cap).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("blank"), "{e:?}");
    let dev = std::fs::read(f.path("dev/nvme0n1")).unwrap();
    assert!(dev.iter().all(|b| *b == 0), "the volume was written");
    assert_eq!(f.calls(), Vec::<String>::new());
}

/// An unstage while a publish is still bound, and no live path for the give-up time: the volume stays connected
/// (FAILED_PRECONDITION naming the bind), so a path coming back can still take what the page cache holds. Before,
/// the paths went first, failing the pod's I/O under it. The staging mount seen through a bind of a directory above
/// it (the kubelet's directory shared) is no publish: with only such copies, the paths are given up as before.
#[tokio::test]
async fn an_unstage_giving_up_the_page_cache_keeps_the_paths_while_a_publish_is_bound() {
    let f = Fake::new().with_live_wait(Duration::from_millis(100), Duration::from_millis(50));
    f.staged(A, "k/vol-a/globalmount");
    f.bound("259:1", "pod-a/mount");
    f.path_state("connecting");
    let staging = f.p("k/vol-a/globalmount");
    assert_eq!(code(f.unstage(A, &staging).await), Code::Unavailable);
    std::thread::sleep(Duration::from_millis(60));
    let e = f.unstage(A, &staging).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("pod-a/mount"), "{e:?}");
    assert!(!f.disconnected(), "the paths went under a bound publish");

    let f = Fake::new().with_live_wait(Duration::from_millis(100), Duration::from_millis(50));
    f.staged(A, "k/vol-a/globalmount");
    f.bound("259:1", "host/k/vol-a/globalmount");
    f.path_state("connecting");
    let staging = f.p("k/vol-a/globalmount");
    let r = f.unstage(A, &staging).await;
    assert_eq!(code(r.clone()), Code::Unavailable, "{r:?}");
    std::thread::sleep(Duration::from_millis(60));
    f.unstage(A, &staging).await.unwrap();
    assert!(f.disconnected());
}
