//! The path state machine: from successive sysfs scans, which of Keelson's paths are broken and since when. A
//! controller is broken ([`Controller::broken`]: not `live`, or none of its namespace paths optimized or
//! non-optimized) for longer than a grace period, or when it vanished (the kernel gave up on it) and no usable controller of its
//! subsystem is left. Pure: the caller scans and gives the time.

use std::collections::BTreeMap;
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
}

/// What the agent remembers between scans.
pub struct PathTracker {
    grace: Duration,
    /// By subsystem NQN, then controller name.
    known: BTreeMap<String, BTreeMap<String, Seen>>,
}

impl PathTracker {
    pub fn new(grace: Duration) -> PathTracker {
        PathTracker {
            grace,
            known: BTreeMap::new(),
        }
    }

    /// Takes a scan made at `now`; returns the broken paths, by subsystem.
    pub fn observe(&mut self, scan: &[Subsystem], now: Instant, wall: SystemTime) -> Vec<Broken> {
        let mut out = Vec::new();
        let mut known = BTreeMap::new();
        for s in scan {
            let mut before = self.known.remove(&s.nqn).unwrap_or_default();
            let mut here = BTreeMap::new();
            for c in &s.controllers {
                let since = match before.remove(&c.name) {
                    Some(old) if c.broken() => old.unusable_since.or(Some((now, wall))),
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
                    },
                );
            }
            // Vanished controllers matter only when nothing usable is left.
            if !s.controllers.iter().any(|c| c.usable()) {
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
        out
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
        let mut t = PathTracker::new(Duration::from_millis(200));
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
        let mut t = PathTracker::new(Duration::ZERO);
        let mut c = ctrl("nvme0", "live", 4420);
        c.ana = vec!["inaccessible".into()];
        assert_eq!(
            t.observe(&subsys(vec![c]), Instant::now(), SystemTime::now())
                .len(),
            1
        );
    }

    #[test]
    fn a_vanished_controller_is_reported_only_when_nothing_usable_is_left() {
        let mut t = PathTracker::new(Duration::ZERO);
        let (t0, w) = (Instant::now(), SystemTime::now());
        t.observe(
            &subsys(vec![
                ctrl("nvme0", "live", 4420),
                ctrl("nvme1", "live", 4421),
            ]),
            t0,
            w,
        );
        // nvme0 deleted while nvme1 serves: nothing to do.
        assert!(
            t.observe(&subsys(vec![ctrl("nvme1", "live", 4421)]), t0, w)
                .is_empty()
        );
        // nvme1 vanishes too: the subsystem has no path left.
        let b = t.observe(&subsys(vec![]), t0, w);
        assert_eq!(b.len(), 1);
        assert_eq!(
            (b[0].controller.name.as_str(), b[0].present),
            ("nvme1", false)
        );
    }
}
