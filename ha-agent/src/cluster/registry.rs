//! The registry of storage nodes. io-engines register and send heartbeats; [`Registry::sweep`] probes a node whose
//! heartbeats stopped through its engine API and marks it Offline when the probe fails too. A node's record goes
//! to the store when it registers and when its state or pools change; heartbeat times stay in memory, and an agent
//! that takes over leadership gives every known node a full timeout before judging it.
//!
//! The leader alone writes node records (its writes are fenced), so the registry keeps a copy of them, read once
//! when it starts leading and written through: listing nodes, which every placement does, reads no store.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::node::{self, NodeRecord, NodeSpec, NodeState, NodeStatus, PoolSpec};
use super::store::{Compare, Revision, Store, StoreError, Txn};

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("node {0} is not registered")]
    NotFound(String),
    #[error("{0}")]
    InUse(String),
    /// Only an Offline node is forgotten.
    #[error("node {0} is Online: only a node that is Offline (gone) is forgotten")]
    NotOffline(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a node record is corrupt ({record}...): {source}")]
    Corrupt {
        /// The record's first bytes.
        record: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Asks a node's engine API whether it answers, as that node: an engine at the endpoint under another name (the
/// machine renamed, or another one at its address) is not the node's.
#[async_trait]
pub trait Prober: Send + Sync + 'static {
    async fn probe(&self, engine_endpoint: &str, node: &str) -> Result<(), String>;
}

#[derive(Clone, Copy, Debug)]
pub struct RegistryConfig {
    /// How often io-engines send heartbeats.
    pub heartbeat: Duration,
    /// Silence after which a node is probed (and marked Offline if the probe fails).
    pub timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            heartbeat: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
        }
    }
}

struct Live {
    instance: String,
    last_seen: Instant,
}

pub struct Registry {
    store: Arc<dyn Store>,
    prober: Arc<dyn Prober>,
    pub config: RegistryConfig,
    live: Mutex<HashMap<String, Live>>,
    /// Per node, how many registrations and heartbeats have brought its pools' figures into its record (see
    /// [`Registry::beats`]).
    beats: Mutex<HashMap<String, u64>>,
    /// The node records as the store has them, with the revision of each one's last write.
    records: Mutex<BTreeMap<String, (Revision, NodeRecord)>>,
    /// Node records in the store that do not decode (written by hand, or by a newer agent), with their revision:
    /// left out of the registry, not in its way (the node's next registration replaces the record).
    unreadable: Mutex<BTreeMap<String, Revision>>,
    /// Notified when a node changes state (registers, goes Offline): what the agent heals at once.
    state_changed: tokio::sync::Notify,
}

/// A node as listed: its record and how long ago the agent last heard from it.
pub struct NodeView {
    pub record: NodeRecord,
    pub last_seen_ago: Option<Duration>,
}

