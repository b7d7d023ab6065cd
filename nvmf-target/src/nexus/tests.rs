//! Nexus behaviour over memory and fault-injecting children.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::block::fault::{FaultDevice, FaultPlan};
use crate::block::memory::MemoryDevice;
use crate::block::{BlockDevice, BlockError};

use super::tests_missed::{Notes, Recording};

pub(super) const SIZE: u64 = 16 << 20;

pub(super) fn mem() -> Arc<dyn BlockDevice> {
    Arc::new(MemoryDevice::new(SIZE, 512))
}

pub(super) fn faulty() -> Arc<FaultDevice> {
    Arc::new(FaultDevice::new(mem()))
}

pub(super) fn config() -> NexusConfig {
    NexusConfig {
        io_timeout: Duration::from_secs(2),
        read_error_limit: 2,
        rebuild: RebuildConfig {
            segment_size: 64 << 10,
            copy_size: 256 << 10,
            rate_limit: None,
            parallel: 4,
            parallel_busy: 2,
            io_timeout: None,
        },
        partial_rebuild_window: Duration::from_secs(60),
        on_change: None,
        fault_gate: None,
        on_fenced: None,
    }
}

pub(super) fn nexus(children: Vec<Arc<dyn BlockDevice>>) -> Arc<Nexus> {
    let named = children
        .into_iter()
        .enumerate()
        .map(|(i, d)| (format!("c{i}"), d))
        .collect();
    Nexus::new("vol", named, config()).unwrap()
}

pub(super) fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_mul(31).wrapping_add((i / 512) as u8))
            .collect::<Vec<u8>>(),
    )
}

async fn wait_online(n: &Nexus) {
    for _ in 0..2000 {
        if n.state() == NexusState::Online {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("nexus not online: {:?}", n.children());
}

#[tokio::test]
async fn writes_reach_every_child_and_reads_rotate() {
    let kids = vec![mem(), mem(), mem()];
    let n = nexus(kids.clone());
    assert_eq!(n.state(), NexusState::Online);
    n.write(4096, pattern(1, 8192)).await.unwrap();
    for k in &kids {
        assert_eq!(k.read(4096, 8192).await.unwrap(), pattern(1, 8192));
    }
    for _ in 0..30 {
        assert_eq!(n.read(4096, 8192).await.unwrap(), pattern(1, 8192));
    }
    let reads: Vec<u64> = n
        .list()
        .iter()
        .map(|c| c.counters.reads.load(Ordering::Relaxed))
        .collect();
    assert_eq!(reads, vec![10, 10, 10], "round robin");
}

#[tokio::test]
async fn a_child_whose_writes_fail_is_faulted_and_io_goes_on() {
    let bad = faulty();
    let good = mem();
    let n = nexus(vec![good.clone(), bad.clone()]);
    bad.set_plan(FaultPlan {
        fail_after: Some(0),
        reads_too: true,
        ..Default::default()
    });
    n.write(0, pattern(2, 4096)).await.unwrap();
    assert_eq!(n.state(), NexusState::Degraded);
    let info = n.children();
    assert_eq!(info[1].state, ChildState::Faulted);
    assert!(
        info[1]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("write failed")
    );
    for _ in 0..4 {
        assert_eq!(n.read(0, 4096).await.unwrap(), pattern(2, 4096));
    }
    assert_eq!(good.read(0, 4096).await.unwrap(), pattern(2, 4096));
}

#[tokio::test]
async fn with_no_healthy_child_io_fails_and_the_nexus_is_faulted() {
    let a = faulty();
    let b = faulty();
    let n = nexus(vec![a.clone(), b.clone()]);
    for d in [&a, &b] {
        d.set_plan(FaultPlan {
            fail_after: Some(0),
            reads_too: true,
            ..Default::default()
        });
    }
    assert!(n.write(0, pattern(3, 512)).await.is_err());
    assert_eq!(n.state(), NexusState::Faulted);
    assert!(n.read(0, 512).await.is_err());
}

#[tokio::test]
async fn read_errors_go_to_another_child_and_fault_after_the_limit() {
    let bad = faulty();
    let n = nexus(vec![bad.clone(), mem()]);
    n.write(0, pattern(4, 4096)).await.unwrap();
    bad.set_plan(FaultPlan {
        fail_ranges: std::iter::once(0..4096).collect(),
        reads_too: true,
        ..Default::default()
    });
    for _ in 0..6 {
        assert_eq!(
            n.read(0, 4096).await.unwrap(),
            pattern(4, 4096),
            "served by the good child"
        );
    }
    assert_eq!(n.children()[0].state, ChildState::Faulted);
}

#[tokio::test(start_paused = true)]
async fn a_child_that_hangs_is_faulted_by_the_timeout() {
    let slow = faulty();
    let n = nexus(vec![mem(), slow.clone()]);
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_secs(60)),
        ..Default::default()
    });
    n.write(0, pattern(5, 512)).await.unwrap();
    assert_eq!(n.children()[1].state, ChildState::Faulted);
    assert!(
        n.children()[1]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("timed out")
    );
}

