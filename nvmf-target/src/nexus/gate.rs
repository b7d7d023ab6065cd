//! Faulting a child only with the cluster agent's consent.
//!
//! A nexus that faults a child and goes on without it acknowledges writes that child lacks. That is right while the
//! nexus is the volume's; it is data loss when a newer nexus already replaced it: a node cut off from the host's
//! report, the agent and the other replicas, but still reached by the host, would fault every remote child and
//! acknowledge writes on its local replica alone, a replica the new nexus does not use. Reservations cannot stop it
//! (nobody else reaches that replica). So a nexus made with a [`FaultGate`] asks before it faults a healthy child
//! on the I/O path, and holds the I/O that found the failure until the answer:
//! - confirmed: the agent recorded the child's replica as out of sync (no later nexus is made of replicas that
//!   missed writes), the child is faulted and the I/O completes as usual;
//! - refused (a newer nexus took over): the nexus stops, and the I/O is never answered. The gate's owner (the
//!   engine) has closed the hosts' connections by then, so a host retries it on its new path;
//! - no answer yet (the agent unreachable): the gate keeps asking and the I/O waits, up to a shutdown of the nexus.
//!
//! An I/O still waiting when the nexus shuts down fails with a path error ([`BlockError::Relocated`]), never with
//! one the host would count against the I/O itself: a Linux host retries it on another path.
//!
//! Children faulted by the control plane itself, and children not in sync anyway (rebuilding), need no consent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::block::{BlockError, MissedWrites};

use super::Nexus;
use super::child::{Child, ChildState};

/// Asked before a nexus faults a healthy child and goes on without it.
#[async_trait::async_trait]
pub trait FaultGate: Send + Sync + std::fmt::Debug {
    /// `Ok`: go on without `child`. `Err(why)`: a newer nexus replaced this one, which must acknowledge nothing
    /// more. Waits, asking again, for as long as no answer comes.
    async fn confirm(&self, child: &str, reason: &str) -> Result<(), String>;
}

/// Told once when a newer nexus of the volume preempted this one's reservation (a child answered a write with
/// Reservation Conflict). The nexus has stopped; the engine takes it off the fabric, so that its hosts' paths go
/// and their kernels retry on the new nexus.
pub trait Fenced: Send + Sync + std::fmt::Debug {
    fn fenced(&self);
}

/// What a nexus's fault gate has said, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultConsent {
    /// A question is waiting for its answer (the I/O that found the failure is held meanwhile).
    pub waiting: bool,
    pub confirmed: u64,
    pub refused: u64,
}

#[derive(Debug, Default)]
pub(super) struct ConsentCounters {
    waiting: AtomicBool,
    confirmed: AtomicU64,
    refused: AtomicU64,
}

impl Nexus {
    /// Every range, for a step that waits for the writes in flight (a snapshot, a growth), or
    /// [`super::NexusError::ConsentPending`] as soon as a write waits for the agent's consent to fault a child. The
    /// cluster agent asks for such steps under the volume's lock and answers consent under it too: waiting, the step
    /// would hold every later write behind it until the agent's call timed out.
    pub(super) async fn quiesce(
        &self,
    ) -> Result<crate::block::range_lock::RangeGuard, super::NexusError> {
        let all = self.lock.exclusive_all();
        tokio::pin!(all);
        loop {
            if self.consent.waiting.load(Ordering::Acquire) {
                return Err(super::NexusError::ConsentPending);
            }
            tokio::select! {
                g = &mut all => return Ok(g),
                _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
            }
        }
    }

    pub fn fault_consent(&self) -> FaultConsent {
        FaultConsent {
            waiting: self.consent.waiting.load(Ordering::Relaxed),
            confirmed: self.consent.confirmed.load(Ordering::Relaxed),
            refused: self.consent.refused.load(Ordering::Relaxed),
        }
    }

