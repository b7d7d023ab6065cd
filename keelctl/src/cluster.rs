//! `keelctl get ...`: the cluster agent's view (`proto::cluster`).

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;

#[derive(Clone, Copy, Default, ValueEnum)]
pub enum Output {
    /// A table.
    #[default]
    Table,
    /// JSON, one object per line.
    Json,
}

#[derive(Subcommand)]
pub enum GetCmd {
    /// Storage nodes: state, why, engine endpoint, pools, how long since the last heartbeat.
    Nodes,
    /// One storage node.
    Node { name: String },
    /// Application nodes whose node agents registered: their host NQNs, how long since each was heard from (a node
    /// whose agent is not alive gets no switch-over).
    Hosts,
    /// Pools managed by the agent: phase, whether the node reports them, capacity.
    Pools,
    /// Volumes: state, replicas and their nodes, where the nexus runs.
    Volumes,
    /// One volume.
    Volume { uuid: String },
    /// Snapshots (of one volume with `--volume`).
    Snapshots {
        #[arg(long, default_value = "")]
        volume: String,
    },
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume of SIZE bytes (suffixes KiB, MiB, GiB) with `--replicas` copies on distinct nodes.
    Create {
        uuid: String,
        size: String,
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// Replicas only on nodes with this label, `key=value` (repeat for more; all must match).
        #[arg(long = "node-selector", value_parser = label)]
        node_selector: Vec<(String, String)>,
        /// Replicas only in pools with this label, `key=value` (repeat for more; all must match).
        #[arg(long = "pool-selector", value_parser = label)]
        pool_selector: Vec<(String, String)>,
        /// A topology segment, `key=value[,key=value...]` (repeat for more): replicas only on nodes matching one.
        #[arg(long)]
        topology: Vec<String>,
        /// Make it from this snapshot (its size must be the snapshot's; replicas are clones of its copies).
        #[arg(long = "from-snapshot", default_value = "")]
        from_snapshot: String,
        /// Make it from this volume as it is now (its size must be the source's).
        #[arg(long = "from-volume", default_value = "")]
        from_volume: String,
    },
    /// Grow the volume online to SIZE (suffixes KiB, MiB, GiB): replicas, then the nexus; its host is told.
    Expand { uuid: String, size: String },
    /// Take a crash-consistent snapshot SNAPSHOT_UUID of the volume.
    Snapshot { uuid: String, snapshot_uuid: String },
    /// Delete a snapshot (every copy).
    DeleteSnapshot { snapshot_uuid: String },
    /// Destroy a volume's nexus and replicas.
    Delete { uuid: String },
    /// Create the volume's nexus and export it to HOST_NQN; prints where to connect.
    Publish {
        uuid: String,
        host_nqn: String,
        /// Run the nexus on this node (the application's, if it has an io-engine).
        #[arg(long, default_value = "")]
        node: String,
        /// Publish to this host too while other hosts have it (a raw block volume several nodes write).
        #[arg(long)]
        multi_host: bool,
    },
    /// Unpublish the volume from HOST_NQN (others keep it), or from every host (the nexus goes).
    Unpublish {
        uuid: String,
        #[arg(default_value = "")]
        host_nqn: String,
    },
    /// Keep N replicas: more are placed on nodes without one and rebuilt; fewer retire faulted ones first.
    Scale { uuid: String, replicas: u32 },
}

/// `key=value`, both non-empty.
fn label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

/// Bytes in "64MiB", "1GiB", "4096".
fn size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ]
    .iter()
    .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    let n: u64 = num.trim().parse().with_context(|| format!("size {s:?}"))?;
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

fn print_snapshots(snaps: &[pb::VolumeSnapshot], out: Output) {
    match out {
        Output::Json => snaps.iter().for_each(|s| {
            let j = serde_json::json!({
                "uuid": s.uuid, "volume": s.volume, "size": s.size_bytes, "ready": s.ready,
                "created_unix_ms": s.created_unix_ms, "nodes": s.nodes,
            });
            println!("{j}");
        }),
        Output::Table => {
            println!(
                "{:<36} {:<36} {:>12} {:<6}  NODES",
                "UUID", "VOLUME", "SIZE", "READY"
            );
            for s in snaps {
                println!(
                    "{:<36} {:<36} {:>12} {:<6}  {}",
                    s.uuid,
                    s.volume,
                    s.size_bytes,
                    s.ready,
                    s.nodes.join(",")
                );
            }
        }
    }
}

