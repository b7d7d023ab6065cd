//! Tests of [`super::io`]: what a controller that has ended may still do, and how a reservation change through one
//! controller of a host ends its others on a single-path subsystem.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::sync::CancellationToken;

use super::controller::Controller;
use super::io::run;
use super::subsystem::{Namespace, Subsystem, SubsystemKind};
use crate::block::BlockDevice;
use crate::block::memory::MemoryDevice;
use crate::protocol::command::{Sqe, io, resv};
use crate::protocol::nqn::Nqn;
use crate::protocol::status::Status;

const HOSTID: [u8; 16] = [7u8; 16];

/// A subsystem with one RAM namespace whose Write Exclusive reservation host [`HOSTID`] holds under key 1, and
/// two controllers of that host.
struct Setup {
    sub: Arc<Subsystem>,
    ns: Arc<Namespace>,
    dev: Arc<MemoryDevice>,
    old: Arc<Controller>,
    new: Arc<Controller>,
    _parent: CancellationToken,
}

async fn setup(single_path: bool) -> Setup {
    let sub = Arc::new(Subsystem::new(
        Nqn::replica(&uuid::Uuid::new_v4()),
        "s".into(),
        "m".into(),
        SubsystemKind::Nvm,
        true,
        single_path,
    ));
    let dev = Arc::new(MemoryDevice::new(1 << 20, 512));
    sub.add_namespace(1, uuid::Uuid::new_v4(), 1, dev.clone())
        .unwrap();
    let ns = sub.namespace(1).unwrap();
    let host = uuid::Uuid::from_bytes(HOSTID);
    ns.reservations
        .change(|s| {
            s.register(host, resv::REGISTER, false, 0, 1)?;
            s.acquire(host, resv::ACQUIRE, false, 1, 0, resv::WRITE_EXCLUSIVE)
        })
        .await
        .unwrap();
    let parent = CancellationToken::new();
    let ctrl = || {
        sub.add_controller(1..=100, |id| {
            Arc::new(Controller::new(
                id,
                sub.clone(),
                "nqn.2026-11.io.keelson:node-a".into(),
                HOSTID,
                0,
                0,
                32,
                1,
                &parent,
            ))
        })
        .unwrap()
    };
    let (old, new) = (ctrl(), ctrl());
    Setup {
        sub,
        ns,
        dev,
        old,
        new,
        _parent: parent,
    }
}

fn write(cid: u16) -> Sqe {
    let mut sqe = Sqe::rw(io::WRITE, 1, 0, 8, 4096, true);
    sqe.set_cid(cid);
    sqe
}

/// Reservation Acquire of the Write Exclusive reservation under key 1 (the holder taking it again).
fn acquire(cid: u16) -> (Sqe, Bytes) {
    let mut sqe = Sqe::new(io::RESERVATION_ACQUIRE, 1);
    sqe.set_cid(cid);
    sqe.set_cdw(
        10,
        u32::from(resv::ACQUIRE) | (u32::from(resv::WRITE_EXCLUSIVE) << 8),
    );
    let mut keys = BytesMut::new();
    keys.put_u64_le(1);
    keys.put_u64_le(0);
    (sqe, keys.freeze())
}

fn is_live(s: &Setup, c: &Controller) -> bool {
    !c.cancel.is_cancelled() && s.sub.controller(c.cntlid).is_some()
}

/// A write of a controller that has ended (its host went away, or took its reservation again through a newer
/// controller of a single-path subsystem) changes nothing, though its host holds the reservation: checked under
/// the fence, so a command a change did not wait for is refused.
#[tokio::test]
async fn a_write_of_an_ended_controller_is_refused_though_its_host_holds_the_reservation() {
    let s = setup(true).await;
    let r = run(
        s.new.clone(),
        s.ns.clone(),
        write(1),
        Bytes::from(vec![1u8; 4096]),
    )
    .await;
    assert_eq!(r.cqe.status, Status::SUCCESS);

    s.old.shutdown("test: ended");
    let r = run(
        s.old.clone(),
        s.ns.clone(),
        write(2),
        Bytes::from(vec![2u8; 4096]),
    )
    .await;
    assert_eq!(r.cqe.status, Status::ABORTED_SQ_DELETION);
    assert_eq!(s.dev.read(0, 4096).await.unwrap(), vec![1u8; 4096]);
    let r = run(
        s.new.clone(),
        s.ns.clone(),
        write(3),
        Bytes::from(vec![3u8; 4096]),
    )
    .await;
    assert_eq!(r.cqe.status, Status::SUCCESS);
}

/// On a single-path subsystem a reservation change through one controller of a host ends its others; one through
/// a controller that has ended changes nothing and ends no one (two controllers of a host changing at once would
/// otherwise end each other).
#[tokio::test]
async fn a_reservation_change_ends_the_hosts_other_controllers_unless_its_own_has_ended() {
    let s = setup(true).await;
    let (sqe, keys) = acquire(1);
    let r = run(s.new.clone(), s.ns.clone(), sqe, keys).await;
    assert_eq!(r.cqe.status, Status::SUCCESS);
    assert!(!is_live(&s, &s.old), "the older controller was ended");
    assert!(is_live(&s, &s.new));

    let (sqe, keys) = acquire(2);
    let r = run(s.old.clone(), s.ns.clone(), sqe, keys).await;
    assert_eq!(r.cqe.status, Status::ABORTED_SQ_DELETION);
    assert!(is_live(&s, &s.new), "an ended controller ends no one");
}

/// A volume's subsystem is not single-path: a Linux host keeps a controller per path, and its reservation change
/// through one leaves the others.
#[tokio::test]
async fn elsewhere_a_reservation_change_leaves_the_hosts_other_controllers() {
    let s = setup(false).await;
    let (sqe, keys) = acquire(1);
    let r = run(s.new.clone(), s.ns.clone(), sqe, keys).await;
    assert_eq!(r.cqe.status, Status::SUCCESS);
    assert!(is_live(&s, &s.old) && is_live(&s, &s.new));
}

/// A reservation change the state refuses (a key the host does not hold) ends no one.
#[tokio::test]
async fn a_refused_reservation_change_ends_no_one() {
    let s = setup(true).await;
    let (sqe, _) = acquire(1);
    let mut wrong = BytesMut::new();
    wrong.put_u64_le(9);
    wrong.put_u64_le(0);
    let r = run(s.new.clone(), s.ns.clone(), sqe, wrong.freeze()).await;
    assert_eq!(r.cqe.status, Status::RESERVATION_CONFLICT);
    assert!(is_live(&s, &s.old) && is_live(&s, &s.new));
}
