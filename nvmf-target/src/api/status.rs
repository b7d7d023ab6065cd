//! Engine errors as gRPC statuses: one place, one mapping.

use tonic::Status;

use crate::engine::EngineError;
use crate::pool::PoolError;
use crate::target::TargetError;

impl From<TargetError> for Status {
    fn from(e: TargetError) -> Status {
        let msg = e.to_string();
        match e {
            TargetError::NotFound(_) => Status::not_found(msg),
            TargetError::AlreadyExists(_) => Status::already_exists(msg),
            TargetError::InvalidArgument(_) => Status::invalid_argument(msg),
            TargetError::Exhausted(_) => Status::resource_exhausted(msg),
            TargetError::Listen { .. } => Status::unavailable(msg),
        }
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        use crate::nexus::NexusError;
        let msg = e.to_string();
        match e {
            EngineError::NotFound(_) => Status::not_found(msg),
            EngineError::AlreadyExists { .. } => Status::already_exists(msg),
            EngineError::Nexus { source, .. } => match source {
                NexusError::NoSuchChild(_) => Status::not_found(msg),
                NexusError::DuplicateChild(_) => Status::already_exists(msg),
                NexusError::LastHealthyChild(_) | NexusError::NoHealthyChild => {
                    Status::failed_precondition(msg)
                }
                NexusError::Snapshot { .. } | NexusError::Stopped | NexusError::ConsentPending => {
                    Status::unavailable(msg)
                }
                NexusError::ChildNotGrown { .. } | NexusError::Rebuilding(_) => {
                    Status::failed_precondition(msg)
                }
                NexusError::BadSize { .. } => Status::invalid_argument(msg),
                NexusError::NoChildren
                | NexusError::BlockSize { .. }
                | NexusError::TooSmall { .. } => Status::invalid_argument(msg),
            },
            EngineError::ChildMissing { .. } | EngineError::ChildUnreachable { .. } => {
                Status::unavailable(msg)
            }
            EngineError::ChildReservation { .. } => Status::failed_precondition(msg),
            EngineError::Target(t) => t.into(),
            // A request the backend refused before any I/O (a block size it does not take, a memory size
            // under one block) is the caller's invalid argument; the kernel's own EINVAL stays a backend failure.
            EngineError::Backend(crate::block::BlockError::Io(e))
                if e.kind() == std::io::ErrorKind::InvalidInput && e.raw_os_error().is_none() =>
            {
                Status::invalid_argument(format!("backend: {e}"))
            }
            EngineError::Backend(b) => Status::failed_precondition(format!("backend: {b}")),
            EngineError::InvalidArgument(m) => Status::invalid_argument(m),
            EngineError::Unavailable(m) => Status::unavailable(m),
            EngineError::FailedPrecondition(m) => Status::failed_precondition(m),
            EngineError::DiskInUse { .. } => Status::failed_precondition(msg),
            EngineError::Pool(p) => p.into(),
        }
    }
}

impl From<PoolError> for Status {
    fn from(e: PoolError) -> Status {
        let msg = e.to_string();
        match e {
            PoolError::InvalidArgument(_) => Status::invalid_argument(msg),
            PoolError::NotFound(_) => Status::not_found(msg),
            PoolError::AlreadyExists { .. } => Status::already_exists(msg),
            PoolError::NoSpace(_) | PoolError::MetadataFull(_) => Status::resource_exhausted(msg),
            PoolError::NoLabel | PoolError::ForeignData | PoolError::NotEmpty { .. } => {
                Status::failed_precondition(msg)
            }
            PoolError::CorruptLabel(_) | PoolError::CorruptMetadata(_) => Status::data_loss(msg),
            PoolError::OwnedByAnotherNode { .. } | PoolError::OwnershipLost { .. } => {
                Status::failed_precondition(msg)
            }
            // Destroying: asked again, the pool is either gone (NOT_FOUND) or kept (it was not empty).
            PoolError::Io(_) | PoolError::Faulted { .. } | PoolError::Destroying { .. } => {
                Status::unavailable(msg)
            }
        }
    }
}

pub fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use tonic::Code;

    use super::*;
    use crate::block::BlockError;
    use crate::engine::Resource;
    use crate::nexus::NexusError;

    #[test]
    fn engine_errors_map_to_the_codes_a_caller_branches_on_and_keep_their_cause() {
        let nexus = uuid::Uuid::new_v4();
        let cases: Vec<(EngineError, Code)> = vec![
            (
                EngineError::NotFound(Resource::Nexus(nexus)),
                Code::NotFound,
            ),
            (
                EngineError::AlreadyExists {
                    resource: Resource::Child {
                        nexus,
                        uri: "nvmf://a/b".into(),
                    },
                    conflict: "and is not faulted".into(),
                },
                Code::AlreadyExists,
            ),
            (
                EngineError::Nexus {
                    uuid: nexus,
                    source: NexusError::NoSuchChild("c".into()),
                },
                Code::NotFound,
            ),
            (
                EngineError::Nexus {
                    uuid: nexus,
                    source: NexusError::LastHealthyChild("c".into()),
                },
                Code::FailedPrecondition,
            ),
            (
                EngineError::ChildReservation {
                    uri: "local:///x".into(),
                    source: BlockError::ReservationConflict,
                },
                Code::FailedPrecondition,
            ),
            (
                EngineError::ChildMissing {
                    uri: "local:///x".into(),
                    what: Resource::Subsystem("x".into()),
                },
                Code::Unavailable,
            ),
            (
                PoolError::OwnedByAnotherNode {
                    pool: "p".into(),
                    owner: "n".into(),
                    incarnation: 3,
                }
                .into(),
                Code::FailedPrecondition,
            ),
        ];
        for (e, code) in cases {
            let has_source = matches!(
                e,
                EngineError::Nexus { .. } | EngineError::ChildReservation { .. }
            );
            assert_eq!(e.source().is_some(), has_source, "{e}");
            let msg = e.to_string();
            let st = Status::from(e);
            assert_eq!(st.code(), code, "{msg}");
            assert_eq!(st.message(), msg);
        }
    }
}
