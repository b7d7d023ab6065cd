//! The Node service, run on every node where pods mount volumes (next to the kernel): NodeStageVolume connects the
//! kernel to every address the controller's publish gave (native NVMe multipath), finds the device by the volume's
//! UUID, makes a file system only on a blank device and mounts it at the staging path; NodePublishVolume bind-mounts
//! it (or, for a raw block volume, the device node) where the pod wants it; NodeExpandVolume has the kernel rescan
//! the grown namespace and grows the mounted file system online. Every answer comes from what the node
//! can see (mountinfo, sysfs), so a restarted plugin picks up where the last one was. Calls that could wait for
//! I/O forever (unmounting a file system whose paths are gone) remove the paths first, so they fail instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::csi::node_server::Node;
use proto::csi::node_service_capability::rpc::Type as RpcType;
use proto::csi::node_service_capability::{Rpc, Type as CapType};
use proto::csi::volume_capability::access_mode::Mode;
use proto::csi::volume_capability::{AccessType, MountVolume};
use proto::csi::*;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::kernel::Kernel;
use crate::mounts::{self, Content};
use crate::params;
use crate::serial::InFlight;

/// How long a staged volume's device may take to appear after its connect.
const DEVICE_WAIT: Duration = Duration::from_secs(20);

pub struct NodeService {
    node: String,
    max_volumes: i64,
    kernel: Arc<Kernel>,
    inflight: InFlight,
}

impl NodeService {
    pub fn new(node: String, max_volumes: i64, kernel: Kernel) -> NodeService {
        NodeService {
            node,
            max_volumes,
            kernel: Arc::new(kernel),
            inflight: InFlight::default(),
        }
    }
}

fn invalid(what: impl Into<String>) -> Status {
    Status::invalid_argument(what.into())
}

fn required(v: &str, field: &str) -> Result<PathBuf, Status> {
    if v.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    Ok(PathBuf::from(v))
}

fn volume(id: &str) -> Result<Uuid, Status> {
    if id.is_empty() {
        return Err(invalid("volume_id is required"));
    }
    Uuid::parse_str(id).map_err(|_| Status::not_found(format!("no volume {id:?}")))
}

fn capability(c: Option<&VolumeCapability>) -> Result<VolumeCapability, Status> {
    let c = c.ok_or_else(|| invalid("volume_capability is required"))?;
    params::check_capability(c).map_err(invalid)?;
    Ok(c.clone())
}

fn read_only_mode(c: &VolumeCapability) -> bool {
    c.access_mode
        .as_ref()
        .is_some_and(|m| m.mode == Mode::SingleNodeReaderOnly as i32)
}

/// Runs blocking work (syscalls, tools) off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("node task failed: {e}")))?
}

/// What NodeStageVolume needs, taken from the request.
struct Stage {
    uuid: Uuid,
    nqn: String,
    addresses: Vec<String>,
    host_nqn: String,
    staging: PathBuf,
    cap: VolumeCapability,
    fs_default: Option<String>,
}

