//! One initiator queue = one TCP connection. Submitters get a command ID from the queue's table and wait on a
//! oneshot; a reader task completes commands from CapsuleResp (or C2HData with SUCCESS), gathers read data, and
//! answers R2Ts with H2CData cut from the write's buffer; a writer task batches outgoing PDUs into vectored writes.
//! When the connection dies every outstanding command fails with `Disconnected`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::block::timing::{self, Stage};
use crate::protocol::codec::PduCodec;
use crate::protocol::command::{Sgl, Sqe};
use crate::protocol::completion::Cqe;
use crate::protocol::pdu::{CapsuleCmd, DataPdu, Digests, IcReq, Pdu, R2t};
use crate::transport::write_parts;

use super::InitiatorError;

/// Largest data payload accepted in one C2HData PDU.
const MAX_RECV_DATA: usize = 16 << 20;
const IC_TIMEOUT: Duration = Duration::from_secs(10);

/// A completed command: its CQE and the data the controller sent (reads, Identify, logs).
#[derive(Debug)]
pub struct Completion {
    pub cqe: Cqe,
    pub data: Bytes,
}

struct Pending {
    done: oneshot::Sender<Result<(Completion, Option<Instant>), InitiatorError>>,
    write: Option<Bytes>,
    read: Vec<Bytes>,
    /// The bytes its data PDUs may bring (its SGL's length; none for a command with data to send), and those
    /// they brought so far: a target sending more, or out of order, is refused, not buffered.
    read_len: usize,
    read_got: usize,
    /// Bytes of its write data the target asked for (R2T) so far: never more than the data in all, so a target
    /// repeating its R2Ts cannot make the queue send (and hold) the data again and again.
    r2t_asked: usize,
    /// Submitted and written to the socket, for a command the stage timings sample.
    sampled: Option<(Instant, Option<Instant>)>,
    /// Which submission it is (its command ID is reused once it completes).
    seq: u64,
    /// Its place in the queue's depth: given back only when the command ends (answered, or the queue failed), not
    /// when its caller stops waiting, so the target never has more commands than the queue's size.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// Bits of a command ID that name its entry in the table; the 4 bits above count the entry's uses (as the Linux
/// host does), so an answer to an ID that completed and was given out again (a target answering twice, or late)
/// names no command instead of completing the new one with the old one's status or data.
const CID_ENTRY_BITS: u32 = 12;

/// The most commands a queue has in flight: one table entry each.
pub const MAX_QUEUE_DEPTH: u16 = 1 << CID_ENTRY_BITS;

#[derive(Default)]
struct CidTable {
    /// Per entry: its generation (the top bits of the ID it gives now), and its command.
    entries: Vec<(u16, Option<Pending>)>,
    free: Vec<u16>,
    /// Drained for good (the queue failed): no command is taken any more, as none would ever be answered.
    drained: bool,
}

impl CidTable {
    /// The command ID `p` is sent with; `Disconnected` once the queue failed (a submission that checked the queue
    /// just before it failed must not wait its whole timeout for an answer no one will give).
    fn insert(&mut self, p: Pending) -> Result<u16, InitiatorError> {
        if self.drained {
            return Err(InitiatorError::Disconnected);
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None if self.entries.len() < usize::from(MAX_QUEUE_DEPTH) => {
                self.entries.push((0, None));
                (self.entries.len() - 1) as u16
            }
            None => {
                return Err(InitiatorError::Protocol(
                    "command ID space exhausted".into(),
                ));
            }
        };
        let e = &mut self.entries[usize::from(i)];
        e.1 = Some(p);
        Ok(i | (e.0 << CID_ENTRY_BITS))
    }
    /// The entry `cid` names, if it is of the entry's current generation.
    fn entry(&mut self, cid: u16) -> Option<&mut (u16, Option<Pending>)> {
        let i = cid & (MAX_QUEUE_DEPTH - 1);
        self.entries
            .get_mut(usize::from(i))
            .filter(|e| e.0 == cid >> CID_ENTRY_BITS)
    }
    fn get_mut(&mut self, cid: u16) -> Option<&mut Pending> {
        self.entry(cid)?.1.as_mut()
    }
    fn remove(&mut self, cid: u16) -> Option<Pending> {
        let e = self.entry(cid)?;
        let p = e.1.take()?;
        e.0 = (e.0 + 1) % (1 << (16 - CID_ENTRY_BITS));
        self.free.push(cid & (MAX_QUEUE_DEPTH - 1));
        Some(p)
    }
    /// Every command in flight, taken out; no more are taken from now on.
    fn drain(&mut self) -> Vec<Pending> {
        self.drained = true;
        let mut out = Vec::new();
        for e in &mut self.entries {
            if let Some(p) = e.1.take() {
                e.0 = (e.0 + 1) % (1 << (16 - CID_ENTRY_BITS));
                out.push(p);
            }
        }
        self.free.clear();
        self.free.extend((0..self.entries.len() as u16).rev());
        out
    }
}

struct Inner {
    qid: u16,
    tx: mpsc::UnboundedSender<(Pdu, Option<u16>)>,
    slots: Arc<Semaphore>,
    table: Mutex<CidTable>,
    /// Numbers the submissions ([`Pending::seq`]).
    submitted: std::sync::atomic::AtomicU64,
    in_capsule: usize,
    maxh2cdata: usize,
    timeout: Duration,
    closed: CancellationToken,
    /// Cancelled once the writer is done: a FIN sent (the queue's owner dropped it), or the connection set to be reset
    /// (closed).
    finished: CancellationToken,
}

impl Inner {
    fn table(&self) -> std::sync::MutexGuard<'_, CidTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes when the commands `cids` reached the socket, for those the stage timings sample.
    fn written(&self, cids: &mut Vec<u16>) {
        let mut t = None;
        for cid in cids.drain(..) {
            if let Some(p) = self.table().get_mut(cid)
                && let Some((submitted, written @ None)) = &mut p.sampled
            {
                let now = *t.get_or_insert_with(Instant::now);
                timing::record(Stage::InitiatorSend, now - *submitted);
                *written = Some(now);
            }
        }
    }