impl Registry {
    /// The registry of the nodes in `store`; every one gets a full timeout from now to be heard from.
    pub async fn load(
        store: Arc<dyn Store>,
        prober: Arc<dyn Prober>,
        config: RegistryConfig,
    ) -> Result<Registry, RegistryError> {
        let now = Instant::now();
        let mut live = HashMap::new();
        let mut records = BTreeMap::new();
        let mut unreadable = BTreeMap::new();
        for (k, v) in store.list(node::PREFIX).await? {
            let r = match decode(&v.value) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(key = %k, error = %e, "node record left out: it does not decode");
                    unreadable.insert(
                        k.strip_prefix(node::PREFIX).unwrap_or(&k).to_string(),
                        v.mod_revision,
                    );
                    continue;
                }
            };
            records.insert(r.spec.name.clone(), (v.mod_revision, r.clone()));
            if r.status.state == NodeState::Online {
                live.insert(
                    r.spec.name.clone(),
                    Live {
                        instance: r.spec.instance.clone(),
                        last_seen: now,
                    },
                );
            }
        }
        Ok(Registry {
            store,
            prober,
            config,
            live: Mutex::new(live),
            beats: Mutex::new(HashMap::new()),
            records: Mutex::new(records),
            unreadable: Mutex::new(unreadable),
            state_changed: tokio::sync::Notify::new(),
        })
    }

    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Revision, NodeRecord)>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves when a node changed state since the last call (registered, or went Offline).
    pub async fn state_changed(&self) {
        self.state_changed.notified().await
    }

    /// Reads a node's record from the store into the copy (after a write found the copy stale).
    async fn refresh(&self, name: &str) -> Result<(), RegistryError> {
        let cur = self.store.get(&node::key(name)).await?;
        let mut records = self.records();
        let mut unreadable = self.unreadable.lock().unwrap_or_else(|e| e.into_inner());
        unreadable.remove(name);
        match cur {
            Some(v) => match decode(&v.value) {
                Ok(r) => {
                    records.insert(name.to_string(), (v.mod_revision, r));
                }
                Err(e) => {
                    tracing::error!(node = name, error = %e, "node record left out: it does not decode");
                    records.remove(name);
                    unreadable.insert(name.to_string(), v.mod_revision);
                }
            },
            None => {
                records.remove(name);
            }
        }
        Ok(())
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes a node's record with `f` (given the current one, if any), retrying on a concurrent change.
    async fn update(
        &self,
        name: &str,
        f: impl Fn(Option<NodeRecord>) -> Option<NodeRecord>,
    ) -> Result<Option<NodeRecord>, RegistryError> {
        let key = node::key(name);
        loop {
            let (rev, old) = match self.records().get(name) {
                Some((rev, r)) => (*rev, Some(r.clone())),
                None => {
                    let unreadable = self.unreadable.lock().unwrap_or_else(|e| e.into_inner());
                    (unreadable.get(name).copied().unwrap_or(0), None)
                }
            };
            let Some(new) = f(old.clone()) else {
                return Ok(old);
            };
            if old.as_ref() == Some(&new) {
                return Ok(Some(new));
            }
            let t = Txn::new()
                .when(Compare::ModRevision {
                    key: key.clone(),
                    revision: rev,
                })
                .put(&key, new.encode());
            let done = self.store.txn(t).await?;
            if !done.succeeded {
                // Written behind the copy (by an earlier leader's late write, or a concurrent update here).
                self.refresh(name).await?;
                continue;
            }
            {
                let mut records = self.records();
                if records.get(name).is_none_or(|(r, _)| *r < done.revision) {
                    records.insert(name.to_string(), (done.revision, new.clone()));
                }
                self.unreadable
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(name);
            }
            if old.as_ref().map(|o| o.status.state) != Some(new.status.state) {
                tracing::info!(node = name, state = ?new.status.state, reason = %new.status.reason, "node state");
                self.state_changed.notify_one();
            }
            return Ok(Some(new));
        }
    }

    pub async fn register(
        &self,
        spec: NodeSpec,
        pools: Vec<PoolSpec>,
    ) -> Result<NodeRecord, RegistryError> {
        if !node::valid_name(&spec.name) {
            return Err(RegistryError::InvalidArgument(format!(
                "node name {:?} is not a DNS subdomain (lower-case letters, digits, '-', '.')",
                spec.name
            )));
        }
        // Its nexuses connect to replicas as this NQN, which NVMe caps at 223 bytes.
        let nqn = proto::names::node_host_nqn(&spec.name);
        if nqn.len() > 223 {
            return Err(RegistryError::InvalidArgument(format!(
                "node name of {} bytes is too long: its host NQN would be {} bytes, more than NVMe's 223",
                spec.name.len(),
                nqn.len()
            )));
        }
        if spec.engine_endpoint.is_empty() || spec.instance.is_empty() {
            return Err(RegistryError::InvalidArgument(
                "engine_endpoint and instance are required".into(),
            ));
        }
        // The address the agent reaches the engine at: one that names no machine would be every engine's.
        let authority = spec
            .engine_endpoint
            .split_once("://")
            .map_or(spec.engine_endpoint.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default();
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .trim_matches(['[', ']']);
        if host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified())
        {
            return Err(RegistryError::InvalidArgument(format!(
                "engine endpoint {} names no address (advertise the node's: io-engine --grpc-advertise)",
                spec.engine_endpoint
            )));
        }
        // Hosts connect to these as they are (the kernel's traddr and trsvcid): an IP address and a port, nothing
        // that could carry other connect options.
        if let Some(bad) = spec
            .nvmf_listeners
            .iter()
            .find(|l| l.parse::<std::net::SocketAddr>().is_err())
        {
            return Err(RegistryError::InvalidArgument(format!(
                "NVMe/TCP listener {bad:?} is not an IP address and port"
            )));
        }
        if spec.cntlid_min == 0 || spec.cntlid_min > spec.cntlid_max || spec.cntlid_max > 0xFFEF {
            return Err(RegistryError::InvalidArgument(format!(
                "controller ID range {}-{} is not within 1-65519",
                spec.cntlid_min, spec.cntlid_max
            )));
        }
        // A name another engine uses now (at another endpoint, heard from within the node timeout) is refused: two
        // machines given one name would otherwise take it from each other at every heartbeat, and the volumes'
        // nexuses with it. The same machine restarting keeps its endpoint and is taken at once.
        let incumbent = self
            .records()
            .get(&spec.name)
            .filter(|(_, o)| {
                o.status.state == NodeState::Online
                    && o.spec.engine_endpoint != spec.engine_endpoint
            })
            .map(|(_, o)| o.spec.engine_endpoint.clone());
        if let Some(at) = incumbent {
            let heard = self
                .live()
                .get(&spec.name)
                .filter(|l| l.instance != spec.instance)
                .map(|l| l.last_seen.elapsed());
            if let Some(ago) = heard.filter(|ago| *ago < self.config.timeout) {
                return Err(RegistryError::InUse(format!(
                    "node name {} is in use by the engine at {at} (heard from {} ms ago); give this one another name",
                    spec.name,
                    ago.as_millis()
                )));
            }
        }
        // Likewise an endpoint another node's engine answers at now (two engines advertising one address): refused
        // rather than each registration taking it from the other. One silent for the node timeout is displaced
        // below (the machine renamed, or another one at its address).
        let sharing: Vec<String> = self
            .records()
            .values()
            .filter(|(_, o)| {
                o.spec.name != spec.name
                    && o.spec.engine_endpoint == spec.engine_endpoint
                    && o.status.state == NodeState::Online
            })
            .map(|(_, o)| o.spec.name.clone())
            .collect();
        for other in sharing {
            let heard = self
                .live()
                .get(&other)
                .map(|l| l.last_seen.elapsed())
                .filter(|ago| *ago < self.config.timeout);
            if let Some(ago) = heard {
                return Err(RegistryError::InUse(format!(
                    "engine endpoint {} is node {other}'s (heard from {} ms ago); advertise this engine's own address",
                    spec.engine_endpoint,
                    ago.as_millis()
                )));
            }
        }
        let name = spec.name.clone();
        let r = self
            .update(&name, |old| {
                // Online since when this engine came: a new instance (a restart faster than the node timeout) starts
                // again, so healing gives its pools their import grace.
                let since = match &old {
                    Some(o)
                        if o.status.state == NodeState::Online
                            && o.spec.instance == spec.instance =>
                    {
                        o.status.since_ms
                    }
                    _ => node::now_ms(),
                };
                Some(NodeRecord {
                    spec: spec.clone(),
                    status: NodeStatus {
                        state: NodeState::Online,
                        reason: "registered".into(),
                        since_ms: since,
                        pools: pools.clone(),
                        clean_exit: old.as_ref().and_then(|o| o.status.clean_exit.clone()),
                        torn_nexuses: old
                            .as_ref()
                            .map(|o| o.status.torn_nexuses.clone())
                            .unwrap_or_default(),
                    },
                    cordoned: old.as_ref().is_some_and(|o| o.cordoned),
                    draining: old.as_ref().is_some_and(|o| o.draining),
                })
            })
            .await?
            .ok_or_else(|| RegistryError::NotFound(name.clone()))?;
        self.live().insert(
            name.clone(),
            Live {
                instance: r.spec.instance.clone(),
                last_seen: Instant::now(),
            },
        );
        self.beat(&r.spec.name);
        self.displace_at(&r.spec.engine_endpoint, &name).await?;
        Ok(r)
    }

    /// Marks Offline every other node whose engine was at `endpoint`, where node `name` just registered: one address
    /// is one engine, so those nodes are gone (renamed, or another machine took the address; one heard from within
    /// the node timeout made the registration fail instead). Left Online, such a
    /// node would answer every probe (through the new engine) and keep its pools' last figures for ever: placement
    /// would count its pools beside the new node's, two replicas of one volume could land on one machine, and
    /// garbage collection would take the new node's nexuses for stale ones of the old node.
    async fn displace_at(&self, endpoint: &str, name: &str) -> Result<(), RegistryError> {
        let displaced: Vec<(String, String)> = self
            .records()
            .values()
            .filter(|(_, o)| {
                o.spec.name != name
                    && o.spec.engine_endpoint == endpoint
                    && o.status.state == NodeState::Online
            })
            .map(|(_, o)| (o.spec.name.clone(), o.spec.instance.clone()))
            .collect();
        for (old, instance) in displaced {
            self.live().remove(&old);
            let reason = format!("its engine's address {endpoint} is node {name}'s now");
            tracing::warn!(node = %old, %reason, "node displaced");
            self.set_offline(&old, &instance, &reason, None).await?;
        }
        Ok(())
    }

    /// How many registrations and heartbeats of `name` have brought its pools' figures into its record so far (in
    /// this agent's life): a replica created when this was `b` is in the figures once it is `b + 2` (the engine
    /// sends one heartbeat after another, so the second one after was put together after the creation; placement
    /// waits for one more, for a heartbeat its engine gave up on before it registered again).
    pub fn beats(&self, name: &str) -> u64 {
        self.beats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    fn beat(&self, name: &str) {
        *self
            .beats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default() += 1;
    }

    /// A heartbeat; `Ok(false)` when this agent does not know the instance (it must register again).
    pub async fn heartbeat(
        &self,
        name: &str,
        instance: &str,
        pools: Vec<PoolSpec>,
    ) -> Result<bool, RegistryError> {
        {
            let mut live = self.live();
            match live.get_mut(name) {
                Some(l) if l.instance == instance => l.last_seen = Instant::now(),
                _ => return Ok(false),
            }
        }
        self.update(name, |old| {
            let mut r = old?;
            if r.spec.instance != instance {
                return None;
            }
            if r.status.state != NodeState::Online {
                r.status.state = NodeState::Online;
                r.status.reason = "heartbeats resumed".into();
                r.status.since_ms = node::now_ms();
            }
            r.status.pools = pools.clone();
            Some(r)
        })
        .await?;
        self.beat(name);
        Ok(true)
    }

    /// A clean shutdown of the io-engine `instance`: Offline now.
    pub async fn deregister(
        &self,
        name: &str,
        instance: &str,
        torn_nexuses: &[String],
    ) -> Result<(), RegistryError> {
        let removed = {
            let mut live = self.live();
            match live.get(name) {
                Some(l) if l.instance == instance => live.remove(name).is_some(),
                _ => false,
            }
        };
        if removed
            && let Err(e) = self
                .set_offline(
                    name,
                    instance,
                    "deregistered: the io-engine shut down",
                    Some(torn_nexuses),
                )
                .await
        {
            // Not recorded: the node stays known as live (silent from now on), so the sweep still probes it and
            // marks it Offline, rather than it staying Online in the store for ever.
            self.live().insert(
                name.to_string(),
                Live {
                    instance: instance.to_string(),
                    last_seen: Instant::now(),
                },
            );
            return Err(e);
        }
        Ok(())
    }

    /// Marks `instance` of node `name` Offline; `clean`: it ended cleanly (deregistered), but for these nexuses.
    async fn set_offline(
        &self,
        name: &str,
        instance: &str,
        reason: &str,
        clean: Option<&[String]>,
    ) -> Result<(), RegistryError> {
        self.update(name, |old| {
            let mut r = old?;
            if r.spec.instance != instance || r.status.state == NodeState::Offline {
                return None;
            }
            r.status.state = NodeState::Offline;
            r.status.reason = reason.to_string();
            r.status.since_ms = node::now_ms();
            if let Some(torn) = clean {
                r.status.clean_exit = Some(instance.to_string());
                r.status.torn_nexuses = torn.to_vec();
            }
            Some(r)
        })
        .await?;
        Ok(())
    }

    /// Forgets Offline node `name`, gone for good, deleting `keys` and every key under `prefixes` (what was the
    /// node's) in the same transaction; the record it had. A node that registers at the same time wins: it is
    /// Online then, and stays.
    pub async fn forget(
        &self,
        name: &str,
        keys: &[String],
        prefixes: &[String],
    ) -> Result<NodeRecord, RegistryError> {
        let key = node::key(name);
        loop {
            let Some((rev, record)) = self.records().get(name).cloned() else {
                return Err(RegistryError::NotFound(name.to_string()));
            };
            if record.status.state != NodeState::Offline {
                return Err(RegistryError::NotOffline(name.to_string()));
            }
            let mut t = Txn::new()
                .when(Compare::ModRevision {
                    key: key.clone(),
                    revision: rev,
                })
                .delete(&key);
            for k in keys {
                t = t.delete(k);
            }
            for p in prefixes {
                t = t.delete_prefix(p);
            }
            if !self.store.txn(t).await?.succeeded {
                self.refresh(name).await?;
                continue;
            }
            self.records().remove(name);
            self.live().remove(name);
            tracing::info!(node = name, "node forgotten");
            return Ok(record);
        }
    }

    /// Cordons (`true`) or uncordons a node.
    pub async fn set_cordoned(
        &self,
        name: &str,
        cordoned: bool,
    ) -> Result<NodeView, RegistryError> {
        let r = self
            .update(name, |old| {
                let mut r = old?;
                r.cordoned = cordoned;
                r.draining &= cordoned;
                Some(r)
            })
            .await?;
        if r.is_none() {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        tracing::info!(node = name, cordoned, "node cordon changed");
        self.get(name).await
    }

    /// Cordons the node and marks it draining: healing moves its nexuses away.
    pub async fn set_draining(&self, name: &str) -> Result<NodeView, RegistryError> {
        let r = self
            .update(name, |old| {
                let mut r = old?;
                r.cordoned = true;
                r.draining = true;
                Some(r)
            })
            .await?;
        if r.is_none() {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        tracing::info!(node = name, "node draining");
        self.get(name).await
    }

    pub async fn list(&self) -> Result<Vec<NodeView>, RegistryError> {
        let records: Vec<NodeRecord> = self.records().values().map(|(_, r)| r.clone()).collect();
        let live = self.live();
        Ok(records
            .into_iter()
            .map(|record| {
                let last_seen_ago = live.get(&record.spec.name).map(|l| l.last_seen.elapsed());
                NodeView {
                    record,
                    last_seen_ago,
                }
            })
            .collect())
    }

    pub async fn get(&self, name: &str) -> Result<NodeView, RegistryError> {
        let record = self
            .records()
            .get(name)
            .map(|(_, r)| r.clone())
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
        let last_seen_ago = self.live().get(name).map(|l| l.last_seen.elapsed());
        Ok(NodeView {
            record,
            last_seen_ago,
        })
    }

    /// Probes the nodes silent for longer than the timeout, at once, and marks those that do not answer Offline.
    pub async fn sweep(&self) -> Result<(), RegistryError> {
        let silent: Vec<(String, String)> = self
            .live()
            .iter()
            .filter(|(_, l)| l.last_seen.elapsed() > self.config.timeout)
            .map(|(n, l)| (n.clone(), l.instance.clone()))
            .collect();
        let probes = silent.into_iter().map(|(name, instance)| async move {
            let endpoint = match self.get(&name).await {
                Ok(v) => v.record.spec.engine_endpoint,
                Err(e) => return Err(e),
            };
            let r = self.prober.probe(&endpoint, &name).await;
            Ok((name, instance, r))
        });
        for r in futures_util::future::join_all(probes).await {
            let (name, instance, probe) = r?;
            match probe {
                Ok(()) => {
                    tracing::debug!(node = %name, "heartbeats missing but the engine API answers")
                }
                Err(why) => {
                    let still_silent = {
                        let mut live = self.live();
                        let silent = live.get(&name).is_some_and(|l| {
                            l.instance == instance && l.last_seen.elapsed() > self.config.timeout
                        });
                        if silent {
                            live.remove(&name);
                        }
                        silent
                    };
                    if still_silent {
                        let reason = format!(
                            "no heartbeat for {:?} and the engine API probe failed: {why}",
                            self.config.timeout
                        );
                        if let Err(e) = self.set_offline(&name, &instance, &reason, None).await {
                            // Not recorded: still silent to the next sweep (unless it spoke meanwhile), which
                            // probes it again, rather than it staying Online in the store for ever.
                            let long_ago = Instant::now()
                                .checked_sub(self.config.timeout * 2)
                                .unwrap_or_else(Instant::now);
                            self.live().entry(name.clone()).or_insert(Live {
                                instance: instance.clone(),
                                last_seen: long_ago,
                            });
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn decode(bytes: &[u8]) -> Result<NodeRecord, RegistryError> {
    NodeRecord::decode(bytes).map_err(|source| RegistryError::Corrupt {
        record: String::from_utf8_lossy(bytes).chars().take(64).collect(),
        source,
    })
}

/// The node sweep as a reconciler (see [`super::reconcile`]).
pub struct NodeSweep(pub Arc<Registry>);

#[async_trait::async_trait]
impl super::reconcile::Reconciler for NodeSweep {
    fn every_heartbeat(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "node_sweep"
    }

    async fn pass(&self) -> Result<(), String> {
        self.0.sweep().await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::store::embedded::EmbeddedStore;
    use crate::cluster::store::{LeaseId, Txn, TxnResult, Versioned, Watch};

    struct Answers;

    #[async_trait::async_trait]
    impl Prober for Answers {
        async fn probe(&self, _: &str, _: &str) -> Result<(), String> {
            Ok(())
        }
    }

    /// A node `name` whose engine is at `http://<name>:1`.
    fn spec(name: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            engine_endpoint: format!("http://{name}:1"),
            nvmf_listeners: vec!["127.0.0.1:4420".into()],
            cntlid_min: 1,
            cntlid_max: 100,
            instance: "i1".into(),
            labels: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_node_record_that_does_not_decode_is_left_out_and_replaced_by_its_next_registration()
    {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s")).await.unwrap());
        store.put(&node::key("bad"), b"{".to_vec()).await.unwrap();
        let reg = Registry::load(store.clone(), Arc::new(Answers), RegistryConfig::default())
            .await
            .expect("the other nodes' registry loads");
        reg.register(spec("good"), vec![]).await.unwrap();
        assert_eq!(reg.list().await.unwrap().len(), 1);
        // The node whose record was unreadable registers: its record is written anew.
        reg.register(spec("bad"), vec![]).await.unwrap();
        let v = store.get(&node::key("bad")).await.unwrap().unwrap();
        assert_eq!(decode(&v.value).unwrap().spec.name, "bad");
        // Written behind the registry's back again: the next change finds it unreadable and still goes through.
        store
            .put(&node::key("bad"), b"not json".to_vec())
            .await
            .unwrap();
        let mut again = spec("bad");
        again.instance = "i2".into();
        reg.register(again, vec![]).await.unwrap();
        let v = store.get(&node::key("bad")).await.unwrap().unwrap();
        assert_eq!(decode(&v.value).unwrap().spec.instance, "i2");
    }

    #[tokio::test]
    async fn a_node_whose_engine_address_another_node_registers_at_goes_offline() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s")).await.unwrap());
        let config = RegistryConfig {
            timeout: Duration::from_secs(1),
            ..RegistryConfig::default()
        };
        let reg = Registry::load(store, Arc::new(Answers), config)
            .await
            .unwrap();
        let at = |name: &str| NodeSpec {
            engine_endpoint: "http://127.0.0.1:1".into(),
            ..spec(name)
        };
        reg.register(spec("elsewhere"), vec![]).await.unwrap();
        reg.register(at("old-name"), vec![]).await.unwrap();
        // Another engine at the same address while the first is heard from: refused, rather than each taking it
        // from the other at every registration.
        let mut renamed = at("new-name");
        renamed.instance = "i2".into();
        let e = reg.register(renamed.clone(), vec![]).await.unwrap_err();
        assert!(matches!(e, RegistryError::InUse(_)), "{e}");
        // The machine comes back under another name at the same address (or another machine took it), the old
        // name silent by then.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        reg.register(renamed, vec![]).await.unwrap();
        let state = |name: &str| {
            let r = &reg.records()[name].1;
            (r.status.state, r.status.reason.clone())
        };
        let (s, why) = state("old-name");
        assert_eq!(
            s,
            NodeState::Offline,
            "the old name answers through the new engine"
        );
        assert!(why.contains("new-name"), "{why}");
        assert_eq!(state("new-name").0, NodeState::Online);
        assert_eq!(state("elsewhere").0, NodeState::Online);
        // The old name registering again at the address takes it back, once the new one is silent.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        reg.register(at("old-name"), vec![]).await.unwrap();
        assert_eq!(state("old-name").0, NodeState::Online);
        assert_eq!(state("new-name").0, NodeState::Offline);
        // An endpoint that names no address is refused.
        for bad in ["http://0.0.0.0:10124", "http://[::]:10124"] {
            let mut s = spec("nowhere");
            s.engine_endpoint = bad.into();
            let e = reg.register(s, vec![]).await.unwrap_err();
            assert!(matches!(e, RegistryError::InvalidArgument(_)), "{bad}: {e}");
        }
    }

    struct Fails;

    #[async_trait::async_trait]
    impl Prober for Fails {
        async fn probe(&self, _: &str, _: &str) -> Result<(), String> {
            Err("connection refused".into())
        }
    }

    /// A store whose writes fail while `down` is set (etcd briefly without a leader).
    struct Flaky {
        inner: Arc<dyn Store>,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Store for Flaky {
        async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
            self.inner.list(prefix).await
        }
        async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Unavailable("no leader".into()));
            }
            self.inner.txn(txn).await
        }
        async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
            self.inner.watch(prefix).await
        }
        async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
            self.inner.grant_lease(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.revoke_lease(lease).await
        }
    }

    /// A node found dead by a sweep whose Offline write failed (the store briefly unavailable) is probed and marked
    /// Offline by a later sweep. Before, the sweep had already forgotten it as live: no sweep looked at it again and
    /// it stayed Online for as long as this agent led, its nexuses never moved, its replicas never replaced.
    #[tokio::test]
    async fn a_dead_node_whose_offline_write_failed_is_marked_offline_by_a_later_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Flaky {
            inner: Arc::new(EmbeddedStore::open(&dir.path().join("s")).await.unwrap()),
            down: Default::default(),
        });
        let config = RegistryConfig {
            heartbeat: Duration::from_millis(50),
            timeout: Duration::from_millis(100),
        };
        let reg = Registry::load(store.clone(), Arc::new(Fails), config)
            .await
            .unwrap();
        reg.register(spec("n"), vec![]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        store.down.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(reg.sweep().await.is_err());
        store.down.store(false, std::sync::atomic::Ordering::SeqCst);
        reg.sweep().await.unwrap();
        assert_eq!(
            reg.get("n").await.unwrap().record.status.state,
            NodeState::Offline
        );
    }

    /// A registry on an embedded store under `dir`, with node `n` (instance `i1`) registered.
    async fn registry_with_n(dir: &std::path::Path) -> (Arc<dyn Store>, Registry) {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("s")).await.unwrap());
        let reg = Registry::load(store.clone(), Arc::new(Answers), RegistryConfig::default())
            .await
            .unwrap();
        reg.register(spec("n"), vec![]).await.unwrap();
        (store, reg)
    }

    /// An engine that shut down with one nexus torn says which: that nexus ended uncleanly, every other one of the
    /// instance cleanly, and the next instance's registration keeps that judgment for the nexuses of the last.
    #[tokio::test]
    async fn a_clean_shutdown_names_the_nexuses_that_did_not_drain() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, reg) = registry_with_n(dir.path()).await;
        let (torn, drained) = (
            "0a000000-0000-4000-8000-000000000001",
            "0a000000-0000-4000-8000-000000000002",
        );
        reg.deregister("n", "i1", &[torn.to_string()])
            .await
            .unwrap();
        let mut next = spec("n");
        next.instance = "i2".into();
        reg.register(next, vec![]).await.unwrap();
        let r = reg.get("n").await.unwrap().record;
        assert_eq!(r.status.clean_exit.as_deref(), Some("i1"));
        assert!(!r.nexus_ended_cleanly("i1", torn));
        assert!(r.nexus_ended_cleanly("i1", drained));
        assert!(!r.nexus_ended_cleanly("i2", drained), "i2 still runs");
        // A deregistration of another instance than the one that runs changes nothing.
        reg.deregister("n", "i1", &[]).await.unwrap();
        assert!(
            !reg.get("n")
                .await
                .unwrap()
                .record
                .nexus_ended_cleanly("i1", torn)
        );
        // i2 ends without a torn nexus: none of its nexuses is judged unclean, and i1's list goes with it.
        reg.deregister("n", "i2", &[]).await.unwrap();
        let r = reg.get("n").await.unwrap().record;
        assert!(r.status.torn_nexuses.is_empty());
        let mut third = spec("n");
        third.instance = "i3".into();
        reg.register(third, vec![]).await.unwrap();
        let r = reg.get("n").await.unwrap().record;
        assert!(r.nexus_ended_cleanly("i2", torn));
        assert!(
            !r.nexus_ended_cleanly("i1", drained),
            "i1 is no longer the last clean end"
        );
    }

    #[tokio::test]
    async fn an_offline_node_is_forgotten_with_what_was_its_and_an_online_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (store, reg) = registry_with_n(dir.path()).await;
        for k in [
            "/keelson/pools/n/p1",
            "/keelson/pools/n2/p1",
            "/x/garbage-of-n",
        ] {
            store.put(k, b"{}".to_vec()).await.unwrap();
        }
        let (keys, prefixes) = (
            ["/x/garbage-of-n".to_string()],
            ["/keelson/pools/n/".to_string()],
        );
        assert!(matches!(
            reg.forget("n", &keys, &prefixes).await,
            Err(RegistryError::NotOffline(_))
        ));
        assert!(store.get("/keelson/pools/n/p1").await.unwrap().is_some());
        reg.deregister("n", "i1", &[]).await.unwrap();
        let gone = reg.forget("n", &keys, &prefixes).await.unwrap();
        assert_eq!(gone.spec.name, "n");
        assert!(reg.list().await.unwrap().is_empty());
        for k in [
            node::key("n").as_str(),
            "/keelson/pools/n/p1",
            "/x/garbage-of-n",
        ] {
            assert!(store.get(k).await.unwrap().is_none(), "{k} is gone");
        }
        assert!(
            store.get("/keelson/pools/n2/p1").await.unwrap().is_some(),
            "another node's pool stays"
        );
        assert!(matches!(
            reg.forget("n", &keys, &prefixes).await,
            Err(RegistryError::NotFound(_))
        ));
        // A new leader loads the store without it; the engine coming back registers as a new node.
        let reg = Registry::load(store, Arc::new(Answers), RegistryConfig::default())
            .await
            .unwrap();
        assert!(reg.list().await.unwrap().is_empty());
        let mut back = spec("n");
        back.instance = "i2".into();
        reg.register(back, vec![]).await.unwrap();
        assert_eq!(reg.list().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_new_engine_instance_is_online_since_it_registered() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s")).await.unwrap());
        let reg = Registry::load(store, Arc::new(Answers), RegistryConfig::default())
            .await
            .unwrap();
        let first = reg
            .register(spec("n"), vec![])
            .await
            .unwrap()
            .status
            .since_ms;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let same = reg
            .register(spec("n"), vec![])
            .await
            .unwrap()
            .status
            .since_ms;
        assert_eq!(same, first, "the same engine registering again");
        let mut restarted = spec("n");
        restarted.instance = "i2".into();
        let again = reg
            .register(restarted, vec![])
            .await
            .unwrap()
            .status
            .since_ms;
        assert!(again > first, "a restarted engine: {again} vs {first}");
    }

    #[tokio::test]
    async fn a_node_name_in_use_by_another_live_engine_is_refused_until_that_one_goes_silent() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s")).await.unwrap());
        let config = RegistryConfig {
            heartbeat: Duration::from_millis(20),
            // Long enough that a loaded machine does not pass it between the registrations below.
            timeout: Duration::from_secs(2),
        };
        let reg = Registry::load(store, Arc::new(Answers), config)
            .await
            .unwrap();
        reg.register(spec("n"), vec![]).await.unwrap();
        let mut other = spec("n");
        other.engine_endpoint = "http://127.0.0.9:1".into();
        other.instance = "elsewhere".into();
        assert!(matches!(
            reg.register(other.clone(), vec![]).await,
            Err(RegistryError::InUse(_))
        ));
        assert!(
            reg.heartbeat("n", "i1", vec![]).await.unwrap(),
            "the first one keeps it"
        );
        // The same machine restarting (same endpoint, new instance) is taken at once.
        let mut restarted = spec("n");
        restarted.instance = "i2".into();
        reg.register(restarted, vec![]).await.unwrap();
        // Once the one using it is silent past the timeout, the name moves.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let r = reg.register(other, vec![]).await.unwrap();
        assert_eq!(r.spec.engine_endpoint, "http://127.0.0.9:1");
    }
}