#[tokio::test]
async fn bad_children_are_refused() {
    let small: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(SIZE / 2, 512));
    let other_bs: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(SIZE, 4096));
    assert_eq!(
        Nexus::new("v", vec![], config()).err(),
        Some(NexusError::NoChildren)
    );
    assert!(matches!(
        Nexus::new(
            "v",
            vec![("a".into(), mem()), ("b".into(), other_bs.clone())],
            config()
        ),
        Err(NexusError::BlockSize { .. })
    ));
    let n = nexus(vec![mem()]);
    assert!(matches!(
        n.add_child("s", small),
        Err(NexusError::TooSmall { .. })
    ));
    assert!(matches!(
        n.add_child("c0", mem()),
        Err(NexusError::DuplicateChild(_))
    ));
    assert_eq!(
        n.remove_child("zz"),
        Err(NexusError::NoSuchChild("zz".into()))
    );
}

#[tokio::test]
async fn the_last_healthy_child_cannot_be_removed_while_another_rebuilds_from_it() {
    let n = nexus(vec![mem()]);
    let slow = faulty();
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(20)),
        ..Default::default()
    });
    n.add_child("new", slow).unwrap();
    assert_eq!(
        n.remove_child("c0"),
        Err(NexusError::LastHealthyChild("c0".into()))
    );
    n.shutdown().await;
}

/// A child faulted during its rebuild and rejoined: the first rebuild has ended before the second starts (it went on
/// copying to the same device, and a copy it gave up on at its timeout could land after the second rebuild copied
/// there and after writes since: stale data in a child about to turn healthy).
#[tokio::test]
async fn a_rejoined_childs_earlier_rebuild_ends_before_the_next_starts() {
    let a = mem();
    a.write(0, pattern(3, SIZE as usize)).await.unwrap();
    let n = nexus(vec![a.clone()]);
    let slow = faulty();
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(20)),
        ..Default::default()
    });
    n.add_child("new", slow.clone()).unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    n.fault_child("new", "test").await.unwrap();
    slow.set_plan(FaultPlan::default());
    n.rejoin_child("new", slow.clone()).await.unwrap();
    let h = n.rebuild_history();
    assert!(
        h.len() == 1 && h[0].error.is_some(),
        "the first rebuild still ran when the second started: {h:?}"
    );
    wait_rebuilds(&n, 2).await;
    assert_eq!(n.state(), NexusState::Online);
    assert_eq!(
        slow.read(0, SIZE).await.unwrap(),
        a.read(0, SIZE).await.unwrap()
    );
}

/// Random overlapping writes run during the whole rebuild; afterwards every child must be byte-identical. The new
/// child answers slowly (as a remote one does), so a write that lands between the rebuild's read of a segment and
/// its write of that segment would leave stale data behind if the segment were not locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_concurrent_writes_leaves_identical_children() {
    const HOT: u64 = 2 << 20; // writers hammer the first 32 segments
    let a = mem();
    let b = mem();
    // The copy takes at least 200 ms (a rate limit), so that the writers overlap it however busy the machine is.
    let mut cfg = config();
    cfg.rebuild.rate_limit = Some(SIZE * 5);
    let named = vec![("c0".to_string(), a.clone()), ("c1".to_string(), b.clone())];
    let n = Nexus::new("vol", named, cfg).unwrap();
    n.write(0, pattern(9, SIZE as usize)).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (n, stop) = (n.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut x = w + 1;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let blocks = 1 + (x >> 60);
                let off = ((x >> 20) % (HOT / 512 - blocks)) * 512;
                n.write(off, pattern((x >> 8) as u8, (blocks * 512) as usize))
                    .await
                    .unwrap();
                // Memory children complete at once; a real host's writes arrive through a socket and yield.
                tokio::task::yield_now().await;
            }
        }));
    }
    let slow = faulty();
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_micros(300)),
        ..Default::default()
    });
    n.add_child("c2", slow.clone()).unwrap();
    assert_eq!(n.state(), NexusState::Degraded);
    wait_online(&n).await;
    let during = n.list()[2].counters.writes.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        during > 50,
        "application writes reached the rebuilding child ({during})"
    );
    let want = a.read(0, SIZE).await.unwrap();
    assert_eq!(b.read(0, SIZE).await.unwrap(), want);
    slow.set_plan(FaultPlan::default());
    assert!(
        slow.read(0, SIZE).await.unwrap() == want,
        "rebuilt child differs"
    );
    let h = n.rebuild_history();
    assert_eq!(h.len(), 1);
    assert_eq!(
        (
            h[0].kind,
            h[0].bytes_copied + h[0].bytes_skipped,
            h[0].error.clone()
        ),
        (RebuildKind::Full, SIZE, None)
    );
}

