//! Keelson's initiator against Keelson's target over loopback.

use std::sync::Arc;

use bytes::Bytes;
use nvmf_target::block::BlockDevice;
use nvmf_target::initiator::namespace::RemoteNamespace;
use nvmf_target::initiator::{ConnectOptions, discovery};
use nvmf_target::io_threads::IoThreads;
use nvmf_target::protocol::log::subtype;
use nvmf_target::target::TargetConfig;

use super::harness::*;

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Bytes::from(
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>(),
    )
}

async fn round_trips(header_digest: bool, data_digest: bool) {
    let t = target().await;
    let mut o = ConnectOptions::new(t.addr, NQN);
    o.io_queues = 2;
    o.header_digest = header_digest;
    o.data_digest = data_digest;
    let ns = RemoteNamespace::connect(o, 0).await.unwrap();
    assert_eq!(ns.size_bytes(), NS_SIZE);
    // In-capsule (4 KiB), R2T (128 KiB), and split beyond MDTS (3 MiB).
    for (i, (off, len)) in [
        (0u64, 4096usize),
        (1 << 20, 128 << 10),
        (8 << 20, 3 << 20),
        (NS_SIZE - 512, 512),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(i as u64, len);
        ns.write(off, data.clone()).await.unwrap();
        assert_eq!(ns.read(off, len as u64).await.unwrap(), data, "at {off}");
    }
    ns.write_zeroes(1 << 20, 4096).await.unwrap();
    assert!(
        ns.read(1 << 20, 4096)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    ns.deallocate(8 << 20, 1 << 20).await.unwrap();
    assert!(
        ns.read(8 << 20, 1 << 20)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    ns.flush().await.unwrap();
    assert!(ns.read(NS_SIZE, 512).await.is_err());
    ns.close().await;
}

#[tokio::test]
async fn reads_and_writes_of_every_size_round_trip() {
    round_trips(false, false).await;
}

#[tokio::test]
async fn round_trips_with_digests() {
    round_trips(true, true).await;
}

#[tokio::test]
async fn many_concurrent_ios_on_several_queues() {
    let t = target().await;
    let mut o = ConnectOptions::new(t.addr, NQN);
    o.io_queues = 4;
    o.queue_depth = 32;
    let ns = Arc::new(RemoteNamespace::connect(o, 1).await.unwrap());
    let mut tasks = Vec::new();
    for i in 0..256u64 {
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(i, 8192);
            ns.write(i * 8192, data.clone()).await.unwrap();
            assert_eq!(ns.read(i * 8192, 8192).await.unwrap(), data);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = t.target.subsystem(NQN).unwrap();
    assert_eq!(s.controllers().len(), 1);
    assert_eq!(s.controllers()[0].io_queue_count(), 4);
}

/// The data path on I/O threads at both ends: the target serves its connections there, the initiator's I/O queues
/// run there (queue i on thread i), and I/O issued from an I/O thread takes that thread's queue.
#[tokio::test]
async fn io_threads_at_both_ends_carry_concurrent_io() {
    let threads =
        Arc::new(IoThreads::start(2, std::time::Duration::from_micros(50), || {}).unwrap());
    let config = TargetConfig {
        io_threads: Some(threads.clone()),
        ..TargetConfig::default()
    };
    let t = target_with(&[], config).await;
    let mut o = ConnectOptions::new(t.addr, NQN);
    o.io_queues = 3;
    o.queue_depth = 32;
    o.io_threads = Some(threads.clone());
    let ns = Arc::new(RemoteNamespace::connect(o, 1).await.unwrap());
    let mut tasks = Vec::new();
    for i in 0..192u64 {
        let ns = ns.clone();
        let io = async move {
            let data = pattern(i, 8192);
            ns.write(i * 8192, data.clone()).await.unwrap();
            assert_eq!(ns.read(i * 8192, 8192).await.unwrap(), data);
        };
        // A third from the test's runtime, the rest from either I/O thread.
        tasks.push(match i % 3 {
            0 => tokio::spawn(io),
            n => threads.handle(n as usize).spawn(io),
        });
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Bulk transfers take their own queue, on an I/O thread too.
    let big = pattern(7, 4 << 20);
    ns.write(8 << 20, big.clone()).await.unwrap();
    assert_eq!(ns.read(8 << 20, 4 << 20).await.unwrap(), big);
    let s = t.target.subsystem(NQN).unwrap();
    assert_eq!(s.controllers()[0].io_queue_count(), 3);
    ns.close().await;
}

#[tokio::test]
async fn discovery_lists_the_subsystem_per_port() {
    let t = target().await;
    let second = t
        .target
        .add_listener("127.0.0.1:0".parse().unwrap(), 0)
        .await
        .unwrap();
    let entries = discovery::discover(&ConnectOptions::new(t.addr, NQN))
        .await
        .unwrap();
    let nvm: Vec<_> = entries
        .iter()
        .filter(|e| e.subtype == subtype::NVM)
        .collect();
    assert_eq!(nvm.len(), 2);
    assert!(
        nvm.iter()
            .all(|e| e.subnqn == NQN && e.traddr == "127.0.0.1")
    );
    assert!(
        nvm.iter()
            .any(|e| e.trsvcid == second.address.port().to_string())
    );
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.subtype == subtype::CURRENT_DISCOVERY)
            .count(),
        2
    );
}

#[tokio::test]
async fn discovery_hides_subsystems_the_host_may_not_use() {
    let t = target_with(
        &["nqn.2014-08.org.nvmexpress:uuid:someone-else"],
        Default::default(),
    )
    .await;
    let entries = discovery::discover(&ConnectOptions::new(t.addr, NQN))
        .await
        .unwrap();
    assert!(entries.iter().all(|e| e.subtype != subtype::NVM));
}

#[tokio::test]
async fn reconnects_after_the_controller_is_torn_down() {
    let t = target().await;
    let mut o = ConnectOptions::new(t.addr, NQN);
    o.kato = std::time::Duration::from_secs(2);
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    ns.write(0, pattern(1, 4096)).await.unwrap();
    // Drop the controller on the target side, as a restart of the path would.
    for c in t.target.subsystem(NQN).unwrap().controllers() {
        c.shutdown("test");
    }
    // I/O waits for the reconnect and then succeeds.
    assert_eq!(ns.read(0, 4096).await.unwrap(), pattern(1, 4096));
    assert!(ns.is_connected());
}

/// A write that fails because the connection went finds the loss counted already (the nexus asks at once whether
/// every child lost its connection), not only once the reconnecting task has woken.
#[tokio::test]
async fn a_write_failed_by_a_lost_connection_finds_the_loss_counted() {
    use nvmf_target::block::fault::{FaultDevice, FaultPlan};
    use nvmf_target::block::memory::MemoryDevice;

    let t = target().await;
    // A slow namespace, so that the write is in flight when the connection goes.
    let slow = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(1 << 20, 512))));
    slow.set_plan(FaultPlan {
        latency: Some(std::time::Duration::from_millis(300)),
        ..Default::default()
    });
    t.target
        .add_namespace(NQN, 2, uuid::Uuid::new_v4(), 1, slow)
        .unwrap();
    let mut o = ConnectOptions::new(t.addr, NQN);
    o.kato = std::time::Duration::from_secs(2);
    let mut ns = RemoteNamespace::connect(o, 2).await.unwrap();
    ns.reconnect_wait = std::time::Duration::ZERO;
    assert_eq!(ns.connection_losses(), 0);
    let ns = Arc::new(ns);
    let write = {
        let ns = ns.clone();
        tokio::spawn(async move {
            let r = ns.write(0, pattern(2, 4096)).await;
            (r, ns.connection_losses())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    for c in t.target.subsystem(NQN).unwrap().controllers() {
        c.shutdown("test");
    }
    let (r, losses) = write.await.unwrap();
    assert!(r.is_err(), "the write outlived its connection: {r:?}");
    assert_eq!(losses, 1, "the write failed, the loss not counted");
}

/// An orderly shutdown tells the target (CC.SHN, answered) after closing the I/O queues, as Linux's host does.
#[tokio::test]
async fn an_orderly_shutdown_sends_cc_shn_after_the_io_queues_closed() {
    let t = target().await;
    let mut o = ConnectOptions::new(t.addr, NQN);
    o.io_queues = 2;
    let c = nvmf_target::initiator::controller::Controller::connect(&o)
        .await
        .unwrap();
    assert_eq!(c.io_queues().len(), 2);
    c.shutdown().await.expect("CC.SHN answered");
}

#[tokio::test]
async fn connect_to_a_missing_subsystem_fails_clearly() {
    let t = target().await;
    let o = ConnectOptions::new(t.addr, "nqn.2026-11.io.keelson:vol-missing");
    let e = RemoteNamespace::connect(o, 0)
        .await
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("invalid parameters"), "{e}");
}

/// A refused Connect closes its connection: a faulted child whose replica is gone retries every few seconds for as
/// long as it is away, and each try that left its socket open held a file descriptor and two tasks on both nodes.
#[tokio::test]
async fn a_refused_connect_closes_its_connection() {
    let t = target().await;
    // A proxy in front of the target tells when the initiator's side of a connection closes.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let via = proxy.local_addr().unwrap();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    let to = t.addr;
    tokio::spawn(async move {
        while let Ok((mut client, _)) = proxy.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut server = tokio::net::TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                let _ = closed_tx.send(());
            });
        }
    });
    let o = ConnectOptions::new(via, "nqn.2026-11.io.keelson:vol-missing");
    assert!(RemoteNamespace::connect(o, 0).await.is_err());
    tokio::time::timeout(std::time::Duration::from_secs(5), closed.recv())
        .await
        .expect("the refused connection is closed");
}

