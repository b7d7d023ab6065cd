//! io-engine's Prometheus metrics, gathered from the engine at scrape time: per-namespace I/O (replicas and
//! published volumes alike), pools, replicas, nexus and child states, rebuild progress and past rebuilds, and the
//! sampled stage timings of the data path.
//!
//! - `http`: the `/metrics` endpoint.
//!
//! Values are read when scraped, so nothing here runs between scrapes. Text is Prometheus exposition format 0.0.4
//! (the `prometheus` crate's encoder), which `promtool check metrics` accepts.

mod http;

pub use http::serve;

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};

use crate::block::BlockDevice;
use crate::engine::Engine;
use crate::nexus::NexusState;
use crate::nexus::child::ChildState;

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_string());
            l.set_value((*v).to_string());
            l
        })
        .collect()
}

/// Metric families under construction, by name.
struct Families(Vec<MetricFamily>);

impl Families {
    fn push(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        l: &[(&str, &str)],
        fill: impl FnOnce(&mut Metric),
    ) {
        let mut m = Metric::default();
        m.set_label(labels(l));
        fill(&mut m);
        if let Some(f) = self.0.iter_mut().find(|f| f.name() == name) {
            f.mut_metric().push(m);
            return;
        }
        let mut f = MetricFamily::default();
        f.set_name(name.to_string());
        f.set_help(help.to_string());
        f.set_field_type(kind);
        f.set_metric(vec![m]);
        self.0.push(f);
    }

    fn gauge(&mut self, name: &str, help: &str, l: &[(&str, &str)], v: f64) {
        self.push(name, help, MetricType::GAUGE, l, |m| {
            let mut g = Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        });
    }

    fn counter(&mut self, name: &str, help: &str, l: &[(&str, &str)], v: f64) {
        self.push(name, help, MetricType::COUNTER, l, |m| {
            let mut c = Counter::default();
            c.set_value(v);
            m.set_counter(c);
        });
    }

    /// A histogram counted elsewhere: (count, sum) and the cumulative count within each of `bounds`.
    fn histogram_counted(
        &mut self,
        name: &str,
        help: &str,
        l: &[(&str, &str)],
        (count, sum): (u64, f64),
        bounds: &[f64],
        within: &[u64],
    ) {
        self.push(name, help, MetricType::HISTOGRAM, l, |m| {
            let mut h = Histogram::default();
            h.set_sample_count(count);
            h.set_sample_sum(sum);
            let buckets = bounds
                .iter()
                .zip(within)
                .map(|(b, n)| {
                    let mut k = Bucket::default();
                    k.set_upper_bound(*b);
                    k.set_cumulative_count(*n);
                    k
                })
                .collect();
            h.set_bucket(buckets);
            m.set_histogram(h);
        });
    }

    /// A histogram kept by a `prometheus::Histogram`, with labels added.
    fn histogram(&mut self, name: &str, help: &str, l: &[(&str, &str)], h: &prometheus::Histogram) {
        use prometheus::core::Collector;
        let Some(mut src) = h.collect().into_iter().next() else {
            return;
        };
        let Some(metric) = src.mut_metric().pop() else {
            return;
        };
        self.push(name, help, MetricType::HISTOGRAM, l, |m| {
            m.set_histogram(metric.get_histogram().clone())
        });
    }
}

fn io(f: &mut Families, engine: &Engine) {
    for sub in engine.target().subsystems() {
        for ns in sub.namespaces() {
            let nsid = ns.nsid.to_string();
            for (op, s) in ns.stats.kinds() {
                let l = [
                    ("nqn", sub.nqn.as_str()),
                    ("nsid", nsid.as_str()),
                    ("op", op),
                ];
                f.counter(
                    "keelson_io_operations_total",
                    "I/O commands completed per namespace.",
                    &l,
                    s.ops.get() as f64,
                );
                f.counter(
                    "keelson_io_bytes_total",
                    "Bytes read or written per namespace.",
                    &l,
                    s.bytes.get() as f64,
                );
                f.counter(
                    "keelson_io_errors_total",
                    "I/O commands that failed per namespace.",
                    &l,
                    s.errors.get() as f64,
                );
                f.histogram(
                    "keelson_io_latency_seconds",
                    "I/O command latency per namespace, in seconds.",
                    &l,
                    &s.latency,
                );
            }
        }
    }
}

fn pools(f: &mut Families, engine: &Engine) {
    for (e, s) in engine.pools_with_stats() {
        let l = [("pool", e.pool.name())];
        f.gauge(
            "keelson_pool_capacity_bytes",
            "Bytes a pool offers for data.",
            &l,
            s.capacity as f64,
        );
        f.gauge(
            "keelson_pool_allocated_bytes",
            "Bytes of a pool's clusters in use.",
            &l,
            s.allocated as f64,
        );
        f.gauge(
            "keelson_pool_committed_bytes",
            "Sum of the sizes of a pool's replicas.",
            &l,
            s.committed as f64,
        );
        f.counter(
            "keelson_pool_no_space_errors_total",
            "Writes failed because the pool had no free cluster, or the file system under its disk no room for one.",
            &l,
            s.no_space_errors as f64,
        );
        f.gauge(
            "keelson_pool_disk_full",
            "1 while a pool's disk has no room for new clusters (the file system under its file is full).",
            &l,
            f64::from(u8::from(s.disk_full)),
        );
        if let Some(room) = s.disk_room {
            f.gauge(
                "keelson_pool_disk_room_bytes",
                "Bytes a pool on a file can still fill beyond its allocated ones: its file system's free space and the \
                 file's own unused space, less what other pool files on that file system may still take.",
                &l,
                room as f64,
            );
        }
        f.gauge(
            "keelson_pool_replica_room_bytes",
            "Bytes of new replicas a pool can still take: its free clusters and its file system's room, less what \
             its replicas may still take (copies of clusters snapshots share included).",
            &l,
            s.replica_room as f64,
        );
        f.gauge(
            "keelson_pool_faulted",
            "1 when a pool's metadata write failed: it takes no writes until it is imported again.",
            &l,
            f64::from(u8::from(e.pool.fault().is_some())),
        );
    }
    for p in engine.pending_pools() {
        f.gauge(
            "keelson_pool_pending",
            "1 for a pool of the node's configuration that could not be opened (its disk missing, failing, full or \
             another node's): the engine serves without it and keeps trying (unless a conflict ended the tries).",
            &[("pool", p.name.as_str()), ("disk", p.disk.as_str())],
            1.0,
        );
    }
    for r in engine.replicas() {
        let id = r.meta.uuid.to_string();
        let l = [("replica", id.as_str()), ("pool", r.pool.as_str())];
        f.gauge(
            "keelson_replica_size_bytes",
            "Size of a replica.",
            &l,
            r.meta.size as f64,
        );
        f.gauge(
            "keelson_replica_allocated_bytes",
            "Bytes of clusters behind a replica.",
            &l,
            r.allocated as f64,
        );
    }
}