#[tokio::test(start_paused = true)]
async fn writes_skip_a_rebuilding_child_where_the_copy_has_not_been_yet() {
    let a = mem();
    let mut cfg = config();
    cfg.rebuild.rate_limit = Some(SIZE); // a second (of paused time) for the whole copy
    let n = Nexus::new("vol", vec![("c0".to_string(), a.clone())], cfg).unwrap();
    n.write(0, pattern(1, SIZE as usize)).await.unwrap();
    let b = mem();
    n.add_child("c1", b.clone()).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let writes = || n.list()[1].counters.writes.load(Ordering::Relaxed);
    assert_eq!(n.list()[1].state(), ChildState::Rebuilding);
    let before = writes();
    // The last segment is still to be copied: the copy will bring this write over.
    n.write(SIZE - 4096, pattern(2, 4096)).await.unwrap();
    assert_eq!(
        writes(),
        before,
        "a write ahead of the copy went to the child"
    );
    // The first segment is copied: the child must get the write now.
    n.write(0, pattern(3, 4096)).await.unwrap();
    assert_eq!(writes(), before + 1);
    wait_online(&n).await;
    assert_eq!(
        b.read(0, SIZE).await.unwrap(),
        a.read(0, SIZE).await.unwrap()
    );
    assert_eq!(
        &b.read(SIZE - 4096, 4096).await.unwrap()[..],
        &pattern(2, 4096)[..]
    );
}

/// A rebuild whose destination's disk stalls fails at the I/O timeout and faults the child: the copy holds its
/// range meanwhile, and the application's writes there wait only that long. Before, the copy waited for the disk
/// with no limit, and so did every write to the range.
#[tokio::test(start_paused = true)]
async fn a_rebuild_onto_a_stalled_disk_gives_up_at_the_io_timeout_and_frees_the_range() {
    let n = nexus(vec![mem()]);
    let stalled = faulty();
    stalled.set_plan(FaultPlan {
        latency: Some(Duration::from_secs(3600)),
        ..Default::default()
    });
    n.add_child("stalled", stalled).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let io_timeout = config().io_timeout;
    tokio::time::timeout(10 * io_timeout, n.write(0, pattern(1, 4096)))
        .await
        .expect("a write waited for a stalled rebuild's range")
        .unwrap();
    assert_eq!(n.list()[1].state(), ChildState::Faulted);
    assert_eq!(n.read(0, 4096).await.unwrap(), pattern(1, 4096));
}

#[tokio::test]
async fn a_rebuild_whose_destination_fails_faults_the_child_and_records_why() {
    let n = nexus(vec![mem()]);
    let bad = faulty();
    bad.set_plan(FaultPlan {
        fail_after: Some(3),
        ..Default::default()
    });
    n.add_child("bad", bad).unwrap();
    for _ in 0..400 {
        if !n.rebuild_history().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let h = n.rebuild_history();
    assert_eq!(h.len(), 1);
    assert!(
        h[0].error.as_deref().unwrap_or("").contains("destination"),
        "{h:?}"
    );
    assert_eq!(n.children()[1].state, ChildState::Faulted);
    assert_eq!(n.state(), NexusState::Degraded);
}

/// Two overlapping writes in flight at once: the slow child would finish them in the opposite order from the fast
/// one if they were not serialized, leaving replicas that disagree.
#[tokio::test]
async fn overlapping_writes_reach_every_child_in_the_same_order() {
    let fast = mem();
    let slow = faulty();
    let n = nexus(vec![fast.clone(), slow.clone()]);
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(50)),
        ..Default::default()
    });
    let n1 = n.clone();
    let first = tokio::spawn(async move { n1.write(0, pattern(1, 4096)).await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(1)),
        ..Default::default()
    });
    n.write(0, pattern(2, 4096)).await.unwrap();
    first.await.unwrap().unwrap();
    slow.set_plan(FaultPlan::default());
    assert_eq!(fast.read(0, 4096).await.unwrap(), pattern(2, 4096));
    assert_eq!(
        slow.read(0, 4096).await.unwrap(),
        pattern(2, 4096),
        "replicas disagree"
    );
}

