//! Crash-consistent snapshots of a volume: quiesce the nexus (the whole-device lock waits for writes in flight
//! and holds new ones), flush every healthy child, snapshot each of them under the same name, resume. The
//! snapshots hold exactly the writes completed before the call, on every replica. Each child's flush and snapshot
//! is bounded by the child I/O timeout, as any I/O under a range lock is: a child whose disk stopped answering
//! fails the snapshot rather than hold every write of the volume for as long as it stalls.

use futures_util::future::join_all;

use super::{Nexus, NexusError};
use crate::block::BlockError;

impl Nexus {
    /// Snapshots every healthy child as `id`; returns their names. Rebuilding children are not consistent yet and
    /// are left out.
    pub async fn snapshot(&self, id: uuid::Uuid) -> Result<Vec<String>, NexusError> {
        let _quiet = self.quiesce().await?;
        let failed = |name: &str, what: &str, e: &dyn std::fmt::Display| NexusError::Snapshot {
            child: name.to_string(),
            reason: format!("{what}: {e}"),
        };
        // A child whose connection was lost and made again may have lost writes it had not flushed: its copy would
        // miss them. It is left out (unless every child lost it); its next write or read faults it. Not faulted here:
        // that asks the cluster agent, which holds the volume while it asks for this snapshot, and all of the
        // volume's I/O waits meanwhile.
        let healthy = self.healthy();
        if !healthy.is_empty() && healthy.iter().all(|c| c.lost_connection()) {
            tracing::warn!(nexus = %self.name, "every child lost its connection");
            super::child::keep_after_every_loss(&healthy.iter().collect::<Vec<_>>());
        }
        let healthy: Vec<_> = healthy
            .into_iter()
            .filter(|c| {
                let lost = c.lost_connection();
                if lost {
                    tracing::warn!(nexus = %self.name, child = %c.name, "left out of the snapshot: its connection was lost, and unflushed writes may be gone");
                }
                !lost
            })
            .collect();
        if healthy.is_empty() {
            return Err(NexusError::NoHealthyChild);
        }
        let timeout = self.config.io_timeout;
        let bounded = |r: Result<Result<(), BlockError>, _>| {
            r.unwrap_or_else(|_| Err(BlockError::Remote(format!("timed out after {timeout:?}"))))
        };
        let flushed = join_all(
            healthy
                .iter()
                .map(|c| tokio::time::timeout(timeout, c.device.flush())),
        )
        .await;
        for (c, r) in healthy.iter().zip(flushed) {
            bounded(r).map_err(|e| failed(&c.name, "flush", &e))?;
        }
        let taken = join_all(
            healthy
                .iter()
                .map(|c| tokio::time::timeout(timeout, c.device.snapshot(id))),
        )
        .await;
        for (c, r) in healthy.iter().zip(taken) {
            bounded(r).map_err(|e| failed(&c.name, "snapshot", &e))?;
        }
        tracing::info!(nexus = %self.name, snapshot = %id, children = healthy.len(), "volume snapshot taken");
        Ok(healthy.iter().map(|c| c.name.clone()).collect())
    }
}
