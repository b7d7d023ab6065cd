//! The CSI node service against the real Linux kernel: the node plugin (`csi-driver --mode node`) runs in the QEMU
//! guest, which plays Kubernetes node `app-1`; the host runs a cluster agent and three io-engines in a network
//! namespace and the CSI controller, which creates an ext4, an xfs and a raw block volume and publishes them to
//! `app-1`. The guest stages, publishes, writes, unpublishes, unstages and stages again (files intact, never
//! reformatted), checks stats and the spec's answers to repeated and conflicting calls, and unstages a volume whose
//! target the host killed (no hang). Needs root (network namespace) and QEMU.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use e2e::bins;
use e2e::cluster::{AGENT, all_online, cluster_agent, engine, keelctl, stage_binary};
use e2e::netns::Netns;
use e2e::process::Process;
use e2e::vm::{self, VM_LOCK};
use proto::csi::controller_client::ControllerClient;
use proto::csi::volume_capability::access_mode::Mode;
use proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use proto::csi::*;
use tonic::transport::{Channel, Endpoint};

const ACK_PORT: u16 = 4441;
const MIB: i64 = 1 << 20;

async fn controller(socket: &Path) -> ControllerClient<Channel> {
    let path = socket.to_path_buf();
    for _ in 0..200 {
        let p = path.clone();
        let ch = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await;
        if let Ok(ch) = ch {
            return ControllerClient::new(ch);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no CSI controller on {}", path.display());
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

#[test]
fn the_node_plugin_stages_publishes_and_unstages_volumes_on_the_real_kernel() {
    let test = "the_node_plugin_stages_publishes_and_unstages_volumes_on_the_real_kernel";
    if !vm::allowed(test) {
        return;
    }
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::create("keelson-e2e-csi", "kvtap4").unwrap();
    let logs = vm::tempdir().unwrap();
    let _agent = cluster_agent(&ns, &logs, "cluster-agent", "").unwrap();
    let mut engines: Vec<Option<Process>> = (1..=3)
        .map(|i| Some(engine(&ns, &logs, i).unwrap()))
        .collect();
    all_online(&ns, 3).unwrap();
    let socket = logs.join("csi-controller.sock");
    let mut cmd = ns.command(bins::path("csi-driver"));
    cmd.env("RUST_LOG", "info")
        .args(["--mode", "controller", "--endpoint"])
        .arg(format!("unix://{}", socket.display()))
        .args(["--cluster-agent", &format!("http://{AGENT}")]);
    let _csi = Process::spawn("csi-controller", cmd, &logs).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
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

    let tmp = vm::tempdir().unwrap();
    let job = tmp.join("job");
    std::fs::create_dir_all(&job).unwrap();
    std::fs::copy(
        bins::workspace().join("e2e/vm/jobs/csi-node/run.sh"),
        job.join("run.sh"),
    )
    .unwrap();
    stage_binary(&job, "csi-driver").unwrap();
    stage_binary(&job, "keelctl").unwrap();
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
    let mut ack: Option<std::process::Child> = None;
    let mut killed = None;
    let out = vm::run_job(&ns, &job, &params, Duration::from_secs(900), |req| {
        if req != "kill-target" {
            anyhow::bail!("unknown request {req}");
        }
        // kill -9 of the io-engine serving the ext4 volume's nexus: its only path is gone for good.
        let json = keelctl(&ns, &["get", "-o", "json", "volume", &ext4_id])?;
        let v: serde_json::Value = serde_json::from_str(json.lines().next().unwrap_or("{}"))?;
        let node = v["nexus_node"].as_str().unwrap_or_default().to_string();
        let i: usize = node.trim_start_matches('n').parse::<usize>()? - 1;
        drop(engines[i].take());
        println!("host: killed {node}, which served the ext4 volume's nexus");
        killed = Some(i);
        ack = Some(
            ns.command("socat")
                .arg(format!(
                    "TCP-LISTEN:{ACK_PORT},bind=10.200.0.1,fork,reuseaddr"
                ))
                .arg("EXEC:/bin/true")
                .spawn()?,
        );
        Ok(())
    })
    .unwrap();
    if let Some(mut a) = ack.take() {
        let _ = a.kill();
        let _ = a.wait();
    }
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
    rt.block_on(async {
        let mut c = controller(&socket).await;
        for (_, (id, _)) in &volumes {
            c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: "app-1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
            c.delete_volume(DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
    });
    let left = keelctl(&ns, &["get", "-o", "json", "volumes"]).unwrap();
    assert!(left.trim().is_empty(), "volumes left: {left}");
    let _ = std::fs::remove_dir_all(&tmp);
}
