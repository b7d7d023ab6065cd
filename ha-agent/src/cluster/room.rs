//! What placement sees of the pools. A node record's pool figures change only with the engine's heartbeats, so two
//! volumes placed within one heartbeat (a StatefulSet's claims provisioned at once) both saw the same room and could
//! both take it: four 40 MiB volumes went on one 56 MiB pool. So placements — of a new volume, a replacement or an
//! added replica, a clone, a snapshot's room, a volume's growth — are serialised ([`Volumes::placing`]) from reading a
//! [`PlacementView`] until their replicas are promised (before their record is written; a snapshot: until it is
//! taken), and the view is the records'
//! figures less what the agent promised that those figures may not show yet: [`Promises`], one per replica placed
//! (and per replica's growth, [`growth_key`]), from its placement until its creation has reached the node's record: until the pool's figures there are of the
//! state the creation answered with or a later one (its generation: the pool's import and the metadata changes
//! applied since, which heartbeats carry), or, from an engine that does not tell it, until a few heartbeats came
//! ([`super::registry::Registry::beats`]). Without a remote call per node, a placement costs what it did (the scale
//! benchmark places 10,000 volumes on 1,000 nodes). Where the figures must be the engine's at that moment (a clone's
//! or a snapshot's room: a snapshot taken a moment ago shrank it), the few nodes concerned are asked
//! ([`ASK_WITHIN`]; one that does not answer keeps its record's figures and is said not to have answered). The
//! promises are kept in step with the records by the volumes' sweep (a new leader's first sweep finds those placed
//! before it).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use proto::engine as epb;
use uuid::Uuid;

use super::node::{NodeRecord, NodeState, PoolSpec};
use super::volume::VolumeRecord;
use super::volumes::{VolumeError, Volumes};

/// A promise whose record write has not ended after this long lost its writer (a caller that went away): the sweep
/// treats it as written then.
const ABANDONED_AFTER: Duration = Duration::from_secs(60);

/// How long a placement waits for one engine's pool figures before it goes by the node's record.
const ASK_WITHIN: Duration = Duration::from_secs(2);

/// Heartbeats after a replica's creation by which its node's record holds it (see [`super::registry::Registry::beats`];
/// one more for margin).
const BEATS_TO_SHOW: u64 = 3;

/// The nodes as placement sees them now.
pub struct PlacementView {
    pub nodes: Vec<NodeRecord>,
    /// Nodes whose engine gave its pools' figures for this view.
    pub answered: BTreeSet<String>,
}

impl PlacementView {
    /// Pool `pool` of node `node`, if the node's record has it.
    pub fn pool(&self, node: &str, pool: &str) -> Option<&PoolSpec> {
        super::scheduler::pool_of(&self.nodes, node, pool)
    }
}

/// A replica placed whose bytes its node's record may not count yet.
struct Promise {
    node: String,
    pool: String,
    bytes: u64,
    /// When it was made.
    made: Instant,
    /// When its record was written (the sweep drops only promises recorded before the records it read); `None`
    /// while it is being written (or its writer went away: after [`ABANDONED_AFTER`], as if it were written).
    recorded_at: Option<Instant>,
    /// Room a snapshot took (its copies to come), not a replica: no record names it, the sweep leaves it.
    room_only: bool,
    /// A replica's growth ([`growth_key`]): once grown, it ends only when its pool's figures show it, whatever the
    /// sweep finds (the growth record is gone as soon as the last replica grew).
    growth: bool,
    /// The node's heartbeat count when its creation was recorded; `None` until then.
    created_at_beat: Option<u64>,
    /// Its pool's generation its engine answered the creation with: figures at least that recent count it.
    shown_by: Option<(u64, u64)>,
}

impl Promise {
    /// Whether the figures of its pool, of state `record` (their generation, if told) with its node's heartbeat
    /// count at `beats`, may not count it yet: not created, or created in a later state than those figures are
    /// of; from an engine that does not tell generations, until [`BEATS_TO_SHOW`] heartbeats came after.
    fn unshown(&self, record: Option<(u64, u64)>, beats: u64) -> bool {
        let Some(beat) = self.created_at_beat else {
            return true;
        };
        match (self.shown_by, record) {
            (Some(g), Some(r)) => r < g,
            _ => beats < beat + BEATS_TO_SHOW,
        }
    }
}

