//! The cluster agent.
//!
//! - [`store`]: desired and observed state, persisted: the [`store::Store`] trait and its embedded (redb) and etcd
//!   implementations and the schema version.
//! - [`leader`]: one acting agent among several on one store, by a lease-held key.
//! - [`node`]: a storage node's record (what its io-engine registered, what the agent observed).
//! - [`pool`]: pools created through the agent, recorded before the engine is asked, imported again when their
//!   node's io-engine restarts without them.
//! - [`reconcile`]: the one trait of every reconciler, and the list a tick runs.
//! - [`registry`]: registration, heartbeats, and the sweep that probes silent nodes and marks them Offline.
//! - [`scheduler`]: placement, pure (all replicas or none, one per node, least-full pool).
//! - [`room`]: what placement sees of the pools: the engines' figures at that moment less what records promise;
//!   placements serialised.
//! - [`volume`]: a volume's record (spec, replicas placed, nexus); [`volumes`]: create and delete, each stage
//!   recorded before the next engine call, and the reconciler that resumes them; [`publish`]: publish and unpublish.
//! - [`expand`]: online expansion (replicas grown in their pools, then the nexus), recorded stage by stage.
//! - [`snapshots`]: crash-consistent volume snapshots, recorded before they are taken; volumes are made from them
//!   as clones.
//! - [`heal`]: a published volume brought back to its record: faulted children retired, replacements placed,
//!   created and added to the nexus (which rebuilds them).
//! - [`child_fault`]: an engine asks before a nexus goes on without a child; only the volume's current nexus may.
//! - [`hosts`]: application nodes whose node agents registered (path reports are taken from them only).
//! - [`switchover`]: HA switch-over: a host's broken path reported, the nexus moved to another node and fenced.
//! - [`garbage`]: replicas retired and nexuses left behind, destroyed when their engine answers.
//! - [`dataplane`]: the engine API as the agent calls it (timeouts on everything).
//! - [`failpoint`]: where a test can make the agent die between two steps of an operation.
//! - [`metrics`]: the agent's Prometheus metrics and `/metrics`.
//! - [`api`]: the gRPC services (Registration for io-engines, Cluster for operators), served by the leader.
//! - [`agent`]: one agent's life: store, schema, API, leadership, registry sweep.

pub mod agent;
pub mod api;
pub mod child_fault;
pub mod dataplane;
pub mod expand;
pub mod failpoint;
pub mod garbage;
pub mod heal;
pub mod hosts;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod pool;
pub mod publish;
pub mod reconcile;
pub mod registry;
pub mod room;
pub mod scheduler;
pub mod snapshots;
pub mod store;
pub mod switchover;
pub mod volume;
pub mod volumes;
