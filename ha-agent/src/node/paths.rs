//! The path state machine: from successive sysfs scans, which of Keelson's paths are broken and since when. A
//! controller is broken ([`Controller::broken`]: not `live`, or none of its namespace paths optimized or
//! non-optimized) for longer than a grace period, or when it vanished (the kernel gave up on it) and no usable controller of its
//! subsystem is left. Controllers taken down on purpose are not reported: none vanished is while another of its
//! subsystem is being deleted (an unstage deletes a volume's paths one after another), and a subsystem left with no
//! controller at all must be seen so in two scans in a row (a deleted last path takes its subsystem with it). A
//! live controller is broken too when it has reads or writes in flight and none of that kind completed for the stall
//! timeout (reads completing do not make up for writes held): its target went silent (a frozen engine, a cut link) without the TCP connection failing, which the
//! kernel itself notices only when its keep-alive times out (1.25-2 keep-alive timeouts on Linux 6.1). Such a path
//! is [`PathTracker::stalled`] (the metrics show it). A slow target reported this way is not moved: the cluster
//! agent checks with the engine first. Pure: the caller scans and gives the time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use super::sysfs::{Controller, Subsystem};

/// A broken path to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken {
    pub nqn: String,
    /// The controller as last seen (its address is the broken path's).
    pub controller: Controller,
    /// Whether the controller is still in sysfs (it is deleted once a replacement is live).
    pub present: bool,
    /// When the agent first saw it unusable (wall clock, for the report).
    pub seen: SystemTime,
    /// The same, monotonic (for the switch-over duration).
    pub seen_at: Instant,
}

struct Seen {
    controller: Controller,
    /// When it was first seen broken, if it is.
    unusable_since: Option<(Instant, SystemTime)>,
    /// When it last completed I/O or had none in flight, reads and writes apart ([`super::sysfs::IoCounts::flows`]).
    progress_at: [(Instant, SystemTime); 2],
    /// Live, with I/O in flight and none completing for the stall timeout.
    stalled: bool,
}

/// What the agent remembers between scans.
pub struct PathTracker {
    grace: Duration,
    /// In flight without a completion this long is a silent target; zero: not watched.
    stall: Duration,
    /// By subsystem NQN, then controller name.
    known: BTreeMap<String, BTreeMap<String, Seen>>,
    /// Subsystems the last scan found with no controller at all.
    empty: BTreeSet<String>,
}

impl PathTracker {
    pub fn new(grace: Duration, stall: Duration) -> PathTracker {
        PathTracker {
            grace,
            stall,
            known: BTreeMap::new(),
            empty: BTreeSet::new(),
        }
    }

    /// Takes a scan made at `now`; returns the broken paths, by subsystem.
    pub fn observe(&mut self, scan: &[Subsystem], now: Instant, wall: SystemTime) -> Vec<Broken> {
        let mut out = Vec::new();
        let mut known = BTreeMap::new();
        let mut empty = BTreeSet::new();
        for s in scan {
            let mut before = self.known.remove(&s.nqn).unwrap_or_default();
            let mut here = BTreeMap::new();
            for c in &s.controllers {
                // The kernel reuses controller names: one now at another address (or of another host) is a new
                // controller, and inherits nothing of the one that had the name (its time broken included).
                let old = before.remove(&c.name).filter(|o| {
                    // By target (`ip:port`): the address line's source part may come and go as it reconnects.
                    o.controller.target() == c.target() && o.controller.host_nqn == c.host_nqn
                });
                // Each kind on its own: reads completing do not make up for writes held (a nexus cut off from its
                // other replicas holds writes while its local replica still answers reads).
                let flows = c.io.flows();
                let progress_at: [(Instant, SystemTime); 2] = std::array::from_fn(|k| match &old {
                    Some(o)
                        if flows[k].in_flight > 0
                            && flows[k].completed == o.controller.io.flows()[k].completed =>
                    {
                        o.progress_at[k]
                    }
                    _ => (now, wall),
                });
                let silent_since = (0..2)
                    .filter(|&k| flows[k].in_flight > 0)
                    .map(|k| progress_at[k])
                    .min_by_key(|p| p.0)
                    .filter(|p| now.duration_since(p.0) >= self.stall);
                let stalled = !self.stall.is_zero() && c.state == "live" && silent_since.is_some();
                let since = match old {
                    Some(o) if c.broken() => o.unusable_since.or(Some((now, wall))),
                    // Silent since its last completion (of the kind held).
                    Some(o) if stalled => o.unusable_since.or(silent_since),
                    None if c.broken() => Some((now, wall)),
                    _ => None,
                };
                if let Some((at, w)) = since
                    && now.duration_since(at) >= self.grace
                {
                    out.push(Broken {
                        nqn: s.nqn.clone(),
                        controller: c.clone(),
                        present: true,
                        seen: w,
                        seen_at: at,
                    });
                }
                here.insert(
                    c.name.clone(),
                    Seen {
                        controller: c.clone(),
                        unusable_since: since,
                        progress_at,
                        stalled,
                    },
                );
            }
            // Vanished controllers matter only when nothing usable is left, and none is being deleted (they were
            // deleted on purpose, one after another).
            let deleting = s.controllers.iter().any(Controller::being_deleted);
            if s.controllers.is_empty() && !before.is_empty() && !self.empty.contains(&s.nqn) {
                // No controller left, first seen so: the subsystem of a deleted last path goes in a moment. Its
                // controllers are kept for the next scan to report, if it is still there then.
                empty.insert(s.nqn.clone());
                here = before;
            } else if !s.controllers.iter().any(|c| c.usable()) && !deleting {
                for (_, gone) in before {
                    let (at, w) = gone.unusable_since.unwrap_or((now, wall));
                    out.push(Broken {
                        nqn: s.nqn.clone(),
                        controller: gone.controller,
                        present: false,
                        seen: w,
                        seen_at: at,
                    });
                }
            }
            known.insert(s.nqn.clone(), here);
        }
        self.known = known;
        self.empty = empty;
        out
    }

