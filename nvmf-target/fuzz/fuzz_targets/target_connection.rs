//! A target connection fed an arbitrary PDU stream: the first byte picks how far a valid session goes first (none,
//! ICReq, an admin queue, an I/O queue, an I/O queue with digests); the rest is sent as is. The target must answer
//! or close, never panic or hang (the harness fails a connection the target keeps open after the host's EOF).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nvmf_fuzz_harness::run_connection(data);
});
