//! Placement, pure: which pools get a volume's replicas. The rules (Mayastor's, kept): every replica is placed now
//! or none is (Rule 1: the caller records nothing when this fails); every replica on a different node (Rule 2: the
//! nodes already holding one are excluded); only Online, uncordoned nodes; a pool needs room for the whole replica on top of
//! what its replicas could already grow to (no overcommit, so a thin replica never meets a full pool); the pool that
//! would be least full afterwards wins, and nodes are taken in that order too (ties by name, so placement is
//! deterministic). A pool whose disk has returned I/O errors gets nothing new. A volume's node selector and topology
//! (node labels) narrow the nodes it may use.

use std::collections::BTreeSet;

use super::node::{NodeRecord, NodeState};
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

/// Places `count` replicas of `size` bytes on `nodes` that `placement` admits, none on a node in `exclude`.
pub fn place(
    nodes: &[NodeRecord],
    size: u64,
    count: usize,
    exclude: &BTreeSet<String>,
    placement: &Placement,
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
                p.disk_errors == 0
                    && placement.admits_pool(&p.labels)
                    && p.committed.saturating_add(size) <= p.capacity
            })
            .map(|p| {
                let after = (u128::from(p.committed) + u128::from(size)) * 1_000_000
                    / u128::from(p.capacity.max(1));
                (after as u64, p.name.clone())
            })
            .min();
        match pick {
            Some((fullness, pool)) => best.push((fullness, name.clone(), pool)),
            None if n.status.pools.is_empty() => reasons.push(format!("{name} has no pool")),
            None if n.status.pools.iter().all(|p| p.disk_errors > 0) => {
                reasons.push(format!("every pool on {name} has a failing disk"))
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
    let mut best_per_node: Vec<u64> = Vec::new();
    for n in nodes.iter().filter(|n| {
        n.status.state == NodeState::Online
            && !n.cordoned
            && placement.admits(&n.spec.placement_labels()).is_ok()
    }) {
        let free: Vec<u64> = n
            .status
            .pools
            .iter()
            .filter(|p| p.disk_errors == 0 && placement.admits_pool(&p.labels))
            .map(|p| p.capacity.saturating_sub(p.committed))
            .collect();
        total = total.saturating_add(free.iter().sum());
        best_per_node.push(free.into_iter().max().unwrap_or(0));
    }
    best_per_node.sort_unstable_by(|a, b| b.cmp(a));
    let largest = best_per_node.get(replicas - 1).copied().unwrap_or(0);
    (total / replicas as u64, largest)
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
                    })
                    .collect(),
                clean_exit: None,
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
