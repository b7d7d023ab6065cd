//! The room a pool is promised, as the engine tells it. The cluster agent places a new replica on a pool while it
//! fits the pool's `replica_room`, so that figure leaves out what is promised already:
//! - to the pool's own replicas beyond what they hold: clusters a snapshot or a clone shares are copied on a
//!   replica's first write to them, so a replica written through and then snapshotted may take its whole size again
//!   (`PoolStats::may_take`);
//! - to other pool files on the same file system: each one's stats count the file system's whole free space, so
//!   two pools on one file system were both offered it, and replicas placed on both could need twice what it had.
//!   Each one's `disk_room` becomes its share.
//!
//! What a file system's pools are promised then fits in its free space once. Pools are grouped by
//! [`crate::block::BlockDevice::room_of`] (the file system's device number): datasets of one ZFS pool or subvolumes
//! of one btrfs file system draw on the same space under different numbers, and are not grouped.

use std::collections::BTreeMap;

use super::PoolStats;

/// What the pool's replicas may still take from the file system: what they may take in new clusters beyond the
/// pool file's own unused space.
fn from_file_system(s: &PoolStats) -> u64 {
    s.may_take.saturating_sub(s.own_room)
}

/// Makes each pool file's `disk_room` what its file system can still give it: the free space, less what the other
/// pools on it may still take ([`from_file_system`]), plus its own unused space; and each pool's `replica_room` what
/// new replicas can still be promised: its free clusters and that room, each less what its own replicas may still
/// take. Pools on a block device keep no `disk_room`; their `replica_room` is their free clusters' part.
pub fn share_disk_room(stats: &mut [PoolStats]) {
    let mut taken: BTreeMap<u64, u64> = BTreeMap::new();
    for s in stats.iter() {
        if let (Some(_), Some(fs)) = (s.disk_room, s.disk_room_of) {
            let t = taken.entry(fs).or_default();
            *t = t.saturating_add(from_file_system(s));
        }
    }
    for s in stats.iter_mut() {
        let clusters = s
            .capacity
            .saturating_sub(s.allocated)
            .saturating_sub(s.may_take);
        let Some(room) = s.disk_room else {
            s.replica_room = clusters;
            continue;
        };
        let others = s
            .disk_room_of
            .map_or(0, |fs| taken[&fs].saturating_sub(from_file_system(s)));
        let room = room.saturating_sub(others);
        s.disk_room = Some(room);
        s.replica_room = clusters.min(room.saturating_sub(s.may_take));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    /// A pool with no snapshots: its replicas may take their sizes less what it holds.
    fn pool(fs: Option<u64>, committed: u64, allocated: u64, room: u64, own: u64) -> PoolStats {
        PoolStats {
            capacity: 100 * G,
            allocated,
            committed,
            no_space_errors: 0,
            disk_full: false,
            disk_errors: 0,
            disk_room: fs.map(|_| room),
            disk_room_of: fs,
            own_room: own,
            may_take: committed.saturating_sub(allocated),
            replica_room: 0,
            applied: 0,
        }
    }

    #[test]
    fn pools_on_one_file_system_are_promised_its_free_space_once() {
        // A file system with 10 GiB free under three pool files; a fourth pool on another.
        let mut s = [
            pool(Some(1), 6 * G, 2 * G, 10 * G, 0),
            pool(Some(1), 3 * G, 0, 11 * G, G),
            pool(Some(1), 0, 0, 10 * G, 0),
            pool(Some(2), 50 * G, 0, 10 * G, 0),
        ];
        share_disk_room(&mut s);
        // The first may still take 4 GiB of the file system, the second 2 (it holds 1 of its own already).
        assert_eq!(s[0].disk_room, Some(8 * G), "10 less the second's 2");
        assert_eq!(
            s[1].disk_room,
            Some(7 * G),
            "10 less the first's 4, and its own 1"
        );
        assert_eq!(s[2].disk_room, Some(4 * G), "10 less 4 and 2");
        assert_eq!(s[3].disk_room, Some(10 * G), "alone on its file system");
        assert_eq!(s[0].replica_room, 4 * G);
        assert_eq!(s[1].replica_room, 4 * G);
        assert_eq!(s[2].replica_room, 4 * G);
        assert_eq!(
            s[3].replica_room, 0,
            "its 50 GiB replica may take more than the 10 free"
        );
        // A new replica as large as the room on any one of them, with what the others may still take, fits in the
        // 10 GiB.
        let takes = [4 * G, 2 * G, 0];
        for (i, p) in s[..3].iter().enumerate() {
            let others: u64 = takes.iter().sum::<u64>() - takes[i];
            let after = p.may_take + p.replica_room - p.own_room;
            assert_eq!(after + others, 10 * G, "pool {i}");
        }
    }

    /// A replica written through and then snapshotted holds all its clusters with the snapshot: overwriting it
    /// takes its whole size again. Before, its pool offered the file system's whole free space for new replicas
    /// (allocated = committed), and so did a pool beside it: the first overwrites then found no room.
    #[test]
    fn what_a_snapshot_shares_is_kept_for_the_copies_its_replica_may_still_make() {
        let mut snapped = pool(Some(1), 10 * G, 10 * G, 10 * G, 0);
        snapped.may_take = 10 * G;
        let mut s = [snapped, pool(Some(1), 0, 0, 10 * G, 0)];
        share_disk_room(&mut s);
        assert_eq!(s[0].replica_room, 0, "the copies take all the free space");
        assert_eq!(s[1].disk_room, Some(0));
        assert_eq!(s[1].replica_room, 0);
    }

    /// Snapshots holding many clusters of their own leave a pool full whatever its replicas' sizes: before, the
    /// agent checked the replicas' sizes against the allocated bytes plus the room, and a pool whose snapshots
    /// held more than its replicas' sizes took new replicas into space it did not have.
    #[test]
    fn clusters_only_snapshots_hold_are_not_offered_again() {
        // A 20 GiB replica written through, 50 GiB more held by snapshots alone, 10 GiB free.
        let mut p = pool(Some(1), 20 * G, 70 * G, 10 * G, 0);
        p.may_take = 0;
        let mut s = [p];
        share_disk_room(&mut s);
        assert_eq!(s[0].replica_room, 10 * G);
        // On a block device of 80 GiB, the free clusters alone: 10 GiB, not 80 - 20.
        let mut b = pool(None, 20 * G, 70 * G, 0, 0);
        b.capacity = 80 * G;
        b.may_take = 0;
        let mut s = [b];
        share_disk_room(&mut s);
        assert_eq!(s[0].replica_room, 10 * G);
    }

    #[test]
    fn a_block_device_and_an_overcommitted_file_system_give_no_room_and_no_panic() {
        let mut s = [
            pool(None, 60 * G, 0, 0, 0),
            pool(Some(1), 30 * G, 0, 10 * G, 0),
            pool(Some(1), 30 * G, 0, 10 * G, 0),
            pool(Some(3), u64::MAX, 0, u64::MAX, u64::MAX),
        ];
        share_disk_room(&mut s);
        assert_eq!(s[0].disk_room, None);
        assert_eq!(s[0].replica_room, 100 * G - 60 * G);
        assert_eq!(s[1].replica_room, 0);
        assert_eq!(s[2].replica_room, 0);
    }
}