    /// Faults `c` for `reason`, with the gate's consent when the nexus has a gate, `c` is healthy and another
    /// child is (the last healthy child is faulted without asking: no write is acknowledged without it, so its
    /// replica keeps every acknowledged write and stays in sync on record, and the volume is made again from it).
    /// `holders`: for a write, the children that took it; if none of them is healthy any more when it is `c`'s turn
    /// (another I/O faulted them meanwhile), `c` is kept and the write must fail: `Ok(false)`. `Err`
    /// ([`BlockError::Relocated`]) when the nexus is shut down meanwhile; when the gate refuses, nothing until then.
    pub(super) async fn fault_confirmed(
        &self,
        c: &Arc<Child>,
        reason: &str,
        holders: Option<&[Arc<Child>]>,
    ) -> Result<bool, BlockError> {
        if let Some(gate) = &self.config.fault_gate {
            // One question at a time: I/Os that found the same child failing wait for the first one's answer.
            let _one = tokio::select! {
                g = self.confirming.lock() => g,
                _ = self.halt.cancelled() => return Err(self.relocated()),
            };
            let healthy_besides = |set: &[Arc<Child>]| {
                set.iter()
                    .any(|o| !Arc::ptr_eq(o, c) && o.state() == ChildState::Healthy)
            };
            if c.state() == ChildState::Healthy && holders.is_some_and(|h| !healthy_besides(h)) {
                tracing::warn!(nexus = %self.name, child = %c.name, "every child that took the write was faulted meanwhile: the child that failed it is kept, the write fails");
                return Ok(false);
            }
            if c.state() == ChildState::Healthy && !self.fault_unasked(c, reason) {
                self.consent.waiting.store(true, Ordering::Relaxed);
                let answer = tokio::select! {
                    a = gate.confirm(&c.name, reason) => Some(a),
                    _ = self.halt.cancelled() => None,
                };
                self.consent.waiting.store(false, Ordering::Relaxed);
                let Some(answer) = answer else {
                    return Err(self.relocated());
                };
                if let Err(why) = answer {
                    self.consent.refused.fetch_add(1, Ordering::Relaxed);
                    self.stopped.store(true, Ordering::Release);
                    tracing::error!(nexus = %self.name, child = %c.name, %why, "a newer nexus replaced this one: it stops without answering the I/O that found the failure");
                    self.halt.cancelled().await;
                    return Err(self.relocated());
                }
                self.consent.confirmed.fetch_add(1, Ordering::Relaxed);
            }
        }
        if c.fault(reason) {
            self.changed();
            // What it had not flushed is named on the others now, not only once a write there comes.
            self.record_unrecorded().await;
        }
        Ok(true)
    }

    /// Keeps on the healthy children the records of what faulted children may have lost that no kept record names
    /// yet ([`Child::unrecorded`]); whether none is left unkept.
    pub(super) async fn record_unrecorded(&self) -> bool {
        let pending: Vec<(Arc<Child>, MissedWrites)> = self
            .list()
            .into_iter()
            .filter_map(|c| c.unrecorded().map(|m| (c, m)))
            .collect();
        if pending.is_empty() {
            return true;
        }
        let keepers = self.healthy();
        if keepers.is_empty() {
            return false;
        }
        let records: Vec<MissedWrites> = pending.iter().map(|(_, m)| m.clone()).collect();
        match super::io::persist_missed(&keepers, &records, self.config.io_timeout).await {
            Ok(()) => {
                for (c, m) in &pending {
                    c.log_recorded(m);
                }
                true
            }
            Err(e) => {
                tracing::warn!(nexus = %self.name, error = %e, "cannot record what a faulted child missed");
                false
            }
        }
    }

    /// Faults `c` without asking if no other child is healthy (no write is acknowledged without it, so its
    /// replica keeps every acknowledged write and stays in sync on record); `false`, doing nothing, if another one
    /// is. Decided under the same lock as a rebuilt child's promotion ([`Nexus::finish_rebuild`]), so that no
    /// child turns healthy, to take writes alone, beside a last child faulted without the agent knowing.
    pub(super) fn fault_unasked(&self, c: &Arc<Child>, reason: &str) -> bool {
        let _health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .list()
            .iter()
            .any(|o| !Arc::ptr_eq(o, c) && o.state() == ChildState::Healthy)
        {
            return false;
        }
        if c.fault(reason) {
            self.changed();
        }
        true
    }

