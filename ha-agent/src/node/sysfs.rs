//! What the kernel's NVMe host says about Keelson's subsystems, read from sysfs: each subsystem
//! (`class/nvme-subsystem/nvme-subsysN`: `subsysnqn`, a link per controller), each controller (`state`, `address`,
//! `transport`, `cntlid`, `hostnqn`, `hostid`) and each of its paths (`nvmeXcYnZ/ana_state`, and the path's block
//! counters `inflight` and `stat`: I/O in flight and I/O completed). Plain file reads; the root is a parameter so
//! that tests read a tree laid out the same way.

use std::path::Path;

use proto::names::NQN_PREFIX;

/// One controller (one path to a subsystem), as the kernel reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Controller {
    /// `nvme3`.
    pub name: String,
    /// `live`, `connecting`, `resetting`, `deleting`, `deleting (no IO)`, `dead`, `new`.
    pub state: String,
    /// `traddr=10.0.0.1,trsvcid=4420,src_addr=...` as the kernel writes it.
    pub address: String,
    pub transport: String,
    pub cntlid: String,
    pub host_nqn: String,
    pub host_id: String,
    /// The ANA state of each of its namespace paths (`optimized`, `non-optimized`, `inaccessible`, ...; empty where
    /// the target reports none). A controller that just connected has no path until the kernel has scanned its
    /// namespaces.
    pub ana: Vec<String>,
    /// Its namespace paths' I/O, summed.
    pub io: IoCounts,
}

/// A path's block I/O counters, reads apart from writes (with discards and flushes): requests in flight now
/// (`inflight`) and requests completed since it appeared (`stat`: reads, field 1; writes, discards and flushes,
/// fields 5, 12 and 16). In flight with nothing completing means the target went silent, for one kind alone too
/// (a nexus cut off from its other replicas holds its writes, and may still complete reads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounts {
    pub reads: Flow,
    pub writes: Flow,
}

/// Requests of one kind: in flight now, completed so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub in_flight: u64,
    pub completed: u64,
}

impl IoCounts {
    fn read(path: &Path) -> IoCounts {
        let nums = |f: &str| -> Vec<u64> {
            read(&path.join(f))
                .split_whitespace()
                .map(|n| n.parse().unwrap_or(0))
                .collect()
        };
        let inflight = nums("inflight");
        let stat = nums("stat");
        let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
        IoCounts {
            reads: Flow {
                in_flight: at(&inflight, 0),
                completed: at(&stat, 0),
            },
            writes: Flow {
                in_flight: at(&inflight, 1),
                // A long discard (mkfs, fstrim) or flush completes in its own counter, not the writes'.
                completed: at(&stat, 4) + at(&stat, 11) + at(&stat, 15),
            },
        }
    }

    fn add(self, o: IoCounts) -> IoCounts {
        let sum = |a: Flow, b: Flow| Flow {
            in_flight: a.in_flight + b.in_flight,
            completed: a.completed + b.completed,
        };
        IoCounts {
            reads: sum(self.reads, o.reads),
            writes: sum(self.writes, o.writes),
        }
    }

    /// Both kinds, by [`IoCounts::reads`] then [`IoCounts::writes`].
    pub fn flows(&self) -> [Flow; 2] {
        [self.reads, self.writes]
    }
}

impl Controller {
    /// Whether I/O can go through it now: live, with a namespace path that is optimized or non-optimized (or
    /// reports no ANA state).
    pub fn usable(&self) -> bool {
        self.state == "live"
            && self
                .ana
                .iter()
                .any(|a| a.is_empty() || a == "optimized" || a == "non-optimized")
    }

    /// Whether it is broken: reconnecting (`connecting`, `resetting`) or `dead`, or live with namespace paths of
    /// which none can take I/O. A live controller without a path yet (just connected) is not broken, only not usable
    /// yet; nor is one being set up (`new`) or taken down on purpose (`deleting`: an unstage, or this agent
    /// removing a replaced path; the kernel deletes none by itself, as paths are connected with ctrl_loss_tmo=-1).
    pub fn broken(&self) -> bool {
        if self.being_deleted() {
            return false;
        }
        match self.state.as_str() {
            "new" => false,
            "live" => !self.ana.is_empty() && !self.usable(),
            _ => true,
        }
    }

    /// Whether it is being deleted (`deleting`, `deleting (no IO)`): on purpose, as the kernel deletes none by
    /// itself (see [`Self::broken`]).
    pub fn being_deleted(&self) -> bool {
        self.state.starts_with("deleting")
    }

