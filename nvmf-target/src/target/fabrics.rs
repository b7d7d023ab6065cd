//! Fabrics Connect on the target: validates the command and its data, checks the subsystem and the host allow-list,
//! and creates a controller (admin queue) or attaches an I/O queue to an existing one. Errors are the Connect
//! statuses Linux understands, with the invalid-parameter offset (IPO/IATTR) in DW0.

use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::command::Sqe;
use crate::protocol::fabrics::{CNTLID_DYNAMIC, Connect, ConnectData};
use crate::protocol::nqn::Nqn;
use crate::protocol::status::Status;

use super::Shared;
use super::controller::Controller;
use super::response::Response;
use super::subsystem::SubsystemKind;

/// Byte offsets in the Connect SQE, for IPO.
const SQE_OFFSET_QID: u64 = 42;
const SQE_OFFSET_SQSIZE: u64 = 44;

fn invalid(cid: u16, in_data: bool, offset: u64) -> Response {
    Response::failed_with(
        cid,
        Status::CONNECT_INVALID_PARAMETERS,
        offset | (u64::from(in_data) << 16),
    )
}

/// [`invalid`] for what may be there when the host asks again: a subsystem not exported here (yet, or any more: a
/// volume's nexus being made again, here or on another node) or a controller that just ended. Without Do Not
/// Retry: since Linux 6.11 a host whose reconnect gets DNR deletes the controller, and when that is a volume's last
/// path its block device goes with it (the file system mounted on it included), while the replacement path is
/// still being connected.
fn invalid_for_now(cid: u16, in_data: bool, offset: u64) -> Response {
    Response::failed_with(
        cid,
        Status::CONNECT_INVALID_PARAMETERS.without_dnr(),
        offset | (u64::from(in_data) << 16),
    )
}

/// Handles a Connect. On success returns the controller and the command (qid, sqsize, ...).
pub(super) fn connect(
    shared: &Arc<Shared>,
    port_id: u16,
    sqe: &Sqe,
    data: &Bytes,
) -> Result<(Arc<Controller>, Connect), Response> {
    let cid = sqe.cid();
    let cmd = Connect::from_sqe(sqe);
    if cmd.recfmt != 0 {
        return Err(Response::status(cid, Status::CONNECT_INCOMPATIBLE_FORMAT));
    }
    let Some(cd) = ConnectData::decode(data) else {
        return Err(Response::status(cid, Status::SGL_DATA_LENGTH_INVALID));
    };
    let Some(sub) = shared.subsystem(&cd.subnqn) else {
        tracing::warn!(subnqn = %cd.subnqn, host = %cd.hostnqn, "connect to unknown subsystem");
        return Err(invalid_for_now(
            cid,
            true,
            u64::from(ConnectData::OFFSET_SUBNQN),
        ));
    };
    // An empty Host NQN is a host that did not name itself (SPDK's perf tool without `-q`). The Linux target
    // lets it connect where any host may, and so does this one; an allow-list never holds it (Connect Invalid
    // Host below). A Host NQN that is there but malformed is refused.
    if !cd.hostnqn.is_empty() && Nqn::parse(&cd.hostnqn).is_err() {
        return Err(invalid(cid, true, u64::from(ConnectData::OFFSET_HOSTNQN)));
    }
    // A Host Identifier of zero names no host: two such hosts would be one to the reservations (a registrant is
    // its identifier) and to the ending of a host's other controllers. Refused as the NVMe compliance tests expect;
    // Linux, nvme-cli and SPDK always send one.
    if cd.hostid == [0; 16] {
        tracing::warn!(subnqn = %cd.subnqn, host = %cd.hostnqn, "connect with a Host Identifier of zero");
        return Err(invalid(cid, true, u64::from(ConnectData::OFFSET_HOSTID)));
    }
    if !sub.host_allowed(&cd.hostnqn) {
        tracing::warn!(subnqn = %cd.subnqn, host = %cd.hostnqn, "connect from a host not on the allow-list");
        return Err(Response::status(cid, Status::CONNECT_INVALID_HOST));
    }
    if cmd.sqsize == 0 || cmd.sqsize >= shared.config.queue_entries {
        return Err(invalid(cid, false, SQE_OFFSET_SQSIZE));
    }
    if cmd.qid == 0 {
        if cd.cntlid != CNTLID_DYNAMIC {
            return Err(invalid(cid, true, u64::from(ConnectData::OFFSET_CNTLID)));
        }
        let cfg = &shared.config;
        let ctrl = sub
            .add_controller(cfg.cntlid_min..=cfg.cntlid_max, |id| {
                Arc::new(Controller::new(
                    id,
                    sub.clone(),
                    cd.hostnqn.clone(),
                    cd.hostid,
                    port_id,
                    cmd.kato,
                    cfg.queue_entries,
                    cfg.max_io_queues,
                    &shared.cancel,
                ))
            })
            .ok_or_else(|| Response::status(cid, Status::CONNECT_CONTROLLER_BUSY))?;
        tracing::info!(cntlid = ctrl.cntlid, subnqn = %sub.nqn, host = %cd.hostnqn, kato_ms = cmd.kato, "controller created");
        return Ok((ctrl, cmd));
    }
    if sub.kind == SubsystemKind::Discovery {
        return Err(invalid(cid, false, SQE_OFFSET_QID));
    }
    let Some(ctrl) = sub
        .controller(cd.cntlid)
        .filter(|c| c.hostnqn == cd.hostnqn && c.hostid == cd.hostid)
    else {
        return Err(invalid_for_now(
            cid,
            true,
            u64::from(ConnectData::OFFSET_CNTLID),
        ));
    };
    if !ctrl.is_enabled() {
        return Err(Response::status(cid, Status::COMMAND_SEQUENCE_ERROR));
    }
    if !ctrl.attach_io_queue(cmd.qid) {
        return Err(invalid(cid, false, SQE_OFFSET_QID));
    }
    Ok((ctrl, cmd))
}
