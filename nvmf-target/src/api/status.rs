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
        match e {
            EngineError::Target(t) => t.into(),
            EngineError::Backend(b) => Status::failed_precondition(format!("backend: {b}")),
            EngineError::InvalidArgument(m) => Status::invalid_argument(m),
            EngineError::Unavailable(m) => Status::unavailable(m),
            EngineError::FailedPrecondition(m) => Status::failed_precondition(m),
            e @ EngineError::DiskInUse { .. } => Status::failed_precondition(e.to_string()),
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
            PoolError::AlreadyExists(_) => Status::already_exists(msg),
            PoolError::NoSpace(_) | PoolError::MetadataFull(_) => Status::resource_exhausted(msg),
            PoolError::NoLabel | PoolError::ForeignData | PoolError::FailedPrecondition(_) => {
                Status::failed_precondition(msg)
            }
            PoolError::CorruptLabel(_) | PoolError::CorruptMetadata(_) => Status::data_loss(msg),
            PoolError::OwnedByAnotherNode { .. } | PoolError::OwnershipLost { .. } => {
                Status::failed_precondition(msg)
            }
            PoolError::Io(_) => Status::unavailable(msg),
        }
    }
}

pub fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}
