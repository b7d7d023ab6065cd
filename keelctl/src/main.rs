//! keelctl: Keelson's command-line client. `keelctl engine ...` talks to one io-engine's engine API.

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
    /// Node name, version, listeners.
    Node,
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
    DeleteSubsystem { nqn: String },
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
    RemoveNamespace { nqn: String, nsid: u32 },
    /// Allow a host NQN to connect to a subsystem.
    AllowHost { nqn: String, host: String },
    /// Remove a host NQN from a subsystem's allow-list (its controllers are disconnected).
    DisallowHost { nqn: String, host: String },
    /// Add a TCP listener.
    AddListener { address: String },
    /// Remove a TCP listener by port id.
    RemoveListener { port_id: u32 },
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

fn print<T: std::fmt::Debug>(v: &T) {
    println!("{v:#?}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let Cli {
        cmd: Top::Engine { endpoint, cmd },
    } = Cli::parse();
    let mut c = EngineClient::connect(endpoint.clone())
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    match cmd {
        EngineCmd::Node => print(&c.get_node(pb::GetNodeRequest {}).await?.into_inner()),
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
