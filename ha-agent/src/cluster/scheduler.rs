//! Placement, pure: which pools get a volume's replicas. The rules (Mayastor's, kept): every replica is placed now
//! or none is (Rule 1: the caller records nothing when this fails); every replica on a different node (Rule 2: the
//! nodes already holding one are excluded); only Online, uncordoned nodes; a pool needs room for the whole replica on top of
//! what its replicas could already grow to (no overcommit, so a thin replica never meets a full pool), where a pool's
//! room is its capacity or, for a pool file, what the file system under it has room for beyond its allocated bytes
//! (the engine shares out the room of a file system under several of its pool files); the pool that
//! would be least full afterwards wins, and nodes are taken in that order too (ties by name, so placement is
//! deterministic). A pool whose disk has returned I/O errors, or is full (the file system under a pool file), gets
//! nothing new. A volume's node selector and topology
//! (node labels) narrow the nodes it may use. A volume's replicas are all on pools of one block size (a nexus needs
//! children of one; a 4Kn disk's pool has 4096-byte blocks): a new volume takes the smallest block size with room
//! for all of them, a replacement that of the replicas already there. A volume made from a snapshot has no choice of
//! pools (its clones live beside the snapshot's copies), but each must pass the same room test ([`room_for`]).

use std::collections::BTreeSet;

use super::node::{NodeRecord, NodeState, PoolSpec};
use super::volume::Placement;

/// Where one replica goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub node: String,
    pub pool: String,
}

/// Why not every replica could be placed: one line per node that could not take one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{wanted} replicas of {size} bytes need {wanted} eligible nodes, {found} found: {}", reasons.join("; "))]
pub struct NoRoom {
    pub wanted: usize,
    pub found: usize,
    pub size: u64,
    pub reasons: Vec<String>,
}

/// Whether pool `p` can take a new replica of `size` bytes, or a clone of that size (which may come to copy every
/// cluster it shares with its snapshot, so it needs the same room): its disk is sound and not full, and its
/// replicas' sizes with this one stay within what it can hold ([`PoolSpec::usable_capacity`]). Why not, when not.
pub fn room_for(p: &PoolSpec, size: u64) -> Result<(), String> {
    if p.disk_errors > 0 {
        return Err(format!("pool {} has a failing disk", p.name));
    }
    if p.disk_full {
        return Err(format!("pool {} has a full disk", p.name));
    }
    let free = p.usable_capacity().saturating_sub(p.committed);
    if size > free {
        return Err(format!(
            "pool {} has room for {free} bytes of new replicas, not {size}",
            p.name
        ));
    }
    Ok(())
}

/// Places `count` replicas of `size` bytes on `nodes` that `placement` admits, none on a node in `exclude`, all on
/// pools of one block size (a nexus needs children of one): the smallest block size that has room for all of them.
pub fn place(
    nodes: &[NodeRecord],
    size: u64,
    count: usize,
    exclude: &BTreeSet<String>,
    placement: &Placement,
) -> Result<Vec<Choice>, NoRoom> {
    place_alongside(nodes, size, count, exclude, placement, None)
}

/// [`place`], on pools of `block_size` when given (that of the volume's other replicas).
pub fn place_alongside(
    nodes: &[NodeRecord],
    size: u64,
    count: usize,
    exclude: &BTreeSet<String>,
    placement: &Placement,
    block_size: Option<u32>,
) -> Result<Vec<Choice>, NoRoom> {
    let sizes: BTreeSet<u32> = match block_size {
        Some(b) => [b].into(),
        None => nodes
            .iter()
            .flat_map(|n| n.status.pools.iter().map(|p| p.block_size))
            .collect(),
    };
    // A replica is a whole number of its pool's blocks.
    let (sizes, unfit): (BTreeSet<u32>, BTreeSet<u32>) = sizes
        .into_iter()
        .partition(|b| *b > 0 && size.is_multiple_of(u64::from(*b)));
    if sizes.is_empty() && !unfit.is_empty() {
        return Err(NoRoom {
            wanted: count,
            found: 0,
            size,
            reasons: vec![format!(
                "{size} bytes is no whole number of the blocks of the pools it could go on ({} bytes)",
                unfit
                    .iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )],
        });
    }
    let mut closest: Option<NoRoom> = None;
    for b in sizes.iter().copied() {
        match place_with_block_size(nodes, size, count, exclude, placement, b) {
            Ok(c) => return Ok(c),
            Err(e) if closest.as_ref().is_none_or(|c| e.found > c.found) => closest = Some(e),
            Err(_) => {}
        }
    }
    // No pool at all: say so node by node.
    let Some(mut e) = closest else {
        return place_with_block_size(nodes, size, count, exclude, placement, 512);
    };
    let present: BTreeSet<u32> = nodes
        .iter()
        .flat_map(|n| n.status.pools.iter().map(|p| p.block_size))
        .collect();
    if present.len() > 1 {
        e.reasons.push(format!(
            "a volume's replicas need pools of one block size ({})",
            sizes
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    Err(e)
}

/// The block size of the pools holding `replicas` ((node, pool) pairs), if one of them is known.
pub fn block_size_of<'a>(
    nodes: &[NodeRecord],
    mut replicas: impl Iterator<Item = (&'a str, &'a str)>,
) -> Option<u32> {
    replicas.find_map(|(node, pool)| pool_of(nodes, node, pool).map(|p| p.block_size))
}

/// Pool `pool` of node `node` in `nodes`, if its record has it.
pub fn pool_of<'a>(nodes: &'a [NodeRecord], node: &str, pool: &str) -> Option<&'a PoolSpec> {
    nodes
        .iter()
        .find(|n| n.spec.name == node)?
        .status
        .pools
        .iter()
        .find(|p| p.name == pool)
}

