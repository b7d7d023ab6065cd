//! Identify data structures (4096 bytes each): controller (CNS 01h), namespace (CNS 00h), the active namespace ID
//! list (CNS 02h) and the namespace identification descriptor list (CNS 03h). Each has an encoder (the target) and a
//! decoder of the fields the initiator needs.

use bytes::{Buf, BufMut};

use super::nqn::{read_cstr, write_cstr};

pub const IDENTIFY_LEN: usize = 4096;

/// Controller or Namespace Structure (CNS) values.
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NAMESPACES: u8 = 0x02;
    pub const NS_DESCRIPTORS: u8 = 0x03;
    pub const CSI_NAMESPACE: u8 = 0x05;
    pub const CSI_CONTROLLER: u8 = 0x06;
    pub const CSI_INDEPENDENT_NAMESPACE: u8 = 0x08;
}

/// Controller type (CNTRLTYPE).
pub mod controller_type {
    pub const IO: u8 = 1;
    pub const DISCOVERY: u8 = 2;
}

/// The fields of Identify Controller that Keelson sets or reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControllerData {
    pub vid: u16,
    pub ssvid: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub cmic: u8,
    pub mdts: u8,
    pub cntlid: u16,
    pub version: u32,
    pub rtd3e: u32,
    pub oaes: u32,
    pub ctratt: u32,
    pub cntrltype: u8,
    pub acl: u8,
    pub aerl: u8,
    pub lpa: u8,
    pub elpe: u8,
    pub kas: u16,
    pub anatt: u8,
    pub anacap: u8,
    pub anagrpmax: u32,
    pub nanagrpid: u32,
    pub sqes: u8,
    pub cqes: u8,
    pub maxcmd: u16,
    pub nn: u32,
    pub oncs: u16,
    pub vwc: u8,
    pub awupf: u16,
    pub sgls: u32,
    pub mnan: u32,
    pub subnqn: String,
    pub ioccsz: u32,
    pub iorcsz: u32,
    pub icdoff: u16,
    pub fcatt: u8,
    pub msdbd: u8,
}

fn put_padded(b: &mut [u8], s: &str) {
    b.fill(b' ');
    let n = s.len().min(b.len());
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn read_padded(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    (&b[o..o + 2]).get_u16_le()
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    (&b[o..o + 4]).get_u32_le()
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    (&b[o..o + 8]).get_u64_le()
}

impl ControllerData {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_LEN];
        (&mut b[0..]).put_u16_le(self.vid);
        (&mut b[2..]).put_u16_le(self.ssvid);
        put_padded(&mut b[4..24], &self.serial);
        put_padded(&mut b[24..64], &self.model);
        put_padded(&mut b[64..72], &self.firmware);
        b[76] = self.cmic;
        b[77] = self.mdts;
        (&mut b[78..]).put_u16_le(self.cntlid);
        (&mut b[80..]).put_u32_le(self.version);
        (&mut b[88..]).put_u32_le(self.rtd3e);
        (&mut b[92..]).put_u32_le(self.oaes);
        (&mut b[96..]).put_u32_le(self.ctratt);
        b[111] = self.cntrltype;
        b[258] = self.acl;
        b[259] = self.aerl;
        b[261] = self.lpa;
        b[262] = self.elpe;
        (&mut b[320..]).put_u16_le(self.kas);
        b[342] = self.anatt;
        b[343] = self.anacap;
        (&mut b[344..]).put_u32_le(self.anagrpmax);
        (&mut b[348..]).put_u32_le(self.nanagrpid);
        b[512] = self.sqes;
        b[513] = self.cqes;
        (&mut b[514..]).put_u16_le(self.maxcmd);
        (&mut b[516..]).put_u32_le(self.nn);
        (&mut b[520..]).put_u16_le(self.oncs);
        b[525] = self.vwc;
        (&mut b[528..]).put_u16_le(self.awupf);
        (&mut b[536..]).put_u32_le(self.sgls);
        (&mut b[540..]).put_u32_le(self.mnan);
        write_cstr(&mut b[768..1024], &self.subnqn);
        (&mut b[1792..]).put_u32_le(self.ioccsz);
        (&mut b[1796..]).put_u32_le(self.iorcsz);
        (&mut b[1800..]).put_u16_le(self.icdoff);
        b[1802] = self.fcatt;
        b[1803] = self.msdbd;
        b
    }

    pub fn decode(b: &[u8]) -> Option<ControllerData> {
        if b.len() < IDENTIFY_LEN {
            return None;
        }
        Some(ControllerData {
            vid: u16_at(b, 0),
            ssvid: u16_at(b, 2),
            serial: read_padded(&b[4..24]),
            model: read_padded(&b[24..64]),
            firmware: read_padded(&b[64..72]),
            cmic: b[76],
            mdts: b[77],
            cntlid: u16_at(b, 78),
            version: u32_at(b, 80),
            rtd3e: u32_at(b, 88),
            oaes: u32_at(b, 92),
            ctratt: u32_at(b, 96),
            cntrltype: b[111],
            acl: b[258],
            aerl: b[259],
            lpa: b[261],
            elpe: b[262],
            kas: u16_at(b, 320),
            anatt: b[342],
            anacap: b[343],
            anagrpmax: u32_at(b, 344),
            nanagrpid: u32_at(b, 348),
            sqes: b[512],
            cqes: b[513],
            maxcmd: u16_at(b, 514),
            nn: u32_at(b, 516),
            oncs: u16_at(b, 520),
            vwc: b[525],
            awupf: u16_at(b, 528),
            sgls: u32_at(b, 536),
            mnan: u32_at(b, 540),
            subnqn: read_cstr(&b[768..1024]),
            ioccsz: u32_at(b, 1792),
            iorcsz: u32_at(b, 1796),
            icdoff: u16_at(b, 1800),
            fcatt: b[1802],
            msdbd: b[1803],
        })
    }
}

