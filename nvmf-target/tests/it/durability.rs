//! When the target flushes its device for a host: Force Unit Access on a Write or a Write Zeroes, and every write
//! once the host has turned the volatile write cache off (Set Features 06h); a plain write does not.

use std::sync::Arc;

use bytes::Bytes;
use nvmf_target::block::memory::MemoryDevice;
use nvmf_target::protocol::command::{Sqe, admin, io};
use nvmf_target::target::TargetConfig;

use super::harness::*;

const FUA: u32 = 1 << 30;

fn write(fua: bool) -> Sqe {
    let mut s = Sqe::rw(io::WRITE, 2, 16, 8, 4096, true);
    if fua {
        s.set_cdw(12, s.cdw(12) | FUA);
    }
    s
}

fn write_zeroes(fua: bool) -> Sqe {
    let mut s = Sqe::new(io::WRITE_ZEROES, 2);
    s.set_cdw(10, 32);
    s.set_cdw(12, 7 | if fua { FUA } else { 0 });
    s
}

#[tokio::test]
async fn writes_are_flushed_for_fua_and_when_the_host_turns_the_write_cache_off() {
    let t = target_with(&[], TargetConfig::default()).await;
    let dev = Arc::new(MemoryDevice::new(NS_SIZE, 512));
    t.target
        .add_namespace(NQN, 2, uuid::Uuid::new_v4(), 1, dev.clone())
        .unwrap();
    let (mut admin_q, cntlid) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut admin_q, cntlid).await;
    let data = Bytes::from(vec![7u8; 4096]);
    let flushes = || dev.flushes();

    for (sqe, payload, want) in [
        (write(false), data.clone(), 0),
        (write(true), data.clone(), 1),
        (write_zeroes(false), Bytes::new(), 1),
        (write_zeroes(true), Bytes::new(), 2),
    ] {
        assert!(q.cmd(sqe, payload).await.status.is_success());
        assert_eq!(flushes(), want);
    }

    // Volatile write cache off: every write is durable before it is acknowledged.
    let mut off = Sqe::new(admin::SET_FEATURES, 0);
    off.set_cdw(10, 0x06);
    off.set_cdw(11, 0);
    assert!(admin_q.cmd(off, Bytes::new()).await.status.is_success());
    let mut get = Sqe::new(admin::GET_FEATURES, 0);
    get.set_cdw(10, 0x06);
    assert_eq!(admin_q.cmd(get, Bytes::new()).await.dw0() & 1, 0);
    assert!(q.cmd(write(false), data.clone()).await.status.is_success());
    assert_eq!(flushes(), 3);
    assert!(
        q.cmd(write_zeroes(false), Bytes::new())
            .await
            .status
            .is_success()
    );
    assert_eq!(flushes(), 4);
}
