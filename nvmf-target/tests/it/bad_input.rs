//! Malformed and hostile input: each case gets the NVMe status or C2HTermReq the spec asks for, never a panic or a
//! hang, and the target keeps serving its other connections.

use bytes::Bytes;
use nvmf_target::protocol::command::{Sgl, Sqe, admin, io};
use nvmf_target::protocol::fabrics::{CNTLID_DYNAMIC, Connect, ConnectData, Property, property};
use nvmf_target::protocol::pdu::{CapsuleCmd, DataPdu, Pdu, fes};
use nvmf_target::protocol::status::Status;
use nvmf_target::target::TargetConfig;

use super::harness::*;

/// After each abuse the target must still serve a well-behaved host.
async fn still_serves(addr: std::net::SocketAddr) {
    let (mut a, id) = Raw::admin(addr, 0).await;
    let mut q = Raw::io(addr, &mut a, id).await;
    let c = q
        .cmd(
            Sqe::rw(io::WRITE, 1, 0, 1, 512, true),
            Bytes::from(vec![7u8; 512]),
        )
        .await;
    assert!(c.status.is_success());
}

#[tokio::test]
async fn garbage_bytes_get_a_term_req_and_close() {
    let t = target().await;
    let mut r = Raw::open(t.addr).await;
    r.send_bytes(&[0xde, 0xad, 0xbe, 0xef, 0x00, 0x11, 0x22, 0x33, 0x44])
        .await;
    r.expect_term(fes::INVALID_HEADER_FIELD).await;
    still_serves(t.addr).await;
}

#[tokio::test]
async fn first_pdu_not_icreq_is_a_sequence_error() {
    let t = target().await;
    let mut r = Raw::open(t.addr).await;
    r.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe: Sqe::new(admin::IDENTIFY, 0),
        data: Bytes::new(),
    }))
    .await;
    r.expect_term(fes::PDU_SEQUENCE_ERROR).await;
}

#[tokio::test]
async fn truncated_pdu_then_close_does_not_hang_the_target() {
    let t = target().await;
    let mut r = Raw::ready(t.addr).await;
    // A CapsuleCmd header announcing 72 bytes, only 30 sent, then the host goes away.
    let mut b = vec![0x04, 0, 72, 0, 72, 0, 0, 0];
    b.extend_from_slice(&[0u8; 22]);
    r.send_bytes(&b).await;
    drop(r);
    still_serves(t.addr).await;
}

#[tokio::test]
async fn wrong_hlen_plen_and_pdo_are_invalid_header_fields() {
    let t = target().await;
    // HLEN 80 for a CapsuleCmd.
    let mut r = Raw::ready(t.addr).await;
    r.send_bytes(&[0x04, 0, 80, 0, 88, 0, 0, 0]).await;
    r.expect_term(fes::INVALID_HEADER_FIELD).await;
    // PLEN shorter than the header.
    let mut r = Raw::ready(t.addr).await;
    r.send_bytes(&[0x04, 0, 72, 0, 10, 0, 0, 0]).await;
    r.expect_term(fes::INVALID_HEADER_FIELD).await;
    // PLEN beyond anything the target accepts.
    let mut r = Raw::ready(t.addr).await;
    r.send_bytes(&[0x06, 0, 24, 24, 0, 0, 0, 0x40]).await;
    r.expect_term(fes::DATA_LIMIT_EXCEEDED).await;
    // PDO pointing into the header.
    let mut r = Raw::ready(t.addr).await;
    let mut b = vec![0x04, 0, 72, 8, 80, 0, 0, 0];
    b.extend_from_slice(&[0u8; 72]);
    r.send_bytes(&b).await;
    r.expect_term(fes::INVALID_HEADER_FIELD).await;
    still_serves(t.addr).await;
}

