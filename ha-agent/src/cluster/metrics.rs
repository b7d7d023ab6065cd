//! The cluster agent's Prometheus metrics and their `/metrics` endpoint (HTTP/1.1, hyper; exposition format 0.0.4
//! from the `prometheus` crate, which `promtool check metrics` accepts).
//!
//! What a leading agent reports: volumes by state and replicas by state (as the last healing pass saw them),
//! rebuilds running, nodes by state, operations by kind and result (cluster API calls and the reconcilers' own
//! actions), reconcile pass durations and store request latency. A standby agent reports `keelson_agent_leader 0`
//! and no volumes, so sums across agents count each volume once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Volume states, as the API and the metrics name them.
pub const VOLUME_STATES: &[&str] = &["Online", "Degraded", "Faulted"];
/// Replica states: a child of a nexus (healthy, rebuilding, faulted), or a replica of an unpublished volume
/// (`unattached`: created, no nexus) or one not created yet (`pending`).
pub const REPLICA_STATES: &[&str] = &["healthy", "rebuilding", "faulted", "unattached", "pending"];
const NODE_STATES: &[&str] = &["Online", "Offline"];

/// Seconds: 100 µs to 1 minute (store requests, reconcile passes).
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

pub struct AgentMetrics {
    registry: Registry,
    leader: IntGauge,
    volumes: IntGaugeVec,
    replicas: IntGaugeVec,
    rebuilds: IntGauge,
    nodes: IntGaugeVec,
    operations: IntCounterVec,
    reconcile: HistogramVec,
    store: HistogramVec,
    switchover: HistogramVec,
}

/// One volume as a healing pass saw it.
#[derive(Clone, Debug, Default)]
pub struct VolumeObservation {
    pub state: &'static str,
    /// Replica state (one of [`REPLICA_STATES`]) → count.
    pub replicas: BTreeMap<&'static str, i64>,
}

impl AgentMetrics {
    pub fn new() -> Arc<AgentMetrics> {
        let registry = Registry::new();
        let leader = IntGauge::new(
            "keelson_agent_leader",
            "1 while this cluster agent leads (acts and reports volumes), 0 while it stands by.",
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        let volumes = IntGaugeVec::new(
            Opts::new(
                "keelson_volumes",
                "Volumes by state (Online, Degraded, Faulted), as the last healing pass saw them.",
            ),
            &["state"],
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        let replicas = IntGaugeVec::new(
            Opts::new(
                "keelson_replicas",
                "Replicas of volumes by state: healthy, rebuilding or faulted children of a nexus; unattached (no \
                 nexus); pending (placed, not created yet).",
            ),
            &["state"],
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        let rebuilds = IntGauge::new(
            "keelson_rebuilds_running",
            "Children being rebuilt, across all nexuses.",
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        let nodes = IntGaugeVec::new(
            Opts::new("keelson_nodes", "Storage nodes by state."),
            &["state"],
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        let operations = IntCounterVec::new(
            Opts::new(
                "keelson_agent_operations_total",
                "Operations by kind (cluster API calls that change state, and the reconcilers' own actions) and \
                 result (ok, or the gRPC code of the failure).",
            ),
            &["operation", "result"],
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        let reconcile = HistogramVec::new(
            HistogramOpts::new(
                "keelson_agent_reconcile_duration_seconds",
                "How long one pass of each reconciler took.",
            )
            .buckets(BUCKETS.to_vec()),
            &["reconciler"],
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        let store = HistogramVec::new(
            HistogramOpts::new(
                "keelson_agent_store_request_duration_seconds",
                "Latency of requests to the store, by request.",
            )
            .buckets(BUCKETS.to_vec()),
            &["request"],
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        let switchover = HistogramVec::new(
            HistogramOpts::new(
                "keelson_agent_switchover_stage_seconds",
                "HA switch-overs, by stage: end_old (the old nexus destroyed or found unreachable), disown (the \
                 failed node's replicas), publish (the new nexus recorded, created over the fenced replicas, \
                 exported; in parts: place, share, create with the fencing, export), total (report recorded to \
                 published).",
            )
            .buckets(BUCKETS.to_vec()),
            &["stage"],
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        for c in [
            Box::new(leader.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(switchover.clone()),
            Box::new(volumes.clone()),
            Box::new(replicas.clone()),
            Box::new(rebuilds.clone()),
            Box::new(nodes.clone()),
            Box::new(operations.clone()),
            Box::new(reconcile.clone()),
            Box::new(store.clone()),
        ] {
            registry
                .register(c)
                .unwrap_or_else(|e| unreachable!("distinct static metrics: {e}"));
        }
        let m = AgentMetrics {
            registry,
            leader,
            volumes,
            replicas,
            rebuilds,
            nodes,
            operations,
            reconcile,
            store,
            switchover,
        };
        m.step_down();
        Arc::new(m)
    }

    /// This agent leads now.
    pub fn lead(&self) {
        self.leader.set(1);
    }

    /// This agent stands by: it reports no volumes, replicas or nodes.
    pub fn step_down(&self) {
        self.leader.set(0);
        self.set_volumes(std::iter::empty());
        for s in NODE_STATES {
            self.nodes.with_label_values(&[s]).set(0);
        }
    }

    /// Sets the volume and replica gauges from one healing pass's observations (every volume, once).
    pub fn set_volumes<'a>(&self, seen: impl Iterator<Item = &'a VolumeObservation>) {
        let mut volumes: BTreeMap<&str, i64> = VOLUME_STATES.iter().map(|s| (*s, 0)).collect();
        let mut replicas: BTreeMap<&str, i64> = REPLICA_STATES.iter().map(|s| (*s, 0)).collect();
        for v in seen {
            *volumes.entry(v.state).or_default() += 1;
            for (s, n) in &v.replicas {
                *replicas.entry(s).or_default() += n;
            }
        }
        for (s, n) in volumes {
            self.volumes.with_label_values(&[s]).set(n);
        }
        self.rebuilds
            .set(replicas.get("rebuilding").copied().unwrap_or(0));
        for (s, n) in replicas {
            self.replicas.with_label_values(&[s]).set(n);
        }
    }

    pub fn set_nodes(&self, online: i64, offline: i64) {
        self.nodes.with_label_values(&["Online"]).set(online);
        self.nodes.with_label_values(&["Offline"]).set(offline);
    }

    /// Counts one operation; `result` is `ok` or the failure's gRPC code.
    pub fn operation(&self, operation: &str, result: &str) {
        self.operations
            .with_label_values(&[operation, result])
            .inc();
    }

    pub fn reconciled(&self, reconciler: &str, took: Duration) {
        self.reconcile
            .with_label_values(&[reconciler])
            .observe(took.as_secs_f64());
    }

    pub fn switchover_stage(&self, stage: &str, took: Duration) {
        self.switchover
            .with_label_values(&[stage])
            .observe(took.as_secs_f64());
    }

    pub fn store_request(&self, request: &str, took: Duration) {
        self.store
            .with_label_values(&[request])
            .observe(took.as_secs_f64());
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// `result` label of an operation's outcome: `ok`, or its gRPC code as tonic names it (`NotFound`, ...).
pub fn result_of<T>(r: &Result<T, tonic::Status>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(s) => format!("{:?}", s.code()),
    }
}

/// Serves `/metrics` on `listener` until `stop` fires.
pub async fn serve(metrics: Arc<AgentMetrics>, listener: TcpListener, stop: CancellationToken) {
    crate::metrics_http::serve(Arc::new(move || metrics.render()), listener, stop).await
}
