//! The Controller service: CSI's volume and snapshot calls on the cluster agent's API. Each call checks what the
//! spec requires of its request first (INVALID_ARGUMENT naming the field), holds its volume or snapshot for its
//! whole run (ABORTED for a concurrent one), and answers what the spec says for each case: the same volume for a
//! repeated CreateVolume, success for deleting what is gone, NOT_FOUND for ids never created.

use std::collections::HashMap;
use std::sync::Arc;

use proto::cluster as pb;
use proto::csi::controller_server::Controller;
use proto::csi::controller_service_capability::rpc::Type as RpcType;
use proto::csi::controller_service_capability::{Rpc, Type as CapType};
use proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use proto::csi::*;
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use crate::agent::Agent;
use crate::names::{self, MAX_NAME};
use crate::params::{self, ClassParams};
use crate::serial::InFlight;

/// Size of a volume whose request gives no capacity.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Volume sizes are multiples of this: the largest pool block (a 4Kn disk's), so a volume fits pools of either block
/// size and a claim such as `1.5G` (not a whole number of 4096-byte blocks) is rounded up, not refused.
pub const SIZE_ALIGN: u64 = 4096;

pub struct ControllerService {
    agent: Arc<Agent>,
    inflight: InFlight,
}

impl ControllerService {
    pub fn new(agent: Arc<Agent>) -> ControllerService {
        ControllerService {
            agent,
            inflight: InFlight::default(),
        }
    }

    async fn get(&self, uuid: Uuid) -> Result<Option<pb::Volume>, Status> {
        let id = uuid.to_string();
        match self
            .agent
            .call(|mut c| {
                let uuid = id.clone();
                async move { c.get_volume(pb::GetVolumeRequest { uuid }).await }
            })
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(agent_error(s)),
        }
    }

    async fn snapshots(&self, volume: String) -> Result<Vec<pb::VolumeSnapshot>, Status> {
        self.agent
            .call(|mut c| {
                let volume = volume.clone();
                async move { c.list_snapshots(pb::ListSnapshotsRequest { volume }).await }
            })
            .await
            .map(|r| r.snapshots)
            .map_err(agent_error)
    }

    async fn capacity(
        &self,
        req: pb::GetCapacityRequest,
    ) -> Result<pb::GetCapacityResponse, Status> {
        self.agent
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_capacity(req).await }
            })
            .await
            .map_err(agent_error)
    }

    /// The cluster agent's ExpandVolume of `uuid` to `size` bytes, its refusal as it gave it.
    async fn expand(&self, uuid: Uuid, size: u64) -> Result<pb::Volume, Status> {
        self.agent
            .call(|mut c| {
                let req = pb::ExpandVolumeRequest {
                    uuid: uuid.to_string(),
                    size_bytes: size,
                };
                async move { c.expand_volume(req).await }
            })
            .await
    }

    /// The source's size and the cluster request's source fields, for a volume made from a snapshot or volume.
    async fn source(&self, src: &VolumeContentSource) -> Result<(u64, String, String), Status> {
        match &src.r#type {
            Some(SourceType::Snapshot(SnapshotSource { snapshot_id })) => {
                let Ok(id) = Uuid::parse_str(snapshot_id) else {
                    return Err(Status::not_found(format!("no snapshot {snapshot_id:?}")));
                };
                let s = self
                    .snapshots(String::new())
                    .await?
                    .into_iter()
                    .find(|s| s.uuid == id.to_string())
                    .ok_or_else(|| Status::not_found(format!("no snapshot {snapshot_id}")))?;
                if !s.ready {
                    return Err(Status::unavailable(format!(
                        "snapshot {snapshot_id} is not ready yet"
                    )));
                }
                Ok((s.size_bytes, id.to_string(), String::new()))
            }
            Some(SourceType::Volume(VolumeSource { volume_id })) => {
                let v = match Uuid::parse_str(volume_id) {
                    Ok(id) => self.get(id).await?,
                    Err(_) => None,
                };
                let v = v.ok_or_else(|| Status::not_found(format!("no volume {volume_id:?}")))?;
                Ok((v.size_bytes, String::new(), v.uuid))
            }
            None => Err(Status::invalid_argument(
                "volume_content_source names neither a snapshot nor a volume",
            )),
        }
    }
}

fn invalid(what: impl Into<String>) -> Status {
    Status::invalid_argument(what.into())
}