fn nexuses(f: &mut Families, engine: &Engine) {
    for (uuid, n, _) in engine.nexuses() {
        let id = uuid.to_string();
        let now = n.state();
        for (s, name) in [
            (NexusState::Online, "online"),
            (NexusState::Degraded, "degraded"),
            (NexusState::Faulted, "faulted"),
            (NexusState::Shutdown, "shutdown"),
        ] {
            let l = [("nexus", id.as_str()), ("state", name)];
            f.gauge(
                "keelson_nexus_state",
                "1 for the state a nexus is in.",
                &l,
                f64::from(u8::from(now == s)),
            );
        }
        f.gauge(
            "keelson_nexus_size_bytes",
            "Size of a nexus.",
            &[("nexus", id.as_str())],
            n.size_bytes() as f64,
        );
        let consent = n.fault_consent();
        f.gauge(
            "keelson_nexus_fault_consent_waiting",
            "1 while a nexus waits for the cluster agent to confirm a child's fault (the I/O that found it is held).",
            &[("nexus", id.as_str())],
            f64::from(u8::from(consent.waiting)),
        );
        for (result, count) in [
            ("confirmed", consent.confirmed),
            ("refused", consent.refused),
        ] {
            f.counter(
                "keelson_nexus_fault_consents_total",
                "Answers of the cluster agent to a nexus asking to go on without a child, by result.",
                &[("nexus", id.as_str()), ("result", result)],
                count as f64,
            );
        }
        for c in n.children() {
            for (s, name) in [
                (ChildState::Healthy, "healthy"),
                (ChildState::Rebuilding, "rebuilding"),
                (ChildState::Faulted, "faulted"),
            ] {
                let l = [
                    ("nexus", id.as_str()),
                    ("child", c.name.as_str()),
                    ("state", name),
                ];
                f.gauge(
                    "keelson_nexus_child_state",
                    "1 for the state a nexus child is in.",
                    &l,
                    f64::from(u8::from(c.state == s)),
                );
            }
            let l = [("nexus", id.as_str()), ("child", c.name.as_str())];
            let done = c.rebuild_done_bytes.unwrap_or(0) as f64;
            let total = c.rebuild_total_bytes.unwrap_or(0) as f64;
            f.gauge(
                "keelson_nexus_rebuild_done_bytes",
                "Bytes copied so far by a running rebuild (0 if none).",
                &l,
                done,
            );
            f.gauge(
                "keelson_nexus_rebuild_total_bytes",
                "Bytes a running rebuild will copy (0 if none).",
                &l,
                total,
            );
        }
        let totals = n.rebuild_totals();
        for (kind, k) in [
            ("full", crate::nexus::RebuildKind::Full),
            ("partial", crate::nexus::RebuildKind::Partial),
        ] {
            for result in ["ok", "failed"] {
                let l = [("nexus", id.as_str()), ("kind", kind), ("result", result)];
                f.counter(
                    "keelson_nexus_rebuilds_total",
                    "Rebuilds finished, by kind and result.",
                    &l,
                    totals.count_of(k, result == "ok") as f64,
                );
            }
        }
        let l = [("nexus", id.as_str())];
        f.histogram_counted(
            "keelson_nexus_rebuild_duration_seconds",
            "Duration of the rebuilds the nexus finished, in seconds.",
            &l,
            (totals.total(), totals.seconds),
            crate::nexus::DURATION_BOUNDS,
            &totals.within,
        );
        f.counter(
            "keelson_nexus_rebuild_bytes_total",
            "Bytes copied by the rebuilds the nexus finished.",
            &l,
            totals.bytes_copied as f64,
        );
    }
}

/// Sampled stage timings of I/O through the layers (see [`crate::block::timing`]).
fn stages(f: &mut Families) {
    use crate::block::timing::{Stage, histogram};
    for s in Stage::ALL {
        f.histogram(
            "keelson_io_stage_seconds",
            "Time one I/O in 16 spent in each stage of the data path (target, nexus, initiator), in seconds",
            &[("stage", s.as_str())],
            histogram(s),
        );
    }
}

/// The engine's metrics as exposition text.
pub fn render(engine: &Engine) -> String {
    let mut f = Families(Vec::new());
    io(&mut f, engine);
    pools(&mut f, engine);
    nexuses(&mut f, engine);
    stages(&mut f);
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&f.0, &mut out) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8_lossy(&out).into_owned()
}
