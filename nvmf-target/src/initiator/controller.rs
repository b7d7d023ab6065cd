//! An initiator-side controller: connects the admin queue (Connect, CC.EN, wait for CSTS.RDY, Identify), asks for
//! I/O queues and connects them, and sends Keep Alive every half KATO. Any queue dying or a failed keep-alive marks
//! the whole controller failed (`failed()`), which is what reconnect logic waits on.

use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::protocol::command::{Sgl, Sqe, admin};
use crate::protocol::fabrics::{
    CNTLID_DYNAMIC, Connect, ConnectData, DISABLE_SQ_FLOW_CONTROL, Property, cap_mqes, csts,
    property,
};
use crate::protocol::identify::{self, ControllerData, NamespaceData, cns};
use crate::protocol::pdu::Digests;

use super::queue::{Completion, Queue};
use super::{ConnectOptions, InitiatorError};

const ADMIN_DEPTH: u16 = 32;
/// In-capsule data Fabrics and admin commands may carry, whatever IOCCSZ says.
const ADMIN_IN_CAPSULE: usize = 8192;
const READY_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Controller {
    pub cntlid: u16,
    pub data: ControllerData,
    admin: Queue,
    io: Vec<Queue>,
    failed: CancellationToken,
    /// Cancelled as an orderly [`Controller::shutdown`] begins: its I/O queues closing then is no failure (which
    /// would close the admin queue before it could send CC.SHN).
    stopping: CancellationToken,
    /// Its failure was counted as a connection loss ([`Controller::take_loss`]).
    loss_counted: std::sync::atomic::AtomicBool,
}

/// Closes a queue being brought up if it is dropped before it is kept (a queue's tasks hold its connection open
/// until it is closed, dropped or not): a connect cancelled half way, its caller gone, leaves no connection behind.
struct ClosedUnlessKept {
    queue: Queue,
    kept: bool,
}

