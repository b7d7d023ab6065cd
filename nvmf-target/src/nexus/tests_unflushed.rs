//! A child that loses what it had not flushed (power cut, or a remote child whose connection was lost and made
//! again) gets it back from its partial rebuild; a rebuilt child is flushed before it counts as complete.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::tests::{SIZE, nexus};
use super::*;
use crate::block::memory::MemoryDevice;
use crate::block::{BlockDevice, BlockError};

/// The segment size of the shared test configuration (`tests::config`).
const SEGMENT: u64 = 64 << 10;

/// A disk with a volatile write cache: reads see every write, a flush makes them durable, and a power cut loses
/// what was not flushed. While the power is off every I/O fails. `losses` is what a remote child reports as its
/// connection losses: a power cut of its node that the nexus never saw fail counts one.
struct Volatile {
    state: Mutex<VolatileState>,
}

struct VolatileState {
    current: Vec<u8>,
    durable: Vec<u8>,
    off: bool,
    losses: u64,
}

impl Volatile {
    fn new() -> Arc<Volatile> {
        Arc::new(Volatile {
            state: Mutex::new(VolatileState {
                current: vec![0; SIZE as usize],
                durable: vec![0; SIZE as usize],
                off: false,
                losses: 0,
            }),
        })
    }

    fn power_cut(&self) {
        let mut s = self.state.lock().unwrap();
        s.current = s.durable.clone();
        s.off = true;
    }

    fn power_on(&self) {
        self.state.lock().unwrap().off = false;
    }

    /// Power cut and back with no I/O in between: only the connection count tells.
    fn silent_restart(&self) {
        self.power_cut();
        let mut s = self.state.lock().unwrap();
        s.off = false;
        s.losses += 1;
    }

    /// Its connection lost and made again, nothing lost (its engine restarted cleanly, flushing first).
    fn reconnect(&self) {
        let mut s = self.state.lock().unwrap();
        s.durable = s.current.clone();
        s.losses += 1;
    }

    fn io(&self) -> Result<std::sync::MutexGuard<'_, VolatileState>, BlockError> {
        let s = self.state.lock().unwrap();
        if s.off {
            return Err(BlockError::Remote("power off".into()));
        }
        Ok(s)
    }
}

