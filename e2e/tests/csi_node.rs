//! The CSI node service against the real Linux kernel: the node plugin (`csi-driver --mode node`) runs in the QEMU
//! guest, which plays Kubernetes node `app-1`; the host runs a cluster agent and three io-engines in a network
//! namespace and the CSI controller, which creates an ext4, an xfs and a raw block volume and publishes them to
//! `app-1`. The guest stages, publishes, writes, has the host grow each volume through the controller while it is
//! mounted (the kernel sees the new size from the target's notice; NodeExpandVolume grows the file system),
//! unpublishes, unstages and stages again (files intact, never reformatted), checks stats and the spec's answers to
//! repeated and conflicting calls, and unstages a volume whose target the host killed (no hang). A second test
//! follows one claim's whole life: a 3-replica volume published, written with verified fio in the guest,
//! snapshotted, restored into a new volume that holds the snapshot's moment, grown while mounted, and everything
//! deleted with nothing left in any pool. Needs root (network namespace) and QEMU.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use e2e::bins;
use e2e::cluster::{
    AGENT, all_online, answer, cluster_agent, engine, keelctl, set_answer, stage_binary,
};
use e2e::netns::Netns;
use e2e::process::Process;
use e2e::vm::{self, VM_LOCK};
use proto::csi::controller_client::ControllerClient;
use proto::csi::volume_capability::access_mode::Mode;
use proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use proto::csi::*;
use tonic::transport::Channel;

const ACK_PORT: u16 = 4441;
const MIB: i64 = 1 << 20;

async fn controller(socket: &Path) -> ControllerClient<Channel> {
    for _ in 0..200 {
        if let Ok(ch) = proto::unix::channel(&socket.display().to_string()).await {
            return ControllerClient::new(ch);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no CSI controller on {}", socket.display());
}

/// ControllerUnpublishVolume from `app-1` and DeleteVolume of each of `ids`.
async fn unpublish_and_delete(socket: &Path, ids: &[&String]) {
    let mut c = controller(socket).await;
    for id in ids {
        c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.to_string(),
            node_id: "app-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.delete_volume(DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

fn capability(block: bool, fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })
        }),
    }
}

