//! NVMe and NVMe/TCP wire formats: PDUs and their codec, submission and completion entries, status codes, Fabrics
//! commands, Identify structures and log pages. Pure code: nothing here does I/O or knows about targets, pools or
//! nexuses.

pub mod codec;
pub mod command;
pub mod completion;
pub mod fabrics;
pub mod identify;
pub mod log;
pub mod nqn;
pub mod pdu;
pub mod status;
