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
//! when a node or pool appears. Not yet: rejoining a replica that comes back within the partial-rebuild window
//! instead of replacing it, and retiring the healthy replicas a lower replica count makes surplus.

use std::collections::BTreeSet;

use proto::engine as epb;
use proto::names;
use uuid::Uuid;

use super::scheduler;
use super::volume::{ReplicaRecord, VolumePhase, VolumeRecord};
use super::volumes::{VolumeError, Volumes, destroyed, engine_error};

/// The replica a child URI names (`...:replica-<uuid>`).
fn replica_of(uri: &str) -> Option<Uuid> {
    let at = uri.find(":replica-")? + ":replica-".len();
    Uuid::parse_str(uri.get(at..at + 36)?).ok()
}

impl Volumes {
    /// Heals every published volume whose operation is not in flight.
    pub async fn heal_all(&self) -> Result<(), VolumeError> {
        for r in self.list().await? {
            if r.phase != VolumePhase::Created || !r.nexus.as_ref().is_some_and(|n| n.published) {
                continue;
            }
            let lock = self.lock_of(r.uuid);
            let Ok(_held) = lock.try_lock() else {
                continue;
            };
            let Some(r) = self.read(r.uuid).await? else {
                continue;
            };
            let uuid = r.uuid;
            if let Err(e) = self.heal(r).await {
                tracing::debug!(%uuid, error = %e, "volume not healed yet");
            }
        }
        Ok(())
    }

    async fn heal(&self, mut r: VolumeRecord) -> Result<(), VolumeError> {
        let Some(nexus) = r.nexus.clone() else {
            return Ok(());
        };
        let uuid = r.uuid.to_string();
        let mut nc = self.engine(&nexus.node).await?;
        let list = nc
            .list_nexuses(epb::ListNexusesRequest {})
            .await
            .map_err(|s| engine_error(&nexus.node, s))?
            .into_inner();
        let Some(nx) = list.nexuses.into_iter().find(|n| n.uuid == uuid) else {
            return Ok(());
        };

        // 1. Retire faulted children.
        for child in nx
            .children
            .iter()
            .filter(|c| c.state == epb::ChildState::Faulted as i32)
        {
            let res = nc
                .remove_child(epb::ChildRequest {
                    uuid: uuid.clone(),
                    uri: child.uri.clone(),
                    reason: String::new(),
                })
                .await;
            destroyed(&nexus.node, res)?;
            tracing::info!(%uuid, child = %child.uri, reason = %child.reason, "faulted child retired");
            let Some(rid) = replica_of(&child.uri) else {
                continue;
            };
            if let Some(i) = r.replicas.iter().position(|x| x.uuid == rid) {
                let rep = r.replicas.remove(i);
                r.reason = format!(
                    "replica {} on {} faulted: {}",
                    rep.uuid, rep.node, child.reason
                );
                self.save(&r).await?;
                if let Ok(mut c) = self.engine(&rep.node).await {
                    let res = c
                        .destroy_replica(epb::DestroyReplicaRequest {
                            uuid: rep.uuid.to_string(),
                        })
                        .await;
                    if let Err(e) = destroyed(&rep.node, res) {
                        tracing::warn!(%uuid, replica = %rep.uuid, error = %e, "retired replica not destroyed");
                    }
                }
            }
        }

        // 2. Place and create what the spec asks for and the record lacks.
        while r.replicas.len() < r.spec.replicas as usize {
            let nodes: Vec<_> = self
                .registry
                .list()
                .await?
                .into_iter()
                .map(|v| v.record)
                .collect();
            let holding: BTreeSet<String> = r.replicas.iter().map(|x| x.node.clone()).collect();
            let choice = match scheduler::place(&nodes, r.spec.size, 1, &holding) {
                Ok(c) => c.into_iter().next(),
                Err(e) => {
                    let why = format!("Degraded: no replacement can be placed: {e}");
                    if r.reason != why {
                        tracing::warn!(%uuid, %why, "volume stays degraded");
                        r.reason = why;
                        self.save(&r).await?;
                    }
                    break;
                }
            };
            let Some(choice) = choice else { break };
            r.replicas.push(ReplicaRecord {
                uuid: Uuid::new_v4(),
                node: choice.node,
                pool: choice.pool,
                created: false,
            });
            self.save(&r).await?;
        }
        let mut i = 0;
        while i < r.replicas.len() {
            if r.replicas[i].created {
                i += 1;
                continue;
            }
            let rep = r.replicas[i].clone();
            let res = match self.engine(&rep.node).await {
                Ok(mut c) => c
                    .create_replica(epb::CreateReplicaRequest {
                        pool: rep.pool.clone(),
                        uuid: rep.uuid.to_string(),
                        size: r.spec.size,
                        share: false,
                        allowed_hosts: vec![],
                    })
                    .await
                    .map(drop)
                    .map_err(|s| engine_error(&rep.node, s)),
                Err(e) => Err(e),
            };
            match res {
                Ok(()) => {
                    r.replicas[i].created = true;
                    self.save(&r).await?;
                    tracing::info!(%uuid, replica = %rep.uuid, node = %rep.node, "replacement replica created");
                    i += 1;
                }
                Err(e) => {
                    // Never created: forget the plan, so the next run places it again (elsewhere if need be).
                    r.replicas.remove(i);
                    r.reason = format!("Degraded: the replacement on {} failed: {e}", rep.node);
                    self.save(&r).await?;
                    return Err(e);
                }
            }
        }

        // 3. Add created replicas the nexus does not have; it rebuilds them.
        let children: BTreeSet<Uuid> = nx
            .children
            .iter()
            .filter_map(|c| replica_of(&c.uri))
            .collect();
        for rep in r
            .replicas
            .iter()
            .filter(|x| x.created && !children.contains(&x.uuid))
        {
            let mut c = self.engine(&rep.node).await?;
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
            nc.add_child(epb::ChildRequest {
                uuid: uuid.clone(),
                uri: uri.clone(),
                reason: String::new(),
            })
            .await
            .map_err(|s| engine_error(&nexus.node, s))?;
            tracing::info!(%uuid, child = %uri, "child added; the nexus rebuilds it");
        }
        if r.replicas.len() == r.spec.replicas as usize
            && r.replicas.iter().all(|x| x.created)
            && !r.reason.is_empty()
        {
            r.reason.clear();
            self.save(&r).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
