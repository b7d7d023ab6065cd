//! Publishing, persist-then-act: a nexus recorded with a new reservation key before its engine is asked; the
//! in-sync replicas shared to its node; the nexus created over them, preempting the key that held their reservations
//! (and resyncing them when the previous nexus did not end cleanly); exported to the volume's hosts (one, or several
//! for a multi-host raw block volume) and recorded as published. Unpublishing drops one host, or ends the nexus.

use proto::engine as epb;
use proto::names;
use tonic::Code;
use uuid::Uuid;

use super::dataplane::NodeEngineError;
use super::failpoint;
use super::node::NodeState;
use super::volume::{NexusRecord, ReplicaRecord, VolumePhase, VolumeRecord};
use super::volumes::{NexusEnd, VolumeError, Volumes, engine_error};

impl Volumes {
    /// Publishes the volume to `host_nqn` (see the cluster API's PublishVolume): `multi_host` lets it join the hosts
    /// the volume is published to already.
    pub async fn publish(
        &self,
        uuid: Uuid,
        host_nqn: &str,
        node_hint: &str,
        multi_host: bool,
    ) -> Result<VolumeRecord, VolumeError> {
        if !host_nqn.starts_with("nqn.") || host_nqn.len() > 223 {
            return Err(VolumeError::InvalidArgument(format!(
                "host NQN {host_nqn:?} is not an NQN"
            )));
        }
        let lock = self.lock_of(uuid);
        let _held = lock.lock().await;
        let r = self.get(uuid).await?;
        match r.phase {
            VolumePhase::Created => {}
            VolumePhase::Creating => {
                return Err(VolumeError::FailedPrecondition {
                    uuid,
                    why: format!("still being created ({})", r.reason),
                });
            }
            VolumePhase::Deleting => {
                return Err(VolumeError::Conflict {
                    uuid,
                    why: "it is being deleted".into(),
                });
            }
        }
        let mut r = r;
        if r.nexus.as_ref().is_some_and(|n| n.unpublishing) {
            // An unpublish cut short: finished first, then this publish makes a nexus of its own.
            r = self.end_publication(r).await?;
        }
        if let Some(n) = r.nexus.clone() {
            if !n.has_host(host_nqn) {
                // Another host only for a volume every publication shares (a multi-node mode from the first on;
                // a record from before `shared` shows it by its other hosts).
                let shared = r.shared || !n.more_hosts.is_empty();
                if !multi_host || !shared {
                    let how = if shared { "" } else { " for one node" };
                    return Err(VolumeError::FailedPrecondition {
                        uuid,
                        why: format!(
                            "published to {}{how}; unpublish it first",
                            n.hosts().join(", ")
                        ),
                    });
                }
                if let Some(nx) = r.nexus.as_mut() {
                    nx.more_hosts.push(host_nqn.to_string());
                }
                self.save(&r).await?;
                failpoint::at(failpoint::PUBLISH_HOST_RECORDED);
                tracing::info!(%uuid, host = host_nqn, "another host recorded for the volume");
            }
            if n.published && self.nexus_alive(uuid, &n.node).await? {
                if r.shared || !n.more_hosts.is_empty() {
                    // The engine told the record's hosts every time: a call before this one may have recorded this
                    // host and ended (failed, or its agent died) before the engine let it in, and its retry is this.
                    self.sync_hosts(&r).await?;
                    if !n.has_host(host_nqn) {
                        tracing::info!(%uuid, host = host_nqn, node = %n.node, "volume published to another host");
                    }
                }
                return Ok(r);
            }
            let first = n.host_nqn.clone();
            return self.publish_locked(r, &first, node_hint, false, "").await;
        }
        // The first publication decides whether others may join it; recorded with the nexus it makes.
        r.shared = multi_host;
        self.publish_locked(r, host_nqn, node_hint, false, "").await
    }