async fn wait_rebuilds(n: &Nexus, count: usize) {
    for _ in 0..2000 {
        if n.rebuild_history().len() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("rebuild did not finish: {:?}", n.children());
}

/// The child is away while about 1 % of the volume is rewritten; coming back, only that is copied.
#[tokio::test]
async fn a_child_back_within_the_window_copies_only_what_it_missed() {
    let (a, b, c) = (mem(), mem(), faulty());
    let n = nexus(vec![a.clone(), b.clone(), c.clone()]);
    n.write(0, pattern(1, SIZE as usize)).await.unwrap();
    // Flushed: what the child had not flushed when it went away would be copied too.
    n.flush().await.unwrap();
    c.set_plan(FaultPlan {
        fail_after: Some(0),
        reads_too: true,
        ..Default::default()
    });
    // About 1 % of 16 MiB (164 KiB) in three places; the last spans three 64 KiB segments.
    for (off, len) in [
        (0u64, 4096usize),
        (5 << 20, 64 << 10),
        ((9 << 20) + (60 << 10), 96 << 10),
    ] {
        n.write(off, pattern(2, len)).await.unwrap();
    }
    assert_eq!(n.state(), NexusState::Degraded);
    c.set_plan(FaultPlan::default());
    assert_eq!(
        n.rejoin_child("c2", c.clone()).await.unwrap(),
        RebuildKind::Partial
    );
    wait_online(&n).await;
    let h = n.rebuild_history();
    assert_eq!(h[0].kind, RebuildKind::Partial);
    assert_eq!(
        h[0].bytes_copied,
        5 * (64 << 10),
        "segments 0, 80 and 144..=146 only"
    );
    let want = a.read(0, SIZE).await.unwrap();
    assert_eq!(b.read(0, SIZE).await.unwrap(), want);
    assert_eq!(c.read(0, SIZE).await.unwrap(), want);
}

/// A child whose disk stops answering during a snapshot fails the snapshot within the child I/O timeout, and the
/// volume's writes (held while it quiesces) go on: before, the snapshot waited on the child for as long as it
/// stalled, holding every write.
#[tokio::test]
async fn a_snapshot_on_a_stalled_child_fails_in_time_and_writes_go_on() {
    let (a, b) = (mem(), faulty());
    let n = nexus(vec![a.clone(), b.clone()]);
    n.write(0, pattern(1, 4096)).await.unwrap();
    b.set_plan(FaultPlan {
        latency: Some(Duration::from_secs(3600)),
        ..Default::default()
    });
    let snap = tokio::time::timeout(Duration::from_secs(10), n.snapshot(uuid::Uuid::new_v4()))
        .await
        .expect("the snapshot ends within the child timeout");
    assert!(snap.is_err(), "{snap:?}");
    // The stalled child times out on this write and is faulted; the write is acknowledged by the other.
    tokio::time::timeout(Duration::from_secs(10), n.write(0, pattern(2, 4096)))
        .await
        .expect("writes go on")
        .unwrap();
    assert_eq!(n.read(0, 4096).await.unwrap(), pattern(2, 4096));
}

/// A write whose caller is gone while a child still has it (the connection ended and the grace for commands in
/// flight ran out) may have reached some children and not others: the nexus's end is unclean, so the next nexus
/// resyncs them. Before, the nexus learnt nothing of it and ended clean.
#[tokio::test]
async fn a_write_dropped_while_a_child_has_it_makes_the_end_unclean() {
    let (a, b) = (mem(), faulty());
    let n = nexus(vec![a.clone(), b.clone()]);
    b.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(500)),
        ..Default::default()
    });
    let dropped = tokio::time::timeout(Duration::from_millis(100), n.write(0, pattern(1, 4096)));
    assert!(dropped.await.is_err(), "still with b when dropped");
    assert_eq!(
        a.read(0, 4096).await.unwrap(),
        pattern(1, 4096),
        "a took it"
    );
    b.set_plan(FaultPlan::default());
    assert!(
        !n.shutdown().await,
        "the children may differ: not a clean end"
    );
}

/// A child away when a write is dropped half-sent misses what the others may hold: its rejoin copies that range too.
#[tokio::test]
async fn a_write_dropped_half_sent_is_copied_to_a_child_that_was_away_when_it_rejoins() {
    let (a, b, c) = (mem(), faulty(), faulty());
    let n = nexus(vec![a.clone(), b.clone(), c.clone()]);
    n.write(0, pattern(1, SIZE as usize)).await.unwrap();
    n.flush().await.unwrap();
    c.set_plan(FaultPlan {
        fail_after: Some(0),
        reads_too: true,
        ..Default::default()
    });
    n.write(0, pattern(2, 4096)).await.unwrap();
    assert_eq!(n.state(), NexusState::Degraded);
    b.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(500)),
        ..Default::default()
    });
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        n.write(5 << 20, pattern(3, 4096)),
    );
    assert!(dropped.await.is_err(), "still with b when dropped");
    b.set_plan(FaultPlan::default());
    c.set_plan(FaultPlan::default());
    assert_eq!(
        n.rejoin_child("c2", c.clone()).await.unwrap(),
        RebuildKind::Partial
    );
    wait_online(&n).await;
    assert_eq!(
        n.rebuild_history()[0].bytes_copied,
        2 * (64 << 10),
        "segment 0 (the write c missed) and segment 80 (the one dropped half-sent)"
    );
}

#[tokio::test]
async fn a_child_back_after_the_window_is_rebuilt_in_full() {
    let (a, c) = (mem(), faulty());
    let mut cfg = config();
    cfg.partial_rebuild_window = Duration::ZERO;
    let n = Nexus::new(
        "vol",
        vec![
            ("c0".into(), a.clone()),
            ("c1".into(), c.clone() as Arc<dyn BlockDevice>),
        ],
        cfg,
    )
    .unwrap();
    c.set_plan(FaultPlan {
        fail_after: Some(0),
        ..Default::default()
    });
    n.write(0, pattern(3, 4096)).await.unwrap();
    c.set_plan(FaultPlan::default());
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        n.rejoin_child("c1", c.clone()).await.unwrap(),
        RebuildKind::Full
    );
    wait_rebuilds(&n, 1).await;
    let r = &n.rebuild_history()[0];
    assert_eq!(r.bytes_copied + r.bytes_skipped, SIZE);
    assert_eq!(
        c.read(0, SIZE).await.unwrap(),
        a.read(0, SIZE).await.unwrap()
    );
}

