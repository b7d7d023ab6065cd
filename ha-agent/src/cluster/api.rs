//! The cluster agent's gRPC services (`proto::cluster`): Registration for io-engines, Cluster for operators. Only
//! the leading agent serves them; another answers UNAVAILABLE naming the leader. Registry errors become gRPC
//! statuses here, in one mapping.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use proto::cluster as pb;
use proto::cluster::cluster_server::{Cluster, ClusterServer};
use proto::cluster::registration_server::{Registration, RegistrationServer};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::heal;
use super::hosts::{self, HostError, HostSpec, HostView, Hosts};
use super::metrics::{self, AgentMetrics};
use super::node::{NodeSpec, NodeState, PoolSpec};
use super::pool::{PoolOpError, PoolPhase, PoolView, Pools};
use super::registry::{NodeView, Registry, RegistryError};
use super::snapshots::{SnapshotPhase, SnapshotRecord};
use super::store::StoreError;
use super::switchover;
use super::volume::{Placement, VolumePhase, VolumeRecord, VolumeSpec};
use super::volumes::{VolumeError, Volumes};

/// What a leading agent acts on.
pub struct Leading {
    pub registry: Arc<Registry>,
    pub pools: Arc<Pools>,
    pub volumes: Arc<Volumes>,
    pub hosts: Arc<Hosts>,
}

/// What the services act on: [`Leading`] while this agent leads, nothing otherwise.
#[derive(Clone, Default)]
pub struct Leadership {
    inner: Arc<RwLock<Option<Arc<Leading>>>>,
}

impl Leadership {
    pub fn lead(&self, l: Arc<Leading>) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Some(l);
    }

    pub fn step_down(&self) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn leading(&self) -> Result<Arc<Leading>, Status> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(proto::leader::not_leader)
    }

    fn registry(&self) -> Result<Arc<Registry>, Status> {
        Ok(self.leading()?.registry.clone())
    }
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        let msg = e.to_string();
        match e {
            RegistryError::InvalidArgument(_) => Status::invalid_argument(msg),
            RegistryError::NotFound(_) => Status::not_found(msg),
            RegistryError::InUse(_) => Status::already_exists(msg),
            RegistryError::NotOffline(_) => Status::failed_precondition(msg),
            RegistryError::Store(StoreError::InvalidArgument(_)) => Status::invalid_argument(msg),
            RegistryError::Store(_) => Status::unavailable(msg),
            RegistryError::Corrupt { .. } => Status::data_loss(msg),
        }
    }
}

impl From<HostError> for Status {
    fn from(e: HostError) -> Status {
        let msg = e.to_string();
        match e {
            HostError::InvalidArgument(_) => Status::invalid_argument(msg),
            HostError::NotFound(_) => Status::not_found(msg),
            HostError::NotItsHost { .. } | HostError::Alive { .. } | HostError::InUse(_) => {
                Status::failed_precondition(msg)
            }
            HostError::NotKnownYet { .. } => Status::unavailable(msg),
            HostError::Store(StoreError::InvalidArgument(_)) => Status::invalid_argument(msg),
            HostError::Store(_) => Status::unavailable(msg),
            HostError::Corrupt { .. } => Status::data_loss(msg),
        }
    }
}

/// FAILED_PRECONDITION if a volume is published to one of `record`'s host NQNs, or to the kernel host NQN Keelson
/// gives its node (the CSI driver's).
async fn published_to_node(volumes: &Volumes, record: &hosts::HostRecord) -> Result<(), Status> {
    let node = &record.spec.node;
    let kernel = proto::names::kernel_host_nqn(node);
    let hosts: Vec<&String> = record.spec.host_nqns.iter().chain([&kernel]).collect();
    for v in volumes.list().await? {
        if let Some(h) = v
            .nexus
            .as_ref()
            .and_then(|n| hosts.iter().find(|h| n.has_host(h)))
        {
            return Err(HostError::InUse(format!(
                "volume {} is published to {h}, a host of node {node}: unpublish it first",
                v.uuid
            ))
            .into());
        }
    }
    Ok(())
}

fn host(v: HostView) -> pb::Host {
    pb::Host {
        alive: v.alive(),
        node: v.record.spec.node,
        host_nqns: v.record.spec.host_nqns,
        version: v.record.spec.version,
        registered_unix_ms: v.record.status.registered_ms,
        last_seen_ms_ago: v.last_seen.map_or(0, |d| d.as_millis() as u64),
    }
}

