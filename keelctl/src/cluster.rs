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
    /// Pools managed by the agent: phase, whether the node reports them, capacity.
    Pools,
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
        })).collect::<Vec<_>>(),
        "instance": n.instance,
        "last_seen_ms_ago": n.last_seen_ms_ago,
        "state_since_ms": n.state_since_ms,
    })
}

fn print(nodes: &[pb::Node], out: Output) {
    match out {
        Output::Json => nodes.iter().for_each(|n| println!("{}", json(n))),
        Output::Table => {
            println!(
                "{:<20} {:<8} {:<26} {:>6} {:>10}  REASON",
                "NAME", "STATE", "ENGINE", "POOLS", "SEEN (ms)"
            );
            for n in nodes {
                println!(
                    "{:<20} {:<8} {:<26} {:>6} {:>10}  {}",
                    n.name,
                    state(n.state),
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
    }
    Ok(())
}
