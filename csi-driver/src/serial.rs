//! One call at a time per volume (or snapshot): the CSI spec lets a plugin answer ABORTED to a call on a volume
//! that already has one in flight, and the CO retries it later. Holding the key for the whole call keeps, say, a
//! DeleteVolume from racing a ControllerPublishVolume of the same volume.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Held while a call runs; frees its key when dropped.
pub struct Held {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// Takes `key`, or `ABORTED` if a call holds it.
    #[allow(clippy::result_large_err)]
    pub fn hold(&self, key: &str) -> Result<Held, tonic::Status> {
        let mut k = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if !k.insert(key.to_string()) {
            return Err(tonic::Status::aborted(format!(
                "an operation on {key} is in progress; try again"
            )));
        }
        Ok(Held {
            keys: self.keys.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_call_on_a_key_is_aborted_until_the_first_ends() {
        let f = InFlight::default();
        let a = f.hold("vol-1").unwrap();
        assert_eq!(f.hold("vol-1").err().unwrap().code(), tonic::Code::Aborted);
        let _b = f.hold("vol-2").unwrap();
        drop(a);
        assert!(f.hold("vol-1").is_ok());
    }
}
