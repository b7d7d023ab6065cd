//! The kernel's NVMe/TCP host on this node, for the node service: connecting a volume's subsystem on every address
//! its publish gave (native multipath makes one block device of them), finding that device by the namespace's UUID
//! (the volume's; never by guessing `/dev` names), telling whether a path is live, and disconnecting. The sysfs
//! reading and `/dev/nvme-fabrics` writing are the node agent's (`ha_agent::node`); roots are parameters so tests
//! can point them elsewhere.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ha_agent::node::fabrics::{self, Connect};

/// How many times a path's connect the kernel refuses with EINVAL is tried.
const CONNECT_TRIES: u32 = 5;
use ha_agent::node::sysfs::{self, Subsystem};

/// Keep-alive timeout of the paths the node plugin connects (seconds): how soon a silent target is noticed. It also
/// bounds how soon I/O held by a silent path can move to a new one: Linux (6.1) waits for an outstanding keep-alive
/// to time out before it tears a controller down, whether the node agent resets it or the kernel recovers by itself,
/// so a frozen or cut-off nexus holds I/O for 1.25-1.5 times this (the target advertises traffic-based keep-alive,
/// so the host sends one only after a quarter of it without a completion). The node agent uses the same default.
pub const KEEP_ALIVE_TMO: u32 = 2;

#[derive(Clone, Debug)]
pub struct Kernel {
    /// `/sys`.
    pub sys: PathBuf,
    /// `/dev/nvme-fabrics`.
    pub fabrics: PathBuf,
    /// `/dev`.
    pub dev: PathBuf,
}

/// A volume's block device: `nvme0n1`, its `/dev` node and `major:minor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub path: PathBuf,
    pub dev: String,
    pub size_bytes: u64,
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `nvme0n1`: the multipath head a file system goes on, not a hidden per-path device (`nvme0c1n1`), which
/// carries the same UUID but has no `/dev` node.
fn is_head(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix("nvme")
        .and_then(|r| r.split_once('n'))
        .is_some_and(|(a, b)| digits(a) && digits(b))
}

/// The host ID that goes with a host NQN: fixed by it, so every connect of this node presents the same one (the
/// kernel refuses a second host ID for a host NQN it already uses).
pub fn host_id(host_nqn: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, host_nqn.as_bytes()).to_string()
}

impl Kernel {
    pub fn new(
        sys: impl Into<PathBuf>,
        fabrics: impl Into<PathBuf>,
        dev: impl Into<PathBuf>,
    ) -> Kernel {
        Kernel {
            sys: sys.into(),
            fabrics: fabrics.into(),
            dev: dev.into(),
        }
    }

    /// The subsystem `nqn` as the kernel has it, if connected.
    pub fn subsystem(&self, nqn: &str) -> Option<Subsystem> {
        sysfs::scan(&self.sys).into_iter().find(|s| s.nqn == nqn)
    }

    /// Connects `nqn` on every address in `addresses` the kernel has no controller for yet. Blocking (the kernel
    /// answers a connect once the controller is live or refused): call from a blocking thread. Succeeds when at
    /// least one path is connected; the others' errors are in the answer.
    pub fn connect(
        &self,
        nqn: &str,
        addresses: &[String],
        host_nqn: &str,
    ) -> Result<Vec<String>, String> {
        let existing: Vec<String> = self
            .subsystem(nqn)
            .map(|s| s.controllers.iter().map(|c| c.target()).collect())
            .unwrap_or_default();
        let mut errors = Vec::new();
        for a in addresses {
            if existing.contains(a) {
                continue;
            }
            let c = Connect {
                nqn: nqn.to_string(),
                address: a.clone(),
                host_nqn: host_nqn.to_string(),
                host_id: host_id(host_nqn),
                keep_alive_tmo: KEEP_ALIVE_TMO,
            };
            // A controller ID the target hands out that the host still holds for a dead path (EINVAL: "duplicate
            // cntlid") clears in a moment: asked again, as the node agent does.
            let connected = fabrics::connect_retrying(CONNECT_TRIES, &c, |c| {
                fabrics::connect(&self.fabrics, c)
            });
            if let Err(e) = connected {
                errors.push(format!("{a}: {e}"));
            }
        }
        if self
            .subsystem(nqn)
            .is_some_and(|s| !s.controllers.is_empty())
        {
            Ok(errors)
        } else {
            Err(format!("no path to {nqn} connected: {}", errors.join("; ")))
        }
    }

