//! io-engine's side of the cluster registry (`proto::cluster::Registration`): register with the cluster agent,
//! send heartbeats at the interval it asks for, register again when it asks (or when it, or its leadership,
//! changes), and deregister on a clean shutdown. Several agent URLs may be given; the first that accepts wins.
//! Nothing here blocks the engine: an unreachable agent is retried with backoff while the engine keeps serving.
//! Also the engine's [`FaultConfirmer`]: nexuses made with `confirm_faults` ask the agent before faulting a child.

use std::time::Duration;

use proto::cluster as pb;
use proto::cluster::registration_client::RegistrationClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::engine::{Engine, FaultConfirmer};

/// Per call to the agent.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct RegistrationConfig {
    /// Cluster agent URLs (`http://host:port`), tried in order.
    pub agents: Vec<String>,
    /// Where this engine's API answers, as the agent should dial it.
    pub engine_endpoint: String,
    /// The node's labels (`--node-label`), for placement by selectors and topology.
    pub labels: std::collections::HashMap<String, String>,
    /// Labels of pools by pool name (`--pool-label`), for placement by pool selectors.
    pub pool_labels: std::collections::HashMap<String, std::collections::HashMap<String, String>>,
}

fn pools(engine: &Engine, cfg: &RegistrationConfig) -> Vec<pb::Pool> {
    engine
        .pools_with_stats()
        .into_iter()
        .map(|(e, s)| {
            let l = e.pool.label();
            pb::Pool {
                name: l.name.clone(),
                uuid: l.uuid.to_string(),
                disk: e.disk.clone(),
                capacity: s.capacity,
                allocated: s.allocated,
                committed: s.committed,
                disk_errors: s.disk_errors,
                labels: cfg.pool_labels.get(&l.name).cloned().unwrap_or_default(),
                block_size: l.block_size,
                disk_full: s.disk_full,
                disk_room: s.disk_room,
                replica_room: Some(s.replica_room),
                incarnation: l.incarnation,
                applied: s.applied,
            }
        })
        .collect()
}

fn request(engine: &Engine, cfg: &RegistrationConfig, instance: &str) -> pb::RegisterRequest {
    let tc = engine.target().config();
    pb::RegisterRequest {
        node: engine.node_name().to_string(),
        engine_endpoint: cfg.engine_endpoint.clone(),
        nvmf_listeners: engine
            .target()
            .listeners()
            .iter()
            .map(|l| l.address.to_string())
            .collect(),
        cntlid_min: u32::from(tc.cntlid_min),
        cntlid_max: u32::from(tc.cntlid_max),
        pools: pools(engine, cfg),
        instance: instance.to_string(),
        labels: cfg.labels.clone(),
    }
}

async fn client(url: &str) -> Result<RegistrationClient<Channel>, String> {
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url}: {e}"))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    Ok(RegistrationClient::new(
        ep.connect().await.map_err(|e| format!("{url}: {e}"))?,
    ))
}

/// Registers with the first agent that accepts; returns its client, the heartbeat interval, and whether the agent
/// takes a deregistration naming torn nexuses (`RegisterResponse.takes_torn_nexuses`).
async fn register(
    engine: &Engine,
    cfg: &RegistrationConfig,
    instance: &str,
) -> Result<(RegistrationClient<Channel>, Duration, bool), String> {
    let mut why = Vec::new();
    for url in &cfg.agents {
        let mut c = match client(url).await {
            Ok(c) => c,
            Err(e) => {
                why.push(e);
                continue;
            }
        };
        match c.register(request(engine, cfg, instance)).await {
            Ok(r) => {
                let r = r.into_inner();
                let every = Duration::from_millis(u64::from(r.heartbeat_interval_ms).max(10));
                tracing::info!(agent = %url, heartbeat_ms = every.as_millis() as u64, "registered with the cluster agent");
                return Ok((c, every, r.takes_torn_nexuses));
            }
            Err(s) => why.push(format!("{url}: {}", s.message())),
        }
    }
    Err(why.join("; "))
}

/// Asks the agents (in order, again and again with backoff until one answers) to confirm a child fault.
#[derive(Debug)]
struct AgentFaultConfirmer {
    agents: Vec<String>,
    node: String,
}

