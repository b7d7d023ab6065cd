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

use super::node::{NodeSpec, NodeState, PoolSpec};
use super::registry::{NodeView, Registry, RegistryError};
use super::store::StoreError;

/// What the services act on: the registry while this agent leads, else who leads.
#[derive(Clone, Default)]
pub struct Leadership {
    inner: Arc<RwLock<Option<Arc<Registry>>>>,
}

impl Leadership {
    pub fn lead(&self, r: Arc<Registry>) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    pub fn step_down(&self) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn registry(&self) -> Result<Arc<Registry>, Status> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                Status::unavailable("this cluster agent does not lead (yet); try another")
            })
    }
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        let msg = e.to_string();
        match e {
            RegistryError::InvalidArgument(_) => Status::invalid_argument(msg),
            RegistryError::NotFound(_) => Status::not_found(msg),
            RegistryError::Store(StoreError::InvalidArgument(_)) => Status::invalid_argument(msg),
            RegistryError::Store(_) => Status::unavailable(msg),
            RegistryError::Corrupt { .. } => Status::data_loss(msg),
        }
    }
}

fn pools(p: Vec<pb::Pool>) -> Vec<PoolSpec> {
    p.into_iter()
        .map(|p| PoolSpec {
            name: p.name,
            uuid: p.uuid,
            disk: p.disk,
            capacity: p.capacity,
            allocated: p.allocated,
            committed: p.committed,
        })
        .collect()
}

fn node(v: NodeView) -> pb::Node {
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
            })
            .collect(),
        instance: spec.instance,
        last_seen_ms_ago: v.last_seen_ago.map_or(0, |d| d.as_millis() as u64),
        state_since_ms: status.since_ms,
    }
}

#[derive(Clone)]
struct Service {
    leadership: Leadership,
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
        };
        reg.register(spec, pools(r.pools)).await?;
        Ok(Response::new(pb::RegisterResponse {
            heartbeat_interval_ms: reg.config.heartbeat.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        r: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let reg = self.leadership.registry()?;
        let r = r.into_inner();
        let known = reg.heartbeat(&r.node, &r.instance, pools(r.pools)).await?;
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
        reg.deregister(&r.node, &r.instance).await?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }
}

#[tonic::async_trait]
impl Cluster for Service {
    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let reg = self.leadership.registry()?;
        let nodes = reg.list().await?.into_iter().map(node).collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_node(&self, r: Request<pb::GetNodeRequest>) -> Result<Response<pb::Node>, Status> {
        let reg = self.leadership.registry()?;
        Ok(Response::new(node(reg.get(&r.into_inner().name).await?)))
    }
}

/// Serves both services on `listener` until `stop` fires.
pub async fn serve(
    leadership: Leadership,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let svc = Service { leadership };
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
