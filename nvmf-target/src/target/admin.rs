//! Admin commands of NVM and discovery controllers: Identify, Get Log Page, Get/Set Features, Keep Alive,
//! Asynchronous Event Request and Abort. Each returns a [`Response`], or `None` for an AER that stays outstanding.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::command::{Sqe, admin, io};
use crate::protocol::identify::{
    self, ControllerData, NamespaceData, active_namespace_list, cns, controller_type,
    namespace_descriptors,
};
use crate::protocol::log::{self, AnaGroup, lid};
use crate::protocol::status::Status;

use super::Shared;
use super::ana::MAX_GROUPS;
use super::controller::{AERL, Controller, VERSION};
use super::discovery;
use super::response::Response;
use super::subsystem::{MAX_NSID, Namespace, SubsystemKind};

/// Feature identifiers.
mod fid {
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Host Identifier: mandatory where reservations are (ONCS bit 5).
    pub const HOST_IDENTIFIER: u8 = 0x81;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0B;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0F;
}

pub(super) struct AdminCtx<'a> {
    pub shared: &'a Arc<Shared>,
    pub ctrl: &'a Arc<Controller>,
    pub local_addr: SocketAddr,
}

impl AdminCtx<'_> {
    fn discovery(&self) -> bool {
        self.ctrl.subsystem.kind == SubsystemKind::Discovery
    }
}

pub(super) fn execute(ctx: &AdminCtx<'_>, sqe: &Sqe) -> Option<Response> {
    let cid = sqe.cid();
    // No admin command moves more than MDTS: a host's claimed length never sizes a buffer beyond it.
    if u64::from(sqe.sgl().length) > ctx.shared.config.max_transfer() {
        return Some(Response::from((cid, Err(Status::INVALID_FIELD))));
    }
    // Before CC.EN (or after a shutdown) only Fabrics commands run, as with Linux's target.
    if !ctx.ctrl.is_enabled() {
        return Some(Response::from((cid, Err(Status::COMMAND_SEQUENCE_ERROR))));
    }
    let r = match sqe.opcode() {
        admin::IDENTIFY => identify(ctx, sqe),
        admin::GET_LOG_PAGE => get_log_page(ctx, sqe),
        admin::SET_FEATURES => set_features(ctx, sqe),
        admin::GET_FEATURES => get_features(ctx, sqe),
        admin::KEEP_ALIVE => {
            if ctx.ctrl.kato_ms() == 0 {
                Err(Status::KEEP_ALIVE_INVALID)
            } else {
                ctx.ctrl.touch();
                Ok(Response::ok(cid))
            }
        }
        admin::ASYNC_EVENT_REQUEST => match ctx.ctrl.submit_aer(cid) {
            Ok(Some(ev)) => Ok(Response::result(cid, u64::from(ev))),
            Ok(None) => return None,
            Err(st) => Err(st),
        },
        // Commands complete too fast to abort: report "not aborted" (DW0 bit 0).
        admin::ABORT => Ok(Response::result(cid, 1)),
        _ => Err(Status::INVALID_OPCODE),
    };
    Some(Response::from((cid, r)))
}

/// Cuts `data` to what the command's SGL asked for.
fn reply(sqe: &Sqe, mut data: Vec<u8>) -> Response {
    data.truncate(sqe.sgl().length as usize);
    Response::data(sqe.cid(), Bytes::from(data))
}

fn controller_data(ctx: &AdminCtx<'_>) -> ControllerData {
    let cfg = &ctx.shared.config;
    let sub = &ctx.ctrl.subsystem;
    let disc = ctx.discovery();
    let mut firmware = env!("CARGO_PKG_VERSION").to_string();
    firmware.truncate(8);
    ControllerData {
        serial: sub.serial.clone(),
        model: sub.model.clone(),
        firmware,
        cmic: if disc { 0 } else { 0b1011 },
        mdts: cfg.mdts,
        cntlid: ctx.ctrl.cntlid,
        version: VERSION,
        oaes: if disc { 1 << 31 } else { (1 << 8) | (1 << 11) },
        ctratt: 1 | (1 << 6),
        cntrltype: if disc {
            controller_type::DISCOVERY
        } else {
            controller_type::IO
        },
        acl: 3,
        aerl: AERL,
        lpa: if disc { 0x04 } else { 0x06 },
        kas: 10,
        anatt: if disc { 0 } else { 10 },
        anacap: if disc { 0 } else { 0x1F },
        anagrpmax: if disc { 0 } else { MAX_GROUPS },
        nanagrpid: if disc { 0 } else { MAX_GROUPS },
        sqes: 0x66,
        cqes: 0x44,
        maxcmd: cfg.queue_entries,
        nn: if disc { 0 } else { MAX_NSID },
        oncs: if disc {
            0
        } else {
            (1 << 2) | (1 << 3) | (1 << 5)
        },
        vwc: u8::from(!disc),
        sgls: 1 | (1 << 20),
        mnan: if disc { 0 } else { MAX_NSID },
        subnqn: sub.nqn.to_string(),
        ioccsz: (cfg.in_capsule_data + 64) / 16,
        iorcsz: 1,
        msdbd: 1,
        ..Default::default()
    }
}

