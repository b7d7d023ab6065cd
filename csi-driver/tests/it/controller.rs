//! Controller: volumes' life and every error the spec gives for it, publishing to nodes, listing, capacity and
//! topology, volume condition.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use proto::cluster as pb;
use proto::csi::controller_client::ControllerClient;
use proto::csi::controller_service_capability::Type as CapType;
use proto::csi::controller_service_capability::rpc::Type as RpcType;
use proto::csi::volume_capability::access_mode::Mode;
use proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use proto::csi::*;
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::Cluster;

pub fn cap(mode: Mode, block: bool) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            })
        }),
    }
}

pub fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn create(name: &str, bytes: i64, p: &[(&str, &str)]) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap(Mode::SingleNodeWriter, false)],
        parameters: params(p),
        ..Default::default()
    }
}

pub fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

const MIB: i64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_is_created_published_and_deleted_as_the_spec_says() {
    let c = Cluster::start(3).await;
    let mut ctl = c.controller().await;

    let caps = ctl
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let rpcs: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(CapType::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    for want in [
        RpcType::CreateDeleteVolume,
        RpcType::PublishUnpublishVolume,
        RpcType::ListVolumes,
        RpcType::GetCapacity,
        RpcType::CreateDeleteSnapshot,
        RpcType::ListSnapshots,
        RpcType::CloneVolume,
        RpcType::VolumeCondition,
        RpcType::GetVolume,
        RpcType::ListVolumesPublishedNodes,
        RpcType::ExpandVolume,
    ] {
        assert!(rpcs.contains(&(want as i32)), "{want:?} not advertised");
    }

    // Create, and the same again: the same volume.
    let req = create("pvc-a", 16 * MIB, &[("repl", "3"), ("fsType", "xfs")]);
    let v = ctl
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 16 * MIB);
    assert_eq!(
        v.volume_context.get("fsType").map(String::as_str),
        Some("xfs")
    );
    let again = ctl
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    // A capacity range the existing volume fits (less required, no limit; or a range around it): the same volume.
    let mut smaller = create("pvc-a", 8 * MIB, &[("repl", "3"), ("fsType", "xfs")]);
    let fits = ctl
        .create_volume(smaller.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (&fits.volume_id, fits.capacity_bytes),
        (&v.volume_id, 16 * MIB)
    );
    // One it does not fit (a limit below its size): ALREADY_EXISTS.
    smaller.capacity_range.as_mut().unwrap().limit_bytes = 12 * MIB;
    let (code_, _) = code(ctl.create_volume(smaller).await);
    assert_eq!(code_, Code::AlreadyExists);
    // The same name with another file system: ALREADY_EXISTS (the volume may already carry xfs).
    let (code_, _) = code(
        ctl.create_volume(create(
            "pvc-a",
            16 * MIB,
            &[("repl", "3"), ("fsType", "ext4")],
        ))
        .await,
    );
    assert_eq!(code_, Code::AlreadyExists);
    // The same name with another size or replica count: ALREADY_EXISTS.
    let (code_, _) = code(
        ctl.create_volume(create("pvc-a", 32 * MIB, &[("repl", "3")]))
            .await,
    );
    assert_eq!(code_, Code::AlreadyExists);
    let (code_, _) = code(
        ctl.create_volume(create("pvc-a", 16 * MIB, &[("repl", "1")]))
            .await,
    );
    assert_eq!(code_, Code::AlreadyExists);
    let mut cl = c.cluster().await;
    let cv = cl
        .get_volume(pb::GetVolumeRequest {
            uuid: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cv.replica_list.len(), 3);
    let nodes: std::collections::BTreeSet<_> = cv.replica_list.iter().map(|r| &r.node).collect();
    assert_eq!(nodes.len(), 3, "each replica on its own node: {cv:?}");

    // Bad input, each with its code.
    let mut no_caps = create("pvc-b", MIB, &[]);
    no_caps.volume_capabilities.clear();
    let mut multi = create("pvc-b", MIB, &[]);
    multi.volume_capabilities = vec![cap(Mode::MultiNodeMultiWriter, false)];
    let mut multi_reader = create("pvc-b", MIB, &[]);
    multi_reader.volume_capabilities = vec![cap(Mode::MultiNodeReaderOnly, true)];
    let mut bad_range = create("pvc-b", 10 * MIB, &[]);
    bad_range.capacity_range.as_mut().unwrap().limit_bytes = MIB;
    let mut no_type = create("pvc-b", MIB, &[]);
    no_type.volume_capabilities[0].access_type = None;
    for (what, req, want, says) in [
        (
            "empty name",
            create("", MIB, &[]),
            Code::InvalidArgument,
            "name",
        ),
        (
            "huge name",
            create(&"x".repeat(129), MIB, &[]),
            Code::InvalidArgument,
            "name",
        ),
        (
            "no capabilities",
            no_caps,
            Code::InvalidArgument,
            "volume_capabilities",
        ),
        (
            "multi-node writer",
            multi,
            Code::InvalidArgument,
            "MULTI_NODE_MULTI_WRITER",
        ),
        (
            "multi-node reader",
            multi_reader,
            Code::InvalidArgument,
            "one node at a time",
        ),
        (
            "no access type",
            no_type,
            Code::InvalidArgument,
            "access type",
        ),
        (
            "unknown parameter",
            create("pvc-b", MIB, &[("replicas", "3")]),
            Code::InvalidArgument,
            "\"replicas\"",
        ),
        (
            "thick",
            create("pvc-b", MIB, &[("thin", "false")]),
            Code::InvalidArgument,
            "thin",
        ),
        (
            "bad fsType",
            create("pvc-b", MIB, &[("fsType", "ntfs")]),
            Code::InvalidArgument,
            "fsType",
        ),
        (
            "limit below required",
            bad_range,
            Code::InvalidArgument,
            "limit_bytes",
        ),
        (
            "beyond every pool",
            create("pvc-b", 1 << 40, &[]),
            Code::OutOfRange,
            "could ever hold",
        ),
        (
            "capacity 0",
            create("pvc-b", 0, &[]),
            Code::InvalidArgument,
            "capacity_range",
        ),
        (
            "more replicas than nodes",
            create("pvc-b", MIB, &[("repl", "4")]),
            Code::ResourceExhausted,
            "cluster agent",
        ),
    ] {
        let (got, msg) = code(ctl.create_volume(req).await);
        assert_eq!(got, want, "{what}: {msg}");
        assert!(msg.contains(says), "{what}: {msg:?} does not say {says:?}");
    }
    // As large as a whole pool: it could fit were the pools empty, but pvc-a holds room in each now. RESOURCE_EXHAUSTED,
    // which the provisioner retries, not OUT_OF_RANGE, on which it gives the claim up.
    let whole_pool = cl
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .iter()
        .flat_map(|n| n.pools.iter().map(|p| p.capacity))
        .min()
        .unwrap();
    let (got, msg) = code(
        ctl.create_volume(create(
            "pvc-b",
            (whole_pool / 4096 * 4096) as i64,
            &[("repl", "1")],
        ))
        .await,
    );
    assert_eq!(got, Code::ResourceExhausted, "a whole pool's size: {msg}");
    // Nothing was left behind by the refused ones.
    let listed = ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1, "{listed:?}");
    // Listed with the context CreateVolume gave it.
    let context = &listed[0].volume.as_ref().unwrap().volume_context;
    assert_eq!(context.get("fsType").map(String::as_str), Some("xfs"));

    // ValidateVolumeCapabilities.
    let vr = |caps: Vec<VolumeCapability>, id: &str| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = ctl
        .validate_volume_capabilities(vr(vec![cap(Mode::SingleNodeWriter, true)], &v.volume_id))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let no = ctl
        .validate_volume_capabilities(vr(vec![cap(Mode::MultiNodeReaderOnly, true)], &v.volume_id))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    let (got, _) = code(
        ctl.validate_volume_capabilities(vr(vec![cap(Mode::SingleNodeWriter, true)], "nope"))
            .await,
    );
    assert_eq!(got, Code::NotFound);
    let (got, _) = code(
        ctl.validate_volume_capabilities(vr(vec![], &v.volume_id))
            .await,
    );
    assert_eq!(got, Code::InvalidArgument);

    // Publish to a node (an application node without an io-engine: the nexus goes to a replica's node).
    let publish = |node: &str, id: &str| ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(cap(Mode::SingleNodeWriter, false)),
        ..Default::default()
    };
    let ctx = ctl
        .controller_publish_volume(publish("worker-1", &v.volume_id))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(
        ctx["nqn"],
        format!("nqn.2026-11.io.keelson:vol-{}", v.volume_id)
    );
    assert!(ctx["targetAddresses"].starts_with("127.0.0."), "{ctx:?}");
    assert_eq!(ctx["hostNqn"], "nqn.2026-11.io.keelson:host-worker-1");
    let ctx2 = ctl
        .controller_publish_volume(publish("worker-1", &v.volume_id))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx, ctx2, "publishing again answers the same");
    let (got, msg) = code(
        ctl.controller_publish_volume(publish("worker-2", &v.volume_id))
            .await,
    );
    assert_eq!(got, Code::FailedPrecondition, "{msg}");
    for (req, want) in [
        (
            publish("worker-1", "00000000-0000-4000-8000-000000000099"),
            Code::NotFound,
        ),
        (publish("worker-1", "not-a-volume"), Code::NotFound),
        // A node no node agent (nor io-engine) ever registered does not exist.
        (publish("no-such-node", &v.volume_id), Code::NotFound),
        (publish("", &v.volume_id), Code::InvalidArgument),
        (publish("worker-1", ""), Code::InvalidArgument),
        (
            ControllerPublishVolumeRequest {
                volume_capability: None,
                ..publish("worker-1", &v.volume_id)
            },
            Code::InvalidArgument,
        ),
    ] {
        assert_eq!(code(ctl.controller_publish_volume(req).await).0, want);
    }
    let got = get(&mut ctl, &v.volume_id).await;
    let status = got.status.unwrap();
    assert_eq!(status.published_node_ids, vec!["worker-1".to_string()]);
    assert!(!status.volume_condition.unwrap().abnormal);

    // In use: not deleted.
    let del = |id: &str| DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    };
    let (got, msg) = code(ctl.delete_volume(del(&v.volume_id)).await);
    assert_eq!(got, Code::FailedPrecondition, "{msg}");

    // Unpublish: from another node a no-op; then for real, twice.
    let unpublish = |node: &str| ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: node.into(),
        ..Default::default()
    };
    ctl.controller_unpublish_volume(unpublish("worker-2"))
        .await
        .unwrap();
    assert_eq!(
        get(&mut ctl, &v.volume_id)
            .await
            .status
            .unwrap()
            .published_node_ids,
        vec!["worker-1".to_string()]
    );
    ctl.controller_unpublish_volume(unpublish("worker-1"))
        .await
        .unwrap();
    ctl.controller_unpublish_volume(unpublish("worker-1"))
        .await
        .unwrap();
    assert!(
        get(&mut ctl, &v.volume_id)
            .await
            .status
            .unwrap()
            .published_node_ids
            .is_empty()
    );
    ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: "00000000-0000-4000-8000-000000000099".into(),
        node_id: "worker-1".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Delete, twice; then it is gone.
    ctl.delete_volume(del(&v.volume_id)).await.unwrap();
    ctl.delete_volume(del(&v.volume_id)).await.unwrap();
    ctl.delete_volume(del("never-created")).await.unwrap();
    assert_eq!(
        code(ctl.delete_volume(del("")).await).0,
        Code::InvalidArgument
    );
    let (got, _) = code(
        ctl.controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await,
    );
    assert_eq!(got, Code::NotFound);
    // Nothing is left in any pool.
    crate::harness::pools_empty(&c).await;

    // Two CreateVolume calls for one name at once: both succeed with the same volume, or the loser is ABORTED.
    let (mut c1, mut c2) = (ctl.clone(), ctl.clone());
    let (a, b) = tokio::join!(
        c1.create_volume(create("pvc-c", 8 * MIB, &[("repl", "2")])),
        c2.create_volume(create("pvc-c", 8 * MIB, &[("repl", "2")])),
    );
    let ok: Vec<_> = [a, b]
        .into_iter()
        .filter_map(|r| match r {
            Ok(v) => Some(v.into_inner().volume.unwrap().volume_id),
            Err(s) => {
                assert_eq!(s.code(), Code::Aborted, "{s:?}");
                None
            }
        })
        .collect();
    assert!(!ok.is_empty());
    assert!(ok.iter().all(|id| *id == ok[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_grow_online_and_expansion_errors_are_the_specs() {
    let c = Cluster::start(3).await;
    let mut ctl = c.controller().await;
    let v = ctl
        .create_volume(create("pvc-grow", 8 * MIB, &[("repl", "3")]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    // Published (online expansion): the nexus grows with the replicas.
    ctl.controller_publish_volume(ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: "worker-1".into(),
        volume_capability: Some(cap(Mode::SingleNodeWriter, false)),
        ..Default::default()
    })
    .await
    .unwrap();
    let expand = |id: &str, req: i64, limit: i64, block: bool| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: req,
            limit_bytes: limit,
        }),
        volume_capability: Some(cap(Mode::SingleNodeWriter, block)),
        ..Default::default()
    };
    let r = ctl
        .controller_expand_volume(expand(&v.volume_id, 16 * MIB + 1, 0, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.capacity_bytes, r.node_expansion_required),
        (16 * MIB + 4096, true),
        "rounded up to the block; a file system grows on the node"
    );
    assert_eq!(
        get(&mut ctl, &v.volume_id)
            .await
            .volume
            .unwrap()
            .capacity_bytes,
        16 * MIB + 4096
    );
    let mut cl = c.cluster().await;
    let cv = cl
        .get_volume(pb::GetVolumeRequest {
            uuid: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (cv.size_bytes, cv.state.as_str()),
        ((16 * MIB + 4096) as u64, "Online")
    );
    // Already as large (the same request again, or a smaller one): success, the size it has; a raw block volume
    // needs nothing on the node.
    for (req, block) in [(16 * MIB + 1, false), (12 * MIB, true)] {
        let r = ctl
            .controller_expand_volume(expand(&v.volume_id, req, 0, block))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.capacity_bytes, r.node_expansion_required),
            (16 * MIB + 4096, !block)
        );
    }
    let r = ctl
        .controller_expand_volume(expand(&v.volume_id, 20 * MIB, 0, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.capacity_bytes, r.node_expansion_required),
        (20 * MIB, false)
    );

    let mut no_range = expand(&v.volume_id, 24 * MIB, 0, false);
    no_range.capacity_range = None;
    let mut multi = expand(&v.volume_id, 24 * MIB, 0, false);
    multi.volume_capability = Some(cap(Mode::MultiNodeMultiWriter, false));
    for (what, req, want, says) in [
        (
            "no capacity_range",
            no_range,
            Code::InvalidArgument,
            "capacity_range",
        ),
        (
            "no volume id",
            expand("", 24 * MIB, 0, false),
            Code::InvalidArgument,
            "volume_id",
        ),
        (
            "never created",
            expand("00000000-0000-4000-8000-000000000099", 24 * MIB, 0, false),
            Code::NotFound,
            "no volume",
        ),
        (
            "not an id",
            expand("nope", 24 * MIB, 0, false),
            Code::NotFound,
            "no volume",
        ),
        (
            "limit below required",
            expand(&v.volume_id, 24 * MIB, 22 * MIB, false),
            Code::InvalidArgument,
            "limit_bytes",
        ),
        (
            "limit below the size it has",
            expand(&v.volume_id, 8 * MIB, 12 * MIB, false),
            Code::OutOfRange,
            "never shrink",
        ),
        (
            "beyond every pool",
            expand(&v.volume_id, 1 << 40, 0, false),
            Code::OutOfRange,
            "pool",
        ),
        (
            "multi-node writer",
            multi,
            Code::InvalidArgument,
            "MULTI_NODE_MULTI_WRITER",
        ),
    ] {
        let (got, msg) = code(ctl.controller_expand_volume(req).await);
        assert_eq!(got, want, "{what}: {msg}");
        assert!(msg.contains(says), "{what}: {msg:?} does not say {says:?}");
    }
    assert_eq!(
        get(&mut ctl, &v.volume_id)
            .await
            .volume
            .unwrap()
            .capacity_bytes,
        20 * MIB,
        "refused expansions change nothing"
    );
}

