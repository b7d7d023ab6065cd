//! The node agent's Prometheus metrics. Path health is what operators scrape, so each series names the volume (its
//! UUID), the controller (`nvme3`) and the target address:
//!
//! - `keelson_node_path_state{volume,controller,address,state}` 1 for the state the kernel reports now (`live`,
//!   `connecting`, `resetting`, `deleting`, ...), or `stalled` for a live path holding I/O none of which completed
//!   for the stall timeout (its target silent: frozen or cut off), or `removed` for a path the agent deleted or the
//!   kernel dropped (kept for 10 minutes, then the path's series go); 0 for the states it left;
//! - `keelson_node_path_usable{volume,controller,address}` 1 when I/O can go through the path (not stalled); a
//!   removed path has none (its `state` series says `removed`);
//! - `keelson_node_volume_usable_paths{volume}`: how many of a volume's paths I/O can go through now, for every
//!   volume whose subsystem the kernel has (staged here): 0 is the alert, "this node's I/O to the volume waits";
//! - `keelson_node_switchovers_total{result}`: `ok` (a new path is live), `unchanged` (the nexus stayed where it
//!   was), `refused` (the cluster agent said no), `unpublished` (it said no, and the volume is no longer published
//!   to this node: its dead paths were removed), `failed`;
//! - `keelson_node_switchover_duration_seconds`: from the failure seen to the new path live;
//! - `keelson_node_reports_total{result}`: reports to the cluster agent by outcome (`ok`, `unreachable`, or the gRPC
//!   code of a refusal or failure);
//! - `keelson_node_registered`: 1 while the cluster agent took the node's last registration (its reports are taken
//!   only then): 0 means this node's volumes have no switch-over.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use super::sysfs::Subsystem;

pub struct NodeMetrics {
    registry: Registry,
    state: IntGaugeVec,
    usable: IntGaugeVec,
    volume_usable: IntGaugeVec,
    switchovers: IntCounterVec,
    duration: Histogram,
    reports: IntCounterVec,
    registered: IntGauge,
    /// The label values of every path series set, by (volume, controller, address).
    paths: Mutex<BTreeMap<(String, String, String), PathSeries>>,
    /// The volumes whose usable-paths series is set.
    volumes: Mutex<BTreeSet<String>>,
}

/// What the series of one path hold.
#[derive(Default)]
struct PathSeries {
    /// Its last state.
    state: String,
    /// Every state its series was set for.
    states: BTreeSet<String>,
    /// When it was found removed.
    removed_at: Option<Instant>,
}

/// How long the series of a removed path stay (showing `removed`) before they are dropped: every staged volume and
/// every switch-over makes new ones, which would otherwise pile up for as long as the agent runs.
pub const REMOVED_KEPT: Duration = Duration::from_secs(600);

fn volume_of(nqn: &str) -> &str {
    nqn.rsplit_once(":vol-").map_or(nqn, |(_, v)| v)
}

