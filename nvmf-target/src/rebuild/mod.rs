//! Rebuild: copies a device's contents from a healthy source onto a new or returning destination while
//! application I/O continues. It knows block devices and range locks, never the nexus: the caller supplies the
//! sources (one picked per segment, so a source that fails is replaced), the segments to copy, and the lock that
//! application writes also take.
//!
//! - [`map::SegmentMap`]: which segments to copy (all of them, or only those written while a child was away).
//! - [`copy`]: the copy loop, its progress counters and its bandwidth limit.

pub mod copy;
pub mod map;

pub use copy::{Progress, RebuildConfig, RebuildError, RebuildStats, Source, run};
pub use map::SegmentMap;
