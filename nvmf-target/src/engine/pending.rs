//! Pools of the node's configuration that are not open yet. A pool named at start (`--pool`, the config file)
//! whose disk cannot be created or imported then (missing, failing, full, another node's) does not keep the engine
//! from serving its other pools: it is left pending, listed with why ([`Engine::pending_pools`], the
//! `keelson_pool_pending` metric), and tried again in the background at growing intervals, up to a minute, until
//! it opens — a disk that shows up late, or a file system given room again, is taken without a restart.
//!
//! A retry formats a blank disk only if the disk held nothing at the first try (it was missing, or blank and
//! could not be formatted then): a disk that held a pool and is blank now (its owner destroyed it) is not made a
//! new pool behind anyone's back.
//!
//! A configuration at odds with itself or with another process is not left pending: a disk path that is not
//! absolute, a disk another process holds (a second io-engine on the node), a disk or pool name already open here
//! ([`is_conflict`]). The engine should not run so, and the binary stops with the error. A retry that meets such a
//! conflict later (a pool of that name opened meanwhile, the disk taken) stops trying, and the pool stays listed.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::pool::{PoolError, PoolObject};

use super::pools::{PoolEntry, holds_something};
use super::{Engine, EngineError};

/// The first wait before trying a pending pool again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A configured pool that is not open, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingPool {
    pub name: String,
    pub disk: String,
    /// The last attempt's error.
    pub error: String,
    pub attempts: u64,
    /// False once a conflict ended the tries.
    pub retrying: bool,
}

/// What became of a configured pool.
pub enum Configured {
    Open(PoolEntry),
    /// Not open, for this reason: tried again in the background.
    Pending(EngineError),
}

/// The configuration conflicts with itself or another process: trying again would not help.
fn is_conflict(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::DiskInUse { .. }
            | EngineError::Pool(PoolError::AlreadyExists {
                what: PoolObject::Pool(_) | PoolObject::Disk(_),
                ..
            })
    )
}

impl Engine {
    /// Opens pool `name` of the node's configuration on `disk` (creates it on a blank disk, or imports it). If
    /// that fails, the pool is left pending and tried again in the background, unless the failure is a conflict
    /// ([`is_conflict`]) or the path is not absolute, which is returned.
    pub async fn open_configured_pool(
        &self,
        name: &str,
        disk: &str,
    ) -> Result<Configured, EngineError> {
        if !Path::new(disk).is_absolute() {
            return Err(EngineError::InvalidArgument(format!(
                "disk {disk:?} must be an absolute path to a file or block device"
            )));
        }
        let e = match self.create_pool(name, disk, None, 0, 0).await {
            Ok(e) => return Ok(Configured::Open(e)),
            Err(e) if is_conflict(&e) => return Err(e),
            Err(e) => e,
        };
        let may_format = !holds_something(disk).await;
        self.set_pending(PendingPool {
            name: name.to_string(),
            disk: disk.to_string(),
            error: e.to_string(),
            attempts: 1,
            retrying: true,
        });
        let retry = self
            .clone()
            .retry_pending(name.to_string(), disk.to_string(), may_format);
        tokio::spawn(retry);
        Ok(Configured::Pending(e))
    }

    /// Configured pools not open yet.
    pub fn pending_pools(&self) -> Vec<PendingPool> {
        self.inner
            .pending_pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn set_pending(&self, p: PendingPool) {
        self.inner
            .pending_pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.name.clone(), p);
    }

    fn clear_pending(&self, name: &str) {
        self.inner
            .pending_pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    async fn retry_pending(self, name: String, disk: String, may_format: bool) {
        let mut wait = RETRY_FIRST;
        let mut attempts = 1;
        let mut last_error = None;
        loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
            if self.inner.pools_closed.load(Ordering::Acquire) {
                return;
            }
            // Opened meanwhile through the API (perhaps with another cluster size than a retry would ask).
            if self.pool(&name).is_ok() {
                self.clear_pending(&name);
                return;
            }
            attempts += 1;
            let e = match self.open_pool(&name, &disk, None, 0, 0, may_format).await {
                Ok(e) => {
                    self.clear_pending(&name);
                    let s = e.pool.stats();
                    tracing::info!(pool = %name, disk = %disk, attempts, capacity = s.capacity,
                        replicas = e.pool.volume_headers().len(), "pending pool opened");
                    return;
                }
                Err(e) => e,
            };
            let error = e.to_string();
            let retrying = !is_conflict(&e);
            if !retrying {
                tracing::error!(pool = %name, disk = %disk, error = %error,
                    "pending pool conflicts with what is open now: no more tries");
            } else if last_error.as_ref() != Some(&error) {
                // Said once per new reason, not at every attempt.
                tracing::warn!(pool = %name, disk = %disk, attempts, error = %error,
                    "pending pool still cannot be opened; trying again");
            }
            last_error = Some(error.clone());
            self.set_pending(PendingPool {
                name: name.clone(),
                disk: disk.clone(),
                error,
                attempts,
                retrying,
            });
            if !retrying {
                return;
            }
        }
    }
}