fn place_with_block_size(
    nodes: &[NodeRecord],
    size: u64,
    count: usize,
    exclude: &BTreeSet<String>,
    placement: &Placement,
    block_size: u32,
) -> Result<Vec<Choice>, NoRoom> {
    let mut reasons = Vec::new();
    // (fullness after placement in parts per million, node, pool)
    let mut best: Vec<(u64, String, String)> = Vec::new();
    for n in nodes {
        let name = &n.spec.name;
        if exclude.contains(name) {
            reasons.push(format!("{name} already holds a replica"));
            continue;
        }
        if n.status.state != NodeState::Online {
            reasons.push(format!("{name} is {:?}", n.status.state));
            continue;
        }
        if n.cordoned {
            reasons.push(format!("{name} is cordoned"));
            continue;
        }
        if let Err(why) = placement.admits(&n.spec.placement_labels()) {
            reasons.push(format!("{name} {why}"));
            continue;
        }
        let pick = n
            .status
            .pools
            .iter()
            .filter(|p| {
                p.block_size == block_size
                    && placement.admits_pool(&p.labels)
                    && room_for(p, size).is_ok()
            })
            .map(|p| {
                let after = (u128::from(p.committed) + u128::from(size)) * 1_000_000
                    / u128::from(p.usable_capacity().max(1));
                (after as u64, p.name.clone())
            })
            .min();
        match pick {
            Some((fullness, pool)) => best.push((fullness, name.clone(), pool)),
            None if n.status.pools.is_empty() => reasons.push(format!("{name} has no pool")),
            None if n.status.pools.iter().all(|p| p.block_size != block_size) => {
                reasons.push(format!("no pool on {name} has {block_size}-byte blocks"))
            }
            None if n.status.pools.iter().all(|p| p.disk_errors > 0) => {
                reasons.push(format!("every pool on {name} has a failing disk"))
            }
            None if n
                .status
                .pools
                .iter()
                .all(|p| p.disk_errors > 0 || p.disk_full) =>
            {
                reasons.push(format!("every pool on {name} has a failing or full disk"))
            }
            None if !n
                .status
                .pools
                .iter()
                .any(|p| placement.admits_pool(&p.labels)) =>
            {
                reasons.push(format!("no pool on {name} matches the pool selector"))
            }
            None => reasons.push(format!("no pool on {name} has {size} bytes free")),
        }
    }
    best.sort();
    if best.len() < count {
        return Err(NoRoom {
            wanted: count,
            found: best.len(),
            size,
            reasons,
        });
    }
    Ok(best
        .into_iter()
        .take(count)
        .map(|(_, node, pool)| Choice { node, pool })
        .collect())
}

