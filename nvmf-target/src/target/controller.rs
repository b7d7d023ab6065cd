//! A controller: one host's association with a subsystem through one port, created by an admin-queue Connect and
//! joined by its I/O queues. It holds the controller registers (CC/CSTS), negotiated features, the asynchronous
//! event machinery (outstanding AERs, queued events, masks until the host reads the log), I/O counters, and the
//! keep-alive watchdog that tears the controller down when the host goes silent.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::protocol::fabrics::{cap_register, cc, csts, property};
use crate::protocol::log::{SmartCounters, aen, lid};
use crate::protocol::status::Status;

use super::response::{Outgoing, OutgoingTx, Response};
use super::subsystem::Subsystem;

/// NVMe version reported: 1.3.
pub const VERSION: u32 = 0x0001_0300;
/// Outstanding AERs allowed, 0's based (AERL).
pub const AERL: u8 = 3;
/// Events queued while no AER is outstanding; older ones are dropped beyond this.
const MAX_QUEUED_EVENTS: usize = 16;

#[derive(Default)]
pub struct Counters {
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub read_commands: AtomicU64,
    pub write_commands: AtomicU64,
    pub media_errors: AtomicU64,
}

struct State {
    cc: u32,
    csts: u32,
    kato_ms: u32,
    io_queues: u16,
    connected_queues: BTreeSet<u16>,
    aen_config: u32,
    aen_masked: u32,
    aer_waiting: VecDeque<u16>,
    aer_events: VecDeque<u32>,
    admin_tx: Option<OutgoingTx>,
    changed_nsids: BTreeSet<u32>,
    write_cache: bool,
}