fn stage(k: &Kernel, s: Stage) -> Result<(), Status> {
    match std::fs::metadata(&s.staging) {
        Ok(m) if !m.is_dir() => {
            return Err(invalid(format!(
                "staging_target_path {} is not a directory",
                s.staging.display()
            )));
        }
        Ok(_) => {}
        Err(_) => std::fs::create_dir_all(&s.staging)
            .map_err(|e| Status::internal(format!("creating {}: {e}", s.staging.display())))?,
    }
    let mount = match &s.cap.access_type {
        Some(AccessType::Mount(m)) => Some(m.clone()),
        _ => None,
    };
    let fs = mount
        .as_ref()
        .map(|m| m.fs_type.clone())
        .filter(|f| !f.is_empty())
        .or(s.fs_default.clone())
        .unwrap_or_else(|| "ext4".into());
    let staged = mounts::at(&s.staging);
    // Already staged (a retry, or a restarted plugin): the same volume the same way is done, anything else is not.
    if let Some(m) = &staged {
        let dev = k.device(&s.uuid.to_string());
        let same_device = dev.as_ref().is_some_and(|d| d.dev == m.dev);
        return match (&mount, same_device) {
            (Some(_), true) if m.fs_type == fs && m.read_only() == read_only_mode(&s.cap) => Ok(()),
            (Some(_), true) => Err(Status::already_exists(format!(
                "volume {} is staged at {} as {} ({}); asked for {fs}{}",
                s.uuid,
                s.staging.display(),
                m.fs_type,
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                },
                if read_only_mode(&s.cap) {
                    ", read-only"
                } else {
                    ""
                }
            ))),
            (None, true) => Err(Status::already_exists(format!(
                "volume {} is staged at {} as a file system; asked for a raw block volume",
                s.uuid,
                s.staging.display()
            ))),
            (_, false) => Err(Status::already_exists(format!(
                "{} has another device mounted ({})",
                s.staging.display(),
                m.source
            ))),
        };
    }
    let errors = k
        .connect(&s.nqn, &s.addresses, &s.host_nqn)
        .map_err(|e| Status::unavailable(format!("connecting volume {}: {e}", s.uuid)))?;
    if !errors.is_empty() {
        tracing::warn!(volume = %s.uuid, ?errors, "some paths did not connect");
    }
    let dev = k
        .wait_device(&s.uuid.to_string(), DEVICE_WAIT)
        .ok_or_else(|| {
            Status::unavailable(format!(
                "connected to {}, but the kernel shows no namespace with UUID {} (paths: {})",
                s.nqn,
                s.uuid,
                k.paths(&s.nqn)
            ))
        })?;
    let Some(MountVolume { mount_flags, .. }) = mount else {
        tracing::info!(volume = %s.uuid, device = %dev.path.display(), "staged a raw block volume");
        return Ok(());
    };
    match mounts::probe(&dev.path)
        .map_err(|e| Status::internal(format!("reading {}: {e}", dev.path.display())))?
    {
        Content::Blank => {
            tracing::info!(volume = %s.uuid, device = %dev.path.display(), fs, "making a file system on a blank volume");
            mounts::mkfs(&fs, &dev.path).map_err(Status::internal)?;
        }
        Content::Fs(have) if have == fs => {}
        Content::Fs(have) => {
            return Err(Status::failed_precondition(format!(
                "volume {} holds an {have} file system; asked for {fs} (it is never reformatted)",
                s.uuid
            )));
        }
        Content::Unknown => {
            return Err(Status::failed_precondition(format!(
                "volume {} holds data that is neither an ext4 nor an xfs file system; it is not formatted",
                s.uuid
            )));
        }
    }
    let mut opts = mount_flags;
    if read_only_mode(&s.cap) {
        opts.push("ro".into());
    }
    mounts::mount(&dev.path.to_string_lossy(), &s.staging, &fs, &opts).map_err(Status::internal)?;
    // Neither secrets nor the paths the CO chose are logged: the volume and device say what happened.
    tracing::info!(volume = %s.uuid, device = %dev.path.display(), fs, "staged");
    Ok(())
}

fn unstage(k: &Kernel, uuid: Uuid, staging: &Path) -> Result<(), Status> {
    let nqn = proto::names::volume_nqn(&uuid.to_string());
    if mounts::at(staging).is_some() {
        // With no live path, unmounting would wait for I/O that never completes: remove the paths first.
        if !k.live(&nqn) {
            tracing::warn!(volume = %uuid, paths = %k.paths(&nqn), "no live path: disconnecting before the unmount");
            k.disconnect(&nqn).map_err(Status::internal)?;
        }
        if let Err(e) = mounts::umount(staging, Duration::from_secs(60)) {
            tracing::warn!(volume = %uuid, error = %e, "unmount failed; disconnecting and detaching lazily");
            k.disconnect(&nqn).map_err(Status::internal)?;
            mounts::run(
                "umount",
                &["-l", &staging.to_string_lossy()],
                Duration::from_secs(30),
            )
            .map_err(Status::internal)?;
        }
    }
    let n = k.disconnect(&nqn).map_err(Status::internal)?;
    tracing::info!(volume = %uuid, paths = n, "unstaged");
    Ok(())
}