#[tokio::test]
async fn large_pdus_before_an_io_queue_connect_are_refused() {
    // An H2CData common header announcing 1 MiB of data (PLEN 0x100018).
    const H2C_1MIB: [u8; 8] = [0x06, 0, 24, 24, 0x18, 0, 0x10, 0];
    let t = target().await;
    // Right after ICReq.
    let mut r = Raw::ready(t.addr).await;
    r.send_bytes(&H2C_1MIB).await;
    r.expect_term(fes::DATA_LIMIT_EXCEEDED).await;
    // On a connected admin queue too.
    let (mut a, _) = Raw::admin(t.addr, 0).await;
    a.send_bytes(&H2C_1MIB).await;
    a.expect_term(fes::DATA_LIMIT_EXCEEDED).await;
    // An I/O queue takes a 1 MiB write in one H2CData PDU.
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    let r2t = q.write_awaiting_data(4, 1 << 20).await;
    assert_eq!(r2t.length, 1 << 20);
    q.send(Pdu::H2CData(DataPdu {
        cccid: 4,
        ttag: r2t.ttag,
        offset: 0,
        data: Bytes::from(vec![3u8; 1 << 20]),
        last: true,
        success: false,
    }))
    .await;
    let Recv::Pdu(Pdu::CapsuleResp(c)) = q.recv().await else {
        panic!("expected the write's completion")
    };
    assert!(c.status.is_success());
    still_serves(t.addr).await;
}

#[tokio::test]
async fn h2c_data_beyond_the_command_is_out_of_range() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    // A 16 KiB write: the target answers with an R2T for 16 KiB.
    let mut sqe = Sqe::rw(io::WRITE, 1, 0, 32, 16384, false);
    sqe.set_cid(9);
    q.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::new(),
    }))
    .await;
    let r2t = match q.recv().await {
        Recv::Pdu(Pdu::R2t(r)) => r,
        _ => panic!("expected R2T"),
    };
    assert_eq!((r2t.cccid, r2t.offset, r2t.length), (9, 0, 16384));
    // ...and gets 20 KiB.
    let d = DataPdu {
        cccid: 9,
        ttag: r2t.ttag,
        offset: 0,
        data: Bytes::from(vec![1u8; 20480]),
        last: true,
        success: false,
    };
    q.send(Pdu::H2CData(d)).await;
    q.expect_term(fes::DATA_OUT_OF_RANGE).await;
    still_serves(t.addr).await;
}

/// A write's data in many small H2CData PDUs (a host may send less than MAXH2CDATA in each) is written whole; an
/// H2CData without data is refused; a host waiting on more writes' data than its queue holds gets an error, not a
/// buffer per write.
#[tokio::test]
async fn h2c_data_in_many_small_pdus_none_empty_and_no_more_writes_waiting_than_the_queue_holds() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let r2t = q.write_awaiting_data(4, 65536).await;
    for (i, chunk) in data.chunks(512).enumerate() {
        q.send(Pdu::H2CData(DataPdu {
            cccid: 4,
            ttag: r2t.ttag,
            offset: (i * 512) as u32,
            data: Bytes::copy_from_slice(chunk),
            last: (i + 1) * 512 == data.len(),
            success: false,
        }))
        .await;
    }
    assert!(q.cqe().await.status.is_success());
    let mut sqe = Sqe::rw(io::READ, 1, 0, 128, 65536, false);
    sqe.set_sgl(Sgl::transport(65536));
    sqe.set_cid(5);
    q.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::new(),
    }))
    .await;
    let mut back = Vec::new();
    loop {
        match q.recv().await {
            Recv::Pdu(Pdu::C2HData(d)) => back.extend_from_slice(&d.data),
            Recv::Pdu(Pdu::CapsuleResp(c)) => {
                assert!(c.status.is_success());
                break;
            }
            _ => panic!("expected the read's data and completion"),
        }
    }
    assert!(back == data, "the write assembled from 128 PDUs reads back");

    // Writes waiting for data: as many as the queue's entries (SQSIZE 31: 32), then no more.
    for cid in 100..132u16 {
        q.write_awaiting_data(cid, 512).await;
    }
    let mut sqe = Sqe::rw(io::WRITE, 1, 0, 1, 512, false);
    sqe.set_cid(300);
    q.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::new(),
    }))
    .await;
    let c = q.cqe().await;
    assert_eq!((c.cid, c.status), (300, Status::COMMAND_SEQUENCE_ERROR));

    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    let r2t = q.write_awaiting_data(4, 4096).await;
    q.send(Pdu::H2CData(DataPdu {
        cccid: 4,
        ttag: r2t.ttag,
        offset: 0,
        data: Bytes::new(),
        last: false,
        success: false,
    }))
    .await;
    q.expect_term(fes::INVALID_HEADER_FIELD).await;
    still_serves(t.addr).await;
}

