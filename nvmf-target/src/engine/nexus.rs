//! The engine's nexuses: resolving child URIs to block devices, creating and destroying nexuses, and publishing a
//! nexus as the volume's subsystem.

use std::sync::Arc;
use std::time::Duration;

use crate::block::{BlockDevice, BlockError};
use crate::initiator::ConnectOptions;
use crate::initiator::namespace::RemoteNamespace;
use crate::initiator::reservation::REPLICA_RESERVATION;
use crate::nexus::{Nexus, NexusConfig};
use crate::protocol::nqn::Nqn;
use crate::target::SubsystemSpec;

use super::local::LocalChild;
use super::uri::ChildUri;
use super::{Engine, EngineError, Resource};

/// A nexus as the engine keeps it.
pub struct NexusEntry {
    pub uuid: uuid::Uuid,
    pub nexus: Arc<Nexus>,
    /// Published under this NQN, if at all.
    pub nqn: Option<Nqn>,
    pub reservation: Option<ReservationKeys>,
}

/// Options of a new nexus.
#[derive(Clone, Debug, Default)]
pub struct NexusOptions {
    pub io_timeout: Option<Duration>,
    pub rebuild_rate_limit: Option<u64>,
    pub reservation: Option<ReservationKeys>,
    /// The volume's earlier nexus ended uncleanly (its engine was killed): children that agree by the records may
    /// still differ where its writes were in flight, so all but the first are rebuilt in full from it.
    pub unclean_restart: bool,
    /// Faults of healthy children only with the cluster agent's consent (see `fault_gate`).
    pub confirm_faults: bool,
    /// Its size in bytes, at most its smallest child's (rounded down to whole blocks); none: its smallest child's.
    pub size: Option<u64>,
}

/// The reservation a nexus takes on its remote children.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservationKeys {
    /// Registered on every child; the nexus holds Exclusive Access under it.
    pub key: u64,
    /// The newest key of the nexuses this one replaces (0: none). A child held under this key or any older one is
    /// preempted: a volume's keys grow with each nexus, and an attempt that failed half way may have taken some
    /// children under its own key, which the agent never saw confirmed. A newer key is never preempted.
    pub preempt: u64,
}

impl Engine {
    /// This node's host NQN, used when its nexuses connect to replicas.
    pub fn host_nqn(&self) -> String {
        format!(
            "{}node-{}",
            crate::protocol::nqn::KEELSON_PREFIX,
            self.node_name()
        )
    }

