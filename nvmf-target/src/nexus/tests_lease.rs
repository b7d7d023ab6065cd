//! The read lease: a nexus fenced on its remote children serves no read from its local one once the lease is past,
//! one cut off from them holds its reads as it holds its writes, and reads within the lease ask nothing more.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::tests::{SIZE, config, mem, pattern};
use super::*;
use crate::block::{BlockDevice, BlockError};

/// Another node's replica, as a nexus reaches it: `fenced` (a newer nexus took its reservation) refuses every
/// command with a Reservation Conflict, `cut` (the link is down) fails it.
struct Remote {
    inner: Arc<dyn BlockDevice>,
    fenced: AtomicBool,
    cut: AtomicBool,
    reads: AtomicU64,
    /// Milliseconds every read takes.
    slow_ms: AtomicU64,
}

impl Remote {
    fn new() -> Arc<Remote> {
        Arc::new(Remote {
            inner: mem(),
            fenced: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            reads: AtomicU64::new(0),
            slow_ms: AtomicU64::new(0),
        })
    }

    fn check(&self) -> Result<(), BlockError> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(BlockError::ReservationConflict);
        }
        if self.cut.load(Ordering::SeqCst) {
            return Err(BlockError::Remote("the link is down".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for Remote {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        self.check()?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        let slow = self.slow_ms.load(Ordering::SeqCst);
        if slow > 0 {
            tokio::time::sleep(Duration::from_millis(slow)).await;
        }
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        self.check()?;
        self.inner.write(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check()?;
        self.inner.write_zeroes(offset, len).await
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check()?;
        self.inner.deallocate(offset, len).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.check()
    }
    fn remote(&self) -> bool {
        true
    }
}

const LEN: u64 = 64 << 10;

/// A nexus over a local child and a remote one.
fn local_and_remote(config: NexusConfig) -> (Arc<Nexus>, Arc<Remote>) {
    let remote = Remote::new();
    let n = Nexus::new(
        "vol",
        vec![("local".into(), mem()), ("remote".into(), remote.clone())],
        config,
    )
    .unwrap();
    (n, remote)
}

/// Past the read lease.
async fn lease_past() {
    tokio::time::sleep(READ_LEASE + Duration::from_millis(100)).await;
}

/// A newer nexus took the remote child's reservation and wrote there; the old nexus's node was cut off from it
/// and the cluster, and its local replica (which the newer nexus could not reach) still holds the data before that
/// write. Past the lease, no read returns it: the old nexus asks its remote child first, meets the conflict and
/// stops. Before, round-robin reads were served from the local replica: data older than an acknowledged write.
#[tokio::test]
async fn a_nexus_fenced_on_its_remote_child_serves_no_stale_read_from_its_local_one() {
    let (n, remote) = local_and_remote(config());
    n.write(0, pattern(1, LEN as usize)).await.unwrap();
    remote.fenced.store(true, Ordering::SeqCst);
    remote
        .inner
        .write(0, pattern(2, LEN as usize))
        .await
        .unwrap();
    lease_past().await;
    for _ in 0..6 {
        if let Ok(d) = n.read(0, LEN).await {
            assert_ne!(
                d,
                pattern(1, LEN as usize),
                "a read older than the newer nexus's write"
            );
        }
    }
    assert_eq!(n.state(), NexusState::Shutdown, "fenced: stopped");
}

/// Cut off from its remote child and from the cluster agent, a nexus holds its reads past the lease (its writes wait
/// for the agent's consent to fault the child too): the agent may have a newer nexus writing there already.
#[tokio::test]
async fn a_nexus_cut_off_from_its_remote_child_holds_reads_past_the_lease() {
    let mut cfg = config();
    cfg.fault_gate = Some(Arc::new(super::tests_unflushed::NeverAnswers));
    let (n, remote) = local_and_remote(cfg);
    n.write(0, pattern(1, LEN as usize)).await.unwrap();
    remote.cut.store(true, Ordering::SeqCst);
    lease_past().await;
    let held = tokio::time::timeout(Duration::from_millis(300), n.read(0, LEN)).await;
    assert!(held.is_err(), "served without a lease: {held:?}");
    n.shutdown().await;
}

/// Reads within the lease cost nothing more; the first read past it asks each remote child once.
#[tokio::test]
async fn reads_within_the_lease_ask_nothing_more() {
    let (n, remote) = local_and_remote(config());
    n.write(0, pattern(1, SIZE as usize)).await.unwrap();
    for _ in 0..4 {
        n.read(0, LEN).await.unwrap();
    }
    assert_eq!(
        remote.reads.load(Ordering::SeqCst),
        2,
        "round robin, nothing more"
    );
    lease_past().await;
    for _ in 0..2 {
        n.read(0, LEN).await.unwrap();
    }
    assert_eq!(
        remote.reads.load(Ordering::SeqCst),
        2 + 1 + 1,
        "one check, then one read of two"
    );
    assert_eq!(n.state(), NexusState::Online);
}

/// A remote child slower than the lease (its answers take longer than it): reads are still served, each once its
/// check, sent after the read's data was in hand, came back. Before, the check was made again for as long as the
/// child stayed that slow (its answer was past the lease each time), and every read of the nexus waited.
#[tokio::test]
async fn a_child_slower_than_the_lease_holds_no_read_for_ever() {
    let (n, remote) = local_and_remote(config());
    n.write(0, pattern(1, LEN as usize)).await.unwrap();
    lease_past().await;
    remote
        .slow_ms
        .store(READ_LEASE.as_millis() as u64 + 200, Ordering::SeqCst);
    let read = tokio::time::timeout(Duration::from_secs(8), async {
        for _ in 0..2 {
            assert_eq!(n.read(0, LEN).await.unwrap(), pattern(1, LEN as usize));
        }
    })
    .await;
    assert!(read.is_ok(), "reads held behind a slow child");
    assert_eq!(n.state(), NexusState::Online);
}
