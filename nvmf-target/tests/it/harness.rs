//! Shared set-up: an in-process target with a memory namespace on an ephemeral loopback port, and a raw PDU client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use nvmf_target::block::memory::MemoryDevice;
use nvmf_target::protocol::codec::{CodecError, PduCodec};
use nvmf_target::protocol::command::Sqe;
use nvmf_target::protocol::completion::Cqe;
use nvmf_target::protocol::fabrics::{CNTLID_DYNAMIC, Connect, ConnectData, Property, property};
use nvmf_target::protocol::nqn::Nqn;
use nvmf_target::protocol::pdu::{CapsuleCmd, Digests, IcReq, Pdu};
use nvmf_target::target::{SubsystemSpec, Target, TargetConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::FramedRead;

pub const NQN: &str = "nqn.2026-11.io.keelson:vol-00000000-0000-4000-8000-0000000000aa";
pub const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
pub const HOSTID: [u8; 16] = [0x11; 16];
/// Namespace size in the tests.
pub const NS_SIZE: u64 = 64 << 20;

pub struct TestTarget {
    pub target: Target,
    pub addr: SocketAddr,
}

/// A target on 127.0.0.1:<ephemeral> with one 64 MiB memory namespace (NSID 1). `hosts` empty = any host.
pub async fn target_with(hosts: &[&str], config: TargetConfig) -> TestTarget {
    target_made(hosts, config, false).await
}

/// [`target`] whose subsystem is single-path, as a replica's (`SubsystemSpec::single_path`).
pub async fn single_path_target() -> TestTarget {
    target_made(&[], TargetConfig::default(), true).await
}

async fn target_made(hosts: &[&str], config: TargetConfig, single_path: bool) -> TestTarget {
    let target = Target::new(config);
    let l = target
        .add_listener("127.0.0.1:0".parse().unwrap(), 0)
        .await
        .unwrap();
    target
        .create_subsystem(SubsystemSpec {
            nqn: Nqn::parse(NQN).unwrap(),
            serial: String::new(),
            model: String::new(),
            allow_any_host: hosts.is_empty(),
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            single_path,
        })
        .unwrap();
    let dev = Arc::new(MemoryDevice::new(NS_SIZE, 512));
    target
        .add_namespace(NQN, 1, uuid::Uuid::new_v4(), 1, dev)
        .unwrap();
    TestTarget {
        target,
        addr: l.address,
    }
}

pub async fn target() -> TestTarget {
    target_with(&[], TargetConfig::default()).await
}

/// A hand-driven NVMe/TCP host connection for malformed-input tests.
pub struct Raw {
    pub rd: FramedRead<OwnedReadHalf, PduCodec>,
    pub wr: OwnedWriteHalf,
    codec: PduCodec,
    next_cid: u16,
    /// This end's address.
    pub local: SocketAddr,
}

pub enum Recv {
    Pdu(Pdu),
    Closed,
    Error(CodecError),
}

impl Raw {
    pub async fn open(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let local = s.local_addr().unwrap();
        let (rd, wr) = s.into_split();
        Raw {
            rd: FramedRead::new(rd, PduCodec::new(1 << 20)),
            wr,
            codec: PduCodec::new(1 << 20),
            next_cid: 0,
            local,
        }
    }

    /// Opens a connection and completes ICReq/ICResp.
    pub async fn ready(addr: SocketAddr) -> Raw {
        let mut r = Raw::open(addr).await;
        r.send(Pdu::IcReq(IcReq {
            pfv: 0,
            hpda: 0,
            digests: Digests::default(),
            maxr2t: 0,
        }))
        .await;
        match r.recv().await {
            Recv::Pdu(Pdu::IcResp(_)) => r,
            _ => panic!("no ICResp"),
        }
    }

    pub async fn send(&mut self, pdu: Pdu) {
        self.try_send(pdu).await.unwrap();
    }

    /// Sends all the data an R2T asked for, every byte `fill`, as one H2CData PDU (to a target that may have
    /// closed the connection).
    pub async fn send_data(
        &mut self,
        r2t: &nvmf_target::protocol::pdu::R2t,
        fill: u8,
    ) -> std::io::Result<()> {
        self.try_send(Pdu::H2CData(nvmf_target::protocol::pdu::DataPdu {
            cccid: r2t.cccid,
            ttag: r2t.ttag,
            offset: r2t.offset,
            data: Bytes::from(vec![fill; r2t.length as usize]),
            last: true,
            success: false,
        }))
        .await
    }

    /// [`Raw::send`] to a target that may have closed the connection.
    pub async fn try_send(&mut self, pdu: Pdu) -> std::io::Result<()> {
        let mut parts = Vec::new();
        self.codec
            .encode_parts(&pdu, &mut BytesMut::new(), &mut parts);
        for p in parts {
            self.wr.write_all(&p).await?;
        }
        Ok(())
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        let _ = self.wr.write_all(b).await;
    }

    pub async fn recv(&mut self) -> Recv {
        match tokio::time::timeout(Duration::from_secs(5), self.rd.next()).await {
            Err(_) => panic!("target sent nothing within 5 s (hang)"),
            Ok(None) => Recv::Closed,
            Ok(Some(Ok(p))) => Recv::Pdu(p),
            Ok(Some(Err(e))) => Recv::Error(e),
        }
    }

    /// Expects a CapsuleResp and returns it.
    pub async fn cqe(&mut self) -> Cqe {
        loop {
            match self.recv().await {
                Recv::Pdu(Pdu::CapsuleResp(c)) => return c,
                Recv::Pdu(Pdu::C2HData(_)) => continue,
                Recv::Pdu(p) => panic!("expected CapsuleResp, got {p:?}"),
                Recv::Closed => panic!("connection closed, expected CapsuleResp"),
                Recv::Error(e) => panic!("decode error {e}"),
            }
        }
    }

    /// Expects a C2HTermReq with `fes` followed by the connection closing.
    pub async fn expect_term(&mut self, fes: u16) {
        match self.recv().await {
            Recv::Pdu(Pdu::C2HTermReq(t)) => assert_eq!(t.fes, fes, "FES (FEI {})", t.fei),
            Recv::Pdu(p) => panic!("expected C2HTermReq, got {p:?}"),
            Recv::Closed => panic!("closed without C2HTermReq"),
            Recv::Error(e) => panic!("decode error {e}"),
        }
        assert!(
            matches!(self.recv().await, Recv::Closed),
            "connection must close after C2HTermReq"
        );
    }

    pub async fn cmd(&mut self, mut sqe: Sqe, data: Bytes) -> Cqe {
        self.next_cid += 1;
        sqe.set_cid(self.next_cid);
        self.send(Pdu::CapsuleCmd(CapsuleCmd { sqe, data })).await;
        let c = self.cqe().await;
        assert_eq!(c.cid, self.next_cid);
        c
    }

    pub async fn connect_cmd(
        &mut self,
        qid: u16,
        kato: u32,
        cntlid: u16,
        subnqn: &str,
        host: &str,
    ) -> Cqe {
        self.connect_cmd_with(qid, kato, cntlid, subnqn, host, 0)
            .await
    }

    /// Connect with the given connect attributes (CATTR).
    pub async fn connect_cmd_with(
        &mut self,
        qid: u16,
        kato: u32,
        cntlid: u16,
        subnqn: &str,
        host: &str,
        cattr: u8,
    ) -> Cqe {
        let sqe = Connect {
            recfmt: 0,
            qid,
            sqsize: 31,
            cattr,
            kato,
        }
        .to_sqe();
        let data = ConnectData {
            hostid: HOSTID,
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: host.into(),
        };
        self.cmd(sqe, data.encode()).await
    }

    /// Sends a write of `len` bytes at LBA 0 of NSID 1 as command `cid` without its data, and returns the target's
    /// R2T for it.
    pub async fn write_awaiting_data(
        &mut self,
        cid: u16,
        len: u32,
    ) -> nvmf_target::protocol::pdu::R2t {
        let mut sqe = Sqe::rw(
            nvmf_target::protocol::command::io::WRITE,
            1,
            0,
            len / 512,
            len,
            false,
        );
        sqe.set_cid(cid);
        self.send(Pdu::CapsuleCmd(CapsuleCmd {
            sqe,
            data: Bytes::new(),
        }))
        .await;
        match self.recv().await {
            Recv::Pdu(Pdu::R2t(r2t)) => r2t,
            _ => panic!("expected R2T"),
        }
    }

    /// Admin Connect + CC.EN; returns the controller ID.
    pub async fn admin(addr: SocketAddr, kato: u32) -> (Raw, u16) {
        Self::admin_to(addr, kato, NQN, HOST).await
    }

    /// Admin Connect to `subnqn` as `host` + CC.EN; returns the controller ID.
    pub async fn admin_to(addr: SocketAddr, kato: u32, subnqn: &str, host: &str) -> (Raw, u16) {
        let mut r = Raw::ready(addr).await;
        let c = r.connect_cmd(0, kato, CNTLID_DYNAMIC, subnqn, host).await;
        assert!(c.status.is_success(), "admin connect: {}", c.status);
        let id = c.dw0() as u16;
        let c = r
            .cmd(
                Property::set_sqe(property::CC, 0x0046_0001, false),
                Bytes::new(),
            )
            .await;
        assert!(c.status.is_success());
        (r, id)
    }

    /// Enables the asynchronous events in `mask` (Set Features 0Bh) and leaves one AER (CID 31) outstanding.
    pub async fn arm_events(&mut self, mask: u32) {
        let mut sqe = Sqe::new(nvmf_target::protocol::command::admin::SET_FEATURES, 0);
        sqe.set_cdw(10, 0x0B);
        sqe.set_cdw(11, mask);
        assert!(self.cmd(sqe, Bytes::new()).await.status.is_success());
        let mut aer = Sqe::new(
            nvmf_target::protocol::command::admin::ASYNC_EVENT_REQUEST,
            0,
        );
        aer.set_cid(31);
        self.send(Pdu::CapsuleCmd(CapsuleCmd {
            sqe: aer,
            data: Bytes::new(),
        }))
        .await;
    }

    /// An I/O queue (qid 1) of a controller set up by [`Raw::admin`] after Set Features Number of Queues.
    pub async fn io(addr: SocketAddr, admin: &mut Raw, cntlid: u16) -> Raw {
        Self::io_with(addr, admin, cntlid, 0).await
    }

    /// [`Raw::io`] with the given connect attributes (CATTR).
    pub async fn io_with(addr: SocketAddr, admin: &mut Raw, cntlid: u16, cattr: u8) -> Raw {
        let mut sqe = Sqe::new(nvmf_target::protocol::command::admin::SET_FEATURES, 0);
        sqe.set_cdw(10, 0x07);
        sqe.set_cdw(11, 0);
        assert!(admin.cmd(sqe, Bytes::new()).await.status.is_success());
        let mut r = Raw::ready(addr).await;
        let c = r.connect_cmd_with(1, 0, cntlid, NQN, HOST, cattr).await;
        assert!(c.status.is_success(), "io connect: {}", c.status);
        r
    }
}

/// A port free on `ip` right now (for processes that must be told their port).
pub fn free_port(ip: &str) -> u16 {
    e2e::ports::free_port(ip)
}

/// The engine API of an io-engine starting at `http://{addr}`, once it answers (about 5 s at most).
pub async fn engine_api(
    addr: &str,
) -> Option<proto::engine::engine_client::EngineClient<tonic::transport::Channel>> {
    for _ in 0..200 {
        let url = format!("http://{addr}");
        if let Ok(c) = proto::engine::engine_client::EngineClient::connect(url).await {
            return Some(c);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}