/// Creates volume `name` and publishes it to `app-1`: its id and publish context.
async fn provision(
    c: &mut ControllerClient<Channel>,
    name: &str,
    bytes: i64,
    replicas: &str,
    block: bool,
    fs: &str,
) -> (String, HashMap<String, String>) {
    let v = c
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability(block, fs)],
            parameters: [("repl".to_string(), replicas.to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let ctx = c
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: "app-1".into(),
            volume_capability: Some(capability(block, fs)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    (v.volume_id, ctx)
}

/// A cluster agent and three io-engines in a network namespace, the CSI controller on a Unix socket in it.
struct Cluster {
    ns: Netns,
    logs: std::path::PathBuf,
    engines: Vec<Option<Process>>,
    socket: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
    _agent: Process,
    _csi: Process,
}

fn cluster(name: &str, tap: &str) -> Cluster {
    let ns = Netns::create(name, tap).unwrap();
    let logs = vm::tempdir().unwrap();
    let agent = cluster_agent(&ns, &logs, "cluster-agent", "").unwrap();
    let engines: Vec<Option<Process>> = (1..=3)
        .map(|i| Some(engine(&ns, &logs, i).unwrap()))
        .collect();
    all_online(&ns, 3).unwrap();
    // The guest's node, known as its node agent would make it (CSI publishes only to a node that exists).
    keelctl(&ns, &["host", "register", "app-1"]).unwrap();
    let socket = logs.join("csi-controller.sock");
    let mut cmd = ns.command(bins::path("csi-driver"));
    cmd.env("RUST_LOG", "info")
        .args(["--mode", "controller", "--endpoint"])
        .arg(format!("unix://{}", socket.display()))
        .args(["--cluster-agent", &format!("http://{AGENT}")]);
    let csi = Process::spawn("csi-controller", cmd, &logs).unwrap();
    Cluster {
        ns,
        logs,
        engines,
        socket,
        rt: tokio::runtime::Runtime::new().unwrap(),
        _agent: agent,
        _csi: csi,
    }
}

/// A guest job directory with `jobs/<name>/run.sh`, the node plugin and keelctl.
fn job(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let tmp = vm::tempdir().unwrap();
    let job = tmp.join("job");
    std::fs::create_dir_all(&job).unwrap();
    std::fs::copy(
        bins::workspace().join(format!("e2e/vm/jobs/{name}/run.sh")),
        job.join("run.sh"),
    )
    .unwrap();
    stage_binary(&job, "csi-driver").unwrap();
    stage_binary(&job, "keelctl").unwrap();
    (tmp, job)
}

/// Waits until no pool of any node holds a replica.
fn pools_empty(ns: &Netns) {
    let t = std::time::Instant::now();
    loop {
        let out = keelctl(ns, &["get", "-o", "json", "nodes"]).unwrap();
        let held: Vec<String> = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .flat_map(|n| n["pools"].as_array().cloned().unwrap_or_default())
            .filter(|p| p["committed"].as_u64() != Some(0))
            .map(|p| p.to_string())
            .collect();
        if held.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "pools still hold replicas: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn the_node_plugin_stages_publishes_and_unstages_volumes_on_the_real_kernel() {
    let test = "the_node_plugin_stages_publishes_and_unstages_volumes_on_the_real_kernel";
    if !vm::allowed(test) {
        return;
    }
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Cluster {
        ns,
        logs,
        mut engines,
        socket,
        rt,
        _agent: _keep_agent,
        _csi: _keep_csi,
    } = cluster("keelson-e2e-csi", "kvtap4");
    let (volumes, host_nqn) = rt.block_on(async {
        let mut c = controller(&socket).await;
        let ext4 = provision(&mut c, "pvc-ext4", 64 * MIB, "2", false, "ext4").await;
        // mkfs.xfs wants 300 MB at least.
        let xfs = provision(&mut c, "pvc-xfs", 320 * MIB, "1", false, "xfs").await;
        let block = provision(&mut c, "pvc-block", 64 * MIB, "1", true, "").await;
        let host = ext4.1["hostNqn"].clone();
        (vec![("EXT4", ext4), ("XFS", xfs), ("BLOCK", block)], host)
    });
    assert_eq!(host_nqn, "nqn.2026-11.io.keelson:host-app-1");

    let (tmp, job) = job("csi-node");
    let mut params: Vec<(&str, String)> = vec![
        ("HOSTNQN", host_nqn),
        ("AGENT", format!("http://{AGENT}")),
        ("ACK_HOST", "10.200.0.1".into()),
        ("ACK_PORT", ACK_PORT.to_string()),
        ("BLOCK_BYTES", (64 * MIB).to_string()),
    ];
    let keys: HashMap<&str, [&'static str; 3]> = [
        ("EXT4", ["VOL_EXT4", "NQN_EXT4", "ADDR_EXT4"]),
        ("XFS", ["VOL_XFS", "NQN_XFS", "ADDR_XFS"]),
        ("BLOCK", ["VOL_BLOCK", "NQN_BLOCK", "ADDR_BLOCK"]),
    ]
    .into();
    for (kind, (id, ctx)) in &volumes {
        let [v, n, a] = keys[kind];
        params.push((v, id.clone()));
        params.push((n, ctx["nqn"].clone()));
        params.push((a, ctx["targetAddresses"].clone()));
    }
    let ext4_id = volumes[0].1.0.clone();
    let mut ack = Some(answer(&ns, &logs, ACK_PORT, "none").unwrap());
    let mut killed = None;
    let out = vm::run_job(&ns, &job, &params, Duration::from_secs(900), |req| {
        let words: Vec<&str> = req.split(' ').collect();
        match words.as_slice() {
            ["kill-target"] => {
                // kill -9 of the io-engine serving the ext4 volume's nexus: its only path is gone for good.
                let json = keelctl(&ns, &["get", "-o", "json", "volume", &ext4_id])?;
                let v: serde_json::Value =
                    serde_json::from_str(json.lines().next().unwrap_or("{}"))?;
                let node = v["nexus_node"].as_str().unwrap_or_default().to_string();
                let i: usize = node.trim_start_matches('n').parse::<usize>()? - 1;
                drop(engines[i].take());
                println!("host: killed {node}, which served the ext4 volume's nexus");
                killed = Some(i);
            }
            // ControllerExpandVolume, as the external-resizer sends it for a claim grown while mounted.
            [kind @ ("grow" | "grow-block"), id, bytes] => {
                let block = *kind == "grow-block";
                let bytes: i64 = bytes.parse()?;
                let r = rt.block_on(async {
                    controller(&socket)
                        .await
                        .controller_expand_volume(ControllerExpandVolumeRequest {
                            volume_id: id.to_string(),
                            capacity_range: Some(CapacityRange {
                                required_bytes: bytes,
                                limit_bytes: 0,
                            }),
                            volume_capability: Some(capability(block, "")),
                            ..Default::default()
                        })
                        .await
                })?;
                let r = r.into_inner();
                anyhow::ensure!(
                    r.capacity_bytes == bytes && r.node_expansion_required != block,
                    "expansion of {id}: {r:?}"
                );
                println!("host: grew {id} to {bytes} bytes");
            }
            _ => anyhow::bail!("unknown request {req}"),
        }
        set_answer(&logs, ACK_PORT, &format!("done {req}"))?;
        Ok(())
    })
    .unwrap();
    drop(ack.take());
    println!("{}", out.output);
    assert!(
        out.success && out.output.contains("ALL-OK"),
        "guest job failed:\n{}",
        out.output
    );

    // The killed engine back, then every volume unpublished and deleted: nothing left.
    if let Some(i) = killed {
        engines[i] = Some(engine(&ns, &logs, i as u32 + 1).unwrap());
        all_online(&ns, 3).unwrap();
    }
    let ids: Vec<&String> = volumes.iter().map(|(_, (id, _))| id).collect();
    rt.block_on(unpublish_and_delete(&socket, &ids));
    let left = keelctl(&ns, &["get", "-o", "json", "volumes"]).unwrap();
    assert!(left.trim().is_empty(), "volumes left: {left}");
    pools_empty(&ns);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn a_claims_life_create_publish_write_snapshot_restore_delete_on_the_real_kernel() {
    let test = "a_claims_life_create_publish_write_snapshot_restore_delete_on_the_real_kernel";
    if !vm::allowed(test) {
        return;
    }
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster("keelson-e2e-claim", "kvtap5");
    let (vol, ctx) = c.rt.block_on(async {
        let mut ctl = controller(&c.socket).await;
        provision(&mut ctl, "pvc-claim", 64 * MIB, "3", false, "ext4").await
    });
    let (tmp, job) = job("csi-claim");
    let params: Vec<(&str, String)> = vec![
        ("VOL", vol.clone()),
        ("NQN", ctx["nqn"].clone()),
        ("ADDR", ctx["targetAddresses"].clone()),
        ("HOSTNQN", ctx["hostNqn"].clone()),
        ("AGENT", format!("http://{AGENT}")),
        ("ACK_HOST", "10.200.0.1".into()),
        ("ACK_PORT", ACK_PORT.to_string()),
    ];
    let mut ack = Some(answer(&c.ns, &c.logs, ACK_PORT, "DONE=none").unwrap());
    let mut made: Option<(String, String)> = None;
    let out = vm::run_job(&c.ns, &job, &params, Duration::from_secs(900), |req| {
        if req == "expand" {
            let grown = 96 * MIB;
            let r = c.rt.block_on(async {
                controller(&c.socket)
                    .await
                    .controller_expand_volume(ControllerExpandVolumeRequest {
                        volume_id: vol.clone(),
                        capacity_range: Some(CapacityRange {
                            required_bytes: grown,
                            limit_bytes: 0,
                        }),
                        volume_capability: Some(capability(false, "ext4")),
                        ..Default::default()
                    })
                    .await
            })?;
            anyhow::ensure!(r.get_ref().capacity_bytes == grown, "{r:?}");
            println!("host: grew {vol} to {grown} bytes");
            set_answer(&c.logs, ACK_PORT, &format!("DONE=expand GROWN={grown}"))?;
            return Ok(());
        }
        if req != "snapshot-and-restore" {
            anyhow::bail!("unknown request {req}");
        }
        let (snap, rvol, rctx) = c.rt.block_on(async {
            let mut ctl = controller(&c.socket).await;
            let snap = ctl
                .create_snapshot(CreateSnapshotRequest {
                    source_volume_id: vol.clone(),
                    name: "snap-claim".into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            let v = ctl
                .create_volume(CreateVolumeRequest {
                    name: "pvc-restored".into(),
                    volume_capabilities: vec![capability(false, "ext4")],
                    parameters: [("repl".to_string(), "2".to_string())].into(),
                    volume_content_source: Some(VolumeContentSource {
                        r#type: Some(volume_content_source::Type::Snapshot(
                            volume_content_source::SnapshotSource {
                                snapshot_id: snap.snapshot_id.clone(),
                            },
                        )),
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .volume
                .unwrap_or_default();
            let ctx = ctl
                .controller_publish_volume(ControllerPublishVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    node_id: "app-1".into(),
                    volume_capability: Some(capability(false, "ext4")),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .publish_context;
            Ok::<_, tonic::Status>((snap.snapshot_id, v.volume_id, ctx))
        })?;
        println!("host: snapshot {snap} of {vol}, restored as {rvol}");
        set_answer(
            &c.logs,
            ACK_PORT,
            &format!(
                "DONE=snapshot-and-restore RVOL={rvol} RNQN={} RADDR={}",
                rctx["nqn"], rctx["targetAddresses"]
            ),
        )?;
        made = Some((snap, rvol));
        Ok(())
    })
    .unwrap();
    drop(ack.take());
    println!("{}", out.output);
    assert!(
        out.success && out.output.contains("ALL-OK"),
        "guest job failed:\n{}",
        out.output
    );
    // Everything deleted: volumes, snapshot; no pool holds anything.
    let (snap, rvol) = made.unwrap();
    c.rt.block_on(async {
        unpublish_and_delete(&c.socket, &[&rvol, &vol]).await;
        let mut ctl = controller(&c.socket).await;
        ctl.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap,
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let left = keelctl(&c.ns, &["get", "-o", "json", "volumes"]).unwrap();
    assert!(left.trim().is_empty(), "volumes left: {left}");
    pools_empty(&c.ns);
    drop(c.engines);
    let _ = std::fs::remove_dir_all(&tmp);
}
