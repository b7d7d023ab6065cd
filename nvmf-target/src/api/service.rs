//! The `Engine` gRPC service: validates requests, calls the engine, converts the answers.

use proto::engine as pb;
use proto::engine::engine_server::Engine as EngineApi;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, NexusOptions, ReservationKeys};
use crate::protocol::nqn::Nqn;
use crate::target::SubsystemSpec;

use super::convert;
use super::pools;
use super::status::invalid;

pub struct EngineService {
    engine: Engine,
}

impl EngineService {
    pub fn new(engine: Engine) -> EngineService {
        EngineService { engine }
    }

    fn nexus_reply(&self, uuid: &uuid::Uuid) -> Result<Response<pb::Nexus>, Status> {
        let (n, nqn) = self
            .engine
            .nexus(uuid)
            .ok_or_else(|| Status::not_found(format!("nexus {uuid}")))?;
        Ok(Response::new(convert::nexus(uuid, &n, nqn.as_ref())))
    }

    /// FAILED_PRECONDITION for a subsystem the engine manages (a nexus's, a pool volume's): it is made, unmade and
    /// given namespaces only through its owner's calls (its hosts change through AllowHost and DisallowHost: the
    /// cluster agent adds a volume's further hosts so).
    fn not_managed(&self, nqn: &str) -> Result<(), Status> {
        match self.engine.subsystem_owner(nqn) {
            Some(owner) => Err(Status::failed_precondition(format!(
                "subsystem {nqn} is {owner}'s: it changes only through that object's own calls"
            ))),
            None => Ok(()),
        }
    }

    fn subsystem_reply(&self, nqn: &str) -> Result<Response<pb::Subsystem>, Status> {
        let s = self
            .engine
            .target()
            .subsystem(nqn)
            .ok_or_else(|| Status::not_found(format!("subsystem {nqn}")))?;
        Ok(Response::new(convert::subsystem(&self.engine, &s)))
    }
}

fn nqn(s: &str, what: &str) -> Result<Nqn, Status> {
    Nqn::parse(s).map_err(|e| invalid(format!("{what}: {e}")))
}

fn port_id(v: u32) -> Result<u16, Status> {
    u16::try_from(v).map_err(|_| invalid(format!("port id {v} does not fit in 16 bits")))
}

#[tonic::async_trait]
impl EngineApi for EngineService {
    #[tracing::instrument(skip_all)]
    async fn get_node(
        &self,
        _: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let cfg = &self.engine.config().target;
        let pools = self.engine.pools();
        Ok(Response::new(pb::NodeInfo {
            node_name: self.engine.node_name().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            listeners: self
                .engine
                .target()
                .listeners()
                .iter()
                .map(convert::listener)
                .collect(),
            min_cntlid: u32::from(cfg.cntlid_min),
            max_cntlid: u32::from(cfg.cntlid_max),
            pool_capacity: pools.iter().map(|p| p.pool.stats().capacity).sum(),
            pool_allocated: pools.iter().map(|p| p.pool.stats().allocated).sum(),
        }))
    }

    #[tracing::instrument(skip_all, fields(nqn = %r.get_ref().nqn))]
    async fn create_subsystem(
        &self,
        r: Request<pb::CreateSubsystemRequest>,
    ) -> Result<Response<pb::Subsystem>, Status> {
        let r = r.into_inner();
        self.not_managed(&r.nqn)?;
        let spec = SubsystemSpec {
            nqn: nqn(&r.nqn, "nqn")?,
            serial: r.serial,
            model: r.model,
            allow_any_host: r.allow_any_host,
            allowed_hosts: r.allowed_hosts,
            single_path: false,
        };
        let s = self.engine.target().create_subsystem(spec)?;
        Ok(Response::new(convert::subsystem(&self.engine, &s)))
    }

    #[tracing::instrument(skip_all, fields(nqn = %r.get_ref().nqn))]
    async fn delete_subsystem(
        &self,
        r: Request<pb::DeleteSubsystemRequest>,
    ) -> Result<Response<pb::DeleteSubsystemResponse>, Status> {
        let r = r.into_inner();
        nqn(&r.nqn, "nqn")?;
        self.not_managed(&r.nqn)?;
        self.engine.delete_subsystem(&r.nqn)?;
        Ok(Response::new(pb::DeleteSubsystemResponse {}))
    }

