//! The end-to-end harness: runs Keelson's real binaries as separate processes, in network namespaces the test
//! creates, and boots a QEMU VM whose Debian kernel is the NVMe/TCP initiator.
//!
//! - [`bins`]: where the built binaries are.
//! - [`cluster`]: a cluster agent and io-engines in a network namespace, keelctl, binaries staged for the guest.
//! - [`metrics`]: scraping a `/metrics` endpoint and checking it with promtool.
//! - [`netns`]: a private network namespace with a tap device for the VM.
//! - [`ports`]: ports for the processes a test starts, outside the kernel's ephemeral range.
//! - [`privileged`]: whether a test that needs root or a tool runs here (plain `cargo test` as a user skips it and
//!   says so; `scripts/test.sh` makes it fail instead). The data plane's own tests use it too.
//! - [`process`]: a child process that is killed when the test drops it.
//! - [`vm`]: builds the guest image once and runs a job in the guest, answering its `@@HOST` requests.
//!
//! Tests that use the VM or network namespaces need root and QEMU: without them they skip under plain `cargo test`
//! and fail under `scripts/test.sh` (`KEELSON_REQUIRE_PRIVILEGED=1`), which CI runs as root.

pub mod bins;
pub mod cluster;
pub mod loopdev;
pub mod metrics;
pub mod netns;
pub mod ports;
pub mod privileged;
pub mod process;
pub mod vm;
