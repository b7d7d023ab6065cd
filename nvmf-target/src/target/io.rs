//! NVM I/O commands: Read, Write, Flush, Write Zeroes, Dataset Management (deallocate), reservations and Keelson's
//! vendor commands. [`validate`] runs before any data moves (namespace, access through this path as
//! [`super::access`] decides, LBA range, transfer length); [`execute`] does the I/O on the namespace's block device
//! and maps block errors to NVMe statuses ([`map_error`], the one such mapping).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes};

use crate::block::timing::{self, Stage};
use crate::block::{BlockError, MissedWrites};
use crate::protocol::command::{Access, Sqe, io};
use crate::protocol::status::Status;
use crate::protocol::vendor::{self, AllocatedAnswer, AllocatedQuery};

use super::Shared;
use super::access::{self, Path};
use super::controller::Controller;
use super::response::Response;
use super::subsystem::Namespace;

pub const BROADCAST_NSID: u32 = 0xFFFF_FFFF;

/// Checks a command against its namespace and this path before data moves.
pub(super) fn validate(
    shared: &Shared,
    ctrl: &Controller,
    sqe: &Sqe,
) -> Result<Arc<Namespace>, Status> {
    // A controller disabled or shut down (CC.EN cleared, CC.SHN set) runs no command, as Linux's target: a host that
    // shut its controller down has let go of it.
    if !ctrl.is_enabled() {
        return Err(Status::COMMAND_SEQUENCE_ERROR);
    }
    let ns = ctrl
        .subsystem
        .namespace(sqe.nsid())
        .ok_or(Status::INVALID_NAMESPACE)?;
    let access = Access::of(sqe.opcode()).ok_or(Status::INVALID_OPCODE)?;
    let host = uuid::Uuid::from_bytes(ctrl.hostid);
    let path = Path::Port(shared.ana.state(ctrl.port_id, ns.ana_group));
    access::admit(&ns, host, access, path)?;
    match sqe.opcode() {
        io::READ | io::WRITE | io::WRITE_ZEROES => {
            let end = sqe.slba().checked_add(u64::from(sqe.nlb()));
            if end.is_none_or(|e| e > ns.device.num_blocks()) {
                return Err(Status::LBA_OUT_OF_RANGE);
            }
            if sqe.opcode() != io::WRITE_ZEROES {
                let len = u64::from(sqe.nlb()) * u64::from(ns.device.block_size());
                if u64::from(sqe.sgl().length) != len {
                    return Err(Status::SGL_DATA_LENGTH_INVALID);
                }
                if len > shared.config.max_transfer() {
                    return Err(Status::INVALID_FIELD);
                }
            }
        }
        io::DATASET_MANAGEMENT => {
            // At most 256 ranges of 16 bytes: the host's length never sizes more than that.
            let ranges = (sqe.cdw(10) & 0xFF) + 1;
            if sqe.sgl().length < ranges * 16 || sqe.sgl().length > 256 * 16 {
                return Err(Status::SGL_DATA_LENGTH_INVALID);
            }
        }
        io::FLUSH => {}
        io::RESERVATION_REGISTER | io::RESERVATION_ACQUIRE => {
            if sqe.sgl().length != 16 {
                return Err(Status::SGL_DATA_LENGTH_INVALID);
            }
        }
        io::RESERVATION_RELEASE => {
            // CRKEY, 8 bytes; Linux's host sends its 16-byte buffer for every reservation command (the rest is
            // ignored, as Linux's target does).
            if !(8..=16).contains(&sqe.sgl().length) {
                return Err(Status::SGL_DATA_LENGTH_INVALID);
            }
        }
        io::KEELSON_SNAPSHOT => {
            if sqe.sgl().length != 16 {
                return Err(Status::SGL_DATA_LENGTH_INVALID);
            }
        }
        io::KEELSON_MISSED_NOTE | io::KEELSON_MISSED_FORGET | io::KEELSON_MISSED_READ => {
            let len = u64::from(sqe.sgl().length);
            if len == 0 || len > shared.config.max_transfer() {
                return Err(Status::SGL_DATA_LENGTH_INVALID);
            }
        }
        io::KEELSON_ALLOCATED => {
            let len = u64::from(sqe.sgl().length);
            if len < 32 || len % 16 != 0 || len > shared.config.max_transfer() {
                return Err(Status::SGL_DATA_LENGTH_INVALID);
            }
            let AllocatedQuery { slba, nlb } = AllocatedQuery::read_from(sqe);
            if slba
                .checked_add(nlb)
                .is_none_or(|e| e > ns.device.num_blocks())
            {
                return Err(Status::LBA_OUT_OF_RANGE);
            }
        }
        io::RESERVATION_REPORT => {
            let len = (u64::from(sqe.cdw(10)) + 1) * 4;
            if u64::from(sqe.sgl().length) != len || len > shared.config.max_transfer() {
                return Err(Status::SGL_DATA_LENGTH_INVALID);
            }
            if sqe.cdw(11) & 1 == 0 {
                // Fabrics hosts have 128-bit host identifiers: only the extended data structure fits them.
                return Err(Status::HOST_ID_INCONSISTENT_FORMAT);
            }
        }
        _ => return Err(Status::INVALID_OPCODE),
    }
    // Whatever the command, no transfer beyond MDTS (a host-to-controller one would be a single R2T past
    // MAXH2CDATA, its data buffered until complete).
    if u64::from(sqe.sgl().length) > shared.config.max_transfer() {
        return Err(Status::INVALID_FIELD);
    }
    Ok(ns)
}