/// What can be provisioned on `nodes` for volumes of `replicas` copies that `placement` admits: (free bytes of
/// the admitted nodes' usable pools divided by `replicas`, the largest volume that fits now). Usable nodes and pools
/// are those [`place`] would consider.
pub fn capacity(nodes: &[NodeRecord], placement: &Placement, replicas: usize) -> (u64, u64) {
    let replicas = replicas.max(1);
    let mut total: u64 = 0;
    // Per block size (a volume's replicas share one): each node's best pool.
    let mut best_per_node: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    for n in nodes.iter().filter(|n| {
        n.status.state == NodeState::Online
            && !n.cordoned
            && placement.admits(&n.spec.placement_labels()).is_ok()
    }) {
        let usable: Vec<_> = n
            .status
            .pools
            .iter()
            .filter(|p| p.disk_errors == 0 && !p.disk_full && placement.admits_pool(&p.labels))
            .collect();
        for p in &usable {
            total = total.saturating_add(p.usable_capacity().saturating_sub(p.committed));
        }
        let sizes: BTreeSet<u32> = usable.iter().map(|p| p.block_size).collect();
        for b in sizes {
            let best = usable
                .iter()
                .filter(|p| p.block_size == b)
                .map(|p| p.usable_capacity().saturating_sub(p.committed))
                .max()
                .unwrap_or(0);
            best_per_node.entry(b).or_default().push(best);
        }
    }
    (
        total / replicas as u64,
        nth_best_node(best_per_node, replicas),
    )
}