/// MULTI_NODE_MULTI_WRITER raw block (a virtual machine's disk during live migration): published to two nodes at
/// once, each unpublished on its own; a single-node volume stays on one node; a file system never goes multi-node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_block_volume_is_published_to_several_nodes_at_once() {
    let c = Cluster::start(2).await;
    let mut ctl = c.controller().await;
    let shared = cap(Mode::MultiNodeMultiWriter, true);
    let mut req = create("pvc-vm-disk", 8 * MIB, &[("repl", "2")]);
    req.volume_capabilities = vec![shared.clone()];
    let v = ctl
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let publish = |node: &str, c: &VolumeCapability| ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: node.into(),
        volume_capability: Some(c.clone()),
        ..Default::default()
    };
    let mut contexts = Vec::new();
    for node in ["worker-1", "worker-2", "worker-2"] {
        let ctx = ctl
            .controller_publish_volume(publish(node, &shared))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        assert_eq!(
            ctx["hostNqn"],
            format!("nqn.2026-11.io.keelson:host-{node}")
        );
        contexts.push(ctx);
    }
    assert_eq!(
        (&contexts[0]["nqn"], &contexts[0]["targetAddresses"]),
        (&contexts[1]["nqn"], &contexts[1]["targetAddresses"]),
        "one nexus serves both nodes"
    );
    let nodes = |g: ControllerGetVolumeResponse| g.status.unwrap().published_node_ids;
    assert_eq!(
        nodes(get(&mut ctl, &v.volume_id).await),
        vec!["worker-1".to_string(), "worker-2".to_string()]
    );
    ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: "worker-1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        nodes(get(&mut ctl, &v.volume_id).await),
        vec!["worker-2".to_string()]
    );

    // A single-node capability does not join another node, and a mounted file system is never multi-node.
    let (got, msg) = code(
        ctl.controller_publish_volume(publish("worker-3", &cap(Mode::SingleNodeWriter, true)))
            .await,
    );
    assert_eq!(got, Code::FailedPrecondition, "{msg}");
    let (got, msg) = code(
        ctl.controller_publish_volume(publish("worker-3", &cap(Mode::MultiNodeMultiWriter, false)))
            .await,
    );
    assert_eq!(got, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("raw block"), "{msg}");

    ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: "worker-2".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(nodes(get(&mut ctl, &v.volume_id).await).is_empty());

    // Published first for one node (a single-node mode): a multi-node publish cannot add another node to it.
    ctl.controller_publish_volume(publish("worker-1", &cap(Mode::SingleNodeWriter, true)))
        .await
        .unwrap();
    let (got, msg) = code(
        ctl.controller_publish_volume(publish("worker-2", &shared))
            .await,
    );
    assert_eq!(got, Code::FailedPrecondition, "{msg}");
    assert_eq!(
        nodes(get(&mut ctl, &v.volume_id).await),
        vec!["worker-1".to_string()]
    );
    unpublish_and_delete(&mut ctl, &c, &v.volume_id, "worker-1").await;
}