    /// This node's 128-bit host identifier: derived from its host NQN, so it is the same after a restart and a
    /// nexus keeps its reservations across reconnects.
    pub fn host_id(&self) -> uuid::Uuid {
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, self.host_nqn().as_bytes())
    }

    /// Opens the device a child URI names. With `reservation`, the child (remote, or local through its namespace's
    /// reservations) is registered and reserved (Exclusive Access) for this node, preempting the replaced nexus's
    /// key if one is given.
    pub async fn open_child(
        &self,
        uri: &str,
        io_timeout: Duration,
        reservation: Option<ReservationKeys>,
    ) -> Result<Arc<dyn BlockDevice>, EngineError> {
        match ChildUri::parse(uri).map_err(|e| EngineError::InvalidArgument(e.to_string()))? {
            ChildUri::Local { nqn, nsid } => {
                let missing = |what| EngineError::ChildMissing {
                    uri: uri.to_string(),
                    what,
                };
                let sub = self
                    .target()
                    .subsystem(nqn.as_str())
                    .ok_or_else(|| missing(Resource::Subsystem(nqn.to_string())))?;
                let ns = sub.namespace(nsid).ok_or_else(|| {
                    missing(Resource::Namespace {
                        nqn: nqn.to_string(),
                        nsid,
                    })
                })?;
                let child = LocalChild::new(ns, self.host_id());
                if let Some(keys) = reservation {
                    reserve(&child, keys).await.map_err(|source| {
                        EngineError::ChildReservation {
                            uri: uri.to_string(),
                            source,
                        }
                    })?;
                }
                Ok(Arc::new(child))
            }
            ChildUri::Nvmf { addr, nqn, nsid } => {
                let mut o = ConnectOptions::new(addr, nqn.as_str());
                o.hostnqn = self.host_nqn();
                o.hostid = *self.host_id().as_bytes();
                // One for small I/O per I/O thread (two without them, round robin; at most 8), and one for bulk
                // transfers such as rebuild copies.
                let threads = self.target().config().io_threads.clone();
                o.io_queues = threads.as_ref().map_or(2, |t| t.len().clamp(1, 8)) as u16 + 1;
                o.io_threads = threads;
                o.command_timeout = io_timeout;
                let mut ns = RemoteNamespace::connect(o, nsid).await.map_err(|source| {
                    EngineError::ChildUnreachable {
                        uri: uri.to_string(),
                        source,
                    }
                })?;
                // A nexus wants a failing child to fail fast, not to wait for it to come back.
                ns.reconnect_wait = Duration::ZERO;
                if let Some(keys) = reservation {
                    if let Err(source) = reserve(&ns, keys).await {
                        ns.close().await;
                        return Err(EngineError::ChildReservation {
                            uri: uri.to_string(),
                            source,
                        });
                    }
                    // A reconnect (every child lost its connection at once: the nexus goes on with the
                    // reconnected ones) ends the controller it replaces, as a rejoin does.
                    ns.hold_reservation(keys.key);
                }
                Ok(Arc::new(ns))
            }
        }
    }

    pub(super) fn nexuses_mut(&self) -> std::sync::MutexGuard<'_, Vec<NexusEntry>> {
        self.inner.nexuses.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn nexus(&self, uuid: &uuid::Uuid) -> Option<(Arc<Nexus>, Option<Nqn>)> {
        self.nexuses_mut()
            .iter()
            .find(|n| n.uuid == *uuid)
            .map(|n| (n.nexus.clone(), n.nqn.clone()))
    }

    pub fn nexuses(&self) -> Vec<(uuid::Uuid, Arc<Nexus>, Option<Nqn>)> {
        self.nexuses_mut()
            .iter()
            .map(|n| (n.uuid, n.nexus.clone(), n.nqn.clone()))
            .collect()
    }

    fn nexus_or_not_found(&self, uuid: &uuid::Uuid) -> Result<Arc<Nexus>, EngineError> {
        self.nexus(uuid)
            .map(|n| n.0)
            .ok_or(EngineError::NotFound(Resource::Nexus(*uuid)))
    }

    /// Creates a nexus over `children` (assumed to hold the same data). Repeating the same request is a no-op.
    pub async fn create_nexus(
        &self,
        uuid: uuid::Uuid,
        children: &[String],
        options: NexusOptions,
    ) -> Result<Arc<Nexus>, EngineError> {
        if children.is_empty() {
            return Err(EngineError::InvalidArgument(
                "a nexus needs at least one child".into(),
            ));
        }
        distinct_children(children.iter().map(String::as_str))?;
        // A second create of the same nexus waits for the first, then finds it made: opening the children side by
        // side, each would end the other's connections to them (a replica's subsystem is single-path) and run
        // rebuilds beside the other's writes.
        let _changing = self.inner.changing.claim(uuid).await;
        if self
            .inner
            .stopping
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(EngineError::FailedPrecondition(format!(
                "nexus {uuid}: the engine is shutting down"
            )));
        }
        if let Some((n, _)) = self.nexus(&uuid) {
            let mut have: Vec<String> = n.children().into_iter().map(|c| c.name).collect();
            let mut want = children.to_vec();
            have.sort();
            want.sort();
            let key = self
                .nexuses_mut()
                .iter()
                .find(|e| e.uuid == uuid)
                .and_then(|e| e.reservation.map(|k| k.key));
            // The same request again, only for the same nexus still running: one with another key, or stopped
            // (fenced by a newer nexus, or replaced), is not the nexus asked for.
            let conflict = if have != want {
                format!("with other children ({})", have.join(", "))
            } else if key != options.reservation.map(|k| k.key) {
                format!("with another reservation key ({})", key.unwrap_or(0))
            } else if n.state() == crate::nexus::NexusState::Shutdown {
                "stopped (fenced or replaced)".to_string()
            } else {
                return Ok(n);
            };
            return Err(EngineError::AlreadyExists {
                resource: Resource::Nexus(uuid),
                conflict,
            });
        }
        let mut config = NexusConfig {
            on_change: Some(crate::nexus::ChangeNotice {
                feed: self.nexus_changes(),
                name: uuid.to_string(),
            }),
            ..NexusConfig::default()
        };
        if let Some(t) = options.io_timeout {
            config.io_timeout = t;
        }
        if options.confirm_faults {
            let confirmer = self.fault_confirmer().ok_or_else(|| {
                EngineError::FailedPrecondition(
                    "confirm_faults: this engine has no cluster agent to ask (--cluster-agent)"
                        .into(),
                )
            })?;
            config.fault_gate = Some(Arc::new(super::fault_gate::NexusGate {
                confirmer,
                engine: Arc::downgrade(&self.inner),
                uuid,
                key: options.reservation.map_or(0, |k| k.key),
            }));
        }
        config.on_fenced = Some(Arc::new(super::fault_gate::Unpublish {
            engine: Arc::downgrade(&self.inner),
            uuid,
        }));
        config.rebuild.rate_limit = options.rebuild_rate_limit;
        let mut devices = Vec::new();
        for c in children {
            let dev = self
                .open_child(c, config.io_timeout, options.reservation)
                .await?;
            devices.push((c.clone(), dev));
        }
        let nexus = Nexus::new_at_most(&uuid.to_string(), devices, config, options.size)
            .map_err(|source| EngineError::Nexus { uuid, source })?;
        // Children an earlier nexus of this volume recorded as behind are rebuilt before anyone reads them.
        match nexus.recover_missed(options.unclean_restart).await {
            Ok(r) if !r.is_empty() => {
                tracing::info!(%uuid, rebuilding = ?r, "children behind under an earlier nexus")
            }
            Ok(_) => {}
            Err(e) => {
                nexus.shutdown().await;
                return Err(EngineError::FailedPrecondition(format!(
                    "nexus {uuid}: every child is recorded as missing writes ({e}); no copy is known complete"
                )));
            }
        }
        let stopping = {
            let mut list = self.nexuses_mut();
            let stopping = self
                .inner
                .stopping
                .load(std::sync::atomic::Ordering::Acquire);
            if !stopping {
                list.push(NexusEntry {
                    uuid,
                    nexus: nexus.clone(),
                    nqn: None,
                    reservation: options.reservation,
                });
            }
            stopping
        };
        if stopping {
            // The engine's shutdown did not see it, so it would not be drained nor named if torn: it never serves.
            nexus.shutdown().await;
            return Err(EngineError::FailedPrecondition(format!(
                "nexus {uuid}: the engine is shutting down"
            )));
        }
        tracing::info!(%uuid, children = ?children, "nexus created");
        Ok(nexus)
    }

    /// Unpublishes and destroys a nexus (its children keep their data).
    /// The nexus is drained first (its writes in flight finish) and its children flushed, then unexported: a host
    /// never loses the answer to a write that reached some children and not others. `true`: a clean end
    /// ([`crate::nexus::Nexus::shutdown`]); `false`: the children may disagree, the next nexus resyncs them.
    pub async fn destroy_nexus(&self, uuid: &uuid::Uuid) -> Result<bool, EngineError> {
        let clean = self.nexus_or_not_found(uuid)?.shutdown().await;
        self.unpublish_nexus(uuid)?;
        let entry = {
            let mut list = self.nexuses_mut();
            let i = list
                .iter()
                .position(|n| n.uuid == *uuid)
                .ok_or(EngineError::NotFound(Resource::Nexus(*uuid)))?;
            list.remove(i)
        };
        drop(entry);
        tracing::info!(%uuid, clean, "nexus destroyed");
        Ok(clean)
    }

    /// Unpublishes the nexus and stops its I/O and rebuilds; it stays listed (Shutdown) until destroyed.
    pub async fn shutdown_nexus(&self, uuid: &uuid::Uuid) -> Result<(), EngineError> {
        let nexus = self.nexus_or_not_found(uuid)?;
        nexus.shutdown().await;
        self.unpublish_nexus(uuid)?;
        tracing::info!(%uuid, "nexus shut down");
        Ok(())
    }

    /// Exports the nexus as `nqn.2026-11.io.keelson:vol-<uuid>` with namespace 1 carrying the volume's UUID, so a
    /// replacement nexus on another node shows up as another path to the same namespace.
    pub fn publish_nexus(
        &self,
        uuid: &uuid::Uuid,
        ana_group: u32,
        allow_any_host: bool,
        hosts: &[String],
    ) -> Result<Nqn, EngineError> {
        let nexus = self.nexus_or_not_found(uuid)?;
        let nqn = Nqn::volume(uuid);
        for h in hosts {
            Nqn::parse(h).map_err(|e| EngineError::InvalidArgument(format!("host {h}: {e}")))?;
        }
        let _exporting = self.exporting();
        if let Some((_, Some(existing))) = self.nexus(uuid) {
            // Published already: to the hosts asked for now (a multi-host publish adds one; a retry names the same).
            self.target()
                .set_hosts(existing.as_str(), allow_any_host, hosts)?;
            return Ok(existing);
        }
        self.target().create_subsystem(SubsystemSpec {
            nqn: nqn.clone(),
            serial: String::new(),
            model: String::new(),
            allow_any_host,
            allowed_hosts: hosts.to_vec(),
            single_path: false,
        })?;
        if let Err(e) = self
            .target()
            .add_namespace(nqn.as_str(), 1, *uuid, ana_group.max(1), nexus)
        {
            let _ = self.target().delete_subsystem(nqn.as_str());
            return Err(e.into());
        }
        if let Some(e) = self.nexuses_mut().iter_mut().find(|n| n.uuid == *uuid) {
            e.nqn = Some(nqn.clone());
        }
        tracing::info!(%uuid, %nqn, "nexus published");
        Ok(nqn)
    }

    pub fn unpublish_nexus(&self, uuid: &uuid::Uuid) -> Result<(), EngineError> {
        let _exporting = self.exporting();
        let nqn = {
            let mut list = self.nexuses_mut();
            let e = list
                .iter_mut()
                .find(|n| n.uuid == *uuid)
                .ok_or(EngineError::NotFound(Resource::Nexus(*uuid)))?;
            e.nqn.take()
        };
        if let Some(nqn) = nqn {
            match self.target().delete_subsystem(nqn.as_str()) {
                // Gone already: unpublished, as asked.
                Err(crate::target::TargetError::NotFound(_)) => {}
                r => r?,
            }
        }
        Ok(())
    }

    /// Adds a child, fully rebuilt. A child already in the nexus and faulted rejoins instead: within the partial
    /// rebuild window it gets only the segments written while it was away.
    pub async fn add_child(&self, uuid: &uuid::Uuid, uri: &str) -> Result<(), EngineError> {
        use crate::nexus::child::ChildState;
        // Two calls at once (a retried request) would open the child side by side, each ending the other's
        // connection to it as it takes the reservation: the second waits, then finds the child there.
        let _changing = self.inner.changing.claim(*uuid).await;
        let nexus = self.nexus_or_not_found(uuid)?;
        // Another child's namespace under another URI (another address, `local://` for `nvmf://`) would be one
        // copy counted twice.
        let names: Vec<String> = nexus.children().into_iter().map(|c| c.name).collect();
        distinct_children(
            names
                .iter()
                .map(String::as_str)
                .filter(|n| *n != uri)
                .chain([uri]),
        )?;
        let existing = nexus.children().into_iter().find(|c| c.name == uri);
        if existing
            .as_ref()
            .is_some_and(|c| c.state != ChildState::Faulted)
        {
            return Err(EngineError::AlreadyExists {
                resource: Resource::Child {
                    nexus: *uuid,
                    uri: uri.to_string(),
                },
                conflict: "and is not faulted".into(),
            });
        }
        let keys = self
            .nexuses_mut()
            .iter()
            .find(|n| n.uuid == *uuid)
            .and_then(|n| n.reservation);
        if existing.is_some()
            && let Some(old) = nexus.child_device(uri)
        {
            // The faulted child's device still reconnects by itself, each time taking the reservation again: done
            // while the new one takes it, that would end the new one's connection.
            old.close().await;
        }
        let dev = self
            .open_child(uri, nexus.config().io_timeout, keys)
            .await?;
        if existing.is_some() {
            let kind = nexus
                .rejoin_child(uri, dev)
                .await
                .map_err(|source| EngineError::Nexus {
                    uuid: *uuid,
                    source,
                })?;
            tracing::info!(%uuid, uri, ?kind, "child rejoined");
            return Ok(());
        }
        nexus
            .add_child(uri, dev)
            .map_err(|source| EngineError::Nexus {
                uuid: *uuid,
                source,
            })
    }

    /// Grows the nexus to `size` bytes (its children grew first) and tells the hosts connected to its subsystem.
    pub async fn resize_nexus(&self, uuid: &uuid::Uuid, size: u64) -> Result<(), EngineError> {
        let nexus = self.nexus_or_not_found(uuid)?;
        let grew = nexus
            .grow(size)
            .await
            .map_err(|source| EngineError::Nexus {
                uuid: *uuid,
                source,
            })?;
        // Told again on a repeated request too: a host that missed the notice (it reconnected meanwhile) rescans.
        if let Some((_, Some(nqn))) = self.nexus(uuid)
            && let Some(sub) = self.target().subsystem(nqn.as_str())
        {
            sub.notify_namespace_changed(1);
        }
        if grew {
            tracing::info!(%uuid, size, "nexus resized");
        }
        Ok(())
    }

    /// Takes a crash-consistent snapshot `snapshot` of the volume on every healthy child; returns their URIs.
    pub async fn snapshot_nexus(
        &self,
        uuid: &uuid::Uuid,
        snapshot: uuid::Uuid,
    ) -> Result<Vec<String>, EngineError> {
        self.nexus_or_not_found(uuid)?
            .snapshot(snapshot)
            .await
            .map_err(|source| EngineError::Nexus {
                uuid: *uuid,
                source,
            })
    }

    pub fn remove_child(&self, uuid: &uuid::Uuid, uri: &str) -> Result<(), EngineError> {
        self.nexus_or_not_found(uuid)?
            .remove_child(uri)
            .map_err(|source| EngineError::Nexus {
                uuid: *uuid,
                source,
            })
    }

    pub async fn fault_child(
        &self,
        uuid: &uuid::Uuid,
        uri: &str,
        reason: &str,
    ) -> Result<(), EngineError> {
        self.nexus_or_not_found(uuid)?
            .fault_child(uri, reason)
            .await
            .map_err(|source| EngineError::Nexus {
                uuid: *uuid,
                source,
            })
    }
}

