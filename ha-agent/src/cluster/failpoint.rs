//! Failpoints: named places between the steps of a multi-step operation (after a stage is recorded, after an engine
//! call and before its result is recorded) where a test makes the agent die as `kill -9` would, to show that the
//! next agent resumes or rolls the operation back with nothing leaked. Armed only by the `FAILPOINTS` environment
//! variable in the `fail` crate's syntax, `FAILPOINTS='create.replica-created=return'` (`1*off->return`: the second
//! hit); the names are the constants below. Unarmed, a failpoint is one map lookup.

/// Each failpoint: the stage just done, and the side effect not yet recorded or started.
pub const ALL: &[&str] = &[
    CREATE_PLACED,
    CREATE_REPLICA_CREATED,
    PUBLISH_NEXUS_RECORDED,
    PUBLISH_NEXUS_CREATED,
    PUBLISH_PUBLISHED,
    PUBLISH_HOST_RECORDED,
    UNPUBLISH_HOST_DROPPED,
    UNPUBLISH_MARKED,
    HEAL_REPLICA_PLACED,
    HEAL_REPLICA_CREATED,
    HEAL_CHILD_ADDED,
    HEAL_RESTART_RECORDED,
    DRAIN_OLD_ENDED,
    RETIRE_CHILD_REMOVED,
    RETIRE_GARBAGE_RECORDED,
    RETIRE_DROPPED,
    DELETE_MARKED,
    DELETE_NEXUS_DESTROYED,
    DELETE_RECORD_DROPPED,
    POOL_DELETE_MARKED,
    SNAPSHOT_RECORDED,
    SNAPSHOT_TAKEN,
    SWITCHOVER_REPORTED,
    SWITCHOVER_OLD_ENDED,
    EXPAND_RECORDED,
    EXPAND_REPLICA_GROWN,
    EXPAND_NEXUS_GROWN,
];

/// The placement is recorded (phase Creating); no replica asked for.
pub const CREATE_PLACED: &str = "create.placed";
/// An engine created a replica; the record does not say so yet.
pub const CREATE_REPLICA_CREATED: &str = "create.replica-created";
/// A nexus with a new reservation key is recorded; the engine not asked.
pub const PUBLISH_NEXUS_RECORDED: &str = "publish.nexus-recorded";
/// The engine created the nexus (holding the replicas' reservations); the fence key is not recorded.
pub const PUBLISH_NEXUS_CREATED: &str = "publish.nexus-created";
/// The engine exported the nexus; the record does not say it is published.
pub const PUBLISH_PUBLISHED: &str = "publish.published";
/// Another host of a shared volume is recorded; its nexus's engine not told to let it in.
pub const PUBLISH_HOST_RECORDED: &str = "publish.host-recorded";
/// One host of a shared volume is dropped from the record; its nexus's engine not told to refuse it.
pub const UNPUBLISH_HOST_DROPPED: &str = "unpublish.host-dropped";
/// An unpublish recorded its nexus as no longer published; the engine not asked to end it.
pub const UNPUBLISH_MARKED: &str = "unpublish.marked";
/// A new replica (scale up or replacement) is placed and recorded; not created.
pub const HEAL_REPLICA_PLACED: &str = "heal.replica-placed";
/// An engine created the new replica; the record does not say so yet.
pub const HEAL_REPLICA_CREATED: &str = "heal.replica-created";
/// The nexus took the new replica as a child (and rebuilds it).
pub const HEAL_CHILD_ADDED: &str = "heal.child-added";
/// A surplus replica (a scale down) is recorded out of sync and its nexus let it go; it is still in its volume's
/// record, not recorded as garbage yet.
pub const RETIRE_CHILD_REMOVED: &str = "retire.child-removed";
/// A nexus with no healthy child is recorded to be made again from the replicas in sync (their rejoin times
/// stamped); the old one not destroyed yet.
pub const HEAL_RESTART_RECORDED: &str = "heal.restart-recorded";
/// A drain's move ended the old nexus cleanly and recorded so; the new nexus is not made yet.
pub const DRAIN_OLD_ENDED: &str = "drain.old-ended";
/// A replica being retired is recorded as garbage; it is still in its volume's record.
pub const RETIRE_GARBAGE_RECORDED: &str = "retire.garbage-recorded";
/// A retired replica is dropped from its volume's record; not destroyed yet.
pub const RETIRE_DROPPED: &str = "retire.dropped";
/// The volume is recorded as Deleting; nothing destroyed.
pub const DELETE_MARKED: &str = "delete.marked";
/// A pool's delete is recorded (phase Deleting); whether volumes hold replicas in it not asked yet.
pub const POOL_DELETE_MARKED: &str = "pool-delete.marked";
/// The engine destroyed the volume's nexus; the record still names it.
pub const DELETE_NEXUS_DESTROYED: &str = "delete.nexus-destroyed";
/// The volume's record is deleted (its replicas retired); the snapshot it was cloned from, taken for it, is
/// marked Deleting and not destroyed yet.
pub const DELETE_RECORD_DROPPED: &str = "delete.record-dropped";

