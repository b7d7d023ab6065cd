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
    let mut c = ClusterClient::connect(agent.to_string())
        .await
        .with_context(|| format!("connecting to the cluster agent at {agent}"))?;
    match cmd {
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
