//! The `/metrics` HTTP endpoint (HTTP/1.1 with hyper): `GET /metrics` renders the engine's metrics; anything else
//! is 404.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::Engine;

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
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    continue;
                }
            },
        };
        let engine = engine.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let svc = service_fn(move |req| handle(engine.clone(), req));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = stop.cancelled() => {}
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "metrics connection ended");
                },
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}
