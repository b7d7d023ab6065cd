//! Reading a component's Prometheus metrics in a test: a plain HTTP/1.1 GET of the endpoint, and
//! `promtool check metrics` on the text (promtool: Debian package `prometheus`, installed by
//! `scripts/install-deps.sh`; a test asks [`crate::privileged::allowed_with`] for it first).

use std::io::{Read, Write};
use std::process::{Command, Stdio};

/// The whole HTTP response (status line, headers, body) to `GET path` at `addr`.
pub fn scrape(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request sent");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response read");
    out
}

/// Panics with promtool's complaints unless `promtool check metrics` accepts `body`.
pub fn promtool_check(body: &str) {
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/install-deps.sh installs it)");
    check
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(body.as_bytes())
        .expect("promtool reads its input");
    let out = check.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `series` (name and labels exactly as exposed, `name{a="b"}`), if present.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
