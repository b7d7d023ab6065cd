//! Pool, replica and snapshot requests: validation and conversion between the engine's types and the API's.
//! `service` delegates to these functions.

use proto::engine as pb;
use tonic::Status;

use crate::engine::{Engine, PoolEntry, ReplicaInfo, SnapshotInfo};
use crate::pool::PoolStats;
use crate::pool::meta::Share;
use crate::protocol::nqn::Nqn;

use super::convert::uuid;
use super::status::invalid;

/// A pool as the API shows it, with its stats as the engine tells them ([`Engine::pools_with_stats`]).
pub fn pool(e: &PoolEntry, s: &PoolStats) -> pb::Pool {
    let l = e.pool.label();
    let vols = e.pool.volume_headers();
    let snapshots = vols.iter().filter(|v| v.is_snapshot()).count() as u32;
    pb::Pool {
        name: l.name.clone(),
        uuid: l.uuid.to_string(),
        disk: e.disk.clone(),
        capacity: s.capacity,
        allocated: s.allocated,
        committed: s.committed,
        cluster_size: l.cluster_size,
        block_size: l.block_size,
        replicas: vols.len() as u32 - snapshots,
        snapshots,
        no_space_errors: s.no_space_errors,
        disk_errors: s.disk_errors,
        owner: l.owner.clone(),
        incarnation: l.incarnation,
        fault: e.pool.fault().unwrap_or_default(),
        disk_full: s.disk_full,
        disk_room: s.disk_room,
        replica_room: Some(s.replica_room),
        applied: s.applied,
    }
}

pub fn replica(engine: &Engine, r: &ReplicaInfo) -> pb::Replica {
    let uri = match (&r.nqn, engine.target().listeners().first()) {
        (Some(nqn), Some(l)) => format!("nvmf://{}/{}", l.address, nqn),
        _ => String::new(),
    };
    pb::Replica {
        uuid: r.meta.uuid.to_string(),
        pool: r.pool.clone(),
        size: r.meta.size,
        allocated: r.allocated,
        nqn: r.nqn.as_ref().map(|n| n.to_string()).unwrap_or_default(),
        uri,
        allowed_hosts: r
            .meta
            .share
            .as_ref()
            .map(|s| s.hosts.clone())
            .unwrap_or_default(),
        clone_of: r.meta.clone_of.map(|u| u.to_string()).unwrap_or_default(),
        created: r.meta.created,
        unshared: Some(r.unshared),
        pool_incarnation: r.pool_generation.0,
        pool_applied: r.pool_generation.1,
    }
}

pub fn snapshot(s: &SnapshotInfo) -> pb::Snapshot {
    pb::Snapshot {
        uuid: s.meta.uuid.to_string(),
        replica: s
            .meta
            .snapshot_of
            .map(|u| u.to_string())
            .unwrap_or_default(),
        pool: s.pool.clone(),
        size: s.meta.size,
        referenced: s.referenced,
        created: s.meta.created,
    }
}

fn name(s: &str) -> Result<&str, Status> {
    if s.is_empty() {
        return Err(invalid("pool name is empty"));
    }
    Ok(s)
}

fn share(share: bool, hosts: Vec<String>) -> Result<Option<Share>, Status> {
    for h in &hosts {
        Nqn::parse(h).map_err(|e| invalid(format!("allowed host {h:?}: {e}")))?;
    }
    if !share && !hosts.is_empty() {
        return Err(invalid(
            "allowed_hosts given for a replica that is not shared",
        ));
    }
    Ok(share.then_some(Share { hosts }))
}

pub async fn create_pool(engine: &Engine, r: pb::CreatePoolRequest) -> Result<pb::Pool, Status> {
    let id = if r.uuid.is_empty() {
        None
    } else {
        Some(uuid(&r.uuid)?)
    };
    let e = engine
        .create_pool(name(&r.name)?, &r.disk, id, r.cluster_size, r.block_size)
        .await?;
    Ok(told(engine, &e))
}

/// [`pool`] for one pool just made or imported.
fn told(engine: &Engine, e: &PoolEntry) -> pb::Pool {
    let s = engine
        .pool_stats(e.pool.name())
        .unwrap_or_else(|| e.pool.stats());
    pool(e, &s)
}

