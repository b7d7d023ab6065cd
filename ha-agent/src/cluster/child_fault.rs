//! Fault consent: an engine asks before one of its nexuses faults a healthy child and goes on writing without it
//! (nexuses are made with `confirm_faults`; the engine side is `nvmf_target::nexus::FaultGate`).
//!
//! The answer decides who may acknowledge writes, so it is taken under the volume's lock, after any switch-over that
//! holds it: the nexus asking must still be the volume's (same node, same reservation key, no switch-over under
//! way). Then the child's replica is recorded out of sync before the answer, so no later nexus (a restart, a
//! switch-over) is made of the replicas that missed writes: if the asking nexus's node is lost next, the volume waits
//! for it rather than serve stale data. Otherwise the nexus was replaced and is told so: it stops and acknowledges
//! nothing more, though it may still reach its host and its local replica.

use uuid::Uuid;

use super::heal::replica_of;
use super::volume::VolumePhase;
use super::volumes::{VolumeError, Volumes};

/// One engine's question: may nexus `volume`, made on `node` with reservation `key`, fault `child`?
#[derive(Clone, Debug)]
pub struct FaultQuestion {
    pub node: String,
    pub volume: Uuid,
    pub key: u64,
    pub child: String,
    pub reason: String,
}

impl Volumes {
    /// `Ok`: the nexus is the volume's and the child's replica is recorded out of sync (or the child is no replica
    /// of the volume any more). `FailedPrecondition`: a newer nexus replaced it. `NotFound`: no such volume.
    /// `Unavailable`: a child not in sync on record may have caught up, and the nexus's engine did not list them.
    /// `InvalidArgument`: the child names no replica, so nothing could be recorded for it.
    pub async fn confirm_child_fault(&self, q: &FaultQuestion) -> Result<(), VolumeError> {
        let Some(replica) = replica_of(&q.child) else {
            return Err(VolumeError::InvalidArgument(format!(
                "child {:?} names no replica",
                q.child
            )));
        };
        let lock = self.lock_of(q.volume);
        let _held = lock.lock().await;
        let mut r = self.get(q.volume).await?;
        // A switch-over under way holds consent back from the nexus it moves off, not from the one it made (published
        // elsewhere, its old node's replicas not disowned yet).
        let current = r.nexus.as_ref().filter(|n| {
            n.node == q.node
                && n.key == q.key
                && r.phase == VolumePhase::Created
                && r.switchover
                    .as_ref()
                    .is_none_or(|s| n.published && n.node != s.from)
        });
        if current.is_none() {
            let now = match (&r.nexus, &r.switchover) {
                (Some(n), Some(_)) if n.node != q.node || n.key != q.key => {
                    format!("its nexus is on {} with key {}", n.node, n.key)
                }
                (_, Some(s)) => format!("a switch-over off {} is under way", s.from),
                (Some(n), None) => format!("its nexus is on {} with key {}", n.node, n.key),
                (None, None) => "it has no nexus".to_string(),
            };
            tracing::warn!(volume = %q.volume, node = %q.node, key = q.key, child = %q.child, %now, "a replaced nexus asked to fault a child: refused");
            return Err(VolumeError::FailedPrecondition {
                uuid: q.volume,
                why: format!(
                    "the nexus on {} with key {} was replaced: {now}",
                    q.node, q.key
                ),
            });
        }
        // The children the nexus goes on with are recorded in sync with the same write: one that finished its
        // rebuild since the last healing pass is not yet, and if it alone is left (the asking nexus's node lost, or
        // it faults too, as the last healthy child does without asking), the volume would have no replica in sync
        // on record although that one holds every acknowledged write.
        // Without the nexus's listing such a child's sync is not known, and consent would leave it out of sync on
        // record: no answer yet (the engine asks again), as when the agent cannot be reached.
        let unknown = r
            .replicas
            .iter()
            .any(|x| x.uuid != replica && !x.synced && !x.fault_confirmed);
        let going_on = match self.healthy_children(&q.node, q.volume).await {
            Some(listed) => listed,
            None if unknown => {
                return Err(VolumeError::Engine {
                    node: q.node.clone(),
                    code: tonic::Code::Unavailable,
                    message: format!(
                        "the nexus of volume {} did not list its children: which of them go on in sync is not known",
                        q.volume
                    ),
                });
            }
            None => Vec::new(),
        };
        let mut changed = false;
        for x in r.replicas.iter_mut() {
            if x.uuid != replica && !x.synced && !x.fault_confirmed && going_on.contains(&x.uuid) {
                x.synced = true;
                changed = true;
            }
        }
        if let Some(x) = r
            .replicas
            .iter_mut()
            .find(|x| x.uuid == replica)
            .filter(|x| x.synced || !x.fault_confirmed)
        {
            // Until the nexus shows the fault applied, healing must not take a listing from before it for the
            // child being in sync again (see `ReplicaRecord::fault_confirmed`).
            x.synced = false;
            x.fault_confirmed = true;
            r.reason = format!("replica {} on {} faulted: {}", x.uuid, x.node, q.reason);
            changed = true;
        }
        if changed {
            self.save(&r).await?;
        }
        tracing::warn!(volume = %q.volume, node = %q.node, child = %q.child, reason = %q.reason, "child fault confirmed: its replica is out of sync");
        Ok(())
    }

    /// The replicas nexus `volume` on `node` lists as Healthy children; `None` when its engine does not answer.
    async fn healthy_children(&self, node: &str, volume: Uuid) -> Option<Vec<Uuid>> {
        let listed = async {
            self.engine(node)
                .await
                .ok()?
                .list_nexuses(proto::engine::ListNexusesRequest {})
                .await
                .ok()
        };
        let Some(listed) = listed.await else {
            tracing::debug!(%volume, node, "the asking nexus's engine did not list it");
            return None;
        };
        let listed = listed
            .into_inner()
            .nexuses
            .into_iter()
            .filter(|n| n.uuid == volume.to_string())
            .flat_map(|n| n.children)
            .filter(|c| c.state == proto::engine::ChildState::Healthy as i32)
            .filter_map(|c| replica_of(&c.uri))
            .collect();
        Some(listed)
    }
}
