//! Asynchronous events and the log pages behind them.

use std::sync::Arc;

use bytes::{Buf, Bytes};
use nvmf_target::block::memory::MemoryDevice;
use nvmf_target::protocol::command::{Sgl, Sqe, admin, io};
use nvmf_target::protocol::pdu::{CapsuleCmd, Pdu};
use nvmf_target::protocol::status::Status;

use super::harness::*;

/// Get Log Page through the raw client; returns the data.
pub async fn log_page(a: &mut Raw, lid: u8, len: u32) -> Bytes {
    let mut sqe = Sqe::new(admin::GET_LOG_PAGE, 0xFFFF_FFFF);
    sqe.set_cdw(10, u32::from(lid) | ((len / 4 - 1) << 16));
    sqe.set_sgl(Sgl::transport(len));
    sqe.set_cid(7);
    a.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::new(),
    }))
    .await;
    let data = match a.recv().await {
        Recv::Pdu(Pdu::C2HData(d)) => d.data,
        _ => panic!("expected log data"),
    };
    assert!(a.cqe().await.status.is_success());
    data
}

#[tokio::test]
async fn adding_a_namespace_raises_ns_changed_and_lists_it() {
    let t = target().await;
    let (mut a, _) = Raw::admin(t.addr, 0).await;
    a.arm_events(1 << 8).await;
    t.target
        .add_namespace(
            NQN,
            0,
            uuid::Uuid::new_v4(),
            1,
            Arc::new(MemoryDevice::new(1 << 20, 512)),
        )
        .unwrap();
    let ev = a.cqe().await;
    assert_eq!(
        (ev.cid, ev.dw0()),
        (31, 0x0004_0002),
        "notice, namespace attribute changed, log 04h"
    );
    // A read past the page is refused and leaves the list as it was (before, it was taken and lost).
    let mut past = Sqe::new(admin::GET_LOG_PAGE, 0xFFFF_FFFF);
    past.set_cdw(10, 0x04 | ((4096 / 4 - 1) << 16));
    past.set_cdw(12, 8192);
    past.set_sgl(Sgl::transport(4096));
    assert_eq!(
        a.cmd(past, Bytes::new()).await.status,
        Status::INVALID_FIELD
    );
    let mut log = log_page(&mut a, 0x04, 4096).await;
    assert_eq!(log.get_u32_le(), 2);
    assert_eq!(log.get_u32_le(), 0);
    // Read without RAE: the list is cleared.
    let mut log = log_page(&mut a, 0x04, 4096).await;
    assert_eq!(log.get_u32_le(), 0);
}

#[tokio::test]
async fn smart_log_counts_io() {
    let t = target().await;
    let (mut a, id) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut a, id).await;
    for i in 0..10 {
        let c = q
            .cmd(
                Sqe::rw(io::WRITE, 1, i * 8, 8, 4096, true),
                Bytes::from(vec![1u8; 4096]),
            )
            .await;
        assert!(c.status.is_success());
    }
    let log = log_page(&mut a, 0x02, 512).await;
    let u64_at = |o: usize| (&log[o..o + 8]).get_u64_le();
    assert_eq!(u64_at(80), 10, "host write commands");
    assert_eq!(
        u64_at(48),
        1,
        "data units written (thousands of 512-byte units, rounded up)"
    );
}