#[tokio::test]
async fn a_child_faulted_during_its_rebuild_needs_a_full_one() {
    let n = nexus(vec![mem()]);
    let c = faulty();
    c.set_plan(FaultPlan {
        fail_after: Some(2),
        ..Default::default()
    });
    n.add_child("new", c.clone()).unwrap();
    wait_rebuilds(&n, 1).await;
    assert_eq!(n.children()[1].state, ChildState::Faulted);
    c.set_plan(FaultPlan::default());
    assert_eq!(
        n.rejoin_child("new", c.clone()).await.unwrap(),
        RebuildKind::Full
    );
    wait_online(&n).await;
}

#[tokio::test]
async fn only_faulted_children_rejoin() {
    let n = nexus(vec![mem(), mem()]);
    assert_eq!(
        n.rejoin_child("c1", mem()).await,
        Err(NexusError::DuplicateChild("c1".into()))
    );
    assert_eq!(
        n.rejoin_child("zz", mem()).await,
        Err(NexusError::NoSuchChild("zz".into()))
    );
}

#[tokio::test]
async fn the_last_healthy_child_is_never_removed() {
    let bad = faulty();
    let n = nexus(vec![mem(), bad.clone()]);
    bad.set_plan(FaultPlan {
        fail_after: Some(0),
        ..Default::default()
    });
    n.write(0, pattern(7, 512)).await.unwrap();
    assert_eq!(
        n.remove_child("c0"),
        Err(NexusError::LastHealthyChild("c0".into())),
        "only faulted ones would be left"
    );
    n.remove_child("c1").unwrap();
    assert_eq!(
        n.remove_child("c0"),
        Err(NexusError::LastHealthyChild("c0".into())),
        "nor as the only child"
    );
    assert_eq!(n.state(), NexusState::Online);
}

/// A child whose store is full: writes fail with `NoSpace` past the first megabyte.
struct Full(Arc<dyn BlockDevice>);

#[async_trait::async_trait]
impl BlockDevice for Full {
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
        if offset >= 1 << 20 {
            return Err(BlockError::NoSpace);
        }
        self.0.write(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.0.write_zeroes(offset, len).await
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.0.deallocate(offset, len).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.0.flush().await
    }
}

#[tokio::test]
async fn a_volume_whose_replicas_are_all_full_fails_writes_without_faulting_them() {
    let n = nexus(vec![Arc::new(Full(mem())), Arc::new(Full(mem()))]);
    let e = n.write(2 << 20, pattern(1, 4096)).await.unwrap_err();
    assert!(matches!(e, BlockError::NoSpace), "{e:?}");
    assert_eq!(n.state(), NexusState::Online);
    n.write(0, pattern(2, 4096)).await.unwrap();
    assert_eq!(n.read(0, 4096).await.unwrap(), pattern(2, 4096));

    // Only one replica full: it misses the data, so it is faulted and the write succeeds on the other.
    let n = nexus(vec![mem(), Arc::new(Full(mem()))]);
    n.write(2 << 20, pattern(3, 4096)).await.unwrap();
    assert_eq!(n.state(), NexusState::Degraded);
}

/// Every healthy child is out of space for a write that a rebuilding child, past the copy there, took: the write
/// fails with Capacity Exceeded and no healthy child is faulted, but the rebuilding child, which now holds what the
/// others refused, is faulted rather than brought online differing from them. Before, its rebuild went on and it
/// turned healthy with that write: reads of the range depended on the child that served them.
#[tokio::test(start_paused = true)]
async fn a_write_every_healthy_child_refuses_for_space_faults_a_rebuilding_child_that_took_it() {
    let a: Arc<dyn BlockDevice> = Arc::new(Full(mem()));
    let mut cfg = config();
    cfg.rebuild.rate_limit = Some(SIZE); // a second (of paused time) for the whole copy
    let n = Nexus::new("vol", vec![("c0".to_string(), a.clone())], cfg).unwrap();
    n.add_child("c1", mem()).unwrap();
    // A fifth of the copy is done: the segment at 1 MiB is copied, the child takes writes there.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(n.list()[1].state(), ChildState::Rebuilding);
    let e = n.write(1 << 20, pattern(2, 4096)).await.unwrap_err();
    assert!(matches!(e, BlockError::NoSpace), "{e:?}");
    assert_eq!(n.list()[0].state(), ChildState::Healthy);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        n.list()[1].state(),
        ChildState::Faulted,
        "the child holding a write the healthy one refused was not faulted"
    );
}

/// A holder whose pool journal stalls while the disk's data path goes on: the write takes what the healthy child
/// holds, but the record of what the faulted one missed cannot be kept. The write fails at the I/O timeout (its log
/// would be incomplete) instead of holding its range until the journal answers. Before, it waited with no limit.
#[tokio::test(start_paused = true)]
async fn a_write_whose_missed_record_cannot_be_kept_fails_at_the_io_timeout() {
    let failing = faulty();
    let stalled = Arc::new(Recording::new(mem(), Vec::new(), Notes::Stall));
    let n = nexus(vec![stalled, failing.clone()]);
    failing.set_plan(FaultPlan {
        fail_after: Some(0),
        ..Default::default()
    });
    let io_timeout = config().io_timeout;
    let r = tokio::time::timeout(10 * io_timeout, n.write(0, pattern(1, 4096)))
        .await
        .expect("the write waited on a stalled record with no limit");
    assert!(r.is_err(), "acknowledged with its missed record not kept");
}