impl ClosedUnlessKept {
    fn new(queue: &Queue) -> ClosedUnlessKept {
        ClosedUnlessKept {
            queue: queue.clone(),
            kept: false,
        }
    }

    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for ClosedUnlessKept {
    fn drop(&mut self) {
        if !self.kept {
            self.queue.close();
        }
    }
}

impl Controller {
    /// Connects admin and I/O queues. With `opts.io_queues == 0` only the admin queue (discovery).
    pub async fn connect(opts: &ConnectOptions) -> Result<Controller, InitiatorError> {
        let digests = Digests {
            header: opts.header_digest,
            data: opts.data_digest,
        };
        let (admin, _) = Queue::connect(
            opts.addr,
            0,
            usize::from(ADMIN_DEPTH),
            ADMIN_IN_CAPSULE,
            digests,
            opts.command_timeout,
            None,
        )
        .await?;
        let admin_guard = ClosedUnlessKept::new(&admin);
        let kato = opts.kato.as_millis() as u32;
        // A refused Connect closes the connection (the guard).
        let cntlid =
            fabrics_connect(&admin, opts, 0, ADMIN_DEPTH - 1, kato, CNTLID_DYNAMIC).await?;
        let failed = CancellationToken::new();
        let bring_up = async {
            let cap = admin
                .submit(Property::get_sqe(property::CAP, true), None)
                .await?
                .cqe
                .result;
            admin
                .submit(Property::set_sqe(property::CC, 0x0046_0001, false), None)
                .await?;
            let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
            loop {
                let st = admin
                    .submit(Property::get_sqe(property::CSTS, false), None)
                    .await?
                    .cqe
                    .result as u32;
                if st & csts::CFS != 0 {
                    return Err(InitiatorError::Protocol("controller fatal status".into()));
                }
                if st & csts::RDY != 0 {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(InitiatorError::Timeout);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let id = identify(&admin, cns::CONTROLLER, 0).await?;
            let data = ControllerData::decode(&id)
                .ok_or_else(|| InitiatorError::Protocol("short Identify".into()))?;
            if data.cntlid != cntlid {
                return Err(InitiatorError::Protocol(format!(
                    "Identify CNTLID {} != Connect's {cntlid}",
                    data.cntlid
                )));
            }
            Ok((cap, data))
        };
        let (cap, data) = bring_up.await?;
        let mut c = Controller {
            cntlid,
            data,
            admin,
            io: Vec::new(),
            failed,
            stopping: CancellationToken::new(),
            loss_counted: std::sync::atomic::AtomicBool::new(false),
        };
        // From here the controller closes its queues when dropped.
        admin_guard.keep();
        if opts.io_queues > 0
            && let Err(e) = c.connect_io_queues(opts, cap, digests).await
        {
            c.close();
            return Err(e);
        }
        c.watch(opts.kato);
        Ok(c)
    }

    async fn connect_io_queues(
        &mut self,
        opts: &ConnectOptions,
        cap: u64,
        digests: Digests,
    ) -> Result<(), InitiatorError> {
        let want = u32::from(opts.io_queues - 1);
        let mut sqe = Sqe::new(admin::SET_FEATURES, 0);
        sqe.set_cdw(10, 0x07);
        sqe.set_cdw(11, want | (want << 16));
        let dw0 = self.admin.submit(sqe, None).await?.cqe.dw0();
        let granted = ((dw0 & 0xFFFF).min(dw0 >> 16) + 1).min(u32::from(opts.io_queues)) as u16;
        let mut depth = opts
            .queue_depth
            .min(cap_mqes(cap).saturating_add(1))
            .min(super::queue::MAX_QUEUE_DEPTH);
        if self.data.maxcmd > 0 {
            depth = depth.min(self.data.maxcmd);
        }
        let in_capsule = (self.data.ioccsz as usize * 16).saturating_sub(64);
        for qid in 1..=granted {
            let (q, _) = Queue::connect(
                opts.addr,
                qid,
                usize::from(depth),
                in_capsule,
                digests,
                opts.command_timeout,
                opts.io_threads
                    .as_ref()
                    .map(|t| t.handle(usize::from(qid) - 1)),
            )
            .await?;
            let guard = ClosedUnlessKept::new(&q);
            // A queue holds at least two entries (SQSIZE is 0's based and 0 is invalid); `depth` bounds what is
            // outstanding.
            fabrics_connect(&q, opts, qid, depth.max(2) - 1, 0, self.cntlid).await?;
            self.io.push(q);
            guard.keep();
        }
        Ok(())
    }

    /// Marks the controller failed when a queue dies; sends keep-alives.
    fn watch(&self, kato: Duration) {
        let queues: Vec<Queue> = std::iter::once(self.admin.clone())
            .chain(self.io.iter().cloned())
            .collect();
        for q in queues {
            let failed = self.failed.clone();
            let stopping = self.stopping.clone();
            let admin = q.qid() == 0;
            tokio::spawn(async move {
                let closed = q.closed();
                tokio::select! {
                    _ = closed.cancelled() => {
                        if admin || !stopping.is_cancelled() {
                            failed.cancel();
                        }
                    }
                    _ = failed.cancelled() => q.close(),
                }
            });
        }
        if kato.is_zero() {
            return;
        }
        let admin = self.admin.clone();
        let failed = self.failed.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(kato / 2);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = failed.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // Unanswered within the keep-alive timeout, the controller is as good as gone (a node powered
                // off or cut off sends no reset): its I/O fails now, not after each command's own timeout.
                match tokio::time::timeout(kato, admin.submit(Sqe::new(admin::KEEP_ALIVE, 0), None))
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "keep-alive failed");
                        failed.cancel();
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(
                            kato_ms = kato.as_millis() as u64,
                            "keep-alive unanswered: the controller is declared dead"
                        );
                        failed.cancel();
                        return;
                    }
                }
            }
        });
    }

    pub fn failed(&self) -> CancellationToken {
        self.failed.clone()
    }

    /// Once one of its queues closed (at once: [`Controller::failed`] follows a task's hop later), the first call
    /// says true, every other false: whoever sees the failure first counts it as one connection loss.
    pub fn take_loss(&self) -> bool {
        let failed = self.failed.is_cancelled()
            || self.admin.is_closed()
            || self.io.iter().any(Queue::is_closed);
        failed
            && !self
                .loss_counted
                .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    pub fn is_failed(&self) -> bool {
        self.failed.is_cancelled()
    }

    pub fn io_queues(&self) -> &[Queue] {
        &self.io
    }

    pub fn admin(&self) -> &Queue {
        &self.admin
    }

    pub async fn identify_namespace(&self, nsid: u32) -> Result<NamespaceData, InitiatorError> {
        let b = identify(&self.admin, cns::NAMESPACE, nsid).await?;
        NamespaceData::decode(&b)
            .ok_or_else(|| InitiatorError::Protocol("short Identify namespace".into()))
    }

    pub async fn active_namespaces(&self) -> Result<Vec<u32>, InitiatorError> {
        let b = identify(&self.admin, cns::ACTIVE_NAMESPACES, 0).await?;
        Ok(b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .take_while(|&n| n != 0)
            .collect())
    }

    /// Get Log Page of `len` bytes at `offset`.
    pub async fn get_log_page(
        &self,
        lid: u8,
        offset: u64,
        len: u32,
        lsp: u8,
    ) -> Result<Bytes, InitiatorError> {
        let numd = len / 4 - 1;
        let mut sqe = Sqe::new(admin::GET_LOG_PAGE, 0xFFFF_FFFF);
        sqe.set_cdw(
            10,
            u32::from(lid) | (u32::from(lsp & 0x7F) << 8) | ((numd & 0xFFFF) << 16),
        );
        sqe.set_cdw(11, numd >> 16);
        sqe.set_cdw(12, offset as u32);
        sqe.set_cdw(13, (offset >> 32) as u32);
        sqe.set_sgl(Sgl::transport(len));
        Ok(self.admin.submit(sqe, None).await?.data)
    }

    /// Closes every queue, I/O queues first (the target tears the controller down when the admin queue goes).
    pub fn close(&self) {
        self.failed.cancel();
        for q in &self.io {
            q.close();
        }
        self.admin.close();
    }

    /// Orderly shutdown, in the Linux host's order: the I/O queues' connections closed (and the target told),
    /// then CC.SHN = normal on the admin queue, then the admin queue closed. A target never sees I/O queues
    /// outlive their controller. The answer to CC.SHN (for those who care: an error if the controller had failed).
    pub async fn shutdown(&self) -> Result<(), InitiatorError> {
        self.stopping.cancel();
        futures_util::future::join_all(self.io.iter().map(Queue::close_and_wait)).await;
        let shn = self
            .admin
            .submit(Property::set_sqe(property::CC, 0x0046_4001, false), None)
            .await
            .map(drop);
        self.close();
        shn
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.close();
    }
}

