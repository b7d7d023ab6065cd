//! A simulated io-engine for the scale benchmark: the engine API (`proto::engine`) served from memory, many per
//! process, each registered with the cluster agent and sending heartbeats like a real one. Pools, replicas and
//! nexuses are bookkeeping only (no data); a nexus child added to a nexus "rebuilds" for a set time and then turns
//! Healthy. A fault makes a replica vanish from its engine and its child Faulted in the nexus, and reports the
//! change at once, as io-engine does; the time from the fault to the replacement child's arrival is recorded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::cluster as cpb;
use proto::cluster::registration_client::RegistrationClient;
use proto::engine as pb;
use proto::engine::engine_server::{Engine, EngineServer};
use proto::names;
use tonic::{Request, Response, Status};

/// Capacity of each simulated pool.
pub const POOL_BYTES: u64 = 64 << 40;
/// How long a simulated rebuild takes.
const REBUILD: Duration = Duration::from_millis(200);

struct SimNexus {
    children: Vec<pb::NexusChild>,
    /// When each rebuilding child turns Healthy.
    rebuild_done: BTreeMap<String, Instant>,
    size: u64,
    published: bool,
}

#[derive(Default)]
struct State {
    replicas: BTreeMap<String, pb::Replica>,
    nexuses: BTreeMap<String, SimNexus>,
    /// Nexuses with a child change not yet reported.
    changed: BTreeSet<String>,
    /// Faults injected into this engine's nexuses: nexus → (when, the faulted child's URI).
    faults: BTreeMap<String, (Instant, String)>,
    /// Replicas created or destroyed: the pools' generation (one counter for both pools; a real engine counts
    /// each pool's metadata changes).
    changes: u64,
}

/// One simulated node.
pub struct SimEngine {
    pub name: String,
    pub endpoint: String,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    /// Fault-to-replacement times of this engine's nexuses.
    pub replaced: Arc<Mutex<Vec<Duration>>>,
}

impl SimEngine {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pools(&self) -> Vec<pb::Pool> {
        let st = self.state();
        ["a", "b"]
            .iter()
            .map(|p| {
                let committed: u64 = st
                    .replicas
                    .values()
                    .filter(|r| r.pool == *p)
                    .map(|r| r.size)
                    .sum();
                pb::Pool {
                    name: p.to_string(),
                    uuid: uuid::Uuid::new_v5(
                        &uuid::Uuid::NAMESPACE_OID,
                        format!("{}/{p}", self.name).as_bytes(),
                    )
                    .to_string(),
                    disk: format!("/sim/{}/{p}", self.name),
                    capacity: POOL_BYTES,
                    allocated: 0,
                    committed,
                    cluster_size: 1 << 20,
                    block_size: 512,
                    replicas: st.replicas.values().filter(|r| r.pool == *p).count() as u32,
                    incarnation: 1,
                    applied: st.changes,
                    ..Default::default()
                }
            })
            .collect()
    }

    fn nexus_view(uuid: &str, n: &mut SimNexus) -> pb::Nexus {
        let now = Instant::now();
        for c in &mut n.children {
            if c.state == pb::ChildState::Rebuilding as i32
                && n.rebuild_done.get(&c.uri).is_some_and(|t| *t <= now)
            {
                c.state = pb::ChildState::Healthy as i32;
                n.rebuild_done.remove(&c.uri);
            }
        }
        let state = if n
            .children
            .iter()
            .all(|c| c.state == pb::ChildState::Healthy as i32)
        {
            pb::NexusState::Online
        } else if n
            .children
            .iter()
            .any(|c| c.state == pb::ChildState::Healthy as i32)
        {
            pb::NexusState::Degraded
        } else {
            pb::NexusState::Faulted
        };
        pb::Nexus {
            uuid: uuid.to_string(),
            size_bytes: n.size,
            state: state as i32,
            children: n.children.clone(),
            nqn: if n.published {
                names::volume_nqn(uuid)
            } else {
                String::new()
            },
            rebuilds: vec![],
        }
    }