/// The NVMe status for a block device error.
pub fn map_error(e: &BlockError, is_read: bool) -> Status {
    match e {
        BlockError::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE,
        BlockError::Unaligned { .. } => Status::INVALID_FIELD,
        BlockError::NoSpace => Status::CAPACITY_EXCEEDED,
        BlockError::ReadOnly => Status::NAMESPACE_WRITE_PROTECTED,
        BlockError::ReservationConflict => Status::RESERVATION_CONFLICT,
        BlockError::Unsupported => Status::INVALID_OPCODE,
        BlockError::Closed => Status::NAMESPACE_NOT_READY,
        BlockError::Relocated(_) => Status::ANA_INACCESSIBLE,
        _ if is_read => Status::UNRECOVERED_READ_ERROR,
        _ => Status::WRITE_FAULT,
    }
}

/// Runs a validated command. `data` is the host's data for writes and DSM.
pub(super) async fn execute(
    ctrl: Arc<Controller>,
    ns: Arc<Namespace>,
    sqe: Sqe,
    data: Bytes,
) -> Response {
    let start = std::time::Instant::now();
    let opcode = sqe.opcode();
    let bytes = u64::from(sqe.nlb()) * u64::from(ns.device.block_size());
    let r = run(ctrl, ns.clone(), sqe, data).await;
    let kind = match opcode {
        io::READ => &ns.stats.read,
        io::WRITE => &ns.stats.write,
        _ => &ns.stats.other,
    };
    let bytes = if matches!(opcode, io::READ | io::WRITE) {
        bytes
    } else {
        0
    };
    kind.record(bytes, start.elapsed(), r.cqe.status.is_success());
    let mut r = r;
    if timing::sample(timing::Layer::Target) {
        r.ready_at = Some(timing::record_since(Stage::TargetExecute, start));
    }
    r
}

/// After a write: flushes the device when the command asked for Force Unit Access, or when the host turned the
/// volatile write cache off (Set Features 06h), so that the write is durable before it is acknowledged.
async fn durable(ctrl: &Controller, ns: &Namespace, sqe: &Sqe) -> Result<(), (BlockError, bool)> {
    if sqe.fua() || !ctrl.write_cache() {
        ns.device.flush().await.map_err(|e| (e, false))
    } else {
        Ok(())
    }
}

