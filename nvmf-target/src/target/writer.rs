//! The sending half of a connection: drains every message that is ready, encodes them into one list of segments
//! (payloads are not copied) and sends them with vectored writes, so completions that are ready together share a
//! system call. On a queue whose host disabled SQ flow control, a successful read's data PDU carries the SUCCESS
//! flag and no CapsuleResp follows (NVMe/TCP 1.0 §3.6.2.6, as the Linux target does): one PDU per read, not two.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::block::timing::{self, Stage};
use crate::protocol::codec::PduCodec;
use crate::protocol::pdu::{DataPdu, Pdu};
use crate::transport::write_parts;

use super::response::{Backlog, Outgoing};

/// Most messages encoded into one batch.
const BATCH: usize = 256;

/// Queue facts the writer needs for CQEs: queue id, size, and how many commands were fetched (SQHD).
#[derive(Default)]
pub(super) struct WriterQueue {
    fetched: AtomicU64,
    /// qid << 16 | sqsize, and bit 31 set when SQ flow control is disabled.
    config: AtomicU32,
}

impl WriterQueue {
    pub(super) fn configure(&self, qid: u16, sqsize: u16, flow_control_disabled: bool) {
        let v = (u32::from(qid) << 16)
            | u32::from(sqsize)
            | if flow_control_disabled { 1 << 31 } else { 0 };
        self.config.store(v, Ordering::Relaxed);
    }

    pub(super) fn command_fetched(&self) {
        self.fetched.fetch_add(1, Ordering::Relaxed);
    }

    fn flow_control_disabled(&self) -> bool {
        self.config.load(Ordering::Relaxed) & (1 << 31) != 0
    }

    fn qid_and_head(&self) -> (u16, u16) {
        let c = self.config.load(Ordering::Relaxed);
        let qid = ((c >> 16) & 0x7FFF) as u16;
        if c & (1 << 31) != 0 {
            return (qid, 0xFFFF);
        }
        let entries = u64::from(c & 0xFFFF) + 1;
        (qid, (self.fetched.load(Ordering::Relaxed) % entries) as u16)
    }
}

/// Encodes one PDU and writes it at once (used before the writer task exists).
pub(super) async fn send_now(
    wr: &mut OwnedWriteHalf,
    codec: &PduCodec,
    pdu: Pdu,
) -> std::io::Result<()> {
    let mut parts = Vec::new();
    codec.encode_parts(&pdu, &mut BytesMut::new(), &mut parts);
    write_parts(wr, &mut parts).await
}

pub(super) async fn write_loop(
    mut wr: OwnedWriteHalf,
    codec: PduCodec,
    mut rx: UnboundedReceiver<Outgoing>,
    queue: std::sync::Arc<WriterQueue>,
    backlog: std::sync::Arc<Backlog>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut parts = Vec::with_capacity(BATCH * 2);
    let mut scratch = BytesMut::with_capacity(64 * 1024);
    let mut sampled = Vec::new();
    loop {
        let n = rx.recv_many(&mut batch, BATCH).await;
        if n == 0 {
            break;
        }
        let mut terminate = false;
        let no_flow_control = queue.flow_control_disabled();
        let bytes: usize = batch.iter().map(Outgoing::data_len).sum();
        for msg in batch.drain(..) {
            let pdu = match msg {
                Outgoing::Response(mut r) => {
                    sampled.extend(r.ready_at);
                    let (qid, head) = queue.qid_and_head();
                    r.cqe.sqid = qid;
                    r.cqe.sqhd = head;
                    if let Some(data) = r.data.take().filter(|d| !d.is_empty()) {
                        // The response would say nothing the host does not know: success, no result, no head.
                        let success =
                            no_flow_control && r.cqe.status.is_success() && r.cqe.result == 0;
                        let d = DataPdu {
                            cccid: r.cqe.cid,
                            ttag: 0,
                            offset: 0,
                            data,
                            last: true,
                            success,
                        };
                        codec.encode_parts(&Pdu::C2HData(d), &mut scratch, &mut parts);
                        if success {
                            continue;
                        }
                    }
                    Pdu::CapsuleResp(r.cqe)
                }
                Outgoing::R2t(r) => Pdu::R2t(r),
                Outgoing::Terminate(t) => {
                    terminate = true;
                    Pdu::C2HTermReq(t)
                }
            };
            codec.encode_parts(&pdu, &mut scratch, &mut parts);
            if terminate {
                break;
            }
        }
        if write_parts(&mut wr, &mut parts).await.is_err() {
            break;
        }
        for t in sampled.drain(..) {
            timing::record_since(Stage::TargetReply, t);
        }
        backlog.written(n, bytes);
        if terminate {
            break;
        }
    }
    backlog.close();
    let _ = wr.shutdown().await;
}
