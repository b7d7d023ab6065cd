//! HA switch-over with the Linux kernel as the application's host (in a QEMU VM): three io-engines and a cluster
//! agent in a network namespace, a 3-replica volume published to the guest, the node agent running in the guest
//! next to the kernel. While verified fio writes, the host makes the nexus fail, one way per round: kill -9 of its
//! io-engine, SIGSTOP of it, the guest cut off from it (it still reaches its replicas), a drain of its node, a
//! crash of the cluster agent in the middle, and a partition of its node from the guest and the cluster agent (but
//! not from its replicas). The node agent reports the broken path, the cluster agent moves the nexus (fenced) to
//! another node, the node agent connects the new path and removes the dead one. fio must see no error in any round;
//! the guest prints each round's longest I/O stall and the path metrics. After a partition, another host's writes
//! through the old nexus must fail with Reservation Conflict and never reach the volume. Needs root (network
//! namespace) and QEMU.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use e2e::bins;
use e2e::cluster::{
    AGENT, agent_for, all_online, answer, cluster_agent, engine, engine_api, engine_ip, keelctl,
    stage_binary,
};
use e2e::netns::Netns;
use e2e::process::Process;
use e2e::vm::{self, VM_LOCK};

const VOLUME: &str = "00000000-0000-4000-8000-00000000a0a0";
const HOSTNQN: &str = "nqn.2026-11.io.keelson:host-app-1";
const HOSTID: &str = "5e3c0a2d-7f4b-4c1e-9a8d-2b6f0c9e1a01";
const ACK_PORT: u16 = 4440;

