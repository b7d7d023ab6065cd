//! A TCP listener (an NVMe port): accepts connections and hands each to its own connection task until the port is
//! removed or the target shuts down.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Shared, connection};

pub(super) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    port_id: u16,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    tracing::debug!(%peer, port_id, "connection accepted");
                    shared.tracker.spawn(connection::serve(shared.clone(), stream, port_id, cancel.clone()));
                }
                Err(e) => {
                    // Out of descriptors and similar: back off instead of spinning.
                    tracing::warn!(port_id, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
