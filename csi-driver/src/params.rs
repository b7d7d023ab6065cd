//! What a StorageClass may say (`parameters` of CreateVolume, GetCapacity, ValidateVolumeCapabilities) and which
//! volume capabilities Keelson serves. Everything unknown is refused by name, so a typo in a StorageClass fails the
//! claim with a message instead of giving a volume the operator did not ask for.

use std::collections::{BTreeMap, HashMap};

use proto::csi::VolumeCapability;
use proto::csi::volume_capability::access_mode::Mode;
use proto::csi::volume_capability::{AccessType, MountVolume};

/// Parameters the CO adds itself (external-provisioner's `--extra-create-metadata`, secrets references): accepted
/// and not used.
pub const CO_PREFIX: &str = "csi.storage.k8s.io/";
/// File systems the node plugin makes and mounts.
pub const FS_TYPES: &[&str] = &["ext4", "xfs"];
/// Replicas when a StorageClass does not say.
pub const DEFAULT_REPLICAS: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassParams {
    pub replicas: u32,
    /// `fsType`: the file system for mount volumes whose capability names none.
    pub fs_type: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub pool_selector: BTreeMap<String, String>,
}

fn selector(key: &str, v: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, val) = pair
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| format!("parameter {key}: {pair:?} is not label=value"))?;
        out.insert(k.trim().to_string(), val.trim().to_string());
    }
    Ok(out)
}

/// Parses StorageClass parameters: `repl` (replica count), `thin` (`true`: Keelson replicas are always thin),
/// `fsType` (ext4, xfs), `nodeSelector` and `poolSelector` (`label=value,...`).
pub fn parse(p: &HashMap<String, String>) -> Result<ClassParams, String> {
    let mut out = ClassParams {
        replicas: DEFAULT_REPLICAS,
        ..ClassParams::default()
    };
    let mut keys: Vec<&String> = p.keys().collect();
    keys.sort();
    for k in keys {
        let v = p[k].trim();
        match k.as_str() {
            "repl" => {
                out.replicas =
                    v.parse()
                        .ok()
                        .filter(|n| (1..=16).contains(n))
                        .ok_or_else(|| {
                            format!("parameter repl: {v:?} is not a replica count of 1 to 16")
                        })?;
            }
            "thin" => match v {
                "true" => {}
                "false" => {
                    return Err(
                        "parameter thin: \"false\" is not supported: Keelson replicas are thin-provisioned"
                            .into(),
                    );
                }
                _ => return Err(format!("parameter thin: {v:?} is not true or false")),
            },
            "fsType" => {
                if !FS_TYPES.contains(&v) {
                    return Err(format!(
                        "parameter fsType: {v:?} is not one of {FS_TYPES:?}"
                    ));
                }
                out.fs_type = Some(v.to_string());
            }
            "nodeSelector" => out.node_selector = selector(k, v)?,
            "poolSelector" => out.pool_selector = selector(k, v)?,
            _ if k.starts_with(CO_PREFIX) => {}
            _ => {
                return Err(format!(
                    "unknown parameter {k:?}; known: repl, thin, fsType, nodeSelector, poolSelector"
                ));
            }
        }
    }
    Ok(out)
}

