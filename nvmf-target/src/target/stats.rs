//! Per-namespace I/O statistics: operations, bytes, errors and latency for reads, writes and other commands
//! (flush, write zeroes, deallocate), counted on the I/O path with Prometheus primitives and read by the metrics
//! endpoint. Recording is a few atomic adds per command.

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter};

/// Latency buckets, in seconds: 25 µs to 5 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0,
];

pub struct OpStats {
    pub ops: IntCounter,
    pub bytes: IntCounter,
    pub errors: IntCounter,
    pub latency: Histogram,
}

impl Default for OpStats {
    fn default() -> OpStats {
        // Constant, valid names and buckets: these constructors cannot fail.
        let counter = |name: &str| IntCounter::new(name, name).expect("a valid counter name");
        let opts = HistogramOpts::new("latency", "latency").buckets(LATENCY_BUCKETS.to_vec());
        OpStats {
            ops: counter("ops"),
            bytes: counter("bytes"),
            errors: counter("errors"),
            latency: Histogram::with_opts(opts).expect("valid histogram buckets"),
        }
    }
}

impl OpStats {
    pub fn record(&self, bytes: u64, elapsed: Duration, ok: bool) {
        self.ops.inc();
        if ok {
            self.bytes.inc_by(bytes);
        } else {
            self.errors.inc();
        }
        self.latency.observe(elapsed.as_secs_f64());
    }
}

#[derive(Default)]
pub struct IoStats {
    pub read: OpStats,
    pub write: OpStats,
    pub other: OpStats,
}

impl IoStats {
    /// Each kind with its label value.
    pub fn kinds(&self) -> [(&'static str, &OpStats); 3] {
        [
            ("read", &self.read),
            ("write", &self.write),
            ("other", &self.other),
        ]
    }
}
