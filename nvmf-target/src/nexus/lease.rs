//! The read lease ([`READ_LEASE`], the same as the one the cluster agent waits out: a test in `api` keeps them equal).
//! A newer nexus fences this one by taking the reservations of the children it reaches; a child on this nexus's own
//! node it may not reach (the node cut off from the cluster, not dead), and this nexus would go on reading from it data
//! older than the newer nexus's writes. So a read is served only while every healthy remote child has answered,
//! successfully, a command sent less than the lease before the read ended: each such answer shows the child's
//! reservation was still this nexus's when the command was sent. A child whose latest answer is older is asked again
//! first (a one-block read); a fenced one answers with a Reservation Conflict and the nexus stops, one that fails or
//! does not answer is faulted (with the cluster agent's consent, which a nexus cut off from the agent waits for: its
//! reads are held, as its writes are). The cluster agent waits the lease out before a nexus replacing one it could not
//! end takes writes. Writes and reads renew the lease as they go; an idle volume pays one round trip to each remote
//! child for its first read after the lease.

use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::Nexus;
use super::child::{Child, ChildState};
use crate::block::BlockError;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The lease's clock: nanoseconds since the first reading in this process.
pub fn now() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

/// How long a read may be served on the strength of the children's last answers; the cluster agent waits as long
/// before a nexus replacing one it could not end takes writes.
pub const READ_LEASE: std::time::Duration = std::time::Duration::from_secs(1);

fn lease_ns() -> u64 {
    READ_LEASE.as_nanos() as u64
}

/// Whether `c` is a healthy remote child whose latest successful answer was to a command sent a lease or more
/// before `at`.
fn lapsed(c: &Child, at: u64) -> bool {
    c.device.remote()
        && at.saturating_sub(c.proof()) >= lease_ns()
        && c.state() == ChildState::Healthy
}

/// How long a check may take before its child counts as silent: a few leases, not the nexus's I/O timeout (every read
/// waits for the check, not only those sent to that child).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between checks of a child that failed one (a connection being made again).
const CHECK_AGAIN: Duration = Duration::from_millis(50);

impl Nexus {
    /// The healthy remote children whose latest successful answer was to a command sent a lease or more before `at`.
    fn lapsed(&self, at: u64) -> Vec<Arc<Child>> {
        self.list().into_iter().filter(|c| lapsed(c, at)).collect()
    }

    /// Whether a read ending now may be served: every healthy remote child answered within the lease. (Once per
    /// read: looked at in place, nothing copied.)
    fn lease_holds(&self) -> bool {
        let at = now();
        !self
            .children
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|c| lapsed(c, at))
    }

    /// Called once a read's data is in hand: `Ok` when it may be served. So it may while the lease holds; else each
    /// healthy remote child past it is asked again, by a command sent now, after the data was read: its success
    /// shows no newer nexus had fenced it then, so none had written yet either. One check at a time for the whole
    /// nexus (the reads waiting meanwhile find the lease renewed). A fenced child's conflict stops the nexus
    /// (`Err`); a child failing its check is asked again, and faulted (with consent, which a nexus cut off from
    /// the agent waits for) at the read error limit, or when it does not answer within [`CHECK_TIMEOUT`]. `Err`
    /// also when the nexus stops meanwhile.
    pub(super) async fn confirm_lease(&self) -> Result<(), BlockError> {
        if self.lease_holds() {
            return Ok(());
        }
        let _one = self.renewing.lock().await;
        let asked = now();
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return Err(self.stopped_error());
            }
            // Lapsed as of the first check: a child checked since (by this loop, or by the read that held the lock
            // before) answered a command sent after this read's data was read.
            let lapsed = self.lapsed(asked);
            if lapsed.is_empty() {
                return Ok(());
            }
            let sent = now();
            let block = u64::from(self.block_size);
            let timeout = CHECK_TIMEOUT.min(self.config.io_timeout);
            let answers = join_all(
                lapsed
                    .iter()
                    .map(|c| tokio::time::timeout(timeout, c.device.read(0, block))),
            )
            .await;
            let mut failed = false;
            for (c, a) in lapsed.iter().zip(answers) {
                match a {
                    Ok(Ok(_)) => c.note_proof(sent),
                    Ok(Err(BlockError::ReservationConflict)) => return Err(self.fenced()),
                    Ok(Err(e)) => {
                        let n = c.note_read_error();
                        if n >= self.config.read_error_limit {
                            let why =
                                format!("{n} read errors (the read lease's check), last: {e}");
                            self.fault_confirmed(c, &why, None).await?;
                        } else {
                            failed = true;
                        }
                    }
                    Err(_) => {
                        c.note_read_error();
                        let why = format!("the read lease's check timed out after {timeout:?}");
                        self.fault_confirmed(c, &why, None).await?;
                    }
                }
            }
            if failed {
                tokio::time::sleep(CHECK_AGAIN).await;
            }
        }
    }
}
