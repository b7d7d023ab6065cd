//! Log pages: discovery (70h), ANA (0Ch), changed namespace list (04h), SMART / health (02h), error information
//! (01h) and command effects (05h), plus the asynchronous event completion value that announces a change.

use bytes::{Buf, BufMut};

use super::nqn::{read_cstr, write_cstr};

/// Log page identifiers.
pub mod lid {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE: u8 = 0x03;
    pub const CHANGED_NAMESPACES: u8 = 0x04;
    pub const COMMAND_EFFECTS: u8 = 0x05;
    pub const ANA: u8 = 0x0C;
    pub const DISCOVERY: u8 = 0x70;
}

pub const DISCOVERY_HEADER_LEN: usize = 1024;
pub const DISCOVERY_ENTRY_LEN: usize = 1024;

/// One discovery log entry (TCP transport).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryEntry {
    /// 1 IPv4, 2 IPv6.
    pub adrfam: u8,
    /// 2 NVM subsystem, 3 current discovery subsystem.
    pub subtype: u8,
    pub treq: u8,
    pub portid: u16,
    pub trsvcid: String,
    pub subnqn: String,
    pub traddr: String,
}

pub mod subtype {
    pub const NVM: u8 = 2;
    pub const CURRENT_DISCOVERY: u8 = 3;
}

impl DiscoveryEntry {
    pub fn encode(&self, dst: &mut [u8]) {
        dst[..DISCOVERY_ENTRY_LEN].fill(0);
        dst[0] = 3; // TRTYPE TCP
        dst[1] = self.adrfam;
        dst[2] = self.subtype;
        dst[3] = self.treq;
        (&mut dst[4..]).put_u16_le(self.portid);
        (&mut dst[6..]).put_u16_le(0xFFFF); // CNTLID: dynamic
        (&mut dst[8..]).put_u16_le(32); // ASQSZ
        write_cstr(&mut dst[32..64], &self.trsvcid);
        write_cstr(&mut dst[256..512], &self.subnqn);
        write_cstr(&mut dst[512..768], &self.traddr);
        dst[768] = 0; // SECTYPE none
    }

    pub fn decode(b: &[u8]) -> Option<DiscoveryEntry> {
        if b.len() < DISCOVERY_ENTRY_LEN {
            return None;
        }
        Some(DiscoveryEntry {
            adrfam: b[1],
            subtype: b[2],
            treq: b[3],
            portid: (&b[4..]).get_u16_le(),
            trsvcid: read_cstr(&b[32..64]),
            subnqn: read_cstr(&b[256..512]),
            traddr: read_cstr(&b[512..768]),
        })
    }
}

/// The whole discovery log page: 1024-byte header then the entries.
pub fn discovery_log(genctr: u64, entries: &[DiscoveryEntry]) -> Vec<u8> {
    let mut b = vec![0u8; DISCOVERY_HEADER_LEN + entries.len() * DISCOVERY_ENTRY_LEN];
    (&mut b[0..]).put_u64_le(genctr);
    (&mut b[8..]).put_u64_le(entries.len() as u64);
    for (i, e) in entries.iter().enumerate() {
        let o = DISCOVERY_HEADER_LEN + i * DISCOVERY_ENTRY_LEN;
        e.encode(&mut b[o..o + DISCOVERY_ENTRY_LEN]);
    }
    b
}

/// Generation counter and number of records from a discovery log header.
pub fn discovery_header(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() < 16 {
        return None;
    }
    Some(((&b[0..]).get_u64_le(), (&b[8..]).get_u64_le()))
}

/// ANA states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AnaState {
    Optimized = 0x01,
    NonOptimized = 0x02,
    Inaccessible = 0x03,
    PersistentLoss = 0x04,
    Change = 0x0F,
}

impl AnaState {
    pub fn from_u8(v: u8) -> Option<AnaState> {
        Some(match v {
            0x01 => AnaState::Optimized,
            0x02 => AnaState::NonOptimized,
            0x03 => AnaState::Inaccessible,
            0x04 => AnaState::PersistentLoss,
            0x0F => AnaState::Change,
            _ => return None,
        })
    }

    /// Whether I/O may be served on a path in this state.
    pub fn is_accessible(self) -> bool {
        matches!(self, AnaState::Optimized | AnaState::NonOptimized)
    }
}

/// One ANA group descriptor. `nsids` must be ascending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnaGroup {
    pub grpid: u32,
    pub chgcnt: u64,
    pub state: AnaState,
    pub nsids: Vec<u32>,
}

/// The ANA log page. With `groups_only` (LSP RGO) the NSID lists are left out.
pub fn ana_log(chgcnt: u64, groups: &[AnaGroup], groups_only: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + groups.len() * 36);
    b.put_u64_le(chgcnt);
    b.put_u16_le(groups.len() as u16);
    b.put_bytes(0, 6);
    for g in groups {
        let nsids: &[u32] = if groups_only { &[] } else { &g.nsids };
        b.put_u32_le(g.grpid);
        b.put_u32_le(nsids.len() as u32);
        b.put_u64_le(g.chgcnt);
        b.put_u8(g.state as u8);
        b.put_bytes(0, 15);
        for n in nsids {
            b.put_u32_le(*n);
        }
    }
    b
}

