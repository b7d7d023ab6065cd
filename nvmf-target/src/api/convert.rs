//! Conversions between generated protobuf messages and engine types.

use proto::engine as pb;

use crate::config::ExportSpec;
use crate::engine::Engine;
use crate::protocol::log::AnaState;
use crate::target::ListenerInfo;
use crate::target::subsystem::Subsystem;

use super::status::invalid;

pub fn listener(l: &ListenerInfo) -> pb::Listener {
    pb::Listener {
        port_id: u32::from(l.port_id),
        address: l.address.to_string(),
    }
}

pub fn ana_state(s: i32) -> Result<AnaState, tonic::Status> {
    match pb::AnaState::try_from(s) {
        Ok(pb::AnaState::Optimized) => Ok(AnaState::Optimized),
        Ok(pb::AnaState::NonOptimized) => Ok(AnaState::NonOptimized),
        Ok(pb::AnaState::Inaccessible) => Ok(AnaState::Inaccessible),
        Ok(pb::AnaState::PersistentLoss) => Ok(AnaState::PersistentLoss),
        Ok(pb::AnaState::Change) => Ok(AnaState::Change),
        _ => Err(invalid(format!(
            "ANA state {s} is not one of optimized, non-optimized, inaccessible, persistent-loss, change"
        ))),
    }
}

fn backend(spec: &ExportSpec) -> pb::Backend {
    let kind = match (&spec.file, spec.memory) {
        (Some(p), _) => Some(pb::backend::Kind::File(pb::FileBackend {
            path: p.display().to_string(),
            size_bytes: spec.size.unwrap_or(0),
            direct: spec.direct,
        })),
        (None, Some(m)) => Some(pb::backend::Kind::Memory(pb::MemoryBackend {
            size_bytes: m,
        })),
        _ => None,
    };
    pb::Backend {
        kind,
        block_size: spec.block_size(),
    }
}

/// An export spec from an AddNamespace request.
pub fn export_spec(r: &pb::AddNamespaceRequest) -> Result<ExportSpec, tonic::Status> {
    let b = r
        .backend
        .as_ref()
        .ok_or_else(|| invalid("backend is required"))?;
    let mut spec = ExportSpec {
        nqn: r.nqn.clone(),
        nsid: (r.nsid != 0).then_some(r.nsid),
        ana_group: (r.ana_group != 0).then_some(r.ana_group),
        block_size: Some(if b.block_size == 0 { 512 } else { b.block_size }),
        ..Default::default()
    };
    if !r.uuid.is_empty() {
        spec.uuid = Some(
            r.uuid
                .parse()
                .map_err(|_| invalid(format!("uuid {:?} is not a UUID", r.uuid)))?,
        );
    }
    match &b.kind {
        Some(pb::backend::Kind::Memory(m)) => {
            if m.size_bytes == 0 {
                return Err(invalid("memory backend size_bytes must be > 0"));
            }
            if let Some(why) = crate::config::memory_too_large(m.size_bytes) {
                return Err(invalid(why));
            }
            spec.memory = Some(m.size_bytes);
        }
        Some(pb::backend::Kind::File(f)) => {
            if f.path.is_empty() {
                return Err(invalid("file backend path is required"));
            }
            spec.file = Some(f.path.clone().into());
            spec.size = (f.size_bytes != 0).then_some(f.size_bytes);
            spec.direct = f.direct;
        }
        None => return Err(invalid("backend kind (memory or file) is required")),
    }
    spec.validate().map_err(invalid)?;
    Ok(spec)
}

pub fn subsystem(engine: &Engine, s: &Subsystem) -> pb::Subsystem {
    let namespaces = s
        .namespaces()
        .iter()
        .map(|ns| pb::Namespace {
            nsid: ns.nsid,
            uuid: ns.uuid.to_string(),
            ana_group: ns.ana_group,
            block_size: ns.device.block_size(),
            num_blocks: ns.device.num_blocks(),
            backend: engine
                .backend(s.nqn.as_str(), ns.nsid)
                .as_ref()
                .map(backend),
        })
        .collect();
    let controllers = s
        .controllers()
        .iter()
        .map(|c| pb::Controller {
            cntlid: u32::from(c.cntlid),
            host_nqn: c.hostnqn.clone(),
            io_queues: c.io_queue_count() as u32,
            port_id: u32::from(c.port_id),
        })
        .collect();
    pb::Subsystem {
        nqn: s.nqn.to_string(),
        serial: s.serial.clone(),
        model: s.model.clone(),
        namespaces,
        allowed_hosts: s.allowed_hosts(),
        allow_any_host: s.allow_any_host(),
        controllers,
    }
}

pub fn nexus(
    uuid: &uuid::Uuid,
    n: &crate::nexus::Nexus,
    nqn: Option<&crate::protocol::nqn::Nqn>,
) -> pb::Nexus {
    use crate::block::BlockDevice;
    use crate::nexus::NexusState;
    use crate::nexus::child::ChildState;
    let state = match n.state() {
        NexusState::Online => pb::NexusState::Online,
        NexusState::Degraded => pb::NexusState::Degraded,
        NexusState::Faulted => pb::NexusState::Faulted,
        NexusState::Shutdown => pb::NexusState::Shutdown,
    };
    let children = n
        .children()
        .into_iter()
        .map(|c| pb::NexusChild {
            uri: c.name,
            state: match c.state {
                ChildState::Healthy => pb::ChildState::Healthy,
                ChildState::Rebuilding => pb::ChildState::Rebuilding,
                ChildState::Faulted => pb::ChildState::Faulted,
            } as i32,
            reason: c.reason.unwrap_or_default(),
            rebuild_done_bytes: c.rebuild_done_bytes.unwrap_or(0),
            rebuild_total_bytes: c.rebuild_total_bytes.unwrap_or(0),
        })
        .collect();
    let rebuilds = n
        .rebuild_history()
        .into_iter()
        .map(|r| pb::RebuildRecord {
            child: r.child,
            kind: match r.kind {
                crate::nexus::RebuildKind::Full => "full".into(),
                crate::nexus::RebuildKind::Partial => "partial".into(),
            },
            bytes_copied: r.bytes_copied,
            bytes_skipped: r.bytes_skipped,
            bytes_total: r.bytes_total,
            duration_ms: r.duration.as_millis() as u64,
            finished_unix_ms: r
                .finished_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            error: r.error.unwrap_or_default(),
        })
        .collect();
    pb::Nexus {
        uuid: uuid.to_string(),
        size_bytes: n.size_bytes(),
        state: state as i32,
        children,
        nqn: nqn.map(|q| q.to_string()).unwrap_or_default(),
        rebuilds,
    }
}

pub fn uuid(s: &str) -> Result<uuid::Uuid, tonic::Status> {
    s.parse()
        .map_err(|_| invalid(format!("uuid {s:?} is not a UUID")))
}