    /// Makes (or makes again) the volume's nexus and exports it to `host_nqn`; the caller holds the volume's lock
    /// and has checked the volume may be published. A nexus recorded but gone is replaced on its node if that is
    /// up, else on `node_hint` or a replica's node, with a new key that fences the old one; if the old one did not
    /// end cleanly (`old_destroyed`: the caller just destroyed it, which drained it), the new one resyncs the
    /// replicas. `avoid` (a switch-over's failed node; empty: none) counts as down, whatever the registry says.
    pub(super) async fn publish_locked(
        &self,
        r: VolumeRecord,
        host_nqn: &str,
        node_hint: &str,
        old_destroyed: bool,
        avoid: &str,
    ) -> Result<VolumeRecord, VolumeError> {
        self.publish_avoiding(r, host_nqn, node_hint, old_destroyed, avoid, true)
            .await
    }

    /// [`Self::publish_locked`], where the replicas on `avoid` are used unless `avoid_replicas`: a switch-over whose
    /// old nexus its engine ended may make the new nexus of them (the nexus itself still goes elsewhere).
    pub(super) async fn publish_avoiding(
        &self,
        mut r: VolumeRecord,
        host_nqn: &str,
        node_hint: &str,
        old_destroyed: bool,
        avoid: &str,
        avoid_replicas: bool,
    ) -> Result<VolumeRecord, VolumeError> {
        let uuid = r.uuid;
        let t0 = std::time::Instant::now();
        let nodes = self.registry.list().await?;
        // A new nexus goes to an Online node that is not cordoned.
        let online = |name: &str| {
            name != avoid
                && nodes.iter().any(|n| {
                    n.record.spec.name == name
                        && n.record.status.state == NodeState::Online
                        && !n.record.cordoned
                })
        };
        // A nexus recorded but gone (its engine restarted) is made again, on its node if that is up, with a new
        // key that preempts the old one. Else on a replica's node; else (none up and uncordoned: a switch-over off
        // the only replica's node) on any node, its children all remote.
        let node = match &r.nexus {
            Some(n) if online(&n.node) => n.node.clone(),
            _ if !node_hint.is_empty() && online(node_hint) => node_hint.to_string(),
            _ => r
                .replicas
                .iter()
                .map(|x| x.node.clone())
                .chain(nodes.iter().map(|n| n.record.spec.name.clone()))
                .find(|n| online(n))
                .ok_or_else(|| VolumeError::FailedPrecondition {
                    uuid,
                    why: "no node is Online and uncordoned to run the nexus".into(),
                })?,
        };
        let recorded = r.nexus.clone().filter(|n| n.node == node && !n.published);
        if let Some(n) = recorded.as_ref().filter(|n| n.key == r.fence_key) {
            // Made by an earlier attempt (its key confirmed) that stopped before it was recorded as published: it
            // may have been exported and taken writes. Still there, it is what `create_nexus` below finds (and
            // takes, or ends and makes again); gone from an engine that answers, it ended with that engine, and
            // unless that one shut down cleanly the new one resyncs the replicas.
            let listed = self
                .engine(&node)
                .await?
                .list_nexuses(epb::ListNexusesRequest {})
                .await
                .map_err(|s| engine_error(&node, s))?
                .into_inner()
                .nexuses
                .iter()
                .any(|x| x.uuid == uuid.to_string());
            if !listed && !r.resync && !n.ended_clean && !self.ended_cleanly(uuid, n).await {
                tracing::warn!(%uuid, node = %n.node, "the nexus an earlier attempt made did not end cleanly: the next one resyncs the replicas");
                r.resync = true;
                self.save(&r).await?;
            }
        }
        if recorded.is_none() {
            // The nexus this one replaces was made by its engine: did it end cleanly?
            if let Some(old) = r.nexus.clone().filter(|o| o.key == r.fence_key) {
                let clean =
                    old_destroyed || old.ended_clean || self.ended_cleanly(uuid, &old).await;
                if !clean {
                    tracing::warn!(%uuid, node = %old.node, "the volume's nexus did not end cleanly: the next one resyncs the replicas");
                    r.resync = true;
                }
            }
            r.last_key += 1;
            // A restart of the nexus this one replaces, if one was recorded, is done.
            r.restarting_key = 0;
            let more_hosts = r
                .nexus
                .as_ref()
                .map(|n| n.more_hosts.clone())
                .unwrap_or_default();
            r.nexus = Some(NexusRecord {
                unpublishing: false,
                ended_clean: false,
                more_hosts,
                node: node.clone(),
                key: r.last_key,
                host_nqn: host_nqn.to_string(),
                published: false,
                nqn: String::new(),
                addresses: vec![],
                instance: nodes
                    .iter()
                    .find(|x| x.record.spec.name == node)
                    .map(|x| x.record.spec.instance.clone())
                    .unwrap_or_default(),
            });
            self.save(&r).await?;
            failpoint::at(failpoint::PUBLISH_NEXUS_RECORDED);
        }
        let key = r.nexus.as_ref().map_or(0, |n| n.key);
        let placed = t0.elapsed();
        // The nexus is made of the in-sync replicas whose nodes are up. The others are recorded as out of sync first
        // (they miss what it writes): healing adds them to it afterwards, to be rebuilt, or replaces those away.
        let up = |name: &str| {
            (!avoid_replicas || name != avoid)
                && nodes.iter().any(|n| {
                    n.record.spec.name == name && n.record.status.state == NodeState::Online
                })
        };
        // Without one in-sync replica up there is no nexus to make, and nothing is marked: the replicas left out
        // have missed nothing, and one of them may be the only copy with every write.
        if !r
            .replicas
            .iter()
            .any(|x| x.created && x.synced && up(&x.node))
        {
            return Err(VolumeError::FailedPrecondition {
                uuid,
                why: "no in-sync replica's node is Online".into(),
            });
        }
        // The replica on the nexus's own node first: after an unclean end it is the one the others resync from.
        let mut order: Vec<&ReplicaRecord> = r
            .replicas
            .iter()
            .filter(|x| x.created && x.synced && up(&x.node))
            .collect();
        order.sort_by_key(|x| x.node != node);
        // The replicas let the new nexus's node in. On a move, the node the nexus leaves stays allowed: an old nexus
        // that still runs there (its node partitioned, not dead) must keep reaching the replicas and meet the
        // reservation the new one takes, so that it stops at its first write. Cut off from them instead, it would
        // fault them and go on acknowledging writes on its local replica alone, which the volume never sees.
        let mut hosts = vec![names::node_host_nqn(&node)];
        if !avoid.is_empty() && avoid != node {
            hosts.push(names::node_host_nqn(avoid));
        }
        // A replica that cannot be shared now (its pool not imported, its disk failing, its engine not answering)
        // is left out, not in the way of the others: made without it, the nexus has it marked out of sync below,
        // and healing rebuilds or replaces it.
        let mut members: Vec<Uuid> = Vec::new();
        let mut children = Vec::new();
        let mut left_out = Vec::new();
        for rep in order {
            let shared = async {
                self.engine(&rep.node)
                    .await?
                    .share_replica(epb::ShareReplicaRequest {
                        uuid: rep.uuid.to_string(),
                        allowed_hosts: hosts.clone(),
                    })
                    .await
                    .map_err(|s| engine_error(&rep.node, s))
            };
            match shared.await {
                Ok(shared) => {
                    members.push(rep.uuid);
                    children.push(if rep.node == node {
                        names::local_child_uri(&rep.uuid.to_string())
                    } else {
                        shared.into_inner().uri
                    });
                }
                Err(e) => {
                    tracing::warn!(%uuid, replica = %rep.uuid, node = %rep.node, error = %e, "an in-sync replica cannot be shared: the nexus is made without it");
                    left_out.push(e);
                }
            }
        }
        if children.is_empty() {
            return Err(left_out.pop().unwrap_or(VolumeError::FailedPrecondition {
                uuid,
                why: "no in-sync replica's node is Online".into(),
            }));
        }
        let shared = t0.elapsed();
        failpoint::delay(failpoint::PUBLISH_CREATING).await;
        let mut c = self.engine(&node).await?;
        let instance_before = self.online_instance(&node).await;
        let request = epb::CreateNexusRequest {
            uuid: uuid.to_string(),
            children,
            reservation_key: key,
            // Every older key: the last confirmed one (fence_key), and any attempt since that took some children
            // before it failed or before its success was saved.
            preempt_key: key.saturating_sub(1),
            unclean_restart: r.resync,
            confirm_faults: true,
            // The size hosts see: the volume's, or while a growth waits, the size it grows from. A replica made
            // larger (at the size of a growth undone since) must not make the nexus larger than the volume.
            size_bytes: r.growth.as_ref().map_or(r.spec.size, |g| g.from),
            ..Default::default()
        };
        let made = match c.create_nexus(request.clone()).await {
            Ok(n) => n.into_inner(),
            // Made by an earlier attempt with other children or another key, or stopped: destroyed (which drains
            // it) and made again. The record is written first: an agent that lost its leadership meanwhile fails
            // there (the store is fenced) instead of destroying the new leader's nexus.
            Err(s) if s.code() == Code::AlreadyExists => {
                self.save(&r).await?;
                let mut request = request;
                // One that did not end cleanly (a write on some children only) leaves replicas that may differ: the
                // new one resyncs them, recorded first so that a crash before it is made still does.
                if let NexusEnd::Destroyed { clean: false } =
                    self.destroy_nexus(uuid, &node).await?
                {
                    tracing::warn!(%uuid, %node, "the nexus found in the way did not end cleanly: the new one resyncs the replicas");
                    r.resync = true;
                    self.save(&r).await?;
                    request.unclean_restart = true;
                }
                c.create_nexus(request)
                    .await
                    .map_err(|s| engine_error(&node, s))?
                    .into_inner()
            }
            Err(s) => return Err(engine_error(&node, s)),
        };
        // One made by an earlier attempt, before an expansion that skipped it (it was not published yet), has the
        // old size: grown now that every replica has the new one.
        if made.size_bytes < r.spec.size && r.growth.is_none() {
            c.resize_nexus(epb::ResizeNexusRequest {
                uuid: uuid.to_string(),
                size: r.spec.size,
            })
            .await
            .map_err(|s| engine_error(&node, s))?;
        }
        failpoint::at(failpoint::PUBLISH_NEXUS_CREATED);
        let created = t0.elapsed();
        // The engine instance that made it: the one recorded with the nexus may have shut down (cleanly) since, and
        // an unclean end of this one must not be judged by that one's clean exit. Known only if the same instance
        // was Online before and after the call (an engine answers before it registers); else none, which is never
        // judged to have ended cleanly.
        let instance_after = self.online_instance(&node).await;
        if let Some(nx) = r.nexus.as_mut() {
            nx.instance = match (instance_before, instance_after) {
                (Some(a), Some(b)) if a == b => a,
                _ => String::new(),
            };
        }
        // Recorded with the key, before the nexus is exported (it writes nothing until then): the in-sync replicas
        // it was made without miss what it writes, and the children it rebuilds (every one but its source after an
        // unclean end, and any an earlier nexus recorded as behind) are not in sync until it says they are healthy.
        // Not before the nexus exists: a publish that fails leaves the replicas as they were (one left out may be
        // the only reachable copy, and the next attempt may need it).
        // A nexus with no healthy child (one an earlier attempt made, whose last healthy child faulted since) is
        // not exported: its children are left as recorded (with none healthy, none missed an acknowledged write),
        // and the next attempt makes it again from them, resynced.
        let healthy = |c: &epb::NexusChild| c.state == epb::ChildState::Healthy as i32;
        if !made.children.iter().any(healthy) {
            r.resync = true;
            self.save(&r).await?;
            self.destroy_nexus(uuid, &node).await?;
            return Err(VolumeError::FailedPrecondition {
                uuid,
                why: format!("the nexus made on {node} has no healthy child; made again next time"),
            });
        }
        let rebuilding: Vec<Uuid> = made
            .children
            .iter()
            .filter(|c| !healthy(c))
            .filter_map(|c| super::heal::replica_of(&c.uri))
            .collect();
        for x in r.replicas.iter_mut() {
            if x.synced && (!members.contains(&x.uuid) || rebuilding.contains(&x.uuid)) {
                x.synced = false;
            }
            // A fault consented to for an earlier nexus says nothing of this one's listings (the replica is no
            // member of it: it joins later and is rebuilt, and counts in sync once this nexus shows it Healthy).
            if !members.contains(&x.uuid) {
                x.fault_confirmed = false;
            }
        }
        // The nexus this one replaces did not end as far as the agent knows (its node cut off, not dead, maybe): it
        // may still serve reads from a replica on its node, which this one could not fence, for the read lease after
        // its last answer from a child this one did fence. Those reads end before this one takes its first write.
        // Waited before the record says the replicas need no resync, so an attempt cut short waits again.
        if r.resync {
            tracing::info!(%uuid, %node, lease = ?proto::READ_LEASE, "the replaced nexus's end is not known: waiting out its read lease before exporting the new one");
            // A tenth more: the two nodes' clocks need not run at quite the same rate.
            tokio::time::sleep(proto::READ_LEASE + proto::READ_LEASE / 10).await;
        }
        r.fence_key = key;
        r.resync = false;
        self.save(&r).await?;
        let hosts = r.nexus.as_ref().map(|n| n.hosts()).unwrap_or_default();
        let n = c
            .publish_nexus(epb::PublishNexusRequest {
                uuid: uuid.to_string(),
                ana_group: 1,
                allow_any_host: false,
                allowed_hosts: hosts.clone(),
            })
            .await
            .map_err(|s| engine_error(&node, s))?
            .into_inner();
        failpoint::at(failpoint::PUBLISH_PUBLISHED);
        let exported = t0.elapsed();
        let addresses = nodes
            .iter()
            .find(|x| x.record.spec.name == node)
            .map(|x| x.record.spec.nvmf_listeners.clone())
            .unwrap_or_default();
        if let Some(nx) = r.nexus.as_mut() {
            nx.published = true;
            nx.nqn = n.nqn;
            nx.addresses = addresses;
        }
        r.reason.clear();
        // A switch-over's record is cleared by the switch-over, once it has disowned what it left behind.
        if avoid.is_empty() {
            r.switchover = None;
        }
        self.save(&r).await?;
        // Stages: place (node chosen, nexus recorded), share (replicas opened to it), create (the nexus made, its key
        // taken on every replica, preempting the old one: the fencing), export. A move counts them as switch-over
        // stages.
        let stages = [
            ("place", placed),
            ("share", shared - placed),
            ("create", created - shared),
            ("export", exported - created),
        ];
        if !avoid.is_empty() {
            for (stage, d) in stages {
                self.metrics.switchover_stage(stage, d);
            }
        }
        tracing::info!(
            %uuid,
            %node,
            ?hosts,
            moved_from = avoid,
            place_ms = placed.as_millis() as u64,
            share_ms = (shared - placed).as_millis() as u64,
            create_ms = (created - shared).as_millis() as u64,
            export_ms = (exported - created).as_millis() as u64,
            "volume published"
        );
        Ok(r)
    }

