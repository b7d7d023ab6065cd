//! Paths to a volume that is no longer published to this node. A volume unpublished from a node against its will
//! (the node was cut off, Kubernetes force-detached the volume and it was published elsewhere) leaves the node's
//! controllers behind; connected with `ctrl_loss_tmo=-1`, they would try to reconnect to the old nexus for ever, and
//! the cluster agent refuses every report about them. When it refuses one, the node agent asks it for the volume:
//! if the cluster agent knows the volume and it is not published to the controller's host NQN, the subsystem's
//! dead paths with that host NQN are deleted (an application still using the device gets I/O errors, where it
//! would otherwise hang: the volume is someone else's now). A volume the cluster agent does not know is left alone:
//! an agent with an empty or wrong store must not take every path of a node down.

use proto::cluster as pb;
use tonic::Code;

use super::agent::{AgentClients, NodeAgentConfig};
use super::fabrics;
use super::paths::Broken;
use super::sysfs;

/// Deletes `b`'s subsystem's dead paths of `b`'s host NQN if the cluster agent says the volume is not published to
/// that host; whether it deleted any.
pub(super) async fn remove_if_not_published(
    cfg: &NodeAgentConfig,
    clients: &AgentClients,
    b: &Broken,
) -> bool {
    let Some(uuid) = b.nqn.strip_prefix(&proto::names::volume_nqn("")) else {
        return false;
    };
    let host = &b.controller.host_nqn;
    // Only the paths there before the question are candidates: one connected after it (a publish to this host
    // since, then the CSI node plugin's connect) is a new controller, never one of these.
    let before = dead_paths(cfg, &b.nqn, host).await;
    if before.is_empty() {
        return false;
    }
    let Some(v) = volume(cfg, clients, uuid).await else {
        return false;
    };
    if v.host_nqn == *host || v.host_nqns.iter().any(|h| h == host) {
        return false;
    }
    let now = dead_paths(cfg, &b.nqn, host).await;
    let mut removed = false;
    for name in before.iter().filter(|n| now.contains(n)) {
        let (sys, n) = (cfg.sys.clone(), name.clone());
        match tokio::task::spawn_blocking(move || fabrics::delete(&sys, &n)).await {
            Ok(Ok(())) => {
                tracing::warn!(nqn = %b.nqn, controller = %name, host_nqn = %host, published_to = ?v.host_nqns, "the volume is no longer published to this host: its dead path removed");
                removed = true;
            }
            Ok(Err(e)) => {
                tracing::warn!(controller = %name, error = %e, "removing a path of an unpublished volume failed")
            }
            Err(e) => tracing::warn!(error = %e, "delete task failed"),
        }
    }
    removed
}

/// The names of `nqn`'s controllers of host `host` that are not live.
async fn dead_paths(cfg: &NodeAgentConfig, nqn: &str, host: &str) -> Vec<String> {
    let (sys, nqn, host) = (cfg.sys.clone(), nqn.to_string(), host.to_string());
    tokio::task::spawn_blocking(move || {
        sysfs::scan(&sys)
            .into_iter()
            .filter(|s| s.nqn == nqn)
            .flat_map(|s| s.controllers)
            .filter(|c| c.host_nqn == host && c.state != "live")
            .map(|c| c.name)
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// The volume as the first cluster agent that answers knows it; `None` if none knows it or none answers.
async fn volume(cfg: &NodeAgentConfig, clients: &AgentClients, uuid: &str) -> Option<pb::Volume> {
    for url in &cfg.cluster_agents {
        let Ok(mut c) = clients.get(url).await else {
            continue;
        };
        let req = pb::GetVolumeRequest { uuid: uuid.into() };
        match c.get_volume(req).await {
            Ok(v) => return Some(v.into_inner()),
            Err(s) if s.code() == Code::NotFound => {
                tracing::info!(volume = %uuid, "the cluster agent does not know the volume: its paths are left as they are");
                return None;
            }
            Err(s) => {
                tracing::debug!(%url, code = ?s.code(), why = %s.message(), "asking for the volume failed")
            }
        }
    }
    None
}
