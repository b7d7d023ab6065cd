//! A nexus child on this node (`local:///NQN`): the namespace's block device used directly, but subject to the
//! namespace's NVMe reservations as this node's host, and counted in the namespace's I/O statistics. Without the
//! reservation check, a nexus fenced by a newer one could keep writing to the replica on its own node.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use uuid::Uuid;

use crate::block::{BlockDevice, BlockError};
use crate::protocol::command::{Access, resv};
use crate::protocol::status::Status;
use crate::target::access::{self, Path};
use crate::target::subsystem::Namespace;

use super::nexus::Reservable;

pub struct LocalChild {
    ns: Arc<Namespace>,
    host: Uuid,
}

/// Reservation changes of this node's host fail with the status the reservation rules give.
fn to_block(s: Status) -> BlockError {
    match s {
        Status::RESERVATION_CONFLICT => BlockError::ReservationConflict,
        s => BlockError::Remote(s.to_string()),
    }
}

impl LocalChild {
    pub fn new(ns: Arc<Namespace>, host: Uuid) -> LocalChild {
        LocalChild { ns, host }
    }

    /// The same decision as for an NVMe/TCP command of class `access` ([`access::admit`]).
    fn check(&self, access: Access) -> Result<(), BlockError> {
        Ok(access::admit(&self.ns, self.host, access, Path::Local)?)
    }

    /// For a change to the namespace, as an NVMe/TCP command gets: the check made again under the reservations'
    /// fence, whose guard the caller holds until the change has ended.
    async fn admit_change(&self) -> Result<tokio::sync::RwLockReadGuard<'_, ()>, BlockError> {
        self.check(Access::WritesData)?;
        self.ns
            .reservations
            .admit_change(self.host)
            .await
            .map_err(to_block)
    }
}

#[async_trait]
impl Reservable for LocalChild {
    async fn register_key(&self, key: u64) -> Result<(), BlockError> {
        let host = self.host;
        self.ns
            .reservations
            .change_settled(self.ns.device.settle(), |s| {
                s.register(host, resv::REPLACE, true, 0, key)
            })
            .await
            .map_err(to_block)
    }

    async fn acquire(
        &self,
        action: u8,
        key: u64,
        preempt_key: u64,
        rtype: u8,
    ) -> Result<(), BlockError> {
        let host = self.host;
        self.ns
            .reservations
            .change_settled(self.ns.device.settle(), |s| {
                s.acquire(host, action, false, key, preempt_key, rtype)
            })
            .await
            .map_err(to_block)
    }

    async fn holder_key(&self) -> Result<Option<u64>, BlockError> {
        Ok(self.ns.reservations.state().holder_key())
    }

    async fn registered_keys(&self) -> Result<Vec<u64>, BlockError> {
        Ok(self
            .ns
            .reservations
            .state()
            .registrants
            .iter()
            .map(|r| r.key)
            .collect())
    }
}

