//! One cluster agent: opens the store, checks its schema, serves the API and the metrics, and while it leads runs
//! the reconcilers ([`super::reconcile::all`]), writing through the leader's fence: the node sweep once per
//! heartbeat interval, the others once per sweep interval and at once when a node changes state (registers or goes
//! Offline). Engines report their nexuses' changes with their heartbeats, which heals those volumes at once (see
//! `api`), so the sweep is the safety net, not the way faults are found.
//! Losing leadership stops it at once, without waiting for the API calls in flight (the caller exits, ending them
//! and their engine calls; a supervisor restarts it as a candidate). Told to stop, it stops leading, waits a while
//! for the calls and heals it began to end, and only then resigns (another agent takes over at once, and must not
//! meet this one's engine calls); if they do not end in time it does not resign, and the lease runs out by itself
//! after the process ended them.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::api::{self, Leadership, Leading};
use super::dataplane::EngineProber;
use super::hosts::Hosts;
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
    /// How often the reconcilers other than the node sweep run without an event.
    pub sweep: Duration,
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

/// How long an agent told to stop waits for its calls and heals in flight before it gives up resigning (no agent
/// leads meanwhile: a few engine calls' time).
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

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
    // Leadership lost, or calls not drained: the calls in flight are not waited for (the caller exits, ending them).
    let result = match result {
        Ok(true) => {
            let _ = api.await;
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) => Err(e),
    };
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
) -> Result<bool, AgentError> {
    let Some(leader) = leader::campaign(
        store.clone(),
        LEADER_KEY,
        &config.name,
        config.lease_ttl,
        stop,
    )
    .await?
    else {
        return Ok(true);
    };
    // Everything the leader decides is written through the fence: refused once another agent leads.
    let store = leader.fenced(LEADER_KEY);
    // The store is of this agent's schema from now on: an older agent leading later stops rather than rewrite records
    // without the fields it does not know.
    schema::raise(store.as_ref(), schema::SCHEMA_VERSION).await?;
    let prober = Arc::new(EngineProber {
        timeout: config.engine_timeout,
    });
    let registry = Arc::new(Registry::load(store.clone(), prober, config.registry).await?);
    let pools = Arc::new(Pools::new(
        store.clone(),
        registry.clone(),
        config.engine_timeout,
    ));
    let hosts = Arc::new(Hosts::new(store.clone()));
    let volumes = Arc::new(Volumes::new(
        store,
        registry.clone(),
        config.engine_timeout,
        metrics.clone(),
    ));
    let leading = Arc::new(Leading {
        registry: registry.clone(),
        pools: pools.clone(),
        volumes: volumes.clone(),
        hosts,
    });
    leadership.lead(leading.clone());
    metrics.lead();
    let reconcilers = reconcile::all(&registry, &pools, &volumes);
    let lost = leader.lost();
    let (fast, slow): (Vec<_>, Vec<_>) = reconcilers.into_iter().partition(|r| r.every_heartbeat());
    let mut tick = tokio::time::interval(config.registry.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(config.sweep);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The node sweep has its own loop: a slow pass (an engine that hangs until its timeout) never delays finding
    // that a node is gone.
    let fast_loop = async {
        loop {
            tick.tick().await;
            pass(&fast, metrics).await;
            let nodes = registry.list().await.unwrap_or_default();
            let online = nodes
                .iter()
                .filter(|n| n.record.status.state == super::node::NodeState::Online)
                .count() as i64;
            metrics.set_nodes(online, nodes.len() as i64 - online);
        }
    };
    let slow_loop = async {
        loop {
            tokio::select! {
                _ = sweep.tick() => {}
                _ = registry.state_changed() => sweep.reset(),
            }
            pass(&slow, metrics).await;
        }
    };
    // Biased, the stop first: told to stop, the API (stopped by the same token) may end in the same poll, and that is
    // no lost leadership.
    let ended: Option<AgentError> = tokio::select! {
        biased;
        _ = stop.cancelled() => None,
        _ = lost.cancelled() => Some(AgentError::LeadershipLost),
        r = &mut *api => Some(match r {
            Ok(Err(e)) => AgentError::Api(e),
            _ => AgentError::LeadershipLost,
        }),
        never = fast_loop => never,
        never = slow_loop => never,
    };
    leadership.step_down();
    if let Some(e) = ended {
        return Err(e);
    }
    // The reconcilers' passes ended with the loops (none holds a volume's lock now); the calls and heals in flight
    // hold `leading` until they end.
    let t = tokio::time::Instant::now();
    while Arc::strong_count(&leading) > 1 {
        if t.elapsed() >= DRAIN_LIMIT {
            tracing::warn!(
                "calls still in flight after {DRAIN_LIMIT:?}: not resigning (the lease runs out by itself)"
            );
            return Ok(false);
        }
        // Lost meanwhile (the store unreachable): another agent may lead soon; the calls are not waited for.
        if lost.is_cancelled() {
            return Err(AgentError::LeadershipLost);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = leader.resign().await;
    tracing::info!("resigned: no call or heal of this agent is in flight");
    Ok(true)
}

/// Runs each of `reconcilers` once, in order, timing each.
async fn pass(reconcilers: &[Box<dyn reconcile::Reconciler>], metrics: &AgentMetrics) {
    for r in reconcilers {
        let t = std::time::Instant::now();
        let res = r.pass().await;
        metrics.reconciled(r.name(), t.elapsed());
        if let Err(e) = res {
            tracing::warn!(reconciler = r.name(), error = %e, "reconcile pass failed; retrying at the next tick");
        }
    }
}