/// A publish the cluster agent did not finish (it died once the nexus was recorded for the node, and the nexus's
/// engine is away, so the next agent cannot finish it yet) leaves the volume listing no node, while the agent's
/// record still holds the nexus for that node. ControllerUnpublishVolume from that node must reach the agent all the
/// same: otherwise, once the engine is back, the agent finishes the publish and the volume stays exported to a node
/// the CO let go of (and cannot go to another one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_publish_is_undone_by_unpublishing_its_node() {
    let mut c = Cluster::start(1).await;
    let mut ctl = c.controller().await;
    let v = ctl
        .create_volume(create("pvc-unfinished", 8 * MIB, &[("repl", "1")]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let publish = |node: &str| ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: node.into(),
        volume_capability: Some(cap(Mode::SingleNodeWriter, false)),
        ..Default::default()
    };
    let nodes = |g: ControllerGetVolumeResponse| g.status.unwrap().published_node_ids;

    c.restart_agent("agent-armed", "publish.nexus-recorded=return")
        .await;
    c.wait_online(1).await;
    let r = ctl.controller_publish_volume(publish("worker-1")).await;
    assert!(r.is_err(), "the publish went through: {r:?}");
    c.agent
        .wait_for_log(
            "failpoint publish.nexus-recorded: killing the agent",
            Duration::from_secs(20),
        )
        .unwrap();
    c.pause_engine(0, true);
    c.restart_agent("agent-after", "").await;
    let t = Instant::now();
    while c
        .nodes()
        .await
        .iter()
        .any(|n| n.state == pb::NodeState::Online as i32)
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the paused engine's node stays Online"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(nodes(get(&mut ctl, &v.volume_id).await).is_empty());
    ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: "worker-1".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // The engine back: the agent heals what its record holds (a few sweeps), and worker-1 is not in it.
    c.pause_engine(0, false);
    c.wait_online(1).await;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let got = nodes(get(&mut ctl, &v.volume_id).await);
        assert!(
            got.is_empty(),
            "published to {got:?} after ControllerUnpublishVolume"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Free for another node (single-node: it could not go while worker-1 held it).
    let ctx = ctl
        .controller_publish_volume(publish("worker-2"))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["hostNqn"], "nqn.2026-11.io.keelson:host-worker-2");
    unpublish_and_delete(&mut ctl, &c, &v.volume_id, "worker-2").await;
}

