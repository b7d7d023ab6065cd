//! The schema version of what the cluster agent keeps in the store, kept in the store itself. An agent writes its
//! version into an empty store and refuses a store written by a newer schema (an older agent must not read and
//! rewrite records it does not understand: it would drop their newer fields); records of an older schema are
//! migrated by the agent that knows both, before it writes anything else. A leader raises the store's version to
//! its own ([`raise`]) before it writes anything, so that an older agent that leads later (a rolling downgrade)
//! stops instead of rewriting the newer records without their newer fields.

use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// Where the version is kept.
pub const SCHEMA_KEY: &str = "/keelson/schema";
/// The version this agent writes. 2: volume records may carry fields version 1 agents do not know (the fence key,
/// resync, a switch-over, a growth, sharing, the block size); version 1 records read as version 2 ones (those fields
/// default), so no migration.
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
struct SchemaRecord {
    version: u32,
}

/// Checks (or sets, in an empty store) the schema version; returns the version the store holds.
pub async fn check(store: &dyn Store) -> Result<u32, StoreError> {
    check_supported(store, SCHEMA_VERSION).await
}

/// [`check`] for an agent that knows versions up to `supported`.
pub async fn check_supported(store: &dyn Store, supported: u32) -> Result<u32, StoreError> {
    loop {
        match store.get(SCHEMA_KEY).await? {
            Some(v) => {
                let r: SchemaRecord = serde_json::from_slice(&v.value)
                    .map_err(|e| StoreError::Corrupt(format!("{SCHEMA_KEY}: {e}")))?;
                if r.version > supported {
                    return Err(StoreError::NewerSchema {
                        found: r.version,
                        supported,
                    });
                }
                return Ok(r.version);
            }
            None => {
                let rec = serde_json::to_vec(&SchemaRecord { version: supported })
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                if store.compare_and_put(SCHEMA_KEY, 0, rec).await? {
                    return Ok(supported);
                }
                // Another agent wrote it first: read what it wrote.
            }
        }
    }
}

/// Raises the store's schema version to `to` (an older version is read by this agent as it is); [`StoreError::NewerSchema`]
/// if the store holds a newer one.
pub async fn raise(store: &dyn Store, to: u32) -> Result<(), StoreError> {
    loop {
        let (revision, found) = match store.get(SCHEMA_KEY).await? {
            Some(v) => {
                let r: SchemaRecord = serde_json::from_slice(&v.value)
                    .map_err(|e| StoreError::Corrupt(format!("{SCHEMA_KEY}: {e}")))?;
                (v.mod_revision, r.version)
            }
            None => (0, 0),
        };
        if found > to {
            return Err(StoreError::NewerSchema {
                found,
                supported: to,
            });
        }
        if found == to {
            return Ok(());
        }
        let rec = serde_json::to_vec(&SchemaRecord { version: to })
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if store.compare_and_put(SCHEMA_KEY, revision, rec).await? {
            tracing::info!(from = found, to, "schema version raised");
            return Ok(());
        }
    }
}