#[async_trait]
impl BlockDevice for LocalChild {
    fn block_size(&self) -> u32 {
        self.ns.device.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.ns.device.num_blocks()
    }
    async fn rescan(&self) -> Result<u64, BlockError> {
        self.ns.device.rescan().await
    }
    async fn settle(&self) {
        self.ns.device.settle().await
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        self.check(Access::ReadsData)?;
        let start = std::time::Instant::now();
        let r = self.ns.device.read(offset, len).await;
        self.ns.stats.read.record(len, start.elapsed(), r.is_ok());
        r
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        let _fence = self.admit_change().await?;
        let (start, len) = (std::time::Instant::now(), data.len() as u64);
        let r = self.ns.device.write(offset, data).await;
        self.ns.stats.write.record(len, start.elapsed(), r.is_ok());
        r
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let _fence = self.admit_change().await?;
        self.ns.device.write_zeroes(offset, len).await
    }
    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let _fence = self.admit_change().await?;
        self.ns.device.deallocate(offset, len).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        let _fence = self.admit_change().await?;
        self.ns.device.flush().await
    }
    async fn allocated_ranges(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, u64)>>, BlockError> {
        self.check(Access::ReadsData)?;
        self.ns.device.allocated_ranges(offset, len).await
    }
    async fn note_missed(&self, m: &crate::block::MissedWrites) -> Result<(), BlockError> {
        self.check(Access::WritesMetadata)?;
        let _fence = self.admit_change().await?;
        self.ns.device.note_missed(m).await
    }
    async fn forget_missed(&self, child: &str) -> Result<(), BlockError> {
        self.check(Access::WritesMetadata)?;
        let _fence = self.admit_change().await?;
        self.ns.device.forget_missed(child).await
    }
    async fn missed(&self) -> Result<Vec<crate::block::MissedWrites>, BlockError> {
        self.check(Access::ReadsMetadata)?;
        self.ns.device.missed().await
    }
    async fn snapshot(&self, id: Uuid) -> Result<(), BlockError> {
        self.check(Access::WritesMetadata)?;
        let _fence = self.admit_change().await?;
        self.ns.device.snapshot(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::memory::MemoryDevice;
    use crate::engine::nexus::{ReservationKeys, reserve};
    use crate::target::reservation::Reservations;

    /// A 1 MiB memory namespace without reservations.
    fn memory_namespace() -> Arc<Namespace> {
        Arc::new(Namespace {
            nsid: 1,
            uuid: Uuid::new_v4(),
            ana_group: 1,
            device: Arc::new(MemoryDevice::new(1 << 20, 512)),
            reservations: Reservations::default(),
            stats: Default::default(),
        })
    }

    #[tokio::test]
    async fn a_local_child_is_fenced_like_a_remote_host() {
        let ns = memory_namespace();
        let old = LocalChild::new(ns.clone(), Uuid::new_v4());
        reserve(&old, ReservationKeys { key: 1, preempt: 0 })
            .await
            .unwrap();
        old.write(0, Bytes::from(vec![1u8; 512])).await.unwrap();
        let new = LocalChild::new(ns.clone(), Uuid::new_v4());
        let taken = reserve(&new, ReservationKeys { key: 2, preempt: 0 }).await;
        assert!(matches!(taken, Err(BlockError::ReservationConflict)));
        reserve(&new, ReservationKeys { key: 2, preempt: 1 })
            .await
            .unwrap();
        assert!(matches!(
            old.write(0, Bytes::from(vec![2u8; 512])).await,
            Err(BlockError::ReservationConflict)
        ));
        // Exclusive Access: the old one reads nothing either (it would not see the new one's writes).
        new.write(512, Bytes::from(vec![3u8; 512])).await.unwrap();
        assert!(matches!(
            old.read(512, 512).await,
            Err(BlockError::ReservationConflict)
        ));
        assert_eq!(&new.read(0, 512).await.unwrap()[..], &[1u8; 512][..]);
    }

    /// A nexus of an engine from before Exclusive Access holds Write Exclusive: taking it again with the same key
    /// changes the type in place, and keeps every registration.
    #[tokio::test]
    async fn a_write_exclusive_holder_takes_exclusive_access_with_its_key() {
        use crate::protocol::command::resv;
        let ns = memory_namespace();
        let host = Uuid::new_v4();
        let other = LocalChild::new(ns.clone(), Uuid::new_v4());
        other.register_key(9).await.unwrap();
        let child = LocalChild::new(ns.clone(), host);
        child.register_key(1).await.unwrap();
        child
            .acquire(resv::ACQUIRE, 1, 0, resv::WRITE_EXCLUSIVE)
            .await
            .unwrap();
        reserve(&child, ReservationKeys { key: 1, preempt: 0 })
            .await
            .unwrap();
        let st = ns.reservations.state();
        assert_eq!(st.rtype, resv::EXCLUSIVE_ACCESS);
        assert_eq!(st.holder_key(), Some(1));
        assert_eq!(st.registrants.len(), 2);
        child.write(0, Bytes::from(vec![1u8; 512])).await.unwrap();
    }

    /// A namespace on a slow disk, a child of `host` holding key 1 on it, and a write of that child (ones) admitted
    /// and on its way to the disk: it lands 300 ms after it started, and the disk is fast again for what follows.
    async fn a_write_on_its_way(
        host: Uuid,
    ) -> (
        Arc<Namespace>,
        tokio::task::JoinHandle<Result<(), BlockError>>,
    ) {
        use crate::block::fault::{FaultDevice, FaultPlan};
        use std::time::Duration;
        let disk = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(1 << 20, 512))));
        let ns = Arc::new(Namespace {
            nsid: 1,
            uuid: Uuid::new_v4(),
            ana_group: 1,
            device: disk.clone(),
            reservations: Reservations::default(),
            stats: Default::default(),
        });
        let writer = Arc::new(LocalChild::new(ns.clone(), host));
        reserve(&*writer, ReservationKeys { key: 1, preempt: 0 })
            .await
            .unwrap();
        disk.set_plan(FaultPlan {
            latency: Some(Duration::from_millis(300)),
            ..Default::default()
        });
        let late = tokio::spawn(async move { writer.write(0, Bytes::from(vec![1u8; 512])).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        disk.set_plan(FaultPlan::default());
        (ns, late)
    }

    #[tokio::test]
    async fn a_preempt_completes_only_once_the_fenced_writes_already_admitted_have_landed() {
        use std::time::Duration;
        // The old nexus's write passed its check and is on its way to a slow disk when the new nexus fences it.
        let (ns, late) = a_write_on_its_way(Uuid::new_v4()).await;
        let new = LocalChild::new(ns.clone(), Uuid::new_v4());
        reserve(&new, ReservationKeys { key: 2, preempt: 1 })
            .await
            .unwrap();
        assert!(
            late.is_finished(),
            "the preempt waited for the admitted write"
        );
        late.await.unwrap().unwrap();
        new.write(0, Bytes::from(vec![2u8; 512])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            &new.read(0, 512).await.unwrap()[..],
            &[2u8; 512][..],
            "the new nexus's write stands"
        );
    }

    /// A nexus opening its child again with the same key (a rejoin, before the rebuild of what the child missed)
    /// changes no reservation, and still waits for the writes it had admitted before: the rebuild's writes must not
    /// be overtaken by an older write landing late. Before, an unchanged reservation returned at once.
    #[tokio::test]
    async fn a_child_opened_again_with_its_key_waits_for_the_writes_admitted_before() {
        let host = Uuid::new_v4();
        let (ns, late) = a_write_on_its_way(host).await;
        let again = LocalChild::new(ns.clone(), host);
        reserve(&again, ReservationKeys { key: 1, preempt: 0 })
            .await
            .unwrap();
        assert!(
            late.is_finished(),
            "opening the child again waited for the write admitted before"
        );
        late.await.unwrap().unwrap();
        again.write(0, Bytes::from(vec![2u8; 512])).await.unwrap();
        assert_eq!(&again.read(0, 512).await.unwrap()[..], &[2u8; 512][..]);
    }

    #[tokio::test]
    async fn a_nexus_preempts_every_older_key_and_never_a_newer_one() {
        let ns = memory_namespace();
        let child = |_| LocalChild::new(ns.clone(), Uuid::new_v4());
        let (first, failed, third, stale) = (child(1), child(2), child(3), child(4));
        reserve(&first, ReservationKeys { key: 1, preempt: 0 })
            .await
            .unwrap();
        // An attempt with key 2 took this child and was never confirmed: the agent knows only key 1 held it.
        reserve(&failed, ReservationKeys { key: 2, preempt: 1 })
            .await
            .unwrap();
        // The next nexus (key 3) may preempt every key up to 2: the one that holds it now is 2.
        reserve(&third, ReservationKeys { key: 3, preempt: 2 })
            .await
            .unwrap();
        assert_eq!(ns.reservations.state().holder_key(), Some(3));
        for fenced in [&first, &failed] {
            assert!(matches!(
                fenced.write(0, Bytes::from(vec![2u8; 512])).await,
                Err(BlockError::ReservationConflict)
            ));
        }
        // An older nexus (a stale agent's, key 2, preempting up to 1) cannot take it back from a newer one.
        let taken = reserve(&stale, ReservationKeys { key: 2, preempt: 1 }).await;
        assert!(
            matches!(taken, Err(BlockError::ReservationConflict)),
            "{taken:?}"
        );
        assert_eq!(ns.reservations.state().holder_key(), Some(3));
        third.write(0, Bytes::from(vec![3u8; 512])).await.unwrap();
    }

    /// Preempting the holder takes out only the holder's registration; a nexus that registered and lost (here key 2,
    /// refused because 3 holds it) would otherwise stay registered for good, and enough of them over a volume's
    /// life fill the namespace's registrants. The next holder drops every replaced key, and never a newer one.
    #[tokio::test]
    async fn the_next_holder_drops_the_registrations_of_nexuses_that_never_held_it() {
        use crate::protocol::command::resv;
        let ns = memory_namespace();
        let child = || LocalChild::new(ns.clone(), Uuid::new_v4());
        let (holder, loser, next, newer) = (child(), child(), child(), child());
        reserve(&holder, ReservationKeys { key: 3, preempt: 0 })
            .await
            .unwrap();
        let lost = reserve(&loser, ReservationKeys { key: 2, preempt: 1 }).await;
        assert!(matches!(lost, Err(BlockError::ReservationConflict)));
        // A newer nexus's registration (key 9) that has not taken the reservation yet.
        newer.register_key(9).await.unwrap();
        let keys = |ns: &Namespace| {
            let mut k: Vec<u64> = ns
                .reservations
                .state()
                .registrants
                .iter()
                .map(|r| r.key)
                .collect();
            k.sort_unstable();
            k
        };
        assert_eq!(keys(&ns), vec![2, 3, 9]);
        reserve(&next, ReservationKeys { key: 4, preempt: 3 })
            .await
            .unwrap();
        assert_eq!(keys(&ns), vec![4, 9], "2 and 3 dropped, 9 kept");
        assert_eq!(ns.reservations.state().holder_key(), Some(4));
        assert_eq!(ns.reservations.state().rtype, resv::EXCLUSIVE_ACCESS);
        next.write(0, Bytes::from(vec![4u8; 512])).await.unwrap();
    }

    #[tokio::test]
    async fn a_fenced_local_child_changes_nothing_by_any_command_class() {
        use crate::block::MissedWrites;
        use crate::pool::{Claim, Pool, PoolSpec};
        let disk = Arc::new(MemoryDevice::new(32 << 20, 512));
        let spec = PoolSpec {
            name: "p".into(),
            uuid: Uuid::new_v4(),
            cluster_size: 1 << 20,
        };
        let pool = Pool::create(disk, &spec, &Claim::new("n")).await.unwrap();
        let replica = pool
            .create_replica(Uuid::new_v4(), 4 << 20, None)
            .await
            .unwrap();
        let ns = Arc::new(Namespace {
            nsid: 1,
            uuid: Uuid::new_v4(),
            ana_group: 1,
            device: replica,
            reservations: Reservations::default(),
            stats: Default::default(),
        });
        let record = |child: &str| MissedWrites {
            child: child.into(),
            since_ms: 1,
            ranges: vec![(0, 4096)],
        };
        let old = LocalChild::new(ns.clone(), Uuid::new_v4());
        reserve(&old, ReservationKeys { key: 1, preempt: 0 })
            .await
            .unwrap();
        old.note_missed(&record("x")).await.unwrap();
        let new = LocalChild::new(ns.clone(), Uuid::new_v4());
        reserve(&new, ReservationKeys { key: 2, preempt: 1 })
            .await
            .unwrap();

        let conflict = |what: &str, r: Result<(), BlockError>| {
            assert!(
                matches!(r, Err(BlockError::ReservationConflict)),
                "{what}: {r:?}"
            );
        };
        conflict("write", old.write(0, Bytes::from(vec![2u8; 512])).await);
        conflict("write zeroes", old.write_zeroes(0, 512).await);
        conflict("deallocate", old.deallocate(0, 512).await);
        conflict("flush", old.flush().await);
        conflict("note", old.note_missed(&record("y")).await);
        conflict("forget", old.forget_missed("x").await);
        conflict("snapshot", old.snapshot(Uuid::new_v4()).await);
        // Exclusive Access: nothing is read either.
        conflict("missed", old.missed().await.map(drop));
        conflict("read", old.read(0, 512).await.map(drop));
        assert_eq!(pool.volumes().len(), 1, "no snapshot was taken");
        assert_eq!(new.missed().await.unwrap(), vec![record("x")]);

        new.forget_missed("x").await.unwrap();
        new.snapshot(Uuid::new_v4()).await.unwrap();
        assert!(new.missed().await.unwrap().is_empty());
    }
}