/// The agent's promises, by replica (see the module's doc), and whether they were brought in step with the records
/// since this agent leads.
#[derive(Default)]
pub struct Promises(Mutex<HashMap<Uuid, Promise>>, std::sync::atomic::AtomicBool);

impl Promises {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Promise>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The key of the promise of replica `replica`'s growth to `size` bytes (one per replica and size).
pub(super) fn growth_key(replica: &Uuid, size: u64) -> Uuid {
    Uuid::new_v5(replica, &size.to_be_bytes())
}

/// `pools`' figures, exact, from the engine's listing `live` (labels stay: an engine's listing has none).
fn take_live(pools: &mut [PoolSpec], live: &[epb::Pool]) {
    for p in pools {
        if let Some(l) = live.iter().find(|l| l.name == p.name) {
            let labels = std::mem::take(&mut p.labels);
            *p = PoolSpec {
                labels,
                ..PoolSpec::from_engine(l)
            };
        }
    }
}

/// Counts `extra` bytes promised to a replica on `pool` that its figures do not hold yet: its replicas' sizes grow
/// by them and its room for new ones shrinks (a replica created takes its whole size from it, until written).
fn promise(pool: &mut PoolSpec, extra: u64) {
    pool.committed = pool.committed.saturating_add(extra);
    pool.replica_room = pool.replica_room.map(|r| r.saturating_sub(extra));
}

impl Volumes {
    /// Promises the replicas of `r` not created yet (placed just now: under [`Volumes::placing`], before `r` is
    /// written; again once it is, `recorded`).
    pub(super) fn promise_replicas(&self, r: &VolumeRecord, recorded: bool) {
        let mut map = self.promises.map();
        for rep in r.replicas.iter().filter(|x| !x.created) {
            let p = map.entry(rep.uuid).or_insert_with(|| Promise {
                node: rep.node.clone(),
                pool: rep.pool.clone(),
                bytes: r.spec.size,
                made: Instant::now(),
                recorded_at: None,
                room_only: false,
                growth: false,
                created_at_beat: None,
                shown_by: None,
            });
            if recorded && p.recorded_at.is_none() {
                p.recorded_at = Some(Instant::now());
            }
        }
    }

    /// Promises the growth of `r` (in flight: its growth record says from what size) on the pools of its replicas
    /// not grown yet (under [`Volumes::placing`], before `r` is written; again once it is, `recorded`).
    pub(super) fn promise_growth(&self, r: &VolumeRecord, recorded: bool) {
        let Some(g) = &r.growth else { return };
        let extra = r.spec.size.saturating_sub(g.from);
        let mut map = self.promises.map();
        for rep in r
            .replicas
            .iter()
            .filter(|x| x.created && !g.grown.contains(&x.uuid))
        {
            let p = map
                .entry(growth_key(&rep.uuid, r.spec.size))
                .or_insert_with(|| Promise {
                    node: rep.node.clone(),
                    pool: rep.pool.clone(),
                    bytes: extra,
                    made: Instant::now(),
                    recorded_at: None,
                    room_only: false,
                    growth: true,
                    created_at_beat: None,
                    shown_by: None,
                });
            if recorded && p.recorded_at.is_none() {
                p.recorded_at = Some(Instant::now());
            }
        }
    }

    /// Takes back the promises of `r`'s growth to `size`: it was undone.
    pub(super) fn unpromise_growth(&self, r: &VolumeRecord, size: u64) {
        let mut map = self.promises.map();
        for rep in &r.replicas {
            map.remove(&growth_key(&rep.uuid, size));
        }
    }

    /// Takes back the promises of `r`'s replicas not created: its record could not be written.
    pub(super) fn unpromise_replicas(&self, r: &VolumeRecord) {
        let mut map = self.promises.map();
        for rep in r.replicas.iter().filter(|x| !x.created) {
            map.remove(&rep.uuid);
        }
    }

    /// Replica `replica` was created (and recorded so), its engine answering with its pool's `generation`: its
    /// promise lasts until its node's record shows it.
    pub(super) fn replica_created(&self, replica: &Uuid, generation: Option<(u64, u64)>) {
        let mut map = self.promises.map();
        if let Some(p) = map.get_mut(replica)
            && p.created_at_beat.is_none()
        {
            p.created_at_beat = Some(self.registry.beats(&p.node));
            p.shown_by = generation;
        }
    }