impl From<PoolOpError> for Status {
    fn from(e: PoolOpError) -> Status {
        let msg = e.to_string();
        match e {
            PoolOpError::InvalidArgument(_) => Status::invalid_argument(msg),
            PoolOpError::NotFound(_) => Status::not_found(msg),
            PoolOpError::AlreadyExists { .. } => Status::already_exists(msg),
            PoolOpError::FailedPrecondition(_) => Status::failed_precondition(msg),
            PoolOpError::Deleting(_) => Status::aborted(msg),
            PoolOpError::Engine { code, .. } => Status::new(code, msg),
            PoolOpError::Unreachable { .. } | PoolOpError::Store(_) => Status::unavailable(msg),
            PoolOpError::Registry(r) => r.into(),
            PoolOpError::Corrupt { .. } => Status::data_loss(msg),
        }
    }
}

impl From<VolumeError> for Status {
    fn from(e: VolumeError) -> Status {
        let msg = e.to_string();
        match e {
            VolumeError::InvalidArgument(_) => Status::invalid_argument(msg),
            VolumeError::NotFound(_) => Status::not_found(msg),
            VolumeError::AlreadyExists { .. } => Status::already_exists(msg),
            VolumeError::NoRoom(_)
            | VolumeError::NoCopies(_)
            | VolumeError::CannotGrow(_)
            | VolumeError::NoRoomForSnapshot(_) => Status::resource_exhausted(msg),
            VolumeError::TooLarge(_) => Status::out_of_range(msg),
            VolumeError::SnapshotNotFound(_) => Status::not_found(msg),
            VolumeError::SnapshotExists { .. } => Status::already_exists(msg),
            VolumeError::FailedPrecondition { .. } => Status::failed_precondition(msg),
            VolumeError::NotPublishedTo { host, .. } => {
                let mut s = Status::failed_precondition(msg);
                if let Ok(v) = host.parse() {
                    s.metadata_mut().insert(proto::names::NOT_PUBLISHED_TO, v);
                }
                s
            }
            VolumeError::Conflict { .. } => Status::aborted(msg),
            VolumeError::Engine { code, .. } => Status::new(code, msg),
            VolumeError::Node(super::dataplane::NodeEngineError::NotFound(_)) => {
                Status::not_found(msg)
            }
            VolumeError::Node(_) | VolumeError::Store(_) => Status::unavailable(msg),
            VolumeError::Registry(r) => r.into(),
            VolumeError::Corrupt { .. } => Status::data_loss(msg),
        }
    }
}

fn parse_uuid(s: &str) -> Result<uuid::Uuid, Status> {
    uuid::Uuid::parse_str(s)
        .ok()
        .filter(|u| !u.is_nil())
        .ok_or_else(|| Status::invalid_argument(format!("volume UUID {s:?} is not a UUID")))
}