/// A cluster agent error as the CO sees it: same code, saying where it came from.
/// The size a volume had before any growth under way: what a volume made from a source has until it is grown to its
/// claim's size (one grown already, and growing again, was handed out).
fn made_size(v: &pb::Volume) -> u64 {
    if v.expanding_from_bytes != 0 {
        v.expanding_from_bytes
    } else {
        v.size_bytes
    }
}

/// The CreateVolume answer for the cluster agent's refusal `s`. NOT_FOUND tells a CO the volume's source does not
/// exist, which it takes as final: for a volume without a source it can only be something the agent met on the way
/// (a chosen pool not imported yet after its engine restarted), and the call is to be tried again (UNAVAILABLE).
fn create_error(name: &str, s: Status, sourced: bool) -> Status {
    match s.code() {
        Code::AlreadyExists => Status::already_exists(format!(
            "volume {name} exists with another size, replica count, placement, source or file system: {}",
            s.message()
        )),
        Code::NotFound if !sourced => {
            Status::unavailable(format!("cluster agent: {} (try again)", s.message()))
        }
        _ => agent_error(s),
    }
}

fn agent_error(s: Status) -> Status {
    Status::new(s.code(), format!("cluster agent: {}", s.message()))
}

fn required<'a>(v: &'a str, field: &str) -> Result<&'a str, Status> {
    required_within(v, field, MAX_NAME)
}

fn required_within<'a>(v: &'a str, field: &str, max: usize) -> Result<&'a str, Status> {
    if v.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    if v.len() > max {
        return Err(invalid(format!(
            "{field} is {} bytes; at most {max}",
            v.len()
        )));
    }
    Ok(v)
}

/// A volume id as a UUID; ids that are not UUIDs were never created (`None`).
fn volume_id(id: &str) -> Result<Option<Uuid>, Status> {
    required(id, "volume_id")?;
    Ok(Uuid::parse_str(id).ok())
}

/// The size to provision for `range`: the required bytes rounded up to the block, else the default (or the
/// limit, if smaller); OUT_OF_RANGE when no size fits. A range must set one of its bounds (the spec says so).
pub fn size_for(range: Option<&CapacityRange>) -> Result<u64, Status> {
    let Some(r) = range else {
        return Ok(DEFAULT_SIZE);
    };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(invalid("capacity_range: negative bytes"));
    }
    let (req, limit) = (r.required_bytes as u64, r.limit_bytes as u64);
    if limit > 0 && limit < req {
        return Err(invalid(format!(
            "capacity_range: limit_bytes {limit} is below required_bytes {req}"
        )));
    }
    let size = match (req, limit) {
        (0, 0) => {
            return Err(invalid(
                "capacity_range sets neither required_bytes nor limit_bytes",
            ));
        }
        (0, l) => DEFAULT_SIZE.min(l / SIZE_ALIGN * SIZE_ALIGN),
        (r, _) => r.div_ceil(SIZE_ALIGN) * SIZE_ALIGN,
    };
    if size == 0 || (limit > 0 && size > limit) {
        return Err(Status::out_of_range(format!(
            "no volume size fits required {req} / limit {limit} bytes (sizes are multiples of {SIZE_ALIGN})"
        )));
    }
    Ok(size)
}

/// The nodes the volume is published to (one, or several for a multi-node raw block volume).
fn published_nodes(v: &pb::Volume) -> Vec<String> {
    v.host_nqns
        .iter()
        .filter_map(|h| names::node_of_host(h).map(str::to_string))
        .collect()
}

/// Abnormal while Degraded or Faulted, or published without a nexus serving it.
fn condition(v: &pb::Volume) -> VolumeCondition {
    let mut msgs = Vec::new();
    if v.state != "Online" {
        let mut why: Vec<String> = v
            .replica_list
            .iter()
            .filter(|r| !matches!(r.state.as_str(), "healthy" | "unattached"))
            .map(|r| format!("replica {} on {} is {}", r.uuid, r.node, r.state))
            .collect();
        if !v.reason.is_empty() {
            why.insert(0, v.reason.clone());
        }
        msgs.push(format!("{}: {}", v.state, why.join(", ")));
    }
    if !v.host_nqn.is_empty() && v.nexus_node.is_empty() {
        msgs.push("published, but no nexus serves it".into());
    }
    VolumeCondition {
        abnormal: !msgs.is_empty(),
        message: if msgs.is_empty() {
            "Online".into()
        } else {
            msgs.join("; ")
        },
    }
}

