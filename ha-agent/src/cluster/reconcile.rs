//! The one trait every reconciler implements: a pass that compares what the store records with what the engines
//! report and acts on the difference, one recorded step at a time. The leading agent runs the passes in the order
//! of [`all`], timing each for the metrics: those that say [`Reconciler::every_heartbeat`] once per heartbeat
//! interval, the others once per sweep interval and whenever a node changes state; a failed pass is logged and
//! tried again next time. Each reconciler lives in its own file, next to the records it works on:
//!
//! | reconciler | file |
//! |---|---|
//! | `node_sweep`: silent nodes probed, Offline if the probe fails | `registry` |
//! | `pools`: managed pools imported again, deletes finished | `pool` |
//! | `volume_operations`: creates and deletes resumed | `volumes` |
//! | `volume_growth`: expansions resumed | `expand` |
//! | `snapshots`: snapshots resumed, hidden ones left behind deleted | `snapshots` |
//! | `healing`: published volumes brought back to their record | `heal` |
//! | `garbage`: retired replicas destroyed | `garbage` |
//! | `stale_nexuses`: nexuses no record names destroyed | `garbage` |

use std::sync::Arc;

use async_trait::async_trait;

use super::pool::Pools;
use super::registry::Registry;
use super::volumes::Volumes;

#[async_trait]
pub trait Reconciler: Send + Sync {
    /// Its name in logs and metrics.
    fn name(&self) -> &'static str;

    /// One pass; an error says why it did not finish (the next tick tries again).
    async fn pass(&self) -> Result<(), String>;

    /// Whether it runs every heartbeat interval (cheap, and what tells a node is gone) rather than every sweep.
    fn every_heartbeat(&self) -> bool {
        false
    }
}

/// Every reconciler, in the order a tick runs them.
pub fn all(
    registry: &Arc<Registry>,
    pools: &Arc<Pools>,
    volumes: &Arc<Volumes>,
) -> Vec<Box<dyn Reconciler>> {
    vec![
        Box::new(super::registry::NodeSweep(registry.clone())),
        Box::new(super::pool::PoolReconciler(pools.clone(), volumes.clone())),
        Box::new(super::volumes::VolumeOperations(volumes.clone())),
        Box::new(super::expand::VolumeGrowth(volumes.clone())),
        Box::new(super::snapshots::SnapshotReconciler(volumes.clone())),
        Box::new(super::heal::Healing(volumes.clone())),
        Box::new(super::garbage::GarbageCollector(volumes.clone())),
        Box::new(super::garbage::StaleNexuses(volumes.clone())),
    ]
}