#[async_trait]
impl BlockDevice for Volatile {
    fn block_size(&self) -> u32 {
        512
    }
    fn num_blocks(&self) -> u64 {
        SIZE / 512
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        let s = self.io()?;
        Ok(Bytes::copy_from_slice(
            &s.current[offset as usize..(offset + len) as usize],
        ))
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        let mut s = self.io()?;
        s.current[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write(offset, Bytes::from(vec![0; len as usize])).await
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        let mut s = self.io()?;
        s.durable = s.current.clone();
        Ok(())
    }
    fn connection_losses(&self) -> u64 {
        self.state.lock().unwrap().losses
    }
    async fn snapshot(&self, _id: uuid::Uuid) -> Result<(), BlockError> {
        self.io().map(drop)
    }
}

fn data(seed: u8) -> Bytes {
    Bytes::from(vec![seed; SEGMENT as usize])
}

async fn rebuilt(n: &Nexus) -> RebuildRecord {
    for _ in 0..2000 {
        if let Some(r) = n.rebuild_history().pop()
            && n.state() == NexusState::Online
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("rebuild did not finish: {:?}", n.children());
}

#[tokio::test]
async fn writes_a_child_lost_with_its_power_come_back_with_its_partial_rebuild() {
    let b = Volatile::new();
    let n = nexus(vec![Arc::new(MemoryDevice::new(SIZE, 512)), b.clone()]);
    n.write(0, data(1)).await.unwrap();
    n.flush().await.unwrap();
    // Acknowledged by both, flushed by neither: only in b's cache when its power goes.
    n.write(4 << 20, data(2)).await.unwrap();
    b.power_cut();
    n.write(8 << 20, data(3)).await.unwrap();
    assert_eq!(n.state(), NexusState::Degraded);
    n.flush().await.unwrap();
    b.power_on();
    assert_eq!(
        n.rejoin_child("c1", b.clone()).await.unwrap(),
        RebuildKind::Partial
    );
    let r = rebuilt(&n).await;
    // The segment it lost unflushed and the one it missed; not the one it had flushed.
    assert_eq!(r.bytes_copied, 2 * SEGMENT);
    assert_eq!(b.read(4 << 20, SEGMENT).await.unwrap(), data(2));
    assert_eq!(b.read(8 << 20, SEGMENT).await.unwrap(), data(3));
    // The rebuild flushed what it copied: another power cut keeps it.
    b.power_cut();
    b.power_on();
    assert_eq!(b.read(4 << 20, SEGMENT).await.unwrap(), data(2));
    assert_eq!(b.read(8 << 20, SEGMENT).await.unwrap(), data(3));
    assert_eq!(b.read(0, SEGMENT).await.unwrap(), data(1));
}

/// A nexus that ends cleanly (destroyed or moved: the next one starts knowing of nothing unflushed) has its
/// children flush first, so a child that loses its power afterwards keeps every write and agrees with the others.
/// Before, the end only drained the writes: a child's unflushed ones went with its power, and no later nexus knew
/// to rebuild them.
#[tokio::test]
async fn a_clean_end_flushes_the_children_so_a_power_cut_after_it_loses_nothing() {
    let b = Volatile::new();
    let n = nexus(vec![Arc::new(MemoryDevice::new(SIZE, 512)), b.clone()]);
    n.write(4 << 20, data(2)).await.unwrap();
    assert!(n.shutdown().await, "a clean end");
    b.power_cut();
    b.power_on();
    assert_eq!(b.read(4 << 20, SEGMENT).await.unwrap(), data(2));
}

/// A healthy child that cannot flush at the end makes the end unclean: the next nexus resyncs the children.
#[tokio::test]
async fn an_end_whose_child_cannot_flush_is_not_clean() {
    let b = Volatile::new();
    let n = nexus(vec![Arc::new(MemoryDevice::new(SIZE, 512)), b.clone()]);
    n.write(0, data(1)).await.unwrap();
    b.power_cut();
    assert!(
        !n.shutdown().await,
        "an end whose child lost its writes is not clean"
    );
}

#[tokio::test]
async fn a_child_that_lost_its_connection_is_faulted_at_its_next_io_and_catches_up() {
    let b = Volatile::new();
    let n = nexus(vec![Arc::new(MemoryDevice::new(SIZE, 512)), b.clone()]);
    n.write(0, data(1)).await.unwrap();
    // Its node restarts while the volume is idle: no I/O fails, the connection comes back.
    b.silent_restart();
    // Its next write succeeds, but b may have lost the first one: it must not serve reads.
    n.write(8 << 20, data(3)).await.unwrap();
    assert_eq!(n.state(), NexusState::Degraded);
    for _ in 0..4 {
        assert_eq!(n.read(0, SEGMENT).await.unwrap(), data(1));
    }
    assert_eq!(
        n.rejoin_child("c1", b.clone()).await.unwrap(),
        RebuildKind::Partial
    );
    rebuilt(&n).await;
    assert_eq!(b.read(0, SEGMENT).await.unwrap(), data(1));
    assert_eq!(b.read(8 << 20, SEGMENT).await.unwrap(), data(3));
}

#[tokio::test]
async fn a_read_is_not_served_by_a_child_that_lost_its_connection() {
    let b = Volatile::new();
    let n = nexus(vec![Arc::new(MemoryDevice::new(SIZE, 512)), b.clone()]);
    n.write(0, data(1)).await.unwrap();
    b.silent_restart();
    for _ in 0..4 {
        assert_eq!(n.read(0, SEGMENT).await.unwrap(), data(1));
    }
    assert_eq!(n.state(), NexusState::Degraded);
}

#[tokio::test]
async fn when_every_child_lost_its_connection_they_are_all_kept() {
    let (a, b) = (Volatile::new(), Volatile::new());
    let n = nexus(vec![a.clone(), b.clone()]);
    n.write(0, data(1)).await.unwrap();
    n.flush().await.unwrap();
    a.silent_restart();
    b.silent_restart();
    n.write(8 << 20, data(3)).await.unwrap();
    assert_eq!(n.state(), NexusState::Online);
    assert_eq!(n.read(0, SEGMENT).await.unwrap(), data(1));
}

/// Every child lost its connection, one of them with a write it had not flushed (its node lost power), the other
/// keeping it (its engine restarted cleanly): only one is kept, and the other catches up from it, so every read of
/// that write gives the same answer. Before, both were kept: reads alternated between the write and the data before
/// it.
#[tokio::test]
async fn when_every_child_lost_its_connection_with_writes_unflushed_only_one_is_kept() {
    let (a, b) = (Volatile::new(), Volatile::new());
    let n = nexus(vec![a.clone(), b.clone()]);
    n.write(0, data(1)).await.unwrap();
    a.reconnect();
    b.silent_restart();
    let first = n.read(0, SEGMENT).await.unwrap();
    for _ in 0..4 {
        assert_eq!(n.read(0, SEGMENT).await.unwrap(), first, "reads disagree");
    }
    assert_eq!(n.state(), NexusState::Degraded);
    assert_eq!(
        n.rejoin_child("c1", b.clone()).await.unwrap(),
        RebuildKind::Partial
    );
    rebuilt(&n).await;
    assert_eq!(b.read(0, SEGMENT).await.unwrap(), first);
}

/// A nexus ends (moved, or its engine drained) after a child's connection was lost and made again while the volume
/// was idle, the writes it had not flushed gone with its node's power: the end faults it and records those writes
/// on the other child, so the next nexus rebuilds them. Before, the end flushed it as a healthy child and called
/// itself clean: the next nexus trusted it, and reads returned the write or the data before it by turns.
#[tokio::test]
async fn an_end_after_a_child_lost_its_connection_records_what_it_had_not_flushed() {
    use super::tests_missed::{Notes, Recording};
    let a = Arc::new(Recording::new(super::tests::mem(), Vec::new(), Notes::Keep));
    let b = Volatile::new();
    let n = nexus(vec![a.clone(), b.clone()]);
    n.write(0, data(1)).await.unwrap();
    b.silent_restart();
    assert!(n.shutdown().await, "recorded: a clean end");
    let next = nexus(vec![a.clone(), b.clone()]);
    assert_eq!(
        next.recover_missed(false).await.unwrap(),
        vec![("c1".to_string(), RebuildKind::Partial)]
    );
    rebuilt(&next).await;
    assert_eq!(b.read(0, SEGMENT).await.unwrap(), data(1));
}

/// A child whose connection was lost with nothing unflushed lost nothing: the end keeps it as it is.
#[tokio::test]
async fn an_end_after_a_child_lost_its_connection_with_everything_flushed_keeps_it() {
    let b = Volatile::new();
    let n = nexus(vec![super::tests::mem(), b.clone()]);
    n.write(0, data(1)).await.unwrap();
    n.flush().await.unwrap();
    b.silent_restart();
    assert!(n.shutdown().await);
    assert!(n.children().iter().all(|c| c.state == ChildState::Healthy));
}

/// One child lost its connection (and with it a write it had not flushed) while the other, still connected, fails
/// the next write: the first is not kept as if every child had lost its connection. Before, only the children
/// whose write succeeded were looked at: the one that lost the earlier write was kept as the only healthy child,
/// the other faulted, and reads served data older than an acknowledged write.
#[tokio::test]
async fn a_child_that_lost_its_connection_is_not_kept_when_the_other_fails_a_write() {
    let a = Volatile::new();
    let b = super::tests::faulty();
    let n = nexus(vec![a.clone(), b.clone()]);
    n.write(0, data(1)).await.unwrap();
    a.silent_restart();
    b.set_plan(crate::block::fault::FaultPlan {
        fail_after: Some(0),
        ..Default::default()
    });
    let acked = n.write(8 << 20, data(3)).await.is_ok();
    // Neither child holds both writes: failing is right, stale data is not. Read a few times: reads go round the
    // children.
    for _ in 0..4 {
        if let Ok(d) = n.read(0, SEGMENT).await {
            assert_eq!(d, data(1), "an acknowledged write is gone");
        }
        if acked && let Ok(d) = n.read(8 << 20, SEGMENT).await {
            assert_eq!(d, data(3), "the acknowledged second write is gone");
        }
    }
}

#[tokio::test]
async fn a_rebuild_does_not_copy_from_a_child_that_lost_its_connection() {
    let a = Volatile::new();
    let b: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(SIZE, 512));
    let n = nexus(vec![a.clone(), b.clone()]);
    for i in 0..8u64 {
        n.write(i * SEGMENT, data(5)).await.unwrap();
    }
    // a's node restarts while the volume is idle: the writes it had not flushed are gone, and no I/O failed.
    a.silent_restart();
    let c: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(SIZE, 512));
    n.add_child("c2", c.clone()).unwrap();
    for _ in 0..2000 {
        if !n.rebuild_history().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(n.rebuild_history().len(), 1);
    for i in 0..8u64 {
        assert_eq!(
            c.read(i * SEGMENT, SEGMENT).await.unwrap(),
            data(5),
            "segment {i}"
        );
    }
}

/// The destination of a rebuild whose node restarts during the copy (idle: no copy fails, its connection comes
/// back) loses the copies it had not flushed: the rebuild fails instead of making it healthy. Before, it turned
/// healthy with zeroes where the copies had been, and once the source left, reads served them.
#[tokio::test]
async fn a_rebuild_whose_destination_lost_its_connection_does_not_make_it_healthy() {
    let mut config = super::tests::config();
    config.rebuild.rate_limit = Some(4 << 20);
    config.rebuild.parallel = 1;
    config.rebuild.copy_size = SEGMENT;
    let source: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(SIZE, 512));
    let n = Nexus::new("vol", vec![("c0".to_string(), source)], config).unwrap();
    n.write(0, data(7)).await.unwrap();
    let d = Volatile::new();
    n.add_child("c1", d.clone()).unwrap();
    // The first segments are copied by now, the copy far from done.
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.silent_restart();
    let mut history = n.rebuild_history();
    for _ in 0..2000 {
        if !history.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        history = n.rebuild_history();
    }
    let r = history.pop().expect("the rebuild never ended");
    if r.error.is_none() {
        assert_eq!(
            d.read(0, SEGMENT).await.unwrap(),
            data(7),
            "made healthy without the copies it lost"
        );
    }
}

