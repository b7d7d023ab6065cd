//! The module edges ARCHITECTURE.md promises for ha-agent, checked by reading the sources: the cluster agent and
//! the node agent never import each other (the node agent talks to the cluster agent through its API, as any
//! client; what both need to agree on, such as target addresses, is in `proto::names`).

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

/// The `crate::a::b...` paths a file names.
fn crate_paths(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .map(|(i, _)| {
            text[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect()
        })
        .collect()
}

#[test]
fn the_cluster_agent_and_the_node_agent_keep_their_edges() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for (file, text) in sources(&src.join("cluster")) {
        for p in crate_paths(&text) {
            assert!(
                !p.starts_with("node"),
                "{file} imports the node agent: crate::{p}"
            );
        }
    }
    for (file, text) in sources(&src.join("node")) {
        for p in crate_paths(&text) {
            assert!(
                !p.starts_with("cluster"),
                "{file} reaches into the cluster agent: crate::{p}"
            );
        }
    }
}
