//! What the fuzz targets run: the PDU decoder over a byte stream ([`decode_stream`]), and one host connection to an
//! in-process target ([`run_connection`]) that first does as much of a valid session as the input's first byte
//! asks, then sends the rest of the input as is. [`record`] captures real exchanges between Keelson's initiator and
//! target, the seed corpus for both.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use nvmf_target::block::memory::MemoryDevice;
use nvmf_target::pool::{Claim, Pool, PoolSpec};
use nvmf_target::protocol::codec::PduCodec;
use nvmf_target::protocol::command::{Sqe, admin};
use nvmf_target::protocol::fabrics::{CNTLID_DYNAMIC, Connect, ConnectData, Property, property};
use nvmf_target::protocol::nqn::Nqn;
use nvmf_target::protocol::pdu::{CapsuleCmd, Digests, IcReq, Pdu};
use nvmf_target::target::{SubsystemSpec, Target, TargetConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::{Decoder, FramedRead};

pub const NQN: &str = "nqn.2026-11.io.keelson:vol-00000000-0000-4000-8000-00000000f022";
pub const HOST: &str = "nqn.2026-11.io.keelson:node-fuzz";
const HOSTID: [u8; 16] = [0x42; 16];
/// How long the target may take to close a connection after the host's EOF before the run counts as a hang.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Where a [`run_connection`] input starts sending its own bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Right after TCP connect.
    Raw,
    /// After ICReq/ICResp.
    IcReq,
    /// On an admin queue: after ICReq, Connect and CC.EN.
    Admin,
    /// On an I/O queue of a controller with an admin queue open beside it.
    Io,
    /// The same with header and data digests.
    IoDigests,
}

impl Stage {
    pub fn from_byte(b: u8) -> Stage {
        match b % 5 {
            0 => Stage::Raw,
            1 => Stage::IcReq,
            2 => Stage::Admin,
            3 => Stage::Io,
            _ => Stage::IoDigests,
        }
    }

    pub fn byte(self) -> u8 {
        self as u8
    }
}

/// Decodes `data[2..]` as a PDU stream, delivered in pieces: never panics, stops at the first error.
pub fn decode_stream(data: &[u8]) {
    let (Some(&mode), Some(&piece)) = (data.first(), data.get(1)) else {
        return;
    };
    let mut codec = PduCodec::new(if mode & 4 != 0 { 8192 } else { 1 << 20 });
    codec.set_digests(Digests {
        header: mode & 1 != 0,
        data: mode & 2 != 0,
    });
    let piece = usize::from(piece).max(1);
    let mut buf = BytesMut::new();
    for chunk in data[2..].chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    _target: Target,
}

/// The target every run talks to: one subsystem with a RAM namespace (1) and a pool replica (2), so that data,
/// reservation and Keelson's vendor commands all reach a real device.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (target, addr) = rt.block_on(start_target());
        Fixture {
            rt,
            addr,
            _target: target,
        }
    })
}

/// A target on 127.0.0.1:<ephemeral> with [`NQN`]: namespace 1 in RAM, namespace 2 a replica of a RAM pool.
pub async fn start_target() -> (Target, SocketAddr) {
    let target = Target::new(TargetConfig::default());
    let l = target
        .add_listener("127.0.0.1:0".parse().expect("addr"), 0)
        .await
        .expect("listener");
    target
        .create_subsystem(SubsystemSpec {
            nqn: Nqn::parse(NQN).expect("nqn"),
            serial: String::new(),
            model: String::new(),
            allow_any_host: true,
            allowed_hosts: Vec::new(),
            single_path: false,
        })
        .expect("subsystem");
    let ram = Arc::new(MemoryDevice::new(16 << 20, 512));
    target
        .add_namespace(NQN, 1, uuid::Uuid::new_v4(), 1, ram)
        .expect("namespace 1");
    let spec = PoolSpec {
        name: "fuzz".into(),
        uuid: uuid::Uuid::new_v4(),
        cluster_size: 1 << 20,
    };
    let disk = Arc::new(MemoryDevice::new(64 << 20, 512));
    let pool = Pool::create(disk, &spec, &Claim::new("fuzz"))
        .await
        .expect("pool");
    let replica = pool
        .create_replica(uuid::Uuid::new_v4(), 16 << 20, None)
        .await
        .expect("replica");
    target
        .add_namespace(NQN, 2, uuid::Uuid::new_v4(), 1, replica)
        .expect("namespace 2");
    (target, l.address)
}

/// A hand-driven host connection.
pub struct Host {
    rd: FramedRead<OwnedReadHalf, PduCodec>,
    wr: OwnedWriteHalf,
    codec: PduCodec,
}

impl Host {
    pub async fn open(addr: SocketAddr) -> Option<Host> {
        let s = TcpStream::connect(addr).await.ok()?;
        s.set_nodelay(true).ok()?;
        let (rd, wr) = s.into_split();
        Some(Host {
            rd: FramedRead::new(rd, PduCodec::new(1 << 20)),
            wr,
            codec: PduCodec::new(1 << 20),
        })
    }