/// A fault gate that never answers: the cluster agent holds the volume while it asks for a snapshot, or cannot be
/// reached.
#[derive(Debug)]
pub(super) struct NeverAnswers;

#[async_trait]
impl FaultGate for NeverAnswers {
    async fn confirm(&self, _child: &str, _reason: &str) -> Result<(), String> {
        std::future::pending().await
    }
}

/// A child that lost its connection (its node restarted while the volume was idle) would miss unflushed writes in
/// its copy: it is left out of the snapshot, without asking the cluster agent to fault it there (the agent holds
/// the volume while it asks for the snapshot, and the volume's I/O waits on the snapshot). Before, the snapshot
/// asked, and failed each time once the agent's call timed out; its next I/O faults it.
#[tokio::test]
async fn a_snapshot_leaves_out_a_child_that_lost_its_connection() {
    let (a, b) = (Volatile::new(), Volatile::new());
    let mut config = super::tests::config();
    config.fault_gate = Some(Arc::new(NeverAnswers));
    let n = Nexus::new(
        "vol",
        vec![
            ("c0".to_string(), a.clone() as Arc<dyn BlockDevice>),
            ("c1".to_string(), b.clone() as Arc<dyn BlockDevice>),
        ],
        config,
    )
    .unwrap();
    n.write(0, data(1)).await.unwrap();
    // b's node restarts while the volume is idle: its copy would miss the write.
    b.silent_restart();
    let taken = tokio::time::timeout(Duration::from_secs(5), n.snapshot(uuid::Uuid::new_v4()))
        .await
        .expect("the snapshot asks nobody")
        .unwrap();
    assert_eq!(taken, vec!["c0".to_string()]);
}