/// A snapshot is recorded (Creating); no engine asked.
pub const SNAPSHOT_RECORDED: &str = "snapshot.recorded";
/// The engines took the snapshot; the record does not list its copies yet.
pub const SNAPSHOT_TAKEN: &str = "snapshot.taken";
/// A host's broken path is recorded as a switch-over; nothing moved.
pub const SWITCHOVER_REPORTED: &str = "switchover.reported";
/// The old nexus was destroyed (or found gone); the new one is not recorded yet.
pub const SWITCHOVER_OLD_ENDED: &str = "switchover.old-ended";
/// The new size is recorded (spec and growth record); no engine asked.
pub const EXPAND_RECORDED: &str = "expand.recorded";
/// An engine grew a replica; the growth record does not list it yet.
pub const EXPAND_REPLICA_GROWN: &str = "expand.replica-grown";
/// The engine grew the nexus; the growth record is not dropped yet.
pub const EXPAND_NEXUS_GROWN: &str = "expand.nexus-grown";

/// Delays, not crash points (not in [`ALL`]): armed as `name=return(ms)`, the operation waits there that long, for
/// a test to change the world (restart an engine) between two of its steps.
///
/// Every in-sync replica is shared to the new nexus's node; the engine is not asked to make the nexus yet.
pub const PUBLISH_CREATING: &str = "publish.creating";
/// A pass over one node's volumes is about to heal the next one (as an engine slow to answer makes it wait).
pub const HEAL_NODE_VOLUME: &str = "heal.node-volume";

/// Answers, not crash points (not in [`ALL`]): armed as `name=return` (or `1*off->1*return->off`: the second hit
/// only), the agent takes the answer named as what came.
///
/// The old nexus's engine is asked whether the reporting host is connected: its answer is taken as missed (the
/// call timed out).
pub const SWITCHOVER_OLD_ENGINE_SILENT: &str = "switchover.old-engine-silent";

/// Whether `name` is armed to answer at this hit.
pub fn answers(name: &str) -> bool {
    let armed = fail::eval(name, |_| ()).is_some();
    if armed {
        eprintln!("failpoint {name}: answering");
    }
    armed
}

/// Waits here for the milliseconds `name` is armed with (`name=return(ms)`); unarmed, returns at once.
pub async fn delay(name: &str) {
    if let Some(Some(ms)) = fail::eval(name, |arg| arg.and_then(|a| a.parse::<u64>().ok())) {
        eprintln!("failpoint {name}: waiting {ms} ms");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// Dies here, as `kill -9` would (no destructor, no flush, no goodbye to the store), if `name` is armed.
pub fn at(name: &str) {
    fail::fail_point!(name, |_| crash(name));
}

fn crash(name: &str) -> ! {
    eprintln!("failpoint {name}: killing the agent (SIGKILL)");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    std::process::abort()
}