    fn fail_all(&self, e: InitiatorError) {
        for p in self.table().drain() {
            let _ = p.done.send(Err(e.clone()));
        }
    }

    /// Completes the command `cqe` names. One naming no command in flight (an answer to a command answered already,
    /// or never sent) is a protocol error that fails the queue, as Linux's host resets its connection: a target
    /// answering twice could as well have answered a command it never ran, and its next duplicate may name a
    /// command in flight under a reused ID.
    fn complete(&self, cqe: Cqe) -> Result<(), InitiatorError> {
        let Some(p) = self.table().remove(cqe.cid) else {
            return Err(InitiatorError::Protocol(format!(
                "CapsuleResp for CID {}, which no command in flight has",
                cqe.cid
            )));
        };
        let decoded = p.sampled.and_then(|(_, written)| {
            written.map(|w| timing::record_since(Stage::InitiatorRemote, w))
        });
        let (got, asked) = (p.read_got, p.read_len);
        let unfetched = p.write.as_ref().map_or(0, |w| w.len() - p.r2t_asked);
        let data = join(p.read);
        let r = if cqe.status.is_success() && got != asked {
            // A successful read moves every byte it asked for: less would pass for data it is not.
            Err(InitiatorError::Protocol(format!(
                "CID {} completed with {got} of its {asked} bytes of data",
                cqe.cid
            )))
        } else if cqe.status.is_success() && unfetched > 0 {
            // Nor is a write done whose data the target did not all ask for.
            Err(InitiatorError::Protocol(format!(
                "CID {} completed with {unfetched} bytes of its data never asked for",
                cqe.cid
            )))
        } else if cqe.status.is_success() {
            Ok((Completion { cqe, data }, decoded))
        } else {
            Err(InitiatorError::Status(cqe.status))
        };
        let _ = p.done.send(r);
        Ok(())
    }

    fn c2h(&self, d: DataPdu) -> Result<(), InitiatorError> {
        let mut t = self.table();
        let p = t.get_mut(d.cccid).ok_or_else(|| {
            InitiatorError::Protocol(format!("C2HData for unknown CID {}", d.cccid))
        })?;
        if p.read_len == 0 {
            return Err(InitiatorError::Protocol(format!(
                "C2HData for CID {}, which reads nothing",
                d.cccid
            )));
        }
        // An empty data PDU moves nothing (a target streaming them would grow this command's list for ever).
        if d.data.is_empty()
            || d.offset as usize != p.read_got
            || p.read_got + d.data.len() > p.read_len
        {
            return Err(InitiatorError::Protocol(format!(
                "C2HData {}+{} for CID {}: {} of {} bytes came before",
                d.offset,
                d.data.len(),
                d.cccid,
                p.read_got,
                p.read_len
            )));
        }
        p.read_got += d.data.len();
        p.read.push(d.data);
        if d.success {
            if !d.last {
                return Err(InitiatorError::Protocol(
                    "C2HData SUCCESS without LAST_PDU".into(),
                ));
            }
            drop(t);
            return self.complete(Cqe::new(d.cccid, crate::protocol::status::Status::SUCCESS));
        }
        Ok(())
    }

