//! Healing a published volume towards its record: run once per tick for every published volume, under the
//! volume's lock. It compares what the nexus reports with what the record says and fixes the difference, one
//! recorded step at a time, so that a crash at any point is resumed by the next run:
//!
//! 1. a child the nexus reports Faulted is retired: removed from the nexus, its replica destroyed when its node
//!    answers (else left to the garbage collector of a later step), and dropped from the record;
//! 2. while the record holds fewer replicas than the spec asks, a new one is placed by the scheduler (never on a
//!    node that holds one already) and recorded, then created;
//! 3. a created replica that is not a child of the nexus is shared to the nexus's node and added; the nexus
//!    rebuilds it.
//!
//! No eligible node for a replacement: the volume stays Degraded with the reason in its record, and heals by itself
//! when a node or pool appears. An unpublished volume only gets its missing replicas placed and created.
//! [`Volumes::set_replicas`] changes the count: more are placed by the same steps, fewer are retired faulted
//! first (Rule 3).
//!
//! A faulted child whose replica is back (its engine restarted, its link returned) and sound is rejoined instead
//! of retired: the nexus copies only what it missed within the partial-rebuild window. One that faults again soon
//! after is replaced.
//!
//! Each pass records which replicas are in sync (the nexus calls them Healthy), and a replica is recorded out of
//! sync before it is added to a nexus to be rebuilt: a nexus made again (its engine restarted, a publish resumed)
//! starts from in-sync replicas only, never from a half-rebuilt one. A publish that did not finish is finished.

use std::collections::{BTreeMap, BTreeSet};

use proto::engine as epb;
use proto::engine::engine_client::EngineClient;
use proto::names;
use tonic::transport::Channel;
use uuid::Uuid;

use super::failpoint;
use super::garbage::{Garbage, garbage_key};
use super::metrics::VolumeObservation;
use super::scheduler;
use super::store::StoreError;
use super::volume::{ReplicaRecord, VolumePhase, VolumeRecord};
use super::volumes::{MAX_REPLICAS, VolumeError, Volumes, destroyed, engine_error, nexus_state};

/// What a replica is good for now ([`Volumes::standing`]).
enum Standing {
    /// Listed by its engine (whose client this is), its pool's disk without errors.
    Sound(proto::engine::engine_client::EngineClient<Channel>),
    /// Not known yet: its engine does not answer, or its pool is not imported yet (within the grace).
    Wait,
    /// Gone: its node not Online, its engine not listing it, its pool failing or not back after the grace.
    Gone,
}

/// What becomes of a faulted child.
enum Rejoin {
    /// Its replica is back and rejoined the nexus.
    Rejoined,
    /// Its node is Online by the registry but its engine does not answer yet: asked again next pass.
    Wait,
    /// Gone, unsound, or rejoined too recently: retired and replaced.
    Retire,
}

/// How long after its node came back a faulted replica whose pool is not imported yet is waited for.
const POOL_IMPORT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// How long after a rejoin a replica that faults again is replaced instead of rejoined.
const REJOIN_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// How long a pass over one node's volumes keeps the claims it took before listing the node's nexuses: then the
/// volumes not healed yet are let go, claimed and listed again. A nexus's question before it goes on without a
/// child (ConfirmChildFault, with that volume's writes held until the answer) waits for this and one volume's heal
/// at most, not for a whole node's pass (many volumes, each perhaps waiting for an engine that does not answer).
const NODE_PASS_HOLD: std::time::Duration = std::time::Duration::from_secs(1);

/// The replica a child URI names (`...:replica-<uuid>`).
pub(super) fn replica_of(uri: &str) -> Option<Uuid> {
    let at = uri.find(":replica-")? + ":replica-".len();
    Uuid::parse_str(uri.get(at..at + 36)?).ok()
}

/// A child's state as the API and the metrics name it.
pub(super) fn child_state_name(state: i32) -> &'static str {
    match epb::ChildState::try_from(state) {
        Ok(epb::ChildState::Healthy) => "healthy",
        Ok(epb::ChildState::Rebuilding) => "rebuilding",
        _ => "faulted",
    }
}