    /// Turns a child whose rebuild finished healthy, unless it was faulted meanwhile or no healthy child is left
    /// (its sources all faulted, the last one without the agent's consent: promoted, it would take writes alone
    /// while the volume's record still has that source as the copy in sync). `Err`: why it was not.
    pub(super) fn finish_rebuild(&self, c: &Child) -> Result<(), String> {
        let _health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if !self
            .list()
            .iter()
            .any(|o| o.name != c.name && o.state() == ChildState::Healthy)
        {
            c.fault("no healthy child was left when its rebuild finished");
            c.rebuild_done();
            return Err("no healthy child was left when it finished".into());
        }
        if c.rebuild_done() {
            Ok(())
        } else {
            Err("child was faulted during the rebuild".into())
        }
    }

    fn relocated(&self) -> BlockError {
        BlockError::Relocated(format!(
            "nexus {} shut down while a child fault waited for consent",
            self.name
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::sync::watch;

    use super::*;
    use crate::block::BlockDevice;
    use crate::block::fault::{FaultDevice, FaultPlan};
    use crate::block::memory::MemoryDevice;
    use crate::nexus::{FaultConsent, NexusConfig, NexusState};

    /// Answers what the test sets, when it sets it; counts the questions.
    #[derive(Debug)]
    struct Scripted {
        answer: watch::Sender<Option<Result<(), String>>>,
        asked: Mutex<Vec<String>>,
    }

    impl Scripted {
        fn new() -> Arc<Scripted> {
            Arc::new(Scripted {
                answer: watch::channel(None).0,
                asked: Mutex::new(Vec::new()),
            })
        }

        fn answer(&self, a: Result<(), String>) {
            self.answer.send_replace(Some(a));
        }

        fn asked(&self) -> Vec<String> {
            self.asked.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl FaultGate for Scripted {
        async fn confirm(&self, child: &str, _reason: &str) -> Result<(), String> {
            self.asked.lock().unwrap().push(child.to_string());
            let mut rx = self.answer.subscribe();
            let a = rx.wait_for(|a| a.is_some()).await.unwrap();
            a.clone().unwrap()
        }
    }

    fn setup(gate: &Arc<Scripted>) -> (Arc<Nexus>, Arc<dyn BlockDevice>, Arc<FaultDevice>) {
        let good: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4 << 20, 512));
        let bad = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(4 << 20, 512))));
        let config = NexusConfig {
            io_timeout: Duration::from_secs(2),
            read_error_limit: 1,
            fault_gate: Some(gate.clone()),
            ..NexusConfig::default()
        };
        let n = Nexus::new(
            "vol",
            vec![
                ("local".into(), good.clone()),
                ("remote".into(), bad.clone()),
            ],
            config,
        )
        .unwrap();
        bad.set_plan(FaultPlan {
            fail_after: Some(0),
            reads_too: true,
            ..Default::default()
        });
        (n, good, bad)
    }

    fn data(b: u8) -> Bytes {
        Bytes::from(vec![b; 4096])
    }