    fn r2t(&self, r: R2t) -> Result<(), InitiatorError> {
        let data = {
            let mut t = self.table();
            let p = t.get_mut(r.cccid).ok_or_else(|| {
                InitiatorError::Protocol(format!("R2T for unknown CID {}", r.cccid))
            })?;
            let w = p
                .write
                .as_ref()
                .ok_or_else(|| InitiatorError::Protocol("R2T for a command without data".into()))?;
            let (start, len) = (r.offset as usize, r.length as usize);
            if len == 0 || start + len > w.len() {
                return Err(InitiatorError::Protocol(format!(
                    "R2T {start}+{len} outside {} bytes",
                    w.len()
                )));
            }
            // In order, each from where the last ended: the data is then asked for whole once the total is, and the
            // completion's check that all of it was asked for holds (two R2Ts for the first half asked for as
            // many bytes as the whole write, and it completed with its second half never sent).
            if start != p.r2t_asked {
                return Err(InitiatorError::Protocol(format!(
                    "R2T {start}+{len} of a {}-byte write after {} bytes asked for",
                    w.len(),
                    p.r2t_asked
                )));
            }
            let data = w.slice(start..start + len);
            p.r2t_asked += len;
            data
        };
        let mut off = 0;
        while off < data.len() {
            let n = self.maxh2cdata.min(data.len() - off);
            let pdu = DataPdu {
                cccid: r.cccid,
                ttag: r.ttag,
                offset: r.offset + off as u32,
                data: data.slice(off..off + n),
                last: off + n == data.len(),
                success: false,
            };
            let _ = self.tx.send((Pdu::H2CData(pdu), None));
            off += n;
        }
        Ok(())
    }
}

fn join(parts: Vec<Bytes>) -> Bytes {
    match parts.len() {
        0 => Bytes::new(),
        1 => parts.into_iter().next().unwrap_or_default(),
        _ => crate::block::aligned::concat(
            parts.iter().map(|p| &p[..]),
            parts.iter().map(Bytes::len).sum(),
        ),
    }
}

/// A connected queue.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

/// What the controller told us in ICResp.
#[derive(Clone, Copy, Debug)]
pub struct Negotiated {
    pub maxh2cdata: u32,
    pub digests: Digests,
}

impl Queue {
    /// Opens the TCP connection and does the ICReq/ICResp exchange. `depth` (at most [`MAX_QUEUE_DEPTH`]) bounds
    /// outstanding commands;
    /// `in_capsule` is the most write data sent inside a command capsule. The queue's reader and writer run on
    /// `runs_on` (an I/O thread's runtime), else on the caller's runtime.
    pub async fn connect(
        addr: std::net::SocketAddr,
        qid: u16,
        depth: usize,
        in_capsule: usize,
        digests: Digests,
        timeout: Duration,
        runs_on: Option<&Handle>,
    ) -> Result<(Queue, Negotiated), InitiatorError> {
        let err = |reason: String| InitiatorError::Connect { addr, reason };
        let stream = tokio::time::timeout(IC_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| err("TCP connect timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        crate::transport::tune(&stream);
        let (rd, mut wr) = stream.into_split();
        let codec = PduCodec::new(MAX_RECV_DATA);
        let mut parts = Vec::new();
        let ic = Pdu::IcReq(IcReq {
            pfv: 0,
            hpda: 0,
            digests,
            maxr2t: 0,
        });
        codec.encode_parts(&ic, &mut BytesMut::new(), &mut parts);
        write_parts(&mut wr, &mut parts)
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut framed = FramedRead::with_capacity(rd, codec, 256 * 1024);
        let resp = match tokio::time::timeout(IC_TIMEOUT, framed.next()).await {
            Ok(Some(Ok(Pdu::IcResp(r)))) => r,
            Ok(Some(Ok(Pdu::C2HTermReq(t)))) => {
                return Err(err(format!("target terminated: FES {:#x}", t.fes)));
            }
            Ok(Some(Ok(p))) => return Err(err(format!("expected ICResp, got {:?}", p.pdu_type()))),
            Ok(Some(Err(e))) => return Err(err(e.to_string())),
            Ok(None) => return Err(err("connection closed during ICReq".into())),
            Err(_) => return Err(err("no ICResp".into())),
        };
        if resp.pfv != 0 || resp.digests != digests || resp.maxh2cdata < 4096 || resp.cpda > 31 {
            return Err(err(format!("unacceptable ICResp {resp:?}")));
        }
        framed.decoder_mut().set_digests(digests);
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            qid,
            tx,
            slots: Arc::new(Semaphore::new(depth.min(usize::from(MAX_QUEUE_DEPTH)))),
            submitted: Default::default(),
            table: Mutex::new(CidTable::default()),
            in_capsule,
            maxh2cdata: resp.maxh2cdata as usize,
            timeout,
            closed: CancellationToken::new(),
            finished: CancellationToken::new(),
        });
        match runs_on {
            // Nothing is buffered past ICResp (the target sends nothing unasked): the socket moves as it is.
            Some(rt) if framed.read_buffer().is_empty() => {
                let stream = framed
                    .into_inner()
                    .reunite(wr)
                    .map_err(|e| err(e.to_string()))?
                    .into_std()
                    .map_err(|e| err(e.to_string()))?;
                let inner = inner.clone();
                rt.spawn(async move {
                    let Ok(stream) = TcpStream::from_std(stream) else {
                        inner.closed.cancel();
                        inner.fail_all(InitiatorError::Disconnected);
                        inner.finished.cancel();
                        return;
                    };
                    let (rd, wr) = stream.into_split();
                    let framed = FramedRead::with_capacity(rd, framed_codec(digests), 256 * 1024);
                    tokio::spawn(read_loop(framed, inner.clone()));
                    write_loop(wr, framed_codec(digests), rx, inner).await;
                });
            }
            _ => {
                tokio::spawn(read_loop(framed, inner.clone()));
                tokio::spawn(write_loop(wr, framed_codec(digests), rx, inner.clone()));
            }
        }
        Ok((
            Queue { inner },
            Negotiated {
                maxh2cdata: resp.maxh2cdata,
                digests,
            },
        ))
    }