/// Unpublishes volume `id` from `node`, deletes it, and waits until no pool holds anything.
async fn unpublish_and_delete(
    ctl: &mut ControllerClient<Channel>,
    c: &Cluster,
    id: &str,
    node: &str,
) {
    crate::harness::unpublish(ctl, id, node).await;
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    crate::harness::pools_empty(c).await;
}

pub async fn get(ctl: &mut ControllerClient<Channel>, id: &str) -> ControllerGetVolumeResponse {
    ctl.controller_get_volume(ControllerGetVolumeRequest {
        volume_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_capacity_topology_and_condition() {
    let mut c = Cluster::start(3).await;
    let mut ctl = c.controller().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let v = ctl
            .create_volume(create(&format!("pvc-{i}"), 4 * MIB, &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        ids.push(v.volume_id);
    }
    // Pages of two: every volume once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = ctl
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    let (got, _) = code(
        ctl.list_volumes(ListVolumesRequest {
            max_entries: 2,
            starting_token: "not-a-token".into(),
        })
        .await,
    );
    assert_eq!(got, Code::Aborted);
    let (got, _) = code(
        ctl.list_volumes(ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await,
    );
    assert_eq!(got, Code::InvalidArgument);

    // Capacity: by replica count, by topology segment.
    let capacity = |p: &[(&str, &str)], node: Option<&str>| GetCapacityRequest {
        parameters: params(p),
        accessible_topology: node.map(|n| Topology {
            segments: [("topology.keelson.io/node".to_string(), n.to_string())].into(),
        }),
        ..Default::default()
    };
    let one = ctl
        .get_capacity(capacity(&[], None))
        .await
        .unwrap()
        .into_inner();
    let three = ctl
        .get_capacity(capacity(&[("repl", "3")], None))
        .await
        .unwrap()
        .into_inner();
    let node1 = ctl
        .get_capacity(capacity(&[], Some("csi-1")))
        .await
        .unwrap()
        .into_inner();
    println!("capacity: 1 replica {one:?}, 3 replicas {three:?}, csi-1 {node1:?}");
    assert!(one.available_capacity > 0);
    assert!(three.available_capacity * 2 < one.available_capacity);
    // A volume is reachable from every node: a segment has what the cluster has (asked again until no heartbeat
    // changed the figures between the asks: the volumes above were just made).
    let t = std::time::Instant::now();
    loop {
        let ask = |node: Option<&'static str>| {
            let mut ctl = ctl.clone();
            async move {
                ctl.get_capacity(capacity(&[], node))
                    .await
                    .unwrap()
                    .into_inner()
                    .available_capacity
            }
        };
        let (before, node1, nowhere, after) = (
            ask(None).await,
            ask(Some("csi-1")).await,
            ask(Some("no-such-node")).await,
            ask(None).await,
        );
        if before == after || t.elapsed() > std::time::Duration::from_secs(20) {
            assert_eq!((node1, nowhere), (before, before));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(one.maximum_volume_size.unwrap() >= three.maximum_volume_size.unwrap());
    let (got, msg) = code(ctl.get_capacity(capacity(&[("zone", "a")], None)).await);
    assert_eq!(got, Code::InvalidArgument, "{msg}");

    // Accessibility requirements say where the volume must be reachable from, not where its replicas go: a
    // requisite naming one node, or one no pool is on, is met (every node reaches it), and a retry whose requisite
    // names other nodes (the provisioner lists the nodes of the moment) is the same volume.
    let on = |name: &str, nodes: &[&str]| {
        let mut r = create(name, 4 * MIB, &[]);
        r.accessibility_requirements = Some(TopologyRequirement {
            requisite: nodes
                .iter()
                .map(|n| Topology {
                    segments: [("topology.keelson.io/node".to_string(), n.to_string())].into(),
                })
                .collect(),
            preferred: vec![],
        });
        r
    };
    let v = ctl
        .create_volume(on("pvc-reachable", &["gone"]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(v.accessible_topology.is_empty(), "{v:?}");
    let again = ctl
        .create_volume(on("pvc-reachable", &["csi-2", "worker-1"]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    let mut cl = c.cluster().await;

    // Volume condition: a published 3-replica volume whose replica's node dies is abnormal (Degraded).
    let v3 = ctl
        .create_volume(create("pvc-three", 4 * MIB, &[("repl", "3")]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let _ns = crate::harness::attach(&mut ctl, &v3.volume_id, "worker-1").await;
    let cv = cl
        .get_volume(pb::GetVolumeRequest {
            uuid: v3.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let victim = cv
        .replica_list
        .iter()
        .map(|r| r.node.clone())
        .find(|n| *n != cv.nexus_node)
        .unwrap();
    let i: usize = victim.trim_start_matches("csi-").parse().unwrap();
    drop(c.engines.remove(i - 1));
    // No I/O: the agent sees the node go Offline before the nexus would (at its next write to that replica).
    let t = Instant::now();
    loop {
        let st = get(&mut ctl, &v3.volume_id).await.status.unwrap();
        let cond = st.volume_condition.unwrap();
        if cond.abnormal {
            println!("condition after the kill of {victim}: {}", cond.message);
            assert!(
                cond.message.contains("Degraded") && cond.message.contains(&victim),
                "{}",
                cond.message
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never abnormal: {cond:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