pub struct Controller {
    pub cntlid: u16,
    pub subsystem: Arc<Subsystem>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub port_id: u16,
    /// Cancelled when the controller goes away; every queue connection of it closes.
    pub cancel: CancellationToken,
    pub counters: Counters,
    /// Queue depth (MQES + 1) this target allows.
    pub max_queue_entries: u16,
    max_io_queues: u16,
    epoch: Instant,
    last_activity_ms: AtomicU64,
    state: Mutex<State>,
}

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cntlid: u16,
        subsystem: Arc<Subsystem>,
        hostnqn: String,
        hostid: [u8; 16],
        port_id: u16,
        kato_ms: u32,
        max_queue_entries: u16,
        max_io_queues: u16,
        parent: &CancellationToken,
    ) -> Controller {
        Controller {
            cntlid,
            subsystem,
            hostnqn,
            hostid,
            port_id,
            cancel: parent.child_token(),
            counters: Counters::default(),
            max_queue_entries,
            max_io_queues,
            epoch: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            state: Mutex::new(State {
                cc: 0,
                csts: 0,
                kato_ms,
                io_queues: 0,
                connected_queues: BTreeSet::new(),
                aen_config: 0,
                aen_masked: 0,
                aer_waiting: VecDeque::new(),
                aer_events: VecDeque::new(),
                admin_tx: None,
                changed_nsids: BTreeSet::new(),
                write_cache: true,
            }),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_admin_tx(&self, tx: OutgoingTx) {
        self.st().admin_tx = Some(tx);
    }

    /// Tears the controller down: closes all its queues and forgets it.
    pub fn shutdown(&self, reason: &str) {
        if !self.cancel.is_cancelled() {
            tracing::info!(cntlid = self.cntlid, subnqn = %self.subsystem.nqn, host = %self.hostnqn, reason, "controller removed");
        }
        self.cancel.cancel();
        self.subsystem.remove_controller(self);
    }

    /// Records host activity (keep-alive, or any command: traffic-based keep-alive).
    pub fn touch(&self) {
        self.last_activity_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn kato_ms(&self) -> u32 {
        self.st().kato_ms
    }
    pub fn set_kato_ms(&self, ms: u32) {
        self.st().kato_ms = ms;
        self.touch();
    }

    /// Runs until the controller is cancelled or the host misses its keep-alive deadline.
    pub async fn keep_alive_watchdog(self: Arc<Self>) {
        self.touch();
        loop {
            let kato = u64::from(self.kato_ms());
            let tick = if kato == 0 {
                1000
            } else {
                (kato / 4).clamp(50, 1000)
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(tick)) => {}
            }
            let idle = (self.epoch.elapsed().as_millis() as u64)
                .saturating_sub(self.last_activity_ms.load(Ordering::Relaxed));
            if kato != 0 && idle > kato {
                tracing::warn!(
                    cntlid = self.cntlid,
                    idle_ms = idle,
                    kato_ms = kato,
                    "keep-alive timeout"
                );
                self.shutdown("keep-alive timeout");
                return;
            }
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.st().csts & csts::RDY != 0
    }

    pub fn property_get(&self, offset: u32, wide: bool) -> Result<u64, Status> {
        let s = self.st();
        let v = match (offset, wide) {
            (property::CAP, true) => cap_register(self.max_queue_entries - 1, 30),
            (property::VS, false) => u64::from(VERSION),
            (property::CC, false) => u64::from(s.cc),
            (property::CSTS, false) => u64::from(s.csts),
            _ => return Err(Status::INVALID_FIELD),
        };
        Ok(v)
    }

    pub fn property_set(&self, offset: u32, value: u64) -> Result<(), Status> {
        if offset != property::CC {
            return Err(Status::INVALID_FIELD);
        }
        let value = value as u32;
        let mut s = self.st();
        let was_enabled = s.cc & cc::EN != 0;
        s.cc = value;
        if value & cc::SHN_MASK != 0 {
            s.csts = (s.csts & !csts::RDY) | csts::SHST_COMPLETE;
        } else if value & cc::EN != 0 {
            s.csts = csts::RDY;
        } else if was_enabled {
            s.csts = 0;
        }
        Ok(())
    }

    /// Set Features Number of Queues: grants up to the target's limit; returns the 0's based count granted.
    pub fn grant_io_queues(&self, requested: u16) -> u16 {
        let granted = requested.saturating_add(1).min(self.max_io_queues);
        let mut s = self.st();
        if s.io_queues == 0 {
            s.io_queues = granted;
        }
        s.io_queues - 1
    }

    pub fn granted_io_queues(&self) -> u16 {
        self.st().io_queues
    }

    /// Marks I/O queue `qid` connected; false if it is out of range or already connected.
    pub fn attach_io_queue(&self, qid: u16) -> bool {
        let mut s = self.st();
        qid >= 1 && qid <= s.io_queues && s.connected_queues.insert(qid)
    }

    pub fn detach_io_queue(&self, qid: u16) {
        self.st().connected_queues.remove(&qid);
    }

    pub fn io_queue_count(&self) -> usize {
        self.st().connected_queues.len()
    }

    pub fn aen_config(&self) -> u32 {
        self.st().aen_config
    }
    pub fn set_aen_config(&self, v: u32) {
        self.st().aen_config = v;
    }
    pub fn write_cache(&self) -> bool {
        self.st().write_cache
    }
    pub fn set_write_cache(&self, on: bool) {
        self.st().write_cache = on;
    }

    /// An Asynchronous Event Request arrived: returns an event to complete it with now, or parks it.
    pub fn submit_aer(&self, cid: u16) -> Result<Option<u32>, Status> {
        let mut s = self.st();
        if let Some(ev) = s.aer_events.pop_front() {
            return Ok(Some(ev));
        }
        if s.aer_waiting.len() > usize::from(AERL) {
            return Err(Status::ASYNC_EVENT_LIMIT_EXCEEDED);
        }
        s.aer_waiting.push_back(cid);
        Ok(None)
    }

    /// Raises a notice if the host enabled it and has read the log since the last one of its kind.
    fn raise(&self, config_bit: u32, dw0: u32) {
        let mut s = self.st();
        if s.aen_config & config_bit == 0 || s.aen_masked & config_bit != 0 {
            return;
        }
        s.aen_masked |= config_bit;
        match s.aer_waiting.pop_front() {
            Some(cid) => {
                if let Some(tx) = &s.admin_tx {
                    tx.send(Outgoing::Response(Response::result(cid, u64::from(dw0))));
                }
            }
            None => {
                if s.aer_events.len() == MAX_QUEUED_EVENTS {
                    s.aer_events.pop_front();
                }
                s.aer_events.push_back(dw0);
            }
        }
    }

    /// The host read a log page; re-enables the notice tied to it (unless RAE kept it).
    pub fn log_read(&self, log_page: u8, retain: bool) {
        if retain {
            return;
        }
        let bit = match log_page {
            lid::ANA => aen::CONFIG_ANA_CHANGE,
            lid::CHANGED_NAMESPACES => aen::CONFIG_NS_ATTR,
            lid::DISCOVERY => aen::CONFIG_DISCOVERY_CHANGE,
            _ => return,
        };
        self.st().aen_masked &= !bit;
    }

    pub fn ana_changed(&self) {
        self.raise(
            aen::CONFIG_ANA_CHANGE,
            aen::dw0(aen::TYPE_NOTICE, aen::NOTICE_ANA_CHANGE, lid::ANA),
        );
    }

    pub fn discovery_changed(&self) {
        self.raise(
            aen::CONFIG_DISCOVERY_CHANGE,
            aen::dw0(
                aen::TYPE_NOTICE,
                aen::NOTICE_DISCOVERY_CHANGE,
                lid::DISCOVERY,
            ),
        );
    }

    pub fn namespace_changed(&self, nsid: u32) {
        self.st().changed_nsids.insert(nsid);
        self.raise(
            aen::CONFIG_NS_ATTR,
            aen::dw0(
                aen::TYPE_NOTICE,
                aen::NOTICE_NS_CHANGED,
                lid::CHANGED_NAMESPACES,
            ),
        );
    }

    /// The changed-namespace list, cleared unless `retain`.
    pub fn take_changed_namespaces(&self, retain: bool) -> Vec<u32> {
        let mut s = self.st();
        let v = s.changed_nsids.iter().copied().collect();
        if !retain {
            s.changed_nsids.clear();
        }
        v
    }

    pub fn smart(&self) -> SmartCounters {
        let c = &self.counters;
        SmartCounters {
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            read_commands: c.read_commands.load(Ordering::Relaxed),
            write_commands: c.write_commands.load(Ordering::Relaxed),
            media_errors: c.media_errors.load(Ordering::Relaxed),
            error_log_entries: 0,
        }
    }
}