#[tokio::test]
async fn h2c_data_with_unknown_tag_is_rejected() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    let d = DataPdu {
        cccid: 1,
        ttag: 77,
        offset: 0,
        data: Bytes::from(vec![1u8; 512]),
        last: true,
        success: false,
    };
    q.send(Pdu::H2CData(d)).await;
    q.expect_term(fes::INVALID_HEADER_FIELD).await;
}

#[tokio::test]
async fn unknown_opcodes_get_invalid_opcode() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    assert_eq!(
        a.cmd(Sqe::new(0xC5, 0), Bytes::new()).await.status,
        Status::INVALID_OPCODE
    );
    let mut q = Raw::io(t.addr, &mut a, id).await;
    assert_eq!(
        q.cmd(Sqe::new(0x7E, 1), Bytes::new()).await.status,
        Status::INVALID_OPCODE
    );
    let mut sqe = Sqe::new(admin::FABRICS, 0);
    sqe.0[4] = 0x42;
    assert_eq!(
        a.cmd(sqe, Bytes::new()).await.status,
        Status::INVALID_OPCODE
    );
}

#[tokio::test]
async fn bad_nsid_and_lba_out_of_range() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    let blocks = NS_SIZE / 512;
    let mut sqe = Sqe::rw(io::READ, 9, 0, 1, 512, false);
    sqe.set_sgl(Sgl::transport(512));
    assert_eq!(
        q.cmd(sqe, Bytes::new()).await.status,
        Status::INVALID_NAMESPACE
    );
    let mut sqe = Sqe::rw(io::READ, 1, blocks - 1, 2, 1024, false);
    sqe.set_sgl(Sgl::transport(1024));
    assert_eq!(
        q.cmd(sqe, Bytes::new()).await.status,
        Status::LBA_OUT_OF_RANGE
    );
    let sqe = Sqe::rw(io::WRITE, 1, u64::MAX - 1, 4, 2048, true);
    assert_eq!(
        q.cmd(sqe, Bytes::from(vec![0u8; 2048])).await.status,
        Status::LBA_OUT_OF_RANGE
    );
    // An SGL length that disagrees with NLB.
    let sqe = Sqe::rw(io::WRITE, 1, 0, 2, 512, true);
    assert_eq!(
        q.cmd(sqe, Bytes::from(vec![0u8; 512])).await.status,
        Status::SGL_DATA_LENGTH_INVALID
    );
    // Identify of a namespace beyond NN.
    let mut sqe = Sqe::new(admin::IDENTIFY, 0xFFFF_0000);
    sqe.set_sgl(Sgl::transport(4096));
    assert_eq!(
        a.cmd(sqe, Bytes::new()).await.status,
        Status::INVALID_NAMESPACE
    );
}

