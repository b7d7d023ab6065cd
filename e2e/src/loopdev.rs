//! Loop devices over files, for tests of disks (needs root and losetup): a plain one, or one with 4096-byte logical
//! blocks (a 4Kn disk). Detached when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a file; `.0` is its path (`/dev/loopN`).
pub struct Loop(pub PathBuf);

impl Loop {
    pub fn attach(file: &Path) -> Loop {
        Self::attach_with_blocks(file, 512)
    }

    /// With `block_size`-byte logical blocks (4096: a 4Kn disk).
    pub fn attach_with_blocks(file: &Path, block_size: u32) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show", "-b", &block_size.to_string()])
            .arg(file)
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