/// Per block size, each node's best pool figure: the replica-count-th best node's, the best over block sizes (a
/// volume's replicas share one block size, each on its own node). 0: too few nodes.
fn nth_best_node(best_per_node: std::collections::BTreeMap<u32, Vec<u64>>, replicas: usize) -> u64 {
    best_per_node
        .into_values()
        .map(|mut best| {
            best.sort_unstable_by(|a, b| b.cmp(a));
            best.get(replicas - 1).copied().unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

/// The largest volume that `replicas` copies could ever have on the nodes and pools `placement` admits, were their
/// pools empty: the capacity of the best pool of the replica-count-th best node (per block size). A volume larger
/// never fits, whatever is deleted; one smaller may fit once room is made. Every node counts, whatever its state
/// now (it may come back), and every pool, whatever its disk says now.
pub fn largest_ever(nodes: &[NodeRecord], placement: &Placement, replicas: usize) -> u64 {
    let replicas = replicas.max(1);
    let mut best_per_node: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    for n in nodes
        .iter()
        .filter(|n| placement.admits(&n.spec.placement_labels()).is_ok())
    {
        let mut best: std::collections::BTreeMap<u32, u64> = Default::default();
        for p in n
            .status
            .pools
            .iter()
            .filter(|p| placement.admits_pool(&p.labels))
        {
            let b = best.entry(p.block_size).or_default();
            *b = (*b).max(p.capacity);
        }
        for (b, cap) in best {
            best_per_node.entry(b).or_default().push(cap);
        }
    }
    nth_best_node(best_per_node, replicas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::node::{NodeSpec, NodeStatus, PoolSpec};

    fn node(name: &str, state: NodeState, pools: &[(&str, u64, u64)]) -> NodeRecord {
        NodeRecord {
            spec: NodeSpec {
                name: name.into(),
                engine_endpoint: String::new(),
                nvmf_listeners: vec![],
                cntlid_min: 1,
                cntlid_max: 10,
                instance: String::new(),
                labels: Default::default(),
            },
            status: NodeStatus {
                state,
                reason: String::new(),
                since_ms: 0,
                pools: pools
                    .iter()
                    .map(|(p, capacity, committed)| PoolSpec {
                        name: (*p).into(),
                        uuid: String::new(),
                        disk: String::new(),
                        capacity: *capacity,
                        allocated: 0,
                        committed: *committed,
                        disk_errors: 0,
                        labels: Default::default(),
                        block_size: 512,
                        disk_full: false,
                        disk_room: None,
                        replica_room: None,
                        generation: None,
                    })
                    .collect(),
                clean_exit: None,
                torn_nexuses: Vec::new(),
            },
            cordoned: false,
            draining: false,
        }
    }

    const G: u64 = 1 << 30;

    #[test]
    fn each_replica_goes_to_its_own_node_in_the_least_full_pool() {
        let nodes = [
            node(
                "n1",
                NodeState::Online,
                &[("a", 10 * G, 8 * G), ("b", 10 * G, G)],
            ),
            node("n2", NodeState::Online, &[("a", 10 * G, 5 * G)]),
            node("n3", NodeState::Online, &[("a", 10 * G, 0)]),
        ];
        let got = place(&nodes, G, 2, &BTreeSet::new(), &Placement::default()).unwrap();
        assert_eq!(
            got,
            vec![
                Choice {
                    node: "n3".into(),
                    pool: "a".into()
                },
                Choice {
                    node: "n1".into(),
                    pool: "b".into()
                },
            ]
        );
        let all = place(&nodes, G, 3, &BTreeSet::new(), &Placement::default()).unwrap();
        let distinct: BTreeSet<_> = all.iter().map(|c| c.node.clone()).collect();
        assert_eq!(distinct.len(), 3);
    }

    #[test]
    fn a_volumes_replicas_go_to_pools_of_one_block_size() {
        let mut nodes = vec![
            node("n1", NodeState::Online, &[("a", 10 * G, 0)]),
            node("n2", NodeState::Online, &[("a", 10 * G, 0)]),
            node("n3", NodeState::Online, &[("a", 10 * G, 5 * G)]),
            node("n4", NodeState::Online, &[("a", 10 * G, 6 * G)]),
        ];
        // n1 and n2 have 4Kn disks: the emptiest pools, but only two of them.
        for n in &mut nodes[..2] {
            n.status.pools[0].block_size = 4096;
        }
        let none = BTreeSet::new();
        let nodes_of = |c: Vec<Choice>| c.into_iter().map(|c| c.node).collect::<Vec<_>>();
        let two = place(&nodes, G, 2, &none, &Placement::default()).unwrap();
        assert_eq!(
            nodes_of(two),
            ["n3", "n4"],
            "512 first: both sizes have room"
        );
        let e = place(&nodes, G, 3, &none, &Placement::default()).unwrap_err();
        assert_eq!(e.found, 2);
        assert!(
            e.reasons.iter().any(|r| r.contains("one block size")),
            "{e}"
        );
        // A replacement beside replicas on 4096-byte pools goes to one, though a 512 pool is free.
        let n2_out: BTreeSet<String> = ["n2".to_string()].into();
        let one =
            place_alongside(&nodes, G, 1, &n2_out, &Placement::default(), Some(4096)).unwrap();
        assert_eq!(nodes_of(one), ["n1"]);
        // The largest volume of two replicas: 10 GiB on the two 4Kn nodes (not 10 and 5 across sizes).
        assert_eq!(capacity(&nodes, &Placement::default(), 2).1, 10 * G);
        assert_eq!(capacity(&nodes, &Placement::default(), 3).1, 0);
        let both_out: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
        let e = place_alongside(&nodes, G, 1, &both_out, &Placement::default(), Some(4096))
            .unwrap_err();
        assert!(
            e.reasons
                .iter()
                .any(|r| r == "no pool on n3 has 4096-byte blocks"),
            "{e}"
        );
        assert_eq!(block_size_of(&nodes, [("n2", "a")].into_iter()), Some(4096));
        // A size of whole 512-byte blocks but not of 4096: only 512-byte pools take it, beside 4096 ones nothing.
        let odd = G + 512;
        let two = place(&nodes, odd, 2, &none, &Placement::default()).unwrap();
        assert_eq!(nodes_of(two), ["n3", "n4"]);
        let e = place_alongside(&nodes, odd, 1, &n2_out, &Placement::default(), Some(4096))
            .unwrap_err();
        assert!(
            e.reasons[0].contains("no whole number of the blocks"),
            "{e}"
        );
        for n in &mut nodes[2..] {
            n.status.pools[0].block_size = 4096;
        }
        assert!(place(&nodes, odd, 1, &none, &Placement::default()).is_err());
        assert_eq!(block_size_of(&nodes, [("n9", "a")].into_iter()), None);
    }

    #[test]
    fn capacity_counts_usable_pools_of_admitted_nodes() {
        let mut nodes = vec![
            node(
                "n1",
                NodeState::Online,
                &[("a", 10 * G, 4 * G), ("b", 10 * G, 0)],
            ),
            node("n2", NodeState::Online, &[("a", 10 * G, 8 * G)]),
            node("n3", NodeState::Offline, &[("a", 10 * G, 0)]),
        ];
        // n1: 6 + 10 free, best 10; n2: 2 free; n3 is Offline.
        assert_eq!(capacity(&nodes, &Placement::default(), 1), (18 * G, 10 * G));
        assert_eq!(capacity(&nodes, &Placement::default(), 2), (9 * G, 2 * G));
        assert_eq!(capacity(&nodes, &Placement::default(), 3).1, 0);
        nodes[0].status.pools[1].disk_errors = 1;
        assert_eq!(capacity(&nodes, &Placement::default(), 1), (8 * G, 6 * G));
        nodes[1].spec.labels.insert("zone".into(), "b".into());
        let zone_b = Placement {
            node_selector: [("zone".to_string(), "b".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(capacity(&nodes, &zone_b, 1), (2 * G, 2 * G));
    }

    #[test]
    fn the_largest_volume_ever_counts_whole_pools_of_every_admitted_node() {
        let mut nodes = vec![
            node(
                "n1",
                NodeState::Online,
                &[("a", 10 * G, 10 * G), ("b", 4 * G, 0)],
            ),
            node("n2", NodeState::Online, &[("a", 8 * G, 8 * G)]),
            node("n3", NodeState::Offline, &[("a", 6 * G, 0)]),
        ];
        // Nothing fits now on n1 beyond b's 4 GiB, but a 10 GiB volume would once a's replicas go.
        assert_eq!(capacity(&nodes, &Placement::default(), 1).1, 4 * G);
        assert_eq!(largest_ever(&nodes, &Placement::default(), 1), 10 * G);
        // Two copies: n1 and n2 (n3, offline now, may come back but is smaller).
        assert_eq!(largest_ever(&nodes, &Placement::default(), 2), 8 * G);
        assert_eq!(largest_ever(&nodes, &Placement::default(), 3), 6 * G);
        assert_eq!(largest_ever(&nodes, &Placement::default(), 4), 0);
        nodes[1].spec.labels.insert("zone".into(), "b".into());
        let zone_b = Placement {
            node_selector: [("zone".to_string(), "b".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(largest_ever(&nodes, &zone_b, 1), 8 * G);
    }

    #[test]
    fn a_pool_selector_keeps_replicas_in_matching_pools() {
        let mut nodes = [
            node(
                "n1",
                NodeState::Online,
                &[("a", 10 * G, 0), ("b", 10 * G, 5 * G)],
            ),
            node("n2", NodeState::Online, &[("a", 10 * G, 0)]),
        ];
        nodes[0].status.pools[1]
            .labels
            .insert("media".into(), "ssd".into());
        let ssd = Placement {
            pool_selector: [("media".to_string(), "ssd".to_string())].into(),
            ..Default::default()
        };
        let got = place(&nodes, G, 1, &BTreeSet::new(), &ssd).unwrap();
        assert_eq!(
            got,
            vec![Choice {
                node: "n1".into(),
                pool: "b".into()
            }]
        );
        let e = place(&nodes, G, 2, &BTreeSet::new(), &ssd).unwrap_err();
        assert!(
            e.reasons
                .contains(&"no pool on n2 matches the pool selector".to_string()),
            "{e}"
        );
        assert_eq!(capacity(&nodes, &ssd, 1), (5 * G, 5 * G));
    }

    #[test]
    fn a_pool_whose_disk_failed_gets_nothing_new() {
        let mut nodes = [
            node(
                "n1",
                NodeState::Online,
                &[("a", 10 * G, 0), ("b", 10 * G, 5 * G)],
            ),
            node("n2", NodeState::Online, &[("a", 10 * G, 0)]),
        ];
        nodes[0].status.pools[0].disk_errors = 3;
        let got = place(&nodes, G, 2, &BTreeSet::new(), &Placement::default()).unwrap();
        assert!(got.contains(&Choice {
            node: "n1".into(),
            pool: "b".into()
        }));
        nodes[0].status.pools[1].disk_errors = 1;
        let e = place(&nodes, G, 2, &BTreeSet::new(), &Placement::default()).unwrap_err();
        assert!(
            e.reasons
                .contains(&"every pool on n1 has a failing disk".to_string()),
            "{e}"
        );
        // A full disk (the file system under a pool file) takes nothing new either, until it has room.
        nodes[0].status.pools[1].disk_errors = 0;
        nodes[0].status.pools[1].disk_full = true;
        let e = place(&nodes, G, 2, &BTreeSet::new(), &Placement::default()).unwrap_err();
        assert!(
            e.reasons
                .contains(&"every pool on n1 has a failing or full disk".to_string()),
            "{e}"
        );
        assert_eq!(capacity(&nodes, &Placement::default(), 1).0, 10 * G);
        nodes[0].status.pools[1].disk_full = false;
        place(&nodes, G, 2, &BTreeSet::new(), &Placement::default()).unwrap();
    }

    #[test]
    fn a_pool_file_takes_no_more_than_the_file_system_under_it_has_room_for() {
        // 10 GiB pools; the file system under n1's file has 3 GiB left and the pool holds 1 GiB of data.
        let mut nodes = vec![
            node("n1", NodeState::Online, &[("a", 10 * G, G)]),
            node("n2", NodeState::Online, &[("a", 10 * G, 5 * G)]),
        ];
        nodes[0].status.pools[0].allocated = G;
        nodes[0].status.pools[0].disk_room = Some(3 * G);
        // Usable: 4 GiB on n1 (3 GiB free of its 1 GiB committed), 5 GiB on n2.
        assert_eq!(
            capacity(&nodes, &Placement::default(), 1),
            (3 * G + 5 * G, 5 * G)
        );
        let got = place(&nodes, 4 * G, 1, &BTreeSet::new(), &Placement::default()).unwrap();
        assert_eq!(got[0].node, "n2", "n1's file system has no room for 4 GiB");
        let e = place(&nodes, 4 * G, 2, &BTreeSet::new(), &Placement::default()).unwrap_err();
        assert!(
            e.reasons
                .contains(&format!("no pool on n1 has {} bytes free", 4 * G)),
            "{e}"
        );
        // A block device (no room figure) is its capacity.
        nodes[0].status.pools[0].disk_room = None;
        place(&nodes, 4 * G, 2, &BTreeSet::new(), &Placement::default()).unwrap();
    }

    #[test]
    fn a_pool_takes_no_replica_larger_than_the_room_its_engine_says_it_has_for_one() {
        // n1's pool has 9 GiB of free capacity by the replicas' sizes, but its engine says 2 GiB (a snapshot's
        // shared clusters are copied on its replica's overwrites).
        let mut nodes = vec![
            node("n1", NodeState::Online, &[("a", 10 * G, G)]),
            node("n2", NodeState::Online, &[("a", 10 * G, 0)]),
        ];
        nodes[0].status.pools[0].replica_room = Some(2 * G);
        nodes[0].status.pools[0].disk_room = Some(100 * G);
        assert_eq!(nodes[0].status.pools[0].usable_capacity(), 3 * G);
        place(&nodes, 2 * G, 2, &BTreeSet::new(), &Placement::default()).unwrap();
        let e = place(&nodes, 3 * G, 2, &BTreeSet::new(), &Placement::default()).unwrap_err();
        assert!(
            e.reasons
                .contains(&format!("no pool on n1 has {} bytes free", 3 * G)),
            "{e}"
        );
    }

    #[test]
    fn room_for_says_why_a_pool_cannot_take_a_replica_or_clone() {
        let mut p = node("n1", NodeState::Online, &[("a", 10 * G, 4 * G)])
            .status
            .pools[0]
            .clone();
        p.replica_room = Some(2 * G);
        assert_eq!(room_for(&p, 2 * G), Ok(()));
        assert_eq!(
            room_for(&p, 2 * G + 1),
            Err(format!(
                "pool a has room for {} bytes of new replicas, not {}",
                2 * G,
                2 * G + 1
            ))
        );
        p.disk_full = true;
        assert_eq!(room_for(&p, 1), Err("pool a has a full disk".into()));
        p.disk_errors = 1;
        assert_eq!(room_for(&p, 1), Err("pool a has a failing disk".into()));
    }

    #[test]
    fn all_or_nothing_with_the_reason_for_every_node_left_out() {
        let nodes = [
            node("n1", NodeState::Online, &[("a", 10 * G, 0)]),
            node("n2", NodeState::Offline, &[("a", 10 * G, 0)]),
            node("n3", NodeState::Online, &[("a", 10 * G, 9 * G + 1)]),
            node("n4", NodeState::Online, &[]),
            node("n5", NodeState::Online, &[("a", 10 * G, 0)]),
        ];
        let mut nodes = nodes.to_vec();
        nodes.push(NodeRecord {
            cordoned: true,
            ..node("n6", NodeState::Online, &[("a", 10 * G, 0)])
        });
        let exclude: BTreeSet<String> = ["n5".to_string()].into();
        let e = place(&nodes, G, 2, &exclude, &Placement::default()).unwrap_err();
        assert_eq!((e.wanted, e.found), (2, 1));
        let msg = e.to_string();
        for why in [
            "n2 is Offline",
            "no pool on n3",
            "n4 has no pool",
            "n5 already holds",
        ] {
            assert!(msg.contains(why), "{msg}");
        }
        assert_eq!(
            place(&nodes, G, 1, &exclude, &Placement::default()).unwrap()[0].node,
            "n1"
        );
        assert!(
            place(&nodes, 11 * G, 1, &BTreeSet::new(), &Placement::default()).is_err(),
            "larger than any pool"
        );
    }
}