/// What taking a nexus's reservation needs from a child, local or remote.
#[async_trait::async_trait]
pub(super) trait Reservable: Send + Sync {
    /// Registers `key` for this node, replacing any key it had.
    async fn register_key(&self, key: u64) -> Result<(), BlockError>;
    /// The key of the reservation's holder, if there is one.
    async fn holder_key(&self) -> Result<Option<u64>, BlockError>;
    /// The keys every registrant holds (a key once per registrant).
    async fn registered_keys(&self) -> Result<Vec<u64>, BlockError>;
    /// Reservation Acquire with `action` (acquire or preempt of `preempt_key`).
    async fn acquire(
        &self,
        action: u8,
        key: u64,
        preempt_key: u64,
        rtype: u8,
    ) -> Result<(), BlockError>;
}

#[async_trait::async_trait]
impl Reservable for RemoteNamespace {
    async fn register_key(&self, key: u64) -> Result<(), BlockError> {
        RemoteNamespace::register_key(self, key).await
    }
    async fn acquire(
        &self,
        action: u8,
        key: u64,
        preempt_key: u64,
        rtype: u8,
    ) -> Result<(), BlockError> {
        RemoteNamespace::acquire(self, action, key, preempt_key, rtype).await
    }
    async fn holder_key(&self) -> Result<Option<u64>, BlockError> {
        Ok(RemoteNamespace::report(self)
            .await?
            .registrants
            .iter()
            .find(|(_, _, holds)| *holds)
            .map(|(_, key, _)| *key))
    }
    async fn registered_keys(&self) -> Result<Vec<u64>, BlockError> {
        Ok(RemoteNamespace::report(self)
            .await?
            .registrants
            .iter()
            .map(|(_, key, _)| *key)
            .collect())
    }
}

