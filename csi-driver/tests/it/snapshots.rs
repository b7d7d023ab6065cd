//! Snapshots and clones through the Controller: idempotent snapshots by name, listing and paging, volumes made from
//! a snapshot or a volume holding its data (written and read over NVMe/TCP with Keelson's initiator, as the
//! volume's host).

use bytes::Bytes;
use nvmf_target::block::BlockDevice;
use proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use proto::csi::*;
use tonic::Code;

use crate::controller::{code, create};
use crate::harness::{Cluster, attach, detach, pools_empty};

const MIB: i64 = 1 << 20;

fn pattern(seed: u8) -> Bytes {
    Bytes::from(
        (0..MIB as usize)
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_clones_hold_the_data_they_were_taken_from() {
    let c = Cluster::start(3).await;
    let mut ctl = c.controller().await;
    let v = ctl
        .create_volume(create("pvc-src", 8 * MIB, &[("repl", "2")]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let ns = attach(&mut ctl, &v.volume_id, "worker-1").await;
    ns.write(0, pattern(3)).await.unwrap();

    // Snapshot while published: idempotent by name; the name on another volume is ALREADY_EXISTS.
    let snap_req = |name: &str, vol: &str| CreateSnapshotRequest {
        source_volume_id: vol.into(),
        name: name.into(),
        ..Default::default()
    };
    let s = ctl
        .create_snapshot(snap_req("snap-1", &v.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(s.ready_to_use, "{s:?}");
    assert_eq!(s.source_volume_id, v.volume_id);
    assert_eq!(s.size_bytes, 8 * MIB);
    assert!(s.creation_time.unwrap().seconds > 1_700_000_000);
    // Asked again, with what the snapshotter adds under --extra-create-metadata: the same snapshot.
    let mut with_metadata = snap_req("snap-1", &v.volume_id);
    with_metadata.parameters = [
        ("csi.storage.k8s.io/volumesnapshot/name", "snap-1"),
        ("csi.storage.k8s.io/volumesnapshot/namespace", "default"),
        (
            "csi.storage.k8s.io/volumesnapshotcontent/name",
            "snapcontent-1",
        ),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .into();
    let again = ctl
        .create_snapshot(with_metadata)
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, s.snapshot_id);
    let other = ctl
        .create_volume(create("pvc-other", 4 * MIB, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (got, msg) = code(
        ctl.create_snapshot(snap_req("snap-1", &other.volume_id))
            .await,
    );
    assert_eq!(got, Code::AlreadyExists, "{msg}");
    for (req, want) in [
        (snap_req("", &v.volume_id), Code::InvalidArgument),
        (snap_req("snap-x", ""), Code::InvalidArgument),
        (
            snap_req("snap-x", "00000000-0000-4000-8000-000000000099"),
            Code::NotFound,
        ),
        (snap_req("snap-x", "not-a-volume"), Code::NotFound),
    ] {
        assert_eq!(code(ctl.create_snapshot(req).await).0, want);
    }
    // Data written after the snapshot is not in it.
    ns.write(0, pattern(5)).await.unwrap();
    ctl.create_snapshot(snap_req("snap-2", &v.volume_id))
        .await
        .unwrap();
    ctl.create_snapshot(snap_req("snap-3", &other.volume_id))
        .await
        .unwrap();

    // Listing: all, by volume, by id, in pages; a bad token is ABORTED.
    let list = |vol: &str, id: &str, max: i32, token: &str| ListSnapshotsRequest {
        source_volume_id: vol.into(),
        snapshot_id: id.into(),
        max_entries: max,
        starting_token: token.into(),
        ..Default::default()
    };
    let all = ctl
        .list_snapshots(list("", "", 0, ""))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(all.len(), 3);
    let of_v = ctl
        .list_snapshots(list(&v.volume_id, "", 0, ""))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(of_v.len(), 2);
    let one = ctl
        .list_snapshots(list("", &s.snapshot_id, 0, ""))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(one.len(), 1);
    let none = ctl
        .list_snapshots(list("", "00000000-0000-4000-8000-000000000099", 0, ""))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(none.is_empty());
    let p1 = ctl
        .list_snapshots(list("", "", 2, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.entries.len(), 2);
    let p2 = ctl
        .list_snapshots(list("", "", 2, &p1.next_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.entries.len(), 1);
    assert!(p2.next_token.is_empty());
    assert_eq!(
        code(ctl.list_snapshots(list("", "", 2, "zz")).await).0,
        Code::Aborted
    );
    let got = ctl
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.snapshot.unwrap().snapshot_id, s.snapshot_id);

    // A volume from the first snapshot holds the first data; a clone of the volume holds the second.
    // bytes 0: no capacity range (the source's size).
    let from = |name: &str, src: SourceType, bytes: i64| CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource { r#type: Some(src) }),
        capacity_range: (bytes > 0).then_some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..create(name, bytes, &[("repl", "2")])
    };
    let snap_src = SourceType::Snapshot(SnapshotSource {
        snapshot_id: s.snapshot_id.clone(),
    });
    let restored = ctl
        .create_volume(from("pvc-restored", snap_src.clone(), 8 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 8 * MIB);
    assert!(matches!(
        restored
            .content_source
            .as_ref()
            .and_then(|c| c.r#type.as_ref()),
        Some(SourceType::Snapshot(_))
    ));
    detach(&mut ctl, ns, &v.volume_id, "worker-1").await;
    let clone = ctl
        .create_volume(from(
            "pvc-clone",
            SourceType::Volume(VolumeSource {
                volume_id: v.volume_id.clone(),
            }),
            0,
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(matches!(
        clone
            .content_source
            .as_ref()
            .and_then(|c| c.r#type.as_ref()),
        Some(SourceType::Volume(_))
    ));
    // Restored into a larger claim: made at the snapshot's size, grown to the claim's (again: the same volume);
    // a limit below the snapshot's size cannot be met.
    let big = ctl
        .create_volume(from("pvc-big", snap_src.clone(), 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(big.capacity_bytes, 16 * MIB);
    let again_big = ctl
        .create_volume(from("pvc-big", snap_src.clone(), 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (again_big.volume_id.as_str(), again_big.capacity_bytes),
        (big.volume_id.as_str(), 16 * MIB)
    );
    let mut small = from("pvc-small", snap_src.clone(), 0);
    small.capacity_range = Some(CapacityRange {
        required_bytes: 0,
        limit_bytes: 4 * MIB,
    });
    let (got, msg) = code(ctl.create_volume(small).await);
    assert_eq!(got, Code::OutOfRange, "{msg}");
    // Restored into a claim no pool can hold: refused, and the copy made before its growth was refused goes (the
    // CO never got the volume, so it would never delete it).
    let (got, msg) = code(
        ctl.create_volume(from("pvc-huge", snap_src.clone(), 1 << 40))
            .await,
    );
    assert_eq!(got, Code::OutOfRange, "{msg}");
    let huge = csi_driver::names::volume_uuid("pvc-huge").to_string();
    let mut cl = c.cluster().await;
    let t = std::time::Instant::now();
    while let Ok(v) = cl
        .get_volume(proto::cluster::GetVolumeRequest { uuid: huge.clone() })
        .await
    {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(15),
            "the volume made for a claim refused is still there: {:?}",
            v.into_inner()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (got, _) = code(
        ctl.create_volume(from(
            "pvc-none",
            SourceType::Snapshot(SnapshotSource {
                snapshot_id: "00000000-0000-4000-8000-000000000099".into(),
            }),
            0,
        ))
        .await,
    );
    assert_eq!(got, Code::NotFound);

    let ns = attach(&mut ctl, &restored.volume_id, "worker-2").await;
    assert_eq!(ns.read(0, MIB as u64).await.unwrap(), pattern(3));
    detach(&mut ctl, ns, &restored.volume_id, "worker-2").await;
    let ns = attach(&mut ctl, &big.volume_id, "worker-2").await;
    assert_eq!(ns.size_bytes(), 16 * MIB as u64);
    assert_eq!(ns.read(0, MIB as u64).await.unwrap(), pattern(3));
    assert_eq!(
        ns.read(8 * MIB as u64, MIB as u64).await.unwrap(),
        vec![0u8; MIB as usize],
        "the grown part reads zeros"
    );
    detach(&mut ctl, ns, &big.volume_id, "worker-2").await;
    let ns = attach(&mut ctl, &clone.volume_id, "worker-2").await;
    assert_eq!(ns.read(0, MIB as u64).await.unwrap(), pattern(5));
    detach(&mut ctl, ns, &clone.volume_id, "worker-2").await;

    // Delete everything, twice; nothing is left.
    for id in [&s.snapshot_id, &again.snapshot_id] {
        ctl.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert_eq!(
        code(ctl.delete_snapshot(DeleteSnapshotRequest::default()).await).0,
        Code::InvalidArgument
    );
    let left = ctl
        .list_snapshots(list("", "", 0, ""))
        .await
        .unwrap()
        .into_inner()
        .entries;
    for e in left {
        ctl.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: e.snapshot.unwrap().snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for id in [
        &big.volume_id,
        &clone.volume_id,
        &restored.volume_id,
        &other.volume_id,
        &v.volume_id,
    ] {
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    pools_empty(&c).await;
    let mut cl = c.cluster().await;
    let snaps = cl
        .list_snapshots(proto::cluster::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert!(snaps.is_empty(), "{snaps:?}");
}
