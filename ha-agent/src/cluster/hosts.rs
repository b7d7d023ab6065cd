//! Application nodes as the cluster agent knows them: the node agent on each registers the node's name and the
//! host NQNs its kernel connects to volumes with ([`HostSpec`]), and registers again every [`HEARTBEAT`]. One JSON
//! record per node under `/keelson/hosts/<node>`, written when it is new or changed, not on every heartbeat; when a
//! node agent was last heard from stays in the leader's memory. A path report is taken only from a registered node,
//! for one of its host NQNs ([`Hosts::check_report`]): a report naming a node no node agent runs on, or a host that
//! is not that node's, moves nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::node;
use super::store::{Store, StoreError};

/// Key prefix of host records.
pub const PREFIX: &str = "/keelson/hosts/";

/// How often a node agent registers again.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// The longest NQN the NVMe base specification allows, in bytes.
const NQN_MAX: usize = 223;

pub fn key(node: &str) -> String {
    format!("{PREFIX}{node}")
}

/// What a node agent says of its node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    pub node: String,
    /// Sorted, without repeats.
    pub host_nqns: Vec<String>,
    pub version: String,
}

/// What the agent recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// When the node registered first or changed its spec, milliseconds since the epoch.
    pub registered_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub spec: HostSpec,
    pub status: HostStatus,
}

/// A host as listed: its record and how long since its node agent was last heard from (none: not since this agent
/// leads).
#[derive(Clone, Debug)]
pub struct HostView {
    pub record: HostRecord,
    pub last_seen: Option<Duration>,
}

