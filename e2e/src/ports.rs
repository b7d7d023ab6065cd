//! Ports for processes a test starts and must tell where to listen. A port the kernel hands out for `bind(0)` comes
//! from the ephemeral range, which outgoing connections (the tests make many) draw from too: one of them can take it
//! between the test learning it and the process binding it. These ports come from below that range instead, each
//! once per test process, and are checked free when handed out.

use std::sync::atomic::{AtomicU32, Ordering};

/// The range handed out: below Linux's default ephemeral range (32768-60999), above the well-known ports.
const FIRST: u32 = 20000;
const COUNT: u32 = 12000;

/// A port free on `ip` now, never handed out before by this process, outside the ephemeral range.
pub fn free_port(ip: &str) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries of one `cargo test` run one after another, but a start point per process keeps two runs at once
    // (a developer's and CI's) apart too.
    let base = std::process::id() % 60 * 200;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (base + n) % COUNT) as u16;
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip} between {FIRST} and {}", FIRST + COUNT);
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_are_free_distinct_and_outside_the_ephemeral_range() {
        let a: Vec<u16> = (0..50).map(|_| super::free_port("127.0.0.1")).collect();
        let set: std::collections::BTreeSet<_> = a.iter().collect();
        assert_eq!(set.len(), a.len());
        assert!(a.iter().all(|p| (20000..32000).contains(p)), "{a:?}");
    }
}
