//! The store conformance suite: what every [`Store`] must do, run against the embedded store and a real etcd.
//! Each check works under its own random key prefix, so the checks never see each other's keys.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use ha_agent::cluster::store::embedded::EmbeddedStore;
use ha_agent::cluster::store::{Compare, Event, Store, StoreError, Txn, Watch, schema};

use crate::etcd::Etcd;

fn ns() -> String {
    format!("/test/{}/", uuid::Uuid::new_v4())
}

async fn next_event(w: &mut Watch) -> Event {
    tokio::time::timeout(Duration::from_secs(10), w.events.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch goes on")
        .expect("no watch error")
}

async fn reads_writes_and_compare_and_put(s: &dyn Store) {
    let ns = ns();
    let a = format!("{ns}a");
    assert_eq!(s.get(&a).await.unwrap(), None);
    let r1 = s.put(&a, b"one".to_vec()).await.unwrap();
    let v = s.get(&a).await.unwrap().unwrap();
    assert_eq!(
        (
            v.value.as_slice(),
            v.create_revision,
            v.mod_revision,
            v.lease
        ),
        (&b"one"[..], r1, r1, None)
    );
    let r2 = s.put(&a, b"two".to_vec()).await.unwrap();
    assert!(r2 > r1);
    let v = s.get(&a).await.unwrap().unwrap();
    assert_eq!(
        (v.create_revision, v.mod_revision),
        (r1, r2),
        "created once, modified twice"
    );

    assert!(!s.compare_and_put(&a, r1, b"stale".to_vec()).await.unwrap());
    assert_eq!(s.get(&a).await.unwrap().unwrap().value, b"two");
    assert!(s.compare_and_put(&a, r2, b"three".to_vec()).await.unwrap());
    let b = format!("{ns}b");
    assert!(
        s.compare_and_put(&b, 0, b"new".to_vec()).await.unwrap(),
        "0 means absent"
    );
    assert!(!s.compare_and_put(&b, 0, b"again".to_vec()).await.unwrap());

    assert!(s.delete(&a).await.unwrap());
    assert!(!s.delete(&a).await.unwrap());
    assert_eq!(s.get(&a).await.unwrap(), None);
}

async fn lists_a_prefix_in_key_order(s: &dyn Store) {
    let ns = ns();
    for k in ["x/2", "y", "x/1", "x0", "x/10"] {
        s.put(&format!("{ns}{k}"), k.as_bytes().to_vec())
            .await
            .unwrap();
    }
    let keys = |l: Vec<(String, _)>| -> Vec<String> {
        l.into_iter()
            .map(|(k, _)| k.trim_start_matches(&ns).to_string())
            .collect()
    };
    assert_eq!(
        keys(s.list(&format!("{ns}x/")).await.unwrap()),
        ["x/1", "x/10", "x/2"]
    );
    assert_eq!(
        keys(s.list(&ns).await.unwrap()),
        ["x/1", "x/10", "x/2", "x0", "y"]
    );
    assert!(s.list(&format!("{ns}none/")).await.unwrap().is_empty());
}

/// 1,200 values of 8 KiB: 9.6 MiB, more than one gRPC message holds (etcd's store reads it in pages), all there,
/// in order, each once; and a watch's snapshot of them too.
async fn lists_and_watches_more_than_one_message_holds(s: &dyn Store) {
    let ns = ns();
    let value = vec![b'v'; 8 << 10];
    for i in 0..1200 {
        s.put(&format!("{ns}big/{i:05}"), value.clone())
            .await
            .unwrap();
    }
    s.put(&format!("{ns}bigger"), b"not in it".to_vec())
        .await
        .unwrap();
    let want: Vec<String> = (0..1200).map(|i| format!("{ns}big/{i:05}")).collect();
    let listed = s.list(&format!("{ns}big/")).await.unwrap();
    assert_eq!(
        listed.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        want
    );
    assert!(listed.iter().all(|(_, v)| v.value == value));
    let w = s.watch(&format!("{ns}big/")).await.unwrap();
    assert_eq!(
        w.initial.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        want
    );
}

async fn transactions_are_all_or_nothing(s: &dyn Store) {
    let ns = ns();
    let (k1, k2, k3) = (format!("{ns}k1"), format!("{ns}k2"), format!("{ns}k3"));
    let r1 = s.put(&k1, b"1".to_vec()).await.unwrap();
    let r2 = s.put(&k2, b"2".to_vec()).await.unwrap();
    s.put(&k3, b"3".to_vec()).await.unwrap();
    let cond = |rev2| {
        Txn::new()
            .when(Compare::ModRevision {
                key: k1.clone(),
                revision: r1,
            })
            .when(Compare::ModRevision {
                key: k2.clone(),
                revision: rev2,
            })
            .put(k1.clone(), b"1b".to_vec())
            .put(format!("{ns}k4"), b"4".to_vec())
            .delete(k3.clone())
    };
    let r = s.txn(cond(r2 + 100)).await.unwrap();
    assert!(!r.succeeded);
    assert_eq!(s.get(&k1).await.unwrap().unwrap().value, b"1");
    assert!(s.get(&k3).await.unwrap().is_some());
    assert!(s.get(&format!("{ns}k4")).await.unwrap().is_none());

    let r = s.txn(cond(r2)).await.unwrap();
    assert!(r.succeeded);
    let v1 = s.get(&k1).await.unwrap().unwrap();
    let v4 = s.get(&format!("{ns}k4")).await.unwrap().unwrap();
    assert_eq!(
        (v1.mod_revision, v4.mod_revision),
        (r.revision, r.revision),
        "one revision for the whole txn"
    );
    assert!(s.get(&k3).await.unwrap().is_none());

    let by_value = |v: &[u8]| {
        Txn::new()
            .when(Compare::Value {
                key: k1.clone(),
                value: v.to_vec(),
            })
            .put(k2.clone(), b"x".to_vec())
    };
    assert!(!s.txn(by_value(b"1")).await.unwrap().succeeded);
    assert!(s.txn(by_value(b"1b")).await.unwrap().succeeded);

    s.put(&format!("{ns}p/a"), vec![]).await.unwrap();
    s.put(&format!("{ns}p/b"), vec![]).await.unwrap();
    assert!(
        s.txn(Txn::new().delete_prefix(format!("{ns}p/")))
            .await
            .unwrap()
            .succeeded
    );
    assert!(s.list(&format!("{ns}p/")).await.unwrap().is_empty());
    assert_eq!(s.list(&ns).await.unwrap().len(), 3, "k1, k2, k4 stay");

    let e = s.txn(Txn::new().put("", vec![])).await.err();
    assert!(matches!(e, Some(StoreError::InvalidArgument(_))), "{e:?}");
    let e = s.txn(Txn::new().delete_prefix("")).await.err();
    assert!(
        matches!(e, Some(StoreError::InvalidArgument(_))),
        "an empty prefix would erase the store: {e:?}"
    );
}

async fn a_watch_sees_everything_after_its_snapshot_in_order(s: &dyn Store) {
    let ns = ns();
    let w_ns = format!("{ns}w/");
    s.put(&format!("{w_ns}a"), b"a".to_vec()).await.unwrap();
    let mut w = s.watch(&w_ns).await.unwrap();
    assert_eq!(w.initial.len(), 1);
    assert_eq!(w.initial[0].0, format!("{w_ns}a"));
    s.put(&format!("{w_ns}b"), b"b".to_vec()).await.unwrap();
    s.put(&format!("{ns}elsewhere"), b"-".to_vec())
        .await
        .unwrap();
    s.delete(&format!("{w_ns}a")).await.unwrap();
    s.txn(Txn::new().delete_prefix(w_ns.clone())).await.unwrap();
    let mut seen = Vec::new();
    let mut last = w.revision;
    for _ in 0..3 {
        let e = next_event(&mut w).await;
        assert!(
            e.revision() > last,
            "revisions increase: {e:?} after {last}"
        );
        last = e.revision();
        seen.push(match e {
            Event::Put { key, value } => format!(
                "put {} {}",
                key.trim_start_matches(&w_ns),
                String::from_utf8_lossy(&value.value)
            ),
            Event::Delete { key, .. } => format!("delete {}", key.trim_start_matches(&w_ns)),
        });
    }
    assert_eq!(seen, ["put b b", "delete a", "delete b"]);
    let more = tokio::time::timeout(Duration::from_millis(300), w.events.next()).await;
    assert!(
        more.is_err(),
        "nothing else under the prefix: {:?}",
        more.ok().flatten().map(|r| r.map(|e| e.key().to_string()))
    );
}

async fn leases_keep_keys_while_renewed_and_drop_them_when_they_end(s: &dyn Store, ttl: Duration) {
    let ns = ns();
    let (k1, k2) = (format!("{ns}l1"), format!("{ns}l2"));
    let lease = s.grant_lease(ttl).await.unwrap();
    s.txn(Txn::new().put_leased(k1.clone(), b"held".to_vec(), lease))
        .await
        .unwrap();
    assert_eq!(s.get(&k1).await.unwrap().unwrap().lease, Some(lease));
    let mut w = s.watch(&ns).await.unwrap();
    // Renewed for twice its TTL: the key stays.
    let until = tokio::time::Instant::now() + ttl * 2;
    while tokio::time::Instant::now() < until {
        s.keep_alive(lease).await.unwrap();
        tokio::time::sleep(ttl / 4).await;
    }
    assert!(
        s.get(&k1).await.unwrap().is_some(),
        "a renewed lease keeps its key"
    );
    // Not renewed: gone within the TTL (and the store's expiry granularity), seen by the watch.
    let e = tokio::time::timeout(ttl * 3 + Duration::from_secs(2), next_event(&mut w))
        .await
        .expect("the key expires");
    assert!(
        matches!(&e, Event::Delete { key, .. } if *key == k1),
        "{e:?}"
    );
    assert!(s.get(&k1).await.unwrap().is_none());
    assert_eq!(
        s.keep_alive(lease).await,
        Err(StoreError::LeaseExpired(lease))
    );
    let e = s
        .txn(Txn::new().put_leased(k2.clone(), vec![], lease))
        .await
        .err();
    assert!(matches!(e, Some(StoreError::LeaseExpired(_))), "{e:?}");

    // Revoked: its keys go at once; a key rewritten without the lease stays.
    let l2 = s.grant_lease(ttl * 10).await.unwrap();
    let k3 = format!("{ns}l3");
    s.txn(
        Txn::new()
            .put_leased(k2.clone(), vec![], l2)
            .put_leased(k3.clone(), vec![], l2),
    )
    .await
    .unwrap();
    s.put(&k3, b"mine now".to_vec()).await.unwrap();
    s.revoke_lease(l2).await.unwrap();
    assert!(s.get(&k2).await.unwrap().is_none());
    assert_eq!(s.get(&k3).await.unwrap().unwrap().value, b"mine now");
    assert_eq!(s.revoke_lease(l2).await, Err(StoreError::LeaseExpired(l2)));
}

async fn the_schema_version_is_written_once_and_a_newer_one_refused(s: &dyn Store) {
    assert_eq!(schema::check(s).await.unwrap(), schema::SCHEMA_VERSION);
    assert_eq!(schema::check(s).await.unwrap(), schema::SCHEMA_VERSION);
    let e = schema::check_supported(s, schema::SCHEMA_VERSION - 1)
        .await
        .err();
    assert_eq!(
        e,
        Some(StoreError::NewerSchema {
            found: schema::SCHEMA_VERSION,
            supported: schema::SCHEMA_VERSION - 1
        })
    );
    let msg = e.unwrap().to_string();
    assert!(
        msg.contains(&format!("schema version {}", schema::SCHEMA_VERSION)),
        "{msg}"
    );
    // A store of an older version is raised by a newer leader, after which the older agent refuses it (it would
    // rewrite the newer records without their newer fields).
    s.put(schema::SCHEMA_KEY, br#"{"version":1}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(schema::check_supported(s, 1).await.unwrap(), 1);
    schema::raise(s, 2).await.unwrap();
    assert_eq!(
        schema::check_supported(s, 1).await.err(),
        Some(StoreError::NewerSchema {
            found: 2,
            supported: 1
        })
    );
    assert_eq!(
        schema::raise(s, 1).await.err(),
        Some(StoreError::NewerSchema {
            found: 2,
            supported: 1
        })
    );
    schema::raise(s, schema::SCHEMA_VERSION).await.unwrap();
}

/// Every check, against one store.
pub async fn conformance(s: Arc<dyn Store>, ttl: Duration) {
    reads_writes_and_compare_and_put(s.as_ref()).await;
    lists_a_prefix_in_key_order(s.as_ref()).await;
    lists_and_watches_more_than_one_message_holds(s.as_ref()).await;
    transactions_are_all_or_nothing(s.as_ref()).await;
    a_watch_sees_everything_after_its_snapshot_in_order(s.as_ref()).await;
    leases_keep_keys_while_renewed_and_drop_them_when_they_end(s.as_ref(), ttl).await;
    the_schema_version_is_written_once_and_a_newer_one_refused(s.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(&dir.path().join("store.redb"))
        .await
        .unwrap();
    // As the etcd run's: a loaded machine can miss a renewal every 125 ms of a 500 ms lease.
    conformance(Arc::new(s), Duration::from_secs(2)).await;
}

/// Needs etcd (Debian package etcd-server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_passes_the_conformance_suite() {
    let Some(etcd) = Etcd::start("etcd_passes_the_conformance_suite").await else {
        return;
    };
    // etcd's shortest lease is about 2 s.
    conformance(Arc::new(etcd.store().await), Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_keeps_its_data_across_a_restart_but_not_its_dead_leases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let s = EmbeddedStore::open(&path).await.unwrap();
    let rev = s.put("/keep", b"kept".to_vec()).await.unwrap();
    let l = s.grant_lease(Duration::from_secs(3600)).await.unwrap();
    s.txn(Txn::new().put_leased("/leased", b"x".to_vec(), l))
        .await
        .unwrap();
    drop(s);
    let s = EmbeddedStore::open(&path).await.unwrap();
    let v = s.get("/keep").await.unwrap().unwrap();
    assert_eq!((v.value.as_slice(), v.mod_revision), (&b"kept"[..], rev));
    assert!(
        s.get("/leased").await.unwrap().is_none(),
        "its lease ended with the process that held it"
    );
    assert!(
        s.put("/next", vec![]).await.unwrap() > rev,
        "revisions go on from where they were"
    );
}

/// Needs etcd. While etcd is frozen the store answers Unavailable within its timeout, never hangs; it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_makes_the_store_unavailable_not_hung_and_it_recovers() {
    let Some(etcd) =
        Etcd::start("a_frozen_etcd_makes_the_store_unavailable_not_hung_and_it_recovers").await
    else {
        return;
    };
    let s = etcd.store().await;
    s.put("/k", b"1".to_vec()).await.unwrap();
    etcd.signal("-STOP");
    let r = tokio::time::timeout(Duration::from_secs(30), s.put("/k", b"2".to_vec())).await;
    etcd.signal("-CONT");
    let r = r.expect("the call ends by itself");
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    let v = s.get("/k").await.unwrap().unwrap();
    assert!(
        v.value == b"1" || v.value == b"2",
        "either outcome, never a torn one"
    );
    s.put("/k", b"3".to_vec()).await.unwrap();
}

/// An agent that leads a store of an older schema version raises it to its own before it writes anything, so that
/// an older agent leading it later (a rolling downgrade) refuses it rather than rewrite newer records without the
/// fields it does not know. Before, the version was written only into an empty store, and never raised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_raises_an_older_store_to_its_schema() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agent");
    std::fs::create_dir_all(&data).unwrap();
    {
        let s = EmbeddedStore::open(&data.join("store.redb")).await.unwrap();
        assert_eq!(schema::check_supported(&s, 1).await.unwrap(), 1);
    }
    let port = crate::registry::free_port("127.0.0.1");
    let mut agent = crate::registry::agent(dir.path(), port);
    crate::registry::wait_for(port, &[], "the agent leads").await;
    agent.stop();
    let s = EmbeddedStore::open(&data.join("store.redb")).await.unwrap();
    assert_eq!(
        schema::check_supported(&s, 1).await.err(),
        Some(StoreError::NewerSchema {
            found: schema::SCHEMA_VERSION,
            supported: 1
        })
    );
}
