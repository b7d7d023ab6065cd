//! What a faulted child missed is recorded on the children that hold the data before any write to those segments
//! is acknowledged: a record still on its way holds back later writes to its segments, and one that failed is made
//! again by the next write there. And [`Recording`], the test child that keeps such records like a pool replica.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;

use super::tests::{faulty, mem, nexus, pattern};
use crate::block::fault::FaultPlan;
use crate::block::{BlockDevice, BlockError, MissedWrites};

/// How a [`Recording`] child answers a missed-writes record.
pub(super) enum Notes {
    /// Keeps it.
    Keep,
    /// Never answers (its pool's journal stalled).
    Stall,
    /// Refuses it (its journal failed).
    Fail,
    /// Keeps it once a permit is given.
    Wait(Arc<Semaphore>),
}

/// A memory child that keeps missed-writes records like a pool replica, answering them as `notes` says.
pub(super) struct Recording {
    dev: Arc<dyn BlockDevice>,
    pub(super) records: Mutex<Vec<MissedWrites>>,
    notes: Mutex<Notes>,
    /// Never answers when told to drop a record (its pool's journal stalled).
    forget_stalls: std::sync::atomic::AtomicBool,
}

impl Recording {
    pub(super) fn new(
        dev: Arc<dyn BlockDevice>,
        records: Vec<MissedWrites>,
        notes: Notes,
    ) -> Recording {
        Recording {
            dev,
            records: Mutex::new(records),
            notes: Mutex::new(notes),
            forget_stalls: Default::default(),
        }
    }

    fn set_notes(&self, n: Notes) {
        *self.notes.lock().unwrap() = n;
    }

    /// Whether a record kept here says `child` missed the segment at `offset`.
    fn names(&self, child: &str, offset: u64) -> bool {
        self.records.lock().unwrap().iter().any(|m| {
            m.child == child && m.ranges.iter().any(|(s, n)| (*s..s + n).contains(&offset))
        })
    }
}

