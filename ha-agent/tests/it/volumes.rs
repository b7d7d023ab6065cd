//! Volumes through the cluster agent with real io-engines: placed all or nothing on distinct nodes, created,
//! published as a nexus the test's NVMe/TCP initiator writes through, unpublished and deleted with nothing left
//! behind; bad requests get precise codes.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use nvmf_target::block::BlockDevice;
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use proto::cluster as pb;
use proto::cluster::cluster_client::ClusterClient;
use proto::engine as epb;
use proto::engine::engine_client::EngineClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::registry::{Online, agent, engine_with, free_port, three_nodes, volume_now, wait_for};

const MIB: u64 = 1 << 20;
const HOST: &str = "nqn.2026-11.io.keelson:test-app-host";

/// Every replica on every engine of the cluster, by UUID.
async fn replicas_everywhere(nodes: &[pb::Node]) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for n in nodes {
        let mut e = EngineClient::connect(n.engine_endpoint.clone())
            .await
            .unwrap();
        let r = e
            .list_replicas(epb::ListReplicasRequest {})
            .await
            .unwrap()
            .into_inner();
        all.extend(r.replicas.into_iter().map(|r| r.uuid));
    }
    all
}

fn create(uuid: &str, size: u64, replicas: u32) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        uuid: uuid.into(),
        size_bytes: size,
        replicas,
        ..Default::default()
    }
}

