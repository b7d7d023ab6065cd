//! Replicated volumes across real io-engine processes on 127.0.0.1, .2, .3 (and .4 for the replacement), driven
//! through the engine gRPC API, with real faults (SIGKILL). The engines run their data path on two I/O threads
//! (`--io-threads 2`), which the other suites leave off (the default).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nvmf_target::block::BlockDevice;
use nvmf_target::initiator::ConnectOptions;
use nvmf_target::initiator::namespace::RemoteNamespace;
use proto::engine as pb;
use proto::engine::engine_client::EngineClient;
use tonic::transport::Channel;

use crate::harness::free_port;

const SIZE: u64 = 32 << 20;

/// An io-engine process serving one memory replica; killed when dropped.
struct EngineProc {
    child: Child,
    ip: String,
    port: u16,
    grpc: u16,
    replica: String,
}

impl EngineProc {
    fn start(ip: &str, name: &str) -> EngineProc {
        Self::start_with(ip, name, "")
    }

    /// `extra`: more export keys, e.g. ",fault=true".
    fn start_with(ip: &str, name: &str, extra: &str) -> EngineProc {
        Self::start_sized(ip, name, SIZE, extra)
    }

    fn start_sized(ip: &str, name: &str, size: u64, extra: &str) -> EngineProc {
        let (port, grpc) = (free_port(ip), free_port(ip));
        let replica = format!("nqn.2026-11.io.keelson:replica-{}", uuid::Uuid::new_v4());
        let child = Command::new(env!("CARGO_BIN_EXE_io-engine"))
            .args([
                "--node-name",
                name,
                "--listen",
                &format!("{ip}:{port}"),
                "--grpc",
                &format!("{ip}:{grpc}"),
                "--io-threads",
                "2",
            ])
            .arg("--export")
            .arg(format!("nqn={replica},memory={size}{extra}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        EngineProc {
            child,
            ip: ip.into(),
            port,
            grpc,
            replica,
        }
    }

    fn uri(&self) -> String {
        format!("nvmf://{}:{}/{}", self.ip, self.port, self.replica)
    }

    async fn api(&self) -> EngineClient<Channel> {
        let url = format!("http://{}:{}", self.ip, self.grpc);
        for _ in 0..200 {
            if let Ok(c) = EngineClient::connect(url.clone()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("io-engine at {url} never came up");
    }

    /// Reads this engine's replica in full, straight from its own subsystem.
    async fn replica_contents(&self) -> Bytes {
        let addr = format!("{}:{}", self.ip, self.port).parse().unwrap();
        let ns = RemoteNamespace::connect(ConnectOptions::new(addr, &self.replica), 1)
            .await
            .unwrap();
        let data = ns.read(0, SIZE).await.unwrap();
        ns.close().await;
        data
    }

    fn signal(&self, sig: &str) {
        assert!(
            Command::new("kill")
                .args([sig, &self.child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for EngineProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn nexus_info(api: &mut EngineClient<Channel>, uuid: &str) -> pb::Nexus {
    let all = api
        .list_nexuses(pb::ListNexusesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nexuses;
    all.into_iter()
        .find(|n| n.uuid == uuid)
        .expect("nexus listed")
}

/// Polls the nexus until it reaches `state` or `timeout` passes; returns what it last saw.
async fn wait_state(
    api: &mut EngineClient<Channel>,
    uuid: &str,
    state: pb::NexusState,
    timeout: Duration,
) -> pb::Nexus {
    let t = Instant::now();
    loop {
        let info = nexus_info(api, uuid).await;
        if info.state == state as i32 || t.elapsed() > timeout {
            return info;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Adds (or rejoins) a child and waits until the nexus is Online again.
async fn add_child_until_online(
    api: &mut EngineClient<Channel>,
    uuid: &str,
    uri: String,
    timeout: Duration,
) -> pb::Nexus {
    let r = pb::ChildRequest {
        uuid: uuid.to_string(),
        uri,
        reason: String::new(),
    };
    api.add_child(r).await.unwrap();
    let info = wait_state(api, uuid, pb::NexusState::Online, timeout).await;
    assert_eq!(info.state, pb::NexusState::Online as i32, "{info:?}");
    info
}

/// Creates a nexus over `children` and publishes it to any host.
async fn create_published(
    api: &mut EngineClient<Channel>,
    uuid: &str,
    children: Vec<String>,
    io_timeout_ms: u64,
) -> pb::Nexus {
    let r = pb::CreateNexusRequest {
        uuid: uuid.to_string(),
        children,
        io_timeout_ms,
        ..Default::default()
    };
    let n = api.create_nexus(r).await.unwrap().into_inner();
    assert_eq!(n.state, pb::NexusState::Online as i32);
    let r = pb::PublishNexusRequest {
        uuid: uuid.to_string(),
        allow_any_host: true,
        ..Default::default()
    };
    api.publish_nexus(r).await.unwrap().into_inner()
}

fn block(seed: u64, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (seed as u8).wrapping_add((i / 4096) as u8).wrapping_mul(7))
            .collect::<Vec<u8>>(),
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// SIGKILL of the third replica's io-engine.
    Kill,
    /// The third replica's disk starts failing every write.
    DiskError,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_a_killed_node_and_a_new_replica_rebuilds_identical() {
    replica_lost_then_replaced(Failure::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_a_failing_disk_and_a_new_replica_rebuilds_identical() {
    replica_lost_then_replaced(Failure::DiskError).await;
}

async fn replica_lost_then_replaced(failure: Failure) {
    let e1 = EngineProc::start("127.0.0.1", "n1");
    let e2 = EngineProc::start("127.0.0.2", "n2");
    let mut e3 = EngineProc::start_with("127.0.0.3", "n3", ",fault=true");
    let mut api = e1.api().await;
    e2.api().await;
    e3.api().await;
    let uuid = uuid::Uuid::new_v4().to_string();
    let local = format!("local:///{}", e1.replica);
    let children = vec![local.clone(), e2.uri(), e3.uri()];
    let n = create_published(&mut api, &uuid, children, 5000).await;

    // The application: a host on the published volume, writing a known pattern everywhere, then rewriting.
    let addr = format!("127.0.0.1:{}", e1.port).parse().unwrap();
    let vol = Arc::new(
        RemoteNamespace::connect(ConnectOptions::new(addr, &n.nqn), 1)
            .await
            .unwrap(),
    );
    assert_eq!(vol.size_bytes(), SIZE);
    // What the application was told is written (its writes go one at a time): what the volume must hold at the end.
    let acked = Arc::new(std::sync::Mutex::new(vec![0u8; SIZE as usize]));
    for i in 0..SIZE / (1 << 20) {
        let data = block(i, 1 << 20);
        vol.write(i << 20, data.clone()).await.unwrap();
        acked.lock().unwrap()[(i << 20) as usize..((i + 1) << 20) as usize].copy_from_slice(&data);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (writes, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (vol, stop, writes, errors, acked) = (
            vol.clone(),
            stop.clone(),
            writes.clone(),
            errors.clone(),
            acked.clone(),
        );
        tokio::spawn(async move {
            let mut x = 7u64;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = ((x >> 16) % (SIZE / 65536)) * 65536;
                let data = block(x >> 40, 65536);
                match vol.write(off, data.clone()).await {
                    Ok(()) => {
                        acked.lock().unwrap()[off as usize..off as usize + 65536]
                            .copy_from_slice(&data);
                        writes.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A node dies hard, or its disk starts failing, while writes run.
    match failure {
        Failure::Kill => e3.kill9(),
        Failure::DiskError => {
            let r = pb::InjectFaultRequest {
                nqn: e3.replica.clone(),
                nsid: 1,
                ..Default::default()
            };
            e3.api().await.inject_fault(r).await.unwrap();
        }
    }
    let info = wait_state(
        &mut api,
        &uuid,
        pb::NexusState::Degraded,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(info.state, pb::NexusState::Degraded as i32, "{info:?}");
    let dead = info.children.iter().find(|c| c.uri == e3.uri()).unwrap();
    assert_eq!(dead.state, pb::ChildState::Faulted as i32);
    if failure == Failure::DiskError {
        assert!(
            dead.reason.contains("write"),
            "faulted for its write errors: {}",
            dead.reason
        );
        let r = pb::InjectFaultRequest {
            nqn: e3.replica.clone(),
            nsid: 1,
            ..Default::default()
        };
        assert!(
            e3.api()
                .await
                .inject_fault(r)
                .await
                .unwrap()
                .into_inner()
                .injected
                > 0
        );
    }
    let before = writes.load(Ordering::Relaxed);
    let t = std::time::Instant::now();
    while writes.load(Ordering::Relaxed) <= before {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "writes go on while degraded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Retire the dead replica, add a replacement on a new node, rebuild while writes go on.
    api.remove_child(pb::ChildRequest {
        uuid: uuid.clone(),
        uri: e3.uri(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let e4 = EngineProc::start("127.0.0.4", "n4");
    e4.api().await;
    let info = add_child_until_online(&mut api, &uuid, e4.uri(), Duration::from_secs(60)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "the application saw I/O errors"
    );
    let rebuild = info.rebuilds.last().expect("a rebuild record");
    assert_eq!(
        (
            rebuild.child.as_str(),
            rebuild.bytes_copied + rebuild.bytes_skipped,
            rebuild.error.as_str()
        ),
        (e4.uri().as_str(), SIZE, "")
    );

    // The volume holds every acknowledged write, and every replica exactly that.
    let seen = vol.read(0, SIZE).await.unwrap();
    assert!(
        seen[..] == acked.lock().unwrap()[..],
        "the volume lost acknowledged writes"
    );
    for (name, e) in [("n1", &e1), ("n2", &e2), ("n4", &e4)] {
        let r = e.replica_contents().await;
        assert!(r == seen, "replica on {name} differs from the volume");
    }
    vol.close().await;
}

/// A replica's node goes silent (SIGSTOP: no reset, as a node powered off or cut off): the nexus's keep-alive to
/// it goes unanswered, the child is faulted and writes go on without it, long before the child I/O timeout (a
/// minute here) would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_replica_is_faulted_by_the_keep_alive_not_the_io_timeout() {
    let e1 = EngineProc::start("127.0.0.1", "n1");
    let e2 = EngineProc::start("127.0.0.2", "n2");
    let mut api = e1.api().await;
    e2.api().await;
    let uuid = uuid::Uuid::new_v4().to_string();
    let children = vec![format!("local:///{}", e1.replica), e2.uri()];
    let n = create_published(&mut api, &uuid, children, 60_000).await;
    let addr = format!("127.0.0.1:{}", e1.port).parse().unwrap();
    let vol = RemoteNamespace::connect(ConnectOptions::new(addr, &n.nqn), 1)
        .await
        .unwrap();
    vol.write(0, block(1, 64 << 10)).await.unwrap();

    e2.signal("-STOP");
    // Stopped for sure (state T) before the write: one it took just before stopping would not show anything.
    let stat = format!("/proc/{}/stat", e2.child.id());
    while std::fs::read_to_string(&stat)
        .unwrap()
        .rsplit(") ")
        .next()
        .is_some_and(|rest| !rest.starts_with('T'))
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = std::time::Instant::now();
    let w = tokio::time::timeout(Duration::from_secs(30), vol.write(0, block(2, 64 << 10))).await;
    let took = t.elapsed();
    e2.signal("-CONT");
    assert!(
        matches!(w, Ok(Ok(()))),
        "the write waited for the silent replica: {w:?} after {took:?}"
    );
    println!("write acknowledged {took:?} after the replica went silent");
    let info = nexus_info(&mut api, &uuid).await;
    assert_eq!(info.state, pb::NexusState::Degraded as i32, "{info:?}");
    assert_eq!(vol.read(0, 64 << 10).await.unwrap(), block(2, 64 << 10));
    vol.close().await;
}

/// A replica frozen (SIGSTOP) for a few seconds while about 1 % of the volume is rewritten comes back and gets
/// only what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_away_for_seconds_catches_up_with_a_partial_rebuild() {
    const BIG: u64 = 256 << 20;
    let e1 = EngineProc::start_sized("127.0.0.1", "n1", BIG, "");
    let e2 = EngineProc::start_sized("127.0.0.2", "n2", BIG, "");
    let e3 = EngineProc::start_sized("127.0.0.3", "n3", BIG, "");
    let mut api = e1.api().await;
    e2.api().await;
    e3.api().await;
    let uuid = uuid::Uuid::new_v4().to_string();
    let children = vec![format!("local:///{}", e1.replica), e2.uri(), e3.uri()];
    // A child's I/O timeout of 5 s: an 8 MiB write slowed by a loaded machine is not a fault (the rebuild would then
    // copy more than what the frozen replica missed), and the frozen one is faulted within it.
    let n = create_published(&mut api, &uuid, children, 5000).await;
    let addr = format!("127.0.0.1:{}", e1.port).parse().unwrap();
    let vol = RemoteNamespace::connect(ConnectOptions::new(addr, &n.nqn), 1)
        .await
        .unwrap();
    for i in 0..BIG / (8 << 20) {
        vol.write(i * (8 << 20), block(i, 8 << 20)).await.unwrap();
    }
    // Flushed: writes a replica had not flushed when it went away are copied again too.
    vol.flush().await.unwrap();

    e3.signal("-STOP");
    // 2.5 MiB (about 1 % of 256 MiB) while the replica is away: segments 100, 101 and 102.
    let written = 5 * (512 << 10);
    for i in 0..5u64 {
        vol.write((100 << 20) + i * (512 << 10), block(100 + i, 512 << 10))
            .await
            .unwrap();
    }
    let info = nexus_info(&mut api, &uuid).await;
    assert_eq!(info.state, pb::NexusState::Degraded as i32, "{info:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    e3.signal("-CONT");

    let info = add_child_until_online(&mut api, &uuid, e3.uri(), Duration::from_secs(30)).await;
    let r = info.rebuilds.last().unwrap();
    assert_eq!((r.kind.as_str(), r.error.as_str()), ("partial", ""));
    assert!(
        r.bytes_copied >= written && r.bytes_copied <= BIG / 50,
        "copied {} of {BIG}",
        r.bytes_copied
    );
    assert_eq!(r.bytes_copied, 3 << 20);

    let seen = vol.read(0, BIG).await.unwrap();
    // What was acknowledged: the pattern, rewritten where the replica was away.
    let mut acked = Vec::with_capacity(BIG as usize);
    for i in 0..BIG / (8 << 20) {
        acked.extend_from_slice(&block(i, 8 << 20));
    }
    for i in 0..5u64 {
        let at = ((100 << 20) + i * (512 << 10)) as usize;
        acked[at..at + (512 << 10)].copy_from_slice(&block(100 + i, 512 << 10));
    }
    assert!(seen[..] == acked[..], "the volume lost acknowledged writes");
    for (name, e) in [("n1", &e1), ("n2", &e2), ("n3", &e3)] {
        let addr = format!("{}:{}", e.ip, e.port).parse().unwrap();
        let ns = RemoteNamespace::connect(ConnectOptions::new(addr, &e.replica), 1)
            .await
            .unwrap();
        assert!(
            ns.read(0, BIG).await.unwrap() == seen,
            "replica on {name} differs from the volume"
        );
        ns.close().await;
    }
    vol.close().await;
}
