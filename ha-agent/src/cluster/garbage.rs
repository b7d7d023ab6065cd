//! Garbage: what no volume owns any more, destroyed when its engine answers. Replicas retired from a volume are
//! recorded under `/keelson/garbage/replicas/` before they leave the volume's record (so a crash never loses one)
//! and destroyed when their node answers; nexuses that no volume's record names on their node (a volume deleted,
//! a nexus moved or replaced while its node was away, fenced since) are destroyed when their engine lists them.
//! An engine's NotFound for something in a pool it has not imported yet is not taken for destroyed
//! ([`destroyed_unless_pending`], also for snapshot copies): the record that would destroy it is kept.

use proto::engine as epb;
use proto::engine::engine_client::EngineClient;
use tonic::transport::Channel;
use uuid::Uuid;

use super::store::Store;
use super::volumes::{VolumeError, Volumes, destroyed};

/// Replicas retired while their node could not be asked, destroyed when it answers again.
pub(super) const GARBAGE: &str = "/keelson/garbage/replicas/";

pub(super) fn garbage_key(replica: &Uuid) -> String {
    format!("{GARBAGE}{replica}")
}

/// What became of a garbage replica ([`Volumes::collect_one`]).
pub(super) enum Collected {
    /// Destroyed (or found gone), and forgotten.
    Done,
    /// Refused by its engine for now: kept.
    Kept,
    /// Its node's engine could not be asked (not Online, or did not answer): kept, and the node not asked again
    /// this pass.
    NodeAway,
    /// Its pool is not imported there yet: kept, and the pool not asked about again this pass.
    Waits,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Garbage {
    pub(super) node: String,
    pub(super) volume: Uuid,
    /// Its pool: while the engine does not list the pool (not imported yet), "not found" does not mean destroyed.
    #[serde(default)]
    pub(super) pool: String,
}

/// An engine's answer to destroying something of `volume` that may be in `pools` on `node`: done, or already gone
/// (NotFound), except that NotFound while one of `pools` is not imported there yet does not tell it is gone, which
/// is FailedPrecondition (asked again later). A pool not imported is gone for good only where the agent destroyed
/// it (`pool::DESTROYED`; a pool's destroy refuses while it holds anything, so what was asked for cannot be in it)
/// and neither a record of the agent's nor the engine's pending list names it again. Any other may come back (its
/// disk late, or a pool imported through the engine's own API, which a restart forgets until it is imported again).
/// Pools the engine cannot be asked about, or whose records cannot be read, count as to come. The engine's pools
/// are asked before `destroy` runs: a pool that opens between the two (a pending pool's retry) is not taken for
/// one that was open and did not have it.
pub(super) async fn destroyed_unless_pending<T>(
    store: &dyn Store,
    c: &mut EngineClient<Channel>,
    node: &str,
    pools: &[String],
    volume: Uuid,
    destroy: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<(), VolumeError> {
    // None: the engine could not tell.
    let (imported, pending): (Vec<String>, Option<Vec<String>>) = if pools.is_empty() {
        (Vec::new(), None)
    } else {
        match c.list_pools(epb::ListPoolsRequest {}).await {
            Ok(l) => {
                let l = l.into_inner();
                (
                    l.pools.into_iter().map(|p| p.name).collect(),
                    Some(l.pending.into_iter().map(|p| p.name).collect()),
                )
            }
            Err(_) => (Vec::new(), None),
        }
    };
    match destroy.await {
        Err(s) if s.code() == tonic::Code::NotFound && !pools.is_empty() => {
            for p in pools.iter().filter(|p| !imported.contains(p)) {
                let to_come = match &pending {
                    None => true,
                    Some(pending) if pending.contains(p) => true,
                    Some(_) => {
                        let recorded = store.get(&super::pool::key(node, p)).await;
                        let destroyed = store.get(&super::pool::destroyed_key(node, p)).await;
                        !matches!((recorded, destroyed), (Ok(None), Ok(Some(_))))
                    }
                };
                if to_come {
                    return Err(VolumeError::FailedPrecondition {
                        uuid: volume,
                        why: format!("pool {p} is not imported on {node} yet"),
                    });
                }
                tracing::info!(%node, pool = %p, %volume, "not found, and its pool was destroyed: taken as destroyed too");
            }
            Ok(())
        }
        r => destroyed(node, r),
    }
}

impl Volumes {
    /// The keys of the garbage records of replicas on `node`.
    pub async fn garbage_on(&self, node: &str) -> Result<Vec<String>, VolumeError> {
        let mut keys = Vec::new();
        for (k, v) in self.store().list(GARBAGE).await? {
            if serde_json::from_slice::<Garbage>(&v.value).is_ok_and(|g| g.node == node) {
                keys.push(k);
            }
        }
        Ok(keys)
    }

    /// Destroys the replicas recorded as garbage whose nodes answer now. A node that does not answer, or a pool not
    /// imported there yet, is asked once per pass, not once per record (a failed disk's pool can hold thousands).
    pub async fn collect_garbage(&self) -> Result<(), VolumeError> {
        let mut away: std::collections::HashSet<String> = Default::default();
        let mut waiting: std::collections::HashSet<(String, String)> = Default::default();
        for (k, v) in self.store().list(GARBAGE).await? {
            let (Ok(g), Some(id)) = (
                serde_json::from_slice::<Garbage>(&v.value),
                k.strip_prefix(GARBAGE),
            ) else {
                continue;
            };
            if away.contains(&g.node) || waiting.contains(&(g.node.clone(), g.pool.clone())) {
                continue;
            }
            // Still in its volume (a crash between recording the garbage and dropping it): not garbage yet. A volume
            // record that cannot be read now (the store failed, or it does not decode) may list it: kept until it
            // can be read, never destroyed on a guess.
            let listed = match self.read(g.volume).await {
                Ok(r) => r.is_some_and(|r| r.replicas.iter().any(|x| x.uuid.to_string() == id)),
                Err(e) => {
                    tracing::warn!(replica = id, volume = %g.volume, error = %e, "garbage kept: its volume's record cannot be read");
                    continue;
                }
            };
            if !listed {
                match self.collect_one(id, &g).await? {
                    Collected::Done | Collected::Kept => {}
                    Collected::NodeAway => {
                        away.insert(g.node.clone());
                    }
                    Collected::Waits => {
                        waiting.insert((g.node.clone(), g.pool.clone()));
                    }
                }
            }
        }
        Ok(())
    }

    /// Destroys one garbage replica if its node answers, then forgets it.
    pub(super) async fn collect_one(
        &self,
        id: &str,
        g: &Garbage,
    ) -> Result<Collected, VolumeError> {
        let Ok(mut c) = self.engine(&g.node).await else {
            return Ok(Collected::NodeAway);
        };
        let mut d = c.clone();
        let destroy = d.destroy_replica(epb::DestroyReplicaRequest {
            uuid: id.to_string(),
        });
        let pools: Vec<String> = Some(g.pool.clone())
            .filter(|p| !p.is_empty())
            .into_iter()
            .collect();
        let res =
            destroyed_unless_pending(self.store(), &mut c, &g.node, &pools, g.volume, destroy)
                .await;
        self.metrics
            .operation("destroy_replica", if res.is_ok() { "ok" } else { "failed" });
        match res {
            Ok(()) => {
                if let Ok(uuid) = id.parse() {
                    self.unpromise(&uuid);
                }
                self.store().delete(&format!("{GARBAGE}{id}")).await?;
                tracing::info!(replica = id, node = %g.node, volume = %g.volume, "retired replica destroyed");
                Ok(Collected::Done)
            }
            Err(e) => {
                tracing::info!(replica = id, node = %g.node, error = %e, "retired replica kept as garbage for now");
                Ok(match e {
                    VolumeError::FailedPrecondition { .. } => Collected::Waits,
                    VolumeError::Engine {
                        code:
                            tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Cancelled,
                        ..
                    } => Collected::NodeAway,
                    _ => Collected::Kept,
                })
            }
        }
    }

    /// Destroys the nexuses engines list that no volume's record names on that node: of a deleted volume, or left
    /// behind (fenced) by a move or replacement while their node was away. A volume with an operation in flight is
    /// left alone.
    pub async fn collect_stale_nexuses(&self) -> Result<(), VolumeError> {
        for n in self.registry.list().await? {
            if n.record.status.state != super::node::NodeState::Online {
                continue;
            }
            let node = n.record.spec.name.clone();
            let Ok(mut c) = self.engine(&node).await else {
                continue;
            };
            let Ok(list) = c.list_nexuses(epb::ListNexusesRequest {}).await else {
                continue;
            };
            for nx in list.into_inner().nexuses {
                let Ok(uuid) = Uuid::parse_str(&nx.uuid) else {
                    continue;
                };
                let Ok(_held) = self.lock_of(uuid).try_lock_owned() else {
                    continue;
                };
                // A record that cannot be read now may name it: kept.
                let key = super::volume::key(&uuid);
                let (owned, revision) = match self.store().get(&key).await {
                    Ok(None) => (false, 0),
                    Ok(Some(v)) => (
                        super::volume::VolumeRecord::decode(&v.value)
                            .map_or(true, |r| r.nexus.is_some_and(|x| x.node == node)),
                        v.mod_revision,
                    ),
                    Err(_) => (true, 0),
                };
                if owned {
                    continue;
                }
                // Still the leader, and the record as it was read (through the fence): a leader deposed while it
                // looked (stalled past its lease) must not destroy a nexus the next leader has made there since.
                let unchanged = self
                    .store()
                    .txn(
                        super::store::Txn::new()
                            .when(super::store::Compare::ModRevision { key, revision }),
                    )
                    .await;
                if !matches!(unchanged, Ok(t) if t.succeeded) {
                    continue;
                }
                let r = c
                    .destroy_nexus(epb::DestroyNexusRequest {
                        uuid: nx.uuid.clone(),
                    })
                    .await;
                let r = destroyed(&node, r);
                self.metrics.operation(
                    "destroy_stale_nexus",
                    if r.is_ok() { "ok" } else { "failed" },
                );
                match r {
                    Ok(()) => tracing::info!(volume = %nx.uuid, %node, "stale nexus destroyed"),
                    Err(e) => {
                        tracing::warn!(volume = %nx.uuid, %node, error = %e, "stale nexus not destroyed yet")
                    }
                }
            }
        }
        Ok(())
    }
}

/// Retired replicas destroyed, as a reconciler (see [`super::reconcile`]).
pub struct GarbageCollector(pub std::sync::Arc<Volumes>);

#[async_trait::async_trait]
impl super::reconcile::Reconciler for GarbageCollector {
    fn name(&self) -> &'static str {
        "garbage"
    }

    async fn pass(&self) -> Result<(), String> {
        self.0.collect_garbage().await.map_err(|e| e.to_string())
    }
}

/// Nexuses no record names destroyed, as a reconciler (see [`super::reconcile`]).
pub struct StaleNexuses(pub std::sync::Arc<Volumes>);

#[async_trait::async_trait]
impl super::reconcile::Reconciler for StaleNexuses {
    fn name(&self) -> &'static str {
        "stale_nexuses"
    }

    async fn pass(&self) -> Result<(), String> {
        self.0
            .collect_stale_nexuses()
            .await
            .map_err(|e| e.to_string())
    }
}
