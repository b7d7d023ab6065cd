//! Reads a discovery controller's log: header first, then the entries in pages, retrying if the generation
//! counter moved meanwhile (as nvme-cli does).

use crate::protocol::log::{
    DISCOVERY_ENTRY_LEN, DISCOVERY_HEADER_LEN, DiscoveryEntry, discovery_header, lid,
};
use crate::protocol::nqn::DISCOVERY_NQN;

use super::controller::Controller;
use super::{ConnectOptions, InitiatorError};

const PAGE: u64 = 4096;

/// Connects to the discovery subsystem at `opts.addr` and returns its entries.
pub async fn discover(opts: &ConnectOptions) -> Result<Vec<DiscoveryEntry>, InitiatorError> {
    let mut o = opts.clone();
    o.subnqn = DISCOVERY_NQN.to_string();
    o.io_queues = 0;
    o.kato = std::time::Duration::ZERO;
    let c = Controller::connect(&o).await?;
    let r = read_log(&c).await;
    let _ = c.shutdown().await;
    r
}

async fn read_log(c: &Controller) -> Result<Vec<DiscoveryEntry>, InitiatorError> {
    for _ in 0..10 {
        let h = c.get_log_page(lid::DISCOVERY, 0, 20, 0).await?;
        let (gen0, n) = discovery_header(&h)
            .ok_or_else(|| InitiatorError::Protocol("short discovery header".into()))?;
        let total = n.min(1024) * DISCOVERY_ENTRY_LEN as u64;
        let mut raw = Vec::with_capacity(total as usize);
        let mut off = 0;
        while off < total {
            let len = PAGE.min(total - off);
            raw.extend_from_slice(
                &c.get_log_page(
                    lid::DISCOVERY,
                    DISCOVERY_HEADER_LEN as u64 + off,
                    len as u32,
                    0,
                )
                .await?,
            );
            off += len;
        }
        let h = c.get_log_page(lid::DISCOVERY, 0, 20, 0).await?;
        if discovery_header(&h).map(|x| x.0) == Some(gen0) {
            return Ok(raw
                .chunks_exact(DISCOVERY_ENTRY_LEN)
                .filter_map(DiscoveryEntry::decode)
                .collect());
        }
    }
    Err(InitiatorError::Protocol(
        "discovery log kept changing".into(),
    ))
}