fn namespace_data(ctx: &AdminCtx<'_>, ns: &Namespace) -> NamespaceData {
    let blocks = ns.device.num_blocks();
    let accessible = ctx
        .shared
        .ana
        .state(ctx.ctrl.port_id, ns.ana_group)
        .is_accessible();
    NamespaceData {
        nsze: blocks,
        ncap: blocks,
        nuse: if accessible { blocks } else { 0 },
        nmic: 1,
        rescap: ns.reservations.capabilities(),
        dlfeat: 0b1001,
        anagrpid: ns.ana_group,
        nguid: ns.nguid(),
        lbads: ns.device.block_size().trailing_zeros() as u8,
        ..Default::default()
    }
}

fn identify(ctx: &AdminCtx<'_>, sqe: &Sqe) -> Result<Response, Status> {
    let cns = sqe.cdw(10) as u8;
    let nsid = sqe.nsid();
    let sub = &ctx.ctrl.subsystem;
    let data = match cns {
        cns::CONTROLLER => controller_data(ctx).encode(),
        _ if ctx.discovery() => return Err(Status::INVALID_FIELD),
        cns::NAMESPACE => match sub.namespace(nsid) {
            Some(ns) => namespace_data(ctx, &ns).encode(),
            None if (1..=MAX_NSID).contains(&nsid) => vec![0; identify::IDENTIFY_LEN],
            None => return Err(Status::INVALID_NAMESPACE),
        },
        cns::ACTIVE_NAMESPACES => {
            if nsid >= 0xFFFF_FFFE {
                return Err(Status::INVALID_NAMESPACE);
            }
            active_namespace_list(sub.namespaces().iter().map(|n| n.nsid), nsid)
        }
        cns::NS_DESCRIPTORS => {
            let ns = sub.namespace(nsid).ok_or(Status::INVALID_NAMESPACE)?;
            namespace_descriptors(&ns.nguid(), ns.uuid.as_bytes())
        }
        cns::CSI_CONTROLLER | cns::CSI_NAMESPACE if (sqe.cdw(11) >> 24) == 0 => {
            vec![0; identify::IDENTIFY_LEN]
        }
        _ => return Err(Status::INVALID_FIELD),
    };
    Ok(reply(sqe, data))
}

fn ana_groups(ctx: &AdminCtx<'_>) -> Vec<AnaGroup> {
    let mut groups: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    for ns in ctx.ctrl.subsystem.namespaces() {
        groups.entry(ns.ana_group).or_default().push(ns.nsid);
    }
    groups
        .into_iter()
        .map(|(grpid, mut nsids)| {
            nsids.sort_unstable();
            let (state, chgcnt) = ctx.shared.ana.state_with_count(ctx.ctrl.port_id, grpid);
            AnaGroup {
                grpid,
                chgcnt,
                state,
                nsids,
            }
        })
        .collect()
}

