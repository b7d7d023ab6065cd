//! io-engine configuration: the `--export` spec that puts a block device behind a subsystem namespace, the
//! `--pool` spec, and sizes with units. Shared by the command line and the JSON config file.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;

use crate::block::file::FileDevice;
use crate::block::memory::MemoryDevice;
use crate::block::{BlockDevice, BlockError};
use crate::protocol::nqn::Nqn;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("bad size {0:?}: use a number with an optional KiB, MiB, GiB or TiB suffix")]
    Size(String),
    #[error("bad export {spec:?}: {reason}")]
    Export { spec: String, reason: String },
    #[error("bad pool {0:?}: use NAME=/absolute/path/of/disk")]
    Pool(String),
}

/// Parses "4096", "64MiB", "1GiB", "512K", "2G".
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| ConfigError::Size(s.to_string()))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => return Err(ConfigError::Size(s.to_string())),
    };
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError::Size(s.to_string()))
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum S {
        N(u64),
        T(String),
    }
    match Option::<S>::deserialize(d)? {
        None => Ok(None),
        Some(S::N(n)) => Ok(Some(n)),
        Some(S::T(t)) => parse_size(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

/// A namespace to export at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    pub nqn: String,
    /// A RAM namespace of this size.
    #[serde(default, deserialize_with = "de_size")]
    pub memory: Option<u64>,
    /// A file or block device.
    pub file: Option<PathBuf>,
    /// Size of `file` if it must be created.
    #[serde(default, deserialize_with = "de_size")]
    pub size: Option<u64>,
    #[serde(default)]
    pub direct: bool,
    pub block_size: Option<u32>,
    pub nsid: Option<u32>,
    pub uuid: Option<uuid::Uuid>,
    pub ana_group: Option<u32>,
    /// Hosts allowed to connect; empty allows any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Wrap the device in the fault injector (chaos testing through the InjectFault call).
    #[serde(default)]
    pub fault: bool,
}

impl FromStr for ExportSpec {
    type Err = ConfigError;

    /// `nqn=NQN,memory=64MiB[,bs=512][,uuid=U][,nsid=N][,ana-group=G][,hosts=H1;H2]` or
    /// `nqn=NQN,file=PATH[,size=1GiB][,direct=true]...`
    fn from_str(spec: &str) -> Result<ExportSpec, ConfigError> {
        let bad = |reason: String| ConfigError::Export {
            spec: spec.to_string(),
            reason,
        };
        let mut e = ExportSpec::default();
        for kv in spec.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("{kv:?} is not key=value")))?;
            match k.trim() {
                "nqn" => e.nqn = v.to_string(),
                "memory" => e.memory = Some(parse_size(v)?),
                "file" => e.file = Some(PathBuf::from(v)),
                "size" => e.size = Some(parse_size(v)?),
                "direct" => {
                    e.direct = v
                        .parse()
                        .map_err(|_| bad(format!("direct={v} is not true/false")))?
                }
                "bs" | "block_size" => {
                    e.block_size = Some(v.parse().map_err(|_| bad(format!("bs={v}")))?)
                }
                "nsid" => e.nsid = Some(v.parse().map_err(|_| bad(format!("nsid={v}")))?),
                "uuid" => e.uuid = Some(v.parse().map_err(|_| bad(format!("uuid={v}")))?),
                "ana-group" | "ana_group" => {
                    e.ana_group = Some(v.parse().map_err(|_| bad(format!("ana-group={v}")))?)
                }
                "hosts" => {
                    e.hosts = v
                        .split(';')
                        .filter(|h| !h.is_empty())
                        .map(String::from)
                        .collect()
                }
                "fault" => {
                    e.fault = v
                        .parse()
                        .map_err(|_| bad(format!("fault={v} is not true/false")))?
                }
                other => return Err(bad(format!("unknown key {other:?}"))),
            }
        }
        e.validate().map_err(bad)?;
        Ok(e)
    }
}

impl ExportSpec {
    pub fn validate(&self) -> Result<(), String> {
        Nqn::parse(&self.nqn).map_err(|e| e.to_string())?;
        match (self.memory, &self.file) {
            (Some(_), Some(_)) => return Err("give memory= or file=, not both".into()),
            (None, None) => return Err("give memory=SIZE or file=PATH".into()),
            _ => {}
        }
        if let Some(bs) = self.block_size.filter(|bs| *bs != 512 && *bs != 4096) {
            return Err(format!("block size {bs} is not 512 or 4096"));
        }
        Ok(())
    }

    pub fn block_size(&self) -> u32 {
        self.block_size.unwrap_or(512)
    }

    /// Opens the block device this export names.
    pub fn open_device(&self) -> Result<Arc<dyn BlockDevice>, BlockError> {
        let bs = self.block_size();
        Ok(match (&self.file, self.memory) {
            (Some(path), _) => {
                // Held for this export alone, as a pool holds its disk: a pool's disk (or a file exported already)
                // is refused, not written over by hosts through a second opener.
                let size = self.size.unwrap_or(0);
                if !path.exists() && size > 0 {
                    let f = std::fs::File::create(path)?;
                    f.set_len(size)?;
                }
                Arc::new(FileDevice::open_exclusive(path, bs, self.direct)?)
            }
            (None, Some(size)) => {
                if size < u64::from(bs) {
                    return Err(BlockError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "memory size is smaller than one block",
                    )));
                }
                if let Some(why) = memory_too_large(size) {
                    return Err(BlockError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        why,
                    )));
                }
                Arc::new(MemoryDevice::new(size, bs))
            }
            (None, None) => {
                return Err(BlockError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no backend",
                )));
            }
        })
    }
}

/// Why a memory namespace of `size` bytes cannot be made here: it would be larger than the machine's memory (it
/// could never hold its data, and its chunk table alone would not fit for absurd sizes).
pub fn memory_too_large(size: u64) -> Option<String> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kib| kib.saturating_mul(1024))
        })?;
    (size > total).then(|| {
        format!("a memory namespace of {size} bytes is larger than this machine's memory ({total} bytes)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn export_specs() {
        let e: ExportSpec =
            "nqn=nqn.2026-11.io.keelson:vol-a,memory=64MiB,bs=4096,hosts=nqn.h1;nqn.h2"
                .parse()
                .unwrap();
        assert_eq!(e.memory, Some(64 << 20));
        assert_eq!(e.block_size(), 4096);
        assert_eq!(e.hosts, vec!["nqn.h1", "nqn.h2"]);
        assert!("nqn=bad,memory=1MiB".parse::<ExportSpec>().is_err());
        assert!("nqn=nqn.x".parse::<ExportSpec>().is_err());
        assert!("nqn=nqn.x,memory=1M,file=/x".parse::<ExportSpec>().is_err());
        assert!(
            "nqn=nqn.x,memory=1M,colour=red"
                .parse::<ExportSpec>()
                .is_err()
        );
        let j: ExportSpec = serde_json::from_str(r#"{"nqn":"nqn.x","memory":"1MiB"}"#).unwrap();
        assert_eq!(j.memory, Some(1 << 20));
    }
}

/// A pool to create or import at start-up: `NAME=DISK` on the command line, `{"name", "disk"}` in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolArg {
    pub name: String,
    pub disk: String,
}

impl FromStr for PoolArg {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<PoolArg, ConfigError> {
        match s.split_once('=') {
            Some((name, disk)) if !name.is_empty() && disk.starts_with('/') => Ok(PoolArg {
                name: name.to_string(),
                disk: disk.to_string(),
            }),
            _ => Err(ConfigError::Pool(s.to_string())),
        }
    }
}