/// Whether Keelson serves a volume with capability `c`; `Err` says why not. A file system is mounted by one node at
/// a time (no cluster file system); a raw block volume may also be written by several nodes at once
/// (MULTI_NODE_MULTI_WRITER: their writes meet in the one nexus, as a virtual machine's disk during live migration
/// needs); mount volumes get ext4 or xfs.
pub fn check_capability(c: &VolumeCapability) -> Result<(), String> {
    let mode = c
        .access_mode
        .as_ref()
        .ok_or("a volume capability without an access mode")?
        .mode;
    let block = matches!(c.access_type, Some(AccessType::Block(_)));
    match Mode::try_from(mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => {}
        Ok(Mode::MultiNodeMultiWriter) if block => {}
        Ok(m @ Mode::MultiNodeMultiWriter) => {
            return Err(format!(
                "access mode {} is served for raw block volumes only: a file system is mounted by one node at a time",
                m.as_str_name()
            ));
        }
        Ok(m) => {
            return Err(format!(
                "access mode {} is not supported: a Keelson volume is attached to one node at a time \
                 (several only for MULTI_NODE_MULTI_WRITER raw block)",
                m.as_str_name()
            ));
        }
        Err(_) => return Err(format!("unknown access mode {mode}")),
    }
    match &c.access_type {
        Some(AccessType::Block(_)) => Ok(()),
        Some(AccessType::Mount(MountVolume { fs_type, .. })) => {
            if fs_type.is_empty() || FS_TYPES.contains(&fs_type.as_str()) {
                Ok(())
            } else {
                Err(format!(
                    "file system {fs_type:?} is not one of {FS_TYPES:?}"
                ))
            }
        }
        None => Err("a volume capability without an access type (block or mount)".into()),
    }
}

/// Whether `c` asks for several nodes at once (a multi-node writer raw block volume).
pub fn multi_node(c: &VolumeCapability) -> bool {
    c.access_mode
        .as_ref()
        .is_some_and(|m| m.mode == Mode::MultiNodeMultiWriter as i32)
}

/// Checks every capability; `Err` names the first one refused.
pub fn check_capabilities(caps: &[VolumeCapability]) -> Result<(), String> {
    if caps.is_empty() {
        return Err("volume_capabilities is empty".into());
    }
    caps.iter().try_for_each(check_capability)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::csi::volume_capability::{AccessMode, BlockVolume};

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cap(mode: Mode, t: AccessType) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(t),
        }
    }

    fn mount(fs: &str) -> AccessType {
        AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })
    }

    #[test]
    fn storage_class_parameters() {
        let p = parse(&map(&[
            ("repl", "3"),
            ("thin", "true"),
            ("fsType", "xfs"),
            ("nodeSelector", "zone=a, disk=ssd"),
            ("poolSelector", "tier=fast"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .unwrap();
        assert_eq!(p.replicas, 3);
        assert_eq!(p.fs_type.as_deref(), Some("xfs"));
        assert_eq!(p.node_selector.len(), 2);
        assert_eq!(p.pool_selector["tier"], "fast");
        assert_eq!(parse(&map(&[])).unwrap().replicas, 1);
        for (k, v, says) in [
            ("repl", "0", "repl"),
            ("repl", "x", "repl"),
            ("thin", "false", "thin-provisioned"),
            ("fsType", "btrfs", "fsType"),
            ("nodeSelector", "zone", "label=value"),
            ("replicas", "3", "unknown parameter \"replicas\""),
        ] {
            let e = parse(&map(&[(k, v)])).unwrap_err();
            assert!(e.contains(says), "{k}={v}: {e}");
        }
    }

    #[test]
    fn capabilities() {
        assert!(check_capability(&cap(Mode::SingleNodeWriter, mount("ext4"))).is_ok());
        assert!(check_capability(&cap(Mode::SingleNodeWriter, mount(""))).is_ok());
        assert!(
            check_capability(&cap(
                Mode::SingleNodeMultiWriter,
                AccessType::Block(BlockVolume {})
            ))
            .is_ok()
        );
        assert!(check_capability(&cap(Mode::MultiNodeMultiWriter, mount("ext4"))).is_err());
        let shared = cap(
            Mode::MultiNodeMultiWriter,
            AccessType::Block(BlockVolume {}),
        );
        assert!(check_capability(&shared).is_ok() && multi_node(&shared));
        for m in [Mode::MultiNodeReaderOnly, Mode::MultiNodeSingleWriter] {
            assert!(check_capability(&cap(m, AccessType::Block(BlockVolume {}))).is_err());
        }
        assert!(check_capability(&cap(Mode::SingleNodeWriter, mount("ntfs"))).is_err());
        assert!(check_capabilities(&[]).is_err());
        let no_type = VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: None,
        };
        assert!(check_capability(&no_type).is_err());
    }
}
