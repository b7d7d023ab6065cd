//! Locates the workspace's built binaries (`cargo build --workspace --bins` must have run; the test script does).

use std::path::PathBuf;

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Path of a built binary: `$KEELSON_BIN_DIR/<name>` or `target/debug/<name>`.
pub fn path(name: &str) -> PathBuf {
    let dir = std::env::var_os("KEELSON_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target").join("debug"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}
