//! `keelctl csi`: calls a CSI plugin's Identity and Node services on its Unix socket, as the kubelet would (for
//! debugging a node, and for the tests that run the node plugin next to a real kernel). A failed call prints
//! `error: <gRPC code>: <message>` and exits 1.

use std::collections::HashMap;

use anyhow::{Context, Result};
use clap::Subcommand;
use proto::csi::identity_client::IdentityClient;
use proto::csi::node_client::NodeClient;
use proto::csi::volume_capability::access_mode::Mode;
use proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use proto::csi::*;
use tonic::transport::Channel;

#[derive(Subcommand)]
pub enum CsiCmd {
    /// Plugin name, version and capabilities; the node's id and topology.
    Info,
    /// NodeStageVolume.
    Stage {
        volume: String,
        staging: String,
        /// The publish context (what ControllerPublishVolume answered).
        #[arg(long)]
        nqn: String,
        #[arg(long)]
        addresses: String,
        #[arg(long)]
        host_nqn: String,
        #[command(flatten)]
        cap: Cap,
    },
    /// NodeUnstageVolume.
    Unstage { volume: String, staging: String },
    /// NodePublishVolume.
    Publish {
        volume: String,
        staging: String,
        target: String,
        #[command(flatten)]
        cap: Cap,
    },
    /// NodeUnpublishVolume.
    Unpublish { volume: String, target: String },
    /// NodeGetVolumeStats.
    Stats { volume: String, path: String },
    /// NodeExpandVolume: the node sees the grown volume and grows its file system (after ControllerExpandVolume).
    Expand {
        volume: String,
        /// Where the volume is published (a directory, or a raw block volume's device file).
        path: String,
        #[arg(long, default_value = "")]
        staging: String,
        /// The size the controller gave, in bytes (0: whatever the device shows).
        #[arg(long, default_value_t = 0)]
        required: i64,
        /// A raw block volume.
        #[arg(long)]
        block: bool,
    },
}

#[derive(clap::Args)]
pub struct Cap {
    /// A raw block volume (else a mounted file system).
    #[arg(long)]
    block: bool,
    /// File system type of a mount volume (empty: the plugin's default).
    #[arg(long, default_value = "")]
    fs: String,
    /// Mount flags, e.g. noatime.
    #[arg(long = "mount-flag")]
    mount_flags: Vec<String>,
    /// Read-only: SINGLE_NODE_READER_ONLY (stage) / readonly (publish).
    #[arg(long)]
    read_only: bool,
}

impl Cap {
    fn capability(&self) -> VolumeCapability {
        let mode = if self.read_only {
            Mode::SingleNodeReaderOnly
        } else {
            Mode::SingleNodeWriter
        };
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(if self.block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: self.fs.clone(),
                    mount_flags: self.mount_flags.clone(),
                    ..Default::default()
                })
            }),
        }
    }
}

async fn connect(endpoint: &str) -> Result<Channel> {
    proto::unix::channel(endpoint)
        .await
        .with_context(|| format!("connecting to {endpoint}"))
}

fn answer<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<()> {
    match r {
        Ok(v) => {
            println!("{:#?}", v.into_inner());
            Ok(())
        }
        Err(s) => {
            println!("error: {:?}: {}", s.code(), s.message());
            std::process::exit(1)
        }
    }
}

pub async fn run(endpoint: &str, cmd: CsiCmd) -> Result<()> {
    let ch = connect(endpoint).await?;
    let mut node = NodeClient::new(ch.clone());
    match cmd {
        CsiCmd::Info => {
            let mut id = IdentityClient::new(ch);
            answer(id.get_plugin_info(GetPluginInfoRequest {}).await)?;
            answer(node.node_get_info(NodeGetInfoRequest {}).await)?;
            answer(
                node.node_get_capabilities(NodeGetCapabilitiesRequest {})
                    .await,
            )
        }
        CsiCmd::Stage {
            volume,
            staging,
            nqn,
            addresses,
            host_nqn,
            cap,
        } => {
            let publish_context: HashMap<String, String> = [
                ("nqn".to_string(), nqn),
                ("targetAddresses".to_string(), addresses),
                ("hostNqn".to_string(), host_nqn),
            ]
            .into();
            answer(
                node.node_stage_volume(NodeStageVolumeRequest {
                    volume_id: volume,
                    publish_context,
                    staging_target_path: staging,
                    volume_capability: Some(cap.capability()),
                    ..Default::default()
                })
                .await,
            )
        }
        CsiCmd::Unstage { volume, staging } => answer(
            node.node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume,
                staging_target_path: staging,
            })
            .await,
        ),
        CsiCmd::Publish {
            volume,
            staging,
            target,
            cap,
        } => answer(
            node.node_publish_volume(NodePublishVolumeRequest {
                volume_id: volume,
                staging_target_path: staging,
                target_path: target,
                readonly: cap.read_only,
                volume_capability: Some(cap.capability()),
                ..Default::default()
            })
            .await,
        ),
        CsiCmd::Unpublish { volume, target } => answer(
            node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume,
                target_path: target,
            })
            .await,
        ),
        CsiCmd::Expand {
            volume,
            path,
            staging,
            required,
            block,
        } => answer(
            node.node_expand_volume(NodeExpandVolumeRequest {
                volume_id: volume,
                volume_path: path,
                staging_target_path: staging,
                capacity_range: (required > 0).then_some(CapacityRange {
                    required_bytes: required,
                    limit_bytes: 0,
                }),
                volume_capability: Some(
                    Cap {
                        block,
                        fs: String::new(),
                        mount_flags: Vec::new(),
                        read_only: false,
                    }
                    .capability(),
                ),
                ..Default::default()
            })
            .await,
        ),
        CsiCmd::Stats { volume, path } => answer(
            node.node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: volume,
                volume_path: path,
                staging_target_path: String::new(),
            })
            .await,
        ),
    }
}