#[tonic::async_trait]
impl FaultConfirmer for AgentFaultConfirmer {
    async fn confirm(
        &self,
        volume: uuid::Uuid,
        key: u64,
        child: &str,
        reason: &str,
    ) -> Result<(), String> {
        let request = pb::ConfirmChildFaultRequest {
            node: self.node.clone(),
            volume: volume.to_string(),
            key,
            child: child.to_string(),
            reason: reason.to_string(),
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            for url in &self.agents {
                let mut c = match client(url).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(%volume, child, error = %e, "cannot ask the cluster agent to confirm a child fault");
                        continue;
                    }
                };
                match c.confirm_child_fault(request.clone()).await {
                    Ok(_) => {
                        tracing::warn!(%volume, child, reason, "the cluster agent confirmed the child's fault");
                        return Ok(());
                    }
                    // Replaced (or deleted); a request the agent cannot take is refused the same way: whatever
                    // it is, the nexus must not go on without its consent.
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::FailedPrecondition
                                | tonic::Code::NotFound
                                | tonic::Code::InvalidArgument
                        ) =>
                    {
                        return Err(s.message().to_string());
                    }
                    Err(s) => {
                        tracing::warn!(%volume, child, agent = %url, error = %s.message(), "the cluster agent did not confirm a child fault; asking again")
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

/// Runs until `stop` fires, then deregisters, naming the nexuses that did not drain ([`Engine::torn_nexuses`]; fire
/// `stop` after [`Engine::shutdown`]). An agent that does not take that list is not told of the end at all when a
/// nexus was torn: it then judges the whole instance unclean.
pub async fn run(engine: Engine, cfg: RegistrationConfig, stop: CancellationToken) {
    engine.set_fault_confirmer(std::sync::Arc::new(AgentFaultConfirmer {
        agents: cfg.agents.clone(),
        node: engine.node_name().to_string(),
    }));
    let instance = uuid::Uuid::new_v4().to_string();
    let mut backoff = Duration::from_millis(100);
    let mut last: Option<(RegistrationClient<Channel>, bool)> = None;
    'register: while !stop.is_cancelled() {
        let (mut c, every, takes_torn) = match register(&engine, &cfg, &instance).await {
            Ok(x) => x,
            Err(why) => {
                tracing::warn!(%why, retry_in_ms = backoff.as_millis() as u64, "cannot register with a cluster agent");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let feed = engine.nexus_changes();
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    last = Some((c, takes_torn));
                    break 'register;
                }
                _ = tokio::time::sleep(every) => {}
                _ = feed.marked() => {}
            }
            let changed_nexuses = feed.take();
            let hb = pb::HeartbeatRequest {
                node: engine.node_name().to_string(),
                instance: instance.clone(),
                pools: pools(&engine, &cfg),
                changed_nexuses: changed_nexuses.clone(),
            };
            match c.heartbeat(hb).await {
                Ok(r) if !r.get_ref().register_again => {}
                Ok(_) => {
                    // An agent that does not know this engine (a new leader) ignores the changes it was told of:
                    // told again once registered.
                    for n in &changed_nexuses {
                        feed.mark(n);
                    }
                    tracing::info!("the cluster agent asks this engine to register again");
                    continue 'register;
                }
                Err(s) => {
                    // Told again with the next heartbeat.
                    for n in &changed_nexuses {
                        feed.mark(n);
                    }
                    tracing::warn!(error = %s.message(), "heartbeat failed; registering again");
                    continue 'register;
                }
            }
        }
    }
    if let Some((mut c, takes_torn)) = last {
        let Some(torn) = engine.torn_nexuses() else {
            // Stopped before the engine shut its nexuses down: nothing is known of how they end.
            tracing::warn!("stopped before the engine's shutdown: leaving without deregistering");
            return;
        };
        let torn: Vec<String> = torn.iter().map(|u| u.to_string()).collect();
        if !torn.is_empty() && !takes_torn {
            // Not deregistered: the cluster agent sees this end as unclean and resyncs every nexus's replicas.
            tracing::warn!(
                ?torn,
                "a nexus did not drain and the cluster agent judges only whole ends: leaving without deregistering"
            );
            return;
        }
        let d = pb::DeregisterRequest {
            node: engine.node_name().to_string(),
            instance,
            torn_nexuses: torn,
        };
        match c.deregister(d).await {
            Ok(_) => tracing::info!("deregistered from the cluster agent"),
            Err(s) => {
                tracing::warn!(error = %s.message(), "could not deregister from the cluster agent")
            }
        }
    }
}