    async fn list_subsystems(
        &self,
        _: Request<pb::ListSubsystemsRequest>,
    ) -> Result<Response<pb::ListSubsystemsResponse>, Status> {
        let subsystems = self
            .engine
            .target()
            .subsystems()
            .iter()
            .map(|s| convert::subsystem(&self.engine, s))
            .collect();
        Ok(Response::new(pb::ListSubsystemsResponse { subsystems }))
    }

    #[tracing::instrument(skip_all, fields(nqn = %r.get_ref().nqn))]
    async fn add_namespace(
        &self,
        r: Request<pb::AddNamespaceRequest>,
    ) -> Result<Response<pb::Subsystem>, Status> {
        let r = r.into_inner();
        nqn(&r.nqn, "nqn")?;
        self.not_managed(&r.nqn)?;
        let spec = convert::export_spec(&r)?;
        // Opening a file may wait for a holder that just died to let go of it (seconds): off the runtime's workers.
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.add_namespace(&spec))
            .await
            .map_err(|e| Status::internal(format!("adding the namespace: {e}")))??;
        self.subsystem_reply(&r.nqn)
    }

    #[tracing::instrument(skip_all, fields(nqn = %r.get_ref().nqn, nsid = r.get_ref().nsid))]
    async fn remove_namespace(
        &self,
        r: Request<pb::RemoveNamespaceRequest>,
    ) -> Result<Response<pb::Subsystem>, Status> {
        let r = r.into_inner();
        nqn(&r.nqn, "nqn")?;
        self.not_managed(&r.nqn)?;
        self.engine.remove_namespace(&r.nqn, r.nsid)?;
        self.subsystem_reply(&r.nqn)
    }

    #[tracing::instrument(skip_all, fields(nqn = %r.get_ref().nqn, host = %r.get_ref().host_nqn))]
    async fn allow_host(
        &self,
        r: Request<pb::HostRequest>,
    ) -> Result<Response<pb::Subsystem>, Status> {
        let r = r.into_inner();
        nqn(&r.host_nqn, "host_nqn")?;
        self.engine.target().allow_host(&r.nqn, &r.host_nqn)?;
        self.subsystem_reply(&r.nqn)
    }

    #[tracing::instrument(skip_all, fields(nqn = %r.get_ref().nqn, host = %r.get_ref().host_nqn))]
    async fn disallow_host(
        &self,
        r: Request<pb::HostRequest>,
    ) -> Result<Response<pb::Subsystem>, Status> {
        let r = r.into_inner();
        self.engine.target().disallow_host(&r.nqn, &r.host_nqn)?;
        self.subsystem_reply(&r.nqn)
    }

    #[tracing::instrument(skip_all, fields(address = %r.get_ref().address))]
    async fn add_listener(
        &self,
        r: Request<pb::AddListenerRequest>,
    ) -> Result<Response<pb::Listener>, Status> {
        let r = r.into_inner();
        let addr = r
            .address
            .parse()
            .map_err(|_| invalid(format!("address {:?} is not IP:PORT", r.address)))?;
        let l = self
            .engine
            .target()
            .add_listener(addr, port_id(r.port_id)?)
            .await?;
        Ok(Response::new(convert::listener(&l)))
    }

    #[tracing::instrument(skip_all, fields(port_id = r.get_ref().port_id))]
    async fn remove_listener(
        &self,
        r: Request<pb::RemoveListenerRequest>,
    ) -> Result<Response<pb::RemoveListenerResponse>, Status> {
        self.engine
            .target()
            .remove_listener(port_id(r.into_inner().port_id)?)?;
        Ok(Response::new(pb::RemoveListenerResponse {}))
    }

    async fn list_listeners(
        &self,
        _: Request<pb::ListListenersRequest>,
    ) -> Result<Response<pb::ListListenersResponse>, Status> {
        let listeners = self
            .engine
            .target()
            .listeners()
            .iter()
            .map(convert::listener)
            .collect();
        Ok(Response::new(pb::ListListenersResponse { listeners }))
    }

    #[tracing::instrument(skip_all, fields(port_id = r.get_ref().port_id, group = r.get_ref().ana_group))]
    async fn set_ana_state(
        &self,
        r: Request<pb::SetAnaStateRequest>,
    ) -> Result<Response<pb::SetAnaStateResponse>, Status> {
        let r = r.into_inner();
        let state = convert::ana_state(r.state)?;
        self.engine
            .target()
            .set_ana_state(port_id(r.port_id)?, r.ana_group, state)?;
        Ok(Response::new(pb::SetAnaStateResponse {}))
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid))]
    async fn create_nexus(
        &self,
        r: Request<pb::CreateNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let uuid = convert::uuid(&r.uuid)?;
        let options = NexusOptions {
            io_timeout: (r.io_timeout_ms > 0)
                .then(|| std::time::Duration::from_millis(r.io_timeout_ms)),
            rebuild_rate_limit: (r.rebuild_rate_limit > 0).then_some(r.rebuild_rate_limit),
            reservation: (r.reservation_key != 0).then_some(ReservationKeys {
                key: r.reservation_key,
                preempt: r.preempt_key,
            }),
            unclean_restart: r.unclean_restart,
            confirm_faults: r.confirm_faults,
            size: (r.size_bytes > 0).then_some(r.size_bytes),
        };
        self.engine.create_nexus(uuid, &r.children, options).await?;
        self.nexus_reply(&uuid)
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid))]
    async fn destroy_nexus(
        &self,
        r: Request<pb::DestroyNexusRequest>,
    ) -> Result<Response<pb::DestroyNexusResponse>, Status> {
        let uuid = convert::uuid(&r.into_inner().uuid)?;
        let clean = self.engine.destroy_nexus(&uuid).await?;
        Ok(Response::new(pb::DestroyNexusResponse { clean }))
    }

    async fn list_nexuses(
        &self,
        _: Request<pb::ListNexusesRequest>,
    ) -> Result<Response<pb::ListNexusesResponse>, Status> {
        let nexuses = self
            .engine
            .nexuses()
            .iter()
            .map(|(u, n, q)| convert::nexus(u, n, q.as_ref()))
            .collect();
        Ok(Response::new(pb::ListNexusesResponse { nexuses }))
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid))]
    async fn publish_nexus(
        &self,
        r: Request<pb::PublishNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let uuid = convert::uuid(&r.uuid)?;
        for h in &r.allowed_hosts {
            nqn(h, "allowed_hosts")?;
        }
        self.engine
            .publish_nexus(&uuid, r.ana_group, r.allow_any_host, &r.allowed_hosts)?;
        self.nexus_reply(&uuid)
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid))]
    async fn unpublish_nexus(
        &self,
        r: Request<pb::UnpublishNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let uuid = convert::uuid(&r.into_inner().uuid)?;
        self.engine.unpublish_nexus(&uuid)?;
        self.nexus_reply(&uuid)
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid, uri = %r.get_ref().uri))]
    async fn add_child(&self, r: Request<pb::ChildRequest>) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let uuid = convert::uuid(&r.uuid)?;
        self.engine.add_child(&uuid, &r.uri).await?;
        self.nexus_reply(&uuid)
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid, uri = %r.get_ref().uri))]
    async fn remove_child(
        &self,
        r: Request<pb::ChildRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let uuid = convert::uuid(&r.uuid)?;
        self.engine.remove_child(&uuid, &r.uri)?;
        self.nexus_reply(&uuid)
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid, uri = %r.get_ref().uri))]
    async fn fault_child(
        &self,
        r: Request<pb::ChildRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let uuid = convert::uuid(&r.uuid)?;
        let reason = if r.reason.is_empty() {
            "faulted by request"
        } else {
            r.reason.as_str()
        };
        self.engine.fault_child(&uuid, &r.uri, reason).await?;
        self.nexus_reply(&uuid)
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid, size = r.get_ref().size))]
    async fn resize_nexus(
        &self,
        r: Request<pb::ResizeNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = r.into_inner();
        let uuid = convert::uuid(&r.uuid)?;
        self.engine.resize_nexus(&uuid, r.size).await?;
        self.nexus_reply(&uuid)
    }

    #[tracing::instrument(skip_all, fields(nqn = %r.get_ref().nqn, nsid = r.get_ref().nsid))]
    async fn inject_fault(
        &self,
        r: Request<pb::InjectFaultRequest>,
    ) -> Result<Response<pb::InjectFaultResponse>, Status> {
        let r = r.into_inner();
        let plan = (!r.clear).then(|| crate::block::fault::FaultPlan {
            fail_after: (r.latency_ms == 0 || r.fail_after_ios > 0).then_some(r.fail_after_ios),
            fail_ranges: Vec::new(),
            latency: (r.latency_ms > 0).then(|| std::time::Duration::from_millis(r.latency_ms)),
            reads_too: r.reads_too,
        });
        let injected = if r.pool.is_empty() {
            self.engine.inject_fault(&r.nqn, r.nsid, plan)?
        } else {
            self.engine.pool(&r.pool)?.pool.inject_disk_fault(plan)
        };
        Ok(Response::new(pb::InjectFaultResponse { injected }))
    }

    #[tracing::instrument(skip_all, fields(name = %r.get_ref().name, disk = %r.get_ref().disk))]
    async fn create_pool(
        &self,
        r: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        Ok(Response::new(
            pools::create_pool(&self.engine, r.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(disk = %r.get_ref().disk))]
    async fn import_pool(
        &self,
        r: Request<pb::ImportPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        Ok(Response::new(
            pools::import_pool(&self.engine, r.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(name = %r.get_ref().name))]
    async fn destroy_pool(
        &self,
        r: Request<pb::DestroyPoolRequest>,
    ) -> Result<Response<pb::DestroyPoolResponse>, Status> {
        pools::destroy_pool(&self.engine, r.into_inner()).await?;
        Ok(Response::new(pb::DestroyPoolResponse {}))
    }

    async fn list_pools(
        &self,
        _: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        Ok(Response::new(pools::list_pools(&self.engine)))
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid, pool = %r.get_ref().pool))]
    async fn create_replica(
        &self,
        r: Request<pb::CreateReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        Ok(Response::new(
            pools::create_replica(&self.engine, r.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid))]
    async fn destroy_replica(
        &self,
        r: Request<pb::DestroyReplicaRequest>,
    ) -> Result<Response<pb::DestroyReplicaResponse>, Status> {
        pools::destroy_replica(&self.engine, r.into_inner()).await?;
        Ok(Response::new(pb::DestroyReplicaResponse {}))
    }

    async fn list_replicas(
        &self,
        _: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        Ok(Response::new(pools::list_replicas(&self.engine)))
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid))]
    async fn share_replica(
        &self,
        r: Request<pb::ShareReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        Ok(Response::new(
            pools::share_replica(&self.engine, r.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid))]
    async fn unshare_replica(
        &self,
        r: Request<pb::UnshareReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        Ok(Response::new(
            pools::unshare_replica(&self.engine, r.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid, size = r.get_ref().size))]
    async fn resize_replica(
        &self,
        r: Request<pb::ResizeReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        Ok(Response::new(
            pools::resize_replica(&self.engine, r.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid, replica = %r.get_ref().replica))]
    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        Ok(Response::new(
            pools::create_snapshot(&self.engine, r.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid))]
    async fn destroy_snapshot(
        &self,
        r: Request<pb::DestroySnapshotRequest>,
    ) -> Result<Response<pb::DestroySnapshotResponse>, Status> {
        pools::destroy_snapshot(&self.engine, r.into_inner()).await?;
        Ok(Response::new(pb::DestroySnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        Ok(Response::new(pools::list_snapshots(&self.engine)))
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid, snapshot = %r.get_ref().snapshot))]
    async fn create_clone(
        &self,
        r: Request<pb::CreateCloneRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        Ok(Response::new(
            pools::create_clone(&self.engine, r.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid, snapshot = %r.get_ref().snapshot_uuid))]
    async fn snapshot_nexus(
        &self,
        r: Request<pb::SnapshotNexusRequest>,
    ) -> Result<Response<pb::SnapshotNexusResponse>, Status> {
        let r = r.into_inner();
        let (uuid, snap) = (convert::uuid(&r.uuid)?, convert::uuid(&r.snapshot_uuid)?);
        let children = self.engine.snapshot_nexus(&uuid, snap).await?;
        Ok(Response::new(pb::SnapshotNexusResponse { children }))
    }

    #[tracing::instrument(skip_all, fields(uuid = %r.get_ref().uuid))]
    async fn shutdown_nexus(
        &self,
        r: Request<pb::ShutdownNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let uuid = convert::uuid(&r.into_inner().uuid)?;
        self.engine.shutdown_nexus(&uuid).await?;
        self.nexus_reply(&uuid)
    }

    #[tracing::instrument(skip_all, fields(replica = %r.get_ref().replica))]
    async fn get_reservation(
        &self,
        r: Request<pb::GetReservationRequest>,
    ) -> Result<Response<pb::Reservation>, Status> {
        Ok(Response::new(pools::reservation(
            &self.engine,
            r.into_inner(),
        )?))
    }
}