/// A fused Compare and Write, whose compare the target does not support: the write is refused (Invalid Field), not
/// run as a plain write over data the host meant to write only if the compare matched. A command whose data is
/// described by PRPs (PSDT 00b), which fabrics do not use, is refused the same way. Before, both wrote the block.
#[tokio::test]
async fn fused_writes_and_prp_commands_are_refused_and_write_nothing() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    let mut compare = Sqe::rw(0x05, 1, 0, 1, 512, true);
    compare.0[1] |= 0x01;
    let _ = q.cmd(compare, Bytes::from(vec![0u8; 512])).await;
    let mut write = Sqe::rw(io::WRITE, 1, 0, 1, 512, true);
    write.0[1] |= 0x02;
    assert_eq!(
        q.cmd(write, Bytes::from(vec![9u8; 512])).await.status,
        Status::INVALID_FIELD
    );
    let mut prp = Sqe::rw(io::WRITE, 1, 0, 1, 512, true);
    prp.0[1] = 0;
    assert_eq!(
        q.cmd(prp, Bytes::from(vec![9u8; 512])).await.status,
        Status::INVALID_FIELD
    );
    let mut read = Sqe::rw(io::READ, 1, 0, 1, 512, false);
    read.set_sgl(Sgl::transport(512));
    read.set_cid(900);
    q.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe: read,
        data: Bytes::new(),
    }))
    .await;
    let mut data = Vec::new();
    loop {
        match q.recv().await {
            Recv::Pdu(Pdu::C2HData(d)) => {
                data.extend_from_slice(&d.data);
                if d.success {
                    break;
                }
            }
            Recv::Pdu(Pdu::CapsuleResp(c)) => {
                assert_eq!(c.status, Status::SUCCESS);
                break;
            }
            _ => panic!("no answer to the read"),
        }
    }
    assert_eq!(data, vec![0u8; 512], "a refused write wrote the block");
}

/// A peer that completes the ICReq exchange and then never connects a queue (anyone can: no host NQN is asked for
/// until the Connect) is closed within the IC timeout (10 s), as is one whose Connect was refused, instead of holding
/// a task and a read buffer until the port goes.
#[tokio::test]
async fn a_connection_never_connected_to_a_queue_is_closed() {
    let t = target().await;
    let mut idle = Raw::ready(t.addr).await;
    let mut refused = Raw::ready(t.addr).await;
    let c = refused
        .connect_cmd(
            0,
            0,
            CNTLID_DYNAMIC,
            "nqn.2026-11.io.keelson:nothing-here",
            HOST,
        )
        .await;
    assert_ne!(c.status, Status::SUCCESS);
    for r in [&mut idle, &mut refused] {
        let end = tokio::time::timeout(
            std::time::Duration::from_secs(15),
            futures_util::StreamExt::next(&mut r.rd),
        )
        .await;
        assert!(
            matches!(end, Ok(None) | Ok(Some(Err(_)))),
            "a connection with no queue still open: {end:?}"
        );
    }
    still_serves(t.addr).await;
}

/// An ICReq asking for C2H data alignment (HPDA) the target does not give (its data follows the header) is refused
/// as an unsupported parameter at HPDA's byte, not accepted and then answered with data where the host does not
/// look for it.
#[tokio::test]
async fn an_icreq_asking_for_data_alignment_is_refused() {
    let t = target().await;
    let mut r = Raw::open(t.addr).await;
    r.send(Pdu::IcReq(nvmf_target::protocol::pdu::IcReq {
        pfv: 0,
        hpda: 3,
        digests: Default::default(),
        maxr2t: 0,
    }))
    .await;
    r.expect_term(fes::UNSUPPORTED_PARAMETER).await;
    still_serves(t.addr).await;
}

#[tokio::test]
async fn connect_to_unknown_subsystem_names_the_field() {
    let t = target().await;
    let mut r = Raw::ready(t.addr).await;
    let c = r
        .connect_cmd(
            0,
            0,
            CNTLID_DYNAMIC,
            "nqn.2026-11.io.keelson:vol-nope",
            HOST,
        )
        .await;
    // Without Do Not Retry: the subsystem may be there when the host asks again (a volume's nexus being made
    // again), and since Linux 6.11 a host deletes a controller whose reconnect gets DNR: the volume's last path,
    // and its block device with it.
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAMETERS.without_dnr());
    assert!(!c.status.dnr);
    assert_eq!(
        c.dw0(),
        256 | (1 << 16),
        "IPO = SUBNQN offset in the Connect data, IATTR = 1"
    );
}

