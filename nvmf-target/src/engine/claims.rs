//! Claims by key: one holder per key at a time, the others waiting in turn. A key nobody holds or waits for
//! takes no room. The engine claims a nexus's UUID while creating it or adding a child, so that two such calls
//! never open the same children side by side (each taking the reservation would end the other's connections),
//! and a pool operation claims its disk and its pool's name (`Engine` pool administration).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// Each key's lock, and how many claims hold or wait for it.
type Held<K> = BTreeMap<K, (Arc<tokio::sync::Mutex<()>>, usize)>;

pub struct Claims<K> {
    held: Mutex<Held<K>>,
}

impl<K> Default for Claims<K> {
    fn default() -> Self {
        Claims {
            held: Mutex::new(BTreeMap::new()),
        }
    }
}

/// Held while its key is claimed; dropping it (or the future waiting for it) lets the next waiter in.
pub struct Claim<'a, K: Ord> {
    claims: &'a Claims<K>,
    key: Option<K>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Ord + Clone> Claims<K> {
    /// Waits until `key` is free, then holds it.
    pub async fn claim(&self, key: K) -> Claim<'_, K> {
        let lock = {
            let mut map = self.map();
            let entry = map.entry(key.clone()).or_default();
            entry.1 += 1;
            entry.0.clone()
        };
        // Counted from here: a waiter that goes away uncounts itself as its claim drops.
        let mut claim = Claim {
            claims: self,
            key: Some(key),
            guard: None,
        };
        claim.guard = Some(lock.lock_owned().await);
        claim
    }

    fn map(&self) -> std::sync::MutexGuard<'_, Held<K>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

impl<K: Ord> Drop for Claim<'_, K> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let Some(key) = self.key.take() else { return };
        let mut map = self.claims.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = map.get_mut(&key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_claimed_key_waits_for_its_holder_and_is_forgotten_once_free() {
        let claims = Arc::new(Claims::default());
        let first = claims.claim(1).await;
        let other = claims.claim(2).await;
        let c = claims.clone();
        let waiter = tokio::spawn(async move {
            let _second = c.claim(1).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the key was taken twice");
        drop(first);
        waiter.await.unwrap();
        assert_eq!(claims.len(), 1, "only key 2 is still held");
        // A waiter that goes away leaves nothing behind.
        let c = claims.clone();
        let gone = tokio::spawn(async move {
            let _never = c.claim(2).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        gone.abort();
        let _ = gone.await;
        drop(other);
        assert_eq!(claims.len(), 0);
    }
}
