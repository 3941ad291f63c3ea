//! Every crate `Cargo.toml` lists is used by the code: a dependency nothing
//! names is build time, audit surface and supply-chain risk for nothing
//! (`secrecy` and `humantime-serde` sat unused beside hand-written copies).

use std::fs;
use std::path::Path;

/// Listed only to switch a feature on in a crate another dependency pulls in
/// (see the comment beside them in `Cargo.toml`); no code names them.
const FEATURE_ONLY: [&str; 3] = ["aes", "ghash", "polyval"];

fn sources(dir: &Path, text: &mut String) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, text);
        } else if path.extension().is_some_and(|e| e == "rs") {
            text.push_str(&fs::read_to_string(&path).unwrap());
            text.push('\n');
        }
    }
}

/// `name::` as a path start, not the tail of a longer identifier.
fn names(text: &str, krate: &str) -> bool {
    let needle = format!("{krate}::");
    text.match_indices(&needle).any(|(at, _)| {
        !text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

#[test]
fn every_dependency_is_used() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Table = fs::read_to_string(root.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let mut text = String::new();
    for dir in ["src", "tools", "tests", "benches"] {
        if root.join(dir).is_dir() {
            sources(&root.join(dir), &mut text);
        }
    }
    let mut unused = Vec::new();
    for table in ["dependencies", "dev-dependencies"] {
        let Some(deps) = manifest.get(table).and_then(toml::Value::as_table) else {
            continue;
        };
        for name in deps.keys() {
            let krate = name.replace('-', "_");
            if !FEATURE_ONLY.contains(&name.as_str()) && !names(&text, &krate) {
                unused.push(format!("[{table}] {name}"));
            }
        }
    }
    assert!(
        unused.is_empty(),
        "no code names {unused:?}: remove them from Cargo.toml, or use them"
    );
}