    /// Replica `replica` was destroyed: its bytes are no longer promised (its node's record may count them until
    /// its next heartbeat, which only errs on the safe side).
    pub(super) fn unpromise(&self, replica: &Uuid) {
        self.promises.map().remove(replica);
    }

    /// Room a snapshot just took on `pool` of `node` (`bytes`: what its replica there may now copy), until the
    /// node's record shows it (a few heartbeats).
    pub(super) fn promise_room(&self, node: &str, pool: &str, bytes: u64) {
        let now = Instant::now();
        self.promises.map().insert(
            Uuid::new_v4(),
            Promise {
                node: node.to_string(),
                pool: pool.to_string(),
                bytes,
                made: now,
                recorded_at: Some(now),
                room_only: true,
                growth: false,
                created_at_beat: Some(self.registry.beats(node)),
                shown_by: None,
            },
        );
    }

    /// Whether the promises were brought in step with the records since this agent leads.
    pub(super) fn promises_synced(&self) -> bool {
        self.promises.1.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Keeps the promises in step with `records`, all of the volumes read at `read_at`: a replica recorded and not
    /// created is promised (placed before this agent led), one created is on its way out, and one no record has
    /// (rolled back, retired) is no longer promised, unless promised after the records were read. The first time
    /// since this agent leads, replicas recorded created are promised too, for a few heartbeats: the last leader
    /// may have created them after the nodes' last heartbeats.
    pub(super) fn sync_promises(&self, records: &[VolumeRecord], read_at: Instant) {
        let first = !self
            .promises
            .1
            .swap(true, std::sync::atomic::Ordering::AcqRel);
        let mut placed: HashMap<Uuid, bool> = HashMap::new();
        for r in records {
            for rep in &r.replicas {
                placed.insert(rep.uuid, rep.created);
            }
            if r.replicas.iter().any(|x| !x.created) {
                self.promise_replicas(r, true);
            }
            if let Some(g) = &r.growth {
                // A growth in flight: its replicas not grown are promised its bytes; those grown are on their way
                // out, as created replicas are.
                for rep in r.replicas.iter().filter(|x| x.created) {
                    placed.insert(
                        growth_key(&rep.uuid, r.spec.size),
                        g.grown.contains(&rep.uuid),
                    );
                }
                self.promise_growth(r, true);
                if first {
                    let mut map = self.promises.map();
                    for rep in r.replicas.iter().filter(|x| g.grown.contains(&x.uuid)) {
                        map.entry(growth_key(&rep.uuid, r.spec.size))
                            .or_insert_with(|| Promise {
                                node: rep.node.clone(),
                                pool: rep.pool.clone(),
                                bytes: r.spec.size.saturating_sub(g.from),
                                made: read_at,
                                recorded_at: Some(read_at),
                                room_only: false,
                                growth: true,
                                created_at_beat: Some(self.registry.beats(&rep.node)),
                                shown_by: None,
                            });
                    }
                }
            }
            if first {
                let mut map = self.promises.map();
                for rep in r.replicas.iter().filter(|x| x.created) {
                    map.entry(rep.uuid).or_insert_with(|| Promise {
                        node: rep.node.clone(),
                        pool: rep.pool.clone(),
                        bytes: r.spec.size,
                        made: read_at,
                        recorded_at: Some(read_at),
                        room_only: false,
                        growth: false,
                        created_at_beat: Some(self.registry.beats(&rep.node)),
                        shown_by: None,
                    });
                }
            }
        }
        let mut map = self.promises.map();
        map.retain(|uuid, p| match placed.get(uuid) {
            _ if p.room_only => true,
            Some(true) => {
                if p.created_at_beat.is_none() {
                    p.created_at_beat = Some(self.registry.beats(&p.node));
                }
                true
            }
            Some(false) => true,
            // A growth done (its record gone meanwhile): until its pool's figures show it (placement_view).
            None if p.growth && p.created_at_beat.is_some() => true,
            None => p.recorded_at.unwrap_or(p.made + ABANDONED_AFTER) > read_at,
        });
    }

    /// The nodes as placement sees them now (see the module's doc), the pools of `ask` as their engines list them
    /// at this moment. The caller holds [`Volumes::placing`].
    pub(super) async fn placement_view(
        &self,
        ask: &[String],
    ) -> Result<PlacementView, VolumeError> {
        if !self.promises_synced() {
            // The first placement since this agent leads: the promises of what the last leader placed first.
            let read_at = Instant::now();
            let records = self.list_sound().await?;
            self.sync_promises(&records, read_at);
        }
        let mut nodes: Vec<NodeRecord> = self
            .registry
            .list()
            .await?
            .into_iter()
            .map(|v| v.record)
            .collect();
        // Nodes by name: there may be thousands of nodes and of promises.
        let at: HashMap<String, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.spec.name.clone(), i))
            .collect();
        let asked: Vec<usize> = ask
            .iter()
            .filter_map(|name| at.get(name).copied())
            .filter(|&i| nodes[i].status.state == NodeState::Online)
            .collect();
        let live = join_all(asked.iter().map(|&i| {
            let name = nodes[i].spec.name.clone();
            async move {
                let ask = async {
                    let mut c = self.engine(&name).await.ok()?;
                    let l = c.list_pools(epb::ListPoolsRequest {}).await.ok()?;
                    Some(l.into_inner().pools)
                };
                tokio::time::timeout(ASK_WITHIN, ask).await.ok().flatten()
            }
        }))
        .await;
        let mut answered = BTreeSet::new();
        for (&i, live) in asked.iter().zip(live) {
            if let Some(live) = live {
                take_live(&mut nodes[i].status.pools, &live);
                answered.insert(nodes[i].spec.name.clone());
            }
        }
        let mut map = self.promises.map();
        map.retain(|_, p| {
            let record = at
                .get(&p.node)
                .and_then(|&i| nodes[i].status.pools.iter().find(|x| x.name == p.pool))
                .and_then(|x| x.generation);
            p.unshown(record, self.registry.beats(&p.node))
        });
        // (An engine asked just now counts what it created before it answered: its answer's generation ended those
        // promises above. One created after it answered is still counted.)
        for p in map.values() {
            let pool = at
                .get(&p.node)
                .and_then(|&i| nodes[i].status.pools.iter_mut().find(|x| x.name == p.pool));
            if let Some(pool) = pool {
                promise(pool, p.bytes);
            }
        }
        Ok(PlacementView { nodes, answered })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    fn pool(committed: u64, room: Option<u64>) -> PoolSpec {
        PoolSpec {
            name: "p".into(),
            uuid: String::new(),
            disk: String::new(),
            capacity: 100 * M,
            allocated: 0,
            committed,
            disk_errors: 0,
            labels: [("tier".to_string(), "fast".to_string())].into(),
            block_size: 512,
            disk_full: false,
            disk_room: None,
            replica_room: room,
            generation: None,
        }
    }

