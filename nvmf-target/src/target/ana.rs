//! Asymmetric Namespace Access: the state of every ANA group as seen through every port of this target, and the
//! change counter the ANA log page reports. A group nobody set is Optimized.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::protocol::log::AnaState;

/// Highest ANA group ID (ANAGRPMAX and NANAGRPID in Identify Controller).
pub const MAX_GROUPS: u32 = 64;

#[derive(Default)]
pub struct AnaTable {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    states: HashMap<(u16, u32), (AnaState, u64)>,
    change_count: u64,
}

impl AnaTable {
    pub fn state(&self, port: u16, group: u32) -> AnaState {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.states
            .get(&(port, group))
            .map_or(AnaState::Optimized, |s| s.0)
    }

    /// State and the change count at which it was last set.
    pub fn state_with_count(&self, port: u16, group: u32) -> (AnaState, u64) {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.states
            .get(&(port, group))
            .copied()
            .unwrap_or((AnaState::Optimized, 0))
    }

    /// Sets a state; returns whether it changed.
    pub fn set(&self, port: u16, group: u32, state: AnaState) -> bool {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let old = g
            .states
            .get(&(port, group))
            .map_or(AnaState::Optimized, |s| s.0);
        if old == state {
            return false;
        }
        g.change_count += 1;
        let c = g.change_count;
        g.states.insert((port, group), (state, c));
        true
    }

    pub fn change_count(&self) -> u64 {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .change_count
    }

    /// Forgets the states of a removed port.
    pub fn remove_port(&self, port: u16) {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        g.states.retain(|(p, _), _| *p != port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_optimized_and_counts_changes() {
        let t = AnaTable::default();
        assert_eq!(t.state(1, 1), AnaState::Optimized);
        assert!(!t.set(1, 1, AnaState::Optimized));
        assert!(t.set(1, 1, AnaState::Inaccessible));
        assert_eq!(t.state(1, 1), AnaState::Inaccessible);
        assert_eq!(t.state(2, 1), AnaState::Optimized);
        assert_eq!(t.change_count(), 1);
        assert_eq!(t.state_with_count(1, 1), (AnaState::Inaccessible, 1));
    }
}
