//! `keelctl engine pool|replica|snapshot ...`: a storage node's pools, replicas, snapshots and clones.
//! Lists print one line per object: `pool NAME UUID DISK capacity= allocated= committed= replicas= snapshots=`,
//! `replica UUID POOL size= allocated= NQN|- hosts=`, `snapshot UUID REPLICA POOL size= referenced=`.

use anyhow::Result;
use clap::Subcommand;
use proto::engine as pb;
use proto::engine::engine_client::EngineClient;
use tonic::transport::Channel;

/// Bytes, with an optional KiB/MiB/GiB/TiB (or K/M/G/T) suffix.
pub fn size(s: &str) -> Result<u64, String> {
    let units = [("t", 40), ("g", 30), ("m", 20), ("k", 10)];
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches("ib").trim_end_matches('b');
    let (num, shift) = units
        .iter()
        .find_map(|(u, sh)| lower.strip_suffix(u).map(|n| (n, *sh)))
        .unwrap_or((lower, 0));
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is not a size like 4096, 64MiB or 1GiB"))
}

#[derive(Subcommand)]
pub enum PoolCmd {
    /// List pools.
    List,
    /// Create a pool on a blank disk, or import the pool of that name already on it.
    Create {
        name: String,
        disk: String,
        #[arg(long, default_value = "")]
        uuid: String,
        /// Cluster size (default 4MiB).
        #[arg(long, value_parser = size, default_value = "0")]
        cluster_size: u64,
    },
    /// Import the pool on a disk (never formats).
    Import {
        disk: String,
        /// Take the pool even if its label names another node as owner (that node is gone or the disk moved).
        #[arg(long)]
        force: bool,
    },
    /// Destroy an empty pool (wipes its label).
    Destroy { name: String },
}

