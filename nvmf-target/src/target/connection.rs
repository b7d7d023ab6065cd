//! One NVMe/TCP connection = one queue. The task does the ICReq/ICResp handshake, then reads PDUs: Connect binds the
//! queue to a controller, admin commands run inline, I/O commands run concurrently on the connection task, writes
//! without in-capsule data are fetched with one R2T and reassembled from H2CData. A separate writer task drains
//! responses in batches and sends them with vectored writes. Malformed input ends in a C2HTermReq and a close; the
//! target's other connections are untouched.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc::unbounded_channel;
use tokio_util::codec::FramedRead;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::protocol::codec::{CodecError, PduCodec};
use crate::protocol::command::{Direction, Sqe, admin, fctype, io, sgl_kind};
use crate::protocol::pdu::{CapsuleCmd, DataPdu, IcResp, Pdu, R2t, TermReq, fes};
use crate::protocol::status::Status;

use super::Shared;
use super::admin::AdminCtx;
use super::controller::Controller;
use super::inflight::Inflight;
use super::response::{Backlog, Outgoing, OutgoingTx, Response};
use super::writer::{WriterQueue, write_loop};
use super::{admin as admin_cmds, fabrics, io as io_cmds};

/// SQE byte 1: the fused-operation bits.
const FLAGS_FUSE: u8 = 0x03;
/// SQE byte 1: PRP or SGL for data transfer (PSDT), and its one value fabrics allow (SGL, metadata buffer).
const FLAGS_PSDT: u8 = 0xC0;
const PSDT_SGL: u8 = 0x40;
// Write data the codec receives page-aligned goes to an O_DIRECT file as it is only if that is aligned enough.
const _: () =
    assert!(crate::protocol::codec::DATA_ALIGN.is_multiple_of(crate::block::aligned::ALIGN));

/// Completions the connection task hands its writer before it yields to let them go out. The writer is woken on
/// this task's worker and runs only once this task stops: without a yield, a burst of commands that arrived together
/// is executed to its end before the first response is sent, and host and target take turns instead of working at
/// once (a host waiting for completions sends no new commands). Measured on the two-core machine, the engine and
/// nvmf-perf each pinned to a core, RAM namespace, 4 KiB at QD32: no yield 102-123k reads and 104-121k writes; a
/// yield every 8 completions 222-282k and 218-250k; every 4, 213k / 220k (more system calls); every 16, 173k / 183k.
const COMPLETIONS_PER_YIELD: usize = 8;
/// How long commands in flight when a connection ends may still run: past the 30 s that a nexus gives a child's
/// I/O before it faults the child, so a replicated write has been decided by then. One that has not (a longer
/// child timeout, or a long wait for its range) is dropped, and the nexus counts its end unclean (its children may
/// differ there) and logs the range for the children that are away.
const INFLIGHT_GRACE: std::time::Duration = std::time::Duration::from_secs(45);
/// How long data sent to a host may stay unacknowledged (TCP_USER_TIMEOUT, zero-window probes included) before
/// the connection is ended.
const SEND_STALL: Duration = Duration::from_secs(60);
/// How long a new connection may take to send its ICReq, and then to connect its queue.
const IC_TIMEOUT: Duration = Duration::from_secs(10);
/// In-capsule data allowed on the admin queue and for Fabrics commands, whatever IOCCSZ says.
const ADMIN_IN_CAPSULE: usize = 8192;

/// Idle this long, a connection's peer is probed; unanswered probes, [`KEEPALIVE_PROBES`] of them this far apart, end
/// the connection.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

fn keep_alive_probes(stream: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(stream, sockopt::KeepAlive, &true);
    let _ = setsockopt(
        stream,
        sockopt::TcpKeepIdle,
        &(KEEPALIVE_IDLE.as_secs() as u32),
    );
    let _ = setsockopt(
        stream,
        sockopt::TcpKeepInterval,
        &(KEEPALIVE_INTERVAL.as_secs() as u32),
    );
    let _ = setsockopt(stream, sockopt::TcpKeepCount, &KEEPALIVE_PROBES);
}

/// A write waiting for its H2CData.
struct PendingWrite {
    sqe: Sqe,
    expected: usize,
    received: usize,
    parts: Vec<Bytes>,
    /// The data so far as one buffer, once it came in more than [`MAX_PARTS`] PDUs.
    joined: Option<BytesMut>,
}