    /// The live paths of the last scan that hold I/O none of which completed for the stall timeout, as (subsystem
    /// NQN, controller name).
    pub fn stalled(&self) -> BTreeSet<(String, String)> {
        self.known
            .iter()
            .flat_map(|(nqn, cs)| {
                cs.iter()
                    .filter(|(_, s)| s.stalled)
                    .map(|(name, _)| (nqn.clone(), name.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctrl(name: &str, state: &str, port: u16) -> Controller {
        Controller {
            name: name.into(),
            state: state.into(),
            address: format!("traddr=10.200.0.1,trsvcid={port}"),
            transport: "tcp".into(),
            cntlid: "1".into(),
            host_nqn: "h".into(),
            host_id: "i".into(),
            ana: vec!["optimized".into()],
            io: Default::default(),
        }
    }

    fn subsys(cs: Vec<Controller>) -> Vec<Subsystem> {
        vec![Subsystem {
            name: "nvme-subsys0".into(),
            nqn: "nqn.2026-11.io.keelson:vol-x".into(),
            controllers: cs,
        }]
    }

    #[test]
    fn a_path_is_broken_once_unusable_for_the_grace_period() {
        let mut t = PathTracker::new(Duration::from_millis(200), Duration::ZERO);
        let t0 = Instant::now();
        let w = SystemTime::now();
        assert!(
            t.observe(&subsys(vec![ctrl("nvme0", "live", 4420)]), t0, w)
                .is_empty()
        );
        let down = subsys(vec![ctrl("nvme0", "connecting", 4420)]);
        assert!(
            t.observe(&down, t0 + Duration::from_millis(100), w)
                .is_empty()
        );
        let b = t.observe(&down, t0 + Duration::from_millis(350), w);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].controller.name, "nvme0");
        assert_eq!(
            b[0].seen_at,
            t0 + Duration::from_millis(100),
            "since it was first seen down"
        );
        // Back before anyone acted: no longer broken, and the clock starts again next time.
        assert!(
            t.observe(
                &subsys(vec![ctrl("nvme0", "live", 4420)]),
                t0 + Duration::from_millis(400),
                w
            )
            .is_empty()
        );
        assert!(
            t.observe(&down, t0 + Duration::from_millis(500), w)
                .is_empty()
        );
    }

    #[test]
    fn an_inaccessible_live_path_is_broken_too() {
        let mut t = PathTracker::new(Duration::ZERO, Duration::ZERO);
        let mut c = ctrl("nvme0", "live", 4420);
        c.ana = vec!["inaccessible".into()];
        assert_eq!(
            t.observe(&subsys(vec![c]), Instant::now(), SystemTime::now())
                .len(),
            1
        );
    }

    /// A tracker without grace that has seen one subsystem with two live paths, nvme0 and nvme1; the time and wall
    /// clock it saw them at.
    fn two_live_paths() -> (PathTracker, Instant, SystemTime) {
        let mut t = PathTracker::new(Duration::ZERO, Duration::ZERO);
        let (t0, w) = (Instant::now(), SystemTime::now());
        let both = subsys(vec![
            ctrl("nvme0", "live", 4420),
            ctrl("nvme1", "live", 4421),
        ]);
        assert!(t.observe(&both, t0, w).is_empty());
        (t, t0, w)
    }

    /// An unstage deletes a volume's paths one after another: a scan that finds the first gone and the second
    /// being deleted, or the subsystem empty for a moment, reports nothing. Before, the vanished path was reported
    /// and the cluster agent moved the healthy nexus of a volume being unstaged.
    #[test]
    fn paths_deleted_one_after_another_are_not_reported() {
        let (mut t, t0, w) = two_live_paths();
        assert!(
            t.observe(
                &subsys(vec![
                    ctrl("nvme0", "deleting", 4420),
                    ctrl("nvme1", "live", 4421)
                ]),
                t0,
                w
            )
            .is_empty()
        );
        assert!(
            t.observe(&subsys(vec![ctrl("nvme1", "deleting", 4421)]), t0, w)
                .is_empty(),
            "nvme0 reported while its sibling was being deleted"
        );
        assert!(
            t.observe(&subsys(vec![]), t0, w).is_empty(),
            "nvme1 reported as the subsystem went"
        );
        assert!(t.observe(&[], t0, w).is_empty());
    }

    #[test]
    fn a_vanished_controller_is_reported_only_when_nothing_usable_is_left() {
        let (mut t, t0, w) = two_live_paths();
        // nvme0 deleted while nvme1 serves: nothing to do.
        assert!(
            t.observe(&subsys(vec![ctrl("nvme1", "live", 4421)]), t0, w)
                .is_empty()
        );
        // nvme1 vanishes too: the subsystem has no path left (seen so twice; the first time, as an unstage's last
        // deleted path leaves it for a moment, nothing is reported).
        assert!(t.observe(&subsys(vec![]), t0, w).is_empty());
        let b = t.observe(&subsys(vec![]), t0, w);
        assert_eq!(b.len(), 1);
        assert_eq!(
            (b[0].controller.name.as_str(), b[0].present),
            ("nvme1", false)
        );
    }

    /// A broken controller deleted and its name taken by a new one (another address) within a poll: the new one
    /// starts its own grace. Before, it inherited the dead one's time broken and was reported while still connecting.
    #[test]
    fn a_new_controller_under_a_reused_name_inherits_nothing() {
        let mut t = PathTracker::new(Duration::from_secs(1), Duration::ZERO);
        let (t0, w) = (Instant::now(), SystemTime::now());
        assert!(
            t.observe(&subsys(vec![ctrl("nvme1", "connecting", 4420)]), t0, w)
                .is_empty()
        );
        let later = t0 + Duration::from_millis(1500);
        assert!(
            t.observe(&subsys(vec![ctrl("nvme1", "connecting", 4421)]), later, w)
                .is_empty(),
            "the new nvme1 was reported with the old one's time"
        );
        // Still connecting a grace later: its own failure, reported.
        let b = t.observe(
            &subsys(vec![ctrl("nvme1", "connecting", 4421)]),
            later + Duration::from_secs(1),
            w,
        );
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn a_live_path_with_io_in_flight_and_none_completing_is_broken_after_the_stall_timeout() {
        let mut t = PathTracker::new(Duration::ZERO, Duration::from_secs(1));
        let (t0, w) = (Instant::now(), SystemTime::now());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let with = |in_flight: u64, completed: u64| {
            let mut c = ctrl("nvme0", "live", 4420);
            c.io.writes = crate::node::sysfs::Flow {
                in_flight,
                completed,
            };
            subsys(vec![c])
        };
        // Busy and completing: fine however long it lasts.
        for i in 0..30 {
            assert!(t.observe(&with(16, 100 + i), at(i * 100), w).is_empty());
        }
        // Idle: nothing in flight, nothing completing, fine too.
        for i in 30..50 {
            assert!(t.observe(&with(0, 129), at(i * 100), w).is_empty());
        }
        // I/O in flight from 5.0 s on, none completing: silent since the last scan that saw it idle (4.9 s).
        assert!(t.observe(&with(16, 129), at(5000), w).is_empty());
        assert!(t.observe(&with(16, 129), at(5800), w).is_empty());
        assert!(t.stalled().is_empty(), "not yet");
        let b = t.observe(&with(16, 129), at(5900), w);
        assert_eq!(b.len(), 1, "silent for the stall timeout");
        assert_eq!(b[0].seen_at, at(4900), "since its last progress");
        assert_eq!(
            t.stalled(),
            BTreeSet::from([(
                "nqn.2026-11.io.keelson:vol-x".to_string(),
                "nvme0".to_string()
            )])
        );
        // One completion and it is healthy again.
        assert!(t.observe(&with(15, 130), at(6100), w).is_empty());
        assert!(t.stalled().is_empty());
        // Not watched when the timeout is zero.
        let mut off = PathTracker::new(Duration::ZERO, Duration::ZERO);
        assert!(off.observe(&with(16, 1), at(0), w).is_empty());
        assert!(off.observe(&with(16, 1), at(60_000), w).is_empty());
    }

    /// Writes held with none completing while reads go on completing (a nexus cut off from the cluster agent and
    /// its other replicas waits for consent to fault them, and serves reads from its local replica): the path is
    /// broken after the stall timeout. Before, any completion counted: the host's writes hung for the whole cut.
    #[test]
    fn writes_held_while_reads_complete_are_a_stalled_path() {
        let mut t = PathTracker::new(Duration::ZERO, Duration::from_secs(1));
        let (t0, w) = (Instant::now(), SystemTime::now());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let with = |reads_done: u64| {
            let mut c = ctrl("nvme0", "live", 4420);
            c.io.reads = crate::node::sysfs::Flow {
                in_flight: 4,
                completed: reads_done,
            };
            c.io.writes = crate::node::sysfs::Flow {
                in_flight: 8,
                completed: 50,
            };
            subsys(vec![c])
        };
        assert!(t.observe(&with(100), at(0), w).is_empty());
        assert!(t.observe(&with(200), at(500), w).is_empty());
        let b = t.observe(&with(300), at(1000), w);
        assert_eq!(b.len(), 1, "writes silent for the stall timeout");
        assert_eq!(b[0].seen_at, at(0));
    }
}
