//! The cluster agent.
//!
//! - [`store`]: desired and observed state, persisted: the [`store::Store`] trait and its embedded (redb) and etcd
//!   implementations and the schema version.
//! - [`leader`]: one acting agent among several on one store, by a lease-held key.

pub mod leader;
pub mod store;