/// Registers the nexus's key on a child and takes Exclusive Access, preempting the holder when its key is one of the
/// replaced nexuses' (up to `keys.preempt`, never a newer one); then drops the registrations of replaced nexuses
/// that never held it ([`drop_replaced`]). The one fencing sequence, for local and remote children alike.
pub(super) async fn reserve(
    child: &dyn Reservable,
    keys: ReservationKeys,
) -> Result<(), BlockError> {
    take_reservation(child, keys).await?;
    drop_replaced(child, keys).await;
    Ok(())
}

/// A target keeps a bounded number of registrants per namespace (`target::reservation::MAX_REGISTRANTS`), and
/// preempting the holder removes only the holder's registration: a replaced nexus that registered and never held
/// the reservation (it lost a race, or failed half way) would stay registered for good, and over a volume's life on
/// many nodes they could fill the namespace and keep its next nexus from registering. The holder removes them,
/// every key up to `keys.preempt` but its own. Taking them out changes no one's rights (under Exclusive Access a
/// registrant that does not hold it may not write either), so a failure here is only logged.
async fn drop_replaced(child: &dyn Reservable, keys: ReservationKeys) {
    use crate::protocol::command::resv;
    if keys.preempt == 0 {
        return;
    }
    let mut stale = match child.registered_keys().await {
        Ok(k) => k,
        Err(e) => {
            tracing::debug!(error = %e, "listing a child's registrants failed");
            return;
        }
    };
    stale.retain(|k| *k != keys.key && *k <= keys.preempt);
    stale.sort_unstable();
    stale.dedup();
    for k in stale {
        if let Err(e) = child
            .acquire(resv::PREEMPT, keys.key, k, REPLICA_RESERVATION)
            .await
        {
            tracing::debug!(key = k, error = %e, "dropping a replaced nexus's registration failed");
        }
    }
}