#[tokio::test]
async fn host_not_on_the_allow_list_is_refused() {
    let t = target_with(
        &["nqn.2014-08.org.nvmexpress:uuid:other"],
        TargetConfig::default(),
    )
    .await;
    let mut r = Raw::ready(t.addr).await;
    let c = r.connect_cmd(0, 0, CNTLID_DYNAMIC, NQN, HOST).await;
    assert_eq!(c.status, Status::CONNECT_INVALID_HOST);
    assert!(c.status.dnr, "Linux must not retry a refused host");
    // Allowing the host at run time lets it in.
    t.target.allow_host(NQN, HOST).unwrap();
    let c = r.connect_cmd(0, 0, CNTLID_DYNAMIC, NQN, HOST).await;
    assert!(c.status.is_success());
}

/// As the Linux target: a host that names no Host NQN may connect where any host may (SPDK's perf tool does
/// this), never through an allow-list; a Host NQN that is there but malformed is an invalid parameter.
#[tokio::test]
async fn an_empty_host_nqn_is_let_in_only_where_any_host_is() {
    let open = target().await;
    let mut r = Raw::ready(open.addr).await;
    let c = r.connect_cmd(0, 0, CNTLID_DYNAMIC, NQN, "").await;
    assert!(c.status.is_success(), "{}", c.status);
    let mut r = Raw::ready(open.addr).await;
    let c = r.connect_cmd(0, 0, CNTLID_DYNAMIC, NQN, "not an nqn").await;
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAMETERS);
    assert_eq!(c.dw0(), (1 << 16) | 512, "IATTR data, IPO at the Host NQN");

    let listed = target_with(&[HOST], TargetConfig::default()).await;
    let mut r = Raw::ready(listed.addr).await;
    let c = r.connect_cmd(0, 0, CNTLID_DYNAMIC, NQN, "").await;
    assert_eq!(c.status, Status::CONNECT_INVALID_HOST);
}

/// A Host Identifier of zero names no host (two such would be one registrant to the reservations): refused.
#[tokio::test]
async fn a_host_identifier_of_zero_is_refused() {
    let t = target().await;
    let mut r = Raw::ready(t.addr).await;
    let sqe = Connect {
        recfmt: 0,
        qid: 0,
        sqsize: 31,
        cattr: 0,
        kato: 0,
    }
    .to_sqe();
    let data = ConnectData {
        hostid: [0; 16],
        cntlid: CNTLID_DYNAMIC,
        subnqn: NQN.into(),
        hostnqn: HOST.into(),
    };
    let c = r.cmd(sqe, data.encode()).await;
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAMETERS);
    assert_eq!(c.dw0(), 1 << 16, "IATTR data, IPO at the Host Identifier");
    still_serves(t.addr).await;
}

#[tokio::test]
async fn second_connect_on_a_queue_is_a_sequence_error() {
    let t = target().await;
    let (mut a, _) = Raw::admin(t.addr, 0).await;
    let c = a.connect_cmd(0, 0, CNTLID_DYNAMIC, NQN, HOST).await;
    assert_eq!(c.status, Status::COMMAND_SEQUENCE_ERROR);
}

#[tokio::test]
async fn commands_before_connect_are_sequence_errors() {
    let t = target().await;
    let mut r = Raw::ready(t.addr).await;
    let c = r
        .cmd(Property::get_sqe(property::CAP, true), Bytes::new())
        .await;
    assert_eq!(c.status, Status::COMMAND_SEQUENCE_ERROR);
    let c = r.cmd(Sqe::new(admin::IDENTIFY, 0), Bytes::new()).await;
    assert_eq!(c.status, Status::COMMAND_SEQUENCE_ERROR);
}

#[tokio::test]
async fn io_queue_connect_with_wrong_controller_or_qid_is_refused() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut r = Raw::ready(t.addr).await;
    // A controller that is not (or no longer) there: refused without Do Not Retry (it may have just ended; the
    // host makes a new association).
    let c = r.connect_cmd(1, 0, id.wrapping_add(100), NQN, HOST).await;
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAMETERS.without_dnr());
    assert_eq!(c.dw0(), 16 | (1 << 16));
    // No queues granted yet: qid 1 is out of range.
    let c = r.connect_cmd(1, 0, id, NQN, HOST).await;
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAMETERS);
    drop(Raw::io(t.addr, &mut a, id).await);
}