    /// The engine instance the registry has Online on `node`, if any.
    async fn online_instance(&self, node: &str) -> Option<String> {
        self.registry
            .get(node)
            .await
            .ok()
            .filter(|v| v.record.status.state == NodeState::Online)
            .map(|v| v.record.spec.instance.clone())
    }

    /// Whether `node`'s engine has the volume's nexus, published: `false` when it answers without it or the node is
    /// down (not Online, or gone from the registry). An engine of an Online node that does not answer is an error
    /// (UNAVAILABLE): taken for "gone", a publish retried across a brief stall replaced a nexus serving its host.
    async fn nexus_alive(&self, uuid: Uuid, node: &str) -> Result<bool, VolumeError> {
        let mut c = match self.engine(node).await {
            Ok(c) => c,
            Err(VolumeError::Node(
                NodeEngineError::NotOnline { .. } | NodeEngineError::NotFound(_),
            )) => {
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let l = c
            .list_nexuses(epb::ListNexusesRequest {})
            .await
            .map_err(|s| engine_error(node, s))?;
        Ok(l.into_inner()
            .nexuses
            .iter()
            .any(|n| n.uuid == uuid.to_string() && !n.nqn.is_empty()))
    }

    /// Has the engine of the volume's published nexus let in exactly the record's hosts (idempotent). A node that is
    /// down has nothing to change: the nexus made next is told the record's hosts.
    async fn sync_hosts(&self, r: &VolumeRecord) -> Result<(), VolumeError> {
        let Some(n) = r.nexus.as_ref().filter(|n| n.published) else {
            return Ok(());
        };
        let mut c = match self.engine(&n.node).await {
            Ok(c) => c,
            Err(VolumeError::Node(
                NodeEngineError::NotOnline { .. } | NodeEngineError::NotFound(_),
            )) => {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match c
            .publish_nexus(epb::PublishNexusRequest {
                uuid: r.uuid.to_string(),
                ana_group: 1,
                allow_any_host: false,
                allowed_hosts: n.hosts(),
            })
            .await
        {
            // Gone from its engine (restarted): it lets no one in, and the nexus made next is told the record's
            // hosts.
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(engine_error(&n.node, s)),
            Ok(_) => Ok(()),
        }
    }

    /// Unpublishes the volume from `host` (others keep it; from the last one, or with no host named, the nexus is
    /// destroyed). A host it is not published to changes nothing.
    pub async fn unpublish(
        &self,
        uuid: Uuid,
        host: Option<&str>,
    ) -> Result<VolumeRecord, VolumeError> {
        let lock = self.lock_of(uuid);
        let _held = lock.lock().await;
        let mut r = self.get(uuid).await?;
        if let (Some(host), Some(n)) = (host, r.nexus.clone()) {
            if !n.has_host(host) {
                // Perhaps dropped from the record by a call that ended before the engine dropped it (failed, or its
                // agent died): this retry has the engine let in the record's hosts alone.
                if r.shared || !n.more_hosts.is_empty() {
                    self.sync_hosts(&r).await?;
                }
                return Ok(r);
            }
            if n.hosts().len() > 1 {
                let mut rest = n.hosts();
                rest.retain(|h| h != host);
                if let Some(nx) = r.nexus.as_mut() {
                    nx.host_nqn = rest.remove(0);
                    nx.more_hosts = rest;
                }
                self.save(&r).await?;
                failpoint::at(failpoint::UNPUBLISH_HOST_DROPPED);
                // Refused from now on (its controllers ended); an engine that does not answer fails the call, which
                // the CO makes again.
                self.sync_hosts(&r).await?;
                tracing::info!(%uuid, host, "volume unpublished from one host");
                return Ok(r);
            }
        }
        if r.nexus.is_some() {
            r = self.end_publication(r).await?;
            tracing::info!(%uuid, "volume unpublished");
        } else if r.switchover.take().is_some() {
            self.save(&r).await?;
        }
        Ok(r)
    }

    /// Ends the volume's publication (the caller holds its lock): recorded as unpublishing first, then the nexus
    /// ended, then the record without it. Persist, then act: a call cut short after the nexus ended (the agent
    /// killed, a failed save) left a published volume whose nexus was gone, and healing made it again, exported to
    /// the host the CO had just detached. A record left unpublishing is finished by healing, or by the next
    /// publish, through this again.
    pub(super) async fn end_publication(
        &self,
        mut r: VolumeRecord,
    ) -> Result<VolumeRecord, VolumeError> {
        let uuid = r.uuid;
        let Some(mut n) = r.nexus.clone() else {
            return Ok(r);
        };
        if !n.unpublishing {
            n.unpublishing = true;
            n.published = false;
            r.nexus = Some(n.clone());
            // A switch-over still pending was for this publication: nothing is to be moved any more.
            r.switchover = None;
            self.save(&r).await?;
            failpoint::at(failpoint::UNPUBLISH_MARKED);
        }
        // A drain that ended it cleanly and died before making the next one recorded so (its engine still runs:
        // finding it gone now says nothing).
        let clean = self.end_nexus(uuid, &n).await? || n.ended_clean;
        if !clean && n.key == r.fence_key {
            r.resync = true;
        }
        r.nexus = None;
        r.switchover = None;
        self.save(&r).await?;
        Ok(r)
    }
}