fn recording(records: &[(&str, u64)]) -> Arc<Recording> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let r = records
        .iter()
        .map(|(child, at)| crate::block::MissedWrites {
            child: child.to_string(),
            since_ms: now,
            ranges: vec![(*at, 4096)],
        })
        .collect();
    Arc::new(Recording::new(mem(), r, Notes::Keep))
}

#[tokio::test]
async fn a_new_nexus_rebuilds_what_trusted_records_name_and_only_that() {
    // c0 and c1 say c2 missed two segments; c2, itself behind, holds an outdated record about c1.
    let (a, b) = (recording(&[("c2", 0)]), recording(&[("c2", 5 << 20)]));
    let c = recording(&[("c1", 1 << 20)]);
    a.write(5 << 20, pattern(4, 4096)).await.unwrap();
    b.write(5 << 20, pattern(4, 4096)).await.unwrap();
    let n = nexus(vec![a.clone(), b.clone(), c.clone()]);
    let r = n.recover_missed(false).await.unwrap();
    assert_eq!(r, vec![("c2".to_string(), RebuildKind::Partial)]);
    wait_rebuilds(&n, 1).await;
    let h = n.rebuild_history();
    assert_eq!(
        (h[0].bytes_copied + h[0].bytes_skipped, h[0].error.clone()),
        (2 * (64 << 10), None)
    );
    assert_eq!(c.read(5 << 20, 4096).await.unwrap(), pattern(4, 4096));
    for d in [&a, &b, &c] {
        assert!(
            d.records.lock().unwrap().is_empty(),
            "records dropped once c2 caught up"
        );
    }
    // Every child named by a trusted one is impossible to start from: refused.
    let n = nexus(vec![recording(&[("c1", 0)]), recording(&[("c0", 0)])]);
    assert_eq!(
        n.recover_missed(false).await,
        Err(NexusError::NoHealthyChild)
    );
}

#[tokio::test]
async fn after_an_unclean_end_every_child_but_the_first_in_sync_one_is_rebuilt_from_it_in_full() {
    // A write was in flight when the earlier nexus died: it reached c1 and c2 but not c0. c1 records that c2 missed
    // a later segment. Unclean: c0 (first, in sync) is the source; c1 and c2 (named, but it took writes while it
    // was rebuilt) are rebuilt from it in full.
    let (a, b, c) = (
        recording(&[]),
        recording(&[("c2", 1 << 20)]),
        recording(&[]),
    );
    a.write(0, pattern(1, 4096)).await.unwrap();
    for d in [&b, &c] {
        d.write(0, pattern(2, 4096)).await.unwrap();
    }
    let n = nexus(vec![a.clone(), b.clone(), c.clone()]);
    let mut r = n.recover_missed(true).await.unwrap();
    r.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        r,
        vec![
            ("c1".to_string(), RebuildKind::Full),
            ("c2".to_string(), RebuildKind::Full)
        ]
    );
    wait_rebuilds(&n, 2).await;
    assert!(n.rebuild_history().iter().all(|h| h.error.is_none()));
    for d in [&b, &c] {
        assert_eq!(
            d.read(0, 4096).await.unwrap(),
            pattern(1, 4096),
            "the copies agree with the source"
        );
    }
    // A clean end leaves the in-sync children as they are.
    let n = nexus(vec![recording(&[]), recording(&[])]);
    assert_eq!(n.recover_missed(false).await.unwrap(), vec![]);
}