    /// The block device whose namespace UUID is `uuid`.
    pub fn device(&self, uuid: &str) -> Option<Device> {
        let block = self.sys.join("block");
        let rd = std::fs::read_dir(&block).ok()?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_head(&name) {
                continue;
            }
            let dir = block.join(&name);
            let matches = read(&dir.join("uuid")).eq_ignore_ascii_case(uuid)
                || read(&dir.join("wwid")).eq_ignore_ascii_case(&format!("uuid.{uuid}"));
            if matches {
                return Some(Device {
                    path: self.dev.join(&name),
                    dev: read(&dir.join("dev")),
                    size_bytes: read(&dir.join("size")).parse::<u64>().unwrap_or(0) * 512,
                    name,
                });
            }
        }
        None
    }

    /// Whether block device `dev` ("major:minor") exists on this node. A mount whose device is gone (its
    /// namespace removed under it) belongs to no live volume.
    pub fn block_device_exists(&self, dev: &str) -> bool {
        !dev.is_empty() && self.sys.join("dev/block").join(dev).exists()
    }

    /// Waits up to `limit` for the device of namespace `uuid` to appear (the kernel scans namespaces after the
    /// connect returns).
    pub fn wait_device(&self, uuid: &str, limit: Duration) -> Option<Device> {
        let t = Instant::now();
        loop {
            if let Some(d) = self.device(uuid).filter(|d| self.dev_exists(d)) {
                return Some(d);
            }
            if t.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn dev_exists(&self, d: &Device) -> bool {
        d.path.exists()
    }

    /// Asks every live controller of `nqn` to scan its namespaces again (the target grew one; the kernel also does
    /// this on the target's notice), then waits up to `limit` for the device of namespace `uuid` to be at least
    /// `want` bytes. Returns the device as it is then.
    pub fn rescan(
        &self,
        nqn: &str,
        uuid: &str,
        want: u64,
        limit: Duration,
    ) -> Result<Device, String> {
        let s = self
            .subsystem(nqn)
            .ok_or_else(|| format!("{nqn} is not connected"))?;
        let mut asked = 0;
        let mut errors = Vec::new();
        for c in s.controllers.iter().filter(|c| c.usable()) {
            let p = self
                .sys
                .join("class/nvme")
                .join(&c.name)
                .join("rescan_controller");
            match std::fs::write(&p, "1") {
                Ok(()) => asked += 1,
                Err(e) => errors.push(format!("{}: {e}", p.display())),
            }
        }
        if asked == 0 {
            return Err(format!(
                "no live path of {nqn} to rescan (paths: {}) {}",
                self.paths(nqn),
                errors.join("; ")
            ));
        }
        let t = Instant::now();
        loop {
            let d = self
                .device(uuid)
                .ok_or_else(|| format!("no device with namespace UUID {uuid}"))?;
            if d.size_bytes >= want || t.elapsed() > limit {
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the kernel's native NVMe multipath is on, if its module is loaded ([`sysfs::native_multipath`]).
    pub fn native_multipath(&self) -> Option<bool> {
        sysfs::native_multipath(&self.sys)
    }

    /// Whether any path to `nqn` can take I/O now.
    pub fn live(&self, nqn: &str) -> bool {
        self.subsystem(nqn)
            .is_some_and(|s| s.controllers.iter().any(|c| c.usable()))
    }

    /// Waits up to `limit` for a path to `nqn` to be live; whether one is.
    pub fn wait_live(&self, nqn: &str, limit: Duration) -> bool {
        let t = Instant::now();
        loop {
            if self.live(nqn) {
                return true;
            }
            if t.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether something holds block device `d` exclusively: a mounted file system (the kernel's claim lasts until
    /// its unmount has written what the page cache held, well after the mount left the mount table), a device
    /// mapper or MD array built on it, or a program that opened it `O_EXCL`. Taken by an exclusive open of its own
    /// (refused with EBUSY while another holds it; never blocks). A device node that is not a block device (or gone)
    /// is held by nothing.
    pub fn held(&self, d: &Device) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_EXCL | nix::libc::O_NONBLOCK)
            .open(&d.path);
        matches!(opened, Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY))
    }

    /// Removes every controller of `nqn` (queued I/O fails); returns how many.
    pub fn disconnect(&self, nqn: &str) -> Result<usize, String> {
        let Some(s) = self.subsystem(nqn) else {
            return Ok(0);
        };
        for c in &s.controllers {
            if let Err(e) = fabrics::delete(&self.sys, &c.name) {
                // Gone meanwhile is fine.
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(format!("deleting controller {}: {e}", c.name));
                }
            }
        }
        Ok(s.controllers.len())
    }

    /// A one-line account of `nqn`'s paths, for volume conditions and errors.
    pub fn paths(&self, nqn: &str) -> String {
        match self.subsystem(nqn) {
            None => "not connected".into(),
            Some(s) => s
                .controllers
                .iter()
                .map(|c| format!("{} {} {}", c.name, c.target(), c.state))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_is_found_by_its_namespace_uuid() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let dev = d.path().join("dev");
        for (name, uuid, wwid) in [
            // A hidden path device with the same UUID, listed first: never the answer.
            ("nvme0c0n1", "11111111-1111-4111-8111-111111111111", ""),
            ("nvme0n1", "11111111-1111-4111-8111-111111111111", ""),
            ("nvme1n1", "", "uuid.22222222-2222-4222-8222-222222222222"),
            ("sda", "22222222-2222-4222-8222-222222222222", ""),
        ] {
            let b = sys.join("block").join(name);
            std::fs::create_dir_all(&b).unwrap();
            std::fs::write(b.join("uuid"), format!("{uuid}\n")).unwrap();
            std::fs::write(b.join("wwid"), format!("{wwid}\n")).unwrap();
            std::fs::write(b.join("dev"), "259:1\n").unwrap();
            std::fs::write(b.join("size"), "2048\n").unwrap();
        }
        let k = Kernel::new(&sys, d.path().join("fabrics"), &dev);
        let a = k.device("11111111-1111-4111-8111-111111111111").unwrap();
        assert_eq!((a.name.as_str(), a.size_bytes), ("nvme0n1", 1 << 20));
        assert_eq!(a.path, dev.join("nvme0n1"));
        assert_eq!(
            k.device("22222222-2222-4222-8222-222222222222")
                .unwrap()
                .name,
            "nvme1n1"
        );
        assert!(k.device("33333333-3333-4333-8333-333333333333").is_none());
        assert!(
            is_head("nvme12n3") && !is_head("nvme0c1n1") && !is_head("nvme0") && !is_head("sda")
        );
        // Not there yet: no device node.
        assert!(
            k.wait_device("11111111-1111-4111-8111-111111111111", Duration::ZERO)
                .is_none()
        );
        assert_eq!(host_id("nqn.x"), host_id("nqn.x"));
        assert_ne!(host_id("nqn.x"), host_id("nqn.y"));
    }
}
