//! The Identity service: who the plugin is, what it offers, and whether it is ready: a controller is when the
//! cluster agent answers (without it no controller call can do anything); a node-only plugin needs only the
//! kernel, so it stays ready (and is not restarted by its liveness probe) while the agent is away.

use std::sync::Arc;

use proto::csi::identity_server::Identity;
use proto::csi::plugin_capability::service::Type as ServiceType;
use proto::csi::plugin_capability::volume_expansion::Type as ExpansionType;
use proto::csi::plugin_capability::{Service, Type as CapabilityType, VolumeExpansion};
use proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

use crate::agent::Agent;

pub struct IdentityService {
    /// The cluster agent, when readiness depends on it (controller and all modes).
    agent: Option<Arc<Agent>>,
}

impl IdentityService {
    pub fn new(agent: Option<Arc<Agent>>) -> IdentityService {
        IdentityService { agent }
    }
}

/// What every instance of this version offers, whatever its mode (the spec wants them alike).
pub fn capabilities() -> Vec<PluginCapability> {
    [
        ServiceType::ControllerService,
        ServiceType::VolumeAccessibilityConstraints,
    ]
    .into_iter()
    .map(|t| PluginCapability {
        r#type: Some(CapabilityType::Service(Service { r#type: t as i32 })),
    })
    .chain([PluginCapability {
        // Volumes grow while published and mounted.
        r#type: Some(CapabilityType::VolumeExpansion(VolumeExpansion {
            r#type: ExpansionType::Online as i32,
        })),
    }])
    .collect()
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: crate::DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: [("project".to_string(), "keelson".to_string())].into(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: capabilities(),
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = match &self.agent {
            Some(a) => a
                .call(
                    |mut c| async move { c.list_nodes(proto::cluster::ListNodesRequest {}).await },
                )
                .await
                .is_ok(),
            None => true,
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
