//! `/metrics` over HTTP/1.1 (hyper) for every long-running process of the control plane: the text a render
//! function gives (Prometheus exposition format 0.0.4), anything else 404.

use std::convert::Infallible;
use std::sync::Arc;

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

/// Renders the exposition text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

async fn handle(
    render: Render,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found: try /metrics\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return Ok(r);
    }
    let mut r = Response::new(Full::new(Bytes::from(render())));
    if let Ok(v) = "text/plain; version=0.0.4; charset=utf-8".parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(r)
}

/// Serves `/metrics` on `listener` until `stop` fires.
pub async fn serve(render: Render, listener: TcpListener, stop: CancellationToken) {
    tracing::info!(addr = ?listener.local_addr().ok(), "metrics listening");
    let tasks = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    continue;
                }
            },
        };
        let m = render.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let svc = service_fn(move |req| handle(m.clone(), req));
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
