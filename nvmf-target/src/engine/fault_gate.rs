//! The engine's side of fault consent (`crate::nexus::FaultGate`): a nexus made with `confirm_faults` asks the
//! cluster agent, through the engine's [`FaultConfirmer`] (the API layer's client of the agent), before it goes on
//! without a healthy child. When the agent answers that a newer nexus replaced this one, the engine unpublishes the
//! nexus before the nexus stops: every host connection to it closes without an answer to the I/O that found the
//! failure, and the host's kernel retries that I/O on its path to the new nexus. A nexus a newer one fenced (a
//! child answered Reservation Conflict) is unpublished the same way ([`Unpublish`]).

use std::sync::Weak;

use super::{Engine, Inner};
use crate::nexus::{FaultGate, Fenced};

/// Asks the cluster agent whether a nexus may go on without a child. Implemented where the agent's client lives.
#[async_trait::async_trait]
pub trait FaultConfirmer: Send + Sync + std::fmt::Debug {
    /// `Ok`: recorded, go on. `Err(why)`: the nexus (`volume`, made with reservation `key`) was replaced. Waits,
    /// asking again, while no agent answers.
    async fn confirm(
        &self,
        volume: uuid::Uuid,
        key: u64,
        child: &str,
        reason: &str,
    ) -> Result<(), String>;
}

/// One nexus's gate.
#[derive(Debug)]
pub(super) struct NexusGate {
    pub(super) confirmer: std::sync::Arc<dyn FaultConfirmer>,
    /// Weak: the engine owns the nexus that owns this gate.
    pub(super) engine: Weak<Inner>,
    pub(super) uuid: uuid::Uuid,
    pub(super) key: u64,
}

#[async_trait::async_trait]
impl FaultGate for NexusGate {
    async fn confirm(&self, child: &str, reason: &str) -> Result<(), String> {
        tracing::warn!(nexus = %self.uuid, child, reason, "asking the cluster agent before going on without a child");
        let answer = self
            .confirmer
            .confirm(self.uuid, self.key, child, reason)
            .await;
        if let Err(why) = &answer {
            tracing::error!(nexus = %self.uuid, %why, "the cluster agent says a newer nexus replaced this one: unpublishing it");
            if let Some(inner) = self.engine.upgrade()
                && let Err(e) = (Engine { inner }).unpublish_nexus(&self.uuid)
            {
                tracing::warn!(nexus = %self.uuid, error = %e, "cannot unpublish the replaced nexus");
            }
        }
        answer
    }
}

/// Takes a fenced nexus off the fabric at once (its hosts' connections close; their kernels retry on the new
/// nexus), and tells the cluster agent that the volume changed.
#[derive(Debug)]
pub(super) struct Unpublish {
    pub(super) engine: Weak<Inner>,
    pub(super) uuid: uuid::Uuid,
}

impl Fenced for Unpublish {
    fn fenced(&self) {
        let Some(inner) = self.engine.upgrade() else {
            return;
        };
        let engine = Engine { inner };
        if let Err(e) = engine.unpublish_nexus(&self.uuid) {
            tracing::warn!(nexus = %self.uuid, error = %e, "cannot unpublish the fenced nexus");
        }
        engine.nexus_changes().mark(&self.uuid.to_string());
    }
}