/// A replica's state, with its rebuild's progress while it rebuilds (`rebuilding 45%`), and whether one outside a
/// nexus misses writes (`unattached, out of sync`).
fn replica_state(r: &pb::VolumeReplica) -> String {
    if r.state == "unattached" && !r.in_sync {
        format!("{}, out of sync", r.state)
    } else if r.state == "rebuilding" && r.rebuild_total_bytes > 0 {
        format!(
            "rebuilding {}%",
            r.rebuild_done_bytes * 100 / r.rebuild_total_bytes
        )
    } else {
        r.state.clone()
    }
}

/// Under `get volume`'s table: why it is not Online, and the rebuilds its nexus finished.
fn print_volume_detail(v: &pb::Volume) {
    if !v.reason.is_empty() {
        println!("\nreason: {}", v.reason);
    }
    if !v.rebuilds.is_empty() {
        println!(
            "\n{:<36} {:<8} {:>12} {:>12} {:>12} {:>8}  RESULT",
            "REBUILT REPLICA", "KIND", "COPIED", "SKIPPED", "TOTAL", "MS"
        );
        for b in &v.rebuilds {
            println!(
                "{:<36} {:<8} {:>12} {:>12} {:>12} {:>8}  {}",
                b.replica,
                b.kind,
                b.bytes_copied,
                b.bytes_skipped,
                b.bytes_total,
                b.duration_ms,
                if b.error.is_empty() { "ok" } else { &b.error }
            );
        }
    }
}

fn print_volumes(vols: &[pb::Volume], out: Output) {
    match out {
        Output::Json => vols.iter().for_each(|v| {
            let j = serde_json::json!({
                "uuid": v.uuid, "size": v.size_bytes, "replicas": v.replicas, "state": v.state,
                "replica_list": v.replica_list.iter().map(|r| serde_json::json!({
                    "uuid": r.uuid, "node": r.node, "pool": r.pool, "created": r.created, "state": r.state, "in_sync": r.in_sync,
                    "rebuild_done_bytes": r.rebuild_done_bytes, "rebuild_total_bytes": r.rebuild_total_bytes,
                })).collect::<Vec<_>>(),
                "nexus_node": v.nexus_node, "nqn": v.nqn, "target_addresses": v.target_addresses,
                "host_nqn": v.host_nqn, "reason": v.reason,
                "rebuilds": v.rebuilds.iter().map(|b| serde_json::json!({
                    "replica": b.replica, "kind": b.kind, "bytes_copied": b.bytes_copied,
                    "bytes_skipped": b.bytes_skipped, "bytes_total": b.bytes_total,
                    "duration_ms": b.duration_ms, "finished_unix_ms": b.finished_unix_ms, "error": b.error,
                })).collect::<Vec<_>>(),
            });
            println!("{j}");
        }),
        Output::Table => {
            println!(
                "{:<36} {:>12} {:<9} {:<30} {:<10}  TARGET",
                "UUID", "SIZE", "STATE", "REPLICAS (node/pool:state)", "NEXUS"
            );
            for v in vols {
                let reps: Vec<String> = v
                    .replica_list
                    .iter()
                    .map(|r| format!("{}/{}:{}", r.node, r.pool, replica_state(r)))
                    .collect();
                println!(
                    "{:<36} {:>12} {:<9} {:<30} {:<10}  {}",
                    v.uuid,
                    v.size_bytes,
                    v.state,
                    reps.join(","),
                    if v.nexus_node.is_empty() {
                        "-"
                    } else {
                        &v.nexus_node
                    },
                    v.target_addresses.join(",")
                );
            }
        }
    }
}

