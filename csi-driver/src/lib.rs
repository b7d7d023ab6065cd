//! Keelson's CSI driver, `csi.keelson.io` (not built yet).
//!
//! It will serve the CSI Identity, Controller and Node services over a unix socket for the Kubernetes CSI sidecars:
//! provisioning with topology, publish/unpublish, snapshots, expansion and capacity through the cluster agent, and on
//! the node the NVMe/TCP attach, format and mount of a volume.
