//! A network namespace with a tap device, made by the test and removed when dropped. The VM's NIC is the tap; the
//! io-engine runs inside the namespace; nothing can leave it.

use std::process::Command;

use anyhow::{Context, Result, bail};

pub struct Netns {
    pub name: String,
    pub tap: String,
    /// The address of the namespace's side of the tap (the VM is `.2`).
    pub host_ip: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Netns {
    /// Creates namespace `name` with tap `tap` at 10.200.0.1/24 (requires root).
    pub fn create(name: &str, tap: &str) -> Result<Netns> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name]).context("creating a network namespace needs root")?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        ip(&["-n", name, "tuntap", "add", "dev", tap, "mode", "tap"])?;
        ip(&["-n", name, "addr", "add", "10.200.0.1/24", "dev", tap])?;
        ip(&["-n", name, "link", "set", tap, "up"])?;
        Ok(Netns {
            name: name.into(),
            tap: tap.into(),
            host_ip: "10.200.0.1".into(),
        })
    }

    /// Drops, from now on, the namespace's packets that match `selector` (`ip rule` words, e.g. `from 10.200.0.2 to
    /// 10.200.0.11`): established connections go silent (nothing arrives, no reset), new ones fail. Loopback
    /// traffic is matched too: the namespace's local-address lookup is moved behind these rules on first use.
    pub fn block(&self, selector: &[&str]) -> Result<()> {
        let shown = Command::new("ip")
            .args(["-n", &self.name, "rule", "show", "pref", "0"])
            .output()
            .context("running ip (iproute2)")?;
        if !String::from_utf8_lossy(&shown.stdout).trim().is_empty() {
            ip(&[
                "-n", &self.name, "rule", "add", "pref", "100", "lookup", "local",
            ])?;
            ip(&["-n", &self.name, "rule", "del", "pref", "0"])?;
        }
        let mut args = vec!["-n", &self.name, "rule", "add", "pref", "10"];
        args.extend_from_slice(selector);
        args.push("blackhole");
        ip(&args)
    }

    /// Lets the packets [`Netns::block`] dropped through again.
    pub fn unblock(&self, selector: &[&str]) -> Result<()> {
        let mut args = vec!["-n", &self.name, "rule", "del", "pref", "10"];
        args.extend_from_slice(selector);
        args.push("blackhole");
        ip(&args)
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
