//! NVMe and NVMe/TCP wire formats: PDUs and their codec, submission and completion entries, status codes, Fabrics
//! commands, Identify structures and log pages, and the formats of Keelson's vendor commands (`vendor`). Pure code: nothing here does I/O or knows about targets, pools or
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
pub mod vendor;
