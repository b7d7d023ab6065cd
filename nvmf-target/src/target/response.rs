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

impl Outgoing {
    /// Bytes of data it carries for the host (what [`Backlog`] counts).
    pub fn data_len(&self) -> usize {
        match self {
            Outgoing::Response(r) => r.data.as_ref().map_or(0, Bytes::len),
            _ => 0,
        }
    }
}

/// Messages (and the bytes of their data) queued for a connection's writer but not yet written, so the reader can
/// stop taking new commands from a host that does not read its completions: past a number of messages, or past
/// [`MAX_QUEUED_BYTES`] (a few large reads, or log pages, would otherwise hold gigabytes for such a host).
#[derive(Default)]
pub struct Backlog {
    queued: AtomicUsize,
    bytes: AtomicUsize,
    drained: Notify,
    closed: std::sync::atomic::AtomicBool,
}

/// Bytes of response data a connection may have queued for a host that does not read them before it stops taking
/// commands from that host.
pub const MAX_QUEUED_BYTES: usize = 64 << 20;

impl Backlog {
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
    /// Whether the data queued is past [`MAX_QUEUED_BYTES`].
    pub fn full(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) >= MAX_QUEUED_BYTES
    }
    /// The writer wrote `n` messages carrying `bytes` of data.
    pub fn written(&self, n: usize, bytes: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
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
        let bytes = m.data_len();
        self.backlog.queued.fetch_add(1, Ordering::Relaxed);
        self.backlog.bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.tx.send(m).is_err() {
            self.backlog.queued.fetch_sub(1, Ordering::Relaxed);
            self.backlog.bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that reads none of its completions stops being read once their data passes the bound, however few
    /// they are (4 MiB log pages or reads), and is read again once the writer sent them.
    #[test]
    fn the_backlog_is_full_past_its_bytes_whatever_the_count() {
        let backlog = Arc::new(Backlog::default());
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let tx = OutgoingTx::new(tx, backlog.clone());
        let n = MAX_QUEUED_BYTES / (4 << 20);
        for i in 0..n {
            assert!(!backlog.full(), "{i} responses of 4 MiB");
            tx.send(Outgoing::Response(Response::data(
                i as u16,
                Bytes::from(vec![0; 4 << 20]),
            )));
        }
        assert!(backlog.full());
        assert_eq!(backlog.queued(), n);
        backlog.written(1, 4 << 20);
        assert!(!backlog.full());
        tx.send(Outgoing::Response(Response::ok(1)));
        assert!(!backlog.full(), "a response without data counts no bytes");
    }
}
