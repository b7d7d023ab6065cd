//! The Node service, run on every node where pods mount volumes (next to the kernel): NodeStageVolume connects the
//! kernel to every address of the volume's target (native NVMe multipath: where the cluster agent says it is now,
//! else where the controller's publish context says it was), finds the device by the volume's
//! UUID, makes a file system only on a blank device and mounts it at the staging path; NodePublishVolume bind-mounts
//! it (or, for a raw block volume, the device node) where the pod wants it; NodeExpandVolume has the kernel rescan
//! the grown namespace and grows the mounted file system online. Every answer comes from what the node
//! can see (mountinfo, sysfs), so a restarted plugin picks up where the last one was. Calls that could wait for
//! I/O forever (unmounting a file system whose paths are gone: after 20 s without a live path, time for a
//! switch-over to connect one) remove the paths first, so they fail instead; the
//! first read of a staged device gives up after 60 s (UNAVAILABLE), one read per device at a time.
//!
//! The plugin runs as root on paths and a publish context the CO sends, so it trusts neither: every path is
//! absolute without `..`; the publish context's host NQN and addresses cannot add options to the kernel's connect;
//! a mount is this volume's only when it is the file system on the volume's device or the volume's device node
//! (the device found by UUID in sysfs). Publish binds only this volume's staging mount; unpublish takes down only
//! this volume's mounts and removes only what publish makes (an empty directory or file); unstage unmounts only this
//! volume's staging mount, and keeps the volume's paths when nothing of it is at the staging path it was given but it
//! is mounted elsewhere. Mounts of a device that is gone (paths removed by hand) are taken off, so pods can end.
//!
//! Files: `request` (checks of what the CO sends), `belongs` (whether a mount is a volume's), `stage`, `publish`,
//! `expand` (and stats); this file holds the gRPC service.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
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

use crate::agent::Agent;
use crate::kernel::{Device, Kernel};
use crate::mounts::{self, Content, Mount, Mounts};
use crate::params;
use crate::serial::{Held, InFlight};

mod belongs;
mod expand;
mod publish;
mod request;
mod stage;
#[cfg(test)]
mod tests;

use belongs::*;
use expand::*;
use publish::*;
use request::*;
use stage::*;

/// How long a staged volume's device may take to appear after its connect.
const DEVICE_WAIT: Duration = Duration::from_secs(20);

pub struct NodeService {
    node: String,
    max_volumes: i64,
    kernel: Arc<Kernel>,
    mounts: Arc<Mounts>,
    inflight: InFlight,
    /// Devices whose first read has not answered yet (`mounts::probe_within`).
    probing: mounts::Probing,
    /// The cluster agent, asked where a volume's target is now when it is staged (see [`NodeService::current`]).
    agent: Option<Arc<Agent>>,
    /// How long unstages wait for a live path before they give up the page cache's data (see `stage::unstage`).
    unstage_wait: Arc<UnstageWait>,
    /// Where SINGLE_NODE_SINGLE_WRITER volumes are published.
    sole_writers: Arc<SoleWriters>,
}

/// How long an unstage call waits for a live path by default: a target's switch-over takes seconds.
pub const LIVE_WAIT: Duration = Duration::from_secs(20);

/// How long, from the first unstage of a volume that found no live path, its unstages answer UNAVAILABLE (the CO
/// retries) before one gives up what the page cache holds for it and disconnects: a switch-over that waits for a
/// new cluster agent leader takes longer than one call's wait.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(300);

impl NodeService {
    /// The node service of node `node`, on `kernel`'s NVMe/TCP host and `mounts`' mount table.
    pub fn new(node: String, max_volumes: i64, kernel: Kernel, mounts: Mounts) -> NodeService {
        NodeService {
            node,
            max_volumes,
            kernel: Arc::new(kernel),
            mounts: Arc::new(mounts),
            inflight: InFlight::default(),
            probing: mounts::Probing::default(),
            agent: None,
            unstage_wait: Arc::new(UnstageWait::new(LIVE_WAIT, GIVE_UP_AFTER)),
            sole_writers: Arc::default(),
        }
    }

    /// The node service whose unstages wait `wait` for a live path per call, and give up the page cache's data
    /// `give_up` after the first call that found none.
    pub fn with_live_wait(mut self, wait: Duration, give_up: Duration) -> NodeService {
        self.unstage_wait = Arc::new(UnstageWait::new(wait, give_up));
        self
    }

    /// The node service keeping where single-writer volumes are published in `file` too (see [`SoleWriters`]), so
    /// that a restarted plugin still knows them.
    pub fn with_sole_writers_file(mut self, file: PathBuf) -> NodeService {
        self.sole_writers = Arc::new(SoleWriters::kept_in(file));
        self
    }

    /// A new service over the same kernel and mount table, as the plugin restarted would be: nothing of this one's
    /// memory, its single-writer file (if any) read again.
    #[cfg(test)]
    fn restarted(&self) -> NodeService {
        NodeService {
            node: self.node.clone(),
            max_volumes: self.max_volumes,
            kernel: self.kernel.clone(),
            mounts: self.mounts.clone(),
            inflight: InFlight::default(),
            probing: mounts::Probing::default(),
            agent: self.agent.clone(),
            unstage_wait: self.unstage_wait.clone(),
            sole_writers: Arc::new(match &self.sole_writers.file {
                Some(f) => SoleWriters::kept_in(f.clone()),
                None => SoleWriters::default(),
            }),
        }
    }

