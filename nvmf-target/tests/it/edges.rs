//! The module edges ARCHITECTURE.md promises, checked by reading the sources: each module imports only what it may.

use std::path::Path;

fn sources(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push((
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            ));
        }
    }
    out
}

/// Crate modules a file refers to with `crate::<module>`.
fn crate_refs(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .match_indices("crate::")
        .map(|(i, _)| {
            text[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Whether `text` names the crate `krate` as a path root (`proto::x`, not `prometheus::proto::x`).
fn uses_crate(text: &str, krate: &str) -> bool {
    let pat = format!("{krate}::");
    text.match_indices(&pat).any(|(i, _)| {
        !text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
    })
}

#[test]
fn modules_import_only_what_they_may() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rules: &[(&str, &[&str])] = &[
        ("protocol", &["protocol"]),
        ("block", &["block"]),
        ("transport.rs", &[]),
        ("io_threads.rs", &[]),
        (
            "target",
            &["target", "protocol", "block", "transport", "io_threads"],
        ),
        (
            "initiator",
            &["initiator", "protocol", "block", "transport", "io_threads"],
        ),
        ("rebuild", &["rebuild", "block"]),
        ("nexus", &["nexus", "block", "rebuild"]),
        ("pool", &["pool", "block"]),
    ];
    for (module, allowed) in rules {
        let path = src.join(module);
        let files = if path.is_dir() {
            sources(&path)
        } else {
            vec![(
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            )]
        };
        for (file, text) in files {
            for r in crate_refs(&text) {
                assert!(
                    allowed.contains(&r.as_str()),
                    "{file} uses crate::{r}; {module} may use only {allowed:?}"
                );
            }
        }
    }
    for (file, text) in sources(&src) {
        if file.contains("/api/") || file.contains("/bin/") {
            continue;
        }
        assert!(
            !uses_crate(&text, "tonic") && !uses_crate(&text, "proto"),
            "{file} uses tonic or proto outside api/"
        );
    }
}