impl Volumes {
    /// Heals every volume whose operation is not in flight, and sets the volume metrics from what it saw (a volume
    /// busy with an operation keeps its last observation). The nexuses of each node are listed once for the node's
    /// volumes claimed at a time (so the listing is newer than their last change; see [`Self::heal_on_node`]).
    pub async fn heal_all(&self) -> Result<(), VolumeError> {
        let all = self.list_sound().await?;
        let mut by_node: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
        let mut others = Vec::new();
        for r in &all {
            if r.phase != VolumePhase::Created {
                let state = self.unpublished_state(r).await;
                self.observe(r, state, None);
                continue;
            }
            // A switch-over in flight is finished whatever its old node says.
            match r
                .nexus
                .as_ref()
                .filter(|n| n.published && r.switchover.is_none())
            {
                Some(n) => by_node.entry(n.node.clone()).or_default().push(r.uuid),
                None => others.push(r.uuid),
            }
        }
        let healed = async {
            for uuid in others {
                let Some((_held, r)) = self.claim_idle(uuid).await? else {
                    continue;
                };
                // An operation may have changed it since the listing (a delete that failed half-way).
                if r.phase == VolumePhase::Created
                    && let Err(e) = self.heal(r, None).await
                {
                    tracing::debug!(%uuid, error = %e, "volume not healed yet");
                }
            }
            for (node, mut uuids) in by_node {
                while !uuids.is_empty() {
                    uuids = self.heal_on_node(&node, uuids).await?;
                }
            }
            Ok(())
        }
        .await;
        // What was seen, whether or not the pass got through every volume: a pass cut short by one store error
        // must not leave the volume metrics as they were (a volume faulted since hidden).
        let live: BTreeSet<Uuid> = all.iter().map(|r| r.uuid).collect();
        let mut seen = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|u, _| live.contains(u));
        self.metrics.set_volumes(seen.values());
        healed
    }

    /// Heals those of `uuids` (volumes whose nexus is on `node`) that no operation holds, from one listing of the
    /// node's nexuses taken after claiming them (so it is newer than their last change); returns those not healed
    /// yet when the claims were held for [`NODE_PASS_HOLD`], let go for whatever waits for them.
    async fn heal_on_node(&self, node: &str, uuids: Vec<Uuid>) -> Result<Vec<Uuid>, VolumeError> {
        let mut claimed = Vec::new();
        for uuid in uuids {
            if let Some(c) = self.claim_idle(uuid).await? {
                claimed.push(c);
            }
        }
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        let listed = match self.engine(node).await {
            Ok(mut c) => c
                .list_nexuses(epb::ListNexusesRequest {})
                .await
                .ok()
                .map(|l| (c, l.into_inner().nexuses)),
            Err(_) => None,
        };
        let since = tokio::time::Instant::now();
        let mut claimed = claimed.into_iter();
        for (_held, r) in claimed.by_ref() {
            let uuid = r.uuid;
            // Moved, unpublished or switching over since the sweep's listing (an operation that took it while
            // it was let go): not this node's to heal from this listing; the next sweep heals it.
            let here = r
                .nexus
                .as_ref()
                .is_some_and(|n| n.published && n.node == node);
            if r.phase != VolumePhase::Created || !here || r.switchover.is_some() {
                continue;
            }
            let Some((c, l)) = listed.as_ref() else {
                // Its nexus's engine does not answer: the registry's node sweep decides about the node, and
                // healing moves the nexus once it is Offline.
                self.observe(&r, "Faulted", None);
                continue;
            };
            failpoint::delay(failpoint::HEAL_NODE_VOLUME).await;
            if let Err(e) = self.heal(r, Some((c.clone(), l.as_slice()))).await {
                tracing::debug!(%uuid, error = %e, "volume not healed yet");
            }
            if since.elapsed() >= NODE_PASS_HOLD {
                break;
            }
        }
        Ok(claimed.map(|(_, r)| r.uuid).collect())
    }

    /// Heals, now, the volumes whose nexuses on `node` reported a child's change. Each waits for an operation in
    /// flight on its volume (a sweep's pass over it may have looked before the change).
    pub async fn heal_changed(&self, node: &str, volumes: Vec<Uuid>) {
        for uuid in volumes {
            let held = self.lock_of(uuid).lock_owned().await;
            let r = match self.read(uuid).await {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(%uuid, error = %e, "cannot read the volume to heal it");
                    continue;
                }
            };
            if r.phase != VolumePhase::Created || r.nexus.as_ref().is_none_or(|n| n.node != node) {
                continue;
            }
            if let Err(e) = self.heal(r, None).await {
                tracing::debug!(%uuid, error = %e, "volume not healed yet");
            }
            drop(held);
        }
    }

    /// Records what a pass saw of `r`: its state, and its replicas' states from the nexus's children (`nexus`) or,
    /// without one, from the record.
    fn observe(&self, r: &VolumeRecord, state: &'static str, nexus: Option<&epb::Nexus>) {
        let mut o = VolumeObservation {
            state,
            replicas: Default::default(),
        };
        let children: Vec<(Uuid, i32)> = nexus
            .map(|n| {
                n.children
                    .iter()
                    .filter_map(|c| Some((replica_of(&c.uri)?, c.state)))
                    .collect()
            })
            .unwrap_or_default();
        for rep in &r.replicas {
            let s = match children.iter().find(|(id, _)| *id == rep.uuid) {
                Some((_, s)) => child_state_name(*s),
                None if rep.created => "unattached",
                None => "pending",
            };
            *o.replicas.entry(s).or_default() += 1;
        }
        self.observed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(r.uuid, o);
    }

    /// Brings a volume back to its record. `listed`: its nexus node's engine and the nexuses it listed after the
    /// caller claimed the volume; `None`: listed here.
    pub(super) async fn heal(
        &self,
        mut r: VolumeRecord,
        listed: Option<(EngineClient<Channel>, &[epb::Nexus])>,
    ) -> Result<(), VolumeError> {
        let uuid = r.uuid.to_string();
        // A switch-over that moved the nexus is still on record: only the nexus itself is brought back, never on the
        // node it left nor (unless the switch-over used them) from that node's replicas.
        let mut switching: Option<(String, bool)> = None;
        if r.nexus.as_ref().is_some_and(|n| n.unpublishing) {
            // An unpublish cut short (its agent died, a save failed): finished, never published again,
            // whatever switch-over was recorded.
            tracing::info!(%uuid, "finishing an unpublish that did not complete");
            let done = self.end_publication(r).await;
            self.metrics.operation(
                "finish_unpublish",
                if done.is_ok() { "ok" } else { "failed" },
            );
            return done.map(drop);
        }
        if let Some(s) = r.switchover.clone() {
            if r.nexus.is_none() {
                // Unpublished meanwhile (by an agent from before unpublishing ended switch-overs): nothing to move.
                r.switchover = None;
                return self.save(&r).await;
            }
            // A switch-over recorded and not finished (an agent died in it): finished now.
            r = self.finish_switchover(r, &s, true).await?;
            // Still on record with the nexus moved: the old node's replicas wait to be disowned until the new nexus
            // has a healthy child elsewhere. If it lost its children or its engine, that never comes by waiting: the
            // nexus is made again, or restarted from the replicas in sync (the old node's are not), as any other.
            let moved = r
                .nexus
                .as_ref()
                .is_some_and(|n| n.published && n.node != s.from);
            if r.switchover.is_none() || !moved {
                return Ok(());
            }
            switching = Some((s.from.clone(), s.old_replicas_left));
        }
        let Some(nexus) = r.nexus.clone().filter(|n| n.published) else {
            if let Some(n) = r.nexus.clone() {
                // A publish recorded but not finished (it failed, or an agent died in it): finished now.
                tracing::info!(uuid = %r.uuid, node = %n.node, "finishing a publish that did not complete");
                let done = self
                    .publish_locked(r, &n.host_nqn, &n.node, false, "")
                    .await;
                self.metrics
                    .operation("finish_publish", if done.is_ok() { "ok" } else { "failed" });
                return done.map(drop);
            }
            // Unpublished: only the replica count to keep.
            let state = self.unpublished_state(&r).await;
            self.observe(&r, state, None);
            self.retire_surplus(&mut r).await?;
            self.place_missing(&mut r).await?;
            return self.create_missing(&mut r).await;
        };
        let listed = match listed {
            Some((nc, l)) => Ok((nc, l.iter().find(|n| n.uuid == uuid).cloned())),
            None => match self.engine(&nexus.node).await {
                Ok(mut nc) => nc
                    .list_nexuses(epb::ListNexusesRequest {})
                    .await
                    .map(|l| {
                        let found = l.into_inner().nexuses.into_iter().find(|n| n.uuid == uuid);
                        (nc, found)
                    })
                    .map_err(|s| engine_error(&nexus.node, s)),
                Err(e) => Err(e),
            },
        };
        let (mut nc, found) = match listed {
            Ok(x) => x,
            Err(e) => {
                self.observe(&r, "Faulted", None);
                return Err(e);
            }
        };
        let Some(nx) = found else {
            // Its engine answers without it: the engine restarted (or the nexus was destroyed behind the agent's
            // back). Made again on its node, from the replicas; resynced if the old one did not end cleanly.
            self.observe(&r, "Faulted", None);
            tracing::warn!(%uuid, node = %nexus.node, "the nexus is gone from its engine: making it again");
            let (avoid, leave) = avoided(&switching);
            let r = self
                .publish_avoiding(r, &nexus.host_nqn, "", false, avoid, leave)
                .await;
            self.metrics
                .operation("restart_nexus", if r.is_ok() { "ok" } else { "failed" });
            return r.map(drop);
        };
        self.observe(&r, nexus_state(&r, Some(&nx)), Some(&nx));
        if switching.is_none()
            && self
                .registry
                .get(&nexus.node)
                .await
                .is_ok_and(|n| n.record.draining)
        {
            return self.move_nexus(r, &nexus).await;
        }
        let children: BTreeSet<Uuid> = nx
            .children
            .iter()
            .filter_map(|c| replica_of(&c.uri))
            .collect();
        // In sync is what the nexus calls Healthy; recorded when it changes. A child that stopped being healthy is
        // out of sync only if another one went on without it: with none healthy, no write was acknowledged since,
        // and the replicas in sync when the last child faulted keep every acknowledged write.
        let any_healthy = nx
            .children
            .iter()
            .any(|c| c.state == epb::ChildState::Healthy as i32);
        let mut changed = false;
        for c in &nx.children {
            let healthy = c.state == epb::ChildState::Healthy as i32;
            let Some(x) =
                replica_of(&c.uri).and_then(|id| r.replicas.iter_mut().find(|x| x.uuid == id))
            else {
                continue;
            };
            if x.fault_confirmed {
                if healthy {
                    // The nexus has not applied the fault the agent consented to yet.
                    continue;
                }
                x.fault_confirmed = false;
                changed = true;
            }
            if (healthy || any_healthy) && x.synced != healthy {
                x.synced = healthy;
                changed = true;
            }
        }
        if changed {
            self.save(&r).await?;
        }

        if !any_healthy {
            return self.restart_faulted(r, &nexus, switching).await;
        }
        // Nothing rejoined, retired or added while the switch-over waits: the old node's replicas are still in the
        // record, and its old nexus, if not ended, may still write to them.
        if switching.is_some() {
            return Ok(());
        }

        // 1. Rejoin faulted children whose replica is back and sound, retire the others; retire replicas that are no
        //    child and whose node is down (a nexus made while their node was away).
        for child in nx
            .children
            .iter()
            .filter(|c| c.state == epb::ChildState::Faulted as i32)
        {
            match self.rejoin(&mut r, &nexus.node, &mut nc, child).await? {
                Rejoin::Rejoined | Rejoin::Wait => continue,
                Rejoin::Retire => {}
            }
            let res = nc
                .remove_child(epb::ChildRequest {
                    uuid: uuid.clone(),
                    uri: child.uri.clone(),
                    reason: String::new(),
                })
                .await;
            let res = destroyed(&nexus.node, res);
            self.metrics.operation(
                "retire_faulted_child",
                if res.is_ok() { "ok" } else { "failed" },
            );
            res?;
            tracing::info!(%uuid, child = %child.uri, reason = %child.reason, "faulted child retired");
            if let Some(i) =
                replica_of(&child.uri).and_then(|rid| r.replicas.iter().position(|x| x.uuid == rid))
            {
                let (node, id) = (r.replicas[i].node.clone(), r.replicas[i].uuid);
                r.reason = format!("replica {id} on {node} faulted: {}", child.reason);
                self.retire(&mut r, i).await?;
            }
        }
        let mut i = 0;
        while i < r.replicas.len() {
            let rep = &r.replicas[i];
            if rep.created && !children.contains(&rep.uuid) && !self.node_online(&rep.node).await {
                r.reason = format!(
                    "replica {} on {} is away: its node is not Online",
                    rep.uuid, rep.node
                );
                self.retire(&mut r, i).await?;
            } else {
                i += 1;
            }
        }
        self.retire_surplus(&mut r).await?;

        // 2. Place and create what the spec asks for and the record lacks.
        self.place_missing(&mut r).await?;
        self.create_missing(&mut r).await?;

        // The replica set is whole again: why it was not is history. Cleared before the replacement is added (and can
        // turn Healthy), so that the record never says Degraded beside a nexus with every child in sync.
        if r.replicas.len() == r.spec.replicas as usize
            && r.replicas.iter().all(|x| x.created)
            && !r.reason.is_empty()
        {
            r.reason.clear();
            self.save(&r).await?;
        }

        // 3. Add created replicas the nexus does not have; it rebuilds them. Each is recorded out of sync first.
        let missing: Vec<ReplicaRecord> = r
            .replicas
            .iter()
            .filter(|x| x.created && !children.contains(&x.uuid))
            .cloned()
            .collect();
        for rep in &missing {
            // One whose replica is gone (its pool not back, its disk failing) is retired and replaced, not asked
            // again for ever; one whose engine does not answer now waits, and the others go on.
            let mut c = match self.standing(rep).await {
                Standing::Sound(c) => c,
                Standing::Wait => continue,
                Standing::Gone => {
                    if let Some(i) = r.replicas.iter().position(|x| x.uuid == rep.uuid) {
                        r.reason = format!(
                            "replica {} on {} cannot rejoin: gone from its engine, or its pool is not back or failing",
                            rep.uuid, rep.node
                        );
                        self.retire(&mut r, i).await?;
                    }
                    continue;
                }
            };
            // A fault consented to for an earlier nexus is that nexus's business: this one rebuilds the replica,
            // and its listing showing it Healthy is what counts it in sync again.
            if let Some(x) = r
                .replicas
                .iter_mut()
                .find(|x| x.uuid == rep.uuid && (x.synced || x.fault_confirmed))
            {
                x.synced = false;
                x.fault_confirmed = false;
                self.save(&r).await?;
            }
            let shared = c
                .share_replica(epb::ShareReplicaRequest {
                    uuid: rep.uuid.to_string(),
                    allowed_hosts: vec![names::node_host_nqn(&nexus.node)],
                })
                .await
                .map_err(|s| engine_error(&rep.node, s))?
                .into_inner();
            let uri = if rep.node == nexus.node {
                names::local_child_uri(&rep.uuid.to_string())
            } else {
                shared.uri
            };
            let added = nc
                .add_child(epb::ChildRequest {
                    uuid: uuid.clone(),
                    uri: uri.clone(),
                    reason: String::new(),
                })
                .await;
            self.metrics
                .operation("add_child", if added.is_ok() { "ok" } else { "failed" });
            added.map_err(|s| engine_error(&nexus.node, s))?;
            failpoint::at(failpoint::HEAL_CHILD_ADDED);
            tracing::info!(%uuid, child = %uri, "child added; the nexus rebuilds it");
        }
        Ok(())
    }

    /// A nexus none of whose children is healthy (the volume is Faulted) has nothing to rebuild a child from, so no
    /// child is rejoined or retired: the replicas in sync hold every acknowledged write, and one of them may be the
    /// only copy. Once one of them is back and sound ([`Self::replica_sound`]), the nexus is made again from them
    /// (resyncing them: the write that failed on all may have reached some), at most once per
    /// [`REJOIN_AGAIN_AFTER`]. Until then the volume stays Faulted with its replicas, and says why.
    ///
    /// `switching`: a switch-over that moved the nexus is on record (the node it left, and whether that node's
    /// replicas are left out): the nexus is made again avoiding them, and the switch-over stays on record.
    async fn restart_faulted(
        &self,
        mut r: VolumeRecord,
        nexus: &super::volume::NexusRecord,
        switching: Option<(String, bool)>,
    ) -> Result<(), VolumeError> {
        let now = super::node::now_ms();
        // A restart of this very nexus recorded and cut short: finished now, its stamps no limit to it.
        let resuming = r.restarting_key != 0 && r.restarting_key == nexus.key;
        let mut back = false;
        for rep in r.replicas.iter().filter(|x| x.created && x.synced) {
            if (resuming
                || now.saturating_sub(rep.rejoined_ms) >= REJOIN_AGAIN_AFTER.as_millis() as u64)
                && self.replica_sound(rep).await == Some(true)
            {
                back = true;
                break;
            }
        }
        if !back {
            let why = "no child of the nexus is healthy: waiting for an in-sync replica to be back with a sound \
                       disk (the replicas are kept; republish the volume to retry sooner)";
            if r.reason != why {
                tracing::warn!(uuid = %r.uuid, node = %nexus.node, "{why}");
                r.reason = why.to_string();
                self.save(&r).await?;
            }
            return Ok(());
        }
        tracing::warn!(uuid = %r.uuid, node = %nexus.node, "no child of the nexus is healthy and an in-sync replica is back: making the nexus again from the replicas in sync");
        if !resuming {
            for x in r.replicas.iter_mut().filter(|x| x.synced) {
                x.rejoined_ms = now;
            }
        }
        r.resync = true;
        r.restarting_key = nexus.key;
        self.save(&r).await?;
        failpoint::at(failpoint::HEAL_RESTART_RECORDED);
        self.destroy_nexus(r.uuid, &nexus.node).await?;
        let (avoid, leave) = avoided(&switching);
        let done = self
            .publish_avoiding(r, &nexus.host_nqn, "", true, avoid, leave)
            .await;
        self.metrics.operation(
            "restart_faulted_nexus",
            if done.is_ok() { "ok" } else { "failed" },
        );
        done.map(drop)
    }

    /// Whether a replica is back and sound: its node Online, its engine listing it, its pool's disk without errors.
    /// `None`: not known yet (its engine does not answer, or has not imported the pool).
    async fn replica_sound(&self, rep: &super::volume::ReplicaRecord) -> Option<bool> {
        if !self.node_online(&rep.node).await {
            return Some(false);
        }
        let mut c = self.engine(&rep.node).await.ok()?;
        let (Ok(replicas), Ok(pools)) = (
            c.list_replicas(epb::ListReplicasRequest {}).await,
            c.list_pools(epb::ListPoolsRequest {}).await,
        ) else {
            return None;
        };
        let id = rep.uuid.to_string();
        let pool = pools
            .into_inner()
            .pools
            .into_iter()
            .find(|p| p.name == rep.pool)?;
        Some(pool.disk_errors == 0 && replicas.into_inner().replicas.iter().any(|x| x.uuid == id))
    }

    /// Whether a replica on an Online node can be used ([`Standing::Sound`], with its engine's client): its
    /// engine lists it and its pool's disk has no errors. [`Standing::Wait`] while its engine does not answer, or
    /// has not imported its pool within [`POOL_IMPORT_GRACE`] of the node coming back; [`Standing::Gone`] after.
    async fn standing(&self, rep: &super::volume::ReplicaRecord) -> Standing {
        if !self.node_online(&rep.node).await {
            return Standing::Gone;
        }
        let Ok(mut c) = self.engine(&rep.node).await else {
            return Standing::Wait;
        };
        let (Ok(replicas), Ok(pools)) = (
            c.list_replicas(epb::ListReplicasRequest {}).await,
            c.list_pools(epb::ListPoolsRequest {}).await,
        ) else {
            return Standing::Wait;
        };
        let id = rep.uuid.to_string();
        let pools = pools.into_inner().pools;
        let Some(pool) = pools.iter().find(|p| p.name == rep.pool) else {
            // The engine is back but has not imported the pool yet (a pool the agent manages is imported by its
            // reconciler): waited for a while after the node came back, then given up.
            let back_ms = self
                .registry
                .get(&rep.node)
                .await
                .map_or(0, |v| v.record.status.since_ms);
            let now = super::node::now_ms();
            if now.saturating_sub(back_ms) < POOL_IMPORT_GRACE.as_millis() as u64 {
                return Standing::Wait;
            }
            return Standing::Gone;
        };
        if pool.disk_errors == 0 && replicas.into_inner().replicas.iter().any(|x| x.uuid == id) {
            Standing::Sound(c)
        } else {
            Standing::Gone
        }
    }

    /// Rejoins a faulted child if its replica is back: its node Online, its engine listing the replica, its pool's
    /// disk without errors, and no rejoin of it in the last [`REJOIN_AGAIN_AFTER`]. The nexus rebuilds only what it
    /// missed when it is back within the partial-rebuild window. While the node is still Online by the registry
    /// but its engine does not answer (a process restarting), the child waits: the registry's node timeout is the
    /// grace period before the replica is given up.
    async fn rejoin(
        &self,
        r: &mut VolumeRecord,
        nexus_node: &str,
        nc: &mut proto::engine::engine_client::EngineClient<tonic::transport::Channel>,
        child: &epb::NexusChild,
    ) -> Result<Rejoin, VolumeError> {
        let Some(i) =
            replica_of(&child.uri).and_then(|id| r.replicas.iter().position(|x| x.uuid == id))
        else {
            return Ok(Rejoin::Retire);
        };
        let rep = r.replicas[i].clone();
        let now = super::node::now_ms();
        if now.saturating_sub(rep.rejoined_ms) < REJOIN_AGAIN_AFTER.as_millis() as u64
            || !self.node_online(&rep.node).await
        {
            return Ok(Rejoin::Retire);
        }
        let mut c = match self.standing(&rep).await {
            Standing::Sound(c) => c,
            Standing::Wait => return Ok(Rejoin::Wait),
            Standing::Gone => return Ok(Rejoin::Retire),
        };
        let id = rep.uuid.to_string();
        // Recorded first: if it faults again soon, it is replaced; out of sync until the nexus calls it Healthy.
        r.replicas[i].rejoined_ms = now;
        r.replicas[i].synced = false;
        r.replicas[i].fault_confirmed = false;
        self.save(r).await?;
        let shared = c
            .share_replica(epb::ShareReplicaRequest {
                uuid: id.clone(),
                allowed_hosts: vec![names::node_host_nqn(nexus_node)],
            })
            .await;
        let added = match shared {
            Ok(_) => nc
                .add_child(epb::ChildRequest {
                    uuid: r.uuid.to_string(),
                    uri: child.uri.clone(),
                    reason: String::new(),
                })
                .await
                .map(drop),
            Err(e) => Err(e),
        };
        self.metrics
            .operation("rejoin_child", if added.is_ok() { "ok" } else { "failed" });
        match added {
            Ok(()) => {
                tracing::info!(uuid = %r.uuid, replica = %id, node = %rep.node, "faulted replica is back: rejoined (rebuilt from what it missed)");
                Ok(Rejoin::Rejoined)
            }
            Err(e) => {
                tracing::warn!(uuid = %r.uuid, replica = %id, error = %e.message(), "rejoin failed: the replica is replaced");
                Ok(Rejoin::Retire)
            }
        }
    }

    /// Moves the nexus off its draining node: to a node holding one of the volume's replicas if one is Online and
    /// uncordoned, else to any such node. The old nexus is destroyed first (which drains its I/O), so the new one
    /// needs no resync. With nowhere to go, the nexus stays and the record says why.
    async fn move_nexus(
        &self,
        mut r: VolumeRecord,
        nexus: &super::volume::NexusRecord,
    ) -> Result<(), VolumeError> {
        let nodes = self.registry.list().await?;
        let usable = |name: &str| {
            nodes.iter().any(|n| {
                n.record.spec.name == name
                    && n.record.status.state == super::node::NodeState::Online
                    && !n.record.cordoned
            })
        };
        let target = r
            .replicas
            .iter()
            .filter(|x| x.created)
            .map(|x| x.node.clone())
            .find(|n| usable(n))
            .or_else(|| {
                nodes
                    .iter()
                    .map(|n| n.record.spec.name.clone())
                    .find(|n| usable(n))
            });
        let Some(target) = target else {
            let why = format!(
                "the nexus cannot leave draining node {}: no other node is Online and uncordoned",
                nexus.node
            );
            if r.reason != why {
                tracing::warn!(uuid = %r.uuid, %why, "drain waits");
                r.reason = why;
                self.save(&r).await?;
            }
            return Ok(());
        };
        // Persist, then act: the move is recorded first. An agent that lost its leadership (its draining flag may be
        // stale) fails here, at the fenced store, instead of ending a live nexus.
        r.reason = format!(
            "moving the nexus off draining node {} to {target}",
            nexus.node
        );
        self.save(&r).await?;
        let destroyed = self.end_nexus(r.uuid, nexus).await?;
        if destroyed && let Some(n) = r.nexus.as_mut() {
            // Recorded before the new nexus is made: an agent that dies first leaves the next one knowing the old
            // one ended cleanly (its engine still runs, so it could not tell), and the volume is not resynced.
            n.ended_clean = true;
            self.save(&r).await?;
            failpoint::at(failpoint::DRAIN_OLD_ENDED);
        }
        tracing::info!(uuid = %r.uuid, from = %nexus.node, to = %target, "moving the nexus off a draining node");
        let moved = self
            .publish_locked(r, &nexus.host_nqn, &target, destroyed, "")
            .await;
        self.metrics
            .operation("move_nexus", if moved.is_ok() { "ok" } else { "failed" });
        moved.map(drop)
    }

    async fn node_online(&self, node: &str) -> bool {
        self.registry
            .get(node)
            .await
            .is_ok_and(|v| v.record.status.state == super::node::NodeState::Online)
    }

    /// Retires replica `i`: recorded as garbage first, then dropped from the volume's record, then destroyed
    /// (the garbage entry goes when the destroy succeeds, now or in [`Volumes::collect_garbage`]). A crash at any
    /// point leaves the replica either still in the record or recorded as garbage, never nowhere.
    pub(super) async fn retire(&self, r: &mut VolumeRecord, i: usize) -> Result<(), VolumeError> {
        let (id, g) = self.disown(r, i).await?;
        self.collect_one(&id.to_string(), &g).await?;
        Ok(())
    }

    /// The recorded half of [`Self::retire`]: replica `i` recorded as garbage, then dropped from the record; the
    /// garbage collector destroys it when its node answers.
    pub(super) async fn disown(
        &self,
        r: &mut VolumeRecord,
        i: usize,
    ) -> Result<(Uuid, Garbage), VolumeError> {
        let rep = r.replicas[i].clone();
        let g = Garbage {
            node: rep.node.clone(),
            volume: r.uuid,
            pool: rep.pool.clone(),
        };
        let bytes = serde_json::to_vec(&g).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.store().put(&garbage_key(&rep.uuid), bytes).await?;
        failpoint::at(failpoint::RETIRE_GARBAGE_RECORDED);
        r.replicas.remove(i);
        self.save(r).await?;
        failpoint::at(failpoint::RETIRE_DROPPED);
        Ok((rep.uuid, g))
    }

    /// Places (and records) replicas while the record has fewer than the spec asks for; stops, saying why, when
    /// no node is eligible.
    async fn place_missing(&self, r: &mut VolumeRecord) -> Result<(), VolumeError> {
        let uuid = r.uuid;
        while r.replicas.len() < r.spec.replicas as usize {
            // Until the replica is promised: the next placement sees it.
            let _placing = self.placing.lock().await;
            let nodes = self.placement_view(&[]).await?.nodes;
            let holding: BTreeSet<String> = r.replicas.iter().map(|x| x.node.clone()).collect();
            let block_size = r.replica_block_size(&nodes);
            let placed = scheduler::place_alongside(
                &nodes,
                r.spec.size,
                1,
                &holding,
                &r.spec.placement,
                block_size,
            );
            let choice = match placed {
                Ok(c) => c.into_iter().next(),
                Err(e) => {
                    let why = format!("Degraded: no replacement can be placed: {e}");
                    if r.reason != why {
                        tracing::warn!(%uuid, %why, "volume stays degraded");
                        r.reason = why;
                        self.save(r).await?;
                    }
                    break;
                }
            };
            let Some(choice) = choice else { break };
            if r.block_size == 0 {
                // A record from before block sizes were kept: kept from now on.
                let chosen = [(choice.node.as_str(), choice.pool.as_str())];
                r.block_size = block_size
                    .or_else(|| scheduler::block_size_of(&nodes, chosen.into_iter()))
                    .unwrap_or(0);
            }
            r.replicas.push(ReplicaRecord {
                uuid: Uuid::new_v4(),
                node: choice.node,
                pool: choice.pool,
                created: false,
                rejoined_ms: 0,
                synced: false,
                fault_confirmed: false,
            });
            // Promised before it is recorded, so that the next placement need not wait for the store.
            self.promise_replicas(r, false);
            drop(_placing);
            if let Err(e) = self.save(r).await {
                // It may be written all the same (a store timeout): promised as written, the sweep decides.
                self.promise_replicas(r, true);
                return Err(e);
            }
            self.promise_replicas(r, true);
            failpoint::at(failpoint::HEAL_REPLICA_PLACED);
        }
        Ok(())
    }

    /// Creates the recorded replicas the engine has not confirmed; a failed one is forgotten, to be placed again.
    async fn create_missing(&self, r: &mut VolumeRecord) -> Result<(), VolumeError> {
        let uuid = r.uuid;
        let mut i = 0;
        while i < r.replicas.len() {
            if r.replicas[i].created {
                i += 1;
                continue;
            }
            let rep = r.replicas[i].clone();
            let res = self.create_replica(&rep, r.spec.size).await;
            self.metrics
                .operation("create_replica", if res.is_ok() { "ok" } else { "failed" });
            match res {
                Ok(generation) => {
                    failpoint::at(failpoint::HEAL_REPLICA_CREATED);
                    r.replicas[i].created = true;
                    // Created at the size a growth in flight grows the others to: grown already.
                    if let Some(g) = r.growth.as_mut()
                        && !g.grown.contains(&rep.uuid)
                    {
                        g.grown.push(rep.uuid);
                        g.born_grown.push(rep.uuid);
                    }
                    self.save(r).await?;
                    self.replica_created(&rep.uuid, generation);
                    tracing::info!(%uuid, replica = %rep.uuid, node = %rep.node, "replacement replica created");
                    i += 1;
                }
                Err(e) => {
                    // Refused, or its node is gone: never created, so forget the plan and place it again (elsewhere
                    // if need be). Anything else (a timeout) may have created it: keep the plan and ask again.
                    if self.never_made_there(&rep, &e).await {
                        // Retired as garbage, not just forgotten: an engine that answered badly may have made it.
                        r.reason = format!("Degraded: the replacement on {} failed: {e}", rep.node);
                        self.retire(r, i).await?;
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Changes the replica count (see the cluster API's SetVolumeReplicas).
    pub async fn set_replicas(&self, uuid: Uuid, n: u32) -> Result<VolumeRecord, VolumeError> {
        if n == 0 || n > MAX_REPLICAS {
            return Err(VolumeError::InvalidArgument(format!(
                "replica count {n} must be 1 to {MAX_REPLICAS}"
            )));
        }
        let lock = self.lock_of(uuid);
        let _held = lock.lock().await;
        let mut r = self.read(uuid).await?.ok_or(VolumeError::NotFound(uuid))?;
        super::volumes::created(&r)?;
        if n as usize > r.replicas.len() {
            // All the new replicas must fit now, or nothing changes: placed, promised and recorded in one turn of
            // the placements, so none placed meanwhile takes their room.
            let placing = self.placing.lock().await;
            let nodes = self.placement_view(&[]).await?.nodes;
            let holding: BTreeSet<String> = r.replicas.iter().map(|x| x.node.clone()).collect();
            let block_size = r.replica_block_size(&nodes);
            let choices = scheduler::place_alongside(
                &nodes,
                r.spec.size,
                n as usize - r.replicas.len(),
                &holding,
                &r.spec.placement,
                block_size,
            )?;
            if r.block_size == 0 {
                // A record from before block sizes were kept: kept from now on.
                r.block_size = block_size
                    .or_else(|| {
                        scheduler::block_size_of(
                            &nodes,
                            choices.iter().map(|c| (c.node.as_str(), c.pool.as_str())),
                        )
                    })
                    .unwrap_or(0);
            }
            r.replicas
                .extend(choices.into_iter().map(|c| ReplicaRecord {
                    uuid: Uuid::new_v4(),
                    node: c.node,
                    pool: c.pool,
                    created: false,
                    rejoined_ms: 0,
                    synced: false,
                    fault_confirmed: false,
                }));
            r.spec.replicas = n;
            self.promise_replicas(&r, false);
            drop(placing);
            let saved = self.save(&r).await;
            // Written, or it may be written all the same (a store timeout): promised as written, the sweep decides.
            self.promise_replicas(&r, true);
            saved?;
        } else {
            r.spec.replicas = n;
            self.save(&r).await?;
        }
        tracing::info!(%uuid, replicas = n, "replica count changed");
        self.retire_surplus(&mut r).await?;
        if let Err(e) = self.heal(r, None).await {
            tracing::warn!(%uuid, error = %e, "new replicas not in yet; the reconciler goes on");
        }
        self.read(uuid).await?.ok_or(VolumeError::NotFound(uuid))
    }

    /// Removes replicas beyond the spec in the order of [`next_surplus`]. The nexus keeps at least one healthy
    /// child (it refuses otherwise).
    async fn retire_surplus(&self, r: &mut VolumeRecord) -> Result<(), VolumeError> {
        if r.replicas.len() <= r.spec.replicas as usize {
            return Ok(());
        }
        // While a switch-over waits to disown the old node's replicas, nothing is retired: which copies count is
        // the switch-over's to decide (healing retires the surplus once it finished).
        if r.switchover.is_some() {
            return Ok(());
        }
        let uuid = r.uuid.to_string();
        let nexus = r.nexus.clone().filter(|n| n.published);
        let mut healthy = BTreeSet::new();
        let mut children = BTreeSet::new();
        if let Some(n) = &nexus {
            let mut c = self.engine(&n.node).await?;
            let list = c
                .list_nexuses(epb::ListNexusesRequest {})
                .await
                .map_err(|s| engine_error(&n.node, s))?
                .into_inner();
            for ch in list
                .nexuses
                .iter()
                .filter(|x| x.uuid == uuid)
                .flat_map(|x| &x.children)
            {
                if let Some(id) = replica_of(&ch.uri) {
                    children.insert((id, ch.uri.clone()));
                    // A fault the agent consented to that the nexus has not applied yet: the listing is from
                    // before it, and the replica is missing writes (see `ReplicaRecord::fault_confirmed`).
                    let fault_pending =
                        r.replicas.iter().any(|x| x.uuid == id && x.fault_confirmed);
                    if ch.state == epb::ChildState::Healthy as i32 && !fault_pending {
                        healthy.insert(id);
                    }
                }
            }
        }
        let nexus_node = nexus.as_ref().map(|n| n.node.clone()).unwrap_or_default();
        // The nexus's word on who is in sync counts only while it has a healthy child: a nexus gone from its engine
        // (restarted, not made again yet) or with every child faulted says nothing, and the records decide.
        let in_sync = (!healthy.is_empty()).then_some(&healthy);
        let online: BTreeSet<String> = self
            .registry
            .list()
            .await?
            .into_iter()
            .filter(|n| n.record.status.state == super::node::NodeState::Online)
            .map(|n| n.record.spec.name)
            .collect();
        while r.replicas.len() > r.spec.replicas as usize {
            let Some(i) = next_surplus(&r.replicas, in_sync, &online, &nexus_node) else {
                break;
            };
            let rep = r.replicas[i].clone();
            if let (Some(n), Some((_, uri))) =
                (&nexus, children.iter().find(|(id, _)| *id == rep.uuid))
            {
                // Persist, then act: out of sync on record before the nexus lets it go. From then on it misses
                // every write (and the nexus drops what the others recorded for it); a record still saying it is
                // in sync after a crash past here would let a publish, or a switch-over, take it for a good copy,
                // even for the source of a resync.
                if r.replicas[i].synced {
                    r.replicas[i].synced = false;
                    self.save(r).await?;
                }
                let mut c = self.engine(&n.node).await?;
                let res = c
                    .remove_child(epb::ChildRequest {
                        uuid: uuid.clone(),
                        uri: uri.clone(),
                        reason: String::new(),
                    })
                    .await;
                destroyed(&n.node, res)?;
                failpoint::at(failpoint::RETIRE_CHILD_REMOVED);
            }
            self.retire(r, i).await?;
            tracing::info!(%uuid, replica = %rep.uuid, node = %rep.node, "surplus replica retired");
        }
        Ok(())
    }
}

/// What a nexus made again avoids (`publish_avoiding`'s node and whether its replicas too): while a switch-over
/// that moved the nexus is on record, the node it left (and its replicas, if the switch-over left them out); else
/// nothing (`publish_locked`).
fn avoided(switching: &Option<(String, bool)>) -> (&str, bool) {
    switching
        .as_ref()
        .map_or(("", true), |(from, leave)| (from.as_str(), *leave))
}

/// Healing as a reconciler (see [`super::reconcile`]).
pub struct Healing(pub std::sync::Arc<Volumes>);

#[async_trait::async_trait]
impl super::reconcile::Reconciler for Healing {
    fn name(&self) -> &'static str {
        "healing"
    }

    async fn pass(&self) -> Result<(), String> {
        self.0.heal_all().await.map_err(|e| e.to_string())
    }
}

/// The replica a scale-down retires next: never created first, then those missing writes, then those on a node not
/// Online (not in `online`), then those away from the nexus's node. Missing writes: not healthy in the nexus when
/// `healthy` is the nexus's word (it is listed and has a healthy child), else not recorded in sync (placed empty by
/// a scale-up, or left half rebuilt). A replica in sync goes only once none out of sync is left, so a scale-down
/// never keeps a half-rebuilt copy over the only full one; and of the copies in sync, one that can be reached is
/// kept over one on a node that is down (which may never come back).
fn next_surplus(
    replicas: &[ReplicaRecord],
    healthy: Option<&BTreeSet<Uuid>>,
    online: &BTreeSet<String>,
    nexus_node: &str,
) -> Option<usize> {
    let rank = |x: &ReplicaRecord| {
        let in_sync = match healthy {
            Some(h) => h.contains(&x.uuid),
            None => x.synced,
        };
        (
            x.created,
            in_sync,
            online.contains(&x.node),
            x.node == nexus_node,
            x.node.clone(),
        )
    };
    (0..replicas.len()).min_by_key(|i| rank(&replicas[*i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(node: &str, synced: bool) -> ReplicaRecord {
        ReplicaRecord {
            uuid: Uuid::new_v4(),
            node: node.into(),
            pool: "p".into(),
            created: true,
            rejoined_ms: 0,
            synced,
            fault_confirmed: false,
        }
    }

    #[test]
    fn a_scale_down_without_the_nexus_s_word_keeps_the_replica_in_sync() {
        // The only full copy is away from the nexus's node; a half-rebuilt one is on it.
        let full = replica("n1", true);
        let half = replica("n2", false);
        let rs = [full.clone(), half.clone()];
        let all = BTreeSet::from(["n1".to_string(), "n2".to_string()]);
        // The nexus is gone from its engine (restarted), or lists every child faulted: the records decide.
        assert_eq!(
            next_surplus(&rs, None, &all, "n2"),
            Some(1),
            "the half copy goes"
        );
        // The nexus lists the full copy healthy and the other rebuilding.
        let healthy = BTreeSet::from([full.uuid]);
        assert_eq!(next_surplus(&rs, Some(&healthy), &all, "n2"), Some(1));
        // The full copy's node is down: the half copy still goes (the full one may come back; the half one
        // never becomes whole without it).
        let only_n2 = BTreeSet::from(["n2".to_string()]);
        assert_eq!(next_surplus(&rs, None, &only_n2, "n2"), Some(1));
        // Both in sync: the one away from the nexus goes.
        let rs = [replica("n1", true), replica("n2", true)];
        assert_eq!(next_surplus(&rs, None, &all, "n2"), Some(0));
        // Never created goes first of all.
        let mut empty = replica("n2", true);
        empty.created = false;
        let rs = [full, empty];
        assert_eq!(next_surplus(&rs, None, &all, "n2"), Some(1));
    }

    #[test]
    fn a_scale_down_keeps_the_copy_it_can_reach_over_one_on_a_node_that_is_down() {
        // An unpublished volume (no nexus): both copies recorded in sync, n2's node down. Retiring n1's copy would
        // leave the volume's only copy on a node that may never come back.
        let rs = [replica("n1", true), replica("n2", true)];
        let only_n1 = BTreeSet::from(["n1".to_string()]);
        assert_eq!(next_surplus(&rs, None, &only_n1, ""), Some(1));
        // Published, the nexus (on n3) still lists n2's copy healthy, not having written since its node died.
        let healthy = BTreeSet::from([rs[0].uuid, rs[1].uuid]);
        let n1_n3 = BTreeSet::from(["n1".to_string(), "n3".to_string()]);
        assert_eq!(next_surplus(&rs, Some(&healthy), &n1_n3, "n3"), Some(1));
    }

    #[test]
    fn child_uris_name_their_replica() {
        let u = Uuid::new_v4();
        assert_eq!(
            replica_of(&format!(
                "nvmf://127.0.0.1:4420/nqn.2026-11.io.keelson:replica-{u}"
            )),
            Some(u)
        );
        assert_eq!(replica_of(&names::local_child_uri(&u.to_string())), Some(u));
        assert_eq!(
            replica_of(&format!(
                "local:///nqn.2026-11.io.keelson:replica-{u}?nsid=1"
            )),
            Some(u)
        );
        assert_eq!(
            replica_of("nvmf://127.0.0.1:4420/nqn.2026-11.io.keelson:vol-x"),
            None
        );
    }
}
