//! Records real NVMe/TCP exchanges as seeds: Keelson's initiator drives the fuzz fixture's target through a
//! recording proxy on loopback (data, reservation and vendor commands, with and without digests), and every
//! connection's bytes become seeds for both fuzz targets.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use nvmf_target::block::{BlockDevice, MissedWrites};
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use nvmf_target::protocol::codec::PduCodec;
use nvmf_target::protocol::command::resv;
use nvmf_target::protocol::pdu::Pdu;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Decoder;

use super::{NQN, Stage, start_target};

type Log = Arc<Mutex<Vec<u8>>>;

/// Longest decoder seed kept.
const SEED_MAX: usize = 64 << 10;

/// Both directions of one proxied connection.
#[derive(Default, Clone)]
struct Recording {
    host: Log,
    target: Log,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    log: Log,
) {
    let mut buf = vec![0u8; 256 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

async fn proxy(listener: TcpListener, target: SocketAddr, recordings: Arc<Mutex<Vec<Recording>>>) {
    while let Ok((host, _)) = listener.accept().await {
        let Ok(t) = TcpStream::connect(target).await else {
            continue;
        };
        let r = Recording::default();
        recordings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(r.clone());
        let (hr, hw) = host.into_split();
        let (tr, tw) = t.into_split();
        tokio::spawn(pump(hr, tw, r.host));
        tokio::spawn(pump(tr, hw, r.target));
    }
}

/// Every kind of command Keelson's initiator sends, on namespace `nsid`.
async fn workload(ns: &RemoteNamespace, pool_replica: bool) {
    let _ = ns.write(0, Bytes::from(vec![0x5a; 4096])).await;
    let _ = ns.write(1 << 20, Bytes::from(vec![0xa5; 16 << 10])).await;
    let _ = ns.read(0, 4096).await;
    let _ = ns.read(1 << 20, 16 << 10).await;
    let _ = ns.write_zeroes(8192, 8192).await;
    let _ = ns.deallocate(2 << 20, 1 << 20).await;
    let _ = ns.flush().await;
    let _ = ns.register_key(7).await;
    let _ = ns.acquire(resv::ACQUIRE, 7, 0, resv::WRITE_EXCLUSIVE).await;
    let _ = ns.report().await;
    let _ = ns.release(7, resv::WRITE_EXCLUSIVE).await;
    if pool_replica {
        let _ = ns.allocated_ranges(0, 4 << 20).await;
        let m = MissedWrites {
            child: "nvmf://127.0.0.1:4420/nqn.2026-11.io.keelson:replica-x?nsid=1".into(),
            since_ms: 1,
            ranges: vec![(0, 4096), (1 << 20, 8192)],
        };
        let _ = ns.note_missed(&m).await;
        let _ = ns.missed().await;
        let _ = ns.forget_missed(&m.child).await;
        let _ = ns.snapshot(uuid::Uuid::new_v4()).await;
    }
}

/// Where the first `n` PDUs of `stream` end (ICReq/ICResp never carry digests; later PDUs do as negotiated).
fn after_pdus(stream: &[u8], n: usize) -> Option<usize> {
    let mut codec = PduCodec::new(1 << 22);
    let mut buf = BytesMut::from(stream);
    for _ in 0..n {
        match codec.decode(&mut buf).ok()?? {
            Pdu::IcReq(r) => codec.set_digests(r.digests),
            Pdu::IcResp(r) => codec.set_digests(r.digests),
            _ => {}
        }
    }
    Some(stream.len() - buf.len())
}

/// Whether a host stream's first capsule is an admin Connect (queue 0) and its ICReq asked for digests.
fn shape(stream: &[u8]) -> Option<(bool, bool)> {
    let mut codec = PduCodec::new(1 << 22);
    let mut buf = BytesMut::from(stream);
    let Pdu::IcReq(ic) = codec.decode(&mut buf).ok()?? else {
        return None;
    };
    codec.set_digests(ic.digests);
    let Pdu::CapsuleCmd(c) = codec.decode(&mut buf).ok()?? else {
        return None;
    };
    let qid = (c.sqe.cdw(10) >> 16) as u16;
    Some((qid == 0, ic.digests.header || ic.digests.data))
}

fn save(dir: &Path, name: &str, seed: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), seed)
}

/// Records the seeds into `out/target_connection` and `out/pdu_decoder`; returns how many were written.
pub async fn record(out: &Path) -> std::io::Result<usize> {
    let (_target, target_addr) = start_target().await;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_addr = listener.local_addr()?;
    let recordings = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(proxy(listener, target_addr, recordings.clone()));

    for digests in [false, true] {
        for nsid in [1, 2] {
            let mut o = ConnectOptions::new(proxy_addr, NQN);
            o.hostnqn = super::HOST.into();
            o.io_queues = 1;
            o.header_digest = digests;
            o.data_digest = digests;
            let ns = RemoteNamespace::connect(o, nsid)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            workload(&ns, nsid == 2).await;
            ns.close().await;
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let mut n = 0;
    let conn_dir = out.join("target_connection");
    let dec_dir = out.join("pdu_decoder");
    let all = recordings.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (i, r) in all.iter().enumerate() {
        let host = r.host.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let target = r.target.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some((admin, digests)) = shape(&host) else {
            continue;
        };
        let mut seed = |stage: Stage, from: usize| -> std::io::Result<()> {
            let mut s = vec![stage.byte()];
            s.extend_from_slice(&host[from..]);
            n += 1;
            save(&conn_dir, &format!("conn{i}-{stage:?}"), &s)
        };
        seed(Stage::Raw, 0)?;
        if !digests {
            seed(Stage::IcReq, after_pdus(&host, 1).unwrap_or(0))?;
        }
        let after_connect = after_pdus(&host, 2).unwrap_or(0);
        match (admin, digests) {
            (true, false) => seed(Stage::Admin, after_connect)?,
            (false, false) => seed(Stage::Io, after_connect)?,
            (false, true) => seed(Stage::IoDigests, after_connect)?,
            (true, true) => {}
        }
        // The decoder sees both directions; mode bit 0/1: header/data digests after the IC exchange.
        let mode = if digests { 3 } else { 0 };
        for (dir, bytes) in [("host", &host), ("target", &target)] {
            let mut s = vec![mode, 251];
            // A large read answer adds little past its first PDUs and slows every run that mutates it.
            s.extend_from_slice(&bytes[..bytes.len().min(SEED_MAX)]);
            n += 1;
            save(&dec_dir, &format!("conn{i}-{dir}"), &s)?;
        }
    }
    Ok(n)
}
