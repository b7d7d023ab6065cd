//! The end-to-end harness: runs Keelson's real binaries as separate processes, in network namespaces the test
//! creates, and boots a QEMU VM whose Debian kernel is the NVMe/TCP initiator.
//!
//! - [`bins`]: where the built binaries are.
//! - [`netns`]: a private network namespace with a tap device for the VM.
//! - [`process`]: a child process that is killed when the test drops it.
//! - [`vm`]: builds the guest image once and runs a job in the guest, answering its `@@HOST` requests.
//!
//! Tests that use the VM or network namespaces need root; they fail (never skip) without it, since CI runs as root.

pub mod bins;
pub mod netns;
pub mod process;
pub mod vm;
