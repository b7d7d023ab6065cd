//! Serves the CSI services on a Unix socket (what the sidecars and the kubelet dial), replacing a socket file a
//! previous run left behind.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use proto::csi::controller_server::ControllerServer;
use proto::csi::identity_server::IdentityServer;
use proto::csi::node_server::NodeServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::agent::Agent;
use crate::controller::ControllerService;
use crate::identity::IdentityService;
use crate::node::NodeService;

/// Which services this instance runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Controller,
    Node,
    All,
}

/// The socket path of `unix:///path` (or a plain path).
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let p = endpoint
        .strip_prefix("unix://")
        .unwrap_or(endpoint)
        .to_string();
    if !p.starts_with('/') {
        bail!("endpoint {endpoint:?} is not unix:///absolute/path");
    }
    Ok(PathBuf::from(p))
}

/// Binds the socket at `endpoint`, replacing a stale socket file (never anything else).
pub fn bind(endpoint: &str) -> anyhow::Result<UnixListener> {
    let path = socket_path(endpoint)?;
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))
}

/// Serves `mode`'s services on `listener` until `shutdown` completes: Identity always, Controller in controller
/// and all modes, Node (given as `node`) in node and all modes.
pub async fn serve(
    listener: UnixListener,
    mode: Mode,
    agent: Arc<Agent>,
    node: Option<NodeService>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let controller =
        (mode != Mode::Node).then(|| ControllerServer::new(ControllerService::new(agent.clone())));
    let node = match (mode, node) {
        (Mode::Controller, _) => None,
        (_, Some(n)) => Some(NodeServer::new(n)),
        (_, None) => bail!("the node service needs the node's name"),
    };
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService))
        .add_optional_service(controller)
        .add_optional_service(node)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("serving CSI")
}