#[tokio::test]
async fn keep_alive_timeout_tears_the_controller_down() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 1000).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    // Stay silent: both queues must be closed within a few seconds.
    let start = std::time::Instant::now();
    assert!(matches!(a.recv().await, Recv::Closed));
    assert!(matches!(q.recv().await, Recv::Closed));
    assert!(start.elapsed() >= std::time::Duration::from_millis(900));
    assert!(t.target.subsystem(NQN).unwrap().controllers().is_empty());
    still_serves(t.addr).await;
}

/// A host that asked for no keep-alive (KATO 0): its connection is probed by TCP's keep-alive, so a host gone
/// without a word (powered off, its link cut) is found, and its controller with its queues goes. Before, nothing
/// probed an idle connection, and they stayed until the engine restarted.
#[tokio::test]
async fn a_connection_without_keep_alive_timeout_is_probed_by_tcp() {
    let t = target().await;
    let (a, _) = Raw::admin(t.addr, 0).await;
    let (ours, theirs) = (
        format!(":{:04X}", t.addr.port()),
        format!(":{:04X}", a.local.port()),
    );
    let start = std::time::Instant::now();
    loop {
        let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when ...
        let line = tcp
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 5 && f[1].ends_with(&ours) && f[2].ends_with(&theirs))
            .expect("the target's end of the connection");
        if line[5].starts_with("02:") {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "no keep-alive timer on the target's end: {line:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(a);
}

#[tokio::test]
async fn keep_alives_keep_the_controller() {
    let t = target().await;
    let (mut a, _) = Raw::admin(t.addr, 1000).await;
    for _ in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        assert!(
            a.cmd(Sqe::new(admin::KEEP_ALIVE, 0), Bytes::new())
                .await
                .status
                .is_success()
        );
    }
    assert_eq!(t.target.subsystem(NQN).unwrap().controllers().len(), 1);
}

#[tokio::test]
async fn in_capsule_data_larger_than_allowed_is_refused() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    let len = TargetConfig::default().in_capsule_data + 4096;
    let sqe = Sqe::rw(io::WRITE, 1, 0, len / 512, len, true);
    assert_eq!(
        q.cmd(sqe, Bytes::from(vec![0u8; len as usize]))
            .await
            .status,
        Status::SGL_DATA_LENGTH_INVALID
    );
    still_serves(t.addr).await;
}

#[tokio::test]
async fn ana_inaccessible_fails_io_with_a_path_error_and_raises_an_event() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    a.arm_events(1 << 11).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    t.target
        .set_ana_state(1, 1, nvmf_target::protocol::log::AnaState::Inaccessible)
        .unwrap();
    let ev = a.cqe().await;
    assert_eq!((ev.cid, ev.dw0()), (31, 0x000C_0302));
    let c = q
        .cmd(
            Sqe::rw(io::WRITE, 1, 0, 1, 512, true),
            Bytes::from(vec![0u8; 512]),
        )
        .await;
    assert_eq!(c.status, Status::ANA_INACCESSIBLE);
    assert!(!c.status.dnr, "path errors must be retried elsewhere");
}

#[tokio::test]
async fn a_host_that_never_reads_completions_is_throttled() {
    use nvmf_target::protocol::codec::PduCodec;
    use tokio::io::AsyncWriteExt;
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    // 100 read commands per write, never reading a completion. Without backpressure the target would read them
    // all and queue the data; with it, the kernel buffers fill and our writes stall.
    let codec = PduCodec::new(1 << 20);
    let mut batch = bytes::BytesMut::new();
    for i in 0..100u16 {
        let mut sqe = Sqe::rw(io::READ, 1, u64::from(i), 1, 512, false);
        sqe.set_sgl(Sgl::transport(512));
        sqe.set_cid(i);
        let mut parts = Vec::new();
        codec.encode_parts(
            &Pdu::CapsuleCmd(CapsuleCmd {
                sqe,
                data: Bytes::new(),
            }),
            &mut bytes::BytesMut::new(),
            &mut parts,
        );
        for p in parts {
            batch.extend_from_slice(&p);
        }
    }
    let mut sent = 0u64;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(2), q.wr.write_all(&batch)).await
        {
            Ok(Ok(())) => sent += 100,
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break,
        }
        assert!(
            sent < 400_000,
            "the target kept reading commands whose completions nobody reads"
        );
    }
    // The target still serves everyone else.
    still_serves(t.addr).await;
}