/// Parses an ANA log page into (change count, groups).
pub fn parse_ana_log(mut b: &[u8]) -> Option<(u64, Vec<AnaGroup>)> {
    if b.len() < 16 {
        return None;
    }
    let chgcnt = b.get_u64_le();
    let n = b.get_u16_le();
    b.advance(6);
    let mut groups = Vec::new();
    for _ in 0..n {
        if b.len() < 32 {
            return None;
        }
        let grpid = b.get_u32_le();
        let nnsids = b.get_u32_le() as usize;
        let g_chg = b.get_u64_le();
        let state = AnaState::from_u8(b.get_u8() & 0xF)?;
        b.advance(15);
        if b.len() < nnsids * 4 {
            return None;
        }
        let nsids = (0..nnsids).map(|_| b.get_u32_le()).collect();
        groups.push(AnaGroup {
            grpid,
            chgcnt: g_chg,
            state,
            nsids,
        });
    }
    Some((chgcnt, groups))
}

/// Changed namespace list: up to 1024 NSIDs; more than that is reported as the single entry 0xFFFFFFFF.
pub fn changed_namespaces(nsids: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    if nsids.len() > 1024 {
        (&mut b[0..]).put_u32_le(0xFFFF_FFFF);
    } else {
        for (i, n) in nsids.iter().enumerate() {
            (&mut b[i * 4..]).put_u32_le(*n);
        }
    }
    b
}

/// Counters reported in the SMART / health log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmartCounters {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub read_commands: u64,
    pub write_commands: u64,
    pub media_errors: u64,
    pub error_log_entries: u64,
}

/// SMART / health log (512 bytes). Data units are thousands of 512-byte units, rounded up.
pub fn smart_log(c: &SmartCounters) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    (&mut b[1..]).put_u16_le(273 + 25); // composite temperature in kelvin: 25 °C
    b[3] = 100; // available spare
    b[4] = 10; // available spare threshold
    let units = |bytes: u64| bytes.div_ceil(512).div_ceil(1000);
    (&mut b[32..]).put_u64_le(units(c.bytes_read));
    (&mut b[48..]).put_u64_le(units(c.bytes_written));
    (&mut b[64..]).put_u64_le(c.read_commands);
    (&mut b[80..]).put_u64_le(c.write_commands);
    (&mut b[160..]).put_u64_le(c.media_errors);
    (&mut b[176..]).put_u64_le(c.error_log_entries);
    b
}

/// Commands Supported and Effects log (4096 bytes): admin and I/O opcodes marked supported, writes marked as
/// changing logical block content.
pub fn command_effects(admin: &[u8], io: &[(u8, bool)]) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for &op in admin {
        (&mut b[usize::from(op) * 4..]).put_u32_le(1);
    }
    for &(op, lbcc) in io {
        (&mut b[1024 + usize::from(op) * 4..]).put_u32_le(1 | if lbcc { 2 } else { 0 });
    }
    b
}

/// Asynchronous event types and the completion DW0 that announces one.
pub mod aen {
    pub const TYPE_NOTICE: u8 = 2;
    pub const NOTICE_NS_CHANGED: u8 = 0x00;
    pub const NOTICE_ANA_CHANGE: u8 = 0x03;
    pub const NOTICE_DISCOVERY_CHANGE: u8 = 0xF0;

    /// Asynchronous Event Configuration (feature 0Bh) bits enabling each notice.
    pub const CONFIG_NS_ATTR: u32 = 1 << 8;
    pub const CONFIG_ANA_CHANGE: u32 = 1 << 11;
    pub const CONFIG_DISCOVERY_CHANGE: u32 = 1 << 31;

    pub fn dw0(ty: u8, info: u8, log_page: u8) -> u32 {
        u32::from(ty) | (u32::from(info) << 8) | (u32::from(log_page) << 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ana_log_round_trip() {
        let groups = vec![
            AnaGroup {
                grpid: 1,
                chgcnt: 3,
                state: AnaState::Optimized,
                nsids: vec![1, 2],
            },
            AnaGroup {
                grpid: 2,
                chgcnt: 4,
                state: AnaState::Inaccessible,
                nsids: vec![5],
            },
        ];
        let b = ana_log(9, &groups, false);
        assert_eq!(b.len(), 16 + 32 + 8 + 32 + 4);
        assert_eq!(parse_ana_log(&b), Some((9, groups.clone())));
        let rgo = parse_ana_log(&ana_log(9, &groups, true)).unwrap().1;
        assert!(rgo.iter().all(|g| g.nsids.is_empty()));
    }

    #[test]
    fn discovery_round_trip() {
        let e = DiscoveryEntry {
            adrfam: 1,
            subtype: subtype::NVM,
            treq: 0,
            portid: 1,
            trsvcid: "4420".into(),
            subnqn: "nqn.x".into(),
            traddr: "127.0.0.1".into(),
        };
        let b = discovery_log(7, std::slice::from_ref(&e));
        assert_eq!(discovery_header(&b), Some((7, 1)));
        assert_eq!(DiscoveryEntry::decode(&b[1024..]), Some(e));
    }

    #[test]
    fn aen_value() {
        assert_eq!(
            aen::dw0(aen::TYPE_NOTICE, aen::NOTICE_ANA_CHANGE, lid::ANA),
            0x000C_0302
        );
    }
}