    /// The node service asking `agent` where volumes' targets are when it stages them.
    pub fn with_agent(mut self, agent: Arc<Agent>) -> NodeService {
        self.agent = Some(agent);
        self
    }

    /// The target addresses to stage volume `uuid` from: those of its nexus now, by the cluster agent, when it is
    /// published to `host_nqn` there. The publish context (`given`) was written when the CO published the volume,
    /// and the target may have moved since (a switch-over, a drained node): the CO does not publish again while
    /// the volume stays attached, so a node that reboots, or stages the volume again, would connect to a target
    /// that is gone. The context's addresses when the agent does not answer within [`AGENT_WAIT`] or does not
    /// know better.
    async fn current(&self, uuid: Uuid, host_nqn: &str, given: Vec<String>) -> Vec<String> {
        let Some(agent) = &self.agent else {
            return given;
        };
        let ask = agent.call(|mut c| async move {
            c.get_volume(proto::cluster::GetVolumeRequest {
                uuid: uuid.to_string(),
            })
            .await
        });
        let v = match tokio::time::timeout(AGENT_WAIT, ask).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(volume = %uuid, error = %e.message(), "the cluster agent did not say where the volume's target is: staging from the publish context");
                return given;
            }
            Err(_) => {
                tracing::warn!(volume = %uuid, "the cluster agent did not answer in time: staging from the publish context");
                return given;
            }
        };
        let now = addresses_now(&v, host_nqn);
        match now {
            Some(now) if now != given => {
                tracing::info!(volume = %uuid, was = ?given, ?now, "the volume's target moved since it was published: staging from where it is now");
                now
            }
            _ => given,
        }
    }
}

/// The target addresses of volume `v` as the cluster agent has it, if it is published to `host_nqn` with addresses
/// fit for the kernel's connect options.
fn addresses_now(v: &proto::cluster::Volume, host_nqn: &str) -> Option<Vec<String>> {
    let published_here = v.host_nqn == host_nqn || v.host_nqns.iter().any(|h| h == host_nqn);
    let usable = !v.target_addresses.is_empty()
        && v.target_addresses.len() <= MAX_ADDRESSES
        && v.target_addresses
            .iter()
            .all(|a| option_value(a, "targetAddresses").is_ok());
    (published_here && usable).then(|| v.target_addresses.clone())
}

/// How long NodeStageVolume waits for the cluster agent to say where a volume's target is.
const AGENT_WAIT: Duration = Duration::from_secs(5);

/// Runs blocking work (syscalls, tools) off the runtime's threads. `held`, the volume's turn, goes with the work:
/// a call the CO gives up on (its deadline) leaves the work running, and the CO's retry must not run beside it.
async fn blocking<T: Send + 'static>(
    held: Option<Held>,
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(move || {
        let _held = held;
        f()
    })
    .await
    .map_err(|e| Status::internal(format!("node task failed: {e}")))?
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
        let (nqn, given, host_nqn) = context(&r.publish_context, uuid)?;
        let held = self.inflight.hold(&uuid.to_string())?;
        let addresses = self.current(uuid, &host_nqn, given).await;
        let s = Stage {
            uuid,
            nqn,
            addresses,
            host_nqn,
            staging,
            cap,
            fs_default: r.volume_context.get("fsType").cloned(),
            probing: self.probing.clone(),
        };
        let (k, mt) = (self.kernel.clone(), self.mounts.clone());
        blocking(Some(held), move || stage(&k, &mt, s)).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let uuid = volume(&r.volume_id)?;
        let staging = required(&r.staging_target_path, "staging_target_path")?;
        let held = self.inflight.hold(&uuid.to_string())?;
        let (k, mt, wait) = (
            self.kernel.clone(),
            self.mounts.clone(),
            self.unstage_wait.clone(),
        );
        blocking(Some(held), move || unstage(&k, &mt, uuid, &staging, &wait)).await?;
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
        let held = self.inflight.hold(&uuid.to_string())?;
        let (k, mt, sole) = (
            self.kernel.clone(),
            self.mounts.clone(),
            self.sole_writers.clone(),
        );
        blocking(Some(held), move || {
            publish(&k, &mt, &sole, uuid, &staging, &target, &cap, r.readonly)
        })
        .await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let uuid = volume(&r.volume_id)?;
        let target = required(&r.target_path, "target_path")?;
        let held = self.inflight.hold(&uuid.to_string())?;
        let (k, mt, sole) = (
            self.kernel.clone(),
            self.mounts.clone(),
            self.sole_writers.clone(),
        );
        blocking(Some(held), move || unpublish(&k, &mt, &sole, uuid, &target)).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let uuid = volume(&r.volume_id)?;
        let path = required(&r.volume_path, "volume_path")?;
        let (k, mt) = (self.kernel.clone(), self.mounts.clone());
        Ok(Response::new(
            blocking(None, move || stats(&k, &mt, uuid, &path)).await?,
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
        let staging = match r.staging_target_path.as_str() {
            "" => None,
            s => Some(required(s, "staging_target_path")?),
        };
        let held = self.inflight.hold(&uuid.to_string())?;
        let (k, mt) = (self.kernel.clone(), self.mounts.clone());
        let size = blocking(Some(held), move || {
            expand(&k, &mt, uuid, &path, staging.as_deref(), want, DEVICE_WAIT)
        })
        .await?;
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
                    proto::names::topology_node_value(&self.node),
                )]
                .into(),
            }),
        }))
    }
}