async fn take_reservation(child: &dyn Reservable, keys: ReservationKeys) -> Result<(), BlockError> {
    use crate::protocol::command::resv;
    child.register_key(keys.key).await?;
    match child
        .acquire(resv::ACQUIRE, keys.key, 0, REPLICA_RESERVATION)
        .await
    {
        Err(BlockError::ReservationConflict) => match child.holder_key().await? {
            // Held by this key already, of the type nexuses took before (Write Exclusive): preempting itself
            // changes the type and keeps the registrations.
            Some(held) if held == keys.key => {
                child
                    .acquire(resv::PREEMPT, keys.key, held, REPLICA_RESERVATION)
                    .await
            }
            Some(held) if keys.preempt != 0 && held <= keys.preempt => {
                child
                    .acquire(resv::PREEMPT, keys.key, held, REPLICA_RESERVATION)
                    .await
            }
            // Released since: taken as it is.
            None if keys.preempt != 0 => {
                child
                    .acquire(resv::ACQUIRE, keys.key, 0, REPLICA_RESERVATION)
                    .await
            }
            _ => Err(BlockError::ReservationConflict),
        },
        r => r,
    }
}

/// INVALID_ARGUMENT unless the child URIs name distinct namespaces, none of them a nexus's own (a volume's
/// subsystem): one replica named twice (the same URI, or another address or scheme for it) would count as two
/// copies, each open ending the other's connection; a nexus as its own child would wait on itself.
fn distinct_children<'a>(uris: impl Iterator<Item = &'a str>) -> Result<(), EngineError> {
    let mut seen: Vec<(String, u32, &str)> = Vec::new();
    for uri in uris {
        let parsed =
            ChildUri::parse(uri).map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
        let (nqn, nsid) = parsed.namespace();
        if nqn.starts_with(&format!("{}vol-", crate::protocol::nqn::KEELSON_PREFIX)) {
            return Err(EngineError::InvalidArgument(format!(
                "child {uri} is a volume's nexus, not a replica"
            )));
        }
        if let Some((_, _, first)) = seen.iter().find(|(n, s, _)| n == nqn && *s == nsid) {
            return Err(EngineError::InvalidArgument(format!(
                "children {first} and {uri} are the same namespace"
            )));
        }
        seen.push((nqn.to_string(), nsid, uri));
    }
    Ok(())
}