async fn volume(volumes: &Volumes, r: VolumeRecord) -> pb::Volume {
    let (state, listed) = volumes.state(&r).await;
    let mut reason = r.reason.clone();
    if reason.is_empty() && state != "Online" {
        let down = volumes.replicas_on_down_nodes(&r).await;
        if !down.is_empty() {
            reason = format!("replica node(s) not Online: {}", down.join(", "));
        }
    }
    let nexus = r.nexus.clone().filter(|n| n.published);
    let child = |id: &uuid::Uuid| {
        listed
            .as_ref()
            .and_then(|n| {
                n.children
                    .iter()
                    .find(|c| heal::replica_of(&c.uri).as_ref() == Some(id))
            })
            .cloned()
    };
    pb::Volume {
        uuid: r.uuid.to_string(),
        size_bytes: r.spec.size,
        expanding_from_bytes: r.growth.as_ref().map_or(0, |g| g.from),
        replicas: r.spec.replicas,
        context: r
            .spec
            .context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        phase: match r.phase {
            VolumePhase::Creating => pb::VolumePhase::Creating,
            VolumePhase::Created => pb::VolumePhase::Created,
            VolumePhase::Deleting => pb::VolumePhase::Deleting,
        } as i32,
        state: state.into(),
        source_snapshot: r
            .spec
            .source_snapshot
            .filter(|_| r.spec.source_volume.is_none())
            .map(|u| u.to_string())
            .unwrap_or_default(),
        pool_selector: r
            .spec
            .placement
            .pool_selector
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        source_volume: r
            .spec
            .source_volume
            .map(|u| u.to_string())
            .unwrap_or_default(),
        node_selector: r
            .spec
            .placement
            .node_selector
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        topology: r
            .spec
            .placement
            .topology
            .iter()
            .map(|s| pb::TopologySegment {
                labels: s.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            })
            .collect(),
        rebuilds: listed
            .iter()
            .flat_map(|n| &n.rebuilds)
            .map(|b| pb::VolumeRebuild {
                replica: heal::replica_of(&b.child)
                    .map(|u| u.to_string())
                    .unwrap_or_else(|| b.child.clone()),
                kind: b.kind.clone(),
                bytes_copied: b.bytes_copied,
                bytes_skipped: b.bytes_skipped,
                bytes_total: b.bytes_total,
                duration_ms: b.duration_ms,
                finished_unix_ms: b.finished_unix_ms,
                error: b.error.clone(),
            })
            .collect(),
        replica_list: r
            .replicas
            .iter()
            .map(|x| {
                let c = child(&x.uuid);
                pb::VolumeReplica {
                    uuid: x.uuid.to_string(),
                    node: x.node.clone(),
                    pool: x.pool.clone(),
                    created: x.created,
                    state: match (&c, x.created) {
                        (Some(c), _) => heal::child_state_name(c.state),
                        (None, true) => "unattached",
                        (None, false) => "pending",
                    }
                    .into(),
                    rebuild_done_bytes: c.as_ref().map_or(0, |c| c.rebuild_done_bytes),
                    rebuild_total_bytes: c.as_ref().map_or(0, |c| c.rebuild_total_bytes),
                    in_sync: x.synced,
                }
            })
            .collect(),
        nexus_node: nexus.as_ref().map(|n| n.node.clone()).unwrap_or_default(),
        nqn: nexus.as_ref().map(|n| n.nqn.clone()).unwrap_or_default(),
        target_addresses: nexus
            .as_ref()
            .map(|n| n.addresses.clone())
            .unwrap_or_default(),
        host_nqn: nexus
            .as_ref()
            .map(|n| n.host_nqn.clone())
            .unwrap_or_default(),
        host_nqns: nexus.as_ref().map(|n| n.hosts()).unwrap_or_default(),
        reason,
    }
}

fn snapshot(s: SnapshotRecord) -> pb::VolumeSnapshot {
    pb::VolumeSnapshot {
        uuid: s.uuid.to_string(),
        volume: s.volume.to_string(),
        size_bytes: s.size,
        ready: s.phase == SnapshotPhase::Created,
        created_unix_ms: s.created_ms as i64,
        nodes: s.copies.into_iter().map(|c| c.node).collect(),
    }
}

fn managed(v: PoolView) -> pb::ManagedPool {
    let r = v.record;
    pb::ManagedPool {
        node: r.node,
        name: r.name,
        disk: r.disk,
        phase: match r.phase {
            PoolPhase::Creating => pb::PoolPhase::Creating,
            PoolPhase::Created => pb::PoolPhase::Created,
            PoolPhase::Deleting => pb::PoolPhase::Deleting,
        } as i32,
        uuid: r.uuid,
        reported: v.reported.is_some(),
        capacity: v.reported.as_ref().map_or(0, |p| p.capacity),
        allocated: v.reported.as_ref().map_or(0, |p| p.allocated),
        reason: r.reason,
    }
}

fn pools(p: Vec<pb::Pool>) -> Vec<PoolSpec> {
    p.into_iter()
        .map(|p| {
            let free = p.capacity.saturating_sub(p.committed);
            let replica_room = p
                .replica_room
                .map(|r| crate::cluster::node::coarse_replica_room(r, p.disk_room.is_some(), free));
            PoolSpec {
                name: p.name,
                uuid: p.uuid,
                disk: p.disk,
                capacity: p.capacity,
                allocated: p.allocated,
                committed: p.committed,
                disk_errors: p.disk_errors,
                labels: p.labels.into_iter().collect(),
                block_size: if p.block_size == 0 { 512 } else { p.block_size },
                disk_full: p.disk_full,
                disk_room: p.disk_room.map(crate::cluster::node::coarse_room),
                replica_room,
                generation: (p.incarnation > 0).then_some((p.incarnation, p.applied)),
            }
        })
        .collect()
}