impl NodeMetrics {
    pub fn new() -> Arc<NodeMetrics> {
        let registry = Registry::new();
        let state = IntGaugeVec::new(
            Opts::new(
                "keelson_node_path_state",
                "State of each NVMe path (controller) to a Keelson volume: 1 for its state now.",
            ),
            &["volume", "controller", "address", "state"],
        )
        .expect("valid metric");
        let usable = IntGaugeVec::new(
            Opts::new(
                "keelson_node_path_usable",
                "Whether I/O can go through the path now (live, not stalled, with an optimized or non-optimized namespace path).",
            ),
            &["volume", "controller", "address"],
        )
        .expect("valid metric");
        let volume_usable = IntGaugeVec::new(
            Opts::new(
                "keelson_node_volume_usable_paths",
                "Paths of a volume staged on this node that I/O can go through now (0: its I/O waits).",
            ),
            &["volume"],
        )
        .expect("valid metric");
        let switchovers = IntCounterVec::new(
            Opts::new(
                "keelson_node_switchovers_total",
                "Switch-overs of a volume's path after a failure, by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "keelson_node_switchover_duration_seconds",
                "From a path failure seen to the replacement path live.",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
        )
        .expect("valid metric");
        let reports = IntCounterVec::new(
            Opts::new(
                "keelson_node_reports_total",
                "Broken-path reports sent to the cluster agent, by outcome.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let registered = IntGauge::new(
            "keelson_node_registered",
            "Whether the cluster agent took this node's last registration: path reports are taken only from \
             registered nodes, so 0 means no switch-over for this node's volumes.",
        )
        .expect("valid metric");
        for m in [
            Box::new(state.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(registered.clone()),
            Box::new(usable.clone()),
            Box::new(volume_usable.clone()),
            Box::new(switchovers.clone()),
            Box::new(duration.clone()),
            Box::new(reports.clone()),
        ] {
            registry.register(m).expect("metric registered once");
        }
        for r in ["ok", "unchanged", "refused", "unpublished", "failed"] {
            switchovers.with_label_values(&[r]);
        }
        Arc::new(NodeMetrics {
            registry,
            state,
            usable,
            volume_usable,
            switchovers,
            duration,
            reports,
            registered,
            paths: Mutex::new(BTreeMap::new()),
            volumes: Mutex::new(BTreeSet::new()),
        })
    }

    /// Sets the path series from a scan and the paths found stalled in it (subsystem NQN, controller name); paths
    /// no longer there show `removed`, for [`REMOVED_KEPT`].
    pub fn paths(&self, scan: &[Subsystem], stalled: &BTreeSet<(String, String)>) {
        self.paths_at(scan, stalled, Instant::now());
    }

    fn paths_at(&self, scan: &[Subsystem], stalled: &BTreeSet<(String, String)>, at: Instant) {
        let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        let mut now = BTreeMap::new();
        let mut volumes: BTreeMap<String, i64> = BTreeMap::new();
        for s in scan {
            let usable_paths = volumes.entry(volume_of(&s.nqn).to_string()).or_default();
            for c in &s.controllers {
                let key = (volume_of(&s.nqn).to_string(), c.name.clone(), c.target());
                if stalled.contains(&(s.nqn.clone(), c.name.clone())) {
                    now.insert(key, ("stalled".to_string(), false));
                } else {
                    *usable_paths += i64::from(c.usable());
                    now.insert(key, (c.state.clone(), c.usable()));
                }
            }
        }
        {
            let mut had = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
            for gone in had.iter().filter(|v| !volumes.contains_key(*v)) {
                let _ = self.volume_usable.remove_label_values(&[gone]);
            }
            for (v, n) in &volumes {
                self.volume_usable.with_label_values(&[v]).set(*n);
            }
            *had = volumes.into_keys().collect();
        }
        let mut dropped = Vec::new();
        for (key, last) in paths.iter_mut() {
            if now.contains_key(key) {
                continue;
            }
            match last.removed_at {
                None => {
                    // Gone, not unusable: a volume unstaged here must not look like one whose I/O waits.
                    self.set_state(key, &last.state, "removed");
                    let _ = self.usable.remove_label_values(&[&key.0, &key.1, &key.2]);
                    last.state = "removed".into();
                    last.states.insert(last.state.clone());
                    last.removed_at = Some(at);
                }
                Some(t) if at.saturating_duration_since(t) >= REMOVED_KEPT => {
                    for state in &last.states {
                        let _ = self
                            .state
                            .remove_label_values(&[&key.0, &key.1, &key.2, state]);
                    }
                    let _ = self.usable.remove_label_values(&[&key.0, &key.1, &key.2]);
                    dropped.push(key.clone());
                }
                Some(_) => {}
            }
        }
        for key in dropped {
            paths.remove(&key);
        }
        for (key, (state, usable)) in now {
            let last = paths.entry(key.clone()).or_default();
            if last.state != state {
                self.set_state(&key, &last.state, &state);
                last.states.insert(state.clone());
                last.state = state;
            }
            last.removed_at = None;
            self.usable
                .with_label_values(&[&key.0, &key.1, &key.2])
                .set(usable as i64);
        }
    }

    fn set_state(&self, key: &(String, String, String), from: &str, to: &str) {
        if !from.is_empty() {
            self.state
                .with_label_values(&[&key.0, &key.1, &key.2, from])
                .set(0);
        }
        self.state
            .with_label_values(&[&key.0, &key.1, &key.2, to])
            .set(1);
    }

    pub fn switchover(&self, result: &str, took: Option<Duration>) {
        self.switchovers.with_label_values(&[result]).inc();
        if let Some(t) = took {
            self.duration.observe(t.as_secs_f64());
        }
    }

    pub fn registered(&self, yes: bool) {
        self.registered.set(yes as i64);
    }

    pub fn report(&self, result: &str) {
        self.reports.with_label_values(&[result]).inc();
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::sysfs::{Controller, Subsystem};

    fn scan(state: &str) -> Vec<Subsystem> {
        vec![Subsystem {
            name: "nvme-subsys0".into(),
            nqn: "nqn.2026-11.io.keelson:vol-7b0c1f6e-1111-4222-8333-444455556666".into(),
            controllers: vec![Controller {
                name: "nvme0".into(),
                state: state.into(),
                address: "traddr=10.200.0.1,trsvcid=4420,src_addr=10.200.0.2".into(),
                transport: "tcp".into(),
                cntlid: "1".into(),
                host_nqn: String::new(),
                host_id: String::new(),
                ana: vec!["optimized".into()],
                io: Default::default(),
            }],
        }]
    }

    fn series(m: &NodeMetrics, state: &str) -> Option<f64> {
        e2e::metrics::sample(
            &m.render(),
            &format!(
                "keelson_node_path_state{{address=\"10.200.0.1:4420\",controller=\"nvme0\",state=\"{state}\",volume=\"7b0c1f6e-1111-4222-8333-444455556666\"}}"
            ),
        )
    }

    fn usable(m: &NodeMetrics) -> Option<f64> {
        e2e::metrics::sample(
            &m.render(),
            "keelson_node_path_usable{address=\"10.200.0.1:4420\",controller=\"nvme0\",volume=\"7b0c1f6e-1111-4222-8333-444455556666\"}",
        )
    }

    fn volume_usable(m: &NodeMetrics) -> Option<f64> {
        e2e::metrics::sample(
            &m.render(),
            "keelson_node_volume_usable_paths{volume=\"7b0c1f6e-1111-4222-8333-444455556666\"}",
        )
    }

    #[test]
    fn a_path_goes_live_stalled_connecting_removed_and_the_text_passes_promtool() {
        let m = NodeMetrics::new();
        let none = BTreeSet::new();
        m.paths(&scan("live"), &none);
        assert_eq!((series(&m, "live"), usable(&m)), (Some(1.0), Some(1.0)));
        assert_eq!(volume_usable(&m), Some(1.0));
        let nqn = scan("live")[0].nqn.clone();
        m.paths(&scan("live"), &BTreeSet::from([(nqn, "nvme0".to_string())]));
        assert_eq!(
            (series(&m, "live"), series(&m, "stalled"), usable(&m)),
            (Some(0.0), Some(1.0), Some(0.0))
        );
        assert_eq!(volume_usable(&m), Some(0.0), "stalled: no usable path");
        m.paths(&scan("live"), &none);
        assert_eq!(
            (series(&m, "stalled"), series(&m, "live"), usable(&m)),
            (Some(0.0), Some(1.0), Some(1.0))
        );
        m.paths(&scan("connecting"), &none);
        assert_eq!(
            (series(&m, "live"), series(&m, "connecting")),
            (Some(0.0), Some(1.0))
        );
        assert_eq!(volume_usable(&m), Some(0.0), "connecting: no usable path");
        m.paths(&[], &none);
        assert_eq!(
            (series(&m, "connecting"), series(&m, "removed")),
            (Some(0.0), Some(1.0))
        );
        // Removed (unstaged): neither the path nor the volume looks unusable.
        assert_eq!((usable(&m), volume_usable(&m)), (None, None));
        // Kept a while, then gone (every staged volume and switch-over makes new series).
        let later = Instant::now() + REMOVED_KEPT;
        m.paths_at(&[], &none, later - Duration::from_secs(1));
        assert_eq!(series(&m, "removed"), Some(1.0));
        m.paths_at(&[], &none, later + Duration::from_secs(1));
        assert_eq!(
            (series(&m, "removed"), series(&m, "live"), usable(&m)),
            (None, None, None)
        );
        m.paths(&scan("live"), &none);
        assert_eq!((series(&m, "live"), usable(&m)), (Some(1.0), Some(1.0)));
        m.switchover("ok", Some(Duration::from_millis(420)));
        m.report("ok");
        let text = m.render();
        assert!(
            text.contains("keelson_node_switchover_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("keelson_node_switchovers_total{result=\"ok\"} 1"),
            "{text}"
        );
        e2e::metrics::promtool_check(&text);
    }
}