impl HostView {
    /// Heard from within three heartbeats.
    pub fn alive(&self) -> bool {
        self.last_seen.is_some_and(|d| d < HEARTBEAT * 3)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The node never registered.
    #[error("node {0} has no registered node agent")]
    NotFound(String),
    /// The node's agent was heard from within three heartbeats: it is not gone.
    #[error(
        "the node agent of {node} was heard from {ago_s} s ago: a node is forgotten only once it is gone"
    )]
    Alive { node: String, ago_s: u64 },
    /// Not heard from, but this agent has not led long enough to know: a live node agent may not have sent a
    /// heartbeat to it yet.
    #[error(
        "this agent has led for {led_s} s, less than three heartbeats: whether the node agent of {node} is alive is \
         not known yet; try again in {wait_s} s"
    )]
    NotKnownYet {
        node: String,
        led_s: u64,
        wait_s: u64,
    },
    /// A volume is published to one of the node's hosts.
    #[error("{0}")]
    InUse(String),
    /// The node registered, without that host NQN.
    #[error("{host} is not a host NQN node {node} registered ({registered:?})")]
    NotItsHost {
        node: String,
        host: String,
        registered: Vec<String>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the host record of {node} is corrupt: {source}")]
    Corrupt {
        node: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The registered application nodes.
pub struct Hosts {
    store: Arc<dyn Store>,
    /// When each node agent was last heard from, by node.
    seen: Mutex<BTreeMap<String, Instant>>,
    /// Since when this agent has known (it leads since then): a node not heard from since may still be alive.
    since: Instant,
    /// Held by a registration and a removal throughout: a node agent's heartbeat is never lost to a removal that
    /// checked before it came.
    changing: tokio::sync::Mutex<()>,
}

impl Hosts {
    pub fn new(store: Arc<dyn Store>) -> Hosts {
        Hosts::known_since(store, Instant::now())
    }

    fn known_since(store: Arc<dyn Store>, since: Instant) -> Hosts {
        Hosts {
            store,
            seen: Mutex::new(BTreeMap::new()),
            since,
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// Registers (or confirms) a node; the record as stored.
    pub async fn register(&self, mut spec: HostSpec) -> Result<HostRecord, HostError> {
        if !node::valid_name(&spec.node) {
            return Err(HostError::InvalidArgument(format!(
                "node name {:?} is not a DNS subdomain (lower-case letters, digits, '-', '.')",
                spec.node
            )));
        }
        spec.host_nqns.sort();
        spec.host_nqns.dedup();
        if spec.host_nqns.is_empty() {
            return Err(HostError::InvalidArgument(
                "a host registers at least one host NQN".into(),
            ));
        }
        if let Some(bad) = spec.host_nqns.iter().find(|n| !valid_nqn(n)) {
            return Err(HostError::InvalidArgument(format!(
                "{bad:?} is not an NQN (\"nqn.\" and at most {NQN_MAX} bytes of printable ASCII)"
            )));
        }
        let _changing = self.changing.lock().await;
        let old = self.get(&spec.node).await?;
        let record = match old {
            Some(o) if o.spec == spec => o,
            _ => {
                let r = HostRecord {
                    spec: spec.clone(),
                    status: HostStatus {
                        registered_ms: node::now_ms(),
                    },
                };
                let bytes = serde_json::to_vec(&r).unwrap_or_default();
                self.store.put(&key(&spec.node), bytes).await?;
                tracing::info!(node = %spec.node, host_nqns = ?spec.host_nqns, version = %spec.version, "host registered");
                r
            }
        };
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(spec.node, Instant::now());
        Ok(record)
    }

    pub async fn get(&self, node: &str) -> Result<Option<HostRecord>, HostError> {
        let Some(v) = self.store.get(&key(node)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&v.value)
            .map(Some)
            .map_err(|source| HostError::Corrupt {
                node: node.to_string(),
                source,
            })
    }

    pub async fn list(&self) -> Result<Vec<HostView>, HostError> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out = Vec::new();
        for (k, v) in self.store.list(PREFIX).await? {
            let record: HostRecord =
                serde_json::from_slice(&v.value).map_err(|source| HostError::Corrupt {
                    node: k.trim_start_matches(PREFIX).to_string(),
                    source,
                })?;
            let last_seen = seen.get(&record.spec.node).map(Instant::elapsed);
            out.push(HostView { record, last_seen });
        }
        Ok(out)
    }

    /// Forgets `node` (gone for good), unless its node agent is alive, or may be (this agent has not led for three
    /// heartbeats yet); the record it had. The caller has checked that no volume is published to its hosts.
    pub async fn remove(&self, node: &str) -> Result<HostRecord, HostError> {
        let _changing = self.changing.lock().await;
        let Some(record) = self.get(node).await? else {
            return Err(HostError::NotFound(node.to_string()));
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let view = HostView {
            record,
            last_seen: seen.remove(node).map(|t| t.elapsed()),
        };
        if view.alive() {
            return Err(HostError::Alive {
                node: node.to_string(),
                ago_s: view.last_seen.unwrap_or_default().as_secs(),
            });
        }
        let led = self.since.elapsed();
        if view.last_seen.is_none() && led < HEARTBEAT * 3 {
            return Err(HostError::NotKnownYet {
                node: node.to_string(),
                led_s: led.as_secs(),
                wait_s: (HEARTBEAT * 3 - led).as_secs() + 1,
            });
        }
        self.store.delete(&key(node)).await?;
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(node);
        tracing::info!(node, host_nqns = ?view.record.spec.host_nqns, "host forgotten");
        Ok(view.record)
    }

    /// Puts back a record [`Self::remove`] took (a volume was published to the node meanwhile), unless the node
    /// registered again since.
    pub async fn restore(&self, record: &HostRecord) -> Result<(), HostError> {
        let _changing = self.changing.lock().await;
        if self.get(&record.spec.node).await?.is_none() {
            let bytes = serde_json::to_vec(record).unwrap_or_default();
            self.store.put(&key(&record.spec.node), bytes).await?;
        }
        Ok(())
    }

    /// Whether `node` may report for `host_nqn`: its node agent registered, with that host NQN. A report is also a
    /// sign of life.
    pub async fn check_report(&self, node: &str, host_nqn: &str) -> Result<(), HostError> {
        let Some(r) = self.get(node).await? else {
            return Err(HostError::NotFound(node.to_string()));
        };
        if !r.spec.host_nqns.iter().any(|h| h == host_nqn) {
            return Err(HostError::NotItsHost {
                node: node.to_string(),
                host: host_nqn.to_string(),
                registered: r.spec.host_nqns,
            });
        }
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string(), Instant::now());
        Ok(())
    }
}

fn valid_nqn(n: &str) -> bool {
    n.starts_with("nqn.")
        && n.len() > 4
        && n.len() <= NQN_MAX
        && n.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::store::embedded::EmbeddedStore;

    fn spec(node: &str, nqns: &[&str]) -> HostSpec {
        HostSpec {
            node: node.into(),
            host_nqns: nqns.iter().map(|s| s.to_string()).collect(),
            version: "test".into(),
        }
    }

    /// An embedded store in a directory of its own, kept while the directory lives.
    async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.redb"))
            .await
            .unwrap();
        (dir, Arc::new(store))
    }

    #[tokio::test]
    async fn a_registered_node_reports_for_its_own_hosts_only() {
        let (_dir, store) = store().await;
        let hosts = Hosts::new(store.clone());
        let h = "nqn.2026-11.io.keelson:host-app-1";
        assert!(matches!(
            hosts.check_report("app-1", h).await,
            Err(HostError::NotFound(_))
        ));
        let first = hosts.register(spec("app-1", &[h, h])).await.unwrap();
        assert_eq!(first.spec.host_nqns, vec![h.to_string()], "deduplicated");
        hosts.check_report("app-1", h).await.unwrap();
        assert!(matches!(
            hosts
                .check_report("app-1", "nqn.2026-11.io.keelson:host-app-2")
                .await,
            Err(HostError::NotItsHost { .. })
        ));
        // A heartbeat with the same spec writes nothing new; the registration time stays.
        let again = hosts.register(spec("app-1", &[h])).await.unwrap();
        assert_eq!(again, first);
        // Another agent (a new leader) reads it back; it has not heard from the node yet.
        let other = Hosts::new(store);
        let l = other.list().await.unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].record, first);
        assert!(!l[0].alive());
        other.check_report("app-1", h).await.unwrap();
        assert!(other.list().await.unwrap()[0].alive());
    }

    #[tokio::test]
    async fn a_node_gone_for_good_is_forgotten_and_one_alive_is_not() {
        let (_dir, store) = store().await;
        let hosts = Hosts::new(store.clone());
        let h = "nqn.2026-11.io.keelson:host-app-1";
        hosts.register(spec("app-1", &[h])).await.unwrap();
        hosts
            .register(spec("app-2", &["nqn.2026-11.io.keelson:host-app-2"]))
            .await
            .unwrap();
        assert!(matches!(
            hosts.remove("app-1").await,
            Err(HostError::Alive { .. })
        ));
        assert!(matches!(
            hosts.remove("app-3").await,
            Err(HostError::NotFound(_))
        ));
        // A new leader does not know yet whether app-1 is alive.
        let leader = Hosts::new(store.clone());
        assert!(matches!(
            leader.remove("app-1").await,
            Err(HostError::NotKnownYet { .. })
        ));
        // Three heartbeats into its leadership it has not heard from app-1: gone for good, it goes.
        let since = Instant::now().checked_sub(HEARTBEAT * 3).unwrap();
        let leader = Hosts::known_since(store, since);
        let gone = leader.remove("app-1").await.unwrap();
        assert_eq!(gone.spec.host_nqns, vec![h.to_string()]);
        let left: Vec<String> = leader
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.record.spec.node)
            .collect();
        assert_eq!(left, vec!["app-2".to_string()]);
        assert!(matches!(
            leader.check_report("app-1", h).await,
            Err(HostError::NotFound(_))
        ));
        // Put back (a volume was published to it meanwhile), and forgotten again.
        leader.restore(&gone).await.unwrap();
        assert_eq!(leader.get("app-1").await.unwrap(), Some(gone.clone()));
        leader.remove("app-1").await.unwrap();
        // Its node agent comes back: it registers again, and a late putting back changes nothing.
        let back = leader.register(spec("app-1", &[h])).await.unwrap();
        leader.check_report("app-1", h).await.unwrap();
        let mut stale = gone.clone();
        stale.status.registered_ms = 1;
        leader.restore(&stale).await.unwrap();
        assert_eq!(leader.get("app-1").await.unwrap(), Some(back));
    }

    #[tokio::test]
    async fn bad_registrations_are_invalid_arguments() {
        let (_dir, store) = store().await;
        let hosts = Hosts::new(store);
        for bad in [
            spec("", &["nqn.2026-11.io.keelson:host-a"]),
            spec("App_1", &["nqn.2026-11.io.keelson:host-a"]),
            spec("app-1", &[]),
            spec("app-1", &["host-a"]),
            spec("app-1", &["nqn.with space"]),
            spec("app-1", &[&format!("nqn.{}", "x".repeat(NQN_MAX))]),
        ] {
            assert!(
                matches!(
                    hosts.register(bad.clone()).await,
                    Err(HostError::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
        assert!(hosts.list().await.unwrap().is_empty());
    }
}
