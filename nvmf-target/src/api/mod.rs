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

#[cfg(test)]
mod tests {
    /// The read lease a nexus keeps is the one the cluster agent waits out before a nexus replacing one it could
    /// not end takes writes (`proto::READ_LEASE`): a shorter wait would let the old one serve reads older than them.
    #[test]
    fn the_nexus_keeps_the_read_lease_the_agent_waits_out() {
        assert_eq!(crate::nexus::READ_LEASE, proto::READ_LEASE);
    }
}
