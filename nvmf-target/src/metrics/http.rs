//! The `/metrics` HTTP endpoint (HTTP/1.1 with hyper): `GET /metrics` renders the engine's metrics; anything else
//! is 404.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::Engine;

/// Connections served at once (Prometheus keeps one or two per scraper).
const MAX_CONNECTIONS: usize = 16;
/// A request's head must come within this (a client sending a byte a minute is closed, not kept).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest one connection is kept, keep-alive included.
const CONNECTION_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);
/// After a failed accept.
const ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

async fn handle(
    engine: Engine,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut resp = if req.uri().path() == "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from(super::render(&engine))));
        if let Ok(v) = "text/plain; version=0.0.4; charset=utf-8".parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    } else {
        Response::new(Full::new(Bytes::from_static(b"not found: try /metrics\n")))
    };
    if req.uri().path() != "/metrics" {
        *resp.status_mut() = StatusCode::NOT_FOUND;
    }
    Ok(resp)
}

/// Serves `/metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve(engine: Engine, listener: TcpListener, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors, say: a pause rather than a spin.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
        };
        let engine = engine.clone();
        // At most so many connections at once: a client holding many open cannot take the process's file
        // descriptors (the engine's NVMe/TCP connections and disks share them). One past the limit is closed.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let svc = service_fn(move |req| handle(engine.clone(), req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = stop.cancelled() => {}
                r = tokio::time::timeout(CONNECTION_LIMIT, conn) => match r {
                    Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended"),
                    Err(_) => tracing::debug!("metrics connection open too long: closed"),
                    Ok(Ok(())) => {}
                },
            }
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
}
