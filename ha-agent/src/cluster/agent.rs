//! One cluster agent: opens the store, checks its schema, serves the API and the metrics, and while it leads runs
//! every reconciler ([`super::reconcile::all`]) once per heartbeat interval, writing through the leader's fence.
//! Losing leadership stops it at once (the caller exits; a supervisor restarts it as a candidate).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::api::{self, Leadership, Leading};
use super::dataplane::EngineProber;
use super::leader;
use super::metrics::{self, AgentMetrics};
use super::pool::Pools;
use super::reconcile;
use super::registry::{Registry, RegistryConfig};
use super::store::metered::MeteredStore;
use super::store::{Store, schema};
use super::volumes::Volumes;

/// Where leadership is held.
pub const LEADER_KEY: &str = "/keelson/leader";

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This agent's name (who leads, as the leader key says).
    pub name: String,
    pub registry: RegistryConfig,
    /// TTL of the leadership lease: how long a dead leader blocks the next one.
    pub lease_ttl: Duration,
    /// Engine API call timeout (probes).
    pub engine_timeout: Duration,
}

/// Why an agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    #[error(transparent)]
    Registry(#[from] super::registry::RegistryError),
    #[error("leadership lost")]
    LeadershipLost,
    #[error("the cluster API stopped: {0}")]
    Api(#[from] tonic::transport::Error),
}

/// Runs the agent until `stop` fires (then it resigns and returns `Ok`) or it fails.
/// `metrics_listener`: where to serve `/metrics`, if anywhere.
pub async fn run(
    store: Arc<dyn Store>,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    config: AgentConfig,
    stop: CancellationToken,
) -> Result<(), AgentError> {
    let metrics = AgentMetrics::new();
    let m = metrics.clone();
    let store: Arc<dyn Store> = Arc::new(MeteredStore::new(
        store,
        Arc::new(move |request, took| m.store_request(request, took)),
    ));
    let version = schema::check(store.as_ref()).await?;
    tracing::info!(schema = version, "store opened");
    let leadership = Leadership::default();
    let api_stop = stop.child_token();
    let mut api = tokio::spawn(api::serve(
        leadership.clone(),
        metrics.clone(),
        listener,
        api_stop.clone(),
    ));
    let scrape = metrics_listener
        .map(|l| tokio::spawn(metrics::serve(metrics.clone(), l, api_stop.clone())));
    let result = lead(store, &leadership, &metrics, &config, &stop, &mut api).await;
    leadership.step_down();
    metrics.step_down();
    api_stop.cancel();
    let _ = api.await;
    if let Some(s) = scrape {
        let _ = s.await;
    }
    result
}

async fn lead(
    store: Arc<dyn Store>,
    leadership: &Leadership,
    metrics: &Arc<AgentMetrics>,
    config: &AgentConfig,
    stop: &CancellationToken,
    api: &mut tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) -> Result<(), AgentError> {
    let Some(leader) = leader::campaign(
        store.clone(),
        LEADER_KEY,
        &config.name,
        config.lease_ttl,
        stop,
    )
    .await?
    else {
        return Ok(());
    };
    // Everything the leader decides is written through the fence: refused once another agent leads.
    let store = leader.fenced(LEADER_KEY);
    let prober = Arc::new(EngineProber {
        timeout: config.engine_timeout,
    });
    let registry = Arc::new(Registry::load(store.clone(), prober, config.registry).await?);
    let pools = Arc::new(Pools::new(
        store.clone(),
        registry.clone(),
        config.engine_timeout,
    ));
    let volumes = Arc::new(Volumes::new(
        store,
        registry.clone(),
        config.engine_timeout,
        metrics.clone(),
    ));
    leadership.lead(Arc::new(Leading {
        registry: registry.clone(),
        pools: pools.clone(),
        volumes: volumes.clone(),
    }));
    metrics.lead();
    let reconcilers = reconcile::all(&registry, &pools, &volumes);
    let lost = leader.lost();
    let mut tick = tokio::time::interval(config.registry.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                leadership.step_down();
                let _ = leader.resign().await;
                return Ok(());
            }
            _ = lost.cancelled() => return Err(AgentError::LeadershipLost),
            r = &mut *api => {
                return match r {
                    Ok(Err(e)) => Err(AgentError::Api(e)),
                    _ => Err(AgentError::LeadershipLost),
                };
            }
            _ = tick.tick() => {
                for r in &reconcilers {
                    let t = std::time::Instant::now();
                    let res = r.pass().await;
                    metrics.reconciled(r.name(), t.elapsed());
                    if let Err(e) = res {
                        tracing::warn!(reconciler = r.name(), error = %e, "reconcile pass failed; retrying at the next tick");
                    }
                }
                if let Ok(nodes) = registry.list().await {
                    let online = nodes
                        .iter()
                        .filter(|n| n.record.status.state == super::node::NodeState::Online)
                        .count() as i64;
                    metrics.set_nodes(online, nodes.len() as i64 - online);
                }
            }
        }
    }
}
