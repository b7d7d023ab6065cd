//! What a queue sends back: command responses (a CQE, optionally preceded by C2H data) and the other PDUs a
//! controller originates, as messages to the connection's writer task.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;

use crate::protocol::completion::Cqe;
use crate::protocol::pdu::{R2t, TermReq};
use crate::protocol::status::Status;

/// The completion of one command.
#[derive(Debug)]
pub struct Response {
    pub cqe: Cqe,
    /// Data for the host (C2HData), sent before the CQE.
    pub data: Option<Bytes>,
    /// When it was ready, if its command is one the stage timings sample (see [`crate::block::timing`]).
    pub ready_at: Option<std::time::Instant>,
}

impl Response {
    pub fn status(cid: u16, status: Status) -> Response {
        Response {
            cqe: Cqe::new(cid, status),
            data: None,
            ready_at: None,
        }
    }
    pub fn ok(cid: u16) -> Response {
        Self::status(cid, Status::SUCCESS)
    }
    pub fn result(cid: u16, result: u64) -> Response {
        let mut r = Self::ok(cid);
        r.cqe.result = result;
        r
    }
    pub fn data(cid: u16, data: Bytes) -> Response {
        Response {
            cqe: Cqe::new(cid, Status::SUCCESS),
            data: Some(data),
            ready_at: None,
        }
    }
    /// A failed command with a command-specific result (e.g. Connect's invalid-parameter offset).
    pub fn failed_with(cid: u16, status: Status, result: u64) -> Response {
        let mut r = Self::status(cid, status);
        r.cqe.result = result;
        r
    }
}

impl From<(u16, Result<Response, Status>)> for Response {
    fn from((cid, r): (u16, Result<Response, Status>)) -> Response {
        r.unwrap_or_else(|st| Response::status(cid, st))
    }
}

/// A message to a connection's writer.
#[derive(Debug)]
pub enum Outgoing {
    Response(Response),
    R2t(R2t),
    /// Send a C2HTermReq and close the connection.
    Terminate(TermReq),
}

/// Messages queued for a connection's writer but not yet written, so the reader can stop taking new commands from a
/// host that does not read its completions.
#[derive(Default)]
pub struct Backlog {
    queued: AtomicUsize,
    drained: Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl Backlog {
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
    /// The writer wrote `n` messages.
    pub fn written(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
        self.drained.notify_one();
    }
    pub async fn drained(&self) {
        self.drained.notified().await
    }
    /// The writer is gone: nothing will drain any more.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.drained.notify_one();
    }
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

/// The sending side of a connection's writer channel; counts what it queues.
#[derive(Clone)]
pub struct OutgoingTx {
    tx: UnboundedSender<Outgoing>,
    backlog: Arc<Backlog>,
}

impl OutgoingTx {
    pub fn new(tx: UnboundedSender<Outgoing>, backlog: Arc<Backlog>) -> OutgoingTx {
        OutgoingTx { tx, backlog }
    }
    pub fn send(&self, m: Outgoing) {
        self.backlog.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(m).is_err() {
            self.backlog.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