/// H2CData PDUs of one write kept as they came; past this, its data is copied into one buffer. A host sends a
/// write's data in as few PDUs as MAXH2CDATA allows (one, for Linux), and each PDU's data may hold on to a whole
/// receive buffer: a host sending it a byte at a time must not make the engine hold a buffer per byte.
const MAX_PARTS: usize = 16;

/// A piece of a write's data smaller than this, with more to come, is kept as a copy of its own: a slice of the
/// receive buffer would keep the whole buffer (up to a large PDU's size) for as long as the write waits for the rest,
/// and a host could hold many such buffers with a few bytes each. Larger pieces have buffers of their own size.
const COPIED_PIECE: usize = 64 << 10;

impl PendingWrite {
    /// Takes the next piece of the data (checked against what is expected by the caller).
    fn take(&mut self, data: Bytes) {
        self.received += data.len();
        let more_to_come = self.received < self.expected;
        match self.joined.as_mut() {
            Some(j) => j.extend_from_slice(&data),
            None => {
                let data = if more_to_come && data.len() < COPIED_PIECE {
                    Bytes::copy_from_slice(&data)
                } else {
                    data
                };
                self.parts.push(data);
                if self.parts.len() > MAX_PARTS && more_to_come {
                    // Sized to what came: grown as the rest comes, never to what the command claims up front.
                    let mut j = BytesMut::with_capacity(self.received);
                    for part in self.parts.drain(..) {
                        j.extend_from_slice(&part);
                    }
                    self.joined = Some(j);
                }
            }
        }
    }
}

enum Fatal {
    /// Send a C2HTermReq, then close.
    Term(TermReq),
    /// Close quietly (host terminated, or disconnected the queue).
    Close,
}

fn term(fes: u16, fei: u32) -> Fatal {
    Fatal::Term(TermReq {
        fes,
        fei,
        header: Bytes::new(),
    })
}

struct Queue {
    shared: Arc<Shared>,
    port_id: u16,
    local: SocketAddr,
    tx: OutgoingTx,
    backlog: Arc<Backlog>,
    sq: Arc<WriterQueue>,
    qid: Option<u16>,
    ctrl: Option<Arc<Controller>>,
    pending: HashMap<u16, PendingWrite>,
    /// The entries of the queue the host connected (its SQSIZE + 1): no more writes than that wait for data.
    entries: usize,
    next_ttag: u16,
    inflight: Inflight<Response>,
}

pub(super) async fn serve(
    shared: Arc<Shared>,
    stream: std::net::TcpStream,
    port_id: u16,
    port_cancel: CancellationToken,
) {
    let Ok(stream) = TcpStream::from_std(stream) else {
        return;
    };
    let peer = stream.peer_addr().ok();
    let Ok(local) = stream.local_addr() else {
        return;
    };
    crate::transport::tune(&stream);
    // A host that stops reading (its receive window shut, or its machine gone) would hold the writer, the responses
    // queued for it and the engine's shutdown for as long as its TCP stack answers probes: data unacknowledged
    // this long ends the connection, as the stack's retransmissions would for a host that answers nothing.
    let _ = nix::sys::socket::setsockopt(
        &stream,
        nix::sys::socket::sockopt::TcpUserTimeout,
        &(SEND_STALL.as_millis() as u32),
    );
    // A host gone without a word (powered off, its link cut) while nothing was being sent is found by TCP's
    // keep-alive probes, whatever keep-alive timeout it asked for (none, with a KATO of 0): its controller, queues
    // and writes waiting for data go then, not at the engine's next restart.
    keep_alive_probes(&stream);
    let (rd, mut wr) = stream.into_split();
    // Until the connection is an I/O queue a PDU carries no more than admin data (see `Queue::admit_data`).
    let mut framed = FramedRead::with_capacity(rd, PduCodec::new(ADMIN_IN_CAPSULE), 256 * 1024);

    let digests = match tokio::time::timeout(IC_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(Pdu::IcReq(req)))) => {
            // Data is placed right after the header (PDO): a host asking for alignment (HPDA) is not served.
            if req.pfv != 0 || req.hpda != 0 {
                let fei = if req.pfv != 0 { 8 } else { 10 };
                let t = TermReq {
                    fes: fes::UNSUPPORTED_PARAMETER,
                    fei,
                    header: Bytes::new(),
                };
                let _ =
                    super::writer::send_now(&mut wr, framed.decoder(), Pdu::C2HTermReq(t)).await;
                return;
            }
            req.digests
        }
        Ok(Some(Ok(_))) => {
            let t = TermReq {
                fes: fes::PDU_SEQUENCE_ERROR,
                fei: 0,
                header: Bytes::new(),
            };
            let _ = super::writer::send_now(&mut wr, framed.decoder(), Pdu::C2HTermReq(t)).await;
            return;
        }
        Ok(Some(Err(CodecError::Protocol {
            fes,
            fei,
            header,
            reason,
        }))) => {
            tracing::warn!(?peer, reason, "bad PDU before ICReq");
            let _ = super::writer::send_now(
                &mut wr,
                framed.decoder(),
                Pdu::C2HTermReq(TermReq { fes, fei, header }),
            )
            .await;
            return;
        }
        _ => return,
    };
    let resp = IcResp {
        pfv: 0,
        cpda: 0,
        digests,
        maxh2cdata: shared.config.maxh2cdata,
    };
    if super::writer::send_now(&mut wr, framed.decoder(), Pdu::IcResp(resp))
        .await
        .is_err()
    {
        return;
    }
    framed.decoder_mut().set_digests(digests);

    let (tx, rx) = unbounded_channel();
    let sq = Arc::new(WriterQueue::default());
    let backlog = Arc::new(Backlog::default());
    let writer = tokio::spawn(write_loop(
        wr,
        framed.decoder().clone(),
        rx,
        sq.clone(),
        backlog.clone(),
    ));
    let mut q = Queue {
        shared,
        port_id,
        local,
        tx: OutgoingTx::new(tx, backlog.clone()),
        backlog,
        sq,
        qid: None,
        ctrl: None,
        pending: HashMap::new(),
        entries: 0,
        next_ttag: 0,
        inflight: Inflight::new(),
    };
    q.run(&mut framed, &port_cancel, peer).await;
    q.finish_inflight().await;
    q.close();
    drop(q);
    let _ = writer.await;
}