fn publish(
    k: &Kernel,
    uuid: Uuid,
    staging: &Path,
    target: &Path,
    cap: &VolumeCapability,
    readonly: bool,
) -> Result<(), Status> {
    let ro = readonly || read_only_mode(cap);
    let block = matches!(cap.access_type, Some(AccessType::Block(_)));
    let source = if block {
        k.device(&uuid.to_string())
            .filter(|d| d.path.exists())
            .ok_or_else(|| {
                Status::failed_precondition(format!("volume {uuid} is not staged on this node"))
            })?
            .path
    } else {
        if mounts::at(staging).is_none() {
            return Err(Status::failed_precondition(format!(
                "volume {uuid} is not staged at {}",
                staging.display()
            )));
        }
        staging.to_path_buf()
    };
    if let Some(m) = mounts::at(target) {
        return if m.read_only() == ro {
            Ok(())
        } else {
            Err(Status::already_exists(format!(
                "{} is published {}",
                target.display(),
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                }
            )))
        };
    }
    let made = if block {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map(drop)
    } else {
        std::fs::create_dir_all(target)
    };
    made.map_err(|e| Status::internal(format!("creating {}: {e}", target.display())))?;
    mounts::mount(&source.to_string_lossy(), target, "", &["bind".into()])
        .map_err(Status::internal)?;
    if ro {
        mounts::run(
            "mount",
            &["-o", "remount,bind,ro", &target.to_string_lossy()],
            Duration::from_secs(60),
        )
        .map_err(Status::internal)?;
    }
    tracing::info!(volume = %uuid, ro, block, "published");
    Ok(())
}

fn unpublish(uuid: Uuid, target: &Path) -> Result<(), Status> {
    while mounts::at(target).is_some() {
        mounts::umount(target, Duration::from_secs(60)).map_err(Status::internal)?;
    }
    let removed = match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    removed.map_err(|e| Status::internal(format!("removing {}: {e}", target.display())))?;
    tracing::info!(volume = %uuid, "unpublished");
    Ok(())
}

/// After the controller grew the volume: the kernel rescans it, and a mounted file system grows to fill it.
/// Returns the device's size.
fn expand(
    k: &Kernel,
    uuid: Uuid,
    path: &Path,
    staging: Option<&Path>,
    want: u64,
) -> Result<u64, Status> {
    let meta = std::fs::metadata(path)
        .map_err(|_| Status::not_found(format!("{} does not exist", path.display())))?;
    let nqn = proto::names::volume_nqn(&uuid.to_string());
    let before = k
        .device(&uuid.to_string())
        .ok_or_else(|| Status::not_found(format!("volume {uuid} has no device on this node")))?;
    // A file system volume: the mount at the path must be this volume's.
    let mount = if meta.is_dir() {
        let m = mounts::at(path).ok_or_else(|| {
            Status::not_found(format!(
                "volume {uuid} is not mounted at {}",
                path.display()
            ))
        })?;
        if m.dev != before.dev {
            return Err(Status::not_found(format!(
                "{} holds another device ({}), not volume {uuid}",
                path.display(),
                m.source
            )));
        }
        Some(m)
    } else {
        None
    };
    let dev = k
        .rescan(&nqn, &uuid.to_string(), want, DEVICE_WAIT)
        .map_err(|e| Status::unavailable(format!("rescanning volume {uuid}: {e}")))?;
    if dev.size_bytes < want {
        return Err(Status::unavailable(format!(
            "volume {uuid}'s device is {} bytes, not yet the {want} asked for (paths: {})",
            dev.size_bytes,
            k.paths(&nqn)
        )));
    }
    if let Some(m) = mount {
        // The staging mount is the whole file system; the published path is a bind of it.
        let at = staging
            .filter(|s| mounts::at(s).is_some_and(|s| s.dev == m.dev))
            .unwrap_or(path);
        mounts::grow_fs(&m.fs_type, &dev.path, at).map_err(Status::internal)?;
        tracing::info!(volume = %uuid, fs = %m.fs_type, from = before.size_bytes, to = dev.size_bytes, "file system grown");
    }
    Ok(dev.size_bytes)
}

