//! A TCP listener (an NVMe port): accepts connections and hands each to its own connection task, on the target's
//! I/O threads if it has them, until the port is removed or the target shuts down.

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
                    // Moved to the reactor of the runtime that serves it.
                    let stream = match stream.into_std() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "cannot take the connection from the reactor");
                            continue;
                        }
                    };
                    let serve = shared.tracker.track_future(connection::serve(shared.clone(), stream, port_id, cancel.clone()));
                    match &shared.config.io_threads {
                        None => drop(tokio::spawn(serve)),
                        Some(io) => drop(io.pick().spawn(serve)),
                    }
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