    /// Faults the first healthy remote child of a nexus this engine runs: its replica vanishes from `holder` (the
    /// engine that had it), the child turns Faulted and the change is reported at once. `None` when the nexus has no
    /// such child (or is not here).
    pub fn fault_child(
        &self,
        nexus: &str,
        engines: &BTreeMap<String, Arc<SimEngine>>,
    ) -> Option<String> {
        let uri = {
            let mut st = self.state();
            let n = st.nexuses.get_mut(nexus)?;
            let c = n.children.iter_mut().find(|c| {
                c.state == pb::ChildState::Healthy as i32 && !c.uri.starts_with("local:")
            })?;
            c.state = pb::ChildState::Faulted as i32;
            c.reason = "simulated disk failure".into();
            let uri = c.uri.clone();
            st.faults
                .insert(nexus.to_string(), (Instant::now(), uri.clone()));
            st.changed.insert(nexus.to_string());
            uri
        };
        // The replica is lost: its engine no longer lists it (so the agent replaces it instead of rejoining it).
        let replica = uri.rsplit(":replica-").next()?.to_string();
        for e in engines.values() {
            e.state().replicas.remove(&replica);
        }
        self.wake.notify_one();
        Some(uri)
    }

    /// The nexuses this engine runs, with their children's replicas.
    pub fn nexus_names(&self) -> Vec<String> {
        self.state().nexuses.keys().cloned().collect()
    }

    /// Registers with the agent and sends heartbeats (at once when a nexus changed) until the task is dropped.
    pub async fn register_and_beat(self: Arc<Self>, agent: String) {
        let instance = uuid::Uuid::new_v4().to_string();
        'register: loop {
            let Ok(mut c) = RegistrationClient::connect(agent.clone()).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let reg = cpb::RegisterRequest {
                node: self.name.clone(),
                engine_endpoint: self.endpoint.clone(),
                // Recorded, never connected to (the agent takes only an IP address and a port).
                nvmf_listeners: vec!["127.0.0.1:4420".into()],
                cntlid_min: 1,
                cntlid_max: 0xffef,
                pools: self.pools().into_iter().map(to_cluster_pool).collect(),
                instance: instance.clone(),
                labels: Default::default(),
            };
            let every = match c.register(reg).await {
                Ok(r) => Duration::from_millis(r.into_inner().heartbeat_interval_ms.max(10) as u64),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = self.wake.notified() => {}
                }
                let changed: Vec<String> = std::mem::take(&mut self.state().changed)
                    .into_iter()
                    .collect();
                let hb = cpb::HeartbeatRequest {
                    node: self.name.clone(),
                    instance: instance.clone(),
                    pools: self.pools().into_iter().map(to_cluster_pool).collect(),
                    changed_nexuses: changed.clone(),
                };
                match c.heartbeat(hb).await {
                    Ok(r) if !r.get_ref().register_again => {}
                    _ => {
                        self.state().changed.extend(changed);
                        continue 'register;
                    }
                }
            }
        }
    }
}

fn to_cluster_pool(p: pb::Pool) -> cpb::Pool {
    cpb::Pool {
        name: p.name,
        uuid: p.uuid,
        disk: p.disk,
        capacity: p.capacity,
        allocated: p.allocated,
        committed: p.committed,
        disk_errors: p.disk_errors,
        labels: Default::default(),
        block_size: p.block_size,
        disk_full: p.disk_full,
        disk_room: p.disk_room,
        replica_room: p.replica_room,
        incarnation: p.incarnation,
        applied: p.applied,
    }
}

/// Starts `count` simulated engines on 127.0.0.1, each with its own port; returns them by name.
pub async fn start(
    count: usize,
    replaced: Arc<Mutex<Vec<Duration>>>,
) -> BTreeMap<String, Arc<SimEngine>> {
    let mut all = BTreeMap::new();
    for i in 0..count {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let e = Arc::new(SimEngine {
            name: format!("sim-{i:04}"),
            endpoint: format!("http://{addr}"),
            state: Mutex::new(State::default()),
            wake: tokio::sync::Notify::new(),
            replaced: replaced.clone(),
        });
        let svc = EngineServer::new(Svc(e.clone()));
        tokio::spawn(async move {
            let incoming = tokio_stream_listener(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        all.insert(e.name.clone(), e);
    }
    all
}

fn tokio_stream_listener(
    l: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

struct Svc(Arc<SimEngine>);

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "the simulated engine has no {what}"
    )))
}

