//! Online expansion, persist-then-act: the new size is checked against every replica's pool (in the placements'
//! turn, against their promises; the growth is promised until the pools' figures show it, see [`super::room`]) and
//! recorded (the spec says the new size, the growth record the old one) before any engine is asked; then each replica is grown in its
//! pool, recorded as it goes, then the nexus, which tells its host (Namespace Attribute Changed) so the kernel sees
//! the new size without reconnecting; then the growth record is dropped. A crash at any point is resumed by the
//! [`VolumeGrowth`] reconciler (every engine resize is idempotent). Replicas placed while the growth is in flight
//! are created at the new size; a nexus made meanwhile takes its smallest child's size and is grown at the end. An
//! engine that refuses the growth for good (a size its pool cannot take) before any replica grew undoes it.

use std::sync::Arc;

use proto::engine as epb;
use tonic::Code;
use uuid::Uuid;

use super::failpoint;
use super::node::NodeState;
use super::room::{PlacementView, growth_key};
use super::scheduler;
use super::volume::{GrowthRecord, VolumePhase, VolumeRecord};
use super::volumes::{BLOCK, VolumeError, Volumes, created, engine_error, generation_of};

impl Volumes {
    /// Grows volume `uuid` to `size` bytes (see the cluster API's ExpandVolume).
    pub async fn expand(&self, uuid: Uuid, size: u64) -> Result<VolumeRecord, VolumeError> {
        if size == 0 || !size.is_multiple_of(BLOCK) {
            return Err(VolumeError::InvalidArgument(format!(
                "size {size} must be a non-zero multiple of {BLOCK} bytes"
            )));
        }
        let lock = self.lock_of(uuid);
        let _held = lock.lock().await;
        let mut r = self.get(uuid).await?;
        created(&r)?;
        if size < r.spec.size {
            return Err(VolumeError::InvalidArgument(format!(
                "volume {uuid} is {} bytes; volumes grow, never shrink (asked for {size})",
                r.spec.size
            )));
        }
        // An expansion already in flight is finished first (to its own size, or this one's if they agree).
        if r.growth.is_some() {
            r = self
                .drive_growth(r)
                .await
                .map_err(|e| super::volumes::not_the_volume_missing(uuid, e))?;
        }
        if size == r.spec.size {
            return Ok(r);
        }
        // Until the growth is promised: no placement meanwhile shares out the room it takes.
        let placing = self.placing.lock().await;
        let ask: Vec<String> = r.replicas.iter().map(|x| x.node.clone()).collect();
        let view = self.placement_view(&ask).await?;
        let block = r
            .replica_block_size(&view.nodes)
            .map_or(BLOCK, u64::from)
            .max(BLOCK);
        if !size.is_multiple_of(block) {
            return Err(VolumeError::InvalidArgument(format!(
                "volume {uuid}'s replicas are on pools of {block}-byte blocks: size {size} must be a multiple of {block}"
            )));
        }
        check_room(&r, size, &view)?;
        r.growth = Some(GrowthRecord {
            from: r.spec.size,
            grown: Vec::new(),
            born_grown: Vec::new(),
        });
        r.spec.size = size;
        // Promised before it is recorded, so that the next placement need not wait for the store.
        self.promise_growth(&r, false);
        drop(placing);
        let saved = self.save(&r).await;
        // Written, or it may be written all the same (a store timeout): promised as written, the sweep decides.
        self.promise_growth(&r, true);
        saved?;
        failpoint::at(failpoint::EXPAND_RECORDED);
        tracing::info!(%uuid, size, "volume expansion recorded");
        self.drive_growth(r)
            .await
            .map_err(|e| super::volumes::not_the_volume_missing(uuid, e))
    }