/// Commands whose dwords 10 and 11 are not a starting LBA (Flush, Dataset Management) may carry anything there:
/// nothing reads them as one. Before, the target multiplied them by the block size for every command, which
/// overflowed (and, with overflow checks, ended the connection) for a high dword 11.
#[tokio::test]
async fn a_flush_with_high_dwords_10_and_11_is_a_flush() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    let mut sqe = Sqe::new(io::FLUSH, 1);
    sqe.set_cdw(10, u32::MAX);
    sqe.set_cdw(11, u32::MAX);
    assert!(q.cmd(sqe, Bytes::new()).await.status.is_success());
    let mut sqe = Sqe::new(io::FLUSH, 1);
    sqe.set_cid(2);
    assert!(
        q.cmd(sqe, Bytes::new()).await.status.is_success(),
        "the queue goes on"
    );
    still_serves(t.addr).await;
}

/// Found by fuzzing: a Get Log Page claiming a 1.7 GB transfer made the target allocate and send that much.
#[tokio::test]
async fn a_claimed_length_beyond_mdts_is_refused_before_anything_is_allocated() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut sqe = Sqe::new(admin::GET_LOG_PAGE, 0xFFFF_FFFF);
    sqe.set_cdw(10, 0xFFFF_0002); // SMART, NUMDL all ones
    sqe.set_cdw(11, 0x0000_FFFF); // NUMDU all ones: 16 GiB asked
    sqe.set_sgl(Sgl::transport(0x7000_0000));
    assert_eq!(a.cmd(sqe, Bytes::new()).await.status, Status::INVALID_FIELD);
    // Within MDTS a short page is still padded with zeroes to what was asked.
    let mut sqe = Sqe::new(admin::GET_LOG_PAGE, 0xFFFF_FFFF);
    sqe.set_cdw(10, ((8192 / 4 - 1) << 16) | 0x02);
    sqe.set_sgl(Sgl::transport(8192));
    assert!(a.cmd(sqe, Bytes::new()).await.status.is_success());

    let mut q = Raw::io(t.addr, &mut a, id).await;
    // Dataset Management: 256 ranges at most, so at most 4 KiB of range data, whatever the SGL claims.
    let mut sqe = Sqe::new(io::DATASET_MANAGEMENT, 1);
    sqe.set_cdw(10, 0);
    sqe.set_cdw(11, 1 << 2);
    sqe.set_sgl(Sgl::transport(1 << 30));
    assert_eq!(
        q.cmd(sqe, Bytes::new()).await.status,
        Status::SGL_DATA_LENGTH_INVALID
    );
    // Any command: a transfer beyond MDTS.
    let mut sqe = Sqe::new(io::FLUSH, 1);
    sqe.set_sgl(Sgl::transport(u32::MAX));
    assert_eq!(q.cmd(sqe, Bytes::new()).await.status, Status::INVALID_FIELD);
    still_serves(t.addr).await;
}