fn stats(k: &Kernel, uuid: Uuid, path: &Path) -> Result<NodeGetVolumeStatsResponse, Status> {
    let meta = std::fs::metadata(path)
        .map_err(|_| Status::not_found(format!("{} does not exist", path.display())))?;
    let nqn = proto::names::volume_nqn(&uuid.to_string());
    let usage = if meta.is_dir() {
        if mounts::at(path).is_none() {
            return Err(Status::not_found(format!(
                "volume {uuid} is not mounted at {}",
                path.display()
            )));
        }
        let s = nix::sys::statvfs::statvfs(path)
            .map_err(|e| Status::internal(format!("statvfs {}: {e}", path.display())))?;
        let frag = s.fragment_size() as i64;
        vec![
            VolumeUsage {
                available: s.blocks_available() as i64 * frag,
                total: s.blocks() as i64 * frag,
                used: (s.blocks() - s.blocks_free()) as i64 * frag,
                unit: volume_usage::Unit::Bytes as i32,
            },
            VolumeUsage {
                available: s.files_available() as i64,
                total: s.files() as i64,
                used: (s.files() - s.files_free()) as i64,
                unit: volume_usage::Unit::Inodes as i32,
            },
        ]
    } else {
        let d = k.device(&uuid.to_string()).ok_or_else(|| {
            Status::not_found(format!("volume {uuid} has no device on this node"))
        })?;
        vec![VolumeUsage {
            available: 0,
            total: d.size_bytes as i64,
            used: 0,
            unit: volume_usage::Unit::Bytes as i32,
        }]
    };
    let live = k.live(&nqn);
    Ok(NodeGetVolumeStatsResponse {
        usage,
        volume_condition: Some(VolumeCondition {
            abnormal: !live,
            message: if live {
                format!("paths: {}", k.paths(&nqn))
            } else {
                format!("no live path to the volume (paths: {})", k.paths(&nqn))
            },
        }),
    })
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let uuid = volume(&r.volume_id)?;
        let staging = required(&r.staging_target_path, "staging_target_path")?;
        let cap = capability(r.volume_capability.as_ref())?;
        let ctx: &HashMap<String, String> = &r.publish_context;
        let get = |k: &str| {
            ctx.get(k).filter(|v| !v.is_empty()).cloned().ok_or_else(|| {
                invalid(format!(
                    "publish_context lacks {k:?}: was the volume published to this node (ControllerPublishVolume)?"
                ))
            })
        };
        let s = Stage {
            uuid,
            nqn: get("nqn")?,
            addresses: get("targetAddresses")?
                .split(',')
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect(),
            host_nqn: get("hostNqn")?,
            staging,
            cap,
            fs_default: r.volume_context.get("fsType").cloned(),
        };
        if s.nqn != proto::names::volume_nqn(&uuid.to_string()) {
            return Err(invalid(format!(
                "publish_context's nqn {} is not volume {uuid}'s",
                s.nqn
            )));
        }
        let _held = self.inflight.hold(&uuid.to_string())?;
        let k = self.kernel.clone();
        blocking(move || stage(&k, s)).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let uuid = volume(&r.volume_id)?;
        let staging = required(&r.staging_target_path, "staging_target_path")?;
        let _held = self.inflight.hold(&uuid.to_string())?;
        let k = self.kernel.clone();
        blocking(move || unstage(&k, uuid, &staging)).await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let uuid = volume(&r.volume_id)?;
        let staging = required(&r.staging_target_path, "staging_target_path")?;
        let target = required(&r.target_path, "target_path")?;
        let cap = capability(r.volume_capability.as_ref())?;
        let _held = self.inflight.hold(&uuid.to_string())?;
        let k = self.kernel.clone();
        blocking(move || publish(&k, uuid, &staging, &target, &cap, r.readonly)).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let uuid = volume(&r.volume_id)?;
        let target = required(&r.target_path, "target_path")?;
        let _held = self.inflight.hold(&uuid.to_string())?;
        blocking(move || unpublish(uuid, &target)).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let uuid = volume(&r.volume_id)?;
        let path = required(&r.volume_path, "volume_path")?;
        let k = self.kernel.clone();
        Ok(Response::new(
            blocking(move || stats(&k, uuid, &path)).await?,
        ))
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let uuid = volume(&r.volume_id)?;
        let path = required(&r.volume_path, "volume_path")?;
        if let Some(c) = &r.volume_capability {
            params::check_capability(c).map_err(invalid)?;
        }
        let want = match &r.capacity_range {
            Some(c) if c.required_bytes < 0 || c.limit_bytes < 0 => {
                return Err(invalid("capacity_range: negative bytes"));
            }
            Some(c) => c.required_bytes as u64,
            None => 0,
        };
        let staging =
            (!r.staging_target_path.is_empty()).then(|| PathBuf::from(&r.staging_target_path));
        let _held = self.inflight.hold(&uuid.to_string())?;
        let k = self.kernel.clone();
        let size = blocking(move || expand(&k, uuid, &path, staging.as_deref(), want)).await?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            RpcType::StageUnstageVolume,
            RpcType::GetVolumeStats,
            RpcType::VolumeCondition,
            RpcType::SingleNodeMultiWriter,
            RpcType::ExpandVolume,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node.clone(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: Some(Topology {
                segments: [(
                    proto::names::TOPOLOGY_NODE_KEY.to_string(),
                    self.node.clone(),
                )]
                .into(),
            }),
        }))
    }
}
