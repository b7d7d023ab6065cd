//! The discovery log page: one "current discovery subsystem" entry per port, then one entry per port for every NVM
//! subsystem the asking host may connect to. A listener bound to a wildcard address is reported with the address
//! the host reached it on.

use std::net::SocketAddr;

use crate::protocol::log::{DiscoveryEntry, discovery_log, subtype};
use crate::protocol::nqn::DISCOVERY_NQN;

use super::Shared;
use super::subsystem::SubsystemKind;

pub(super) fn log_page(shared: &Shared, hostnqn: &str, local: SocketAddr) -> Vec<u8> {
    let ports = shared.listeners();
    let subsystems = shared.subsystems();
    let mut entries = Vec::new();
    for p in &ports {
        let ip = if p.address.ip().is_unspecified() {
            local.ip()
        } else {
            p.address.ip()
        };
        let entry = |subtype, subnqn: &str| DiscoveryEntry {
            adrfam: if ip.is_ipv4() { 1 } else { 2 },
            subtype,
            treq: 0,
            portid: p.port_id,
            trsvcid: p.address.port().to_string(),
            subnqn: subnqn.to_string(),
            traddr: ip.to_string(),
        };
        entries.push(entry(subtype::CURRENT_DISCOVERY, DISCOVERY_NQN));
        for s in subsystems
            .iter()
            .filter(|s| s.kind == SubsystemKind::Nvm && s.host_allowed(hostnqn))
        {
            entries.push(entry(subtype::NVM, s.nqn.as_str()));
        }
    }
    discovery_log(shared.generation(), &entries)
}