#[derive(Subcommand)]
pub enum ReplicaCmd {
    List,
    /// Create a thin replica.
    Create {
        pool: String,
        uuid: String,
        #[arg(value_parser = size)]
        size: u64,
        /// Export it over NVMe/TCP.
        #[arg(long)]
        share: bool,
        /// Host NQN allowed to connect (repeat); none = any host.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    Destroy {
        uuid: String,
    },
    /// Grow a replica online (never shrinks).
    Resize {
        uuid: String,
        #[arg(value_parser = size)]
        size: u64,
    },
    /// Export a replica (or change who may connect).
    Share {
        uuid: String,
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    Unshare {
        uuid: String,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    List,
    /// Snapshot a replica.
    Create {
        replica: String,
        uuid: String,
    },
    Destroy {
        uuid: String,
    },
    /// Create a replica from a snapshot.
    Clone {
        snapshot: String,
        uuid: String,
        #[arg(long)]
        share: bool,
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

fn print_pool(p: &pb::Pool) {
    println!(
        "pool {} {} {} capacity={} allocated={} committed={} cluster={} replicas={} snapshots={} no_space_errors={} \
         owner={} incarnation={} block={}{}{}{}",
        p.name,
        p.uuid,
        p.disk,
        p.capacity,
        p.allocated,
        p.committed,
        p.cluster_size,
        p.replicas,
        p.snapshots,
        p.no_space_errors,
        p.owner,
        p.incarnation,
        p.block_size,
        p.disk_room
            .map_or(String::new(), |r| format!(" disk_room={r}")),
        p.replica_room
            .map_or(String::new(), |r| format!(" replica_room={r}")),
        if p.disk_full { " DISK-FULL" } else { "" }
    );
    if !p.fault.is_empty() {
        println!(
            "  faulted (no writes until the engine imports it again): {}",
            p.fault
        );
    }
}

fn print_replica(r: &pb::Replica) {
    let nqn = if r.uri.is_empty() {
        "-"
    } else {
        r.uri.as_str()
    };
    println!(
        "replica {} {} size={} allocated={} {nqn} hosts={}",
        r.uuid,
        r.pool,
        r.size,
        r.allocated,
        r.allowed_hosts.join(";")
    );
}

fn print_snapshot(s: &pb::Snapshot) {
    println!(
        "snapshot {} {} {} size={} referenced={}",
        s.uuid, s.replica, s.pool, s.size, s.referenced
    );
}

pub async fn pool(c: &mut EngineClient<Channel>, cmd: PoolCmd) -> Result<()> {
    match cmd {
        PoolCmd::List => {
            let r = c.list_pools(pb::ListPoolsRequest {}).await?.into_inner();
            r.pools.iter().for_each(print_pool);
            for p in &r.pending {
                println!(
                    "pending pool {} {} attempts={} {}: {}",
                    p.name,
                    p.disk,
                    p.attempts,
                    if p.retrying {
                        "retrying"
                    } else {
                        "NOT RETRYING (fix the configuration)"
                    },
                    p.error
                );
            }
        }
        PoolCmd::Create {
            name,
            disk,
            uuid,
            cluster_size,
        } => {
            let req = pb::CreatePoolRequest {
                name,
                disk,
                uuid,
                cluster_size: u32::try_from(cluster_size)?,
                block_size: 0,
            };
            print_pool(&c.create_pool(req).await?.into_inner());
        }
        PoolCmd::Import { disk, force } => print_pool(
            &c.import_pool(pb::ImportPoolRequest { disk, force })
                .await?
                .into_inner(),
        ),
        PoolCmd::Destroy { name } => {
            c.destroy_pool(pb::DestroyPoolRequest { name }).await?;
        }
    }
    Ok(())
}

pub async fn replica(c: &mut EngineClient<Channel>, cmd: ReplicaCmd) -> Result<()> {
    match cmd {
        ReplicaCmd::List => {
            let r = c
                .list_replicas(pb::ListReplicasRequest {})
                .await?
                .into_inner();
            r.replicas.iter().for_each(print_replica);
        }
        ReplicaCmd::Create {
            pool,
            uuid,
            size,
            share,
            hosts,
        } => {
            let req = pb::CreateReplicaRequest {
                pool,
                uuid,
                size,
                share,
                allowed_hosts: hosts,
            };
            print_replica(&c.create_replica(req).await?.into_inner());
        }
        ReplicaCmd::Destroy { uuid } => {
            c.destroy_replica(pb::DestroyReplicaRequest { uuid })
                .await?;
        }
        ReplicaCmd::Resize { uuid, size } => print_replica(
            &c.resize_replica(pb::ResizeReplicaRequest { uuid, size })
                .await?
                .into_inner(),
        ),
        ReplicaCmd::Share { uuid, hosts } => {
            let req = pb::ShareReplicaRequest {
                uuid,
                allowed_hosts: hosts,
            };
            print_replica(&c.share_replica(req).await?.into_inner());
        }
        ReplicaCmd::Unshare { uuid } => print_replica(
            &c.unshare_replica(pb::UnshareReplicaRequest { uuid })
                .await?
                .into_inner(),
        ),
    }
    Ok(())
}

pub async fn snapshot(c: &mut EngineClient<Channel>, cmd: SnapshotCmd) -> Result<()> {
    match cmd {
        SnapshotCmd::List => {
            let r = c
                .list_snapshots(pb::ListSnapshotsRequest {})
                .await?
                .into_inner();
            r.snapshots.iter().for_each(print_snapshot);
        }
        SnapshotCmd::Create { replica, uuid } => print_snapshot(
            &c.create_snapshot(pb::CreateSnapshotRequest { replica, uuid })
                .await?
                .into_inner(),
        ),
        SnapshotCmd::Destroy { uuid } => {
            c.destroy_snapshot(pb::DestroySnapshotRequest { uuid })
                .await?;
        }
        SnapshotCmd::Clone {
            snapshot,
            uuid,
            share,
            hosts,
        } => {
            let req = pb::CreateCloneRequest {
                snapshot,
                uuid,
                share,
                allowed_hosts: hosts,
            };
            print_replica(&c.create_clone(req).await?.into_inner());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size("64MiB"), Ok(64 << 20));
        assert_eq!(size("1g"), Ok(1 << 30));
        assert_eq!(size("2KiB"), Ok(2048));
        assert!(size("x").is_err());
        assert!(size("99999999999T").is_err());
    }
}
