//! Crash-consistent snapshots of a volume: quiesce the nexus (the whole-device lock waits for writes in flight
//! and holds new ones), flush every healthy child, snapshot each of them under the same name, resume. The
//! snapshots hold exactly the writes completed before the call, on every replica.

use futures_util::future::join_all;

use super::{Nexus, NexusError};

impl Nexus {
    /// Snapshots every healthy child as `id`; returns their names. Rebuilding children are not consistent yet and
    /// are left out.
    pub async fn snapshot(&self, id: uuid::Uuid) -> Result<Vec<String>, NexusError> {
        use crate::block::BlockDevice;
        let _quiet = self.lock.exclusive(0..self.size_bytes()).await;
        let healthy = self.healthy();
        if healthy.is_empty() {
            return Err(NexusError::NoHealthyChild);
        }
        let failed = |name: &str, what: &str, e: &dyn std::fmt::Display| NexusError::Snapshot {
            child: name.to_string(),
            reason: format!("{what}: {e}"),
        };
        for (c, r) in healthy
            .iter()
            .zip(join_all(healthy.iter().map(|c| c.device.flush())).await)
        {
            r.map_err(|e| failed(&c.name, "flush", &e))?;
        }
        for (c, r) in healthy
            .iter()
            .zip(join_all(healthy.iter().map(|c| c.device.snapshot(id))).await)
        {
            r.map_err(|e| failed(&c.name, "snapshot", &e))?;
        }
        tracing::info!(nexus = %self.name, snapshot = %id, children = healthy.len(), "volume snapshot taken");
        Ok(healthy.iter().map(|c| c.name.clone()).collect())
    }
}