#[tokio::test]
async fn shutdown_waits_for_the_writes_in_flight_and_refuses_new_ones() {
    let slow = faulty();
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(200)),
        ..Default::default()
    });
    let fast = mem();
    let n = nexus(vec![fast.clone(), slow.clone()]);
    let w = tokio::spawn({
        let n = n.clone();
        async move { n.write(0, pattern(7, 4096)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(n.shutdown().await, "drained");
    // The write that was in flight reached both children before shutdown returned: they agree.
    slow.set_plan(FaultPlan::default());
    assert_eq!(slow.read(0, 4096).await.unwrap(), pattern(7, 4096));
    assert_eq!(fast.read(0, 4096).await.unwrap(), pattern(7, 4096));
    assert!(w.await.unwrap().is_ok());
    assert!(matches!(
        n.write(0, pattern(8, 4096)).await,
        Err(BlockError::Relocated(_))
    ));
}

/// A child that answers writes (and reads too, when `.1`: an Exclusive Access reservation) with a reservation
/// conflict: another nexus preempted this one.
struct Preempted(Arc<dyn BlockDevice>, bool);

#[async_trait::async_trait]
impl BlockDevice for Preempted {
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.0.num_blocks()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        if self.1 {
            return Err(BlockError::ReservationConflict);
        }
        self.0.read(offset, len).await
    }
    async fn write(&self, _: u64, _: Bytes) -> Result<(), BlockError> {
        Err(BlockError::ReservationConflict)
    }
    async fn write_zeroes(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Err(BlockError::ReservationConflict)
    }
    async fn deallocate(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Err(BlockError::ReservationConflict)
    }
    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
}

/// Counts what a nexus says when a newer one fenced it.
#[derive(Debug, Default)]
struct FenceCount(AtomicUsize);

impl crate::nexus::Fenced for FenceCount {
    fn fenced(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A nexus a newer one preempted, whose next I/O is a read: its children refuse it (Exclusive Access), and the
/// nexus stops as a write would stop it, instead of taking the conflict for a read error (retried on another
/// child, counted against the child) or serving data older than the newer nexus's writes.
#[tokio::test]
async fn a_nexus_preempted_by_a_newer_one_stops_at_its_first_read() {
    let told = Arc::new(FenceCount::default());
    let config = NexusConfig {
        on_fenced: Some(told.clone()),
        ..config()
    };
    let preempted = || Arc::new(Preempted(mem(), true)) as Arc<dyn BlockDevice>;
    let children = vec![
        ("c0".to_string(), preempted()),
        ("c1".to_string(), preempted()),
    ];
    let n = Nexus::new("vol", children, config).unwrap();
    assert!(matches!(
        n.read(0, 4096).await,
        Err(BlockError::Relocated(_))
    ));
    assert_eq!(n.state(), NexusState::Shutdown);
    assert!(n.list().iter().all(|c| c.state() == ChildState::Healthy));
    assert_eq!(told.0.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_nexus_preempted_by_a_newer_one_stops_writing_at_once() {
    let local = mem();
    let told = Arc::new(FenceCount::default());
    let config = NexusConfig {
        on_fenced: Some(told.clone()),
        ..config()
    };
    let children = vec![
        ("c0".to_string(), local.clone()),
        (
            "c1".to_string(),
            Arc::new(Preempted(mem(), false)) as Arc<dyn BlockDevice>,
        ),
    ];
    let n = Nexus::new("vol", children, config).unwrap();
    // The host gets a path error (its kernel retries on the new nexus), never the conflict (an I/O error to the
    // application), and the engine is told once, to take the nexus off the fabric.
    assert!(matches!(
        n.write(0, pattern(1, 4096)).await,
        Err(BlockError::Relocated(_))
    ));
    assert_eq!(n.state(), NexusState::Shutdown);
    assert!(
        n.list().iter().all(|c| c.state() == ChildState::Healthy),
        "no child is at fault"
    );
    assert!(matches!(
        n.write(4096, pattern(2, 4096)).await,
        Err(BlockError::Relocated(_))
    ));
    assert!(matches!(
        n.read(0, 4096).await,
        Err(BlockError::Relocated(_))
    ));
    assert_eq!(told.0.load(Ordering::SeqCst), 1);
    assert!(
        local
            .read(4096, 4096)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0)
    );
}

/// A memory child whose size can grow, as a pool replica's does.
struct Growable(MemoryDevice, std::sync::atomic::AtomicU64);

impl Growable {
    fn new(size: u64) -> Arc<Growable> {
        Arc::new(Growable(
            MemoryDevice::new(64 << 20, 512),
            std::sync::atomic::AtomicU64::new(size),
        ))
    }
    fn grow(&self, size: u64) {
        self.1.store(size, Ordering::Release);
    }
}

#[async_trait::async_trait]
impl BlockDevice for Growable {
    fn block_size(&self) -> u32 {
        512
    }
    fn num_blocks(&self) -> u64 {
        self.1.load(Ordering::Acquire) / 512
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        crate::block::check_range(offset, len, 512, self.size_bytes())?;
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        crate::block::check_range(offset, data.len() as u64, 512, self.size_bytes())?;
        self.0.write(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        crate::block::check_range(offset, len, 512, self.size_bytes())?;
        self.0.write_zeroes(offset, len).await
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        crate::block::check_range(offset, len, 512, self.size_bytes())?;
        self.0.deallocate(offset, len).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_nexus_grows_once_every_healthy_child_has_and_never_shrinks() {
    const OLD: u64 = 4 << 20;
    const NEW: u64 = (8 << 20) + 4096;
    let kids = [Growable::new(OLD), Growable::new(OLD), Growable::new(OLD)];
    let n = nexus(kids.iter().map(|v| v.clone() as _).collect());
    n.write(OLD - 4096, pattern(1, 4096)).await.unwrap();

    for (i, v) in kids.iter().enumerate() {
        let e = n.grow(NEW).await.unwrap_err();
        assert!(
            matches!(&e, NexusError::ChildNotGrown { name, .. } if *name == format!("c{i}")),
            "{e}"
        );
        v.grow(NEW);
    }
    assert_eq!(
        n.size_bytes(),
        OLD,
        "nothing changes until every child grew"
    );
    assert!(n.grow(NEW).await.unwrap());
    assert_eq!(n.size_bytes(), NEW);
    n.write(NEW - 4096, pattern(2, 4096)).await.unwrap();
    for v in &kids {
        assert_eq!(v.read(OLD - 4096, 4096).await.unwrap(), pattern(1, 4096));
        assert_eq!(v.read(NEW - 4096, 4096).await.unwrap(), pattern(2, 4096));
    }
    assert!(
        !n.grow(NEW).await.unwrap(),
        "the same size again is a no-op"
    );
    for bad in [OLD, NEW + 100, 0] {
        let e = n.grow(bad).await.unwrap_err();
        assert!(matches!(e, NexusError::BadSize { .. }), "{bad}: {e}");
    }
    assert_eq!(n.state(), NexusState::Online);
}

#[tokio::test]
async fn writes_beyond_the_old_end_are_logged_for_a_child_faulted_before_the_growth() {
    const OLD: u64 = 4 << 20;
    const NEW: u64 = 8 << 20;
    let kids = [Growable::new(OLD), Growable::new(OLD), Growable::new(OLD)];
    let c = Arc::new(FaultDevice::new(kids[2].clone()));
    let n = nexus(vec![kids[0].clone(), kids[1].clone(), c.clone()]);
    n.write(0, pattern(1, OLD as usize)).await.unwrap();
    n.flush().await.unwrap();
    c.set_plan(FaultPlan {
        fail_after: Some(0),
        reads_too: true,
        ..Default::default()
    });
    n.write(0, pattern(2, 4096)).await.unwrap();
    assert_eq!(n.state(), NexusState::Degraded);

    for v in &kids {
        v.grow(NEW);
    }
    assert!(
        n.grow(NEW).await.unwrap(),
        "a faulted child does not hold growth up"
    );
    n.write(NEW - (64 << 10), pattern(3, 64 << 10))
        .await
        .unwrap();

    c.set_plan(FaultPlan::default());
    assert_eq!(
        n.rejoin_child("c2", c.clone()).await.unwrap(),
        RebuildKind::Partial
    );
    wait_online(&n).await;
    assert_eq!(
        n.rebuild_history()[0].bytes_copied,
        2 * (64 << 10),
        "the first segment and the last one, beyond the old end"
    );
    let want = kids[0].read(0, NEW).await.unwrap();
    for v in &kids[1..] {
        assert_eq!(v.read(0, NEW).await.unwrap(), want);
    }
}

#[tokio::test]
async fn a_nexus_without_a_healthy_child_does_not_grow() {
    const OLD: u64 = 4 << 20;
    let kid = Growable::new(OLD);
    let c = Arc::new(FaultDevice::new(kid.clone()));
    let n = nexus(vec![c.clone()]);
    c.set_plan(FaultPlan {
        fail_after: Some(0),
        reads_too: true,
        ..Default::default()
    });
    assert!(n.write(0, pattern(2, 4096)).await.is_err());
    // No child to say the size is there: nothing grows (a size like this would have sized the maps at 2 TiB).
    let e = n.grow(!511).await.unwrap_err();
    assert!(matches!(e, NexusError::NoHealthyChild), "{e}");
    assert_eq!(n.size_bytes(), OLD);
}

/// A nexus keeps its latest rebuilds in full, not every one it ever finished (each Nexus reply of the engine API
/// carries them: after tens of thousands the reply outgrew what the cluster agent decodes, and healing stopped on
/// the node), while its totals count them all.
#[tokio::test]
async fn a_nexus_keeps_its_latest_rebuilds_and_counts_them_all() {
    let b = mem();
    let n = nexus(vec![mem(), b.clone()]);
    let rounds = super::HISTORY_KEPT as u64 + 6;
    for i in 0..rounds {
        n.fault_child("c1", "restarted").await.unwrap();
        n.rejoin_child("c1", b.clone()).await.unwrap();
        for _ in 0..2000 {
            if n.rebuild_totals().total() > i {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(n.rebuild_history().len(), super::HISTORY_KEPT);
    let totals = n.rebuild_totals();
    assert_eq!(totals.total(), rounds);
    assert_eq!(totals.within[super::DURATION_BOUNDS.len() - 1], rounds);
}

/// A child that joined to be rebuilt and was faulted before its rebuild started (a write sent to it in between failed
/// there, and was acknowledged without it) is not rebuilt from the map it joined with: that map does not name the
/// write, and no log of a child that was not complete does. Before, starting the rebuild made it Rebuilding again,
/// and it turned healthy without that write.
#[tokio::test]
async fn a_child_faulted_before_its_rebuild_starts_is_not_rebuilt() {
    use crate::rebuild::{Progress, SegmentMap};
    let c = child::Child::new(
        "late".into(),
        mem(),
        child::ChildState::Rebuilding,
        (SIZE, 1 << 20),
    );
    assert!(c.fault("a write failed there"));
    let map = SegmentMap::full(SIZE, 1 << 20);
    let started = c.start_rebuild(
        Arc::new(Progress::new(&map)),
        tokio_util::sync::CancellationToken::new(),
        || tokio::spawn(async {}),
    );
    assert!(!started);
    assert_eq!(c.state(), child::ChildState::Faulted);
}