/// The node running the volume's nexus, as the cluster agent says (`n1`..`n3`), and the volume's state.
fn nexus_of(ns: &Netns) -> Result<(String, String)> {
    let out = keelctl(ns, &["get", "-o", "json", "volumes"])?;
    for l in out.lines() {
        let v: serde_json::Value = serde_json::from_str(l)?;
        if v["uuid"] == VOLUME {
            return Ok((
                v["nexus_node"].as_str().unwrap_or_default().to_string(),
                v["state"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    bail!("volume {VOLUME} not listed: {out}")
}

/// Where another host writes through the old nexus after a partition: past fio's part of the volume (its first
/// 48 MiB), so the guest can check afterwards that none of it landed.
const FENCED_OFFSET: &str = "56M";

/// The failures of one run, from KEELSON_SWITCHOVER_FAILURES (the benchmark repeats them): `kill` (kill -9 of the
/// nexus's engine), `stop` (SIGSTOP of it), `cut` (the guest cut off from it while it still reaches the replicas),
/// `drain` (`keelctl node drain` of its node), `crash` (kill -9 of its engine with the cluster agent armed to die
/// right after recording the switch-over, then restarted), `partition` (its node cut off from the guest and from
/// the cluster agent both ways, while it still reaches the other nodes' replicas). The keep-alive timeout of the
/// guest's paths (what bounds noticing a silent node) comes from KEELSON_SWITCHOVER_KATO.
fn failures() -> String {
    std::env::var("KEELSON_SWITCHOVER_FAILURES")
        .unwrap_or_else(|_| "kill stop cut drain crash partition".into())
}

/// The packets a partition of node `i` drops (`ip rule` selectors): the guest's to and from its NVMe/TCP address,
/// the cluster agent's calls to its engine API, and its own calls (registration, heartbeats) to the agent.
fn partition(i: u32) -> Vec<Vec<String>> {
    let to_port = |a: String| {
        let (h, p) = a.split_once(':').unwrap();
        ["to", h, "ipproto", "tcp", "dport", p]
            .map(String::from)
            .to_vec()
    };
    vec![
        ["from", "10.200.0.2", "to", &engine_ip(i)]
            .map(String::from)
            .to_vec(),
        ["from", &engine_ip(i), "to", "10.200.0.2"]
            .map(String::from)
            .to_vec(),
        to_port(engine_api(i)),
        to_port(agent_for(i)),
    ]
}

/// Another host (this one, with the guest's host NQN: the application restarted elsewhere) writes through the old,
/// partitioned nexus at `addr`: every write must fail. The new nexus fenced the replicas; the old one stops at the
/// first Reservation Conflict, answers with a path error (ANA Inaccessible, never the conflict: a Linux host would
/// fail that to the application instead of retrying on its other path) and its engine unpublishes it, so the
/// connection ends.
fn write_through_the_fenced_nexus(ns: &Netns, addr: &str) -> Result<()> {
    let out = ns
        .command(bins::path("nvmf-perf"))
        .args(["--addr", addr, "--nqn"])
        .arg(format!("nqn.2026-11.io.keelson:vol-{VOLUME}"))
        .args([
            "--host-nqn",
            HOSTNQN,
            "--rw",
            "write",
            "--bs",
            "4k",
            "--qd",
            "1",
        ])
        .args(["--time", "1", "--offset", FENCED_OFFSET, "--size", "1M"])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "host: another host's writes through the old nexus: {}",
        text.trim()
    );
    let refused = text.contains("ANA inaccessible") || text.contains("lost their connection");
    if out.status.success() || !refused || text.contains("reservation conflict") {
        bail!(
            "the old nexus took writes after the switch-over, or failed them for another reason: {text}"
        );
    }
    Ok(())
}

#[test]
fn kernel_io_survives_nexus_failures_through_the_node_agents_switch_over() {
    let test = "kernel_io_survives_nexus_failures_through_the_node_agents_switch_over";
    if !vm::allowed(test) {
        return;
    }
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::create("keelson-e2e-ho", "kvtap3").unwrap();
    let logs = vm::tempdir().unwrap();
    let mut agent = cluster_agent(&ns, &logs, "cluster-agent", "").unwrap();
    let mut engines: Vec<Option<Process>> = (1..=3)
        .map(|i| Some(engine(&ns, &logs, i).unwrap()))
        .collect();
    all_online(&ns, 3).unwrap();
    let mut agents = 1;
    keelctl(
        &ns,
        &["volume", "create", VOLUME, "64MiB", "--replicas", "3"],
    )
    .unwrap();
    let published = keelctl(&ns, &["volume", "publish", VOLUME, HOSTNQN, "--node", "n1"]).unwrap();
    println!("{published}");
    assert!(published.contains("10.200.0.11:4420"), "{published}");

    let tmp = vm::tempdir().unwrap();
    let job = tmp.join("job");
    std::fs::create_dir_all(&job).unwrap();
    std::fs::copy(
        bins::workspace().join("e2e/vm/jobs/kernel-switchover/run.sh"),
        job.join("run.sh"),
    )
    .unwrap();
    stage_binary(&job, "node-agent").unwrap();
    let params = [
        ("TARGET", engine_ip(1)),
        ("PORT", "4420".into()),
        ("ACK_HOST", "10.200.0.1".into()),
        ("NQN", format!("nqn.2026-11.io.keelson:vol-{VOLUME}")),
        ("HOSTNQN", HOSTNQN.into()),
        ("HOSTID", HOSTID.into()),
        ("AGENT", format!("http://{AGENT}")),
        ("FIO_SECONDS", "20".into()),
        ("FAILURES", format!("'{}'", failures())),
        (
            "KATO",
            std::env::var("KEELSON_SWITCHOVER_KATO").unwrap_or_else(|_| "2".into()),
        ),
        ("ACK_PORT", ACK_PORT.to_string()),
    ];
    // The engine made to fail in this round, how, and the listener that tells the guest it is back.
    let mut failed: Option<(usize, String)> = None;
    let mut ack: Option<e2e::cluster::Answer> = None;
    let out = vm::run_job(&ns, &job, &params, Duration::from_secs(1800), |req| {
        if let Some(mode) = req.strip_prefix("fail-nexus ") {
            drop(ack.take());
            let (node, _) = nexus_of(&ns)?;
            let i: usize = node.trim_start_matches('n').parse::<usize>()? - 1;
            let Some(p) = engines[i].as_ref() else {
                bail!("the nexus is on {node}, whose engine is not running");
            };
            if mode == "crash" {
                // The cluster agent will die (kill -9, at a failpoint) right after recording the switch-over.
                agent.terminate(Duration::from_secs(20))?;
                agent = cluster_agent(
                    &ns,
                    &logs,
                    "cluster-agent-armed",
                    "switchover.reported=return",
                )?;
                all_online(&ns, 3)?;
            }
            match mode {
                "kill" => drop(engines[i].take()), // SIGKILL
                "crash" => {
                    drop(engines[i].take());
                    let st = agent.wait_exit(Duration::from_secs(60))?;
                    if std::os::unix::process::ExitStatusExt::signal(&st) != Some(9) {
                        bail!(
                            "the armed agent should have died at its failpoint: {st}\n{}",
                            agent.log()
                        );
                    }
                    agents += 1;
                    agent = cluster_agent(&ns, &logs, &format!("cluster-agent-{agents}"), "")?;
                    println!("host: the cluster agent died in the switch-over and was restarted");
                }
                "stop" => {
                    Command::new("kill")
                        .args(["-STOP", &p.pid().to_string()])
                        .status()?;
                }
                // A partition: the engine's address goes from the namespace, so the guest's packets to it and its
                // packets to the guest are dropped, while it still reaches the replicas and the cluster agent.
                "cut" => {
                    let st = ns
                        .command("ip")
                        .args([
                            "addr",
                            "del",
                            &format!("{}/24", engine_ip(i as u32 + 1)),
                            "dev",
                            &ns.tap,
                        ])
                        .status()?;
                    if !st.success() {
                        bail!("ip addr del: {st}");
                    }
                }
                "partition" => {
                    for rule in partition(i as u32 + 1) {
                        ns.block(&rule.iter().map(String::as_str).collect::<Vec<_>>())?;
                    }
                }
                // A planned move: the nexus leaves the node through the same path.
                "drain" => {
                    keelctl(&ns, &["node", "drain", &node])?;
                }
                other => bail!("unknown failure {other}"),
            }
            println!("host: {mode} of {node}, which ran the nexus");
            failed = Some((i, mode.to_string()));
        } else if req == "restore" {
            if let Some((i, mode)) = failed.take() {
                match engines[i].as_ref() {
                    Some(p) if mode == "stop" => {
                        Command::new("kill")
                            .args(["-CONT", &p.pid().to_string()])
                            .status()?;
                    }
                    Some(_) if mode == "cut" => {
                        ns.command("ip")
                            .args([
                                "addr",
                                "add",
                                &format!("{}/24", engine_ip(i as u32 + 1)),
                                "dev",
                                &ns.tap,
                            ])
                            .status()?;
                    }
                    Some(_) if mode == "drain" => {
                        keelctl(&ns, &["node", "uncordon", &format!("n{}", i + 1)])?;
                    }
                    Some(_) if mode == "partition" => {
                        let n = i as u32 + 1;
                        write_through_the_fenced_nexus(&ns, &format!("{}:4420", engine_ip(n)))?;
                        for rule in partition(n) {
                            ns.unblock(&rule.iter().map(String::as_str).collect::<Vec<_>>())?;
                        }
                        // Healed: the cluster agent destroys the old nexus once its node answers.
                        let t = Instant::now();
                        loop {
                            let left = keelctl(
                                &ns,
                                &[
                                    "engine",
                                    "--endpoint",
                                    &format!("http://{}", engine_api(n)),
                                    "nexuses",
                                ],
                            )
                            .unwrap_or_else(|e| e.to_string());
                            if left.trim().is_empty() {
                                break;
                            }
                            if t.elapsed() > Duration::from_secs(60) {
                                bail!("the old nexus on n{n} outlived the partition: {left}");
                            }
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        println!("host: partition of n{n} healed, its old nexus destroyed");
                    }
                    _ => engines[i] = Some(engine(&ns, &logs, i as u32 + 1)?),
                }
            }
            // Back to three healthy replicas before the next round.
            let t = Instant::now();
            loop {
                let (_, state) = nexus_of(&ns)?;
                if state == "Online" {
                    break;
                }
                if t.elapsed() > Duration::from_secs(120) {
                    bail!(
                        "the volume never came back Online: {}",
                        keelctl(&ns, &["get", "volumes"])?
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            ack = Some(answer(&ns, &logs, ACK_PORT, "")?);
        } else {
            bail!("unknown request {req}");
        }
        Ok(())
    })
    .unwrap();
    drop(ack.take());
    println!("{}", out.output);
    let volumes = keelctl(&ns, &["get", "volumes"]).unwrap_or_default();
    assert!(
        out.success && out.output.contains("ALL-OK"),
        "guest job failed:\n{}\nvolumes:\n{volumes}\ncluster agent:\n{}",
        out.output,
        agent.log()
    );
    println!("{volumes}");
    let hosts = keelctl(&ns, &["get", "hosts"]).unwrap();
    println!("{hosts}");
    assert!(
        hosts.contains("app-1") && hosts.contains(HOSTNQN),
        "the guest's node agent registered its node and host: {hosts}"
    );
    // The cluster agents' stage timings of each switch-over, and of publishing the new nexus in it.
    for e in std::fs::read_dir(&logs).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("cluster-agent") {
            let log = std::fs::read_to_string(e.path()).unwrap_or_default();
            for l in log.lines().filter(|l| {
                l.contains("switched over")
                    || (l.contains("volume published") && !l.contains("moved_from=\"\""))
            }) {
                println!("agent: {l}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    drop(engines);
}