    /// Grows the replicas not yet grown, then the nexus, recording each; drops the growth record when done. An
    /// engine that cannot do it now leaves the reason in the record and the rest to the reconciler.
    pub(super) async fn drive_growth(
        &self,
        mut r: VolumeRecord,
    ) -> Result<VolumeRecord, VolumeError> {
        let Some(mut g) = r.growth.clone() else {
            return Ok(r);
        };
        let size = r.spec.size;
        let uuid = r.uuid;
        let waits = |e: &VolumeError| format!("expansion to {size} bytes waits: {e}");
        for rep in r.replicas.clone() {
            // A replica not created yet will be created at the new size.
            if !rep.created || g.grown.contains(&rep.uuid) {
                continue;
            }
            let res = async {
                let mut c = self.engine(&rep.node).await?;
                let asked = c
                    .resize_replica(epb::ResizeReplicaRequest {
                        uuid: rep.uuid.to_string(),
                        size,
                    })
                    .await;
                match asked {
                    Ok(grown) => Ok(grown.into_inner()),
                    // Refused as a shrink: larger already (made at the size of a growth undone since), which is
                    // grown enough.
                    Err(s) if s.code() == Code::InvalidArgument => {
                        let listed = c
                            .list_replicas(epb::ListReplicasRequest {})
                            .await
                            .map_err(|e| engine_error(&rep.node, e))?
                            .into_inner();
                        let id = rep.uuid.to_string();
                        listed
                            .replicas
                            .into_iter()
                            .find(|x| x.uuid == id && x.size >= size)
                            .ok_or_else(|| engine_error(&rep.node, s))
                    }
                    Err(s) => Err(engine_error(&rep.node, s)),
                }
            }
            .await;
            self.metrics
                .operation("resize_replica", if res.is_ok() { "ok" } else { "failed" });
            let grown = match res {
                Ok(grown) => grown,
                // No replica grew yet and an engine says it never will: the volume keeps its size.
                Err(e) if g.none_grew_in_place() && cannot_grow(&e) => {
                    r.spec.size = g.from;
                    r.growth = None;
                    r.reason = format!("expansion to {size} bytes refused: {e}");
                    self.save(&r).await?;
                    self.unpromise_growth(&r, size);
                    tracing::warn!(%uuid, size, error = %e, "volume expansion refused and undone");
                    return Err(e);
                }
                Err(e) => {
                    r.reason = waits(&e);
                    self.save(&r).await?;
                    return Err(e);
                }
            };
            failpoint::at(failpoint::EXPAND_REPLICA_GROWN);
            g.grown.push(rep.uuid);
            r.growth = Some(g.clone());
            self.save(&r).await?;
            self.replica_created(&growth_key(&rep.uuid, size), generation_of(&grown));
        }
        if let Some(n) = r.nexus.clone().filter(|n| n.published) {
            let res = async {
                self.engine(&n.node)
                    .await?
                    .resize_nexus(epb::ResizeNexusRequest {
                        uuid: uuid.to_string(),
                        size,
                    })
                    .await
                    .map_err(|s| engine_error(&n.node, s))
            }
            .await;
            self.metrics
                .operation("resize_nexus", if res.is_ok() { "ok" } else { "failed" });
            match res {
                Ok(_) => failpoint::at(failpoint::EXPAND_NEXUS_GROWN),
                // The engine lost the nexus (it restarted): the one healing makes has the grown replicas' size.
                Err(VolumeError::Engine {
                    code: Code::NotFound,
                    ..
                }) => {}
                Err(e) => {
                    r.reason = waits(&e);
                    self.save(&r).await?;
                    return Err(e);
                }
            }
        }
        r.growth = None;
        if r.reason.starts_with("expansion to") {
            r.reason.clear();
        }
        self.save(&r).await?;
        tracing::info!(%uuid, size, from = g.from, "volume expanded");
        Ok(r)
    }

    /// Resumes expansions a crash or an engine that could not do it left in flight.
    pub async fn reconcile_growth(&self) -> Result<(), VolumeError> {
        for r in self.list_sound().await? {
            if r.growth.is_none() || r.phase != VolumePhase::Created {
                continue;
            }
            let Some((_held, r)) = self.claim_idle(r.uuid).await? else {
                continue;
            };
            let uuid = r.uuid;
            if let Err(e) = self.drive_growth(r).await {
                tracing::debug!(%uuid, error = %e, "expansion still waiting");
            }
        }
        Ok(())
    }
}

/// Whether every replica of `r` can grow to `size` now, as `view` sees its pools: created, its node Online, its
/// pool with room for the growth on top of what its replicas could already grow to and the promises made (the
/// scheduler's rule, [`scheduler::room_for`]: no overcommit). Nothing is recorded when it cannot.
fn check_room(r: &VolumeRecord, size: u64, view: &PlacementView) -> Result<(), VolumeError> {
    let extra = size - r.spec.size;
    for rep in &r.replicas {
        let not_now = |why: String| VolumeError::FailedPrecondition {
            uuid: r.uuid,
            why: format!(
                "replica {} {why}; expand it once the volume is healed",
                rep.uuid
            ),
        };
        if !rep.created {
            return Err(not_now("is not created yet".into()));
        }
        let node = view
            .nodes
            .iter()
            .find(|n| n.spec.name == rep.node)
            .ok_or_else(|| not_now(format!("is on unknown node {}", rep.node)))?;
        if node.status.state != NodeState::Online {
            return Err(not_now(format!(
                "is on node {}, which is {:?}",
                rep.node, node.status.state
            )));
        }
        let pool = view
            .pool(&rep.node, &rep.pool)
            .ok_or_else(|| not_now(format!("is in pool {} that {} lacks", rep.pool, rep.node)))?;
        // Larger than the pool itself: no freeing of room will ever let it grow (OUT_OF_RANGE, not retried).
        if size > pool.usable_capacity() {
            return Err(VolumeError::TooLarge(format!(
                "volume {} cannot grow to {size} bytes: pool {} on {} holds {} bytes in all",
                r.uuid,
                rep.pool,
                rep.node,
                pool.usable_capacity()
            )));
        }
        scheduler::room_for(pool, extra).map_err(|why| {
            VolumeError::CannotGrow(format!(
                "volume {} cannot grow to {size} bytes: the growth needs {extra} more bytes of pool {} on {}: {why}",
                r.uuid, rep.pool, rep.node
            ))
        })?;
    }
    Ok(())
}

/// Whether an engine's refusal to grow a replica is for good: the size is wrong for it, or its pool has no room.
fn cannot_grow(e: &VolumeError) -> bool {
    matches!(
        e,
        VolumeError::Engine {
            code: Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted,
            ..
        }
    )
}

/// Expansions resumed, as a reconciler (see [`super::reconcile`]).
pub struct VolumeGrowth(pub Arc<Volumes>);

#[async_trait::async_trait]
impl super::reconcile::Reconciler for VolumeGrowth {
    fn name(&self) -> &'static str {
        "volume_growth"
    }

    async fn pass(&self) -> Result<(), String> {
        self.0.reconcile_growth().await.map_err(|e| e.to_string())
    }
}