/// The CSI view of a volume; its context is what CreateVolume kept with it (fsType).
fn csi_volume(v: &pb::Volume) -> Volume {
    let content_source = if !v.source_volume.is_empty() {
        Some(VolumeContentSource {
            r#type: Some(SourceType::Volume(VolumeSource {
                volume_id: v.source_volume.clone(),
            })),
        })
    } else if !v.source_snapshot.is_empty() {
        Some(VolumeContentSource {
            r#type: Some(SourceType::Snapshot(SnapshotSource {
                snapshot_id: v.source_snapshot.clone(),
            })),
        })
    } else {
        None
    };
    Volume {
        capacity_bytes: v.size_bytes as i64,
        volume_id: v.uuid.clone(),
        volume_context: v.context.clone(),
        content_source,
        accessible_topology: Vec::new(),
    }
}

fn csi_snapshot(s: &pb::VolumeSnapshot) -> Snapshot {
    Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.uuid.clone(),
        source_volume_id: s.volume.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_unix_ms.div_euclid(1000),
            nanos: (s.created_unix_ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
        ready_to_use: s.ready,
        group_snapshot_id: String::new(),
    }
}

fn class_params(p: &HashMap<String, String>) -> Result<ClassParams, Status> {
    params::parse(p).map_err(invalid)
}

/// Pages through `n` items: (start, end, next_token) for `max` entries from `token`; a token that is not one of
/// ours is ABORTED.
fn page(n: usize, max: i32, token: &str) -> Result<(usize, usize, String), Status> {
    if max < 0 {
        return Err(invalid("max_entries is negative"));
    }
    let start = if token.is_empty() {
        0
    } else {
        token
            .parse::<usize>()
            .ok()
            .filter(|s| *s <= n)
            .ok_or_else(|| Status::aborted(format!("starting_token {token:?} is not valid")))?
    };
    let end = if max == 0 {
        n
    } else {
        (start + max as usize).min(n)
    };
    let next = if end < n {
        end.to_string()
    } else {
        String::new()
    };
    Ok((start, end, next))
}

