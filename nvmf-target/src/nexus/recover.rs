//! Recovery of a volume's write log when a nexus is created: an earlier nexus of the volume (this one before a
//! restart, or one on another node) kept, on the children that took each write, what absent children missed. The
//! new nexus reads those records and rebuilds the children they name: only the recorded segments when the absence
//! is within the partial-rebuild window, everything otherwise.
//!
//! Records held by a child that is itself behind are ignored: it may hold outdated records about others. Trust
//! starts from the children nobody names and extends to named children that no trusted record names.
//!
//! After an *unclean* end of the earlier nexus (its engine killed), writes it had in flight may have reached some
//! children and not others, and no record says where (a child being rebuilt then took writes too, so even one the
//! records name may differ outside the recorded ranges). Then the first child (in the order given) that no trusted
//! record names is the source, and every other child is rebuilt from it in full: the copies agree again before
//! anyone reads them, and no acknowledged write is lost (each was on every child that took writes).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::child::{Child, ChildState, stable_key};
use super::{Nexus, NexusError, RebuildKind};
use crate::block::{BlockDevice, BlockError, MissedWrites};
use crate::rebuild::SegmentMap;

impl Nexus {
    /// Rebuilds the children that earlier records name (and, after an `unclean` end of the earlier nexus, every
    /// child but the first in-sync one, in full); returns them with the kind of rebuild each gets. Fails when every
    /// child is named (no copy is known to be complete).
    pub async fn recover_missed(
        self: &Arc<Self>,
        unclean: bool,
    ) -> Result<Vec<(String, RebuildKind)>, NexusError> {
        let list = self.list();
        let mut held: Vec<(String, Vec<MissedWrites>)> = Vec::new();
        for c in &list {
            match c.device.missed().await {
                Ok(r) if !r.is_empty() => held.push((stable_key(&c.name), r)),
                Ok(_) | Err(BlockError::Unsupported) => {}
                Err(e) => {
                    tracing::warn!(nexus = %self.name, child = %c.name, error = %e, "cannot read missed-writes records")
                }
            }
        }
        // Trust grows from the children nobody names: their records name the stale ones; a named child that turns
        // out not to be stale (only untrusted children named it) is trusted in turn.
        let named: BTreeSet<String> = held
            .iter()
            .flat_map(|(_, r)| r.iter().map(|m| m.child.clone()))
            .collect();
        let mut trusted: BTreeSet<String> = held
            .iter()
            .map(|(h, _)| h.clone())
            .filter(|h| !named.contains(h))
            .collect();
        let mut records: BTreeMap<String, MissedWrites> = BTreeMap::new();
        loop {
            records.clear();
            for (_, rs) in held.iter().filter(|(h, _)| trusted.contains(h)) {
                for m in rs {
                    records
                        .entry(m.child.clone())
                        .and_modify(|r| r.merge(m))
                        .or_insert_with(|| m.clone());
                }
            }
            let more: Vec<String> = held
                .iter()
                .map(|(h, _)| h.clone())
                .filter(|h| !trusted.contains(h) && !records.contains_key(h))
                .collect();
            if more.is_empty() || trusted.is_empty() {
                break;
            }
            trusted.extend(more);
        }
        let (stale, in_sync): (Vec<Arc<Child>>, Vec<Arc<Child>>) = list
            .iter()
            .cloned()
            .partition(|c| records.contains_key(&stable_key(&c.name)));
        if (trusted.is_empty() && !held.is_empty())
            || (!stale.is_empty() && stale.len() == list.len())
        {
            return Err(NexusError::NoHealthyChild);
        }
        // After an unclean end, every child may differ where writes were in flight: all but the first in-sync one
        // are rebuilt in full.
        let (diverged, stale): (Vec<Arc<Child>>, Vec<Arc<Child>>) = if unclean {
            (
                in_sync.into_iter().skip(1).chain(stale).collect(),
                Vec::new(),
            )
        } else {
            (Vec::new(), stale)
        };
        if stale.is_empty() && diverged.is_empty() {
            return Ok(Vec::new());
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let window = self.config.partial_rebuild_window.as_millis() as u64;
        let mut out = Vec::new();
        let full = SegmentMap::full(self.size_bytes(), self.config.rebuild.segment_size);
        let mut plan = Vec::new();
        for c in diverged {
            tracing::info!(nexus = %self.name, child = %c.name, "the earlier nexus ended uncleanly: child rebuilt in full");
            plan.push((c, full.clone(), RebuildKind::Full, 0));
        }
        for c in stale {
            let rec = &records[&stable_key(&c.name)];
            let (map, kind) = if now_ms.saturating_sub(rec.since_ms) <= window {
                let mut map =
                    SegmentMap::empty(self.size_bytes(), self.config.rebuild.segment_size);
                for (s, n) in &rec.ranges {
                    map.mark(*s, *n);
                }
                (map, RebuildKind::Partial)
            } else {
                (full.clone(), RebuildKind::Full)
            };
            plan.push((c, map, kind, rec.since_ms));
        }
        // Every child to rebuild turns Rebuilding before any copy starts: a copy picks its source among the
        // healthy children, and one still to be swapped would be a stale source.
        let mut swapped = Vec::new();
        {
            let _all = self.lock.exclusive_all().await;
            let mut list = self.children.write().unwrap_or_else(|e| e.into_inner());
            for (c, map, kind, since_ms) in plan {
                let Some(idx) = list.iter().position(|x| x.name == c.name) else {
                    continue;
                };
                let fresh = Arc::new(Child::new(
                    c.name.clone(),
                    c.device.clone(),
                    ChildState::Rebuilding,
                    self.log_geometry(),
                ));
                list[idx] = fresh.clone();
                swapped.push((fresh, map, kind, since_ms));
            }
        }
        for (child, map, kind, since_ms) in swapped {
            tracing::info!(nexus = %self.name, child = %child.name, ?kind, since_ms, "child rebuilt before it is read");
            out.push((child.name.clone(), kind));
            self.start_rebuild(child, map, kind);
        }
        Ok(out)
    }
}