    struct Answers;

    #[async_trait::async_trait]
    impl super::super::registry::Prober for Answers {
        async fn probe(&self, _: &str, _: &str) -> Result<(), String> {
            Ok(())
        }
    }

    /// A growth's promise outlives its growth record (dropped as soon as the last replica grew), until the pool's
    /// figures show the growth: a sweep right after the growth finished must not hand its room out again.
    #[tokio::test]
    async fn a_growth_stays_promised_after_its_record_until_the_figures_show_it() {
        use super::super::node::NodeSpec;
        use super::super::registry::{Registry, RegistryConfig};
        use super::super::store::{Store, embedded::EmbeddedStore};
        use super::super::volume::{GrowthRecord, ReplicaRecord, VolumePhase, VolumeSpec};
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn Store> =
            std::sync::Arc::new(EmbeddedStore::open(&dir.path().join("s")).await.unwrap());
        let registry = std::sync::Arc::new(
            Registry::load(
                store.clone(),
                std::sync::Arc::new(Answers),
                RegistryConfig::default(),
            )
            .await
            .unwrap(),
        );
        let spec = NodeSpec {
            name: "n".into(),
            engine_endpoint: "http://127.0.0.1:1".into(),
            nvmf_listeners: vec!["127.0.0.1:4420".into()],
            cntlid_min: 1,
            cntlid_max: 100,
            instance: "i1".into(),
            labels: Default::default(),
        };
        registry
            .register(spec, vec![pool(16 * M, Some(84 * M))])
            .await
            .unwrap();
        let v = Volumes::new(
            store,
            registry,
            Duration::from_secs(1),
            super::super::metrics::AgentMetrics::new(),
        );
        let rep = ReplicaRecord {
            uuid: Uuid::new_v4(),
            node: "n".into(),
            pool: "p".into(),
            created: true,
            rejoined_ms: 0,
            synced: true,
            fault_confirmed: false,
        };
        let mut r = VolumeRecord {
            uuid: Uuid::new_v4(),
            spec: VolumeSpec {
                size: 32 * M,
                replicas: 1,
                ..Default::default()
            },
            phase: VolumePhase::Created,
            replicas: vec![rep.clone()],
            nexus: None,
            last_key: 0,
            fence_key: 0,
            reason: String::new(),
            resync: false,
            switchover: None,
            growth: Some(GrowthRecord {
                from: 16 * M,
                grown: Vec::new(),
                born_grown: Vec::new(),
            }),
            shared: false,
            block_size: 512,
            restarting_key: 0,
        };
        let committed = |view: PlacementView| view.pool("n", "p").unwrap().committed;
        // (A leader's first sweep promises the replicas it finds for a while: done, with none.)
        v.sync_promises(&[], Instant::now());
        v.promise_growth(&r, true);
        assert_eq!(committed(v.placement_view(&[]).await.unwrap()), 32 * M);
        // Grown (its engine answered generation (1, 5)), and the growth record dropped.
        v.replica_created(&growth_key(&rep.uuid, 32 * M), Some((1, 5)));
        r.growth = None;
        v.sync_promises(std::slice::from_ref(&r), Instant::now());
        assert_eq!(
            committed(v.placement_view(&[]).await.unwrap()),
            32 * M,
            "still promised: the node's record does not show the growth yet"
        );
    }

