//! Where an I/O's time goes: each layer (target connection, nexus, initiator queue) times its own stages of one
//! I/O in [`SAMPLE_EVERY`] and records them here; the metrics endpoint exports them as
//! `keelson_io_stage_seconds{stage=...}`. Sampling keeps the cost off the I/O path: a thread-local counter decides,
//! and an unsampled I/O takes no clock reading.
//!
//! The stages, in the order a replicated write meets them:
//! - `target_execute`: a command's capsule (and data) decoded → its response ready;
//! - `nexus_lock`: waiting for the write's byte-range lock;
//! - `nexus_first_child` / `nexus_last_child`: lock held → the first / the last child's write done, as the command
//!   sees it (so including the wake-up that brings the news);
//! - `nexus_finish`: last child done → the nexus write returns;
//! - `initiator_send`: a child command submitted → its capsule written to the child's socket;
//! - `initiator_remote`: written → the child's response decoded (network and the replica's engine);
//! - `initiator_wake`: decoded → the submitting command resumed with it;
//! - `target_reply`: response ready → written to the host's socket.
//!
//! And where a pool's disk I/O goes through io_uring ([`super::uring`]):
//! - `disk_submit`: asked → handed to the kernel (`io_uring_enter`, which starts the disk request itself and, on an
//!   I/O thread, may run completions of others that wait);
//! - `disk_kernel`: handed to the kernel → its completion reaped (the kernel finishes it as task work of the
//!   submitting thread, at once or, on an I/O thread, when the thread next enters the kernel: the ring's reaper it
//!   woke, or a submission);
//! - `disk_wake`: reaped → the asking task resumed with it.

use std::cell::Cell;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// One I/O in this many is timed.
pub const SAMPLE_EVERY: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    TargetExecute,
    NexusLock,
    NexusFirstChild,
    NexusLastChild,
    NexusFinish,
    InitiatorSend,
    InitiatorRemote,
    InitiatorWake,
    TargetReply,
    DiskSubmit,
    DiskKernel,
    DiskWake,
}

impl Stage {
    pub const ALL: [Stage; 12] = [
        Stage::TargetExecute,
        Stage::NexusLock,
        Stage::NexusFirstChild,
        Stage::NexusLastChild,
        Stage::NexusFinish,
        Stage::InitiatorSend,
        Stage::InitiatorRemote,
        Stage::InitiatorWake,
        Stage::TargetReply,
        Stage::DiskSubmit,
        Stage::DiskKernel,
        Stage::DiskWake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::TargetExecute => "target_execute",
            Stage::NexusLock => "nexus_lock",
            Stage::NexusFirstChild => "nexus_first_child",
            Stage::NexusLastChild => "nexus_last_child",
            Stage::NexusFinish => "nexus_finish",
            Stage::InitiatorSend => "initiator_send",
            Stage::InitiatorRemote => "initiator_remote",
            Stage::InitiatorWake => "initiator_wake",
            Stage::TargetReply => "target_reply",
            Stage::DiskSubmit => "disk_submit",
            Stage::DiskKernel => "disk_kernel",
            Stage::DiskWake => "disk_wake",
        }
    }
}

/// Bucket bounds in seconds: 1 µs to ~5.4 s in steps of 1.25x, fine enough to read a median off, and reaching the
/// seconds a write waits for a fault's consent or a child's reconnect.
fn bounds() -> Vec<f64> {
    (0..70).map(|i| 1e-6 * 1.25f64.powi(i)).collect()
}

static HISTOGRAMS: LazyLock<Vec<prometheus::Histogram>> = LazyLock::new(|| {
    Stage::ALL
        .iter()
        .map(|s| {
            let opts = prometheus::HistogramOpts::new("keelson_io_stage_seconds", s.as_str())
                .buckets(bounds());
            prometheus::Histogram::with_opts(opts).expect("valid histogram options")
        })
        .collect()
});

/// The layers that decide on their own which of their I/Os to time. Each counts for itself: with one counter, two
/// layers asking once each per I/O on one thread would split the samples by parity, one getting all and the other
/// none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    Target,
    Nexus,
    Initiator,
    Disk,
}

thread_local! {
    static TICKS: [Cell<u32>; 4] = const { [const { Cell::new(0) }; 4] };
}

/// Whether the I/O `layer` starts now on this thread is one to time: one in [`SAMPLE_EVERY`].
pub fn sample(layer: Layer) -> bool {
    TICKS.with(|t| {
        let t = &t[layer as usize];
        let n = t.get().wrapping_add(1);
        t.set(n);
        n.is_multiple_of(SAMPLE_EVERY)
    })
}

/// A clock reading if this I/O of `layer` is sampled.
pub fn start(layer: Layer) -> Option<Instant> {
    sample(layer).then(Instant::now)
}

/// Records one sampled stage.
pub fn record(stage: Stage, took: Duration) {
    HISTOGRAMS[stage as usize].observe(took.as_secs_f64());
}

/// Records `from` → now, returning now.
pub fn record_since(stage: Stage, from: Instant) -> Instant {
    let now = Instant::now();
    record(stage, now.saturating_duration_since(from));
    now
}

/// The histogram of one stage, for the metrics endpoint.
pub fn histogram(stage: Stage) -> &'static prometheus::Histogram {
    &HISTOGRAMS[stage as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_in_sample_every_is_timed() {
        let n = (0..SAMPLE_EVERY * 10)
            .filter(|_| sample(Layer::Nexus))
            .count();
        assert_eq!(n, 10);
    }

    #[test]
    fn layers_asking_in_turn_each_get_their_share() {
        let (mut target, mut disk) = (0, 0);
        for _ in 0..SAMPLE_EVERY * 10 {
            target += usize::from(sample(Layer::Target));
            disk += usize::from(sample(Layer::Disk));
        }
        assert_eq!((target, disk), (10, 10));
    }

    #[test]
    fn records_land_in_their_stage() {
        let before = histogram(Stage::NexusFinish).get_sample_count();
        record(Stage::NexusFinish, Duration::from_micros(3));
        assert_eq!(histogram(Stage::NexusFinish).get_sample_count(), before + 1);
        assert!(bounds().windows(2).all(|w| w[0] < w[1]));
    }
}