#[async_trait::async_trait]
impl BlockDevice for Recording {
    fn block_size(&self) -> u32 {
        self.dev.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.dev.num_blocks()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        self.dev.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        self.dev.write(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.dev.write_zeroes(offset, len).await
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.dev.deallocate(offset, len).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    async fn note_missed(&self, m: &MissedWrites) -> Result<(), BlockError> {
        let wait = match &*self.notes.lock().unwrap() {
            Notes::Keep => None,
            Notes::Stall => Some(Arc::new(Semaphore::new(0))),
            Notes::Fail => return Err(BlockError::Remote("the journal failed".into())),
            Notes::Wait(s) => Some(s.clone()),
        };
        if let Some(s) = wait {
            s.acquire().await.unwrap().forget();
        }
        self.records.lock().unwrap().push(m.clone());
        Ok(())
    }
    async fn forget_missed(&self, child: &str) -> Result<(), BlockError> {
        if self
            .forget_stalls
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            std::future::pending::<()>().await;
        }
        self.records.lock().unwrap().retain(|m| m.child != child);
        Ok(())
    }
    async fn missed(&self) -> Result<Vec<MissedWrites>, BlockError> {
        Ok(self.records.lock().unwrap().clone())
    }
}

/// A nexus of a recording child (c0) and one (c1) faulted by a write it failed, whose record c0 keeps.
async fn one_child_away() -> (Arc<super::Nexus>, Arc<Recording>) {
    let holder = Arc::new(Recording::new(mem(), Vec::new(), Notes::Keep));
    let away = faulty();
    let n = nexus(vec![holder.clone(), away.clone()]);
    away.set_plan(FaultPlan {
        fail_after: Some(0),
        ..Default::default()
    });
    n.write(0, pattern(1, 4096)).await.unwrap();
    assert!(holder.names("c1", 0));
    (n, holder)
}

/// A child that never answers when told to drop a record (its pool's journal stalled) does not hold the volume at a
/// rebuild's end: the rebuild ends within the I/O timeout and writes go on. Before, the end waited on it for ever
/// holding the whole volume's range lock, and every write hung behind it.
#[tokio::test(start_paused = true)]
async fn a_child_that_never_drops_a_record_does_not_hold_the_volume_at_a_rebuilds_end() {
    let (n, holder) = one_child_away().await;
    holder
        .forget_stalls
        .store(true, std::sync::atomic::Ordering::Relaxed);
    n.rejoin_child("c1", mem()).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while n.rebuild_history().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(ended.is_ok(), "the rebuild never ended");
    assert_eq!(n.rebuild_history().pop().unwrap().error, None);
    tokio::time::timeout(Duration::from_secs(10), n.write(0, pattern(5, 4096)))
        .await
        .expect("a write after the rebuild hung")
        .unwrap();
}

/// Segment 2 of the test configuration's 64 KiB segments.
const SEGMENT_2: u64 = 128 << 10;

/// A second write to a segment whose record the first is still waiting for was acknowledged at once: a crash then
/// lost the record, and the acknowledged write with it on the child that missed it (nothing said to rebuild there).
#[tokio::test]
async fn a_write_to_a_segment_whose_record_is_on_its_way_waits_for_it() {
    let (n, holder) = one_child_away().await;
    let journal = Arc::new(Semaphore::new(0));
    holder.set_notes(Notes::Wait(journal.clone()));
    let first = tokio::spawn({
        let n = n.clone();
        async move { n.write(SEGMENT_2, pattern(2, 4096)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = tokio::spawn({
        let n = n.clone();
        async move { n.write(SEGMENT_2 + 8192, pattern(3, 4096)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !first.is_finished() && !second.is_finished(),
        "a write to the segment was acknowledged before any record named it"
    );
    journal.add_permits(8);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert!(holder.names("c1", SEGMENT_2));
    // Named now: the next write there makes no record.
    let before = holder.records.lock().unwrap().len();
    n.write(SEGMENT_2 + 4096, pattern(4, 4096)).await.unwrap();
    assert_eq!(holder.records.lock().unwrap().len(), before);
}

/// A write whose record failed fails; the next write to its segment was acknowledged with no record at all (the
/// segment was marked already). Now it makes the record again.
#[tokio::test]
async fn a_record_that_failed_is_made_again_by_the_next_write_there() {
    let (n, holder) = one_child_away().await;
    holder.set_notes(Notes::Fail);
    assert!(n.write(SEGMENT_2, pattern(2, 4096)).await.is_err());
    holder.set_notes(Notes::Keep);
    n.write(SEGMENT_2 + 4096, pattern(3, 4096)).await.unwrap();
    assert!(
        holder.names("c1", SEGMENT_2),
        "acknowledged with no record naming what c1 missed"
    );
}

/// A child faulted with a write it had not flushed (its node may lose it), and no write there after: the clean end
/// keeps the record naming that write's segment. Before, only a later write to the segment made the record, the
/// end was called clean, and the next nexus trusted the child there.
#[tokio::test]
async fn what_a_faulted_child_had_not_flushed_is_recorded_by_a_clean_end() {
    let holder = Arc::new(Recording::new(mem(), Vec::new(), Notes::Keep));
    let n = nexus(vec![holder.clone(), faulty()]);
    n.write(0, pattern(1, 4096)).await.unwrap();
    n.fault_child("c1", "its node is going away").await.unwrap();
    assert!(n.shutdown().await);
    assert!(
        holder.names("c1", 0),
        "nothing names the write c1 had not flushed"
    );
}

/// The same when a read faults the child: the record is made at once, not at the next write there.
#[tokio::test]
async fn a_child_faulted_by_reads_has_what_it_had_not_flushed_recorded_at_once() {
    let holder = Arc::new(Recording::new(mem(), Vec::new(), Notes::Keep));
    let away = faulty();
    let n = nexus(vec![holder.clone(), away.clone()]);
    n.write(0, pattern(1, 4096)).await.unwrap();
    away.set_plan(FaultPlan {
        fail_after: Some(0),
        reads_too: true,
        ..Default::default()
    });
    for _ in 0..16 {
        n.read(0, 4096).await.unwrap();
    }
    assert!(n.child("c1").unwrap().state() != super::ChildState::Healthy);
    assert!(
        holder.names("c1", 0),
        "nothing names the write c1 had not flushed"
    );
}

/// Recording children c0 (x) and c1 (y) and a child c2 that failed a write at 0 (the record on both); then c0
/// faulted and a write at segment 2 that both c0 and c2 missed (its record on y).
async fn c0_away_after_c2() -> (Arc<super::Nexus>, Arc<Recording>, Arc<Recording>) {
    let x = Arc::new(Recording::new(mem(), Vec::new(), Notes::Keep));
    let y = Arc::new(Recording::new(mem(), Vec::new(), Notes::Keep));
    let away = faulty();
    let n = nexus(vec![x.clone(), y.clone(), away.clone()]);
    away.set_plan(FaultPlan {
        fail_after: Some(0),
        ..Default::default()
    });
    n.write(0, pattern(1, 4096)).await.unwrap();
    assert!(x.names("c2", 0));
    n.fault_child("c0", "its node restarts").await.unwrap();
    n.write(SEGMENT_2, pattern(2, 4096)).await.unwrap();
    (n, x, y)
}

/// A child that caught up holds the records of the children still away, as the others do: before, its rebuild's end
/// dropped every record it held and the copy brought none, so once the others were gone a later nexus over it and
/// a child still away found nothing naming what that one missed, and trusted it.
#[tokio::test]
async fn a_child_that_caught_up_holds_what_the_children_still_away_missed() {
    let (n, x, y) = c0_away_after_c2().await;
    n.rejoin_child("c0", x.clone()).await.unwrap();
    for _ in 0..2000 {
        if !n.rebuild_history().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(n.rebuild_history().pop().unwrap().error, None);
    assert!(
        x.names("c2", 0),
        "the record of what c2 missed is gone from c0"
    );
    assert!(
        x.names("c2", SEGMENT_2),
        "c0 never got the record of what c2 missed while c0 was away"
    );
    assert!(!x.names("c0", 0) && !y.names("c0", SEGMENT_2));
}

/// A write that comes while a caught-up child is being given the records of the children still away waits for it
/// to turn healthy, so the record that write makes reaches it too. Before, the write went on meanwhile, its record
/// was kept by the healthy children only, and the caught-up child never learnt of that segment.
#[tokio::test]
async fn a_write_while_a_caught_up_child_takes_the_records_reaches_it_too() {
    const SEGMENT_4: u64 = 256 << 10;
    let (n, x, _) = c0_away_after_c2().await;
    let journal = Arc::new(Semaphore::new(0));
    x.set_notes(Notes::Wait(journal.clone()));
    n.rejoin_child("c0", x.clone()).await.unwrap();
    // The rebuild is over and waits for x to keep c2's record.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let write = tokio::spawn({
        let n = n.clone();
        async move { n.write(SEGMENT_4, pattern(3, 4096)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    journal.add_permits(64);
    write.await.unwrap().unwrap();
    assert!(
        x.names("c2", SEGMENT_4),
        "c0 never got the record of a write c2 missed while c0 caught up"
    );
}