/// The fields of Identify Namespace that Keelson sets or reads. One LBA format (index 0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceData {
    pub nsze: u64,
    pub ncap: u64,
    pub nuse: u64,
    pub nsfeat: u8,
    pub nmic: u8,
    pub rescap: u8,
    pub dlfeat: u8,
    pub anagrpid: u32,
    pub nsattr: u8,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    /// log2 of the logical block size (LBAF0.LBADS).
    pub lbads: u8,
}

impl NamespaceData {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_LEN];
        (&mut b[0..]).put_u64_le(self.nsze);
        (&mut b[8..]).put_u64_le(self.ncap);
        (&mut b[16..]).put_u64_le(self.nuse);
        b[24] = self.nsfeat;
        b[25] = 0; // NLBAF: one format
        b[26] = 0; // FLBAS: format 0, no metadata
        b[30] = self.nmic;
        b[31] = self.rescap;
        b[33] = self.dlfeat;
        (&mut b[92..]).put_u32_le(self.anagrpid);
        b[99] = self.nsattr;
        b[104..120].copy_from_slice(&self.nguid);
        b[120..128].copy_from_slice(&self.eui64);
        b[130] = self.lbads;
        b
    }

    pub fn decode(b: &[u8]) -> Option<NamespaceData> {
        if b.len() < IDENTIFY_LEN {
            return None;
        }
        let fmt = usize::from(b[26] & 0xF);
        let mut nguid = [0; 16];
        nguid.copy_from_slice(&b[104..120]);
        let mut eui64 = [0; 8];
        eui64.copy_from_slice(&b[120..128]);
        Some(NamespaceData {
            nsze: u64_at(b, 0),
            ncap: u64_at(b, 8),
            nuse: u64_at(b, 16),
            nsfeat: b[24],
            nmic: b[30],
            rescap: b[31],
            dlfeat: b[33],
            anagrpid: u32_at(b, 92),
            nsattr: b[99],
            nguid,
            eui64,
            lbads: b[128 + 4 * fmt + 2],
        })
    }
}

/// Active namespace ID list: the NSIDs greater than `after`, ascending, at most 1024.
pub fn active_namespace_list(nsids: impl IntoIterator<Item = u32>, after: u32) -> Vec<u8> {
    let mut ids: Vec<u32> = nsids.into_iter().filter(|&n| n > after).collect();
    ids.sort_unstable();
    let mut b = vec![0u8; IDENTIFY_LEN];
    for (i, id) in ids.into_iter().take(IDENTIFY_LEN / 4).enumerate() {
        (&mut b[i * 4..]).put_u32_le(id);
    }
    b
}

/// Namespace identification descriptors: NGUID, UUID and CSI (NVM).
pub fn namespace_descriptors(nguid: &[u8; 16], uuid: &[u8; 16]) -> Vec<u8> {
    let mut b = Vec::with_capacity(IDENTIFY_LEN);
    b.extend_from_slice(&[2, 16, 0, 0]);
    b.extend_from_slice(nguid);
    b.extend_from_slice(&[3, 16, 0, 0]);
    b.extend_from_slice(uuid);
    b.extend_from_slice(&[4, 1, 0, 0, 0]);
    b.resize(IDENTIFY_LEN, 0);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_round_trip_and_offsets() {
        let c = ControllerData {
            serial: "SN1".into(),
            model: "Keelson".into(),
            cntlid: 0x10,
            version: 0x10300,
            kas: 10,
            sgls: 0x100005,
            mnan: 32,
            subnqn: "nqn.2026-11.io.keelson:vol-x".into(),
            ioccsz: 260,
            iorcsz: 1,
            msdbd: 1,
            cmic: 0b1011,
            ..Default::default()
        };
        let b = c.encode();
        assert_eq!(&b[4..7], b"SN1");
        assert_eq!(b[7], b' ');
        assert_eq!(u16_at(&b, 78), 0x10);
        assert_eq!(u32_at(&b, 536) & 0b11, 0b01);
        assert_eq!(ControllerData::decode(&b), Some(c));
    }

    #[test]
    fn namespace_round_trip() {
        let n = NamespaceData {
            nsze: 100,
            ncap: 100,
            nuse: 100,
            nmic: 1,
            anagrpid: 1,
            lbads: 12,
            nguid: [5; 16],
            ..Default::default()
        };
        assert_eq!(NamespaceData::decode(&n.encode()), Some(n));
    }

    #[test]
    fn active_list_is_sorted_and_filtered() {
        let b = active_namespace_list([5, 1, 3], 1);
        assert_eq!(u32_at(&b, 0), 3);
        assert_eq!(u32_at(&b, 4), 5);
        assert_eq!(u32_at(&b, 8), 0);
    }

    #[test]
    fn descriptors_are_terminated() {
        let b = namespace_descriptors(&[1; 16], &[2; 16]);
        assert_eq!(&b[0..2], &[2, 16]);
        assert_eq!(&b[20..22], &[3, 16]);
        assert_eq!(&b[40..42], &[4, 1]);
        assert_eq!(&b[45..47], &[0, 0]);
    }
}
