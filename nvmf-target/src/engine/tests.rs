//! The engine: which nexuses a shutdown ended cleanly, and creates or publishes of the same nexus at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::block::BlockDevice;
use crate::block::fault::FaultPlan;
use crate::config::ExportSpec;
use crate::engine::nexus::NexusOptions;

/// An agent that never answers: a child fault waits for its consent until the nexus shuts down.
#[derive(Debug)]
struct Silent;

#[async_trait::async_trait]
impl FaultConfirmer for Silent {
    async fn confirm(&self, _: uuid::Uuid, _: u64, _: &str, _: &str) -> Result<(), String> {
        std::future::pending().await
    }
}

/// Two RAM namespaces of this engine with fault injection, as `local://` child URIs.
fn children(engine: &Engine, name: &str) -> Vec<String> {
    (1..=2)
        .map(|i| {
            let nqn = format!("nqn.2026-11.io.keelson:replica-{name}-{i}");
            engine
                .export(&ExportSpec {
                    nqn: nqn.clone(),
                    memory: Some(1 << 20),
                    fault: true,
                    ..Default::default()
                })
                .unwrap();
            format!("local:///{nqn}?nsid=1")
        })
        .collect()
}

/// A nexus whose write one child took and the other failed, waiting for the agent's consent to fault it when the
/// engine shuts down, did not end cleanly; the engine's other nexus did, and the engine says which is which.
#[tokio::test]
async fn a_shutdown_names_the_nexuses_that_did_not_drain() {
    let engine = Engine::new(EngineConfig {
        node_name: "n".into(),
        target: Default::default(),
    });
    engine.set_fault_confirmer(Arc::new(Silent));
    let (torn, drained) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let options = NexusOptions {
        io_timeout: Some(Duration::from_secs(2)),
        confirm_faults: true,
        ..Default::default()
    };
    let a = engine
        .create_nexus(torn, &children(&engine, "a"), options.clone())
        .await
        .unwrap();
    let b = engine
        .create_nexus(drained, &children(&engine, "b"), options.clone())
        .await
        .unwrap();
    let late = children(&engine, "c");
    b.write(0, Bytes::from(vec![1u8; 4096])).await.unwrap();
    engine
        .inject_fault(
            "nqn.2026-11.io.keelson:replica-a-2",
            1,
            Some(FaultPlan {
                fail_ranges: vec![std::ops::Range {
                    start: 0,
                    end: 4096,
                }],
                ..Default::default()
            }),
        )
        .unwrap();
    let w = tokio::spawn(async move { a.write(0, Bytes::from(vec![2u8; 4096])).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!w.is_finished(), "the write waits for the agent's consent");
    assert_eq!(engine.torn_nexuses(), None, "not shut down yet");
    assert!(!engine.shutdown().await);
    assert_eq!(engine.torn_nexuses(), Some(vec![torn]));
    assert!(w.await.unwrap().is_err(), "never acknowledged");
    // Nothing is made once the shutdown began: it would be neither drained nor named.
    match engine
        .create_nexus(uuid::Uuid::new_v4(), &late, options)
        .await
    {
        Err(e) => assert!(e.to_string().contains("shutting down"), "{e}"),
        Ok(_) => panic!("a nexus made after the shutdown began"),
    }
}

/// Two creates of the same nexus at once (a request retried while the first still runs) both get it: the second
/// waits for the first instead of opening the children beside it.
#[tokio::test]
async fn two_creates_of_the_same_nexus_at_once_both_get_it() {
    let engine = Engine::new(EngineConfig {
        node_name: "n".into(),
        target: Default::default(),
    });
    let uuid = uuid::Uuid::new_v4();
    let kids = children(&engine, "d");
    // The first create is still reading its children's records when the second comes.
    engine
        .inject_fault(
            "nqn.2026-11.io.keelson:replica-d-1",
            1,
            Some(FaultPlan {
                latency: Some(Duration::from_millis(200)),
                ..Default::default()
            }),
        )
        .unwrap();
    let options = NexusOptions {
        reservation: Some(ReservationKeys { key: 1, preempt: 0 }),
        ..Default::default()
    };
    let (a, b) = tokio::join!(
        engine.create_nexus(uuid, &kids, options.clone()),
        engine.create_nexus(uuid, &kids, options)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(Arc::ptr_eq(&a, &b), "two nexuses made");
    assert_eq!(engine.nexuses().len(), 1);
}

/// Two publishes of the same nexus at once (a PublishNexus retried while the first still runs) both get its NQN and
/// leave it published. Before, both found it unpublished, the second's namespace clashed with the first's, and the
/// second deleted the subsystem the first had made: the nexus listed as published, no host could reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishes_of_the_same_nexus_at_once_leave_it_published() {
    let engine = Engine::new(EngineConfig {
        node_name: "n".into(),
        target: Default::default(),
    });
    let uuid = uuid::Uuid::new_v4();
    let kids = children(&engine, "e");
    engine
        .create_nexus(uuid, &kids, NexusOptions::default())
        .await
        .unwrap();
    let runtime = tokio::runtime::Handle::current();
    for round in 0..200 {
        let start = std::sync::Barrier::new(2);
        let publish = || {
            let _in = runtime.enter();
            start.wait();
            engine.publish_nexus(&uuid, 1, true, &[])
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(publish);
            let b = s.spawn(publish);
            (a.join().unwrap(), b.join().unwrap())
        });
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, b);
        let sub = engine.target().subsystem(a.as_str());
        assert!(
            sub.is_some_and(|s| s.namespace(1).is_some()),
            "round {round}: the nexus is listed as published but not exported"
        );
        engine.unpublish_nexus(&uuid).unwrap();
    }
}

