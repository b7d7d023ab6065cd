//! The QEMU guest with the Debian kernel's NVMe/TCP initiator (scripts in `e2e/vm/`). [`ensure_image`] builds the
//! image once per machine; [`run_job`] boots the guest on a network namespace's tap, runs a job directory with a
//! `params` file, and calls back for every `@@HOST <request>` line the guest prints.

use std::io::{BufRead, Seek};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bins::workspace;
use crate::netns::Netns;

/// TCG VMs are CPU-heavy: tests boot one at a time.
pub static VM_LOCK: Mutex<()> = Mutex::new(());

fn vm_dir() -> PathBuf {
    workspace().join("e2e").join("vm")
}

/// Where the image lives (built once per machine).
pub fn image_dir() -> PathBuf {
    std::env::var_os("KEELSON_VM_IMG")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp/keelson-vm/img".into())
}

/// Whether a VM test runs here: it needs root (network namespace, tap device) and QEMU (see [`crate::privileged`]).
pub fn allowed(test: &str) -> bool {
    crate::privileged::allowed_with(test, &["root", "qemu-system-x86_64"])
}

/// What the image is built from: a change to either script makes [`ensure_image`] build it again.
fn recipe() -> Result<String> {
    let mut r = String::new();
    for f in ["build-image.sh", "guest-init.sh"] {
        r += &std::fs::read_to_string(vm_dir().join(f)).with_context(|| format!("reading {f}"))?;
    }
    Ok(r)
}

/// Builds the guest image if it is not there yet or was built from other scripts (installs qemu, nvme-cli, fio,
/// ... with apt on first use).
pub fn ensure_image() -> Result<()> {
    let img = image_dir();
    let want = recipe()?;
    let built = std::fs::read_to_string(img.join("recipe")).unwrap_or_default();
    if img.join("vmlinuz").exists() && img.join("initramfs.cpio").exists() && built == want {
        return Ok(());
    }
    let st = Command::new(vm_dir().join("build-image.sh"))
        .env("IMG", &img)
        .status()
        .context("build-image.sh")?;
    if !st.success() {
        bail!("building the VM image failed ({st})");
    }
    std::fs::write(img.join("recipe"), want)?;
    Ok(())
}

/// What a job printed and how it ended.
pub struct JobOutcome {
    pub output: String,
    pub success: bool,
}

/// Runs `job` (a directory with run.sh) in a guest on `ns`'s tap with `params` written to `./params`.
/// `on_request` is called for each `@@HOST <request>` line, in order, while the guest runs.
pub fn run_job(
    ns: &Netns,
    job: &Path,
    params: &[(&str, String)],
    timeout: Duration,
    mut on_request: impl FnMut(&str) -> Result<()>,
) -> Result<JobOutcome> {
    ensure_image()?;
    let tmp = tempdir()?;
    let jobdir = tmp.join("job");
    std::fs::create_dir_all(&jobdir)?;
    for e in std::fs::read_dir(job)? {
        let e = e?;
        std::fs::copy(e.path(), jobdir.join(e.file_name()))?;
    }
    let p: String = params.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(jobdir.join("params"), p)?;
    let log = tmp.join("console.log");
    std::fs::write(&log, "")?;
    let mut child = Command::new(vm_dir().join("run-vm.sh"))
        .arg(&jobdir)
        .env("NET", "tap")
        .env("NETNS", &ns.name)
        .env("TAP", &ns.tap)
        .env("IMG", image_dir())
        .env("TIMEOUT", timeout.as_secs().to_string())
        .env("LOG", &log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run-vm.sh")?;

    // Follow the console log for host requests while the guest runs.
    let mut f = std::fs::File::open(&log)?;
    let mut pos = 0u64;
    let mut partial = String::new();
    let start = Instant::now();
    let status = loop {
        f.seek(std::io::SeekFrom::Start(pos))?;
        let mut r = std::io::BufReader::new(&f);
        let mut line = String::new();
        while r.read_line(&mut line)? > 0 {
            pos += line.len() as u64;
            partial.push_str(&line);
            line.clear();
            if partial.ends_with('\n') {
                let l = partial.trim_end_matches(['\r', '\n']).to_string();
                partial.clear();
                if let Some(req) = l.strip_prefix("@@HOST ") {
                    on_request(req.trim())?;
                }
            }
        }
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() > timeout + Duration::from_secs(30) {
            let _ = child.kill();
            bail!("VM did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output()?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(JobOutcome {
        output,
        success: status.success(),
    })
}

/// A fresh temporary directory under /tmp.
pub fn tempdir() -> Result<PathBuf> {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let p = std::env::temp_dir().join(format!("keelson-e2e-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