/// A connect given up half way (its caller gone: a nexus closed while its child reconnects, a gRPC call cancelled)
/// leaves no connection open behind it: here the target never answers the Fabrics Connect.
#[tokio::test]
async fn a_connect_given_up_half_way_closes_its_connection() {
    use futures_util::StreamExt;
    use nvmf_target::protocol::codec::PduCodec;
    use nvmf_target::protocol::pdu::{Digests, IcResp, Pdu};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (rd, mut wr) = s.into_split();
        let codec = PduCodec::new(1 << 20);
        let mut framed = tokio_util::codec::FramedRead::new(rd, codec.clone());
        assert!(matches!(framed.next().await, Some(Ok(Pdu::IcReq(_)))));
        let mut parts = Vec::new();
        codec.encode_parts(
            &Pdu::IcResp(IcResp {
                pfv: 0,
                cpda: 0,
                digests: Digests::default(),
                maxh2cdata: 4096,
            }),
            &mut bytes::BytesMut::new(),
            &mut parts,
        );
        nvmf_target::transport::write_parts(&mut wr, &mut parts)
            .await
            .unwrap();
        // The Connect comes and is never answered; then only the end of the connection.
        while let Some(Ok(_)) = framed.next().await {}
        let _ = closed_tx.send(());
    });
    let o = ConnectOptions::new(addr, NQN);
    let given_up = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        nvmf_target::initiator::controller::Controller::connect(&o),
    )
    .await;
    assert!(given_up.is_err(), "the target answered nothing");
    tokio::time::timeout(std::time::Duration::from_secs(5), closed)
        .await
        .expect("the connection given up is closed")
        .unwrap();
}
