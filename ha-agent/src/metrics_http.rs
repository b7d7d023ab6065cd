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
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Connections served at once (Prometheus keeps one or two per scraper).
const MAX_CONNECTIONS: usize = 16;
/// A request's head must come within this (a client sending a byte a minute is closed, not kept).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest one connection is kept, keep-alive included.
const CONNECTION_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);
/// After a failed accept.
const ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

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
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
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
        let m = render.clone();
        // At most so many connections at once: a client holding many open cannot take the process's file
        // descriptors (the engine's NVMe/TCP connections and disks share them). One past the limit is closed.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let stop = stop.clone();
        tasks.spawn(async move {
            let svc = service_fn(move |req| handle(m.clone(), req));
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Whether the server closed `s` within `within` (what it read of an answer aside).
    async fn closed_within(s: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(within, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    /// A client that opens connections and never finishes a request: each is closed once its head is late, those
    /// past the limit at once, and a scrape afterwards is served.
    #[tokio::test]
    async fn slow_or_too_many_connections_are_closed_and_scrapes_still_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let render: Render = Arc::new(|| "up 1\n".to_string());
        let server = tokio::spawn(serve(render, listener, stop.clone()));
        let mut slow = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"G").await.unwrap();
            slow.push(s);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut extra, std::time::Duration::from_secs(2)).await,
            "a connection past the limit is kept"
        );
        for s in &mut slow {
            assert!(
                closed_within(s, HEADER_READ_TIMEOUT + std::time::Duration::from_secs(2)).await,
                "a request head that never comes keeps its connection"
            );
        }
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("up 1\n"),
            "{answer}"
        );
        stop.cancel();
        server.await.unwrap();
    }
}
