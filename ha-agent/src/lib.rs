//! Keelson's control plane (not built yet; see issue 4 onwards).
//!
//! It will hold the *cluster agent* (the registry of nodes, pools, replicas, nexuses and volumes in etcd or an
//! embedded store, and the reconcilers that place replicas, rebuild them and switch a volume's nexus over on failure)
//! and the *node agent* (watches NVMe paths on an application node and reports broken ones). It talks to `io-engine`
//! only through the engine API in the `proto` crate.
