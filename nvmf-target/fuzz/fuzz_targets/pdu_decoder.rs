//! The PDU decoder on arbitrary bytes: the first byte picks the digests and the data limit the codec runs with;
//! the rest is a byte stream decoded PDU after PDU, fed in pieces of the sizes the second byte picks, as a socket
//! would deliver it. It must never panic, and every error must be a clean protocol error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nvmf_fuzz_harness::decode_stream(data);
});