async fn cancelled(f: &mut Option<Pin<Box<WaitForCancellationFutureOwned>>>) {
    match f {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

impl Queue {
    async fn run(
        &mut self,
        framed: &mut FramedRead<OwnedReadHalf, PduCodec>,
        port_cancel: &CancellationToken,
        peer: Option<SocketAddr>,
    ) {
        let limit = usize::from(self.shared.config.queue_entries) * 2;
        // Cancellation futures are built once, not on every turn of the loop.
        let port_cancelled = port_cancel.clone().cancelled_owned();
        tokio::pin!(port_cancelled);
        let mut ctrl_cancelled: Option<Pin<Box<WaitForCancellationFutureOwned>>> = None;
        // Completions handed to the writer since the last yield.
        let mut unflushed = 0usize;
        // A peer that never connects the queue (or whose Connect was refused) holds no task and buffer for ever.
        let connect_by = tokio::time::sleep(IC_TIMEOUT);
        tokio::pin!(connect_by);
        loop {
            if ctrl_cancelled.is_none() {
                ctrl_cancelled = self
                    .ctrl
                    .as_ref()
                    .map(|c| Box::pin(c.cancel.clone().cancelled_owned()));
            }
            let fatal = tokio::select! {
                biased;
                _ = &mut port_cancelled => return,
                _ = cancelled(&mut ctrl_cancelled) => return,
                _ = &mut connect_by, if self.qid.is_none() => {
                    tracing::debug!(?peer, "no queue connected in time; closing the connection");
                    return;
                }
                r = self.inflight.next() => {
                    crate::io_threads::busy();
                    self.send(r);
                    unflushed += 1;
                    if unflushed >= COMPLETIONS_PER_YIELD {
                        unflushed = 0;
                        tokio::task::yield_now().await;
                    }
                    continue
                }
                // A host that stops reading completions stops being read.
                _ = self.backlog.drained(), if self.backlog_full(limit) => {
                    if self.backlog.is_closed() { return }
                    continue
                }
                frame = framed.next(), if !self.backlog_full(limit) => match frame {
                    None => return,
                    Some(Ok(pdu)) => {
                        crate::io_threads::busy();
                        match self.on_pdu(pdu) { Ok(()) => { self.admit_data(framed); continue } Err(f) => f }
                    }
                    Some(Err(CodecError::Protocol { fes, fei, header, reason })) => {
                        tracing::warn!(?peer, qid = ?self.qid, reason, fes, fei, "malformed PDU; terminating connection");
                        Fatal::Term(TermReq { fes, fei, header })
                    }
                    Some(Err(e)) => {
                        tracing::debug!(?peer, error = %e, "connection closed");
                        return;
                    }
                },
            };
            if let Fatal::Term(t) = fatal {
                tracing::warn!(?peer, fes = t.fes, fei = t.fei, "sending C2HTermReq");
                self.tx.send(Outgoing::Terminate(t));
            }
            return;
        }
    }

    /// Whether the host has enough unanswered: `limit` commands in flight and responses it has not read, or
    /// [`super::response::MAX_QUEUED_BYTES`] of response data it has not read. No new command is read until it
    /// drains.
    fn backlog_full(&self, limit: usize) -> bool {
        self.inflight.len() + self.backlog.queued() >= limit || self.backlog.full()
    }

    /// Once the host has connected this connection as an I/O queue, PDUs may carry up to MAXH2CDATA; before that,
    /// only what the admin queue takes, so a peer that was not let in cannot make the target reserve megabytes.
    fn admit_data(&self, framed: &mut FramedRead<OwnedReadHalf, PduCodec>) {
        if self.qid.is_some_and(|q| q > 0) {
            let max = (self.shared.config.maxh2cdata as usize).max(ADMIN_IN_CAPSULE);
            framed.decoder_mut().set_max_data(max);
        }
    }

    /// Lets the commands still in flight finish (their answers go nowhere). Dropped half way, a write to a
    /// replicated volume could have reached some replicas and not others, with nothing recorded to bring them
    /// together again: a host whose connection drops must find each block either old or new on every replica.
    /// Bounded, in case one never ends.
    async fn finish_inflight(&mut self) {
        if self.inflight.len() == 0 {
            return;
        }
        let n = self.inflight.len();
        let drain = async {
            while self.inflight.len() > 0 {
                let _ = self.inflight.next().await;
            }
        };
        if tokio::time::timeout(INFLIGHT_GRACE, drain).await.is_err() {
            tracing::warn!(qid = ?self.qid, left = self.inflight.len(), "commands still running after the connection closed; dropped");
        } else {
            tracing::debug!(qid = ?self.qid, commands = n, "commands in flight at close finished");
        }
    }

    /// Releases what the queue held on its controller.
    fn close(&mut self) {
        if let (Some(qid), Some(ctrl)) = (self.qid, &self.ctrl) {
            if qid == 0 {
                ctrl.shutdown("admin queue closed");
            } else {
                ctrl.detach_io_queue(qid);
            }
        }
    }

    fn send(&self, r: Response) {
        self.tx.send(Outgoing::Response(r));
    }

    fn on_pdu(&mut self, pdu: Pdu) -> Result<(), Fatal> {
        match pdu {
            Pdu::CapsuleCmd(c) => self.on_command(c),
            Pdu::H2CData(d) => self.on_h2c_data(d),
            Pdu::H2CTermReq(t) => {
                tracing::info!(fes = t.fes, fei = t.fei, "host terminated the connection");
                Err(Fatal::Close)
            }
            Pdu::IcReq(_) => Err(term(fes::PDU_SEQUENCE_ERROR, 0)),
            _ => Err(term(fes::INVALID_HEADER_FIELD, 0)),
        }
    }

    fn on_command(&mut self, c: CapsuleCmd) -> Result<(), Fatal> {
        self.sq.command_fetched();
        let sqe = c.sqe;
        let cid = sqe.cid();
        if let Some(ctrl) = &self.ctrl {
            ctrl.touch();
        }
        let fabrics = sqe.opcode() == admin::FABRICS;
        // Fused commands are not supported (Identify Controller's FUSES is 0): the second of a pair would run
        // without its condition. And data is described by SGLs only on fabrics (PSDT 01b), as the Linux target
        // requires.
        if sqe.flags() & FLAGS_FUSE != 0 || sqe.flags() & FLAGS_PSDT != PSDT_SGL {
            self.send(Response::status(cid, Status::INVALID_FIELD));
            return Ok(());
        }
        if !c.data.is_empty() {
            let sgl = sqe.sgl();
            let limit = if fabrics || self.qid == Some(0) {
                ADMIN_IN_CAPSULE
            } else {
                self.shared.config.in_capsule_data as usize
            };
            let st = if sgl.kind != sgl_kind::IN_CAPSULE {
                Some(Status::SGL_DESCRIPTOR_TYPE_INVALID)
            } else if sgl.address != 0 {
                Some(Status::SGL_OFFSET_INVALID)
            } else if sgl.length as usize != c.data.len() || c.data.len() > limit {
                Some(Status::SGL_DATA_LENGTH_INVALID)
            } else {
                None
            };
            if let Some(st) = st {
                self.send(Response::status(cid, st));
                return Ok(());
            }
        }
        if fabrics {
            return self.on_fabrics(&sqe, c.data);
        }
        let (Some(qid), Some(ctrl)) = (self.qid, self.ctrl.clone()) else {
            self.send(Response::status(cid, Status::COMMAND_SEQUENCE_ERROR));
            return Ok(());
        };
        if qid == 0 {
            let ctx = AdminCtx {
                shared: &self.shared,
                ctrl: &ctrl,
                local_addr: self.local,
            };
            if let Some(r) = admin_cmds::execute(&ctx, &sqe) {
                self.send(r);
            }
            return Ok(());
        }
        self.on_io(ctrl, sqe, c.data);
        Ok(())
    }

    fn on_fabrics(&mut self, sqe: &Sqe, data: Bytes) -> Result<(), Fatal> {
        let cid = sqe.cid();
        match sqe.fctype() {
            fctype::CONNECT => {
                if self.qid.is_some() {
                    self.send(Response::status(cid, Status::COMMAND_SEQUENCE_ERROR));
                    return Ok(());
                }
                match fabrics::connect(&self.shared, self.port_id, sqe, &data) {
                    Ok((ctrl, cmd)) => {
                        self.qid = Some(cmd.qid);
                        self.entries = usize::from(cmd.sqsize) + 1;
                        self.sq
                            .configure(cmd.qid, cmd.sqsize, cmd.sq_flow_control_disabled());
                        if cmd.qid == 0 {
                            ctrl.set_admin_tx(self.tx.clone());
                            self.shared
                                .tracker
                                .spawn(ctrl.clone().keep_alive_watchdog());
                        }
                        self.send(Response::result(cid, u64::from(ctrl.cntlid)));
                        self.ctrl = Some(ctrl);
                    }
                    Err(r) => self.send(r),
                }
            }
            fctype::PROPERTY_GET | fctype::PROPERTY_SET => {
                let ctrl = match (&self.ctrl, self.qid) {
                    (Some(c), Some(0)) => c.clone(),
                    (Some(_), _) => return self.reply(cid, Err(Status::INVALID_OPCODE)),
                    (None, _) => return self.reply(cid, Err(Status::COMMAND_SEQUENCE_ERROR)),
                };
                let p = crate::protocol::fabrics::Property::from_sqe(sqe);
                let r = if sqe.fctype() == fctype::PROPERTY_GET {
                    ctrl.property_get(p.offset, p.wide)
                        .map(|v| Response::result(cid, v))
                } else {
                    ctrl.property_set(p.offset, p.value)
                        .map(|()| Response::ok(cid))
                };
                return self.reply(cid, r);
            }
            fctype::DISCONNECT if self.qid.is_some_and(|q| q > 0) => {
                self.send(Response::ok(cid));
                return Err(Fatal::Close);
            }
            _ => self.send(Response::status(cid, Status::INVALID_OPCODE)),
        }
        Ok(())
    }

    fn reply(&self, cid: u16, r: Result<Response, Status>) -> Result<(), Fatal> {
        self.send(Response::from((cid, r)));
        Ok(())
    }

    fn on_io(&mut self, ctrl: Arc<Controller>, sqe: Sqe, data: Bytes) {
        let cid = sqe.cid();
        if sqe.opcode() == io::FLUSH && sqe.nsid() == io_cmds::BROADCAST_NSID {
            self.inflight
                .push(io_cmds::flush_all(self.shared.clone(), ctrl, sqe));
            return;
        }
        let ns = match io_cmds::validate(&self.shared, &ctrl, &sqe) {
            Ok(ns) => ns,
            Err(st) => return self.send(Response::status(cid, st)),
        };
        let sgl = sqe.sgl();
        let needs_r2t =
            sqe.direction() == Direction::HostToController && data.is_empty() && sgl.length > 0;
        if needs_r2t {
            if sgl.kind != sgl_kind::TRANSPORT {
                return self.send(Response::status(cid, Status::SGL_DESCRIPTOR_TYPE_INVALID));
            }
            // A host has at most its queue's entries outstanding (the SQSIZE it connected with): one waiting for
            // more writes' data than that is not a host to buffer for (each may be MDTS bytes).
            if self.pending.len() >= self.entries {
                return self.send(Response::status(cid, Status::COMMAND_SEQUENCE_ERROR));
            }
            // A tag still in use (a write whose data never came, 65,536 writes ago) is skipped.
            let mut ttag = self.next_ttag;
            while self.pending.contains_key(&ttag) {
                ttag = ttag.wrapping_add(1);
            }
            self.next_ttag = ttag.wrapping_add(1);
            let expected = sgl.length as usize;
            self.pending.insert(
                ttag,
                PendingWrite {
                    sqe,
                    expected,
                    received: 0,
                    parts: Vec::new(),
                    joined: None,
                },
            );
            self.tx.send(Outgoing::R2t(R2t {
                cccid: cid,
                ttag,
                offset: 0,
                length: sgl.length,
            }));
            return;
        }
        self.inflight.push(io_cmds::execute(ctrl, ns, sqe, data));
    }

    fn on_h2c_data(&mut self, d: DataPdu) -> Result<(), Fatal> {
        let Some(p) = self.pending.get_mut(&d.ttag) else {
            return Err(term(fes::INVALID_HEADER_FIELD, 10));
        };
        if p.sqe.cid() != d.cccid {
            return Err(term(fes::INVALID_HEADER_FIELD, 8));
        }
        if d.offset as usize != p.received {
            return Err(term(fes::DATA_OUT_OF_RANGE, 12));
        }
        if p.received + d.data.len() > p.expected {
            return Err(term(fes::DATA_OUT_OF_RANGE, 16));
        }
        // No data: nothing a host has reason to send, and as many as it likes would cost a part each.
        if d.data.is_empty() {
            return Err(term(fes::INVALID_HEADER_FIELD, 16));
        }
        p.take(d.data);
        if p.received < p.expected {
            return Ok(());
        }
        let Some(p) = self.pending.remove(&d.ttag) else {
            return Ok(());
        };
        let data = if let Some(j) = &p.joined {
            crate::block::aligned::concat([&j[..]], p.expected)
        } else if p.parts.len() == 1 {
            p.parts.into_iter().next().unwrap_or_default()
        } else {
            // Assembled page-aligned: a file-backed namespace writes it with O_DIRECT as it is.
            crate::block::aligned::concat(p.parts.iter().map(|b| &b[..]), p.expected)
        };
        let Some(ctrl) = self.ctrl.clone() else {
            return Ok(());
        };
        // Admitted when the command came, and admitted again now that its data is here: the host may have been
        // fenced (its reservation preempted by a newer nexus) or its path made inaccessible while the data was on its
        // way, which for a paused host can be any time. Written now, it would land over the newer nexus's writes.
        let ns = match io_cmds::validate(&self.shared, &ctrl, &p.sqe) {
            Ok(ns) => ns,
            Err(st) => {
                self.send(Response::status(p.sqe.cid(), st));
                return Ok(());
            }
        };
        self.inflight.push(io_cmds::execute(ctrl, ns, p.sqe, data));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(expected: usize) -> PendingWrite {
        PendingWrite {
            sqe: Sqe::new(0x01, 1),
            expected,
            received: 0,
            parts: Vec::new(),
            joined: None,
        }
    }

    /// A few bytes of a write, sliced from a large receive buffer, with more of the write to come: kept as a copy, so
    /// the buffer is freed once the connection moves on. Before, each such piece kept its whole buffer (a host
    /// sending a byte to each of many writes after large PDUs made the engine hold a large buffer per byte).
    #[test]
    fn a_small_piece_with_more_to_come_keeps_no_receive_buffer() {
        let mut p = pending(4 << 20);
        let buffer = Bytes::from(vec![7u8; 4 << 20]);
        p.take(buffer.slice(0..1));
        assert!(buffer.is_unique(), "the piece holds the receive buffer");
        // The last piece completes the write at once: not copied.
        let mut p = pending(2);
        p.take(Bytes::from_static(b"a"));
        let last = buffer.slice(1..2);
        p.take(last);
        assert!(!buffer.is_unique());
    }

    /// Past [`MAX_PARTS`] pieces the data is gathered into one buffer sized to what came, not to what the command
    /// claims (a host sending a byte per PDU would otherwise have 4 MiB set aside after 17 bytes).
    #[test]
    fn gathered_pieces_take_what_came_not_what_was_claimed() {
        let mut p = pending(4 << 20);
        for i in 0..=MAX_PARTS {
            p.take(Bytes::from(vec![i as u8]));
        }
        let j = p.joined.as_ref().expect("gathered");
        assert_eq!(&j[..], &(0..=MAX_PARTS as u8).collect::<Vec<u8>>()[..]);
        assert!(j.capacity() < 4096, "{} bytes set aside", j.capacity());
    }
}