fn get_log_page(ctx: &AdminCtx<'_>, sqe: &Sqe) -> Result<Response, Status> {
    let cdw10 = sqe.cdw(10);
    let page = cdw10 as u8;
    let lsp = (cdw10 >> 8) & 0x7F;
    let retain = cdw10 & (1 << 15) != 0;
    let numd = ((u64::from(sqe.cdw(11) & 0xFFFF) << 16) | u64::from(cdw10 >> 16)) + 1;
    let offset = u64::from(sqe.cdw(12)) | (u64::from(sqe.cdw(13)) << 32);
    if offset % 4 != 0 {
        return Err(Status::INVALID_FIELD);
    }
    // The ANA and discovery pages' events are unmasked before the page is built: a change in between raises its
    // event again (a duplicate is harmless) instead of being in neither the page read nor an event.
    if matches!(page, lid::ANA | lid::DISCOVERY) {
        ctx.ctrl.log_read(page, retain);
    }
    let full = match page {
        lid::DISCOVERY if ctx.discovery() => {
            discovery::log_page(ctx.shared, &ctx.ctrl.hostnqn, ctx.local_addr)
        }
        _ if ctx.discovery() => return Err(Status::INVALID_LOG_PAGE),
        lid::ERROR => vec![0; 64],
        lid::SMART => log::smart_log(&ctx.ctrl.smart()),
        lid::FIRMWARE => vec![0; 512],
        lid::CHANGED_NAMESPACES => {
            // Checked before the list is taken: a refused read leaves it, and its event masked, as they were.
            if offset > log::changed_namespaces(&[]).len() as u64 {
                return Err(Status::INVALID_FIELD);
            }
            log::changed_namespaces(&ctx.ctrl.take_changed_namespaces(retain))
        }
        lid::COMMAND_EFFECTS => log::command_effects(
            &[
                admin::GET_LOG_PAGE,
                admin::IDENTIFY,
                admin::ABORT,
                admin::SET_FEATURES,
                admin::GET_FEATURES,
                admin::ASYNC_EVENT_REQUEST,
                admin::KEEP_ALIVE,
            ],
            &[
                (io::FLUSH, false),
                (io::WRITE, true),
                (io::READ, false),
                (io::WRITE_ZEROES, true),
                (io::DATASET_MANAGEMENT, true),
                (io::RESERVATION_REGISTER, false),
                (io::RESERVATION_REPORT, false),
                (io::RESERVATION_ACQUIRE, false),
                (io::RESERVATION_RELEASE, false),
            ],
        ),
        lid::ANA => log::ana_log(
            ctx.shared.ana.change_count(),
            &ana_groups(ctx),
            lsp & 1 != 0,
        ),
        _ => return Err(Status::INVALID_LOG_PAGE),
    };
    if offset > full.len() as u64 {
        return Err(Status::INVALID_FIELD);
    }
    ctx.ctrl.log_read(page, retain);
    let start = offset as usize;
    let end = (offset + numd * 4).min(full.len() as u64) as usize;
    let mut data = full[start..end].to_vec();
    // A host may ask for more than the page holds: the rest reads as zeroes.
    data.resize(
        ((numd * 4) as usize)
            .min(sqe.sgl().length as usize)
            .max(data.len()),
        0,
    );
    Ok(reply(sqe, data))
}

fn set_features(ctx: &AdminCtx<'_>, sqe: &Sqe) -> Result<Response, Status> {
    let cid = sqe.cid();
    let cdw10 = sqe.cdw(10);
    if cdw10 & (1 << 31) != 0 {
        return Err(Status::FEATURE_NOT_SAVEABLE);
    }
    let v = sqe.cdw(11);
    match (cdw10 as u8, ctx.discovery()) {
        (fid::KEEP_ALIVE_TIMER, _) => {
            ctx.ctrl.set_kato_ms(v);
            Ok(Response::ok(cid))
        }
        (fid::ASYNC_EVENT_CONFIG, disc) => {
            let supported = if disc { 1 << 31 } else { (1 << 8) | (1 << 11) };
            ctx.ctrl.set_aen_config(v & supported);
            Ok(Response::ok(cid))
        }
        (fid::NUMBER_OF_QUEUES, false) => {
            let (nsq, ncq) = (v & 0xFFFF, v >> 16);
            if nsq == 0xFFFF || ncq == 0xFFFF {
                return Err(Status::INVALID_FIELD);
            }
            let g = u64::from(ctx.ctrl.grant_io_queues(nsq.min(ncq) as u16));
            Ok(Response::result(cid, g | (g << 16)))
        }
        (fid::VOLATILE_WRITE_CACHE, false) => {
            ctx.ctrl.set_write_cache(v & 1 != 0);
            Ok(Response::ok(cid))
        }
        // Over fabrics the Host Identifier is Connect's, and stays (as Linux's target answers).
        (fid::HOST_IDENTIFIER, false) => Err(Status::COMMAND_SEQUENCE_ERROR),
        _ => Err(Status::INVALID_FIELD),
    }
}

fn get_features(ctx: &AdminCtx<'_>, sqe: &Sqe) -> Result<Response, Status> {
    let cid = sqe.cid();
    let v = match (sqe.cdw(10) as u8, ctx.discovery()) {
        (fid::KEEP_ALIVE_TIMER, _) => ctx.ctrl.kato_ms(),
        (fid::ASYNC_EVENT_CONFIG, _) => ctx.ctrl.aen_config(),
        (fid::NUMBER_OF_QUEUES, false) => {
            let g = u32::from(ctx.ctrl.granted_io_queues().max(1) - 1);
            g | (g << 16)
        }
        (fid::VOLATILE_WRITE_CACHE, false) => u32::from(ctx.ctrl.write_cache()),
        // The 128-bit one only (Extended Host Identifier, CDW11 bit 0), as fabrics has no other.
        (fid::HOST_IDENTIFIER, false) if sqe.cdw(11) & 1 != 0 => {
            return Ok(reply(sqe, ctx.ctrl.hostid.to_vec()));
        }
        _ => return Err(Status::INVALID_FIELD),
    };
    Ok(Response::result(cid, u64::from(v)))
}
