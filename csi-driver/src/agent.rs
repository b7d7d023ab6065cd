//! The cluster agent, as the driver reaches it: one or more addresses (the agents of a cluster; one leads, the
//! others answer UNAVAILABLE), tried in turn, starting from the one that answered last. Channels connect lazily,
//! so the driver starts before the agent does and Probe says when it is reachable.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proto::cluster::cluster_client::ClusterClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub struct Agent {
    channels: Vec<(String, Channel)>,
    /// The channel that answered last.
    current: AtomicUsize,
}

impl Agent {
    /// `urls`: `http://host:port` of each cluster agent.
    pub fn new(urls: &[String], call_timeout: Duration) -> anyhow::Result<Agent> {
        anyhow::ensure!(!urls.is_empty(), "no cluster agent address");
        let mut channels = Vec::new();
        for u in urls {
            let ch = Endpoint::from_shared(u.clone())
                .map_err(|e| anyhow::anyhow!("cluster agent address {u:?}: {e}"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(call_timeout)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .connect_lazy();
            channels.push((u.clone(), ch));
        }
        Ok(Agent {
            channels,
            current: AtomicUsize::new(0),
        })
    }

    /// Runs `call` against the agents until one answers with anything but UNAVAILABLE.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.channels.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let at = (start + i) % n;
            let (url, ch) = &self.channels[at];
            match call(ClusterClient::new(ch.clone())).await {
                Err(s) if s.code() == Code::Unavailable => {
                    tracing::debug!(agent = %url, error = %s.message(), "cluster agent unavailable");
                    last = Some(s);
                }
                r => {
                    self.current.store(at, Ordering::Relaxed);
                    return r.map(tonic::Response::into_inner);
                }
            }
        }
        let why = last.map(|s| s.message().to_string()).unwrap_or_default();
        Err(Status::unavailable(format!(
            "no cluster agent answered ({why})"
        )))
    }
}
