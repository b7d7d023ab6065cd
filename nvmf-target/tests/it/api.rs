//! The engine gRPC API: idempotent creates, precise error codes, run-time changes.

use proto::engine as pb;
use proto::engine::engine_client::EngineClient;
use tonic::Code;
use tonic::transport::Channel;

use nvmf_target::engine::{Engine, EngineConfig};
use nvmf_target::target::TargetConfig;

const NQN: &str = "nqn.2026-11.io.keelson:vol-00000000-0000-4000-8000-0000000000bb";

async fn start() -> (EngineClient<Channel>, Engine) {
    let engine = Engine::new(EngineConfig {
        node_name: "t".into(),
        target: TargetConfig::default(),
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(nvmf_target::api::serve_on(
        engine.clone(),
        l,
        Default::default(),
    ));
    let c = EngineClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (c, engine)
}

fn mem_ns(nqn: &str, size: u64) -> pb::AddNamespaceRequest {
    pb::AddNamespaceRequest {
        nqn: nqn.into(),
        backend: Some(pb::Backend {
            kind: Some(pb::backend::Kind::Memory(pb::MemoryBackend {
                size_bytes: size,
            })),
            block_size: 512,
        }),
        ..Default::default()
    }
}

fn sub(nqn: &str) -> pb::CreateSubsystemRequest {
    pb::CreateSubsystemRequest {
        nqn: nqn.into(),
        allow_any_host: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn creates_are_idempotent_and_conflicts_are_already_exists() {
    let (mut c, _) = start().await;
    let a = c.create_subsystem(sub(NQN)).await.unwrap().into_inner();
    let b = c.create_subsystem(sub(NQN)).await.unwrap().into_inner();
    assert_eq!(a, b);
    let mut other = sub(NQN);
    other.allow_any_host = false;
    assert_eq!(
        c.create_subsystem(other).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    let mut ns = mem_ns(NQN, 1 << 20);
    ns.nsid = 1;
    ns.uuid = "5f0c1a9e-0000-4000-8000-000000000001".into();
    c.add_namespace(ns.clone()).await.unwrap();
    let again = c.add_namespace(ns.clone()).await.unwrap().into_inner();
    assert_eq!(again.namespaces.len(), 1);
    ns.backend = mem_ns(NQN, 2 << 20).backend;
    assert_eq!(
        c.add_namespace(ns).await.unwrap_err().code(),
        Code::AlreadyExists
    );
}

#[tokio::test]
async fn bad_arguments_are_invalid_argument() {
    let (mut c, _) = start().await;
    assert_eq!(
        c.create_subsystem(sub("not-an-nqn"))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.create_subsystem(sub("nqn.2014-08.org.nvmexpress.discovery"))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    c.create_subsystem(sub(NQN)).await.unwrap();
    assert_eq!(
        c.add_namespace(mem_ns(NQN, 0)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // Larger than the machine's memory (its chunk table alone would abort the engine): refused, and the engine
    // still answers.
    assert_eq!(
        c.add_namespace(mem_ns(NQN, 1 << 60))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    c.list_subsystems(pb::ListSubsystemsRequest {})
        .await
        .unwrap();
    let mut ns = mem_ns(NQN, 1 << 20);
    ns.backend.as_mut().unwrap().block_size = 1000;
    assert_eq!(
        c.add_namespace(ns).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut ns = mem_ns(NQN, 1 << 20);
    ns.uuid = "zzz".into();
    assert_eq!(
        c.add_namespace(ns).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut ns = mem_ns(NQN, 1 << 20);
    ns.ana_group = 1000;
    assert_eq!(
        c.add_namespace(ns).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut ns = mem_ns(NQN, 1 << 20);
    ns.backend = None;
    assert_eq!(
        c.add_namespace(ns).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let r = pb::AddListenerRequest {
        address: "nowhere".into(),
        port_id: 0,
    };
    assert_eq!(
        c.add_listener(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let r = pb::SetAnaStateRequest {
        port_id: 1,
        ana_group: 1,
        state: 99,
    };
    assert_eq!(
        c.set_ana_state(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let r = pb::HostRequest {
        nqn: NQN.into(),
        host_nqn: "bad host".into(),
    };
    assert_eq!(
        c.allow_host(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn unknown_objects_are_not_found() {
    let (mut c, _) = start().await;
    assert_eq!(
        c.add_namespace(mem_ns(NQN, 1 << 20))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let r = pb::DeleteSubsystemRequest { nqn: NQN.into() };
    assert_eq!(
        c.delete_subsystem(r).await.unwrap_err().code(),
        Code::NotFound
    );
    c.create_subsystem(sub(NQN)).await.unwrap();
    let r = pb::RemoveNamespaceRequest {
        nqn: NQN.into(),
        nsid: 5,
    };
    assert_eq!(
        c.remove_namespace(r).await.unwrap_err().code(),
        Code::NotFound
    );
    let r = pb::RemoveListenerRequest { port_id: 42 };
    assert_eq!(
        c.remove_listener(r).await.unwrap_err().code(),
        Code::NotFound
    );
    let r = pb::SetAnaStateRequest {
        port_id: 42,
        ana_group: 1,
        state: pb::AnaState::Inaccessible as i32,
    };
    assert_eq!(c.set_ana_state(r).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn a_file_backend_that_cannot_open_is_failed_precondition() {
    let (mut c, _) = start().await;
    c.create_subsystem(sub(NQN)).await.unwrap();
    let r = pb::AddNamespaceRequest {
        nqn: NQN.into(),
        backend: Some(pb::Backend {
            kind: Some(pb::backend::Kind::File(pb::FileBackend {
                path: "/nonexistent/dir/x".into(),
                size_bytes: 0,
                direct: false,
            })),
            block_size: 512,
        }),
        ..Default::default()
    };
    let e = c.add_namespace(r).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let s = c
        .list_subsystems(pb::ListSubsystemsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(s.subsystems[0].namespaces.is_empty(), "nothing changed");
}

#[tokio::test]
async fn listeners_hosts_and_ana_change_at_run_time() {
    let (mut c, engine) = start().await;
    let l = c
        .add_listener(pb::AddListenerRequest {
            address: "127.0.0.1:0".into(),
            port_id: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.port_id, 1);
    let node = c
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.listeners, vec![l.clone()]);
    c.create_subsystem(pb::CreateSubsystemRequest {
        nqn: NQN.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let s = c
        .allow_host(pb::HostRequest {
            nqn: NQN.into(),
            host_nqn: "nqn.2014-08.org.nvmexpress:uuid:h".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.allowed_hosts, vec!["nqn.2014-08.org.nvmexpress:uuid:h"]);
    c.set_ana_state(pb::SetAnaStateRequest {
        port_id: 1,
        ana_group: 1,
        state: pb::AnaState::Inaccessible as i32,
    })
    .await
    .unwrap();
    assert_eq!(
        engine.target().ana_state(1, 1),
        nvmf_target::protocol::log::AnaState::Inaccessible
    );
    c.remove_listener(pb::RemoveListenerRequest { port_id: 1 })
        .await
        .unwrap();
    assert!(
        c.list_listeners(pb::ListListenersRequest {})
            .await
            .unwrap()
            .into_inner()
            .listeners
            .is_empty()
    );
}

/// A published nexus's subsystem is made, unmade and given namespaces only through the nexus's calls: the generic
/// calls that would are FAILED_PRECONDITION, and the nexus is destroyed as usual. Before, DeleteSubsystem took it away behind the nexus's
/// back, and DestroyNexus then answered NOT_FOUND (which the agent takes for "gone") and left the nexus listed.
#[tokio::test]
async fn a_nexus_subsystem_is_not_changed_through_the_generic_calls() {
    let (mut c, _) = start().await;
    let child = "nqn.2026-11.io.keelson:replica-managed-1";
    c.create_subsystem(sub(child)).await.unwrap();
    c.add_namespace(mem_ns(child, 1 << 20)).await.unwrap();
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_nexus(pb::CreateNexusRequest {
        uuid: vol.clone(),
        children: vec![format!("local:///{child}?nsid=1")],
        ..Default::default()
    })
    .await
    .unwrap();
    c.publish_nexus(pb::PublishNexusRequest {
        uuid: vol.clone(),
        ana_group: 1,
        allow_any_host: true,
        allowed_hosts: vec![],
    })
    .await
    .unwrap();
    let nqn = format!("nqn.2026-11.io.keelson:vol-{vol}");
    let refused = c
        .delete_subsystem(pb::DeleteSubsystemRequest { nqn: nqn.clone() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        c.remove_namespace(pb::RemoveNamespaceRequest {
            nqn: nqn.clone(),
            nsid: 1
        })
        .await
        .unwrap_err()
        .code(),
        Code::FailedPrecondition
    );
    // Its hosts are the caller's to change (the cluster agent adds a volume's further hosts so).
    c.allow_host(pb::HostRequest {
        nqn: nqn.clone(),
        host_nqn: "nqn.2026-11.io.keelson:host-x".into(),
    })
    .await
    .unwrap();
    c.destroy_nexus(pb::DestroyNexusRequest { uuid: vol.clone() })
        .await
        .unwrap();
    let left = c
        .list_nexuses(pb::ListNexusesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nexuses;
    assert!(left.is_empty(), "{left:?}");
    // Not the engine's any more: the generic calls are the caller's again.
    c.create_subsystem(sub(&nqn)).await.unwrap();
    c.delete_subsystem(pb::DeleteSubsystemRequest { nqn })
        .await
        .unwrap();
}