pub(super) async fn run(
    ctrl: Arc<Controller>,
    ns: Arc<Namespace>,
    sqe: Sqe,
    data: Bytes,
) -> Response {
    let cid = sqe.cid();
    // Checked at admission already; checked again under the reservations' fence, held until the command ends, so
    // that a reservation change made meanwhile either waits for this command or refuses it.
    let _fence = match Access::of(sqe.opcode()) {
        Some(a) if a.modifies() => {
            match ns
                .reservations
                .admit_change(uuid::Uuid::from_bytes(ctrl.hostid))
                .await
            {
                // A controller ended meanwhile (its host went away, or changed its reservation through a newer
                // controller of a single-path subsystem) changes nothing more: checked under the fence, so a
                // change that ended it first either waits for this command or sees it refused.
                Ok(_) if ctrl.cancel.is_cancelled() => {
                    return Response::status(cid, Status::ABORTED_SQ_DELETION);
                }
                Ok(g) => Some(g),
                Err(st) => return Response::status(cid, st),
            }
        }
        _ => None,
    };
    let bs = u64::from(ns.device.block_size());
    // Only Read, Write and Write Zeroes use it, and `validate` checked their range; other opcodes carry other
    // fields in those dwords, which must not overflow anything.
    let offset = sqe.slba().wrapping_mul(bs);
    let len = u64::from(sqe.nlb()) * bs;
    let c = &ctrl.counters;
    let result = match sqe.opcode() {
        io::READ => match ns.device.read(offset, len).await {
            Ok(d) => {
                c.read_commands.fetch_add(1, Ordering::Relaxed);
                c.bytes_read.fetch_add(len, Ordering::Relaxed);
                return Response::data(cid, d);
            }
            Err(e) => Err((e, true)),
        },
        io::WRITE => {
            let r = ns.device.write(offset, data).await;
            if r.is_ok() {
                c.write_commands.fetch_add(1, Ordering::Relaxed);
                c.bytes_written.fetch_add(len, Ordering::Relaxed);
                durable(&ctrl, &ns, &sqe).await
            } else {
                r.map_err(|e| (e, false))
            }
        }
        io::WRITE_ZEROES => match ns.device.write_zeroes(offset, len).await {
            Ok(()) => durable(&ctrl, &ns, &sqe).await,
            Err(e) => Err((e, false)),
        },
        io::FLUSH => ns.device.flush().await.map_err(|e| (e, false)),
        io::DATASET_MANAGEMENT => dataset_management(&ns, &sqe, data).await,
        io::RESERVATION_REPORT => {
            let len = sqe.sgl().length as usize;
            let persists = ns.reservations.persists();
            return Response::data(cid, ns.reservations.state().report(len, persists));
        }
        io::KEELSON_SNAPSHOT => match vendor::parse_snapshot(&data) {
            Ok(id) => ns.device.snapshot(id).await.map_err(|e| (e, false)),
            Err(_) => return Response::status(cid, Status::INVALID_FIELD),
        },
        io::KEELSON_MISSED_NOTE => match vendor::parse_note::<MissedWrites>(&data)
            .map_err(|e| e.to_string())
            .and_then(|m| m.checked(ns.device.size_bytes()))
        {
            Ok(m) => ns.device.note_missed(&m).await.map_err(|e| (e, false)),
            Err(_) => return Response::status(cid, Status::INVALID_FIELD),
        },
        io::KEELSON_MISSED_FORGET => match vendor::parse_forget(&data) {
            Ok(child) => ns.device.forget_missed(child).await.map_err(|e| (e, false)),
            Err(_) => return Response::status(cid, Status::INVALID_FIELD),
        },
        io::KEELSON_MISSED_READ => {
            return match missed(&ns, sqe.sgl().length as usize).await {
                Ok(d) => Response::data(cid, d),
                Err(st) => Response::status(cid, st),
            };
        }
        io::KEELSON_ALLOCATED => {
            return match allocated(&ns, &sqe).await {
                Ok(d) => Response::data(cid, d),
                Err(st) => Response::status(cid, st),
            };
        }
        io::RESERVATION_REGISTER | io::RESERVATION_ACQUIRE | io::RESERVATION_RELEASE => {
            return match reservation(&ctrl, &ns, &sqe, data).await {
                Ok(()) => Response::ok(cid),
                Err(st) => Response::status(cid, st),
            };
        }
        _ => return Response::status(cid, Status::INVALID_OPCODE),
    };
    match result {
        Ok(()) => Response::ok(cid),
        Err((e, is_read)) => {
            let st = map_error(&e, is_read);
            if matches!(st, Status::UNRECOVERED_READ_ERROR | Status::WRITE_FAULT) {
                c.media_errors.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(cid, nsid = ns.nsid, error = %e, "I/O failed");
            Response::status(cid, st)
        }
    }
}

/// Answers [`io::KEELSON_MISSED_READ`] with every record, in `len` bytes.
async fn missed(ns: &Namespace, len: usize) -> Result<Bytes, Status> {
    let records = ns.device.missed().await.map_err(|e| map_error(&e, true))?;
    vendor::missed_answer(&records, len).map_err(|e| match e {
        vendor::VendorError::NoRoom { .. } => Status::DATA_TRANSFER_ERROR,
        _ => Status::INTERNAL_ERROR,
    })
}

/// Answers [`io::KEELSON_ALLOCATED`] from the device; a device that cannot tell makes it an invalid opcode.
async fn allocated(ns: &Namespace, sqe: &Sqe) -> Result<Bytes, Status> {
    let bs = u64::from(ns.device.block_size());
    let q = AllocatedQuery::read_from(sqe);
    let ranges = ns
        .device
        .allocated_ranges(q.slba * bs, q.nlb * bs)
        .await
        .map_err(|e| map_error(&e, true))?
        .ok_or(Status::INVALID_OPCODE)?;
    let extents: Vec<(u64, u64)> = ranges
        .iter()
        .map(|(s, n)| (s / bs, n.div_ceil(bs)))
        .collect();
    Ok(AllocatedAnswer::encode(&extents, sqe.sgl().length as usize))
}

/// Reservation Register, Acquire and Release: keys from the data, action, IEKEY and type from CDW10.
async fn reservation(
    ctrl: &Controller,
    ns: &Namespace,
    sqe: &Sqe,
    mut data: Bytes,
) -> Result<(), Status> {
    let host = uuid::Uuid::from_bytes(ctrl.hostid);
    let cdw10 = sqe.cdw(10);
    let action = (cdw10 & 0x7) as u8;
    let iekey = cdw10 & (1 << 3) != 0;
    let rtype = ((cdw10 >> 8) & 0xFF) as u8;
    if data.remaining() < 8 {
        return Err(Status::SGL_DATA_LENGTH_INVALID);
    }
    let crkey = data.get_u64_le();
    let second = if data.remaining() >= 8 {
        data.get_u64_le()
    } else {
        0
    };
    let r = &ns.reservations;
    // In turn with other changes, before this one takes the fence: an ended controller changes nothing (two
    // controllers of a host changing at once would otherwise end each other); on a single-path subsystem the host's
    // other controllers end, their commands not admitted yet are refused and those admitted waited for.
    let through = || {
        if ctrl.cancel.is_cancelled() {
            return Err(Status::ABORTED_SQ_DELETION);
        }
        if ctrl.subsystem.single_path {
            ctrl.subsystem.end_other_controllers_of_host(ctrl);
        }
        Ok(())
    };
    // Each change waits for the commands that changed the namespace before it, and for the disk to end what they
    // handed it: a preempted host's writes are all in or all refused.
    let settled = ns.device.settle();
    let result = match sqe.opcode() {
        io::RESERVATION_REGISTER => {
            r.change_through(through, settled, |s| {
                s.register(host, action, iekey, crkey, second)
            })
            .await
        }
        io::RESERVATION_ACQUIRE => {
            r.change_through(through, settled, |s| {
                s.acquire(host, action, iekey, crkey, second, rtype)
            })
            .await
        }
        _ => {
            r.change_through(through, settled, |s| {
                s.release(host, action, iekey, crkey, rtype)
            })
            .await
        }
    };
    tracing::debug!(nsid = ns.nsid, %host, opcode = sqe.opcode(), action, ?result, "reservation command");
    result
}

/// Flush of the broadcast NSID: every namespace of the subsystem, each admitted and run as a Flush naming it (a
/// controller shut down, a path Inaccessible, a reservation that holds this host off refuse it, as they refuse a
/// Flush of one namespace), with the first failure's status.
pub(super) async fn flush_all(shared: Arc<Shared>, ctrl: Arc<Controller>, sqe: Sqe) -> Response {
    let cid = sqe.cid();
    if !ctrl.is_enabled() {
        return Response::status(cid, Status::COMMAND_SEQUENCE_ERROR);
    }
    for ns in ctrl.subsystem.namespaces() {
        let mut one = sqe;
        one.set_nsid(ns.nsid);
        let ns = match validate(&shared, &ctrl, &one) {
            Ok(ns) => ns,
            Err(st) => return Response::status(cid, st),
        };
        let r = run(ctrl.clone(), ns, one, Bytes::new()).await;
        if !r.cqe.status.is_success() {
            return r;
        }
    }
    Response::ok(cid)
}

async fn dataset_management(
    ns: &Namespace,
    sqe: &Sqe,
    mut data: Bytes,
) -> Result<(), (BlockError, bool)> {
    if sqe.cdw(11) & (1 << 2) == 0 {
        return Ok(()); // only attribute hints: nothing to do
    }
    let bs = u64::from(ns.device.block_size());
    let ranges = (sqe.cdw(10) & 0xFF) + 1;
    let mut todo = Vec::new();
    for _ in 0..ranges {
        if data.remaining() < 16 {
            break;
        }
        let _attrs = data.get_u32_le();
        let nlb = u64::from(data.get_u32_le());
        let slba = data.get_u64_le();
        if slba
            .checked_add(nlb)
            .is_none_or(|e| e > ns.device.num_blocks())
        {
            let size = ns.device.size_bytes();
            return Err((
                BlockError::OutOfRange {
                    offset: slba.saturating_mul(bs),
                    len: nlb * bs,
                    size,
                },
                false,
            ));
        }
        if nlb > 0 {
            todo.push((slba * bs, nlb * bs));
        }
    }
    for (off, len) in todo {
        ns.device
            .deallocate(off, len)
            .await
            .map_err(|e| (e, false))?;
    }
    Ok(())
}