/// Commands on a controller not enabled (before CC.EN) or shut down (CC.SHN set) are sequence errors, as with Linux's
/// target, and change nothing: before, a write on an I/O queue connected earlier still reached the namespace after
/// its host had shut the controller down.
#[tokio::test]
async fn a_controller_not_enabled_or_shut_down_runs_no_command() {
    let t = target().await;
    let mut r = Raw::ready(t.addr).await;
    let c = r.connect_cmd(0, 0, CNTLID_DYNAMIC, NQN, HOST).await;
    assert!(c.status.is_success());
    let mut identify = Sqe::new(admin::IDENTIFY, 0);
    identify.set_cdw(10, 1);
    identify.set_sgl(Sgl::transport(4096));
    let c = r.cmd(identify, Bytes::new()).await;
    assert_eq!(c.status, Status::COMMAND_SEQUENCE_ERROR, "before CC.EN");

    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    let write = |fill: u8| {
        let mut sqe = Sqe::rw(io::WRITE, 1, 0, 8, 4096, true);
        sqe.set_cid(u16::from(fill));
        (sqe, Bytes::from(vec![fill; 4096]))
    };
    let (sqe, data) = write(1);
    assert!(q.cmd(sqe, data).await.status.is_success());
    let broadcast_flush = |cid: u16| {
        let mut flush = Sqe::new(io::FLUSH, 0xFFFF_FFFF);
        flush.set_cid(cid);
        flush
    };
    let c = q.cmd(broadcast_flush(3), Bytes::new()).await;
    assert!(c.status.is_success(), "broadcast flush: {:?}", c.status);
    let shut = a
        .cmd(
            Property::set_sqe(property::CC, 0x0046_4001, false),
            Bytes::new(),
        )
        .await;
    assert!(shut.status.is_success());
    let (sqe, data) = write(2);
    let c = q.cmd(sqe, data).await;
    assert_eq!(c.status, Status::COMMAND_SEQUENCE_ERROR, "after CC.SHN");
    // A Flush of every namespace (the broadcast NSID) too: before, it skipped the checks a Flush of one has.
    let c = q.cmd(broadcast_flush(4), Bytes::new()).await;
    assert_eq!(
        c.status,
        Status::COMMAND_SEQUENCE_ERROR,
        "broadcast flush after CC.SHN"
    );
    let back = t
        .target
        .subsystem(NQN)
        .unwrap()
        .namespace(1)
        .unwrap()
        .device
        .read(0, 4096)
        .await
        .unwrap();
    assert_eq!(
        back,
        Bytes::from(vec![1u8; 4096]),
        "written after the shutdown"
    );
    still_serves(t.addr).await;
}

/// The Host Identifier feature (mandatory where reservations are): Get returns Connect's 128-bit identifier when
/// the host asks for the extended one, Invalid Field otherwise; Set is a Command Sequence Error over fabrics (the
/// identifier is Connect's), as Linux's target answers.
#[tokio::test]
async fn the_host_identifier_feature_reads_connect_s_identifier() {
    let t = target().await;
    let (mut a, _) = Raw::admin(t.addr, 0).await;
    let mut get = Sqe::new(admin::GET_FEATURES, 0);
    get.set_cdw(10, 0x81);
    get.set_cdw(11, 1);
    get.set_sgl(Sgl::transport(16));
    get.set_cid(900);
    a.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe: get,
        data: Bytes::new(),
    }))
    .await;
    let mut got = Vec::new();
    let status = loop {
        match a.recv().await {
            Recv::Pdu(Pdu::C2HData(d)) => got.extend_from_slice(&d.data),
            Recv::Pdu(Pdu::CapsuleResp(c)) => break c.status,
            Recv::Pdu(p) => panic!("unexpected {p:?}"),
            _ => panic!("closed or undecodable"),
        }
    };
    assert!(status.is_success(), "{status:?}");
    assert_eq!(got, HOSTID.to_vec());
    let mut short = Sqe::new(admin::GET_FEATURES, 0);
    short.set_cdw(10, 0x81);
    short.set_sgl(Sgl::transport(16));
    assert_eq!(
        a.cmd(short, Bytes::new()).await.status,
        Status::INVALID_FIELD
    );
    let mut set = Sqe::new(admin::SET_FEATURES, 0);
    set.set_cdw(10, 0x81);
    assert_eq!(
        a.cmd(set, Bytes::new()).await.status,
        Status::COMMAND_SEQUENCE_ERROR
    );
}
