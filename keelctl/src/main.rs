//! keelctl: Keelson's command-line client. `keelctl engine ...` talks to one io-engine's engine API; `keelctl get
//! ...` to the cluster agent; `keelctl csi ...` to a CSI plugin's node service.

mod cluster;
mod csi;
mod storage;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use proto::engine as pb;
use proto::engine::engine_client::EngineClient;

#[derive(Parser)]
#[command(name = "keelctl", version, about = "Keelson command-line client")]
struct Cli {
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Commands for one io-engine (storage node).
    Engine {
        /// Engine API endpoint.
        #[arg(long, env = "KEELSON_ENGINE", default_value = "http://127.0.0.1:10124")]
        endpoint: String,
        #[command(subcommand)]
        cmd: EngineCmd,
    },
    /// Read the cluster agent's state.
    Get {
        /// Cluster agent endpoint.
        #[arg(long, env = "KEELSON_AGENT", default_value = "http://127.0.0.1:10200")]
        agent: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cluster::Output,
        #[command(subcommand)]
        cmd: cluster::GetCmd,
    },
    /// Pools managed by the cluster agent.
    Pool {
        /// Cluster agent endpoint.
        #[arg(long, env = "KEELSON_AGENT", default_value = "http://127.0.0.1:10200")]
        agent: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cluster::Output,
        #[command(subcommand)]
        cmd: cluster::PoolCmd,
    },
    /// Storage nodes, through the cluster agent.
    Node {
        /// Cluster agent endpoint.
        #[arg(long, env = "KEELSON_AGENT", default_value = "http://127.0.0.1:10200")]
        agent: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cluster::Output,
        #[command(subcommand)]
        cmd: cluster::NodeCmd,
    },
    /// Application nodes (hosts), through the cluster agent.
    Host {
        /// Cluster agent endpoint.
        #[arg(long, env = "KEELSON_AGENT", default_value = "http://127.0.0.1:10200")]
        agent: String,
        #[command(subcommand)]
        cmd: cluster::HostCmd,
    },
    /// Volumes managed by the cluster agent.
    Volume {
        /// Cluster agent endpoint.
        #[arg(long, env = "KEELSON_AGENT", default_value = "http://127.0.0.1:10200")]
        agent: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cluster::Output,
        #[command(subcommand)]
        cmd: cluster::VolumeCmd,
    },
    /// A CSI plugin's Identity and Node services, on its Unix socket (as the kubelet calls them).
    Csi {
        /// The plugin's socket.
        #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///run/csi/csi.sock")]
        endpoint: String,
        #[command(subcommand)]
        cmd: csi::CsiCmd,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Ana {
    Optimized,
    NonOptimized,
    Inaccessible,
    PersistentLoss,
    Change,
}

#[derive(Subcommand)]
enum EngineCmd {
    /// Node name, version, listeners, pool capacity.
    Node,
    /// Pools on this node.
    Pool {
        #[command(subcommand)]
        cmd: storage::PoolCmd,
    },
    /// Replicas in this node's pools.
    Replica {
        #[command(subcommand)]
        cmd: storage::ReplicaCmd,
    },
    /// Snapshots and clones of replicas.
    Snapshot {
        #[command(subcommand)]
        cmd: storage::SnapshotCmd,
    },
    /// List subsystems with namespaces, hosts and controllers (JSON).
    Subsystems,
    /// Create a subsystem.
    CreateSubsystem {
        nqn: String,
        #[arg(long)]
        allow_any_host: bool,
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Delete a subsystem.
    DeleteSubsystem {
        nqn: String,
    },
    /// Add a memory or file namespace to a subsystem.
    AddNamespace {
        nqn: String,
        /// RAM namespace of this many bytes.
        #[arg(long, conflicts_with = "file")]
        memory: Option<u64>,
        /// File or block device.
        #[arg(long)]
        file: Option<String>,
        #[arg(long, default_value_t = 0)]
        size: u64,
        #[arg(long)]
        direct: bool,
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        #[arg(long, default_value_t = 0)]
        nsid: u32,
        #[arg(long, default_value = "")]
        uuid: String,
        #[arg(long, default_value_t = 1)]
        ana_group: u32,
    },
    /// Remove a namespace.
    RemoveNamespace {
        nqn: String,
        nsid: u32,
    },
    /// Allow a host NQN to connect to a subsystem.
    AllowHost {
        nqn: String,
        host: String,
    },
    /// Remove a host NQN from a subsystem's allow-list (its controllers are disconnected).
    DisallowHost {
        nqn: String,
        host: String,
    },
    /// Add a TCP listener.
    AddListener {
        address: String,
    },
    /// Remove a TCP listener by port id.
    RemoveListener {
        port_id: u32,
    },
    /// List nexuses with children, states and rebuilds.
    Nexuses,
    /// Create a nexus over child URIs (nvmf://IP:PORT/NQN or local:///NQN).
    CreateNexus {
        uuid: String,
        #[arg(required = true)]
        children: Vec<String>,
        /// Child I/O timeout in milliseconds (0 = default).
        #[arg(long, default_value_t = 0)]
        io_timeout_ms: u64,
        /// Rebuild bandwidth limit in bytes per second (0 = none).
        #[arg(long, default_value_t = 0)]
        rebuild_rate_limit: u64,
        /// Reserve the children (Exclusive Access) under this key (0 = no reservation).
        #[arg(long, default_value_t = 0)]
        reservation_key: u64,
        /// Preempt the reservation held under this key (the nexus being replaced).
        #[arg(long, default_value_t = 0)]
        preempt_key: u64,
        /// The volume's earlier nexus was killed: rebuild every child but the first in-sync one from it, in full.
        #[arg(long)]
        unclean_restart: bool,
        /// Fault a healthy child only once the engine's cluster agent confirms the nexus is still the volume's.
        #[arg(long)]
        confirm_faults: bool,
        /// The nexus's size in bytes, at most its smallest child's (0 = its smallest child's).
        #[arg(long, default_value_t = 0)]
        size_bytes: u64,
    },
    /// Crash-consistent snapshot of a volume on every healthy child.
    SnapshotNexus {
        uuid: String,
        snapshot_uuid: String,
    },
    /// Grow a nexus online once its children have grown; connected hosts are told.
    ResizeNexus {
        uuid: String,
        #[arg(value_parser = storage::size)]
        size: u64,
    },
    /// Stop a nexus's I/O for good (unpublished, I/O fails); destroy it later.
    ShutdownNexus {
        uuid: String,
    },
    /// Destroy a nexus (children keep their data).
    DestroyNexus {
        uuid: String,
    },
    /// Publish a nexus as nqn.2026-11.io.keelson:vol-<uuid>.
    PublishNexus {
        uuid: String,
        #[arg(long, default_value_t = 1)]
        ana_group: u32,
        #[arg(long)]
        allow_any_host: bool,
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    UnpublishNexus {
        uuid: String,
    },
    /// Add a child (it is rebuilt while I/O goes on).
    AddChild {
        uuid: String,
        uri: String,
    },
    RemoveChild {
        uuid: String,
        uri: String,
    },
    FaultChild {
        uuid: String,
        uri: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Set the ANA state of a group as seen through a port.
    SetAna {
        #[arg(long)]
        port: u32,
        #[arg(long, default_value_t = 1)]
        group: u32,
        #[arg(value_enum)]
        state: Ana,
    },
}

/// One line per nexus, then one per child and per past rebuild:
/// `nexus UUID STATE NQN size=BYTES` / `  child URI STATE [done/total] [reason]` / `  rebuild CHILD KIND ...`.
fn print_nexus(n: &pb::Nexus) {
    let state = pb::NexusState::try_from(n.state).map_or("unknown", |s| match s {
        pb::NexusState::Online => "online",
        pb::NexusState::Degraded => "degraded",
        pb::NexusState::Faulted => "faulted",
        pb::NexusState::Shutdown => "shutdown",
        pb::NexusState::Unspecified => "unknown",
    });
    let nqn = if n.nqn.is_empty() {
        "-"
    } else {
        n.nqn.as_str()
    };
    println!("nexus {} {state} {nqn} size={}", n.uuid, n.size_bytes);
    for c in &n.children {
        let st = pb::ChildState::try_from(c.state).map_or("unknown", |s| match s {
            pb::ChildState::Healthy => "healthy",
            pb::ChildState::Rebuilding => "rebuilding",
            pb::ChildState::Faulted => "faulted",
            pb::ChildState::Unspecified => "unknown",
        });
        let progress = if c.rebuild_total_bytes > 0 {
            format!(" {}/{}", c.rebuild_done_bytes, c.rebuild_total_bytes)
        } else {
            String::new()
        };
        let reason = if c.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.reason)
        };
        println!("  child {} {st}{progress}{reason}", c.uri);
    }
    for r in &n.rebuilds {
        let result = if r.error.is_empty() {
            "ok".to_string()
        } else {
            format!("failed: {}", r.error)
        };
        println!(
            "  rebuild {} {} copied={}/{} skipped={} ms={} {result}",
            r.child, r.kind, r.bytes_copied, r.bytes_total, r.bytes_skipped, r.duration_ms
        );
    }
}

fn print<T: std::fmt::Debug>(v: &T) {
    println!("{v:#?}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let (endpoint, cmd) = match Cli::parse().cmd {
        Top::Engine { endpoint, cmd } => (endpoint, cmd),
        Top::Get { agent, output, cmd } => return cluster::get(&agent, cmd, output).await,
        Top::Pool { agent, output, cmd } => return cluster::pool(&agent, cmd, output).await,
        Top::Volume { agent, output, cmd } => return cluster::volume(&agent, cmd, output).await,
        Top::Node { agent, output, cmd } => return cluster::node(&agent, cmd, output).await,
        Top::Host { agent, cmd } => return cluster::host(&agent, cmd).await,
        Top::Csi { endpoint, cmd } => return csi::run(&endpoint, cmd).await,
    };
    let mut c = EngineClient::connect(endpoint.clone())
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    match cmd {
        EngineCmd::Node => print(&c.get_node(pb::GetNodeRequest {}).await?.into_inner()),
        EngineCmd::Pool { cmd } => storage::pool(&mut c, cmd).await?,
        EngineCmd::Replica { cmd } => storage::replica(&mut c, cmd).await?,
        EngineCmd::Snapshot { cmd } => storage::snapshot(&mut c, cmd).await?,
        EngineCmd::Subsystems => print(
            &c.list_subsystems(pb::ListSubsystemsRequest {})
                .await?
                .into_inner(),
        ),
        EngineCmd::CreateSubsystem {
            nqn,
            allow_any_host,
            hosts,
        } => print(
            &c.create_subsystem(pb::CreateSubsystemRequest {
                nqn,
                allow_any_host,
                allowed_hosts: hosts,
                ..Default::default()
            })
            .await?
            .into_inner(),
        ),
        EngineCmd::DeleteSubsystem { nqn } => {
            c.delete_subsystem(pb::DeleteSubsystemRequest { nqn })
                .await?;
        }
        EngineCmd::AddNamespace {
            nqn,
            memory,
            file,
            size,
            direct,
            block_size,
            nsid,
            uuid,
            ana_group,
        } => {
            let kind = match (memory, file) {
                (Some(m), _) => pb::backend::Kind::Memory(pb::MemoryBackend { size_bytes: m }),
                (None, Some(path)) => pb::backend::Kind::File(pb::FileBackend {
                    path,
                    size_bytes: size,
                    direct,
                }),
                (None, None) => anyhow::bail!("give --memory BYTES or --file PATH"),
            };
            let backend = Some(pb::Backend {
                kind: Some(kind),
                block_size,
            });
            print(
                &c.add_namespace(pb::AddNamespaceRequest {
                    nqn,
                    nsid,
                    uuid,
                    ana_group,
                    backend,
                })
                .await?
                .into_inner(),
            );
        }
        EngineCmd::RemoveNamespace { nqn, nsid } => {
            c.remove_namespace(pb::RemoveNamespaceRequest { nqn, nsid })
                .await?;
        }
        EngineCmd::AllowHost { nqn, host } => {
            c.allow_host(pb::HostRequest {
                nqn,
                host_nqn: host,
            })
            .await?;
        }
        EngineCmd::DisallowHost { nqn, host } => {
            c.disallow_host(pb::HostRequest {
                nqn,
                host_nqn: host,
            })
            .await?;
        }
        EngineCmd::AddListener { address } => print(
            &c.add_listener(pb::AddListenerRequest {
                address,
                port_id: 0,
            })
            .await?
            .into_inner(),
        ),
        EngineCmd::RemoveListener { port_id } => {
            c.remove_listener(pb::RemoveListenerRequest { port_id })
                .await?;
        }
        EngineCmd::Nexuses => {
            for n in c
                .list_nexuses(pb::ListNexusesRequest {})
                .await?
                .into_inner()
                .nexuses
            {
                print_nexus(&n);
            }
        }
        EngineCmd::CreateNexus {
            uuid,
            children,
            io_timeout_ms,
            rebuild_rate_limit,
            reservation_key,
            preempt_key,
            unclean_restart,
            confirm_faults,
            size_bytes,
        } => print_nexus(
            &c.create_nexus(pb::CreateNexusRequest {
                uuid,
                children,
                io_timeout_ms,
                rebuild_rate_limit,
                reservation_key,
                preempt_key,
                unclean_restart,
                confirm_faults,
                size_bytes,
            })
            .await?
            .into_inner(),
        ),
        EngineCmd::SnapshotNexus {
            uuid,
            snapshot_uuid,
        } => {
            let r = c
                .snapshot_nexus(pb::SnapshotNexusRequest {
                    uuid,
                    snapshot_uuid,
                })
                .await?
                .into_inner();
            for child in r.children {
                println!("snapshot on {child}");
            }
        }
        EngineCmd::ResizeNexus { uuid, size } => print_nexus(
            &c.resize_nexus(pb::ResizeNexusRequest { uuid, size })
                .await?
                .into_inner(),
        ),
        EngineCmd::ShutdownNexus { uuid } => print_nexus(
            &c.shutdown_nexus(pb::ShutdownNexusRequest { uuid })
                .await?
                .into_inner(),
        ),
        EngineCmd::DestroyNexus { uuid } => {
            c.destroy_nexus(pb::DestroyNexusRequest { uuid }).await?;
        }
        EngineCmd::PublishNexus {
            uuid,
            ana_group,
            allow_any_host,
            hosts,
        } => print_nexus(
            &c.publish_nexus(pb::PublishNexusRequest {
                uuid,
                ana_group,
                allow_any_host,
                allowed_hosts: hosts,
            })
            .await?
            .into_inner(),
        ),
        EngineCmd::UnpublishNexus { uuid } => print_nexus(
            &c.unpublish_nexus(pb::UnpublishNexusRequest { uuid })
                .await?
                .into_inner(),
        ),
        EngineCmd::AddChild { uuid, uri } => print_nexus(
            &c.add_child(pb::ChildRequest {
                uuid,
                uri,
                reason: String::new(),
            })
            .await?
            .into_inner(),
        ),
        EngineCmd::RemoveChild { uuid, uri } => print_nexus(
            &c.remove_child(pb::ChildRequest {
                uuid,
                uri,
                reason: String::new(),
            })
            .await?
            .into_inner(),
        ),
        EngineCmd::FaultChild { uuid, uri, reason } => print_nexus(
            &c.fault_child(pb::ChildRequest { uuid, uri, reason })
                .await?
                .into_inner(),
        ),
        EngineCmd::SetAna { port, group, state } => {
            let state = match state {
                Ana::Optimized => pb::AnaState::Optimized,
                Ana::NonOptimized => pb::AnaState::NonOptimized,
                Ana::Inaccessible => pb::AnaState::Inaccessible,
                Ana::PersistentLoss => pb::AnaState::PersistentLoss,
                Ana::Change => pb::AnaState::Change,
            };
            c.set_ana_state(pb::SetAnaStateRequest {
                port_id: port,
                ana_group: group,
                state: state as i32,
            })
            .await?;
        }
    }
    Ok(())
}