async fn code_of<T>(
    r: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Code {
    match r.await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_is_placed_on_distinct_nodes_published_written_and_deleted_without_leftovers() {
    let (_dir, _port, _agent, _engines, nodes, mut c) = three_nodes().await;

    // Bad requests first: precise codes, nothing created.
    let vol = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        code_of(c.create_volume(create(&vol, 0, 3))).await,
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.create_volume(create(&vol, 1000, 3))).await,
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.create_volume(create(&vol, 32 * MIB, 0))).await,
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.create_volume(create("not-a-uuid", 32 * MIB, 1))).await,
        Code::InvalidArgument
    );
    let e = c
        .create_volume(create(&vol, 32 * MIB, 4))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("4 replicas") && e.message().contains("3 found"),
        "{}",
        e.message()
    );
    let e = c.create_volume(create(&vol, 1 << 40, 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // A cordoned node takes no new replica: three replicas no longer fit three nodes until it is uncordoned.
    let n = c
        .cordon_node(pb::CordonNodeRequest {
            name: "reg-3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(n.cordoned);
    let e = c
        .create_volume(create(&vol, 32 * MIB, 3))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("reg-3 is cordoned"), "{}", e.message());
    let n = c
        .uncordon_node(pb::CordonNodeRequest {
            name: "reg-3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!n.cordoned);
    assert_eq!(
        code_of(c.cordon_node(pb::CordonNodeRequest {
            name: "nobody".into()
        }))
        .await,
        Code::NotFound
    );
    assert!(
        replicas_everywhere(&nodes).await.is_empty(),
        "a refused volume left replicas behind"
    );
    assert!(
        c.list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes
            .is_empty()
    );

    // Three replicas, each on its own node, confirmed by every engine; the same request again changes nothing.
    let v = c
        .create_volume(create(&vol, 32 * MIB, 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.phase, pb::VolumePhase::Created as i32);
    let on: BTreeSet<_> = v.replica_list.iter().map(|r| r.node.clone()).collect();
    assert_eq!(on.len(), 3, "{v:?}");
    let ids: BTreeSet<_> = v.replica_list.iter().map(|r| r.uuid.clone()).collect();
    assert_eq!(replicas_everywhere(&nodes).await, ids);
    let again = c
        .create_volume(create(&vol, 32 * MIB, 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.replica_list, v.replica_list);
    assert_eq!(
        code_of(c.create_volume(create(&vol, 16 * MIB, 3))).await,
        Code::AlreadyExists
    );
    assert_eq!(v.state, "Online");

    // Published with its nexus on the node asked for; the host writes and reads through it.
    let publish = |host: &str| pb::PublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: host.into(),
        node: "reg-2".into(),
        multi_host: false,
        require_known_node: false,
    };
    let p = c.publish_volume(publish(HOST)).await.unwrap().into_inner();
    assert_eq!(p.nexus_node, "reg-2");
    assert_eq!(p.nqn, format!("nqn.2026-11.io.keelson:vol-{vol}"));
    assert_eq!(p.target_addresses.len(), 1);
    assert_eq!(p.state, "Online");
    let mut o = ConnectOptions::new(p.target_addresses[0].parse().unwrap(), &p.nqn);
    o.hostnqn = HOST.into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    assert_eq!(ns.size_bytes(), 32 * MIB);
    let data = Bytes::from((0..MIB).map(|i| (i / 4096) as u8 | 1).collect::<Vec<u8>>());
    ns.write(8 * MIB, data.clone()).await.unwrap();
    assert_eq!(ns.read(8 * MIB, MIB).await.unwrap(), data);
    ns.close().await;
    // The data is on every replica: read each one directly, as the nexus's node (the host they are shared with).
    for r in &v.replica_list {
        let node = nodes.iter().find(|n| n.name == r.node).unwrap();
        let addr = node.nvmf_listeners[0].parse().unwrap();
        let mut o = ConnectOptions::new(addr, &proto::names::replica_nqn(&r.uuid));
        crate::registry::as_node(&mut o, "reg-2");
        let rep = RemoteNamespace::connect(o, 1).await.unwrap();
        assert_eq!(
            rep.read(8 * MIB, MIB).await.unwrap(),
            data,
            "replica on {}",
            r.node
        );
        rep.close().await;
    }
    assert_eq!(
        c.publish_volume(publish(HOST))
            .await
            .unwrap()
            .into_inner()
            .nexus_node,
        "reg-2"
    );
    assert_eq!(
        code_of(c.publish_volume(publish("nqn.2026-11.io.keelson:other"))).await,
        Code::FailedPrecondition
    );
    assert_eq!(
        code_of(c.publish_volume(publish("not an nqn"))).await,
        Code::InvalidArgument
    );

    // Listing a page at a time: five volumes in pages of two, each once, in UUID order; a bad token is ABORTED.
    let more: Vec<String> = (0..4).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    for m in &more {
        c.create_volume(create(m, 4 * MIB, 1)).await.unwrap();
    }
    let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let r = c
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 2,
                starting_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.volumes.len() <= 2);
        seen.extend(r.volumes.into_iter().map(|v| v.uuid));
        pages += 1;
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    let mut want: Vec<String> = more.iter().cloned().chain([vol.clone()]).collect();
    want.sort();
    assert_eq!((seen, pages), (want, 3));
    assert_eq!(
        code_of(c.list_volumes(pb::ListVolumesRequest {
            max_entries: 2,
            starting_token: "garbage".into(),
        }))
        .await,
        Code::Aborted
    );
    for m in &more {
        c.delete_volume(pb::DeleteVolumeRequest { uuid: m.clone() })
            .await
            .unwrap();
    }

    // Unpublished, then deleted: nothing left on any engine; then it is gone for every call.
    let u = c
        .unpublish_volume(pb::UnpublishVolumeRequest {
            uuid: vol.clone(),
            host_nqn: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u.nqn.is_empty());
    c.delete_volume(pb::DeleteVolumeRequest { uuid: vol.clone() })
        .await
        .unwrap();
    assert!(replicas_everywhere(&nodes).await.is_empty());
    for n in &nodes {
        let mut e = EngineClient::connect(n.engine_endpoint.clone())
            .await
            .unwrap();
        assert!(
            e.list_nexuses(epb::ListNexusesRequest {})
                .await
                .unwrap()
                .into_inner()
                .nexuses
                .is_empty()
        );
    }
    assert_eq!(
        code_of(c.get_volume(pb::GetVolumeRequest { uuid: vol.clone() })).await,
        Code::NotFound
    );
    assert_eq!(
        code_of(c.delete_volume(pb::DeleteVolumeRequest { uuid: vol.clone() })).await,
        Code::NotFound
    );
    assert_eq!(
        code_of(c.publish_volume(publish(HOST))).await,
        Code::NotFound
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Everything killed (-9) and restarted on the same disks and store: the volume is still there, publishing it
/// again makes a new nexus (fencing the dead one's key), and every acknowledged write reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_every_process_is_killed_the_volume_comes_back_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port("127.0.0.1");
    let mut agent = agent(dir.path(), port);
    let url = format!("http://127.0.0.1:{port}");
    let mut engines: Vec<_> = (1..=3).map(|i| engine_with(dir.path(), i, &url)).collect();
    let all_online = [("reg-1", Online), ("reg-2", Online), ("reg-3", Online)];
    wait_for(port, &all_online, "registration").await;
    let mut c: ClusterClient<Channel> = ClusterClient::connect(url.clone()).await.unwrap();
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(create(&vol, 16 * MIB, 3)).await.unwrap();
    let publish = pb::PublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: HOST.into(),
        node: String::new(),
        multi_host: false,
        require_known_node: false,
    };
    let p = c
        .publish_volume(publish.clone())
        .await
        .unwrap()
        .into_inner();
    let connect = |p: &pb::Volume| {
        let mut o = ConnectOptions::new(p.target_addresses[0].parse().unwrap(), &p.nqn);
        o.hostnqn = HOST.into();
        RemoteNamespace::connect(o, 1)
    };
    let ns = connect(&p).await.unwrap();
    let data = Bytes::from(vec![0x3c; 256 << 10]);
    for i in 0..8u64 {
        ns.write(i * MIB, data.clone()).await.unwrap();
    }
    ns.flush().await.unwrap();
    drop(ns);

    agent.kill9();
    for e in &mut engines {
        e.kill9();
    }
    agent.restart();
    for e in &mut engines {
        e.restart();
    }
    let mut c: ClusterClient<Channel> = loop {
        if let Ok(c) = ClusterClient::connect(url.clone()).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The restarted engines register again (new instances) before the nexus can be made.
    let t = std::time::Instant::now();
    loop {
        if let Ok(r) = c.publish_volume(publish.clone()).await {
            let p = r.into_inner();
            let ns = connect(&p).await.unwrap();
            for i in 0..8u64 {
                assert_eq!(
                    ns.read(i * MIB, 256 << 10).await.unwrap(),
                    data,
                    "write {i} lost"
                );
            }
            ns.close().await;
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the volume never published again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Everything was killed, so the new nexus resyncs the replicas from one: Online once that is done.
    let t = std::time::Instant::now();
    loop {
        let v = c
            .get_volume(pb::GetVolumeRequest { uuid: vol.clone() })
            .await
            .unwrap()
            .into_inner();
        if v.state == "Online" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{v:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Node labels decide placement: a node selector keeps replicas on the nodes carrying its labels, topology
/// segments on nodes matching one of them; too few such nodes is RESOURCE_EXHAUSTED saying which nodes were left
/// out and why, and nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_selectors_and_topology_decide_where_replicas_go() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port("127.0.0.1");
    let _agent = agent(dir.path(), port);
    let url = format!("http://127.0.0.1:{port}");
    let zones = ["a", "a", "b"];
    let _engines: Vec<_> = (1..=3u32)
        .map(|i| {
            let disk = dir.path().join(format!("pool{i}.img"));
            std::fs::File::create(&disk)
                .unwrap()
                .set_len(64 << 20)
                .unwrap();
            let grpc = free_port(&format!("127.0.0.{i}"));
            let mut extra = vec![
                "--pool".to_string(),
                format!("pool{i}={}", disk.display()),
                "--node-label".to_string(),
                format!("zone={}", zones[i as usize - 1]),
            ];
            if i == 3 {
                extra.extend(["--pool-label".to_string(), "pool3:media=ssd".to_string()]);
            }
            crate::registry::engine_cmd(dir.path(), i, &url, grpc, &extra)
        })
        .collect();
    let (nodes, _) = wait_for(
        port,
        &[("reg-1", Online), ("reg-2", Online), ("reg-3", Online)],
        "registration",
    )
    .await;
    assert_eq!(
        nodes.iter().find(|n| n.name == "reg-3").unwrap().labels["zone"],
        "b"
    );
    let mut c: ClusterClient<Channel> = ClusterClient::connect(url).await.unwrap();
    let zone = |z: &str| [("zone".to_string(), z.to_string())].into_iter().collect();
    let vol = uuid::Uuid::new_v4().to_string();
    let v = c
        .create_volume(pb::CreateVolumeRequest {
            node_selector: zone("a"),
            ..create(&vol, 4 * MIB, 2)
        })
        .await
        .unwrap()
        .into_inner();
    let mut on: Vec<_> = v.replica_list.iter().map(|r| r.node.clone()).collect();
    on.sort();
    assert_eq!(on, ["reg-1", "reg-2"]);
    assert_eq!(v.node_selector, zone("a"));
    // Same id, other placement: ALREADY_EXISTS.
    assert_eq!(
        code_of(c.create_volume(pb::CreateVolumeRequest {
            node_selector: zone("b"),
            ..create(&vol, 4 * MIB, 2)
        }))
        .await,
        Code::AlreadyExists
    );
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            node_selector: zone("b"),
            ..create(&uuid::Uuid::new_v4().to_string(), 4 * MIB, 2)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message()
            .contains("reg-1 lacks the node selector's label zone=b"),
        "{}",
        e.message()
    );
    let topo = c
        .create_volume(pb::CreateVolumeRequest {
            topology: vec![pb::TopologySegment { labels: zone("b") }],
            ..create(&uuid::Uuid::new_v4().to_string(), 4 * MIB, 1)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(topo.replica_list[0].node, "reg-3");
    // A pool selector: only pool3 is labelled media=ssd.
    let ssd = c
        .create_volume(pb::CreateVolumeRequest {
            pool_selector: [("media".to_string(), "ssd".to_string())]
                .into_iter()
                .collect(),
            ..create(&uuid::Uuid::new_v4().to_string(), 4 * MIB, 1)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ssd.replica_list[0].pool, "pool3");
    c.delete_volume(pb::DeleteVolumeRequest {
        uuid: ssd.uuid.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        replicas_everywhere(&nodes).await.len(),
        3,
        "the refused volume created nothing"
    );

    // Capacity by placement: zone a has two nodes, so 2 copies fit there and 3 do not.
    let cap = |sel: &str, replicas: u32| pb::GetCapacityRequest {
        node_selector: zone(sel),
        replicas,
        ..Default::default()
    };
    let a2 = c.get_capacity(cap("a", 2)).await.unwrap().into_inner();
    let a3 = c.get_capacity(cap("a", 3)).await.unwrap().into_inner();
    let b1 = c.get_capacity(cap("b", 1)).await.unwrap().into_inner();
    assert!(
        a2.maximum_volume_size > 0 && a3.maximum_volume_size == 0,
        "{a2:?} {a3:?}"
    );
    // Once the engines' heartbeats carry the new replicas: all the pools' bytes less three 4 MiB replicas.
    let want = nodes
        .iter()
        .flat_map(|n| &n.pools)
        .map(|p| p.capacity)
        .sum::<u64>()
        - 3 * 4 * MIB;
    let t = std::time::Instant::now();
    loop {
        let all = c
            .get_capacity(pb::GetCapacityRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(b1.available_bytes > 0 && b1.available_bytes < all.available_bytes);
        if all.available_bytes == want {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{all:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A raw block volume several nodes write at once (a virtual machine's disk during live migration): published to a
/// second host only when both publications ask for it (`multi_host`), both hosts write through the one nexus and see each other's
/// writes; unpublished one host at a time, the other keeps it; the last takes the nexus with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_published_to_two_hosts_takes_writes_from_both_and_leaves_them_one_at_a_time() {
    let (_dir, _port, _agent, _engines, _nodes, mut c) = three_nodes().await;
    const A: &str = "nqn.2026-11.io.keelson:host-a";
    const B: &str = "nqn.2026-11.io.keelson:host-b";
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(create(&vol, 8 * MIB, 2)).await.unwrap();
    let publish = |host: &str, multi_host: bool| pb::PublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: host.into(),
        node: String::new(),
        multi_host,
        require_known_node: false,
    };
    let unpublish = |host: &str| pb::UnpublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: host.into(),
    };
    let a = c
        .publish_volume(publish(A, true))
        .await
        .unwrap()
        .into_inner();
    let e = c.publish_volume(publish(B, false)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let b = c
        .publish_volume(publish(B, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.host_nqns, vec![A.to_string(), B.to_string()]);
    assert_eq!((&b.nqn, &b.target_addresses), (&a.nqn, &a.target_addresses));
    // Again: the same answer, nothing added.
    let again = c
        .publish_volume(publish(B, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.host_nqns, b.host_nqns);

    let connect = |host: &str| {
        let mut o = ConnectOptions::new(a.target_addresses[0].parse().unwrap(), &a.nqn);
        o.hostnqn = host.into();
        async move { RemoteNamespace::connect(o, 1).await }
    };
    let (na, nb) = (connect(A).await.unwrap(), connect(B).await.unwrap());
    let block = |b: u8| Bytes::from(vec![b; 4096]);
    na.write(0, block(1)).await.unwrap();
    nb.write(4096, block(2)).await.unwrap();
    assert_eq!(nb.read(0, 4096).await.unwrap(), block(1));
    assert_eq!(na.read(4096, 4096).await.unwrap(), block(2));
    nb.close().await;

    // B leaves: A keeps the volume, B can no longer connect; a host it never had changes nothing.
    let v = c.unpublish_volume(unpublish(B)).await.unwrap().into_inner();
    assert_eq!(v.host_nqns, vec![A.to_string()]);
    assert!(
        connect(B).await.is_err(),
        "a host unpublished still connects"
    );
    let v = c
        .unpublish_volume(unpublish("nqn.2026-11.io.keelson:host-never"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.host_nqns, vec![A.to_string()]);
    na.write(8192, block(3)).await.unwrap();

    // B back, then A leaves: B is the volume's host now, on the same nexus.
    c.publish_volume(publish(B, true)).await.unwrap();
    na.close().await;
    let v = c.unpublish_volume(unpublish(A)).await.unwrap().into_inner();
    assert_eq!(
        (v.host_nqn.as_str(), v.nexus_node.as_str()),
        (B, a.nexus_node.as_str())
    );
    let nb = connect(B).await.unwrap();
    assert_eq!(nb.read(8192, 4096).await.unwrap(), block(3));
    nb.close().await;
    // The last host: the nexus goes.
    let v = c.unpublish_volume(unpublish(B)).await.unwrap().into_inner();
    assert!(v.host_nqns.is_empty() && v.nexus_node.is_empty(), "{v:?}");
    c.delete_volume(pb::DeleteVolumeRequest { uuid: vol.clone() })
        .await
        .unwrap();
}

/// Volumes created at once (a StatefulSet's claims) do not all take one pool's room: each placement sees the ones
/// before it, though no heartbeat has brought the pools' new figures yet. Three 56 MiB pools take three 40 MiB
/// volumes, one each, and a fourth is refused (RESOURCE_EXHAUSTED); before, all four went on one pool. Then, with
/// the three deleted (and the heartbeats showing it), two more at once go on two pools, and scaling one of them up
/// to three replicas is refused: of the two other nodes, only one has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_created_at_once_do_not_take_one_pools_room_twice() {
    let (_dir, _port, _agent, _engines, nodes, c) = three_nodes().await;
    let at_once = |n: usize| {
        let c = c.clone();
        async move {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let mut c = c.clone();
                    let uuid = uuid::Uuid::new_v4().to_string();
                    tokio::spawn(async move {
                        c.create_volume(create(&uuid, 40 * MIB, 1))
                            .await
                            .map(|r| r.into_inner())
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    let made = at_once(4).await;
    let placed: Vec<_> = made.iter().filter_map(|r| r.as_ref().ok()).collect();
    let refused: Vec<_> = made.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!((placed.len(), refused.len()), (3, 1), "{made:?}");
    assert_eq!(
        refused[0].code(),
        Code::ResourceExhausted,
        "{:?}",
        refused[0]
    );
    let pools: BTreeSet<_> = placed
        .iter()
        .map(|v| v.replica_list[0].node.clone())
        .collect();
    assert_eq!(pools.len(), 3, "one volume per pool: {placed:?}");
    assert_eq!(replicas_everywhere(&nodes).await.len(), 3);
    let mut c2 = c.clone();
    for v in &placed {
        c2.delete_volume(pb::DeleteVolumeRequest {
            uuid: v.uuid.clone(),
        })
        .await
        .unwrap();
    }
    // Their room comes back with the next heartbeats.
    crate::registry::wait_for_committed(&mut c2, 0).await;
    let made = at_once(2).await;
    let nodes_used: BTreeSet<_> = made
        .iter()
        .map(|r| r.as_ref().unwrap().replica_list[0].node.clone())
        .collect();
    assert_eq!(nodes_used.len(), 2, "{made:?}");
    // Three replicas of a 40 MiB volume need 40 MiB on each node: two nodes hold the other volume's.
    let e = c2
        .set_volume_replicas(pb::SetVolumeReplicasRequest {
            uuid: made[0].as_ref().unwrap().uuid.clone(),
            replicas: 3,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

/// An unpublished volume whose in-sync replica on one node cannot be shared (the node came back without its pool's
/// disk) is published all the same, on the other replicas: the nexus is made without that one, which is then out
/// of sync (healing rebuilds or replaces it). Before, the share's failure failed every publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_is_published_without_a_replica_whose_pool_is_away() {
    let (dir, port, _agent, mut engines, _nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(create(&vol, 8 << 20, 3)).await.unwrap();
    engines[1].kill9();
    wait_for(port, &[("reg-2", crate::registry::Offline)], "reg-2 down").await;
    let disk = dir.path().join("pool2.img");
    std::fs::rename(&disk, dir.path().join("away.img")).unwrap();
    engines[1].restart();
    wait_for(port, &[("reg-2", Online)], "reg-2 back without its pool").await;
    let p = c
        .publish_volume(pb::PublishVolumeRequest {
            uuid: vol.clone(),
            host_nqn: "nqn.2026-11.io.keelson:test-away-host".into(),
            node: "reg-1".into(),
            ..Default::default()
        })
        .await
        .expect("published on the replicas that can be shared")
        .into_inner();
    let v = volume_now(&c, &vol).await;
    assert_ne!(v.state, "Online", "{v:?}");
    let mut o = ConnectOptions::new(p.target_addresses[0].parse().unwrap(), &p.nqn);
    o.hostnqn = "nqn.2026-11.io.keelson:test-away-host".into();
    let ns = RemoteNamespace::connect(o, 1).await.unwrap();
    let data = Bytes::from(vec![5u8; 64 << 10]);
    ns.write(0, data.clone()).await.unwrap();
    assert_eq!(ns.read(0, 64 << 10).await.unwrap(), data);
    ns.close().await;
}

/// An unpublished volume scaled up has a new replica that holds none of its data until a nexus rebuilds it: the
/// volume is Degraded, not Online, until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpublished_volume_with_a_replica_out_of_sync_is_not_online() {
    let (_dir, _port, _agent, _engines, _nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    c.create_volume(create(&vol, 8 << 20, 2)).await.unwrap();
    assert_eq!(volume_now(&c, &vol).await.state, "Online");
    c.set_volume_replicas(pb::SetVolumeReplicasRequest {
        uuid: vol.clone(),
        replicas: 3,
    })
    .await
    .unwrap();
    let t = std::time::Instant::now();
    let v = loop {
        let v = volume_now(&c, &vol).await;
        if v.replica_list.len() == 3 && v.replica_list.iter().all(|r| r.created) {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v.state, "Degraded", "{v:?}");
}

/// A volume published without a replica whose node came back without its pool: once the pool has not come back
/// within the grace, that replica is retired and replaced on the free node, and the volume is Online again. Before,
/// every healing pass failed sharing it, and the volume stayed Degraded with a free node beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_pool_does_not_come_back_is_replaced() {
    let (dir, port, _agent, mut engines, _nodes, mut c) = three_nodes().await;
    let vol = uuid::Uuid::new_v4().to_string();
    let v = c
        .create_volume(create(&vol, 8 << 20, 2))
        .await
        .unwrap()
        .into_inner();
    let (kept, lost) = (
        v.replica_list[0].node.clone(),
        v.replica_list[1].node.clone(),
    );
    let i: usize = lost.trim_start_matches("reg-").parse().unwrap();
    engines[i - 1].kill9();
    wait_for(port, &[(lost.as_str(), crate::registry::Offline)], "down").await;
    let disk = dir.path().join(format!("pool{i}.img"));
    std::fs::rename(&disk, dir.path().join("away.img")).unwrap();
    engines[i - 1].restart();
    wait_for(port, &[(lost.as_str(), Online)], "back without its pool").await;
    c.publish_volume(pb::PublishVolumeRequest {
        uuid: vol.clone(),
        host_nqn: "nqn.2026-11.io.keelson:test-away-host".into(),
        node: kept.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let t = std::time::Instant::now();
    let v = loop {
        let v = volume_now(&c, &vol).await;
        if v.state == "Online" && v.replica_list.iter().all(|r| r.node != lost) {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(90), "{v:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("replaced after {:?}: {:?}", t.elapsed(), v.replica_list);
    assert_eq!(v.replica_list.len(), 2);
}
