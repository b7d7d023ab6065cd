//! What the CO sends, checked before anything is done with it: paths, volume IDs, capabilities, and the
//! publish context (its host NQN and addresses go into the kernel's connect options).

use super::*;

pub(super) fn invalid(what: impl Into<String>) -> Status {
    Status::invalid_argument(what.into())
}

/// A path the CO gives: absolute, without `..` (the plugin runs as root; a path is never taken relative to its
/// working directory, never read as a tool's option, never climbs out of where the CO keeps its mounts).
pub(super) fn required(v: &str, field: &str) -> Result<PathBuf, Status> {
    if v.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    let p = Path::new(v);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) || v.contains('\0') {
        return Err(invalid(format!(
            "{field} {v:?} is not an absolute path without '..'"
        )));
    }
    Ok(p.to_path_buf())
}

/// The most target addresses a publish context may give (one per listener of the nexus's node).
pub(super) const MAX_ADDRESSES: usize = 16;

/// What NodeStageVolume connects to, from the controller's publish context: the volume's subsystem NQN, the
/// target addresses and the host NQN.
pub(super) fn context(
    ctx: &HashMap<String, String>,
    uuid: Uuid,
) -> Result<(String, Vec<String>, String), Status> {
    let get = |k: &str| {
        ctx.get(k).filter(|v| !v.is_empty()).cloned().ok_or_else(|| {
            invalid(format!(
                "publish_context lacks {k:?}: was the volume published to this node (ControllerPublishVolume)?"
            ))
        })
    };
    let nqn = get("nqn")?;
    if nqn != proto::names::volume_nqn(&uuid.to_string()) {
        return Err(invalid(format!(
            "publish_context's nqn {nqn} is not volume {uuid}'s"
        )));
    }
    // Both go into the kernel's connect options (`…,traddr=<ip>,trsvcid=<port>,hostnqn=<host>,…`): a ',' or '='
    // would add an option of the caller's choosing.
    let addresses: Vec<String> = get("targetAddresses")?
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if addresses.is_empty() || addresses.len() > MAX_ADDRESSES {
        return Err(invalid(format!(
            "publish_context's targetAddresses gives {} addresses; 1 to {MAX_ADDRESSES} are taken",
            addresses.len()
        )));
    }
    for a in &addresses {
        option_value(a, "targetAddresses")?;
    }
    let host_nqn = get("hostNqn")?;
    option_value(&host_nqn, "hostNqn")?;
    if !host_nqn.starts_with("nqn.") || host_nqn.len() > 223 {
        return Err(invalid(format!(
            "publish_context's hostNqn {host_nqn:?} is not an NQN"
        )));
    }
    Ok((nqn, addresses, host_nqn))
}

/// A value for one of the kernel's connect options: nothing that ends it or starts another.
pub(super) fn option_value(v: &str, field: &str) -> Result<(), Status> {
    if v.chars()
        .any(|c| c == ',' || c == '=' || c.is_whitespace() || c.is_control())
    {
        return Err(invalid(format!(
            "publish_context's {field} {v:?} holds a ',', '=', space or control character"
        )));
    }
    Ok(())
}

pub(super) fn volume(id: &str) -> Result<Uuid, Status> {
    if id.is_empty() {
        return Err(invalid("volume_id is required"));
    }
    Uuid::parse_str(id).map_err(|_| Status::not_found(format!("no volume {id:?}")))
}

pub(super) fn capability(c: Option<&VolumeCapability>) -> Result<VolumeCapability, Status> {
    let c = c.ok_or_else(|| invalid("volume_capability is required"))?;
    params::check_capability(c).map_err(invalid)?;
    Ok(c.clone())
}

pub(super) fn read_only_mode(c: &VolumeCapability) -> bool {
    c.access_mode
        .as_ref()
        .is_some_and(|m| m.mode == Mode::SingleNodeReaderOnly as i32)
}

/// Whether a file system staged with `c` is mounted read-only: a read-only mode, or the capability's mount flags
/// (a PersistentVolume's `mountOptions: [ro]`; the last of `ro` and `rw` wins, as in mount(8)).
pub(super) fn staged_read_only(c: &VolumeCapability) -> bool {
    let flags_ro = match &c.access_type {
        Some(AccessType::Mount(m)) => {
            m.mount_flags
                .iter()
                .flat_map(|f| f.split(','))
                .map(str::trim)
                .rfind(|f| *f == "ro" || *f == "rw")
                == Some("ro")
        }
        _ => false,
    };
    read_only_mode(c) || flags_ro
}