    pub fn qid(&self) -> u16 {
        self.inner.qid
    }

    /// Cancelled when the connection is gone.
    pub fn closed(&self) -> CancellationToken {
        self.inner.closed.clone()
    }

    pub fn close(&self) {
        self.inner.closed.cancel();
    }

    /// Closed: failed, or closed by its owner.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Closes the connection and waits (a second at most) until the target has been told (FIN sent).
    pub async fn close_and_wait(&self) {
        self.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.finished.cancelled()).await;
    }

    /// Sends a command and waits for its completion. `write` is host-to-controller data: in the capsule when small
    /// enough, else fetched by the controller with R2T. For reads, set the SGL length in `sqe` first.
    pub async fn submit(
        &self,
        mut sqe: Sqe,
        write: Option<Bytes>,
    ) -> Result<Completion, InitiatorError> {
        let inner = &self.inner;
        let slot = tokio::select! {
            p = inner.slots.clone().acquire_owned() => p.map_err(|_| InitiatorError::Disconnected)?,
            _ = inner.closed.cancelled() => return Err(InitiatorError::Disconnected),
        };
        if inner.closed.is_cancelled() {
            return Err(InitiatorError::Disconnected);
        }
        let (done, rx) = oneshot::channel();
        let mut capsule_data = Bytes::new();
        let mut stash = None;
        if let Some(d) = write {
            if d.len() <= inner.in_capsule {
                sqe.set_sgl(Sgl::in_capsule(d.len() as u32));
                capsule_data = d;
            } else {
                sqe.set_sgl(Sgl::transport(d.len() as u32));
                stash = Some(d);
            }
        }
        let sampled = timing::start(timing::Layer::Initiator);
        let read_len = if capsule_data.is_empty() && stash.is_none() {
            sqe.sgl().length as usize
        } else {
            0
        };
        let seq = inner
            .submitted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cid = inner.table().insert(Pending {
            done,
            write: stash,
            read: Vec::new(),
            read_len,
            read_got: 0,
            r2t_asked: 0,
            sampled: sampled.map(|t| (t, None)),
            seq,
            _slot: slot,
        })?;
        sqe.set_cid(cid);
        if inner
            .tx
            .send((
                Pdu::CapsuleCmd(CapsuleCmd {
                    sqe,
                    data: capsule_data,
                }),
                sampled.map(|_| cid),
            ))
            .is_err()
        {
            inner.table().remove(cid);
            return Err(InitiatorError::Disconnected);
        }
        // Its caller may stop waiting (its own timeout, a sibling piece that failed): the command still has the
        // queue's time to end, or the queue is closed as when this waits it out.
        let mut watch = Watchdog {
            inner: inner.clone(),
            cid,
            seq,
            deadline: tokio::time::Instant::now() + inner.timeout,
            armed: true,
        };
        let r = tokio::time::timeout(inner.timeout, rx).await;
        watch.armed = false;
        match r {
            Ok(Ok(r)) => r.map(|(c, decoded)| {
                if let Some(t) = decoded {
                    timing::record_since(Stage::InitiatorWake, t);
                }
                c
            }),
            Ok(Err(_)) => Err(InitiatorError::Disconnected),
            Err(_) => {
                tracing::warn!(qid = inner.qid, cid, "command timed out; closing the queue");
                inner.closed.cancel();
                Err(InitiatorError::Timeout)
            }
        }
    }
}

