//! The Identity service: who the plugin is, what it offers, and whether it is ready. A plugin that answers is ready,
//! whether the cluster agent answers or not: its liveness probe (the livenessprobe sidecar asks Probe) must restart
//! a plugin that hangs, not one whose agent is away. A controller restarted for that takes its sidecars down with
//! it (they exit when the socket goes) into a crash loop whose back-off outlasts the outage; kept up, its calls
//! answer UNAVAILABLE while no agent leads, which the sidecars retry, and work again as soon as one does.

use proto::csi::identity_server::Identity;
use proto::csi::plugin_capability::service::Type as ServiceType;
use proto::csi::plugin_capability::volume_expansion::Type as ExpansionType;
use proto::csi::plugin_capability::{Service, Type as CapabilityType, VolumeExpansion};
use proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

pub struct IdentityService;

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
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