pub async fn volume(agent: &str, cmd: VolumeCmd, out: Output) -> Result<()> {
    let mut c = connect(agent).await?;
    match cmd {
        VolumeCmd::Create {
            uuid,
            size: s,
            replicas,
            node_selector,
            pool_selector,
            topology,
            from_snapshot,
            from_volume,
        } => {
            let topology = topology
                .iter()
                .map(|seg| {
                    let labels = seg
                        .split(',')
                        .map(|kv| label(kv).map_err(anyhow::Error::msg))
                        .collect::<Result<_>>()?;
                    Ok(pb::TopologySegment { labels })
                })
                .collect::<Result<_>>()?;
            let req = pb::CreateVolumeRequest {
                uuid,
                size_bytes: size(&s)?,
                replicas,
                node_selector: node_selector.into_iter().collect(),
                pool_selector: pool_selector.into_iter().collect(),
                topology,
                source_snapshot: from_snapshot,
                source_volume: from_volume,
                context: Default::default(),
            };
            print_volumes(&[c.create_volume(req).await?.into_inner()], out);
        }
        VolumeCmd::Expand { uuid, size: s } => {
            let req = pb::ExpandVolumeRequest {
                uuid,
                size_bytes: size(&s)?,
            };
            print_volumes(&[c.expand_volume(req).await?.into_inner()], out);
        }
        VolumeCmd::Snapshot {
            uuid,
            snapshot_uuid,
        } => {
            let s = c
                .create_snapshot(pb::CreateSnapshotRequest {
                    volume: uuid,
                    uuid: snapshot_uuid,
                })
                .await?
                .into_inner();
            print_snapshots(&[s], out);
        }
        VolumeCmd::DeleteSnapshot { snapshot_uuid } => {
            c.delete_snapshot(pb::DeleteSnapshotRequest {
                uuid: snapshot_uuid,
            })
            .await?;
        }
        VolumeCmd::Delete { uuid } => {
            c.delete_volume(pb::DeleteVolumeRequest { uuid }).await?;
        }
        VolumeCmd::Publish {
            uuid,
            host_nqn,
            node,
            multi_host,
        } => {
            let v = c
                .publish_volume(pb::PublishVolumeRequest {
                    uuid,
                    host_nqn: host_nqn.clone(),
                    node,
                    multi_host,
                    require_known_node: false,
                })
                .await?
                .into_inner();
            print_volumes(std::slice::from_ref(&v), out);
            if let (Output::Table, Some(addr)) = (out, v.target_addresses.first()) {
                let (ip, port) = addr.rsplit_once(':').unwrap_or((addr, "4420"));
                println!(
                    "nvme connect -t tcp -a {ip} -s {port} -n {} --hostnqn {host_nqn}",
                    v.nqn
                );
            }
        }
        VolumeCmd::Scale { uuid, replicas } => {
            let v = c
                .set_volume_replicas(pb::SetVolumeReplicasRequest { uuid, replicas })
                .await?
                .into_inner();
            print_volumes(&[v], out);
        }
        VolumeCmd::Unpublish { uuid, host_nqn } => {
            print_volumes(
                &[
                    c.unpublish_volume(pb::UnpublishVolumeRequest { uuid, host_nqn })
                        .await?
                        .into_inner(),
                ],
                out,
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// The node gets no new replica or nexus (what it holds stays).
    Cordon { name: String },
    /// Undo `cordon` (and end a drain).
    Uncordon { name: String },
    /// Cordon the node and move every volume target (nexus) off it; `get node` says Draining, then Drained.
    Drain { name: String },
    /// Forget an Offline node gone for good, with its pools (refused while a volume has a replica or its target
    /// there).
    Delete { name: String },
}

pub async fn node(agent: &str, cmd: NodeCmd, out: Output) -> Result<()> {
    let mut c = connect(agent).await?;
    let n = match cmd {
        NodeCmd::Cordon { name } => c.cordon_node(pb::CordonNodeRequest { name }).await?,
        NodeCmd::Uncordon { name } => c.uncordon_node(pb::CordonNodeRequest { name }).await?,
        NodeCmd::Drain { name } => c.drain_node(pb::CordonNodeRequest { name }).await?,
        NodeCmd::Delete { name } => {
            c.delete_node(pb::DeleteNodeRequest { name: name.clone() })
                .await?;
            println!("forgot node {name}");
            return Ok(());
        }
    };
    print(&[n.into_inner()], out);
    Ok(())
}

#[derive(Subcommand)]
pub enum HostCmd {
    /// Register application node NODE as its node agent does (a node that mounts volumes without one, say by a
    /// manual `nvme connect`: CSI publishes only to nodes that exist). Its kernel's host NQN is Keelson's for NODE
    /// unless `--host-nqn` says otherwise (repeat for more).
    Register {
        node: String,
        #[arg(long = "host-nqn")]
        host_nqns: Vec<String>,
    },
    /// Forget application node NODE, gone for good (refused while its node agent is alive or a volume is
    /// published to it). A node agent that comes back registers it again.
    Delete { node: String },
}

pub async fn host(agent: &str, cmd: HostCmd) -> Result<()> {
    let mut c = connect(agent).await?;
    match cmd {
        HostCmd::Register { node, host_nqns } => {
            let host_nqns = if host_nqns.is_empty() {
                vec![proto::names::kernel_host_nqn(&node)]
            } else {
                host_nqns
            };
            c.register_host(pb::RegisterHostRequest {
                node: node.clone(),
                host_nqns: host_nqns.clone(),
                version: format!("keelctl {}", env!("CARGO_PKG_VERSION")),
            })
            .await?;
            println!("registered host {node}: {}", host_nqns.join(", "));
        }
        HostCmd::Delete { node } => {
            c.delete_host(pb::DeleteHostRequest { node: node.clone() })
                .await?;
            println!("forgot host {node}");
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Create (or import) pool NAME on DISK of NODE, managed by the agent from then on.
    Create {
        node: String,
        name: String,
        disk: String,
    },
    /// Destroy a managed pool (it must hold no replicas).
    Delete { node: String, name: String },
}

fn phase(p: i32) -> &'static str {
    match pb::PoolPhase::try_from(p) {
        Ok(pb::PoolPhase::Creating) => "Creating",
        Ok(pb::PoolPhase::Created) => "Created",
        Ok(pb::PoolPhase::Deleting) => "Deleting",
        _ => "Unknown",
    }
}

fn print_pools(pools: &[pb::ManagedPool], out: Output) {
    match out {
        Output::Json => pools.iter().for_each(|p| {
            let v = serde_json::json!({
                "node": p.node, "name": p.name, "disk": p.disk, "phase": phase(p.phase), "uuid": p.uuid,
                "reported": p.reported, "capacity": p.capacity, "allocated": p.allocated, "reason": p.reason,
            });
            println!("{v}");
        }),
        Output::Table => {
            println!("{:<16} {:<12} {:<9} {:<8} {:>14} {:>14}  DISK", "NODE", "NAME", "PHASE", "REPORTED", "CAPACITY", "ALLOCATED");
            for p in pools {
                println!(
                    "{:<16} {:<12} {:<9} {:<8} {:>14} {:>14}  {}{}",
                    p.node,
                    p.name,
                    phase(p.phase),
                    p.reported,
                    p.capacity,
                    p.allocated,
                    p.disk,
                    if p.reason.is_empty() { String::new() } else { format!("  ({})", p.reason) }
                );
            }
        }
    }
}

async fn connect(agent: &str) -> Result<ClusterClient<tonic::transport::Channel>> {
    ClusterClient::connect(agent.to_string())
        .await
        .with_context(|| format!("connecting to the cluster agent at {agent}"))
}

pub async fn pool(agent: &str, cmd: PoolCmd, out: Output) -> Result<()> {
    let mut c = connect(agent).await?;
    match cmd {
        PoolCmd::Create { node, name, disk } => {
            let p = c
                .create_pool(pb::CreatePoolRequest { node, name, disk })
                .await?
                .into_inner();
            print_pools(&[p], out);
        }
        PoolCmd::Delete { node, name } => {
            c.delete_pool(pb::DeletePoolRequest { node, name }).await?;
        }
    }
    Ok(())
}

fn state(s: i32) -> &'static str {
    match pb::NodeState::try_from(s) {
        Ok(pb::NodeState::Online) => "Online",
        Ok(pb::NodeState::Offline) => "Offline",
        _ => "Unknown",
    }
}

fn json(n: &pb::Node) -> serde_json::Value {
    serde_json::json!({
        "name": n.name,
        "state": state(n.state),
        "reason": n.reason,
        "engine_endpoint": n.engine_endpoint,
        "nvmf_listeners": n.nvmf_listeners,
        "cntlid_range": [n.cntlid_min, n.cntlid_max],
        "pools": n.pools.iter().map(|p| serde_json::json!({
            "name": p.name, "uuid": p.uuid, "disk": p.disk,
            "capacity": p.capacity, "allocated": p.allocated, "committed": p.committed,
            "disk_errors": p.disk_errors, "block_size": p.block_size, "disk_full": p.disk_full,
            "disk_room": p.disk_room, "replica_room": p.replica_room,
        })).collect::<Vec<_>>(),
        "instance": n.instance,
        "last_seen_ms_ago": n.last_seen_ms_ago,
        "state_since_ms": n.state_since_ms,
        "cordoned": n.cordoned,
        "drain_state": n.drain_state,
    })
}

fn print(nodes: &[pb::Node], out: Output) {
    match out {
        Output::Json => nodes.iter().for_each(|n| println!("{}", json(n))),
        Output::Table => {
            println!(
                "{:<20} {:<16} {:<26} {:>6} {:>10}  REASON",
                "NAME", "STATE", "ENGINE", "POOLS", "SEEN (ms)"
            );
            for n in nodes {
                println!(
                    "{:<20} {:<16} {:<26} {:>6} {:>10}  {}",
                    n.name,
                    match (n.cordoned, n.drain_state.as_str()) {
                        (_, d) if !d.is_empty() => format!("{},{d}", state(n.state)),
                        (true, _) => format!("{},Cordoned", state(n.state)),
                        _ => state(n.state).to_string(),
                    },
                    n.engine_endpoint,
                    n.pools.len(),
                    n.last_seen_ms_ago,
                    n.reason
                );
            }
        }
    }
}

pub async fn get(agent: &str, cmd: GetCmd, out: Output) -> Result<()> {
    let mut c = connect(agent).await?;
    match cmd {
        GetCmd::Volumes => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let r = c
                    .list_volumes(pb::ListVolumesRequest {
                        max_entries: 500,
                        starting_token: token,
                    })
                    .await?
                    .into_inner();
                all.extend(r.volumes);
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            print_volumes(&all, out);
        }
        GetCmd::Volume { uuid } => {
            let v = c
                .get_volume(pb::GetVolumeRequest { uuid })
                .await?
                .into_inner();
            print_volumes(std::slice::from_ref(&v), out);
            if let Output::Table = out {
                print_volume_detail(&v);
            }
        }
        GetCmd::Snapshots { volume } => {
            let r = c
                .list_snapshots(pb::ListSnapshotsRequest { volume })
                .await?
                .into_inner();
            print_snapshots(&r.snapshots, out);
        }
        GetCmd::Pools => {
            let r = c.list_pools(pb::ListPoolsRequest {}).await?.into_inner();
            print_pools(&r.pools, out);
        }
        GetCmd::Nodes => {
            let r = c.list_nodes(pb::ListNodesRequest {}).await?.into_inner();
            print(&r.nodes, out);
        }
        GetCmd::Node { name } => {
            let n = c.get_node(pb::GetNodeRequest { name }).await?.into_inner();
            print(&[n], out);
        }
        GetCmd::Hosts => {
            let hosts = c
                .list_hosts(pb::ListHostsRequest {})
                .await?
                .into_inner()
                .hosts;
            match out {
                Output::Json => {
                    for h in &hosts {
                        println!(
                            "{}",
                            serde_json::json!({
                                "node": h.node, "host_nqns": h.host_nqns, "version": h.version,
                                "registered_unix_ms": h.registered_unix_ms,
                                "last_seen_ms_ago": h.last_seen_ms_ago, "alive": h.alive,
                            })
                        );
                    }
                }
                Output::Table => {
                    println!(
                        "{:<20} {:<6} {:>10} {:<10}  HOST NQNS",
                        "NODE", "ALIVE", "SEEN (ms)", "VERSION"
                    );
                    for h in &hosts {
                        println!(
                            "{:<20} {:<6} {:>10} {:<10}  {}",
                            h.node,
                            if h.alive { "yes" } else { "no" },
                            h.last_seen_ms_ago,
                            h.version,
                            h.host_nqns.join(",")
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