/// Set while a submitted command's caller waits; dropped with the caller, it closes the queue if that command is
/// still unanswered once the queue's timeout has passed since it was sent.
struct Watchdog {
    inner: Arc<Inner>,
    cid: u16,
    seq: u64,
    deadline: tokio::time::Instant,
    armed: bool,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.inner.closed.cancel();
            return;
        };
        let (inner, cid, seq, deadline) = (self.inner.clone(), self.cid, self.seq, self.deadline);
        rt.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = inner.closed.cancelled() => return,
            }
            if inner.table().get_mut(cid).is_some_and(|p| p.seq == seq) {
                tracing::warn!(
                    qid = inner.qid,
                    cid,
                    "a command its caller gave up on timed out; closing the queue"
                );
                inner.closed.cancel();
            }
        });
    }
}

fn framed_codec(digests: Digests) -> PduCodec {
    let mut c = PduCodec::new(MAX_RECV_DATA);
    c.set_digests(digests);
    c
}

async fn read_loop(mut framed: FramedRead<OwnedReadHalf, PduCodec>, inner: Arc<Inner>) {
    let why = loop {
        let frame = tokio::select! {
            _ = inner.closed.cancelled() => break InitiatorError::Disconnected,
            f = framed.next() => f,
        };
        crate::io_threads::busy();
        let r = match frame {
            Some(Ok(Pdu::CapsuleResp(cqe))) => inner.complete(cqe),
            Some(Ok(Pdu::C2HData(d))) => inner.c2h(d),
            Some(Ok(Pdu::R2t(r))) => inner.r2t(r),
            Some(Ok(Pdu::C2HTermReq(t))) => Err(InitiatorError::Protocol(format!(
                "target sent C2HTermReq FES {:#x}",
                t.fes
            ))),
            Some(Ok(p)) => Err(InitiatorError::Protocol(format!(
                "unexpected {:?}",
                p.pdu_type()
            ))),
            Some(Err(e)) => Err(InitiatorError::Protocol(e.to_string())),
            None => Err(InitiatorError::Disconnected),
        };
        if let Err(e) = r {
            break e;
        }
    };
    if !matches!(why, InitiatorError::Disconnected) {
        tracing::warn!(qid = inner.qid, error = %why, "queue failed");
    }
    inner.closed.cancel();
    inner.fail_all(InitiatorError::Disconnected);
}

