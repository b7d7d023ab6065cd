//! The room of a file system that several pool files share. Each pool file's stats count the file system's whole
//! free space as its room ([`PoolStats::disk_room`]), so two pools on one file system offered it twice: the cluster
//! agent, placing replicas on each up to its room, could promise both the same free gigabytes, and the writes that
//! filled them later found none (`NoSpace`). [`share_disk_room`] leaves out of each pool's room what the others on
//! that file system may still take to fill their replicas, so that what every pool is still promised fits in the
//! free space once.

use std::collections::BTreeMap;

use super::PoolStats;

/// What the pool may still take from its file system: its replicas' bytes (at most its capacity) beyond what it
/// holds already, allocated or its own spare space.
fn still_needs(s: &PoolStats) -> u64 {
    s.committed
        .min(s.capacity)
        .saturating_sub(s.allocated.saturating_add(s.own_room))
}

/// Shares out the room of each file system that several of `stats` draw on: each one's `disk_room` becomes the
/// file system's free space less what the others may still take (see [`still_needs`]), plus its own spare space.
/// Pools alone on their file system, or on a block device, keep theirs.
pub fn share_disk_room(stats: &mut [PoolStats]) {
    let mut needs: BTreeMap<u64, u64> = BTreeMap::new();
    for s in stats.iter() {
        if let (Some(_), Some(fs)) = (s.disk_room, s.disk_room_of) {
            *needs.entry(fs).or_default() += still_needs(s);
        }
    }
    for s in stats.iter_mut() {
        let (Some(room), Some(fs)) = (s.disk_room, s.disk_room_of) else {
            continue;
        };
        let others = needs[&fs] - still_needs(s);
        let free = room.saturating_sub(s.own_room);
        s.disk_room = Some(free.saturating_sub(others).saturating_add(s.own_room));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

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
        // Filling any one of them up to its room, with what the others may still take, fits in the 10 GiB.
        let needs = [4 * G, 2 * G, 0];
        for (i, p) in s[..3].iter().enumerate() {
            let others: u64 = needs.iter().sum::<u64>() - needs[i];
            assert_eq!(
                p.disk_room.unwrap() - p.own_room + others,
                10 * G,
                "pool {i}"
            );
        }
    }

    #[test]
    fn a_block_device_and_an_overcommitted_file_system_give_no_room_and_no_panic() {
        let mut s = [
            pool(None, 60 * G, 0, 0, 0),
            pool(Some(1), 30 * G, 0, 10 * G, 0),
            pool(Some(1), 30 * G, 0, 10 * G, 0),
        ];
        share_disk_room(&mut s);
        assert_eq!(s[0].disk_room, None);
        assert_eq!(s[1].disk_room, Some(0));
        assert_eq!(s[2].disk_room, Some(0));
    }
}