    #[test]
    fn a_promised_replica_takes_its_size_from_the_room_for_new_ones() {
        let mut p = pool(40 * M, Some(60 * M));
        assert_eq!(p.usable_capacity() - p.committed, 60 * M);
        promise(&mut p, 40 * M);
        assert_eq!(p.usable_capacity() - p.committed, 20 * M);
        // From an engine that does not tell its room: by capacity.
        let mut p = pool(40 * M, None);
        promise(&mut p, 40 * M);
        assert_eq!(p.usable_capacity() - p.committed, 20 * M);
    }

    #[test]
    fn a_promise_lasts_until_the_figures_are_of_its_creation_or_later() {
        let mut p = Promise {
            node: "n".into(),
            pool: "p".into(),
            bytes: M,
            made: Instant::now(),
            recorded_at: Some(Instant::now()),
            room_only: false,
            growth: false,
            created_at_beat: None,
            shown_by: None,
        };
        assert!(p.unshown(Some((9, 9)), 100), "not created yet");
        p.created_at_beat = Some(10);
        p.shown_by = Some((2, 40));
        assert!(p.unshown(Some((2, 39)), 100), "figures of an earlier state");
        assert!(!p.unshown(Some((2, 40)), 10), "of its state");
        assert!(!p.unshown(Some((3, 1)), 10), "of a later import");
        // An engine that does not tell generations: a few heartbeats.
        p.shown_by = None;
        assert!(p.unshown(None, 10 + BEATS_TO_SHOW - 1));
        assert!(!p.unshown(None, 10 + BEATS_TO_SHOW));
    }

    #[test]
    fn live_figures_replace_the_records_and_keep_its_labels() {
        let mut pools = vec![pool(0, Some(100 * M))];
        let live = epb::Pool {
            name: "p".into(),
            capacity: 100 * M,
            committed: 40 * M,
            replica_room: Some(60 * M),
            block_size: 4096,
            ..Default::default()
        };
        take_live(&mut pools, &[live]);
        assert_eq!(
            (
                pools[0].committed,
                pools[0].replica_room,
                pools[0].block_size
            ),
            (40 * M, Some(60 * M), 4096)
        );
        assert_eq!(
            pools[0].labels.get("tier").map(String::as_str),
            Some("fast")
        );
    }
}
