//! Online growth: once every child that holds the volume's data has been grown (replicas resized in their pools),
//! the nexus takes the new size. No write is in flight while the size changes, so a child faulted at that moment
//! logs its missed writes over the whole new size; reads go on. Children being rebuilt stop growth until they are
//! done (their copy covers the old size); faulted ones are left as they are: they come back through a rejoin,
//! which checks their size then.

use std::sync::atomic::Ordering;

use super::child::ChildState;
use super::{Nexus, NexusError};
use crate::block::BlockDevice;

impl Nexus {
    /// Grows the nexus to `size` bytes. `Ok(false)`: it was that size already. Shrinking is refused.
    pub async fn grow(&self, size: u64) -> Result<bool, NexusError> {
        let bs = u64::from(self.block_size);
        let bad = |why: String| Err(NexusError::BadSize { size, why });
        if size == 0 || !size.is_multiple_of(bs) {
            return bad(format!(
                "not a non-zero multiple of the {bs}-byte block size"
            ));
        }
        if size < self.size_bytes() {
            return bad(format!(
                "the volume is {} bytes and volumes never shrink",
                self.size_bytes()
            ));
        }
        if size == self.size_bytes() {
            return Ok(false);
        }
        // Ask the children first, outside the lock: a remote one answers over the network. Without a healthy child
        // there is none to say the new size is there (and a faulted one rejoins only at the nexus's size).
        if !self.list().iter().any(|c| c.state() == ChildState::Healthy) {
            return Err(NexusError::NoHealthyChild);
        }
        for c in self.list() {
            match c.state() {
                ChildState::Rebuilding => return Err(NexusError::Rebuilding(c.name.clone())),
                ChildState::Faulted => continue,
                ChildState::Healthy => {}
            }
            let got = match c.device.rescan().await {
                Ok(blocks) => blocks * bs,
                Err(e) => {
                    tracing::warn!(nexus = %self.name, child = %c.name, error = %e, "child size unknown");
                    c.device.size_bytes()
                }
            };
            if got < size {
                return Err(NexusError::ChildNotGrown {
                    name: c.name.clone(),
                    got,
                    want: size,
                });
            }
        }
        let _quiet = self.quiesce().await?;
        let old = self.size_bytes();
        if old >= size {
            return Ok(false);
        }
        let list = self.children.read().unwrap_or_else(|e| e.into_inner());
        for c in list.iter() {
            match c.state() {
                ChildState::Rebuilding => return Err(NexusError::Rebuilding(c.name.clone())),
                ChildState::Healthy if c.device.size_bytes() < size => {
                    return Err(NexusError::ChildNotGrown {
                        name: c.name.clone(),
                        got: c.device.size_bytes(),
                        want: size,
                    });
                }
                _ => {}
            }
        }
        for c in list.iter() {
            c.grow_log(size);
        }
        self.num_blocks.store(size / bs, Ordering::Release);
        drop(list);
        tracing::info!(nexus = %self.name, from = old, to = size, "nexus grew");
        Ok(true)
    }
}