    async fn send(&mut self, pdu: Pdu) -> Option<()> {
        let mut parts = Vec::new();
        self.codec
            .encode_parts(&pdu, &mut BytesMut::new(), &mut parts);
        for p in parts {
            self.wr.write_all(&p).await.ok()?;
        }
        Some(())
    }

    async fn recv(&mut self) -> Option<Pdu> {
        match tokio::time::timeout(CLOSE_WITHIN, self.rd.next()).await {
            Ok(Some(Ok(p))) => Some(p),
            Ok(_) => None,
            Err(_) => {
                panic!("the target answered nothing within {CLOSE_WITHIN:?} during set-up (hang)")
            }
        }
    }

    async fn ic(&mut self, digests: Digests) -> Option<()> {
        self.send(Pdu::IcReq(IcReq {
            pfv: 0,
            hpda: 0,
            digests,
            maxr2t: 0,
        }))
        .await?;
        let Pdu::IcResp(r) = self.recv().await? else {
            return None;
        };
        self.codec.set_digests(r.digests);
        self.rd.decoder_mut().set_digests(r.digests);
        Some(())
    }

    async fn cmd(&mut self, sqe: Sqe, data: Bytes) -> Option<u32> {
        self.send(Pdu::CapsuleCmd(CapsuleCmd { sqe, data })).await?;
        loop {
            match self.recv().await? {
                Pdu::CapsuleResp(c) if c.status.is_success() => return Some(c.dw0()),
                Pdu::CapsuleResp(_) => return None,
                _ => continue,
            }
        }
    }

    async fn connect(&mut self, qid: u16, cntlid: u16) -> Option<u16> {
        let sqe = Connect {
            recfmt: 0,
            qid,
            sqsize: 31,
            cattr: 0,
            kato: 0,
        }
        .to_sqe();
        let data = ConnectData {
            hostid: HOSTID,
            cntlid,
            subnqn: NQN.into(),
            hostnqn: HOST.into(),
        };
        self.cmd(sqe, data.encode()).await.map(|dw0| dw0 as u16)
    }

    /// ICReq, admin Connect, CC.EN and one I/O queue granted: the admin queue of a ready controller.
    async fn admin(addr: SocketAddr) -> Option<(Host, u16)> {
        let mut h = Host::open(addr).await?;
        h.ic(Digests::default()).await?;
        let cntlid = h.connect(0, CNTLID_DYNAMIC).await?;
        h.cmd(
            Property::set_sqe(property::CC, 0x0046_0001, false),
            Bytes::new(),
        )
        .await?;
        let mut sqe = Sqe::new(admin::SET_FEATURES, 0);
        sqe.set_cdw(10, 0x07);
        h.cmd(sqe, Bytes::new()).await?;
        Some((h, cntlid))
    }

    /// Sends `bytes`, ends the host's side, and reads until the target closes; panics if it never does.
    async fn finish(mut self, bytes: &[u8]) {
        let _ = self.wr.write_all(bytes).await;
        let _ = self.wr.shutdown().await;
        let mut rd = self.rd.into_inner();
        let mut sink = vec![0u8; 64 << 10];
        let drained = tokio::time::timeout(CLOSE_WITHIN, async {
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        assert!(
            drained.is_ok(),
            "the target kept the connection open {CLOSE_WITHIN:?} after the host's EOF (hang)"
        );
    }
}

/// One fuzz run: `data[0]` picks the [`Stage`], `data[1..]` is sent from there.
pub fn run_connection(data: &[u8]) {
    let Some((&stage, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    f.rt.block_on(session(f.addr, Stage::from_byte(stage), rest));
}

async fn session(addr: SocketAddr, stage: Stage, bytes: &[u8]) {
    let digests = Digests {
        header: true,
        data: true,
    };
    match stage {
        Stage::Raw => {
            if let Some(h) = Host::open(addr).await {
                h.finish(bytes).await;
            }
        }
        Stage::IcReq => {
            let Some(mut h) = Host::open(addr).await else {
                return;
            };
            if h.ic(Digests::default()).await.is_some() {
                h.finish(bytes).await;
            }
        }
        Stage::Admin => {
            if let Some((h, _)) = Host::admin(addr).await {
                h.finish(bytes).await;
            }
        }
        Stage::Io | Stage::IoDigests => {
            let Some((admin, cntlid)) = Host::admin(addr).await else {
                return;
            };
            let Some(mut h) = Host::open(addr).await else {
                return;
            };
            let d = if stage == Stage::IoDigests {
                digests
            } else {
                Digests::default()
            };
            if h.ic(d).await.is_some() && h.connect(1, cntlid).await.is_some() {
                h.finish(bytes).await;
            }
            admin.finish(&[]).await;
        }
    }
}

pub mod record;