async fn write_loop(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    codec: PduCodec,
    mut rx: mpsc::UnboundedReceiver<(Pdu, Option<u16>)>,
    inner: Arc<Inner>,
) {
    let closed = inner.closed.clone();
    let mut batch = Vec::with_capacity(256);
    let mut parts = Vec::with_capacity(512);
    let mut scratch = BytesMut::with_capacity(64 * 1024);
    let mut cids = Vec::new();
    // Once the queue is closed its commands have been failed to their callers: nothing more is written (not even
    // what was queued), a write under way is given up, and the connection is reset rather than closed, so the
    // kernel drops what it still holds to send instead of delivering commands their callers were told had failed.
    // A writer blocked on a target that stopped reading (its kernel still acknowledging) ends with it too.
    let clean = loop {
        let n = tokio::select! {
            biased;
            _ = closed.cancelled() => break false,
            n = rx.recv_many(&mut batch, 256) => n,
        };
        if n == 0 {
            break true;
        }
        for (pdu, cid) in batch.drain(..) {
            codec.encode_parts(&pdu, &mut scratch, &mut parts);
            cids.extend(cid);
        }
        let written = tokio::select! {
            biased;
            _ = closed.cancelled() => break false,
            w = write_parts(&mut wr, &mut parts) => w,
        };
        if written.is_err() {
            closed.cancel();
            break false;
        }
        inner.written(&mut cids);
    };
    if clean {
        use tokio::io::AsyncWriteExt;
        let _ = wr.shutdown().await;
        drop(wr);
    } else {
        // SO_LINGER 0, and no FIN (which would queue behind the unsent data, still delivered): the close, when the
        // reader's half goes too, sends a reset and drops what was not sent.
        crate::transport::reset_on_close(wr.as_ref());
        wr.forget();
    }
    inner.finished.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::command::io;

    /// A target that asks for a write's data twice over: the queue sends it once, then refuses the repeat (a
    /// protocol error, the queue closed) rather than send and hold it again for every R2T the target repeats.
    type Framed = FramedRead<tokio::net::tcp::OwnedReadHalf, PduCodec>;

    /// A hand-written target on a local port: answers the ICReq, then hands its reader, writer and codec to `then`.
    async fn fake_target<F, Fut, T>(then: F) -> (std::net::SocketAddr, tokio::task::JoinHandle<T>)
    where
        F: FnOnce(Framed, tokio::net::tcp::OwnedWriteHalf, PduCodec) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + Send,
        T: Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let codec = PduCodec::new(1 << 20);
            let mut framed = FramedRead::new(rd, codec.clone());
            assert!(matches!(framed.next().await, Some(Ok(Pdu::IcReq(_)))));
            let mut parts = encode(
                &codec,
                Pdu::IcResp(crate::protocol::pdu::IcResp {
                    pfv: 0,
                    cpda: 0,
                    digests: Digests::default(),
                    maxh2cdata: 4096,
                }),
            );
            write_parts(&mut wr, &mut parts).await.unwrap();
            then(framed, wr, codec).await
        });
        (addr, target)
    }

    fn encode(codec: &PduCodec, pdu: Pdu) -> Vec<Bytes> {
        let mut parts = Vec::new();
        codec.encode_parts(&pdu, &mut BytesMut::new(), &mut parts);
        parts
    }

    /// An 8 KiB write at LBA 0 (sent by R2T: more than the queues here take in a capsule).
    async fn write_8k(q: &Queue) -> Result<Completion, InitiatorError> {
        q.submit(
            Sqe::rw(io::WRITE, 1, 0, 16, 8192, false),
            Some(Bytes::from(vec![7u8; 8192])),
        )
        .await
    }

    async fn queue_to(addr: std::net::SocketAddr) -> Queue {
        Queue::connect(
            addr,
            1,
            4,
            0,
            Digests::default(),
            Duration::from_secs(5),
            None,
        )
        .await
        .unwrap()
        .0
    }

    /// A target that stops reading (SIGSTOP: its kernel still acknowledges, with a zero window) while the queue has
    /// more to send than the socket holds: closing the queue ends its writer at once, instead of the writer waiting
    /// for room for ever, holding the socket and the data of every command its callers were told had failed.
    #[tokio::test]
    async fn closing_a_queue_whose_target_stopped_reading_ends_its_writer() {
        let (addr, _target) = fake_target(|framed, wr, _| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop((framed, wr));
        })
        .await;
        let q = Arc::new(
            Queue::connect(
                addr,
                1,
                16,
                1 << 20,
                Digests::default(),
                Duration::from_secs(30),
                None,
            )
            .await
            .unwrap()
            .0,
        );
        let writes: Vec<_> = (0..16)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move {
                    q.submit(
                        Sqe::rw(io::WRITE, 1, 0, 2047, 1 << 20, false),
                        Some(Bytes::from(vec![7u8; 1 << 20])),
                    )
                    .await
                })
            })
            .collect();
        // 16 MiB cannot all be in the two sockets' buffers: the writer is waiting for room.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!q.inner.finished.is_cancelled());
        let t = Instant::now();
        q.close_and_wait().await;
        assert!(
            q.inner.finished.is_cancelled(),
            "the writer still waits for room {:?} after the close",
            t.elapsed()
        );
        for w in writes {
            let r = w.await.unwrap();
            assert!(matches!(r, Err(InitiatorError::Disconnected)), "{r:?}");
        }
    }

    /// A command submitted as its queue fails (it checked the queue just before): refused as disconnected at once,
    /// not left in the emptied table to wait out its timeout.
    #[test]
    fn a_command_taken_after_the_table_was_emptied_is_refused() {
        let mut t = CidTable::default();
        let pending = || {
            let (done, _) = oneshot::channel();
            Pending {
                done,
                write: None,
                read: Vec::new(),
                read_len: 0,
                read_got: 0,
                r2t_asked: 0,
                sampled: None,
                seq: 0,
                _slot: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
            }
        };
        assert!(t.insert(pending()).is_ok());
        assert_eq!(t.drain().len(), 1);
        assert!(matches!(
            t.insert(pending()),
            Err(InitiatorError::Disconnected)
        ));
    }

    /// A target that says a write succeeded without asking for its data (no R2T), or answers it with a data PDU of
    /// a read: neither is taken for the write done.
    #[tokio::test]
    async fn a_write_answered_without_its_data_fetched_is_not_done() {
        for with_c2h in [false, true] {
            let (addr, _target) = fake_target(move |mut framed, mut wr, codec| async move {
                let Some(Ok(Pdu::CapsuleCmd(c))) = framed.next().await else {
                    panic!("no command");
                };
                let pdu = if with_c2h {
                    Pdu::C2HData(DataPdu {
                        cccid: c.sqe.cid(),
                        ttag: 0,
                        offset: 0,
                        data: Bytes::new(),
                        last: true,
                        success: true,
                    })
                } else {
                    Pdu::CapsuleResp(Cqe::new(
                        c.sqe.cid(),
                        crate::protocol::status::Status::SUCCESS,
                    ))
                };
                let mut parts = encode(&codec, pdu);
                write_parts(&mut wr, &mut parts).await.unwrap();
                while let Some(Ok(_)) = framed.next().await {}
            })
            .await;
            let r = write_8k(&queue_to(addr).await).await;
            // Refused (a success without the data), or the queue closed on the bad PDU.
            assert!(r.is_err(), "with_c2h {with_c2h}: taken for done");
        }
    }

    #[tokio::test]
    async fn a_target_repeating_its_r2ts_gets_the_data_once() {
        let (addr, target) = fake_target(|mut framed, mut wr, codec| async move {
            let send = |pdu: Pdu| encode(&codec, pdu);
            let Some(Ok(Pdu::CapsuleCmd(c))) = framed.next().await else {
                panic!("no command");
            };
            let r2t = R2t {
                cccid: c.sqe.cid(),
                ttag: 1,
                offset: 0,
                length: 8192,
            };
            for _ in 0..3 {
                let mut parts = send(Pdu::R2t(r2t));
                if write_parts(&mut wr, &mut parts).await.is_err() {
                    break;
                }
            }
            // Every H2CData until the queue closes the connection.
            let mut data = 0;
            while let Some(Ok(p)) = framed.next().await {
                if let Pdu::H2CData(d) = p {
                    data += d.data.len();
                }
            }
            data
        })
        .await;
        let r = write_8k(&queue_to(addr).await).await;
        assert!(r.is_err(), "{r:?}");
        let sent = tokio::time::timeout(Duration::from_secs(5), target)
            .await
            .expect("the queue closed the connection")
            .unwrap();
        assert_eq!(sent, 8192, "the data once");
    }

    /// A target that answers a command twice, the second time after the queue gave the command's ID out again
    /// (here with an error status): the late answer completes nothing (the command under that ID now has another
    /// generation), and it fails the queue, as Linux's host resets its connection: the next command fails, it is
    /// never answered with the other's status.
    #[tokio::test]
    async fn a_second_answer_to_a_finished_command_fails_the_queue_not_the_next_command() {
        let (addr, _target) = fake_target(|mut framed, mut wr, codec| async move {
            let read_answer = |cid: u16, fill: u8| {
                encode(
                    &codec,
                    Pdu::C2HData(DataPdu {
                        cccid: cid,
                        ttag: 0,
                        offset: 0,
                        data: Bytes::from(vec![fill; 4096]),
                        last: true,
                        success: true,
                    }),
                )
            };
            let Some(Ok(Pdu::CapsuleCmd(first))) = framed.next().await else {
                panic!("no command");
            };
            let mut parts = read_answer(first.sqe.cid(), 1);
            write_parts(&mut wr, &mut parts).await.unwrap();
            let Some(Ok(Pdu::CapsuleCmd(second))) = framed.next().await else {
                panic!("no second command");
            };
            let mut parts = encode(
                &codec,
                Pdu::CapsuleResp(Cqe::new(
                    first.sqe.cid(),
                    crate::protocol::status::Status::DATA_TRANSFER_ERROR,
                )),
            );
            parts.extend(read_answer(second.sqe.cid(), 2));
            write_parts(&mut wr, &mut parts).await.unwrap();
            std::future::pending::<()>().await
        })
        .await;
        let q = queue_to(addr).await;
        let read = || q.submit(Sqe::rw(io::READ, 1, 0, 8, 4096, false), None);
        let first = read().await.unwrap();
        assert!(first.data.iter().all(|b| *b == 1));
        let second = read().await;
        assert!(
            matches!(second, Err(InitiatorError::Disconnected)),
            "{second:?}"
        );
    }

    /// R2Ts out of order (the first half asked for twice, adding up to the write's length): refused, the queue
    /// fails, and the write is not reported done with its second half never sent.
    #[tokio::test]
    async fn r2ts_that_ask_for_part_of_the_data_twice_fail_the_write() {
        let (addr, _target) = fake_target(|mut framed, mut wr, codec| async move {
            let Some(Ok(Pdu::CapsuleCmd(c))) = framed.next().await else {
                panic!("no command");
            };
            let half = R2t {
                cccid: c.sqe.cid(),
                ttag: 1,
                offset: 0,
                length: 4096,
            };
            let mut parts = encode(&codec, Pdu::R2t(half));
            parts.extend(encode(&codec, Pdu::R2t(half)));
            parts.extend(encode(
                &codec,
                Pdu::CapsuleResp(Cqe::new(
                    c.sqe.cid(),
                    crate::protocol::status::Status::SUCCESS,
                )),
            ));
            let _ = write_parts(&mut wr, &mut parts).await;
            std::future::pending::<()>().await
        })
        .await;
        let r = write_8k(&queue_to(addr).await).await;
        assert!(r.is_err(), "{r:?}");
    }

    /// Empty data PDUs for a read (which would each be kept until the read ends): the queue fails at the first,
    /// well before the command's timeout.
    #[tokio::test]
    async fn an_empty_data_pdu_fails_the_queue() {
        let (addr, _target) = fake_target(|mut framed, mut wr, codec| async move {
            let Some(Ok(Pdu::CapsuleCmd(c))) = framed.next().await else {
                panic!("no command");
            };
            for _ in 0..1000 {
                let mut parts = encode(
                    &codec,
                    Pdu::C2HData(DataPdu {
                        cccid: c.sqe.cid(),
                        ttag: 0,
                        offset: 0,
                        data: Bytes::new(),
                        last: false,
                        success: false,
                    }),
                );
                if write_parts(&mut wr, &mut parts).await.is_err() {
                    break;
                }
            }
            std::future::pending::<()>().await
        })
        .await;
        let q = queue_to(addr).await;
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            q.submit(Sqe::rw(io::READ, 1, 0, 8, 4096, false), None),
        )
        .await
        .expect("failed at once, not at its timeout");
        assert!(r.is_err(), "{r:?}");
    }

    /// A target that answers a read with success but only part of its data (here none): the read fails rather
    /// than hand the nexus fewer bytes than it asked for as if they were the range.
    #[tokio::test]
    async fn a_read_completed_without_all_its_data_fails() {
        let (addr, _target) = fake_target(|mut framed, mut wr, codec| async move {
            let Some(Ok(Pdu::CapsuleCmd(c))) = framed.next().await else {
                panic!("no command");
            };
            let mut parts = encode(
                &codec,
                Pdu::C2HData(DataPdu {
                    cccid: c.sqe.cid(),
                    ttag: 0,
                    offset: 0,
                    data: Bytes::from(vec![1u8; 512]),
                    last: true,
                    success: false,
                }),
            );
            parts.extend(encode(
                &codec,
                Pdu::CapsuleResp(Cqe::new(
                    c.sqe.cid(),
                    crate::protocol::status::Status::SUCCESS,
                )),
            ));
            write_parts(&mut wr, &mut parts).await.unwrap();
            std::future::pending::<()>().await
        })
        .await;
        let q = queue_to(addr).await;
        let r = q
            .submit(Sqe::rw(io::READ, 1, 0, 8, 4096, false), None)
            .await;
        match r {
            Err(InitiatorError::Protocol(m)) => assert!(m.contains("512 of its 4096"), "{m}"),
            other => panic!("a short read passed: {other:?}"),
        }
    }

    /// Callers that stop waiting (their own, shorter timeout) give no slot back while their commands are
    /// unanswered, so the target never holds more than the queue's depth; and an unanswered one still closes the
    /// queue at the queue's timeout. Before, each gave its slot back at once (the target got six commands on a
    /// four-deep queue) and the queue, its commands never answered, was never closed.
    #[tokio::test]
    async fn commands_their_callers_gave_up_on_keep_their_slots_and_time_the_queue_out() {
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = seen.clone();
        let (addr, _target) = fake_target(move |mut framed, wr, _codec| async move {
            let _open = wr;
            while let Some(Ok(p)) = framed.next().await {
                if let Pdu::CapsuleCmd(_) = p {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
        .await;
        let (q, _) = Queue::connect(
            addr,
            1,
            4,
            0,
            Digests::default(),
            Duration::from_secs(1),
            None,
        )
        .await
        .unwrap();
        for _ in 0..6 {
            let mut sqe = Sqe::rw(io::READ, 1, 0, 8, 4096, false);
            sqe.set_sgl(Sgl::transport(4096));
            let _ = tokio::time::timeout(Duration::from_millis(50), q.submit(sqe, None)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "more commands than the queue's depth"
        );
        tokio::time::timeout(Duration::from_secs(3), q.closed().cancelled())
            .await
            .expect("the queue was never closed");
    }
}