#[tonic::async_trait]
impl Engine for Svc {
    async fn get_node(
        &self,
        _: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        Ok(Response::new(pb::NodeInfo {
            node_name: self.0.name.clone(),
            version: "sim".into(),
            ..Default::default()
        }))
    }
    async fn create_subsystem(
        &self,
        _: Request<pb::CreateSubsystemRequest>,
    ) -> Result<Response<pb::Subsystem>, Status> {
        unimplemented("subsystems")
    }
    async fn delete_subsystem(
        &self,
        _: Request<pb::DeleteSubsystemRequest>,
    ) -> Result<Response<pb::DeleteSubsystemResponse>, Status> {
        unimplemented("subsystems")
    }
    async fn list_subsystems(
        &self,
        _: Request<pb::ListSubsystemsRequest>,
    ) -> Result<Response<pb::ListSubsystemsResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn add_namespace(
        &self,
        _: Request<pb::AddNamespaceRequest>,
    ) -> Result<Response<pb::Subsystem>, Status> {
        unimplemented("namespaces")
    }
    async fn remove_namespace(
        &self,
        _: Request<pb::RemoveNamespaceRequest>,
    ) -> Result<Response<pb::Subsystem>, Status> {
        unimplemented("namespaces")
    }
    async fn allow_host(
        &self,
        _: Request<pb::HostRequest>,
    ) -> Result<Response<pb::Subsystem>, Status> {
        unimplemented("subsystems")
    }
    async fn disallow_host(
        &self,
        _: Request<pb::HostRequest>,
    ) -> Result<Response<pb::Subsystem>, Status> {
        unimplemented("subsystems")
    }
    async fn add_listener(
        &self,
        _: Request<pb::AddListenerRequest>,
    ) -> Result<Response<pb::Listener>, Status> {
        unimplemented("listeners")
    }
    async fn remove_listener(
        &self,
        _: Request<pb::RemoveListenerRequest>,
    ) -> Result<Response<pb::RemoveListenerResponse>, Status> {
        unimplemented("listeners")
    }
    async fn list_listeners(
        &self,
        _: Request<pb::ListListenersRequest>,
    ) -> Result<Response<pb::ListListenersResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn set_ana_state(
        &self,
        _: Request<pb::SetAnaStateRequest>,
    ) -> Result<Response<pb::SetAnaStateResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn create_nexus(
        &self,
        r: Request<pb::CreateNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let mut st = self.0.state();
        if let Some(n) = st.nexuses.get_mut(&r.uuid) {
            let have: Vec<&str> = n.children.iter().map(|c| c.uri.as_str()).collect();
            if have != r.children.iter().map(|c| c.as_str()).collect::<Vec<_>>() {
                return Err(Status::already_exists(format!(
                    "nexus {} with other children",
                    r.uuid
                )));
            }
            return Ok(Response::new(SimEngine::nexus_view(&r.uuid, n)));
        }
        let mut n = SimNexus {
            children: r
                .children
                .iter()
                .map(|uri| pb::NexusChild {
                    uri: uri.clone(),
                    state: pb::ChildState::Healthy as i32,
                    ..Default::default()
                })
                .collect(),
            rebuild_done: BTreeMap::new(),
            size: 0,
            published: false,
        };
        let view = SimEngine::nexus_view(&r.uuid, &mut n);
        st.nexuses.insert(r.uuid, n);
        Ok(Response::new(view))
    }
    async fn destroy_nexus(
        &self,
        r: Request<pb::DestroyNexusRequest>,
    ) -> Result<Response<pb::DestroyNexusResponse>, Status> {
        self.0.state().nexuses.remove(&r.into_inner().uuid);
        Ok(Response::new(pb::DestroyNexusResponse { clean: true }))
    }
    async fn shutdown_nexus(
        &self,
        r: Request<pb::ShutdownNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let uuid = r.into_inner().uuid;
        let mut st = self.0.state();
        let n = st
            .nexuses
            .get_mut(&uuid)
            .ok_or_else(|| Status::not_found(uuid.clone()))?;
        Ok(Response::new(SimEngine::nexus_view(&uuid, n)))
    }
    async fn list_nexuses(
        &self,
        _: Request<pb::ListNexusesRequest>,
    ) -> Result<Response<pb::ListNexusesResponse>, Status> {
        let mut st = self.0.state();
        let nexuses = st
            .nexuses
            .iter_mut()
            .map(|(u, n)| SimEngine::nexus_view(u, n))
            .collect();
        Ok(Response::new(pb::ListNexusesResponse { nexuses }))
    }
    async fn publish_nexus(
        &self,
        r: Request<pb::PublishNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let uuid = r.into_inner().uuid;
        let mut st = self.0.state();
        let n = st
            .nexuses
            .get_mut(&uuid)
            .ok_or_else(|| Status::not_found(uuid.clone()))?;
        n.published = true;
        Ok(Response::new(SimEngine::nexus_view(&uuid, n)))
    }
    async fn unpublish_nexus(
        &self,
        r: Request<pb::UnpublishNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let uuid = r.into_inner().uuid;
        let mut st = self.0.state();
        let n = st
            .nexuses
            .get_mut(&uuid)
            .ok_or_else(|| Status::not_found(uuid.clone()))?;
        n.published = false;
        Ok(Response::new(SimEngine::nexus_view(&uuid, n)))
    }
    async fn add_child(&self, r: Request<pb::ChildRequest>) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let mut st = self.0.state();
        let fault = st.faults.remove(&r.uuid);
        let n = st
            .nexuses
            .get_mut(&r.uuid)
            .ok_or_else(|| Status::not_found(r.uuid.clone()))?;
        n.children.retain(|c| c.uri != r.uri);
        n.children.push(pb::NexusChild {
            uri: r.uri.clone(),
            state: pb::ChildState::Rebuilding as i32,
            ..Default::default()
        });
        n.rebuild_done
            .insert(r.uri.clone(), Instant::now() + REBUILD);
        let view = SimEngine::nexus_view(&r.uuid, n);
        match fault {
            // The replacement's rebuild starts now.
            Some((when, faulted)) if faulted != r.uri => {
                self.0
                    .replaced
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(when.elapsed());
            }
            Some(f) => {
                st.faults.insert(r.uuid.clone(), f);
            }
            None => {}
        }
        Ok(Response::new(view))
    }
    async fn remove_child(
        &self,
        r: Request<pb::ChildRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let mut st = self.0.state();
        let n = st
            .nexuses
            .get_mut(&r.uuid)
            .ok_or_else(|| Status::not_found(r.uuid.clone()))?;
        n.children.retain(|c| c.uri != r.uri);
        n.rebuild_done.remove(&r.uri);
        Ok(Response::new(SimEngine::nexus_view(&r.uuid, n)))
    }
    async fn fault_child(
        &self,
        _: Request<pb::ChildRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        unimplemented("fault_child")
    }
    async fn inject_fault(
        &self,
        _: Request<pb::InjectFaultRequest>,
    ) -> Result<Response<pb::InjectFaultResponse>, Status> {
        unimplemented("fault injection (faults are simulated)")
    }
    async fn create_pool(
        &self,
        _: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        unimplemented("pool creation (its pools are fixed)")
    }
    async fn import_pool(
        &self,
        _: Request<pb::ImportPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        unimplemented("pool import (its pools are fixed)")
    }
    async fn destroy_pool(
        &self,
        _: Request<pb::DestroyPoolRequest>,
    ) -> Result<Response<pb::DestroyPoolResponse>, Status> {
        unimplemented("pool destruction (its pools are fixed)")
    }
    async fn list_pools(
        &self,
        _: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        Ok(Response::new(pb::ListPoolsResponse {
            pools: self.0.pools(),
            pending: Vec::new(),
        }))
    }
    async fn create_replica(
        &self,
        r: Request<pb::CreateReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let r = r.into_inner();
        if r.pool != "a" && r.pool != "b" {
            return Err(Status::not_found(format!("pool {}", r.pool)));
        }
        let mut st = self.0.state();
        if let Some(x) = st.replicas.get(&r.uuid) {
            if x.size != r.size || x.pool != r.pool {
                return Err(Status::already_exists(format!(
                    "replica {} differs",
                    r.uuid
                )));
            }
            return Ok(Response::new(x.clone()));
        }
        let x = pb::Replica {
            uuid: r.uuid.clone(),
            pool: r.pool,
            size: r.size,
            nqn: names::replica_nqn(&r.uuid),
            uri: format!(
                "nvmf://{}:4420/{}",
                self.0.name,
                names::replica_nqn(&r.uuid)
            ),
            allowed_hosts: r.allowed_hosts,
            ..Default::default()
        };
        st.changes += 1;
        let x = pb::Replica {
            pool_incarnation: 1,
            pool_applied: st.changes,
            ..x
        };
        st.replicas.insert(r.uuid, x.clone());
        Ok(Response::new(x))
    }
    async fn destroy_replica(
        &self,
        r: Request<pb::DestroyReplicaRequest>,
    ) -> Result<Response<pb::DestroyReplicaResponse>, Status> {
        let mut st = self.0.state();
        if st.replicas.remove(&r.into_inner().uuid).is_some() {
            st.changes += 1;
        }
        Ok(Response::new(Default::default()))
    }
    async fn list_replicas(
        &self,
        _: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        Ok(Response::new(pb::ListReplicasResponse {
            replicas: self.0.state().replicas.values().cloned().collect(),
        }))
    }
    async fn share_replica(
        &self,
        r: Request<pb::ShareReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let r = r.into_inner();
        let mut st = self.0.state();
        let x = st
            .replicas
            .get_mut(&r.uuid)
            .ok_or_else(|| Status::not_found(format!("replica {}", r.uuid)))?;
        x.allowed_hosts = r.allowed_hosts;
        Ok(Response::new(x.clone()))
    }
    async fn unshare_replica(
        &self,
        r: Request<pb::UnshareReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let r = r.into_inner();
        let st = self.0.state();
        let x = st
            .replicas
            .get(&r.uuid)
            .ok_or_else(|| Status::not_found(format!("replica {}", r.uuid)))?;
        Ok(Response::new(x.clone()))
    }
    async fn create_snapshot(
        &self,
        _: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        unimplemented("snapshots")
    }
    async fn destroy_snapshot(
        &self,
        _: Request<pb::DestroySnapshotRequest>,
    ) -> Result<Response<pb::DestroySnapshotResponse>, Status> {
        unimplemented("snapshots")
    }
    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn create_clone(
        &self,
        _: Request<pb::CreateCloneRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        unimplemented("clones")
    }
    async fn get_reservation(
        &self,
        _: Request<pb::GetReservationRequest>,
    ) -> Result<Response<pb::Reservation>, Status> {
        unimplemented("reservations")
    }
    async fn resize_replica(
        &self,
        r: Request<pb::ResizeReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let r = r.into_inner();
        let mut st = self.0.state();
        let x = st
            .replicas
            .get_mut(&r.uuid)
            .ok_or_else(|| Status::not_found(r.uuid.clone()))?;
        if r.size < x.size {
            return Err(Status::invalid_argument("replicas never shrink"));
        }
        x.size = r.size;
        Ok(Response::new(x.clone()))
    }

    async fn resize_nexus(
        &self,
        r: Request<pb::ResizeNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let mut st = self.0.state();
        let n = st
            .nexuses
            .get_mut(&r.uuid)
            .ok_or_else(|| Status::not_found(r.uuid.clone()))?;
        if r.size < n.size {
            return Err(Status::invalid_argument("volumes never shrink"));
        }
        n.size = r.size;
        Ok(Response::new(SimEngine::nexus_view(&r.uuid, n)))
    }

    async fn snapshot_nexus(
        &self,
        _: Request<pb::SnapshotNexusRequest>,
    ) -> Result<Response<pb::SnapshotNexusResponse>, Status> {
        unimplemented("snapshots")
    }
}