/// How many published nexuses each node runs (what a drain waits for).
struct NexusCount {
    per_node: std::collections::BTreeMap<String, usize>,
    /// Volume records that do not decode: where their nexuses run is unknown, so no drain is known to be over.
    unreadable: usize,
}

/// Counts the published nexuses per node. A corrupt volume record (logged) does not fail the count: it leaves
/// every draining node Draining, not Drained, and the node calls answer.
async fn nexuses_per_node(volumes: &Volumes) -> Result<NexusCount, Status> {
    let (sound, unreadable) = volumes.list_decodable().await?;
    let mut per_node = std::collections::BTreeMap::new();
    for v in sound {
        // One being unpublished may still run (its end failed): the node is not drained of it yet.
        if let Some(x) = v.nexus.filter(|x| x.published || x.unpublishing) {
            *per_node.entry(x.node).or_default() += 1;
        }
    }
    Ok(NexusCount {
        per_node,
        unreadable,
    })
}

/// The API's node, with its drain state from `nexuses` (as [`nexuses_per_node`] counts them).
fn node(v: NodeView, nexuses: &NexusCount) -> pb::Node {
    let cordoned = v.record.cordoned;
    let running = nexuses
        .per_node
        .get(&v.record.spec.name)
        .copied()
        .unwrap_or(0);
    let drain_state = match (v.record.draining, running + nexuses.unreadable) {
        (false, _) => "",
        (true, n) if n > 0 => "Draining",
        (true, _) => "Drained",
    }
    .to_string();
    let (spec, status) = (v.record.spec, v.record.status);
    pb::Node {
        name: spec.name,
        state: match status.state {
            NodeState::Online => pb::NodeState::Online,
            NodeState::Offline => pb::NodeState::Offline,
        } as i32,
        reason: status.reason,
        engine_endpoint: spec.engine_endpoint,
        nvmf_listeners: spec.nvmf_listeners,
        cntlid_min: spec.cntlid_min,
        cntlid_max: spec.cntlid_max,
        pools: status
            .pools
            .into_iter()
            .map(|p| pb::Pool {
                name: p.name,
                uuid: p.uuid,
                disk: p.disk,
                capacity: p.capacity,
                allocated: p.allocated,
                committed: p.committed,
                disk_errors: p.disk_errors,
                labels: p.labels.into_iter().collect(),
                block_size: p.block_size,
                disk_full: p.disk_full,
                disk_room: p.disk_room,
                replica_room: p.replica_room,
                incarnation: p.generation.map_or(0, |g| g.0),
                applied: p.generation.map_or(0, |g| g.1),
            })
            .collect(),
        instance: spec.instance,
        last_seen_ms_ago: v.last_seen_ago.map_or(0, |d| d.as_millis() as u64),
        state_since_ms: status.since_ms,
        cordoned,
        drain_state,
        labels: spec.labels.into_iter().collect(),
    }
}

#[derive(Clone)]
struct Service {
    leadership: Leadership,
    metrics: Arc<AgentMetrics>,
}

impl Service {
    /// Counts a state-changing call by its result (`keelson_agent_operations_total`).
    fn counted<T>(&self, operation: &str, r: Result<T, Status>) -> Result<T, Status> {
        self.metrics.operation(operation, &metrics::result_of(&r));
        r
    }
}

#[tonic::async_trait]
impl Registration for Service {
    async fn register(
        &self,
        r: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let reg = self.leadership.registry()?;
        let r = r.into_inner();
        let spec = NodeSpec {
            name: r.node,
            engine_endpoint: r.engine_endpoint,
            nvmf_listeners: r.nvmf_listeners,
            cntlid_min: r.cntlid_min,
            cntlid_max: r.cntlid_max,
            instance: r.instance,
            labels: r.labels.into_iter().collect(),
        };
        reg.register(spec, pools(r.pools)).await?;
        Ok(Response::new(pb::RegisterResponse {
            heartbeat_interval_ms: reg.config.heartbeat.as_millis() as u32,
            takes_torn_nexuses: true,
        }))
    }

