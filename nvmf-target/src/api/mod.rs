//! The engine gRPC API (`keelson.engine.v1.Engine`) over [`Engine`], and the engine's registration with the cluster
//! agent ([`registration`]). The only module that knows tonic and the generated types; `status` maps engine errors
//! to precise gRPC codes.

mod convert;
mod pools;
pub mod registration;
mod service;
mod status;

use tokio_util::sync::CancellationToken;

use crate::engine::Engine;

/// Serves the engine API on an already-bound listener until `shutdown` is cancelled (bound first, so that the engine
/// is reachable before it registers; tests bind port 0).
pub async fn serve_on(
    engine: Engine,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let svc = proto::engine::engine_server::EngineServer::new(service::EngineService::new(engine));
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await })
        .await
}