    /// `ip:port` of its target.
    pub fn target(&self) -> String {
        proto::names::target_address(&self.address)
    }
}

/// One subsystem with Keelson's NQN prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subsystem {
    /// `nvme-subsys0`.
    pub name: String,
    pub nqn: String,
    pub controllers: Vec<Controller>,
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `nvme12` (a controller), not `nvme12n1` or `nvme12c3n1`.
fn is_controller(name: &str) -> bool {
    name.strip_prefix("nvme")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `nvme0c3n1` (a path through a controller).
fn is_path(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("nvme") else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match rest
        .split_once('c')
        .and_then(|(a, b)| Some((a, b.split_once('n')?)))
    {
        Some((a, (b, c))) => digits(a) && digits(b) && digits(c),
        None => false,
    }
}

fn sorted_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether the kernel's native NVMe multipath is on (`nvme_core.multipath`), if `nvme_core` is loaded. Keelson needs
/// it: a volume's paths are one block device (`nvmeXnY` over `nvmeXcYnZ`), whose I/O the kernel queues while no
/// path is live and moves to a replacement path; without it each path is a device of its own, and a target's death
/// fails the application's I/O.
pub fn native_multipath(sys: &Path) -> Option<bool> {
    match read(&sys.join("module/nvme_core/parameters/multipath")).as_str() {
        "" => None,
        v => Some(v == "Y" || v == "1"),
    }
}

/// What to tell someone whose kernel runs without native NVMe multipath.
pub const NO_MULTIPATH: &str = concat!(
    "the kernel's native NVMe multipath is off (nvme_core.multipath=N): Keelson needs it to keep a volume's I/O ",
    "through a target's failure; load nvme_core with multipath=Y (kernel command line nvme_core.multipath=Y)"
);

/// [`scan`], or the error that kept it from looking at all: the subsystems' directory there but not readable (out
/// of file descriptors, say), which is not "no subsystems" (every path would look removed, and none broken).
pub fn scan_checked(sys: &Path) -> std::io::Result<Vec<Subsystem>> {
    match std::fs::read_dir(sys.join("class/nvme-subsystem")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(scan(sys)),
    }
}

/// Keelson's subsystems under `sys` (`/sys` on a real node), in name order.
pub fn scan(sys: &Path) -> Vec<Subsystem> {
    let class = sys.join("class/nvme-subsystem");
    let mut out = Vec::new();
    for name in sorted_entries(&class) {
        let dir = class.join(&name);
        let nqn = read(&dir.join("subsysnqn"));
        if !nqn.starts_with(NQN_PREFIX) {
            continue;
        }
        let controllers = sorted_entries(&dir)
            .into_iter()
            .filter(|n| is_controller(n))
            // One whose state cannot be read went while the scan looked (deleted: an unstage, or a replaced path):
            // left out, as gone, not taken for a broken path with no address or host. Read once: the state kept is
            // the one checked.
            .filter_map(|c| {
                let state = read(&dir.join(&c).join("state"));
                (!state.is_empty()).then_some((c, state))
            })
            .map(|(c, state)| {
                let cdir = dir.join(&c);
                let paths: Vec<String> = sorted_entries(&cdir)
                    .into_iter()
                    .filter(|p| is_path(p))
                    .collect();
                let ana = paths
                    .iter()
                    .map(|p| read(&cdir.join(p).join("ana_state")))
                    .collect();
                let io = paths
                    .iter()
                    .map(|p| IoCounts::read(&cdir.join(p)))
                    .fold(IoCounts::default(), IoCounts::add);
                Controller {
                    state,
                    address: read(&cdir.join("address")),
                    transport: read(&cdir.join("transport")),
                    cntlid: read(&cdir.join("cntlid")),
                    host_nqn: read(&cdir.join("hostnqn")),
                    host_id: read(&cdir.join("hostid")),
                    ana,
                    io,
                    name: c,
                }
            })
            .collect();
        out.push(Subsystem {
            name,
            nqn,
            controllers,
        });
    }
    out
}

#[cfg(test)]
pub mod fixture {
    //! A sysfs tree laid out as the kernel lays it out (files only: the subsystem's controller entries are
    //! directories here where the kernel has links to them).
    use std::path::Path;

    pub fn subsystem(sys: &Path, name: &str, nqn: &str) {
        let d = sys.join("class/nvme-subsystem").join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("subsysnqn"), format!("{nqn}\n")).unwrap();
        std::fs::write(d.join("iopolicy"), "numa\n").unwrap();
    }

    #[allow(clippy::too_many_arguments)]
    pub fn controller(
        sys: &Path,
        subsys: &str,
        name: &str,
        state: &str,
        traddr: &str,
        ana: &[&str],
    ) {
        let d = sys.join("class/nvme-subsystem").join(subsys).join(name);
        std::fs::create_dir_all(&d).unwrap();
        let (ip, port) = traddr.rsplit_once(':').unwrap();
        for (f, v) in [
            ("state", state.to_string()),
            (
                "address",
                format!("traddr={ip},trsvcid={port},src_addr=10.200.0.2"),
            ),
            ("transport", "tcp".into()),
            ("cntlid", "1".into()),
            ("hostnqn", "nqn.2014-08.org.nvmexpress:uuid:host".into()),
            ("hostid", "0f1e2d3c-0000-4000-8000-000000000001".into()),
        ] {
            std::fs::write(d.join(f), format!("{v}\n")).unwrap();
        }
        let n = name.trim_start_matches("nvme");
        for (i, a) in ana.iter().enumerate() {
            let p = d.join(format!("nvme0c{n}n{}", i + 1));
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("ana_state"), format!("{a}\n")).unwrap();
        }
    }

    pub fn set_state(sys: &Path, subsys: &str, name: &str, state: &str) {
        let d = sys.join("class/nvme-subsystem").join(subsys).join(name);
        std::fs::write(d.join("state"), format!("{state}\n")).unwrap();
    }

    /// Sets the block counters of the controller's first path: `in_flight` reads, `completed` reads.
    pub fn set_io(sys: &Path, subsys: &str, name: &str, in_flight: u64, completed: u64) {
        let n = name.trim_start_matches("nvme");
        let d = sys
            .join("class/nvme-subsystem")
            .join(subsys)
            .join(name)
            .join(format!("nvme0c{n}n1"));
        std::fs::write(d.join("inflight"), format!("{in_flight:8} {:8}\n", 0)).unwrap();
        let stat = format!("{completed} 0 0 0 0 0 0 0 {in_flight} 0 0 0 0 0 0 0 0\n");
        std::fs::write(d.join("stat"), stat).unwrap();
    }

    pub fn remove(sys: &Path, subsys: &str, name: &str) {
        let d = sys.join("class/nvme-subsystem").join(subsys).join(name);
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No subsystems yet (nvme_core without any) is an empty scan; a subsystems' directory that cannot be read is
    /// an error, not "nothing there" (which would take every path for removed).
    #[test]
    fn a_scan_that_could_not_look_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        assert!(scan_checked(dir.path()).unwrap().is_empty());
        std::fs::create_dir_all(dir.path().join("class")).unwrap();
        // Not a directory: read_dir fails (ENOTDIR), as it would with no file descriptor left.
        std::fs::write(dir.path().join("class/nvme-subsystem"), "").unwrap();
        assert!(scan_checked(dir.path()).is_err());
        assert!(
            scan(dir.path()).is_empty(),
            "the plain scan still says nothing"
        );
    }

    #[test]
    fn reads_keelsons_subsystems_their_controllers_and_paths() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        let vol = format!("{NQN_PREFIX}vol-7b0c1f6e-1111-4222-8333-444455556666");
        fixture::subsystem(sys, "nvme-subsys0", &vol);
        fixture::controller(
            sys,
            "nvme-subsys0",
            "nvme0",
            "live",
            "10.200.0.1:4420",
            &["optimized"],
        );
        fixture::controller(
            sys,
            "nvme-subsys0",
            "nvme1",
            "connecting",
            "10.200.0.1:4421",
            &["inaccessible"],
        );
        fixture::subsystem(sys, "nvme-subsys1", "nqn.2014-08.org.nvmexpress:other");
        fixture::controller(sys, "nvme-subsys1", "nvme2", "live", "10.0.0.9:4420", &[]);
        std::fs::create_dir_all(sys.join("class/nvme-subsystem/nvme-subsys0/nvme0n1")).unwrap();

        let s = scan(sys);
        assert_eq!(s.len(), 1, "only Keelson's: {s:?}");
        assert_eq!(s[0].nqn, vol);
        let c: Vec<_> = s[0]
            .controllers
            .iter()
            .map(|c| (c.name.as_str(), c.state.as_str(), c.usable()))
            .collect();
        assert_eq!(c, [("nvme0", "live", true), ("nvme1", "connecting", false)]);
        assert_eq!(s[0].controllers[0].target(), "10.200.0.1:4420");
        assert_eq!(s[0].controllers[0].ana, ["optimized"]);
        assert_eq!(
            s[0].controllers[0].host_nqn,
            "nqn.2014-08.org.nvmexpress:uuid:host"
        );
        assert_eq!(
            s[0].controllers[0].io,
            IoCounts::default(),
            "no counters: none"
        );
        fixture::set_io(sys, "nvme-subsys0", "nvme0", 3, 1234);
        let io = scan(sys)[0].controllers[0].io;
        assert_eq!((io.reads.in_flight, io.reads.completed), (3, 1234));
        // Writes apart; discards and flushes complete in their own counters (fields 12 and 16), counted as writes.
        let dir = sys.join("class/nvme-subsystem/nvme-subsys0/nvme0/nvme0c0n1");
        std::fs::write(dir.join("stat"), "10 0 0 0 20 0 0 0 1 0 0 7 0 0 0 5 0\n").unwrap();
        std::fs::write(dir.join("inflight"), "       1        4\n").unwrap();
        let io = scan(sys)[0].controllers[0].io;
        assert_eq!(
            io.reads,
            Flow {
                in_flight: 1,
                completed: 10
            }
        );
        assert_eq!(
            io.writes,
            Flow {
                in_flight: 4,
                completed: 20 + 7 + 5
            }
        );
    }

    /// A controller that went while the scan looked (its directory listed, its state no longer there) is left out:
    /// before, it came out with an empty state, so broken, and was reported with no address nor host.
    #[test]
    fn a_controller_gone_while_the_scan_looked_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        let vol = format!("{NQN_PREFIX}vol-7b0c1f6e-1111-4222-8333-444455556666");
        fixture::subsystem(sys, "nvme-subsys0", &vol);
        fixture::controller(
            sys,
            "nvme-subsys0",
            "nvme0",
            "live",
            "10.0.0.1:4420",
            &["optimized"],
        );
        fixture::controller(
            sys,
            "nvme-subsys0",
            "nvme1",
            "live",
            "10.0.0.1:4421",
            &["optimized"],
        );
        std::fs::remove_file(sys.join("class/nvme-subsystem/nvme-subsys0/nvme1/state")).unwrap();
        let s = scan(sys);
        let names: Vec<&str> = s[0].controllers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["nvme0"]);
    }

    #[test]
    fn native_multipath_is_read_from_nvme_core_s_parameter() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(native_multipath(dir.path()), None, "nvme_core not loaded");
        let p = dir.path().join("module/nvme_core/parameters");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("multipath"), "N\n").unwrap();
        assert_eq!(native_multipath(dir.path()), Some(false));
        std::fs::write(p.join("multipath"), "Y\n").unwrap();
        assert_eq!(native_multipath(dir.path()), Some(true));
    }

    #[test]
    fn a_controller_set_up_or_taken_down_on_purpose_is_not_broken() {
        let c = |state: &str| Controller {
            name: "nvme0".into(),
            state: state.into(),
            address: String::new(),
            transport: "tcp".into(),
            cntlid: "1".into(),
            host_nqn: String::new(),
            host_id: String::new(),
            ana: vec![],
            io: IoCounts::default(),
        };
        for state in ["new", "deleting", "deleting (no IO)", "live"] {
            assert!(!c(state).broken(), "{state}");
        }
        for state in ["connecting", "resetting", "dead"] {
            assert!(c(state).broken(), "{state}");
        }
    }

    #[test]
    fn a_live_controller_whose_paths_are_all_inaccessible_is_not_usable() {
        let c = Controller {
            name: "nvme0".into(),
            state: "live".into(),
            address: String::new(),
            transport: "tcp".into(),
            cntlid: "1".into(),
            host_nqn: String::new(),
            host_id: String::new(),
            ana: vec!["inaccessible".into()],
            io: IoCounts::default(),
        };
        assert!(!c.usable() && c.broken());
        let new = Controller {
            ana: vec![],
            ..c.clone()
        };
        assert!(
            !new.usable() && !new.broken(),
            "just connected: no path yet, not broken"
        );
        let no_ana = Controller {
            ana: vec![String::new()],
            ..c
        };
        assert!(no_ana.usable());
    }

    #[test]
    fn names_of_controllers_and_paths() {
        assert!(is_controller("nvme0") && is_controller("nvme12"));
        assert!(
            !is_controller("nvme0n1") && !is_controller("nvme") && !is_controller("nvme-subsys0")
        );
        assert!(is_path("nvme0c1n1") && is_path("nvme10c2n3"));
        assert!(!is_path("nvme0n1") && !is_path("nvme0c1") && !is_path("nvme0cxn1"));
    }

    #[test]
    fn no_sysfs_no_subsystems() {
        assert!(scan(Path::new("/nonexistent")).is_empty());
    }
}
