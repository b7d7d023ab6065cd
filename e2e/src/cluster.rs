//! A Keelson cluster in a network namespace for the VM tests: a cluster agent on the embedded store at [`AGENT`],
//! io-engines `n1`.. each with its own NVMe/TCP address on the namespace's side of the tap, keelctl against them,
//! and binaries made ready to run in the guest.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::bins;
use crate::netns::Netns;
use crate::process::Process;

/// The cluster agent's gRPC address in the namespace, as the guest and keelctl reach it. It listens on every
/// address of the namespace: each engine reaches it at its own ([`agent_for`]).
pub const AGENT: &str = "10.200.0.1:10200";

/// The address engine `i` reaches the cluster agent at (its own, so that a test can cut that engine off alone).
pub fn agent_for(i: u32) -> String {
    format!("127.0.1.{i}:10200")
}

/// Engine `i`'s engine API address (the cluster agent calls it there).
pub fn engine_api(i: u32) -> String {
    format!("127.0.0.{i}:10124")
}

/// Runs keelctl against the cluster agent; its stdout.
pub fn keelctl(ns: &Netns, args: &[&str]) -> Result<String> {
    let out = ns
        .command(bins::path("keelctl"))
        .args(args)
        .env("KEELSON_AGENT", format!("http://{AGENT}"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "keelctl {args:?}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// The address of engine `i`'s NVMe/TCP listener: its own, on the namespace's side of the tap (so that a test can
/// cut the guest off from it alone).
pub fn engine_ip(i: u32) -> String {
    format!("10.200.0.1{i}")
}

/// Engine `i` in the namespace: NVMe/TCP on [`engine_ip`]:4420, its own CNTLID range (a replacement nexus must
/// never hand out a CNTLID the host still holds), a pool on a sparse file.
pub fn engine(ns: &Netns, logs: &Path, i: u32) -> Result<Process> {
    let name = format!("n{i}");
    let disk = logs.join(format!("{name}-pool.img"));
    if !disk.exists() {
        std::fs::File::create(&disk)?.set_len(1 << 30)?;
    }
    let mut cmd = ns.command(bins::path("io-engine"));
    cmd.env("RUST_LOG", "info")
        .args(["--node-name", &name])
        .args(["--listen", &format!("{}:4420", engine_ip(i))])
        .args(["--grpc", &engine_api(i)])
        .args([
            "--cntlid-range",
            &format!("{}-{}", i * 1000, i * 1000 + 999),
        ])
        .args(["--cluster-agent", &format!("http://{}", agent_for(i))])
        .arg("--pool")
        .arg(format!("pool-{name}={}", disk.display()));
    let _ = ns
        .command("ip")
        .args([
            "addr",
            "add",
            &format!("{}/24", engine_ip(i)),
            "dev",
            &ns.tap,
        ])
        .stderr(std::process::Stdio::null())
        .status();
    let mut p = Process::spawn(&name, cmd, logs)?;
    p.wait_for_log("io-engine running", Duration::from_secs(20))?;
    Ok(p)
}

/// Binary `name` copied into a guest job directory, stripped, with the libraries it links that the guest may lack
/// (it has glibc's core but not necessarily libgcc_s).
pub fn stage_binary(job: &Path, name: &str) -> Result<()> {
    let bin = job.join(name);
    let st = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(bins::path(name))
        .arg(&bin)
        .status()?;
    if !st.success() {
        bail!("objcopy {name}: {st}");
    }
    let ldd = Command::new("ldd").arg(&bin).output()?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| l.split("=> ").nth(1)?.split(' ').next())
        .filter(|l| l.contains("libgcc_s"))
    {
        if let Some(file) = Path::new(lib).file_name() {
            std::fs::copy(lib, job.join(file))?;
        }
    }
    Ok(())
}

/// The cluster agent in the namespace, on the embedded store in the test's directory (the same one each start),
/// with `failpoints` armed (`FAILPOINTS`; empty: none).
pub fn cluster_agent(ns: &Netns, logs: &Path, name: &str, failpoints: &str) -> Result<Process> {
    let mut cmd = ns.command(bins::path("cluster-agent"));
    cmd.env("RUST_LOG", "info")
        .env("FAILPOINTS", failpoints)
        .args(["--grpc", "0.0.0.0:10200", "--data-dir"])
        .arg(logs.join("agent"))
        .args(["--heartbeat-ms", "500", "--node-timeout-ms", "2000"]);
    let mut p = Process::spawn(name, cmd, logs)?;
    p.wait_for_log("cluster agent starting", Duration::from_secs(20))?;
    Ok(p)
}

/// Waits until the agent lists `n` nodes Online.
pub fn all_online(ns: &Netns, n: usize) -> Result<()> {
    let t = Instant::now();
    while keelctl(ns, &["get", "nodes"])
        .unwrap_or_default()
        .matches("Online")
        .count()
        < n
    {
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "nodes never came Online: {}",
                keelctl(ns, &["get", "nodes"]).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Changes the line [`answer`]'s server on `port` gives from the next connection on.
pub fn set_answer(dir: &Path, port: u16, answer: &str) -> Result<()> {
    Ok(std::fs::write(
        dir.join(format!("answer-{port}")),
        format!("{answer}\n"),
    )?)
}

/// Serves `answer` (one line) to the guest on 10.200.0.1:`port` until killed: how the host tells a job waiting
/// after an `@@HOST` request that it is done (and what it made, if the job reads the line). The line is read anew
/// for each connection: [`set_answer`] changes it.
pub fn answer(ns: &Netns, dir: &Path, port: u16, answer: &str) -> Result<Answer> {
    set_answer(dir, port, answer)?;
    let f = dir.join(format!("answer-{port}"));
    Ok(Answer(
        ns.command("socat")
            .arg(format!("TCP-LISTEN:{port},bind=10.200.0.1,fork,reuseaddr"))
            .arg(format!("EXEC:cat {}", f.display()))
            .spawn()?,
    ))
}

/// The server [`answer`] started; stopped when dropped (also when the test fails).
pub struct Answer(std::process::Child);

impl Drop for Answer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
