//! Whether a test that needs privileges or tools this machine may lack (root for loop devices and network
//! namespaces, QEMU, promtool) runs here. Plain `cargo test` as a normal user skips such a test and says so on
//! stderr; `scripts/test.sh` sets `KEELSON_REQUIRE_PRIVILEGED=1`, under which a missing privilege or tool fails the
//! test instead, so CI (root, every tool installed) can never skip one silently.

use std::io::Write;

/// The variable that turns a skip into a failure.
pub const REQUIRE_VAR: &str = "KEELSON_REQUIRE_PRIVILEGED";

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| effective_uid(&s) == Some(0))
}

fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether `program` is on the PATH.
pub fn has_tool(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// Decides whether `test` runs: true when every need is met; otherwise false after saying why (or a panic when
/// [`REQUIRE_VAR`] is set). `needs` lists what it needs: `"root"` or a program name.
pub fn allowed_with(test: &str, needs: &[&str]) -> bool {
    let missing: Vec<&str> = needs
        .iter()
        .copied()
        .filter(|n| {
            if *n == "root" {
                !is_root()
            } else {
                !has_tool(n)
            }
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("{test} needs {}", missing.join(", "));
    assert!(
        std::env::var_os(REQUIRE_VAR).is_none(),
        "{why}, and {REQUIRE_VAR} is set"
    );
    // Written to the stderr handle itself, not through eprintln!, which the test harness captures and hides.
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {why} (scripts/test.sh runs it)"
    );
    false
}

/// [`allowed_with`] for a test that needs root.
pub fn allowed(test: &str) -> bool {
    allowed_with(test, &["root"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_uid() {
        let s = "Name:\tx\nUid:\t1000\t0\t1000\t1000\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(s), Some(0));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn a_test_needing_nothing_runs() {
        assert!(allowed_with("t", &[]));
        assert!(has_tool("sh"));
    }
}