/// Whether `size` bytes satisfy a CreateVolume's capacity range (none: any size).
fn within(range: Option<&CapacityRange>, size: u64) -> bool {
    range.is_none_or(|c| {
        size >= c.required_bytes.max(0) as u64
            && (c.limit_bytes <= 0 || size <= c.limit_bytes as u64)
    })
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let name = required(&r.name, "name")?;
        params::check_capabilities(&r.volume_capabilities).map_err(invalid)?;
        let class = class_params(&r.parameters)?;
        let mut size = size_for(r.capacity_range.as_ref())?;
        let _held = self.inflight.hold(&format!("volume name {name}"))?;
        let uuid = names::volume_uuid(name);
        let (mut source_snapshot, mut source_volume) = (String::new(), String::new());
        // A volume made from a snapshot or volume is made at its source's size, then grown to what the claim asks
        // for (a snapshot restored into a larger claim): the node grows its file system when it stages it.
        let mut grow_to = None;
        if let Some(src) = &r.volume_content_source {
            let (src_size, snap, vol) = self.source(src).await?;
            let range = r.capacity_range.unwrap_or_default();
            if range.limit_bytes > 0 && (range.limit_bytes as u64) < src_size {
                return Err(Status::out_of_range(format!(
                    "a volume made from this source holds its {src_size} bytes, above limit_bytes {}",
                    range.limit_bytes
                )));
            }
            if (range.required_bytes as u64) > src_size {
                grow_to = Some(size);
            }
            size = src_size;
            (source_snapshot, source_volume) = (snap, vol);
        }
        // Accessibility requirements say where the volume must be reachable from, and it is reachable from every
        // node (NVMe/TCP; `accessible_topology` is left empty, as the spec says then): they do not place its
        // replicas, which go where the class's nodeSelector and poolSelector admit. (Placing them by the nodes a
        // provisioner lists would keep them off storage nodes that run no node plugin, and a retry listing other
        // nodes would be refused as another volume.)
        let existing = self.get(uuid).await?;
        // A volume of that name that exists fits the request when its size is within the capacity range (it may
        // have been expanded since, or the range allows more than one size); the rest the agent compares.
        if let Some(e) = &existing
            && within(r.capacity_range.as_ref(), e.size_bytes)
        {
            size = e.size_bytes;
        }
        let cluster_req = pb::CreateVolumeRequest {
            uuid: uuid.to_string(),
            size_bytes: size,
            replicas: class.replicas,
            node_selector: class.node_selector.clone().into_iter().collect(),
            // A volume made by an earlier driver, which placed replicas by the requisite, keeps its own (else its
            // provisioner's retry would be refused as another volume).
            topology: existing
                .as_ref()
                .map(|e| e.topology.clone())
                .unwrap_or_default(),
            source_snapshot,
            source_volume,
            pool_selector: class.pool_selector.clone().into_iter().collect(),
            context: class
                .fs_type
                .iter()
                .map(|fs| ("fsType".to_string(), fs.clone()))
                .collect(),
        };
        // A new volume larger than any placement could ever give (were the pools empty) is OUT_OF_RANGE, as the spec
        // asks of a capacity the plugin does not support, and the provisioner gives up on it. One that only does not
        // fit now goes to the agent, which answers RESOURCE_EXHAUSTED, and the provisioner retries it (OUT_OF_RANGE
        // would fail the claim for good though deleting a volume would make room). One that exists goes to the
        // agent too, which says whether it matches.
        if existing.is_none()
            && cluster_req.source_snapshot.is_empty()
            && cluster_req.source_volume.is_empty()
        {
            let cap = self
                .capacity(pb::GetCapacityRequest {
                    node_selector: cluster_req.node_selector.clone(),
                    topology: Vec::new(),
                    replicas: class.replicas,
                    pool_selector: cluster_req.pool_selector.clone(),
                })
                .await?;
            if cap.largest_possible_volume_size > 0 && size > cap.largest_possible_volume_size {
                return Err(Status::out_of_range(format!(
                    "{size} bytes with {} replicas: the largest volume the pools could ever hold is {} bytes",
                    class.replicas, cap.largest_possible_volume_size
                )));
            }
        }
        let sourced =
            !cluster_req.source_snapshot.is_empty() || !cluster_req.source_volume.is_empty();
        tracing::info!(name, %uuid, size, replicas = class.replicas, "CreateVolume");
        let v = self
            .agent
            .call(|mut c| {
                let req = cluster_req.clone();
                async move { c.create_volume(req).await }
            })
            .await
            .map_err(|s| create_error(name, s, sourced))?;
        if v.phase != pb::VolumePhase::Created as i32 {
            return Err(Status::aborted(format!(
                "volume {uuid} is still being created ({}); try again",
                v.reason
            )));
        }
        let v = match grow_to {
            Some(want) if v.size_bytes < want || v.expanding_from_bytes != 0 => {
                tracing::info!(%uuid, from = v.size_bytes, to = want, "growing a volume made from a source to its claim's size");
                match self.expand(uuid, want.max(v.size_bytes)).await {
                    Ok(grown) => grown,
                    // Made, not grown yet: the provisioner's retry grows it.
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        return Err(Status::unavailable(format!(
                            "volume {uuid} was made from its source and is not grown to {want} bytes yet: {}",
                            s.message()
                        )));
                    }
                    // Its pools cannot hold the claim's size: the volume made for it goes again. No call for
                    // this name has succeeded (that needs the grown size), so the CO holds no volume of it, and
                    // would never delete it: a claim deleted after this error left the copy and its room for ever.
                    Err(s)
                        if matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted)
                            && v.nexus_node.is_empty()
                            && made_size(&v) < want =>
                    {
                        tracing::warn!(%uuid, want, error = %s.message(), "a volume made from a source cannot grow to its claim's size: deleting it");
                        let deleted =
                            self.agent
                                .call(|mut c| {
                                    let uuid = uuid.to_string();
                                    async move {
                                        c.delete_volume(pb::DeleteVolumeRequest { uuid }).await
                                    }
                                })
                                .await;
                        if let Err(e) = deleted {
                            tracing::warn!(%uuid, error = %e.message(), "the volume that cannot grow is not deleted yet (the next call tries again)");
                        }
                        return Err(agent_error(s));
                    }
                    Err(s) => return Err(agent_error(s)),
                }
            }
            _ => v,
        };
        let mut volume = csi_volume(&v);
        // A volume kept without a context (made before contexts were kept) still tells the node its file system.
        for (k, val) in cluster_req.context {
            volume.volume_context.entry(k).or_insert(val);
        }
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let Some(uuid) = volume_id(&r.volume_id)? else {
            return Ok(Response::new(DeleteVolumeResponse {}));
        };
        let _held = self.inflight.hold(&uuid.to_string())?;
        let Some(v) = self.get(uuid).await? else {
            return Ok(Response::new(DeleteVolumeResponse {}));
        };
        if !v.host_nqn.is_empty() {
            return Err(Status::failed_precondition(format!(
                "volume {uuid} is published to {}; ControllerUnpublishVolume first",
                published_nodes(&v).join(", ")
            )));
        }
        tracing::info!(%uuid, "DeleteVolume");
        match self
            .agent
            .call(|mut c| {
                let uuid = uuid.to_string();
                async move { c.delete_volume(pb::DeleteVolumeRequest { uuid }).await }
            })
            .await
        {
            Ok(_) => Ok(Response::new(DeleteVolumeResponse {})),
            Err(s) if s.code() == Code::NotFound => Ok(Response::new(DeleteVolumeResponse {})),
            Err(s) => Err(agent_error(s)),
        }
    }

    async fn controller_publish_volume(
        &self,
        req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = volume_id(&r.volume_id)?;
        let node = required_within(&r.node_id, "node_id", crate::names::MAX_NODE_ID)?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| invalid("volume_capability is required"))?;
        params::check_capability(cap).map_err(invalid)?;
        let uuid = id.ok_or_else(|| Status::not_found(format!("no volume {}", r.volume_id)))?;
        let _held = self.inflight.hold(&uuid.to_string())?;
        if self.get(uuid).await?.is_none() {
            return Err(Status::not_found(format!("no volume {uuid}")));
        }
        let host_nqn = proto::names::kernel_host_nqn(node);
        // Only a raw block volume is served to several nodes at once (check_capability refuses the rest).
        let multi_host = params::multi_node(cap);
        tracing::info!(%uuid, node, multi_host, "ControllerPublishVolume");
        let v = self
            .agent
            .call(|mut c| {
                let req = pb::PublishVolumeRequest {
                    uuid: uuid.to_string(),
                    host_nqn: host_nqn.clone(),
                    node: node.to_string(),
                    multi_host,
                    // The node must exist (CSI: NOT_FOUND otherwise).
                    require_known_node: true,
                };
                async move { c.publish_volume(req).await }
            })
            .await
            .map_err(agent_error)?;
        let context = [
            ("nqn".to_string(), v.nqn.clone()),
            ("targetAddresses".to_string(), v.target_addresses.join(",")),
            ("hostNqn".to_string(), host_nqn),
        ]
        .into();
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context: context,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let done = Response::new(ControllerUnpublishVolumeResponse {});
        let Some(uuid) = volume_id(&r.volume_id)? else {
            return Ok(done);
        };
        let _held = self.inflight.hold(&uuid.to_string())?;
        // A volume that does not exist is published nowhere.
        if self.get(uuid).await?.is_none() {
            return Ok(done);
        }
        // Always the agent's to decide, even when the volume shows no host: it lists hosts only once a publish has
        // finished, and one left unfinished (the agent restarted midway) still records its host, which the volume's
        // next publish completes. Unpublishing a host the volume does not have changes nothing. No node named: from
        // every node.
        let host = if r.node_id.is_empty() {
            String::new()
        } else {
            proto::names::kernel_host_nqn(&r.node_id)
        };
        tracing::info!(%uuid, node = %r.node_id, "ControllerUnpublishVolume");
        match self
            .agent
            .call(|mut c| {
                let req = pb::UnpublishVolumeRequest {
                    uuid: uuid.to_string(),
                    host_nqn: host.clone(),
                };
                async move { c.unpublish_volume(req).await }
            })
            .await
        {
            Ok(_) => Ok(done),
            Err(s) if s.code() == Code::NotFound => Ok(done),
            Err(s) => Err(agent_error(s)),
        }
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        let id = volume_id(&r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        let exists = match id {
            Some(uuid) => self.get(uuid).await?.is_some(),
            None => false,
        };
        if !exists {
            return Err(Status::not_found(format!("no volume {}", r.volume_id)));
        }
        let verdict = params::check_capabilities(&r.volume_capabilities)
            .and_then(|()| params::parse(&r.parameters).map(drop));
        Ok(Response::new(match verdict {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: HashMap::new(),
                }),
                message: String::new(),
            },
            Err(why) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let r = req.into_inner();
        if r.max_entries < 0 {
            return Err(invalid("max_entries is negative"));
        }
        let page = self
            .agent
            .call(|mut c| {
                let req = pb::ListVolumesRequest {
                    max_entries: r.max_entries as u32,
                    starting_token: r.starting_token.clone(),
                };
                async move { c.list_volumes(req).await }
            })
            .await
            .map_err(agent_error)?;
        let entries = page
            .volumes
            .iter()
            .map(|v| list_volumes_response::Entry {
                volume: Some(csi_volume(v)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: published_nodes(v),
                    volume_condition: Some(condition(v)),
                }),
            })
            .collect();
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token: page.next_token,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let r = req.into_inner();
        let class = class_params(&r.parameters)?;
        // Capabilities Keelson does not serve have no capacity.
        if !r.volume_capabilities.is_empty()
            && params::check_capabilities(&r.volume_capabilities).is_err()
        {
            return Ok(Response::new(GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
                minimum_volume_size: Some(SIZE_ALIGN as i64),
            }));
        }
        let cap = self
            .capacity(pb::GetCapacityRequest {
                node_selector: class.node_selector.into_iter().collect(),
                // A volume is reachable from every segment: each has the capacity of the whole cluster.
                topology: Vec::new(),
                replicas: class.replicas,
                pool_selector: class.pool_selector.into_iter().collect(),
            })
            .await?;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: cap.available_bytes as i64,
            maximum_volume_size: Some(cap.maximum_volume_size as i64),
            minimum_volume_size: Some(SIZE_ALIGN as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            RpcType::CreateDeleteVolume,
            RpcType::PublishUnpublishVolume,
            RpcType::ListVolumes,
            RpcType::GetCapacity,
            RpcType::CreateDeleteSnapshot,
            RpcType::ListSnapshots,
            RpcType::CloneVolume,
            // Not PUBLISH_READONLY: a publish exports the volume read-write to its node, so its `readonly` would be
            // a promise not kept (the kubelet makes a read-only pod's mount read-only at NodePublishVolume).
            RpcType::ListVolumesPublishedNodes,
            RpcType::VolumeCondition,
            RpcType::GetVolume,
            RpcType::SingleNodeMultiWriter,
            RpcType::ExpandVolume,
        ]
        .into_iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let source = required(&r.source_volume_id, "source_volume_id")?;
        let name = required(&r.name, "name")?;
        // What the CO adds of its own (the snapshotter's --extra-create-metadata) is taken and ignored.
        if let Some(k) = r
            .parameters
            .keys()
            .find(|k| !k.starts_with(crate::params::CO_PREFIX))
        {
            return Err(invalid(format!(
                "unknown parameter {k:?}: snapshots take none"
            )));
        }
        let volume = Uuid::parse_str(source)
            .map_err(|_| Status::not_found(format!("no volume {source:?}")))?;
        let uuid = names::snapshot_uuid(name);
        let _held = self.inflight.hold(&format!("snapshot name {name}"))?;
        tracing::info!(name, %uuid, %volume, "CreateSnapshot");
        let s = self
            .agent
            .call(|mut c| {
                let req = pb::CreateSnapshotRequest {
                    volume: volume.to_string(),
                    uuid: uuid.to_string(),
                };
                async move { c.create_snapshot(req).await }
            })
            .await
            .map_err(|s| match s.code() {
                Code::AlreadyExists => Status::already_exists(format!(
                    "snapshot {name} exists of another volume: {}",
                    s.message()
                )),
                _ => agent_error(s),
            })?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(csi_snapshot(&s)),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.snapshot_id, "snapshot_id")?;
        let done = Response::new(DeleteSnapshotResponse {});
        let Ok(uuid) = Uuid::parse_str(id) else {
            return Ok(done);
        };
        let _held = self.inflight.hold(&uuid.to_string())?;
        tracing::info!(%uuid, "DeleteSnapshot");
        match self
            .agent
            .call(|mut c| {
                let uuid = uuid.to_string();
                async move { c.delete_snapshot(pb::DeleteSnapshotRequest { uuid }).await }
            })
            .await
        {
            Ok(_) => Ok(done),
            Err(s) if s.code() == Code::NotFound => Ok(done),
            Err(s) => Err(agent_error(s)),
        }
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let mut all = if r.source_volume_id.is_empty() {
            self.snapshots(String::new()).await?
        } else {
            match Uuid::parse_str(&r.source_volume_id) {
                Ok(v) => match self.snapshots(v.to_string()).await {
                    Err(s) if s.code() == Code::NotFound => Vec::new(),
                    r => r?,
                },
                Err(_) => Vec::new(),
            }
        };
        if !r.snapshot_id.is_empty() {
            all.retain(|s| s.uuid == r.snapshot_id);
        }
        all.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        let (start, end, next_token) = page(all.len(), r.max_entries, &r.starting_token)?;
        let entries = all[start..end]
            .iter()
            .map(|s| list_snapshots_response::Entry {
                snapshot: Some(csi_snapshot(s)),
            })
            .collect();
        Ok(Response::new(ListSnapshotsResponse {
            entries,
            next_token,
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.snapshot_id, "snapshot_id")?;
        let found = match Uuid::parse_str(id) {
            Ok(uuid) => self
                .snapshots(String::new())
                .await?
                .into_iter()
                .find(|s| s.uuid == uuid.to_string()),
            Err(_) => None,
        };
        let s = found.ok_or_else(|| Status::not_found(format!("no snapshot {id}")))?;
        Ok(Response::new(GetSnapshotResponse {
            snapshot: Some(csi_snapshot(&s)),
        }))
    }

    /// Grows the volume online through the cluster agent (replicas, then the nexus, whose host is told). A volume
    /// already as large is success. What cannot be done now (a replica's node down, the nexus rebuilding) is
    /// UNAVAILABLE, never FAILED_PRECONDITION: the external-resizer takes that for "volume in use" and gives up.
    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = volume_id(&r.volume_id)?;
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| invalid("capacity_range is required"))?;
        if let Some(cap) = &r.volume_capability {
            params::check_capability(cap).map_err(invalid)?;
        }
        let size = size_for(Some(range))?;
        let uuid = id.ok_or_else(|| Status::not_found(format!("no volume {}", r.volume_id)))?;
        let _held = self.inflight.hold(&uuid.to_string())?;
        let v = self
            .get(uuid)
            .await?
            .ok_or_else(|| Status::not_found(format!("no volume {uuid}")))?;
        // A raw block volume needs nothing on the node; a file system is grown there.
        let node_expansion_required = !matches!(
            r.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(volume_capability::AccessType::Block(_))
        );
        let limit = range.limit_bytes as u64;
        if v.size_bytes >= size && v.expanding_from_bytes == 0 {
            if limit > 0 && v.size_bytes > limit {
                return Err(Status::out_of_range(format!(
                    "volume {uuid} is {} bytes, above limit_bytes {limit}; volumes never shrink",
                    v.size_bytes
                )));
            }
            return Ok(Response::new(ControllerExpandVolumeResponse {
                capacity_bytes: v.size_bytes as i64,
                node_expansion_required,
            }));
        }
        tracing::info!(%uuid, from = v.size_bytes, to = size, "ControllerExpandVolume");
        let v = self
            .expand(uuid, size.max(v.size_bytes))
            .await
            .map_err(|s| match s.code() {
                // Room missing now, not a size the plugin never gives: the resizer retries it (OUT_OF_RANGE would
                // mark the expansion infeasible, and it would wait for the claim to be edited after room is made).
                Code::ResourceExhausted => Status::resource_exhausted(format!(
                    "cluster agent: {} (the capacity cannot be given now)",
                    s.message()
                )),
                Code::FailedPrecondition => {
                    Status::unavailable(format!("cluster agent: {}", s.message()))
                }
                _ => agent_error(s),
            })?;
        if v.expanding_from_bytes != 0 {
            return Err(Status::unavailable(format!(
                "volume {uuid} is still growing to {} bytes ({}); try again",
                v.size_bytes, v.reason
            )));
        }
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: v.size_bytes as i64,
            node_expansion_required,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        let v = match volume_id(&r.volume_id)? {
            Some(uuid) => self.get(uuid).await?,
            None => None,
        }
        .ok_or_else(|| Status::not_found(format!("no volume {}", r.volume_id)))?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: published_nodes(&v),
                volume_condition: Some(condition(&v)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "MODIFY_VOLUME is not advertised: Keelson volumes have no mutable parameters",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(req: i64, limit: i64) -> Option<CapacityRange> {
        Some(CapacityRange {
            required_bytes: req,
            limit_bytes: limit,
        })
    }

    /// A node id past the general 128-byte limit (a long Kubernetes node name) is taken, as the spec allows node
    /// ids up to 256 bytes; before, every ControllerPublishVolume to such a node was INVALID_ARGUMENT.
    #[tokio::test]
    async fn node_ids_may_be_longer_than_names() {
        let agent = Agent::new(
            &["http://127.0.0.1:1".into()],
            std::time::Duration::from_secs(1),
        )
        .unwrap();
        let svc = ControllerService::new(Arc::new(agent));
        let publish = |node: String| ControllerPublishVolumeRequest {
            volume_id: Uuid::new_v4().to_string(),
            node_id: node,
            volume_capability: Some(VolumeCapability {
                access_type: Some(volume_capability::AccessType::Block(
                    volume_capability::BlockVolume {},
                )),
                access_mode: Some(volume_capability::AccessMode {
                    mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                }),
            }),
            ..Default::default()
        };
        // The agent cannot be reached here: anything but a refusal of the id itself.
        let long = svc
            .controller_publish_volume(Request::new(publish("n".repeat(150))))
            .await
            .unwrap_err();
        assert_ne!(long.code(), Code::InvalidArgument, "{long:?}");
        let too_long = svc
            .controller_publish_volume(Request::new(publish("n".repeat(257))))
            .await
            .unwrap_err();
        assert_eq!(too_long.code(), Code::InvalidArgument);
    }

    #[test]
    fn sizes_from_capacity_ranges() {
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(
            size_for(range(0, 0).as_ref()).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(size_for(range(1000, 0).as_ref()).unwrap(), 4096);
        assert_eq!(size_for(range(4097, 0).as_ref()).unwrap(), 8192);
        assert_eq!(size_for(range(0, 4096).as_ref()).unwrap(), 4096);
        assert_eq!(size_for(range(4096, 4096).as_ref()).unwrap(), 4096);
        assert_eq!(
            size_for(range(1000, 1000).as_ref()).unwrap_err().code(),
            Code::OutOfRange
        );
        assert_eq!(
            size_for(range(0, 100).as_ref()).unwrap_err().code(),
            Code::OutOfRange
        );
        assert_eq!(
            size_for(range(10, 5).as_ref()).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            size_for(range(-1, 0).as_ref()).unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn pages_and_tokens() {
        assert_eq!(page(5, 2, "").unwrap(), (0, 2, "2".into()));
        assert_eq!(page(5, 2, "4").unwrap(), (4, 5, String::new()));
        assert_eq!(page(5, 0, "").unwrap(), (0, 5, String::new()));
        assert_eq!(page(5, 2, "x").unwrap_err().code(), Code::Aborted);
        assert_eq!(page(5, 2, "6").unwrap_err().code(), Code::Aborted);
        assert_eq!(page(5, -1, "").unwrap_err().code(), Code::InvalidArgument);
    }

    #[test]
    fn condition_is_abnormal_when_degraded_or_without_a_nexus() {
        let mut v = pb::Volume {
            state: "Online".into(),
            ..Default::default()
        };
        assert!(!condition(&v).abnormal);
        v.host_nqn = proto::names::kernel_host_nqn("n1");
        assert!(condition(&v).abnormal);
        v.nexus_node = "n2".into();
        assert!(!condition(&v).abnormal);
        v.state = "Degraded".into();
        v.reason = "replica x faulted".into();
        let c = condition(&v);
        assert!(
            c.abnormal && c.message.contains("replica x faulted"),
            "{c:?}"
        );
    }

    /// NOT_FOUND from the agent is the CO's "no such source" (final): a volume without a source gets UNAVAILABLE
    /// for it (a pool the agent chose not imported yet: tried again, it is made). Before, the agent's NOT_FOUND
    /// went back as it was, and the claim waited with a misleading event.
    #[test]
    fn not_found_means_a_missing_source_only_for_a_volume_made_from_one() {
        let nf = || Status::not_found("node n1: pool p1 not found");
        assert_eq!(create_error("pvc", nf(), false).code(), Code::Unavailable);
        assert_eq!(create_error("pvc", nf(), true).code(), Code::NotFound);
        assert_eq!(
            create_error("pvc", Status::already_exists("x"), false).code(),
            Code::AlreadyExists
        );
    }
}