    async fn heartbeat(
        &self,
        r: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let l = self.leadership.leading()?;
        let r = r.into_inner();
        let known = l
            .registry
            .heartbeat(&r.node, &r.instance, pools(r.pools))
            .await?;
        let changed: Vec<uuid::Uuid> = r
            .changed_nexuses
            .iter()
            .filter_map(|n| uuid::Uuid::parse_str(n).ok())
            .collect();
        if known && !changed.is_empty() {
            // Children of these nexuses changed state: those volumes are healed now, not at the next sweep. (Holding
            // `l`: an agent told to stop resigns only once it ends.)
            let (l, node) = (l.clone(), r.node.clone());
            tokio::spawn(async move { l.volumes.heal_changed(&node, changed).await });
        }
        Ok(Response::new(pb::HeartbeatResponse {
            register_again: !known,
        }))
    }

    async fn deregister(
        &self,
        r: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let reg = self.leadership.registry()?;
        let r = r.into_inner();
        let torn = r
            .torn_nexuses
            .iter()
            .map(|t| parse_uuid(t).map(|u| u.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        reg.deregister(&r.node, &r.instance, &torn).await?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }

    async fn confirm_child_fault(
        &self,
        r: Request<pb::ConfirmChildFaultRequest>,
    ) -> Result<Response<pb::ConfirmChildFaultResponse>, Status> {
        let l = self.leadership.leading()?;
        let r = r.into_inner();
        let q = super::child_fault::FaultQuestion {
            volume: parse_uuid(&r.volume)?,
            node: r.node,
            key: r.key,
            child: r.child,
            reason: r.reason,
        };
        let res = l
            .volumes
            .confirm_child_fault(&q)
            .await
            .map_err(Status::from);
        self.counted("confirm_child_fault", res)
            .map(|()| Response::new(pb::ConfirmChildFaultResponse {}))
    }
}

#[tonic::async_trait]
impl Cluster for Service {
    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let l = self.leadership.leading()?;
        let n = nexuses_per_node(&l.volumes).await?;
        let nodes = l
            .registry
            .list()
            .await?
            .into_iter()
            .map(|v| node(v, &n))
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_node(&self, r: Request<pb::GetNodeRequest>) -> Result<Response<pb::Node>, Status> {
        let l = self.leadership.leading()?;
        let n = nexuses_per_node(&l.volumes).await?;
        Ok(Response::new(node(
            l.registry.get(&r.into_inner().name).await?,
            &n,
        )))
    }

    async fn create_pool(
        &self,
        r: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::ManagedPool>, Status> {
        let r: Result<Response<pb::ManagedPool>, Status> = async {
            let l = self.leadership.leading()?;
            let r = r.into_inner();
            let record = l.pools.create(&r.node, &r.name, &r.disk).await?;
            let reported = l
                .registry
                .get(&r.node)
                .await
                .ok()
                .and_then(|n| n.record.status.pools.into_iter().find(|p| p.name == r.name));
            Ok(Response::new(managed(PoolView { record, reported })))
        }
        .await;
        self.counted("create_pool", r)
    }

    async fn delete_pool(
        &self,
        r: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::DeletePoolResponse>, Status> {
        let r: Result<Response<pb::DeletePoolResponse>, Status> = async {
            let l = self.leadership.leading()?;
            let r = r.into_inner();
            let holders = l.volumes.pool_holders(&r.node, &r.name);
            l.pools.delete(&r.node, &r.name, holders).await?;
            Ok(Response::new(pb::DeletePoolResponse {}))
        }
        .await;
        self.counted("delete_pool", r)
    }

    async fn set_volume_replicas(
        &self,
        r: Request<pb::SetVolumeReplicasRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r: Result<Response<pb::Volume>, Status> = async {
            let l = self.leadership.leading()?;
            let r = r.into_inner();
            let v = l
                .volumes
                .set_replicas(parse_uuid(&r.uuid)?, r.replicas)
                .await?;
            Ok(Response::new(volume(&l.volumes, v).await))
        }
        .await;
        self.counted("set_volume_replicas", r)
    }

    async fn expand_volume(
        &self,
        r: Request<pb::ExpandVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r: Result<Response<pb::Volume>, Status> = async {
            let l = self.leadership.leading()?;
            let r = r.into_inner();
            let v = l.volumes.expand(parse_uuid(&r.uuid)?, r.size_bytes).await?;
            Ok(Response::new(volume(&l.volumes, v).await))
        }
        .await;
        self.counted("expand_volume", r)
    }

    async fn report_path_failure(
        &self,
        r: Request<pb::ReportPathFailureRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r: Result<Response<pb::Volume>, Status> = async {
            let l = self.leadership.leading()?;
            let r = r.into_inner();
            if r.node.is_empty() {
                return Err(Status::invalid_argument("a report names its node"));
            }
            // A node not registered (yet: its first registration on its way) is asked to register, not told of a
            // volume that is not there: FAILED_PRECONDITION, as for a host not its own.
            l.hosts
                .check_report(&r.node, &r.host_nqn)
                .await
                .map_err(|e| match e {
                    HostError::NotFound(_) => Status::failed_precondition(e.to_string()),
                    e => Status::from(e),
                })?;
            let uuid = r
                .nqn
                .strip_prefix(&proto::names::volume_nqn(""))
                .and_then(|u| uuid::Uuid::parse_str(u).ok());
            let v = l
                .volumes
                .report_path_failure(switchover::PathReport {
                    node: r.node,
                    host_nqn: r.host_nqn,
                    nqn: r.nqn,
                    address: r.address,
                    seen_ms: r.seen_unix_ms,
                })
                .await
                .map_err(|e| match uuid {
                    Some(u) => super::volumes::not_the_volume_missing(u, e),
                    None => e,
                })?;
            Ok(Response::new(volume(&l.volumes, v).await))
        }
        .await;
        self.counted("report_path_failure", r)
    }

    async fn register_host(
        &self,
        r: Request<pb::RegisterHostRequest>,
    ) -> Result<Response<pb::RegisterHostResponse>, Status> {
        let l = self.leadership.leading()?;
        let r = r.into_inner();
        l.hosts
            .register(HostSpec {
                node: r.node,
                host_nqns: r.host_nqns,
                version: r.version,
            })
            .await?;
        Ok(Response::new(pb::RegisterHostResponse {
            heartbeat_ms: hosts::HEARTBEAT.as_millis() as u64,
        }))
    }

    async fn list_hosts(
        &self,
        _: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        let l = self.leadership.leading()?;
        let hosts = l.hosts.list().await?.into_iter().map(host).collect();
        Ok(Response::new(pb::ListHostsResponse { hosts }))
    }

    async fn delete_host(
        &self,
        r: Request<pb::DeleteHostRequest>,
    ) -> Result<Response<pb::DeleteHostResponse>, Status> {
        let r: Result<Response<pb::DeleteHostResponse>, Status> = async {
            let l = self.leadership.leading()?;
            let node = r.into_inner().node;
            if node.is_empty() {
                return Err(Status::invalid_argument("no node name"));
            }
            let Some(record) = l.hosts.get(&node).await? else {
                return Err(HostError::NotFound(node).into());
            };
            published_to_node(&l.volumes, &record).await?;
            let gone = l.hosts.remove(&node).await?;
            // A publish that checked the record before it went: put it back.
            if let Err(e) = published_to_node(&l.volumes, &gone).await {
                l.hosts.restore(&gone).await?;
                return Err(e);
            }
            Ok(Response::new(pb::DeleteHostResponse {}))
        }
        .await;
        self.counted("delete_host", r)
    }

    async fn delete_node(
        &self,
        r: Request<pb::DeleteNodeRequest>,
    ) -> Result<Response<pb::DeleteNodeResponse>, Status> {
        let r: Result<Response<pb::DeleteNodeResponse>, Status> = async {
            let l = self.leadership.leading()?;
            let name = r.into_inner().name;
            if name.is_empty() {
                return Err(Status::invalid_argument("no node name"));
            }
            l.registry.get(&name).await?;
            for v in l.volumes.list().await? {
                let what = if v.nexus.as_ref().is_some_and(|n| n.node == name) {
                    "its target (nexus)"
                } else if v.replicas.iter().any(|r| r.node == name) {
                    "a replica"
                } else {
                    continue;
                };
                return Err(Status::failed_precondition(format!(
                    "volume {} has {what} on node {name}: move it off first (set the volume's replicas, or let \
                     healing replace them)",
                    v.uuid
                )));
            }
            let garbage = l.volumes.garbage_on(&name).await?;
            let pools = format!("{}{name}/", super::pool::PREFIX);
            l.registry.forget(&name, &garbage, &[pools]).await?;
            Ok(Response::new(pb::DeleteNodeResponse {}))
        }
        .await;
        self.counted("delete_node", r)
    }

    async fn cordon_node(
        &self,
        r: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let r: Result<Response<pb::Node>, Status> = async {
            let l = self.leadership.leading()?;
            let v = l.registry.set_cordoned(&r.into_inner().name, true).await?;
            Ok(Response::new(node(v, &nexuses_per_node(&l.volumes).await?)))
        }
        .await;
        self.counted("cordon_node", r)
    }

    async fn uncordon_node(
        &self,
        r: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let r: Result<Response<pb::Node>, Status> = async {
            let l = self.leadership.leading()?;
            let v = l.registry.set_cordoned(&r.into_inner().name, false).await?;
            Ok(Response::new(node(v, &nexuses_per_node(&l.volumes).await?)))
        }
        .await;
        self.counted("uncordon_node", r)
    }

    async fn drain_node(
        &self,
        r: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let r: Result<Response<pb::Node>, Status> = async {
            let l = self.leadership.leading()?;
            let v = l.registry.set_draining(&r.into_inner().name).await?;
            Ok(Response::new(node(v, &nexuses_per_node(&l.volumes).await?)))
        }
        .await;
        self.counted("drain_node", r)
    }

    async fn create_volume(
        &self,
        r: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r: Result<Response<pb::Volume>, Status> = async {
            let l = self.leadership.leading()?;
            let r = r.into_inner();
            let spec = VolumeSpec {
                size: r.size_bytes,
                replicas: r.replicas,
                placement: Placement {
                    node_selector: r.node_selector.into_iter().collect(),
                    topology: r
                        .topology
                        .into_iter()
                        .map(|s| s.labels.into_iter().collect())
                        .collect(),
                    pool_selector: r.pool_selector.into_iter().collect(),
                },
                source_snapshot: match r.source_snapshot.as_str() {
                    "" => None,
                    s => Some(parse_uuid(s)?),
                },
                source_volume: None,
                context: r.context.into_iter().collect(),
            };
            let uuid = parse_uuid(&r.uuid)?;
            let v = match r.source_volume.as_str() {
                "" => l.volumes.create(uuid, spec).await?,
                s => {
                    l.volumes
                        .create_from_volume(uuid, spec, parse_uuid(s)?)
                        .await?
                }
            };
            Ok(Response::new(volume(&l.volumes, v).await))
        }
        .await;
        self.counted("create_volume", r)
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r: Result<Response<pb::DeleteVolumeResponse>, Status> = async {
            let l = self.leadership.leading()?;
            l.volumes.delete(parse_uuid(&r.into_inner().uuid)?).await?;
            Ok(Response::new(pb::DeleteVolumeResponse {}))
        }
        .await;
        self.counted("delete_volume", r)
    }

    async fn get_volume(
        &self,
        r: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let l = self.leadership.leading()?;
        let uuid = parse_uuid(&r.into_inner().uuid)?;
        // The state comes from the nexus, the rest from the record: the record is read again after the nexus, and
        // the answer made again if it changed meanwhile, so that one never pairs a nexus with a record older than it
        // (a replacement healthy beside the reason it was missing for).
        let mut v = l.volumes.get(uuid).await?;
        for _ in 0..3 {
            let answer = volume(&l.volumes, v.clone()).await;
            let again = l.volumes.get(uuid).await?;
            if again == v {
                return Ok(Response::new(answer));
            }
            v = again;
        }
        Ok(Response::new(volume(&l.volumes, v).await))
    }

    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let l = self.leadership.leading()?;
        let r = r.into_inner();
        let after = match r.starting_token.as_str() {
            "" => None,
            t => Some(uuid::Uuid::parse_str(t).map_err(|_| {
                Status::aborted(format!("starting_token {t:?} is not one this agent gave"))
            })?),
        };
        let mut all = l.volumes.list().await?;
        all.sort_by_key(|v| v.uuid);
        let page: Vec<VolumeRecord> = all
            .into_iter()
            .filter(|v| after.is_none_or(|a| v.uuid > a))
            .take(if r.max_entries == 0 {
                usize::MAX
            } else {
                r.max_entries as usize + 1
            })
            .collect();
        let more = r.max_entries != 0 && page.len() > r.max_entries as usize;
        let mut volumes = Vec::new();
        for v in page.into_iter().take(if more {
            r.max_entries as usize
        } else {
            usize::MAX
        }) {
            volumes.push(volume(&l.volumes, v).await);
        }
        let next_token = if more {
            volumes.last().map(|v| v.uuid.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListVolumesResponse {
            volumes,
            next_token,
        }))
    }

    async fn publish_volume(
        &self,
        r: Request<pb::PublishVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r: Result<Response<pb::Volume>, Status> = async {
            let l = self.leadership.leading()?;
            let r = r.into_inner();
            if r.require_known_node
                && !r.node.is_empty()
                && l.registry.get(&r.node).await.is_err()
                && l.hosts.get(&r.node).await?.is_none()
            {
                return Err(Status::not_found(format!(
                    "node {:?} is not known: no io-engine and no node agent has registered it",
                    r.node
                )));
            }
            let uuid = parse_uuid(&r.uuid)?;
            let v = l
                .volumes
                .publish(uuid, &r.host_nqn, &r.node, r.multi_host)
                .await
                .map_err(|e| super::volumes::not_the_volume_missing(uuid, e))?;
            Ok(Response::new(volume(&l.volumes, v).await))
        }
        .await;
        self.counted("publish_volume", r)
    }

    async fn unpublish_volume(
        &self,
        r: Request<pb::UnpublishVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r: Result<Response<pb::Volume>, Status> = async {
            let l = self.leadership.leading()?;
            let r = r.into_inner();
            let host = (!r.host_nqn.is_empty()).then_some(r.host_nqn.as_str());
            let uuid = parse_uuid(&r.uuid)?;
            let v = l
                .volumes
                .unpublish(uuid, host)
                .await
                .map_err(|e| super::volumes::not_the_volume_missing(uuid, e))?;
            Ok(Response::new(volume(&l.volumes, v).await))
        }
        .await;
        self.counted("unpublish_volume", r)
    }

    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::VolumeSnapshot>, Status> {
        let r: Result<Response<pb::VolumeSnapshot>, Status> = async {
            let l = self.leadership.leading()?;
            let r = r.into_inner();
            let s = l
                .volumes
                .create_snapshot(parse_uuid(&r.volume)?, parse_uuid(&r.uuid)?, None)
                .await?;
            Ok(Response::new(snapshot(s)))
        }
        .await;
        self.counted("create_snapshot", r)
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r: Result<Response<pb::DeleteSnapshotResponse>, Status> = async {
            let l = self.leadership.leading()?;
            l.volumes
                .delete_snapshot(parse_uuid(&r.into_inner().uuid)?)
                .await?;
            Ok(Response::new(pb::DeleteSnapshotResponse {}))
        }
        .await;
        self.counted("delete_snapshot", r)
    }

    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let l = self.leadership.leading()?;
        let r = r.into_inner();
        let volume = match r.volume.as_str() {
            "" => None,
            v => Some(parse_uuid(v)?),
        };
        let snapshots = l
            .volumes
            .list_snapshots(volume)
            .await?
            .into_iter()
            .map(snapshot)
            .collect();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn get_capacity(
        &self,
        r: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let l = self.leadership.leading()?;
        let r = r.into_inner();
        let placement = Placement {
            node_selector: r.node_selector.into_iter().collect(),
            topology: r
                .topology
                .into_iter()
                .map(|s| s.labels.into_iter().collect())
                .collect(),
            pool_selector: r.pool_selector.into_iter().collect(),
        };
        let nodes: Vec<_> = l
            .registry
            .list()
            .await?
            .into_iter()
            .map(|v| v.record)
            .collect();
        let (available_bytes, maximum_volume_size) =
            super::scheduler::capacity(&nodes, &placement, r.replicas as usize);
        Ok(Response::new(pb::GetCapacityResponse {
            available_bytes,
            maximum_volume_size,
            largest_possible_volume_size: super::scheduler::largest_ever(
                &nodes,
                &placement,
                r.replicas as usize,
            ),
        }))
    }

    async fn list_pools(
        &self,
        _: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let l = self.leadership.leading()?;
        let pools = l.pools.list().await?.into_iter().map(managed).collect();
        Ok(Response::new(pb::ListPoolsResponse { pools }))
    }
}

/// Serves both services on `listener` until `stop` fires.
pub async fn serve(
    leadership: Leadership,
    metrics: Arc<AgentMetrics>,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let svc = Service {
        leadership,
        metrics,
    };
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "cluster API listening");
    tonic::transport::Server::builder()
        .add_service(RegistrationServer::new(svc.clone()))
        .add_service(ClusterServer::new(svc))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            stop.cancelled_owned(),
        )
        .await
}
