//! The cluster agent, as the driver reaches it: one or more addresses (the agents of a cluster; one leads, the
//! others refuse, [`proto::leader`]), tried in turn, starting from the one that answered last, while an agent
//! refuses as a follower or is not reached in time; the leader's own answer, an UNAVAILABLE too, is the caller's. Channels connect lazily,
//! so the driver starts before the agent does.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proto::cluster::cluster_client::ClusterClient;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

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

    /// Runs `call` against the agents until one answers that is not a follower's refusal or a failure to reach it.
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
                Err(s) if proto::leader::is_not_leader(&s) || proto::leader::not_reached(&s) => {
                    tracing::debug!(agent = %url, error = %s.message(), "cluster agent does not lead or was not reached");
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    fn two_agents() -> Agent {
        let urls = [
            "http://127.0.0.1:1".to_string(),
            "http://127.0.0.1:2".to_string(),
        ];
        Agent::new(&urls, Duration::from_secs(1)).unwrap()
    }

    /// A follower's refusal sends the call on to the next agent; the leader's own UNAVAILABLE (a node not Online)
    /// is the answer, with its reason, and is not taken for a reason to try another agent.
    #[tokio::test]
    async fn the_leaders_unavailable_is_the_answer_and_a_followers_refusal_is_not() {
        let agent = two_agents();
        let calls = AtomicU32::new(0);
        let r: Result<(), Status> = agent
            .call(|_| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    Err(if n == 0 {
                        proto::leader::not_leader()
                    } else {
                        Status::unavailable("node reg-2 is Offline")
                    })
                }
            })
            .await;
        let e = r.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("reg-2"), "{e:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // The leader answered last: asked first next time, and its UNAVAILABLE ends the call there.
        let calls = AtomicU32::new(0);
        let r: Result<(), Status> = agent
            .call(|_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(Status::unavailable("engine of reg-3 not answering")) }
            })
            .await;
        assert!(r.unwrap_err().message().contains("reg-3"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
