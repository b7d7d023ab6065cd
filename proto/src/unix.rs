//! Dialling a gRPC server on a Unix socket (a CSI plugin's `unix:///…/csi.sock`), for the clients that call one:
//! keelctl and the tests.

use std::path::PathBuf;

use tonic::transport::{Channel, Endpoint};

/// A channel to the server on `endpoint` (`unix:///path` or a plain path). Connects once, now.
pub async fn channel(endpoint: &str) -> Result<Channel, tonic::transport::Error> {
    let path = PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint));
    // The URI is required by the API and unused: the connector below decides where to connect.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
}