    #[tokio::test]
    async fn a_write_that_faults_a_child_waits_for_consent_and_one_question_serves_all() {
        let gate = Scripted::new();
        let (n, good, _bad) = setup(&gate);
        let w1 = tokio::spawn({
            let n = n.clone();
            async move { n.write(0, data(1)).await }
        });
        let w2 = tokio::spawn({
            let n = n.clone();
            async move { n.write(8192, data(2)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !w1.is_finished() && !w2.is_finished(),
            "acknowledged without consent"
        );
        assert!(n.fault_consent().waiting);
        assert_eq!(n.state(), NexusState::Online, "faulted without consent");
        gate.answer(Ok(()));
        w1.await.unwrap().unwrap();
        w2.await.unwrap().unwrap();
        assert_eq!(gate.asked(), vec!["remote".to_string()]);
        assert_eq!(n.state(), NexusState::Degraded);
        let counted = FaultConsent {
            waiting: false,
            confirmed: 1,
            refused: 0,
        };
        assert_eq!(n.fault_consent(), counted);
        assert_eq!(good.read(8192, 4096).await.unwrap(), data(2));
        // Faulted now: later writes do not ask again.
        n.write(0, data(3)).await.unwrap();
        assert_eq!(gate.asked().len(), 1);
    }

    #[tokio::test]
    async fn a_refused_fault_stops_the_nexus_and_never_acknowledges_the_write() {
        let gate = Scripted::new();
        let (n, _good, _bad) = setup(&gate);
        gate.answer(Err("a newer nexus".into()));
        let w = tokio::spawn({
            let n = n.clone();
            async move { n.write(0, data(1)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !w.is_finished(),
            "the write that found the failure was answered"
        );
        assert_eq!(n.state(), NexusState::Shutdown);
        assert_eq!(n.fault_consent().refused, 1);
        assert!(matches!(
            n.write(4096, data(2)).await,
            Err(BlockError::Relocated(_))
        ));
        assert!(matches!(
            n.read(0, 4096).await,
            Err(BlockError::Relocated(_))
        ));
        // A shutdown (the engine destroying it) ends the held write with an error, never success.
        n.shutdown().await;
        assert!(matches!(w.await.unwrap(), Err(BlockError::Relocated(_))));
    }

    #[tokio::test]
    async fn a_read_that_would_fault_a_child_asks_too() {
        let gate = Scripted::new();
        let (n, _good, _bad) = setup(&gate);
        gate.answer(Ok(()));
        // Round robin reaches the failing child within two reads; each read still returns the data.
        for _ in 0..2 {
            assert_eq!(n.read(0, 4096).await.unwrap(), Bytes::from(vec![0; 4096]));
        }
        assert_eq!(gate.asked(), vec!["remote".to_string()]);
        assert_eq!(n.state(), NexusState::Degraded);
    }

    /// Two children, each failing the other's write: each write waits for consent to fault the child that failed
    /// it. The first answer faults one; the other write then finds every child that took it faulted, and fails
    /// rather than fault the last healthy child (which would leave no child holding every acknowledged write).
    #[tokio::test]
    async fn crossed_write_failures_never_fault_both_children() {
        let gate = Scripted::new();
        let a = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(4 << 20, 512))));
        let b = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(4 << 20, 512))));
        let config = NexusConfig {
            io_timeout: Duration::from_secs(2),
            fault_gate: Some(gate.clone()),
            ..NexusConfig::default()
        };
        let n = Nexus::new(
            "vol",
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            config,
        )
        .unwrap();
        a.set_plan(FaultPlan {
            fail_ranges: vec![std::ops::Range {
                start: 8192,
                end: 12288,
            }],
            ..Default::default()
        });
        b.set_plan(FaultPlan {
            fail_ranges: vec![std::ops::Range {
                start: 0,
                end: 4096,
            }],
            ..Default::default()
        });
        let w1 = tokio::spawn({
            let n = n.clone();
            async move { n.write(0, data(1)).await }
        });
        let w2 = tokio::spawn({
            let n = n.clone();
            async move { n.write(8192, data(2)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!w1.is_finished() && !w2.is_finished());
        gate.answer(Ok(()));
        let (r1, r2) = (w1.await.unwrap(), w2.await.unwrap());
        assert_eq!(gate.asked().len(), 1, "{:?}", gate.asked());
        let healthy: Vec<String> = n.healthy().iter().map(|c| c.name.clone()).collect();
        assert_eq!(healthy.len(), 1, "one child goes on: {healthy:?}");
        let (acked, failed, keeper) = if r1.is_ok() {
            (data(1), r2, a.clone())
        } else {
            (data(2), r1, b.clone())
        };
        assert!(
            matches!(failed, Err(BlockError::Relocated(_))),
            "{failed:?}"
        );
        let at = if acked == data(1) { 0 } else { 8192 };
        keeper.set_plan(FaultPlan::default());
        assert_eq!(keeper.read(at, 4096).await.unwrap(), acked);
        assert_eq!(n.read(at, 4096).await.unwrap(), acked);
        // A write failed after a child took it: the children may differ there, so the end is not clean.
        assert!(!n.shutdown().await);
    }

    /// Two writes failing crosswise on the healthy children, with a third child rebuilding past their range (it
    /// takes writes there): the write whose holder was faulted meanwhile fails, and the rebuilding child that took it
    /// is faulted too. Before, it stayed in its rebuild holding a write the kept child never got (the copy was past
    /// that range, so it never came back to it), and joined the volume differing from it there.
    #[tokio::test]
    async fn a_rebuilding_child_that_took_a_write_that_failed_is_faulted() {
        let gate = Scripted::new();
        let a = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(4 << 20, 512))));
        let b = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(4 << 20, 512))));
        let mut config = NexusConfig {
            io_timeout: Duration::from_secs(2),
            fault_gate: Some(gate.clone()),
            ..NexusConfig::default()
        };
        // One segment copied, then the copy held back (a byte a second).
        config.rebuild.parallel = 1;
        config.rebuild.parallel_busy = 1;
        config.rebuild.rate_limit = Some(1);
        let n = Nexus::new(
            "vol",
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            config,
        )
        .unwrap();
        let c: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4 << 20, 512));
        n.add_child("c", c.clone()).unwrap();
        let rebuilding = n.list().into_iter().find(|x| x.name == "c").unwrap();
        let t = std::time::Instant::now();
        while !rebuilding.takes_write(0, 12288) {
            assert!(t.elapsed() < Duration::from_secs(10), "never copied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(rebuilding.state(), ChildState::Rebuilding);
        a.set_plan(FaultPlan {
            fail_ranges: vec![std::ops::Range {
                start: 8192,
                end: 12288,
            }],
            ..Default::default()
        });
        b.set_plan(FaultPlan {
            fail_ranges: vec![std::ops::Range {
                start: 0,
                end: 4096,
            }],
            ..Default::default()
        });
        let w1 = tokio::spawn({
            let n = n.clone();
            async move { n.write(0, data(1)).await }
        });
        let w2 = tokio::spawn({
            let n = n.clone();
            async move { n.write(8192, data(2)).await }
        });
        // Both sent while every child was as above (the rebuilding one took each), one waiting for consent: only
        // then is it given (given before the second was sent, that one would not go to the faulted child at all).
        let t = std::time::Instant::now();
        while gate.asked().is_empty()
            || c.read(0, 4096).await.unwrap() != data(1)
            || c.read(8192, 4096).await.unwrap() != data(2)
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the writes never came"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gate.answer(Ok(()));
        let (r1, r2) = (w1.await.unwrap(), w2.await.unwrap());
        assert!(r1.is_ok() != r2.is_ok(), "{r1:?} {r2:?}");
        let (keeper, at) = if r1.is_ok() { (a, 8192) } else { (b, 0) };
        keeper.set_plan(FaultPlan::default());
        let kept = keeper.read(at, 4096).await.unwrap();
        assert!(
            rebuilding.state() == ChildState::Faulted || c.read(at, 4096).await.unwrap() == kept,
            "the rebuilding child holds the failed write the kept child does not"
        );
        assert_eq!(rebuilding.state(), ChildState::Faulted);
    }

    /// A child whose write lands and is never answered, or is never answered at all: the write times out on both.
    struct Unanswered {
        inner: MemoryDevice,
        lands: bool,
    }

    #[async_trait::async_trait]
    impl BlockDevice for Unanswered {
        fn block_size(&self) -> u32 {
            self.inner.block_size()
        }
        fn num_blocks(&self) -> u64 {
            self.inner.num_blocks()
        }
        async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
            self.inner.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
            if self.lands {
                self.inner.write(offset, data).await?;
            }
            std::future::pending().await
        }
        async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
            self.inner.write_zeroes(offset, len).await
        }
        async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
            self.inner.deallocate(offset, len).await
        }
        async fn flush(&self) -> Result<(), BlockError> {
            self.inner.flush().await
        }
    }

    /// A write that timed out on every child may still have landed on some (a target that runs a command after the
    /// host gave up on it): given up at a shutdown while its fault waits for consent, the end is not clean. Before,
    /// a write no child answered counted as taken by none, and the next nexus took the children as agreeing.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_timed_out_everywhere_makes_a_shutdown_unclean() {
        let gate = Scripted::new();
        let config = NexusConfig {
            io_timeout: Duration::from_secs(2),
            fault_gate: Some(gate.clone()),
            ..NexusConfig::default()
        };
        let child = |lands| {
            Arc::new(Unanswered {
                inner: MemoryDevice::new(4 << 20, 512),
                lands,
            }) as Arc<dyn BlockDevice>
        };
        let n = Nexus::new(
            "vol",
            vec![("a".into(), child(true)), ("b".into(), child(false))],
            config,
        )
        .unwrap();
        let w = tokio::spawn({
            let n = n.clone();
            async move { n.write(0, data(1)).await }
        });
        // Past the timeout: both failed it, and the fault of one waits for consent that never comes.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(gate.asked().len(), 1, "{:?}", gate.asked());
        assert!(
            !n.shutdown().await,
            "a clean end with children that may differ"
        );
        assert!(w.await.unwrap().is_err());
    }

    /// The last healthy child failing a read is faulted without asking: asked, the agent would record its replica
    /// out of sync, and the volume, left without one in sync, could never be made again.
    #[tokio::test]
    async fn the_last_healthy_child_is_faulted_without_asking() {
        let gate = Scripted::new();
        let (n, _good, _bad) = setup(&gate);
        gate.answer(Ok(()));
        n.write(0, data(1)).await.unwrap();
        assert_eq!(gate.asked(), vec!["remote".to_string()]);
        let local = n.healthy()[0].clone();
        assert_eq!(local.name, "local");
        n.fault_confirmed(&local, "read errors", None)
            .await
            .unwrap();
        assert_eq!(gate.asked().len(), 1, "asked about the last healthy child");
        assert!(n.healthy().is_empty());
    }

    /// A write waiting for consent when the nexus shuts down reached one child and not the other: not a clean end
    /// (the children differ there), even though every child still answers flushes.
    #[tokio::test]
    async fn a_shutdown_that_gives_up_a_write_some_children_took_is_not_clean() {
        let gate = Scripted::new();
        let (n, _good, bad) = setup(&gate);
        // Writes there fail; flushes (and everything else) succeed.
        bad.set_plan(FaultPlan {
            fail_ranges: vec![std::ops::Range {
                start: 8192,
                end: 12288,
            }],
            ..Default::default()
        });
        let w = tokio::spawn({
            let n = n.clone();
            async move { n.write(8192, data(1)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!w.is_finished());
        assert!(!n.shutdown().await, "a clean end after a torn write");
        assert!(matches!(w.await.unwrap(), Err(BlockError::Relocated(_))));
    }

    #[tokio::test]
    async fn a_shutdown_ends_a_write_waiting_for_an_agent_that_never_answers() {
        let gate = Scripted::new();
        let (n, _good, _bad) = setup(&gate);
        let w = tokio::spawn({
            let n = n.clone();
            async move { n.write(0, data(1)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!w.is_finished());
        n.shutdown().await;
        assert!(matches!(w.await.unwrap(), Err(BlockError::Relocated(_))));
    }

    /// A child faulted on an operator's request (`keelctl engine fault-child`) is faulted as a failed I/O would
    /// fault it: only with the agent's consent. Before, it was faulted at once, and writes acknowledged without it
    /// while the agent still counted its replica in sync were lost if the volume was made again from it.
    #[tokio::test]
    async fn a_child_faulted_on_request_waits_for_consent() {
        let gate = Scripted::new();
        let (n, _good, bad) = setup(&gate);
        bad.set_plan(FaultPlan::default());
        let asked = tokio::spawn({
            let n = n.clone();
            async move { n.fault_child("remote", "operator").await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!asked.is_finished(), "faulted without consent");
        assert_eq!(n.state(), NexusState::Online);
        gate.answer(Ok(()));
        asked.await.unwrap().unwrap();
        assert_eq!(gate.asked(), vec!["remote".to_string()]);
        assert_eq!(n.state(), NexusState::Degraded);
    }

    /// A snapshot asked while a write waits for consent to fault a child is given up at once (UNAVAILABLE: the
    /// agent asks again; a growth quiesces the same way), and the write goes on once consent comes. Before, it waited for the
    /// write, which waited for the agent, which answers under the volume lock its snapshot call holds: every write
    /// queued behind it until that call timed out.
    #[tokio::test]
    async fn a_snapshot_asked_while_a_write_waits_for_consent_is_given_up() {
        let gate = Scripted::new();
        let (n, good, _bad) = setup(&gate);
        let w = tokio::spawn({
            let n = n.clone();
            async move { n.write(0, data(1)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(n.fault_consent().waiting);
        let snap = tokio::time::timeout(Duration::from_secs(1), n.snapshot(uuid::Uuid::new_v4()))
            .await
            .expect("the snapshot waited for the write held for consent");
        assert_eq!(snap, Err(crate::nexus::NexusError::ConsentPending));
        gate.answer(Ok(()));
        w.await.unwrap().unwrap();
        assert_eq!(good.read(0, 4096).await.unwrap(), data(1));
    }

    /// A faulted child rejoins while a write waits for consent to fault another: the cluster agent asks for the
    /// rejoin under the volume's lock and answers the question under it too, so a rejoin that waited for the write
    /// (as it did) waited for the agent's call to time out, with every later write queued behind it, and the child
    /// was then replaced in full. The write, sent before the child was back, still reaches it: by its copy.
    #[tokio::test]
    async fn a_rejoin_does_not_wait_for_a_write_waiting_for_consent_and_still_gets_its_data() {
        let gate = Scripted::new();
        let mb = 1u64 << 20;
        let good: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4 * mb, 512));
        let bad = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(4 * mb, 512))));
        let back = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(4 * mb, 512))));
        let config = NexusConfig {
            io_timeout: Duration::from_secs(2),
            fault_gate: Some(gate.clone()),
            ..NexusConfig::default()
        };
        let n = Nexus::new(
            "vol",
            vec![
                ("local".into(), good.clone()),
                ("remote".into(), bad.clone()),
                ("back".into(), back.clone()),
            ],
            config,
        )
        .unwrap();
        let fail = FaultPlan {
            fail_after: Some(0),
            reads_too: true,
            ..Default::default()
        };
        // `back` goes away with consent and misses a write in the first segment.
        back.set_plan(fail.clone());
        gate.answer(Ok(()));
        n.write(0, data(1)).await.unwrap();
        assert_eq!(gate.asked(), vec!["back".to_string()]);
        gate.answer.send_replace(None);
        // A write in the last segment fails on `remote` and waits for consent.
        bad.set_plan(fail);
        let w = tokio::spawn({
            let n = n.clone();
            async move { n.write(3 * mb, data(2)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(n.fault_consent().waiting, "the write asks");
        back.set_plan(FaultPlan::default());
        let kind =
            tokio::time::timeout(Duration::from_secs(1), n.rejoin_child("back", back.clone()))
                .await
                .expect("the rejoin waited for the write held for consent")
                .unwrap();
        assert_eq!(kind, crate::nexus::RebuildKind::Partial);
        assert!(!w.is_finished(), "acknowledged without consent");
        gate.answer(Ok(()));
        w.await.unwrap().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while n.rebuild_history().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rebuild never ended"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(n.rebuild_history()[0].error, None);
        let want = good.read(0, 4 * mb).await.unwrap();
        assert_eq!(&want[3 * mb as usize..3 * mb as usize + 4096], &data(2)[..]);
        assert_eq!(
            back.read(0, 4 * mb).await.unwrap(),
            want,
            "the rejoined child lacks what the write held for consent wrote"
        );
    }
}