/// Publishing a published nexus again exports it to the hosts asked for now: a second host of a multi-host publish
/// gets in, one no longer named is let go. Before, the call answered with the existing export unchanged, and the
/// agent, recording the new host list, left the second host refused at every connect.
#[tokio::test]
async fn publishing_again_exports_the_nexus_to_the_hosts_asked_for_now() {
    let engine = Engine::new(EngineConfig {
        node_name: "n".into(),
        target: Default::default(),
    });
    let uuid = uuid::Uuid::new_v4();
    let kids = children(&engine, "f");
    engine
        .create_nexus(uuid, &kids, NexusOptions::default())
        .await
        .unwrap();
    let (a, b) = (
        "nqn.2026-11.io.keelson:host-a".to_string(),
        "nqn.2026-11.io.keelson:host-b".to_string(),
    );
    let nqn = engine
        .publish_nexus(&uuid, 1, false, std::slice::from_ref(&a))
        .unwrap();
    let sub = || engine.target().subsystem(nqn.as_str()).unwrap();
    assert!(sub().host_allowed(&a) && !sub().host_allowed(&b));
    engine
        .publish_nexus(&uuid, 1, false, &[a.clone(), b.clone()])
        .unwrap();
    assert!(
        sub().host_allowed(&a) && sub().host_allowed(&b),
        "the second host is refused"
    );
    engine
        .publish_nexus(&uuid, 1, false, std::slice::from_ref(&b))
        .unwrap();
    assert!(!sub().host_allowed(&a) && sub().host_allowed(&b));
}

/// A file exported with fault injection and then deleted can be exported again: its device goes with its
/// subsystem. Before, the fault-injecting device stayed in the engine's table, keeping the file open and held.
#[tokio::test]
async fn a_deleted_export_lets_go_of_its_file() {
    let engine = Engine::new(EngineConfig {
        node_name: "n".into(),
        target: Default::default(),
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let export = || {
        engine.export(&ExportSpec {
            nqn: "nqn.2026-11.io.keelson:faulty-file".into(),
            file: Some(file.clone()),
            fault: true,
            ..Default::default()
        })
    };
    export().unwrap();
    engine
        .delete_subsystem("nqn.2026-11.io.keelson:faulty-file")
        .unwrap();
    export().unwrap();
}

/// Children naming one namespace twice (the same URI, the same NQN without `?nsid=1`, or under `local://` and
/// `nvmf://` both) and a child that is a volume's own nexus are refused as bad input, before anything is opened:
/// before, a variant URI made one replica two "copies", each open ending the other's connection, and an exact
/// duplicate was ALREADY_EXISTS (which the cluster agent takes for a nexus in the way).
#[tokio::test]
async fn children_naming_one_namespace_twice_or_a_nexus_are_refused() {
    let engine = Engine::new(EngineConfig {
        node_name: "n".into(),
        target: Default::default(),
    });
    let kids = children(&engine, "dup");
    let same = kids[0].trim_end_matches("?nsid=1").to_string();
    let remote = format!(
        "nvmf://127.0.0.1:4420/{}",
        same.trim_start_matches("local:///")
    );
    let uuid = uuid::Uuid::new_v4();
    for bad in [
        vec![kids[0].clone(), kids[0].clone()],
        vec![kids[0].clone(), same.clone()],
        vec![kids[0].clone(), remote.clone()],
        vec![
            kids[0].clone(),
            format!(
                "local:///{}",
                crate::protocol::nqn::Nqn::volume(&uuid::Uuid::new_v4())
            ),
        ],
    ] {
        let e = engine
            .create_nexus(uuid, &bad, NexusOptions::default())
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(e, EngineError::InvalidArgument(_)),
            "{bad:?}: {e:?}"
        );
    }
    engine
        .create_nexus(uuid, &kids, NexusOptions::default())
        .await
        .unwrap();
    let e = engine.add_child(&uuid, &same).await.expect_err("refused");
    assert!(matches!(e, EngineError::InvalidArgument(_)), "{e:?}");
    assert_eq!(engine.nexus(&uuid).unwrap().0.children().len(), 2);
}
