//! Paths to a volume that is no longer published to this node. A volume unpublished from a node against its will
//! (the node was cut off, Kubernetes force-detached the volume and it was published elsewhere) leaves the node's
//! controllers behind; connected with `ctrl_loss_tmo=-1`, they would try to reconnect to the old nexus for ever, and
//! the cluster agent refuses every report about them. It marks the refusal that means "not published to this host"
//! (`names::NOT_PUBLISHED_TO`, decided under the volume's lock from its record, where a nexus being made for the
//! host already counts as published to it); on that answer the reported path is deleted if it is still not live
//! (an application still using the device gets I/O errors where it would otherwise hang: the volume is someone
//! else's now). Any other refusal, a volume the cluster agent does not know included, leaves the path alone: an
//! agent with an empty or wrong store must not take a node's paths down.

use super::agent::NodeAgentConfig;
use super::fabrics;
use super::paths::Broken;
use super::sysfs;

/// Deletes `b`'s controller, which the cluster agent said leads to a volume not published to its host, if it is
/// still that subsystem's, of that host, and not live; whether it did.
pub(super) async fn remove_stale_path(cfg: &NodeAgentConfig, b: &Broken) -> bool {
    let (sys, nqn, c) = (cfg.sys.clone(), b.nqn.clone(), b.controller.clone());
    let still = tokio::task::spawn_blocking(move || {
        sysfs::scan(&sys).into_iter().any(|s| {
            s.nqn == nqn
                && s.controllers
                    .iter()
                    .any(|x| x.name == c.name && x.host_nqn == c.host_nqn && x.state != "live")
        })
    })
    .await
    .unwrap_or(false);
    if !still {
        return false;
    }
    let (sys, name) = (cfg.sys.clone(), b.controller.name.clone());
    match tokio::task::spawn_blocking(move || fabrics::delete(&sys, &name)).await {
        Ok(Ok(())) => {
            tracing::warn!(nqn = %b.nqn, controller = %b.controller.name, address = %b.controller.address, host_nqn = %b.controller.host_nqn, "the volume is no longer published to this host: its dead path removed");
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(controller = %b.controller.name, error = %e, "removing a path of an unpublished volume failed");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "delete task failed");
            false
        }
    }
}
