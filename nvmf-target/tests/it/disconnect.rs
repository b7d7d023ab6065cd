//! A host whose connection ends while its commands are running: the commands still finish. Dropped half way, a
//! write to a replicated volume could reach some replicas and not others, with nothing recorded to bring them
//! together again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nvmf_target::block::BlockDevice;
use nvmf_target::block::fault::{FaultDevice, FaultPlan};
use nvmf_target::block::memory::MemoryDevice;
use nvmf_target::protocol::command::{Sqe, io};
use nvmf_target::protocol::pdu::{CapsuleCmd, Pdu};
use nvmf_target::target::TargetConfig;

use super::harness::*;

#[tokio::test]
async fn a_write_running_when_the_host_disconnects_still_completes() {
    let t = target_with(&[], TargetConfig::default()).await;
    let disk = Arc::new(MemoryDevice::new(NS_SIZE, 512));
    let slow = Arc::new(FaultDevice::new(disk.clone()));
    slow.set_plan(FaultPlan {
        latency: Some(Duration::from_millis(300)),
        ..Default::default()
    });
    t.target
        .add_namespace(NQN, 2, uuid::Uuid::new_v4(), 1, slow)
        .unwrap();
    let (mut admin, cntlid) = Raw::admin(t.addr, 0).await;
    let mut q = Raw::io(t.addr, &mut admin, cntlid).await;
    let data = Bytes::from(vec![0x5a; 4096]);
    let mut sqe = Sqe::rw(io::WRITE, 2, 16, 8, 4096, true);
    sqe.set_cid(7);
    q.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: data.clone(),
    }))
    .await;
    // The command has reached the device's delay; then the host goes away, admin queue and all.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(q);
    drop(admin);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(disk.read(16 * 512, 4096).await.unwrap(), data);
}
