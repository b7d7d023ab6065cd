//! How the cluster agent reaches io-engines: their engine API (`proto::engine`), with timeouts, so a hung or
//! garbage-answering engine costs its own node a timeout and no one else anything.

use std::time::Duration;

use async_trait::async_trait;
use proto::engine as pb;
use proto::engine::engine_client::EngineClient;
use tonic::transport::{Channel, Endpoint};

use super::node::NodeState;
use super::registry::{Prober, Registry, RegistryError};

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
    async fn probe(&self, engine_endpoint: &str, node: &str) -> Result<(), String> {
        let mut c = connect(engine_endpoint, self.timeout).await?;
        let call = c.get_node(pb::GetNodeRequest {});
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(info)) if info.get_ref().node_name == node => Ok(()),
            Ok(Ok(info)) => Err(format!(
                "{engine_endpoint}: the engine there is node {:?} now",
                info.get_ref().node_name
            )),
            Ok(Err(s)) => Err(format!("{engine_endpoint}: {}", s.message())),
            Err(_) => Err(format!(
                "{engine_endpoint}: no answer within {:?}",
                self.timeout
            )),
        }
    }
}

/// Why a node's engine cannot be asked.
#[derive(Debug, thiserror::Error)]
pub enum NodeEngineError {
    #[error("node {0} not found")]
    NotFound(String),
    #[error("node {node} is {state:?}: {reason}")]
    NotOnline {
        node: String,
        state: NodeState,
        reason: String,
    },
    #[error("node {node} cannot be reached: {why}")]
    Unreachable { node: String, why: String },
    #[error(transparent)]
    Registry(RegistryError),
}

/// The engine API of `node`, which must be registered and Online.
pub async fn node_engine(
    registry: &Registry,
    node: &str,
    timeout: Duration,
) -> Result<EngineClient<Channel>, NodeEngineError> {
    let v = registry.get(node).await.map_err(|e| match e {
        RegistryError::NotFound(n) => NodeEngineError::NotFound(n),
        e => NodeEngineError::Registry(e),
    })?;
    if v.record.status.state != NodeState::Online {
        return Err(NodeEngineError::NotOnline {
            node: node.to_string(),
            state: v.record.status.state,
            reason: v.record.status.reason,
        });
    }
    connect(&v.record.spec.engine_endpoint, timeout)
        .await
        .map_err(|why| NodeEngineError::Unreachable {
            node: node.to_string(),
            why,
        })
}