async fn identify(q: &Queue, cns: u8, nsid: u32) -> Result<Bytes, InitiatorError> {
    let mut sqe = Sqe::new(admin::IDENTIFY, nsid);
    sqe.set_cdw(10, u32::from(cns));
    sqe.set_sgl(Sgl::transport(identify::IDENTIFY_LEN as u32));
    let Completion { data, .. } = q.submit(sqe, None).await?;
    Ok(data)
}

async fn fabrics_connect(
    q: &Queue,
    opts: &ConnectOptions,
    qid: u16,
    sqsize: u16,
    kato: u32,
    cntlid: u16,
) -> Result<u16, InitiatorError> {
    let sqe = Connect {
        recfmt: 0,
        qid,
        sqsize,
        // I/O queues without SQ flow control: this host never needs the head pointer (it keeps at most a queue's
        // entries outstanding), and the target may then end a read with its data PDU alone.
        cattr: if qid > 0 { DISABLE_SQ_FLOW_CONTROL } else { 0 },
        kato,
    }
    .to_sqe();
    let data = ConnectData {
        hostid: opts.hostid,
        cntlid,
        subnqn: opts.subnqn.clone(),
        hostnqn: opts.hostnqn.clone(),
    };
    let c = q.submit(sqe, Some(data.encode())).await?;
    Ok(c.cqe.dw0() as u16)
}
