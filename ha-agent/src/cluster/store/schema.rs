//! The schema version of what the cluster agent keeps in the store, kept in the store itself. An agent writes its
//! version into an empty store and refuses a store written by a newer schema (an older agent must not read and
//! rewrite records it does not understand); records of an older schema are migrated by the agent that knows both,
//! before it writes anything else.

use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// Where the version is kept.
pub const SCHEMA_KEY: &str = "/keelson/schema";
/// The version this agent writes.
pub const SCHEMA_VERSION: u32 = 1;

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
