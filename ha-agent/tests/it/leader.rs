//! Leader election over a store: one candidate leads, another takes over when the leader resigns, dies (its lease
//! runs out) or loses its lease, and the writes of a leader that was replaced are refused; on the embedded store and
//! on a real etcd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ha_agent::cluster::leader::{Leader, campaign};
use ha_agent::cluster::store::embedded::EmbeddedStore;
use ha_agent::cluster::store::{Store, StoreError};
use tokio_util::sync::CancellationToken;

use crate::etcd::Etcd;

const KEY: &str = "/keelson/test-leader";

fn candidate(
    s: Arc<dyn Store>,
    me: &'static str,
    ttl: Duration,
) -> tokio::task::JoinHandle<Option<Leader>> {
    tokio::spawn(async move {
        campaign(s, KEY, me, ttl, &CancellationToken::new())
            .await
            .unwrap()
    })
}

async fn holder(s: &dyn Store) -> String {
    String::from_utf8(s.get(KEY).await.unwrap().expect("a leader").value).unwrap()
}

async fn one_leads_and_the_other_takes_over(s: Arc<dyn Store>, ttl: Duration) {
    let a = candidate(s.clone(), "agent-a", ttl)
        .await
        .unwrap()
        .expect("a leads");
    assert_eq!(holder(s.as_ref()).await, "agent-a");
    let b = candidate(s.clone(), "agent-b", ttl);
    tokio::time::sleep(ttl * 2).await;
    assert!(!b.is_finished(), "two leaders");
    assert!(!a.lost().is_cancelled(), "a renewed leader stays leader");

    // The leader writes through its fence.
    let fa = a.fenced(KEY);
    fa.put("/keelson/test-fenced", b"a".to_vec()).await.unwrap();

    // Resigning hands over at once.
    let t = Instant::now();
    a.resign().await.unwrap();
    let b = tokio::time::timeout(Duration::from_secs(5), b)
        .await
        .expect("b takes over")
        .unwrap()
        .unwrap();
    println!("handover after resign: {:?}", t.elapsed());
    assert_eq!(holder(s.as_ref()).await, "agent-b");
    // The old leader's writes are refused from then on, conditional ones too; the new leader's go through.
    assert_eq!(
        fa.put("/keelson/test-fenced", b"stale".to_vec()).await,
        Err(StoreError::NotLeader)
    );
    assert_eq!(
        fa.compare_and_put("/keelson/test-other", 0, b"stale".to_vec())
            .await,
        Err(StoreError::NotLeader)
    );
    let fb = b.fenced(KEY);
    fb.put("/keelson/test-fenced", b"b".to_vec()).await.unwrap();
    assert!(
        !fb.compare_and_put("/keelson/test-fenced", 0, b"x".to_vec())
            .await
            .unwrap(),
        "a failed compare of the caller's own is still just a failed compare"
    );
    assert_eq!(
        s.get("/keelson/test-fenced").await.unwrap().unwrap().value,
        b"b"
    );

    // A leader that dies without resigning (its renewals stop) is replaced once its lease runs out.
    let c = candidate(s.clone(), "agent-c", ttl);
    let t = Instant::now();
    drop(b);
    let c = tokio::time::timeout(ttl * 3 + Duration::from_secs(3), c)
        .await
        .expect("c takes over within the lease TTL")
        .unwrap()
        .unwrap();
    println!(
        "handover after the leader died: {:?} (lease TTL {ttl:?})",
        t.elapsed()
    );
    assert_eq!(holder(s.as_ref()).await, "agent-c");

    // A leader whose lease is taken from it learns it at its next renewal.
    let lost = c.lost();
    s.revoke_lease(c.lease).await.unwrap();
    tokio::time::timeout(ttl + Duration::from_secs(3), lost.cancelled())
        .await
        .expect("c sees it lost leadership");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_store_one_agent_leads_and_another_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(&dir.path().join("store.redb"))
        .await
        .unwrap();
    // Long enough that a loaded machine's late timer does not lose a renewed lease.
    one_leads_and_the_other_takes_over(Arc::new(s), Duration::from_secs(2)).await;
}

/// Needs etcd (Debian package etcd-server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_one_agent_leads_and_another_takes_over() {
    let Some(etcd) = Etcd::start("on_etcd_one_agent_leads_and_another_takes_over").await else {
        return;
    };
    // Two clients, as two agents would have.
    let s: Arc<dyn Store> = Arc::new(etcd.store().await);
    one_leads_and_the_other_takes_over(s, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_stops_waiting_when_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(&dir.path().join("store.redb"))
            .await
            .unwrap(),
    );
    let _a = campaign(
        s.clone(),
        KEY,
        "a",
        Duration::from_secs(5),
        &CancellationToken::new(),
    )
    .await
    .unwrap()
    .unwrap();
    let stop = CancellationToken::new();
    let b = tokio::spawn({
        let (s, stop) = (s.clone(), stop.clone());
        async move { campaign(s, KEY, "b", Duration::from_secs(5), &stop).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let r = tokio::time::timeout(Duration::from_secs(2), b)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(r.is_none());
}