pub async fn import_pool(engine: &Engine, r: pb::ImportPoolRequest) -> Result<pb::Pool, Status> {
    Ok(told(engine, &engine.import_pool(&r.disk, r.force).await?))
}

pub async fn destroy_pool(engine: &Engine, r: pb::DestroyPoolRequest) -> Result<(), Status> {
    Ok(engine.destroy_pool(name(&r.name)?).await?)
}

pub fn list_pools(engine: &Engine) -> pb::ListPoolsResponse {
    let mut pending: Vec<pb::PendingPool> = engine
        .pending_pools()
        .into_iter()
        .map(|p| pb::PendingPool {
            name: p.name,
            disk: p.disk,
            error: p.error,
            attempts: p.attempts,
            retrying: p.retrying,
        })
        .collect();
    pending.sort_by(|a, b| a.name.cmp(&b.name));
    pb::ListPoolsResponse {
        pools: engine
            .pools_with_stats()
            .iter()
            .map(|(e, s)| pool(e, s))
            .collect(),
        pending,
    }
}

pub async fn create_replica(
    engine: &Engine,
    r: pb::CreateReplicaRequest,
) -> Result<pb::Replica, Status> {
    let id = uuid(&r.uuid)?;
    let share = share(r.share, r.allowed_hosts)?;
    let info = engine
        .create_replica(name(&r.pool)?, id, r.size, share)
        .await?;
    Ok(replica(engine, &info))
}

pub async fn destroy_replica(engine: &Engine, r: pb::DestroyReplicaRequest) -> Result<(), Status> {
    Ok(engine.destroy_replica(&uuid(&r.uuid)?).await?)
}

pub fn list_replicas(engine: &Engine) -> pb::ListReplicasResponse {
    pb::ListReplicasResponse {
        replicas: engine
            .replicas()
            .iter()
            .map(|r| replica(engine, r))
            .collect(),
    }
}

pub async fn share_replica(
    engine: &Engine,
    r: pb::ShareReplicaRequest,
) -> Result<pb::Replica, Status> {
    let info = engine
        .share_replica(&uuid(&r.uuid)?, r.allowed_hosts)
        .await?;
    Ok(replica(engine, &info))
}

pub async fn resize_replica(
    engine: &Engine,
    r: pb::ResizeReplicaRequest,
) -> Result<pb::Replica, Status> {
    let info = engine.resize_replica(&uuid(&r.uuid)?, r.size).await?;
    Ok(replica(engine, &info))
}

pub async fn unshare_replica(
    engine: &Engine,
    r: pb::UnshareReplicaRequest,
) -> Result<pb::Replica, Status> {
    let info = engine.unshare_replica(&uuid(&r.uuid)?).await?;
    Ok(replica(engine, &info))
}

pub async fn create_snapshot(
    engine: &Engine,
    r: pb::CreateSnapshotRequest,
) -> Result<pb::Snapshot, Status> {
    let s = engine
        .create_snapshot(&uuid(&r.replica)?, uuid(&r.uuid)?)
        .await?;
    Ok(snapshot(&s))
}

pub async fn destroy_snapshot(
    engine: &Engine,
    r: pb::DestroySnapshotRequest,
) -> Result<(), Status> {
    Ok(engine.destroy_snapshot(&uuid(&r.uuid)?).await?)
}

pub fn list_snapshots(engine: &Engine) -> pb::ListSnapshotsResponse {
    pb::ListSnapshotsResponse {
        snapshots: engine.snapshots().iter().map(snapshot).collect(),
    }
}

pub fn reservation(
    engine: &Engine,
    r: pb::GetReservationRequest,
) -> Result<pb::Reservation, Status> {
    let s = engine.reservation(&uuid(&r.replica)?)?;
    Ok(pb::Reservation {
        generation: s.generation,
        r#type: u32::from(s.rtype),
        registrants: s
            .registrants
            .iter()
            .map(|r| pb::Registrant {
                host_id: r.host.to_string(),
                key: r.key,
                holds: s.is_holder(r.host),
            })
            .collect(),
    })
}

pub async fn create_clone(
    engine: &Engine,
    r: pb::CreateCloneRequest,
) -> Result<pb::Replica, Status> {
    let share = share(r.share, r.allowed_hosts)?;
    let info = engine
        .create_clone(&uuid(&r.snapshot)?, uuid(&r.uuid)?, share)
        .await?;
    Ok(replica(engine, &info))
}
