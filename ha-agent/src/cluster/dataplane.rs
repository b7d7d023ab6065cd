//! How the cluster agent reaches io-engines: their engine API (`proto::engine`), with timeouts, so a hung or
//! garbage-answering engine costs its own node a timeout and no one else anything.

use std::time::Duration;

use async_trait::async_trait;
use proto::engine as pb;
use proto::engine::engine_client::EngineClient;
use tonic::transport::{Channel, Endpoint};

use super::registry::Prober;

/// Connects to an engine API with `timeout` on the connection and on every call.
pub async fn connect(endpoint: &str, timeout: Duration) -> Result<EngineClient<Channel>, String> {
    let ep = Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| format!("{endpoint}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let ch = ep.connect().await.map_err(|e| format!("{endpoint}: {e}"))?;
    Ok(EngineClient::new(ch))
}

/// Probes an engine by asking it for its node information.
pub struct EngineProber {
    pub timeout: Duration,
}

#[async_trait]
impl Prober for EngineProber {
    async fn probe(&self, engine_endpoint: &str) -> Result<(), String> {
        let mut c = connect(engine_endpoint, self.timeout).await?;
        let call = c.get_node(pb::GetNodeRequest {});
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(format!("{engine_endpoint}: {}", s.message())),
            Err(_) => Err(format!(
                "{engine_endpoint}: no answer within {:?}",
                self.timeout
            )),
        }
    }
}