/// A disk whose flush never answers; everything else goes to memory.
struct FlushHangs(MemoryDevice);

#[async_trait]
impl BlockDevice for FlushHangs {
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.0.num_blocks()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        self.0.write(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.0.write_zeroes(offset, len).await
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.0.deallocate(offset, len).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        std::future::pending().await
    }
}

/// A child whose disk stops answering the flush that ends its rebuild holds neither the rebuild nor the nexus's
/// shutdown: the flush is bounded by the child timeout, and a shutdown cancels it. Before, the shutdown (and with
/// it DestroyNexus and the engine's stop) waited on it for as long as the disk stalled.
#[tokio::test]
async fn a_rebuild_whose_last_flush_stalls_holds_no_shutdown() {
    let n = nexus(vec![Arc::new(MemoryDevice::new(SIZE, 512))]);
    n.write(0, data(1)).await.unwrap();
    n.add_child("c1", Arc::new(FlushHangs(MemoryDevice::new(SIZE, 512))))
        .unwrap();
    // The copy (16 MiB of memory) is done at once; its flush then stalls.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let clean = tokio::time::timeout(Duration::from_secs(8), n.shutdown())
        .await
        .expect("the shutdown ends");
    assert!(clean, "the healthy child flushed: {:?}", n.children());
}
