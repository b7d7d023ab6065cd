//! SQ flow control, on and off: with it off (Connect CATTR bit 2) the target reports no head pointer and ends a
//! successful read with its data PDU alone (SUCCESS flag), as the Linux target does; a failed read, a write, and
//! any read on a queue with flow control still get a CapsuleResp.

use bytes::Bytes;
use nvmf_target::protocol::command::{Sgl, Sqe, io};
use nvmf_target::protocol::fabrics::DISABLE_SQ_FLOW_CONTROL;
use nvmf_target::protocol::pdu::{CapsuleCmd, DataPdu, Pdu};
use nvmf_target::protocol::status::Status;

use super::harness::*;

fn read(cid: u16, slba: u64, blocks: u32) -> Pdu {
    let mut sqe = Sqe::rw(io::READ, 1, slba, blocks, blocks * 512, false);
    sqe.set_sgl(Sgl::transport(blocks * 512));
    sqe.set_cid(cid);
    Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::new(),
    })
}

async fn data_pdu(q: &mut Raw) -> DataPdu {
    match q.recv().await {
        Recv::Pdu(Pdu::C2HData(d)) => d,
        Recv::Pdu(p) => panic!("expected C2HData, got {p:?}"),
        _ => panic!("expected C2HData"),
    }
}

#[tokio::test]
async fn without_flow_control_a_read_ends_with_its_data_pdu() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io_with(t.addr, &mut a, id, DISABLE_SQ_FLOW_CONTROL).await;
    let data = Bytes::from((0..1024u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
    let c = q
        .cmd(Sqe::rw(io::WRITE, 1, 8, 2, 1024, true), data.clone())
        .await;
    assert!(c.status.is_success());
    assert_eq!(c.sqhd, 0xFFFF, "no head pointer without flow control");

    // Two reads in a row, then a write: the reads' data PDUs carry SUCCESS and the next CapsuleResp is the write's.
    q.send(read(100, 8, 2)).await;
    q.send(read(101, 8, 1)).await;
    let mut w = Sqe::rw(io::WRITE, 1, 0, 1, 512, true);
    w.set_cid(102);
    q.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe: w,
        data: Bytes::from(vec![1u8; 512]),
    }))
    .await;
    for (cid, len) in [(100u16, 1024usize), (101, 512)] {
        let d = data_pdu(&mut q).await;
        assert_eq!((d.cccid, d.last, d.success), (cid, true, true));
        assert_eq!(d.data, data.slice(..len));
    }
    let c = q.cqe().await;
    assert_eq!((c.cid, c.status), (102, Status::SUCCESS));

    // A failed read says so in a CapsuleResp, with no data.
    q.send(read(103, NS_SIZE / 512 - 1, 2)).await;
    match q.recv().await {
        Recv::Pdu(Pdu::CapsuleResp(c)) => {
            assert_eq!((c.cid, c.status), (103, Status::LBA_OUT_OF_RANGE))
        }
        Recv::Pdu(p) => panic!("expected CapsuleResp, got {p:?}"),
        _ => panic!("expected CapsuleResp"),
    }
}

#[tokio::test]
async fn with_flow_control_a_read_gets_its_capsule_response() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    q.send(read(7, 0, 1)).await;
    let d = data_pdu(&mut q).await;
    assert_eq!((d.cccid, d.last, d.success), (7, true, false));
    let c = q.cqe().await;
    assert_eq!((c.cid, c.status), (7, Status::SUCCESS));
    assert_ne!(
        c.sqhd, 0xFFFF,
        "the head pointer is reported with flow control"
    );
}
