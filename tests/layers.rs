//! The layers of `src/`, checked: every top-level module may use only the
//! modules below it in [`LAYERS`], support modules only from the files
//! [`SUPPORT`] names, and the import graph has no circle.
//!
//! The check reads the source, not the compiler's view: it finds every
//! `crate::` path in code (`use crate::x`, `use crate::{x, y::z}`, and inline
//! paths such as `crate::x::f(`), with comments, doc comments and string
//! literals removed first. Test modules inside `src/` (`#[cfg(test)]`) are
//! checked like the rest: a unit test may not reach up either. Other layers
//! are reached only through `crate::` paths; a `super::` chain that climbs out
//! of its top-level module is refused, so nothing slips past the check.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, lowest first, each with why it sits there. A module may use
/// the modules listed before it and no other.
const LAYERS: &[(&str, &str)] = &[
    (
        "secret",
        "a wrapper that keeps values out of logs; needs nothing",
    ),
    (
        "model",
        "the domain types and their words (connections, rows, alerts, time); pure data",
    ),
    (
        "clock",
        "the wall clock and the test clock; speaks model time",
    ),
    ("crypto", "sealing of stored secrets; needs secret only"),
    (
        "acumatica",
        "the token client and the address rules; speaks model types",
    ),
    (
        "config",
        "the operator's settings as plain values; checks webhook hosts with acumatica's address rules",
    ),
    ("logging", "log setup from config"),
    (
        "store",
        "SQLite persistence of model types; opens the keyring from config's key settings",
    ),
    (
        "renewal",
        "the pure policy, alert conditions, scheduler and engine over the store",
    ),
    (
        "alerts",
        "outbox delivery, rendering, digest; opens authorization links through renewal",
    ),
    (
        "status",
        "the status report as data, read from store and alerts",
    ),
    (
        "service",
        "the connections use cases (add, set, remove, authorize, refresh, token) over store and renewal, for the CLI, the API and demo",
    ),
    (
        "sim",
        "the Acumatica simulator for tests and the demo; see SUPPORT",
    ),
    (
        "daemon",
        "the long-running process wiring renewal, alerts and status together",
    ),
    ("cli", "argument parsing, commands and all printing"),
    ("lib", "the crate root: declares the modules"),
    ("main", "the binary: calls cli"),
];

/// Modules that only the named files may use (besides the tests under
/// `tests/`, which this check does not read): the simulator is never part
/// of a production path.
const SUPPORT: &[(&str, &[&str])] = &[("sim", &["src/cli/demo.rs"])];

/// One `crate::` reference found in the source.
#[derive(Debug, Clone)]
struct Edge {
    from: String,
    to: String,
    file: String,
    line: usize,
}

/// `src/` of this crate.
fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source with comments and string and char literals blanked out
/// (newlines kept, so line numbers stay true).
fn code_only(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                blank(&mut out, b[i]);
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && (i == 0 || !is_ident(b[i - 1]))
            && raw_string_hashes(&b, i + 1).is_some()
        {
            let hashes = raw_string_hashes(&b, i + 1).unwrap_or(0);
            // r, the hashes and the opening quote.
            for _ in 0..hashes + 2 {
                out.push(' ');
            }
            i += hashes + 2;
            while i < b.len() {
                if b[i] == '"' && (1..=hashes).all(|k| b.get(i + k) == Some(&'#')) {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                blank(&mut out, b[i]);
                i += 1;
            }
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() {
                if b[i] == '\\' {
                    blank(&mut out, b[i]);
                    if let Some(&e) = b.get(i + 1) {
                        blank(&mut out, e);
                    }
                    i += 2;
                } else if b[i] == '"' {
                    out.push(' ');
                    i += 1;
                    break;
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if c == '\'' && next == Some('\\') {
            // An escaped char literal: up to the closing quote.
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '\'' {
                blank(&mut out, b[i]);
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && b.get(i + 2) == Some(&'\'') {
            out.push_str("   ");
            i += 3;
        } else {
            // Code, including lifetimes ('a).
            out.push(c);
            i += 1;
        }
    }
    out
}

/// After `r` at `i`: the number of `#` before the opening quote of a raw string.
fn raw_string_hashes(b: &[char], mut i: usize) -> Option<usize> {
    let start = i;
    while b.get(i) == Some(&'#') {
        i += 1;
    }
    (b.get(i) == Some(&'"')).then_some(i - start)
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn skip_space(b: &[char], mut i: usize) -> usize {
    while i < b.len() && b[i].is_whitespace() {
        i += 1;
    }
    i
}

fn ident_at(b: &[char], i: usize) -> (String, usize) {
    let mut j = i;
    while j < b.len() && is_ident(b[j]) {
        j += 1;
    }
    (b[i..j].iter().collect(), j)
}

/// The first segments of the items of a `{ ... }` group starting at `i`
/// (`{a, b::{c, d}, self}` gives `a`, `b`, `self`).
fn group_heads(b: &[char], i: usize) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect_head = true;
    let mut j = i;
    while j < b.len() {
        let c = b[j];
        match c {
            '{' => {
                depth += 1;
                expect_head = depth == 1;
                j += 1;
            }
            '}' => {
                depth -= 1;
                j += 1;
                if depth == 0 {
                    break;
                }
            }
            ',' => {
                expect_head = depth == 1;
                j += 1;
            }
            c if is_ident(c) => {
                let (word, k) = ident_at(b, j);
                if expect_head && depth == 1 {
                    heads.push(word);
                    expect_head = false;
                }
                j = k;
            }
            _ => j += 1,
        }
    }
    heads
}

/// The top-level module a file under `src/` belongs to, and how many module
/// levels deep the file is (`store/mod.rs` 1, `store/alerts.rs` 2).
fn module_of(rel: &Path) -> (String, usize) {
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let top = parts[0].trim_end_matches(".rs").to_string();
    let last = parts.last().map(String::as_str);
    let depth = if parts.len() == 1 {
        usize::from(top != "lib" && top != "main")
    } else if last == Some("mod.rs") {
        parts.len() - 1
    } else {
        parts.len()
    };
    (top, depth)
}

/// Every reference from `file` to another top-level module, and every
/// `super::` chain that climbs out of its own.
fn scan(text: &str, rel: &str, from: &str, depth: usize, problems: &mut Vec<String>) -> Vec<Edge> {
    let code: Vec<char> = code_only(text).chars().collect();
    let mut edges = Vec::new();
    let line_at = |i: usize| code[..i].iter().filter(|c| **c == '\n').count() + 1;
    // Inline `mod name { ... }` blocks: each adds a level `super` can climb.
    let mut braces = 0usize;
    let mut inline_mods: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < code.len() {
        match code[i] {
            '{' => braces += 1,
            '}' => {
                if inline_mods.last() == Some(&braces) {
                    inline_mods.pop();
                }
                braces = braces.saturating_sub(1);
            }
            _ => {}
        }
        if !is_ident(code[i]) || (i > 0 && is_ident(code[i - 1])) {
            i += 1;
            continue;
        }
        let (word, end) = ident_at(&code, i);
        if word == "mod" {
            let k = skip_space(&code, end);
            let (name, e) = ident_at(&code, k);
            let k = skip_space(&code, e);
            if !name.is_empty() && code.get(k) == Some(&'{') {
                inline_mods.push(braces + 1);
            }
        }
        let after_sep = |k: usize| {
            let k = skip_space(&code, k);
            (code.get(k) == Some(&':') && code.get(k + 1) == Some(&':'))
                .then(|| skip_space(&code, k + 2))
        };
        if word == "crate" {
            if let Some(k) = after_sep(end) {
                let targets = if code.get(k) == Some(&'{') {
                    group_heads(&code, k)
                } else {
                    vec![ident_at(&code, k).0]
                };
                for to in targets {
                    if to != "self" && !to.is_empty() && to != from {
                        edges.push(Edge {
                            from: from.to_string(),
                            to,
                            file: rel.to_string(),
                            line: line_at(i),
                        });
                    }
                }
            }
        } else if word == "super" {
            let mut climbs = 1;
            let mut k = end;
            while let Some(n) = after_sep(k) {
                let (w, e) = ident_at(&code, n);
                if w != "super" {
                    break;
                }
                climbs += 1;
                k = e;
            }
            if climbs >= depth + inline_mods.len() {
                problems.push(format!(
                    "{rel}:{}: a `super::` chain ({climbs} levels) climbs out of `{from}`; name another layer with a `crate::` path",
                    line_at(i)
                ));
            }
            i = k;
            continue;
        }
        i = end;
    }
    edges
}

fn all_edges(problems: &mut Vec<String>) -> (BTreeSet<String>, Vec<Edge>) {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut modules = BTreeSet::new();
    let mut edges = Vec::new();
    for f in files {
        let rel_path = f.strip_prefix(&src).expect("under src").to_path_buf();
        let rel = format!("src/{}", rel_path.display());
        let (module, depth) = module_of(&rel_path);
        modules.insert(module.clone());
        let text = fs::read_to_string(&f).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"));
        edges.extend(scan(&text, &rel, &module, depth, problems));
    }
    (modules, edges)
}

/// The layer rule: what goes against the order in [`LAYERS`] or [`SUPPORT`].
fn order_problems(modules: &BTreeSet<String>, edges: &[Edge]) -> Vec<String> {
    let rank: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .map(|(i, (m, _))| (*m, i))
        .collect();
    let mut problems = Vec::new();
    for m in modules {
        if !rank.contains_key(m.as_str()) {
            problems.push(format!(
                "src/{m}: module `{m}` has no place in LAYERS; add it with its reason"
            ));
        }
    }
    for (m, _) in LAYERS {
        if !modules.contains(*m) {
            problems.push(format!(
                "LAYERS names `{m}`, which is not a module in src/; remove it"
            ));
        }
    }
    for e in edges {
        let (Some(&f), Some(&t)) = (rank.get(e.from.as_str()), rank.get(e.to.as_str())) else {
            if !rank.contains_key(e.to.as_str()) {
                problems.push(format!(
                    "{}:{}: {} -> {}: `{}` is not a module in LAYERS",
                    e.file, e.line, e.from, e.to, e.to
                ));
            }
            continue;
        };
        if let Some((_, allowed)) = SUPPORT.iter().find(|(m, _)| *m == e.to)
            && !allowed.contains(&e.file.as_str())
        {
            problems.push(format!(
                "{}:{}: {} -> {}: `{}` is test and demo support; only {} may use it",
                e.file,
                e.line,
                e.from,
                e.to,
                e.to,
                allowed.join(", ")
            ));
        } else if t >= f {
            problems.push(format!(
                "{}:{}: {} -> {}: `{}` (layer {f}) may use only layers below it, and `{}` is layer {t}",
                e.file, e.line, e.from, e.to, e.from, e.to
            ));
        }
    }
    problems
}

/// Every knot of circles in the module graph (a strongly connected set of
/// modules), with one place for each edge inside it, whatever the table says:
/// a wrong table cannot hide a circle.
fn cycles(edges: &[Edge]) -> Vec<String> {
    let mut graph: BTreeMap<&str, BTreeMap<&str, &Edge>> = BTreeMap::new();
    for e in edges {
        graph.entry(e.to.as_str()).or_default();
        graph
            .entry(e.from.as_str())
            .or_default()
            .entry(e.to.as_str())
            .or_insert(e);
    }
    let reach = |from: &str| -> BTreeSet<&str> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(n) = stack.pop() {
            for &m in graph[n].keys() {
                if seen.insert(m) {
                    stack.push(m);
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&str, BTreeSet<&str>> = graph.keys().map(|&n| (n, reach(n))).collect();
    let rank = |m: &str| {
        LAYERS
            .iter()
            .position(|(l, _)| *l == m)
            .unwrap_or(usize::MAX)
    };
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for &n in graph.keys() {
        if done.contains(n) || !reachable[n].contains(n) {
            continue;
        }
        // The modules that reach n and that n reaches: n's knot.
        let knot: Vec<&str> = reachable[n]
            .iter()
            .copied()
            .filter(|m| reachable[m].contains(n))
            .collect();
        done.extend(knot.iter().copied());
        let mut text = format!("circle among {}:", knot.join(", "));
        for from in &knot {
            for (to, e) in &graph[from] {
                if knot.contains(to) {
                    let against = if rank(from) <= rank(to) {
                        "  <- against LAYERS"
                    } else {
                        ""
                    };
                    let _ = write!(
                        text,
                        "\n    {from} -> {to} at {}:{}{against}",
                        e.file, e.line
                    );
                }
            }
        }
        out.push(text);
    }
    out
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let mut problems = Vec::new();
    let (modules, edges) = all_edges(&mut problems);
    assert!(
        edges.len() > 50,
        "the scan found only {} edges: the reader is broken",
        edges.len()
    );
    problems.extend(order_problems(&modules, &edges));
    assert!(
        problems.is_empty(),
        "{} layer violation(s); LAYERS in tests/layers.rs gives the order:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_module_graph_has_no_circle() {
    let mut problems = Vec::new();
    let (_, edges) = all_edges(&mut problems);
    let circles = cycles(&edges);
    assert!(
        circles.is_empty(),
        "{} circle(s) between top-level modules:\n{}",
        circles.len(),
        circles.join("\n")
    );
}

/// The reader itself: the path forms it must see and the text it must not.
#[test]
fn the_reader_sees_every_path_form_and_ignores_comments_and_strings() {
    let src = r##"
use crate::a::X;
use crate::{b, c::{D, E}, self};
use crate :: f;
// use crate::comment;
/// [`crate::doc`]
/* crate::block /* nested crate::deeper */ */
let s = "crate::string \" crate::escaped";
let r = r#"crate::raw"#;
let q = '"'; let l: &'static str = x;
fn g() { crate::h::call(); }
"##;
    let mut problems = Vec::new();
    let edges = scan(src, "probe.rs", "z", 2, &mut problems);
    let got: Vec<(String, usize)> = edges.iter().map(|e| (e.to.clone(), e.line)).collect();
    let want: Vec<(String, usize)> = [("a", 2), ("b", 3), ("c", 3), ("f", 4), ("h", 11)]
        .into_iter()
        .map(|(m, l)| (m.to_string(), l))
        .collect();
    assert_eq!(got, want);
    assert!(problems.is_empty(), "{problems:?}");

    let mut problems = Vec::new();
    let climbs = "use super::super::store;\nuse super::sibling;\nmod tests {\n    use super::super::x;\n    use super::super::super::y;\n}\n";
    scan(climbs, "probe.rs", "z", 2, &mut problems);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("probe.rs:1:"), "{problems:?}");
    assert!(problems[1].starts_with("probe.rs:5:"), "{problems:?}");
}

/// Where a file's inline test module (`#[cfg(test)] mod tests { .. }`)
/// starts: test modules sit at the end of a file here. A `mod tests;` that
/// names a file of its own is not a cut.
fn test_module_start(code: &str) -> usize {
    let mut from = 0;
    while let Some(at) = code[from..].find("#[cfg(test)]").map(|i| i + from) {
        let rest = code[at + "#[cfg(test)]".len()..].trim_start();
        if rest.starts_with("mod ") {
            let brace = rest.find('{');
            let semi = rest.find(';');
            if brace.is_some_and(|b| semi.is_none_or(|s| b < s)) {
                return at;
            }
        }
        from = at + 1;
    }
    code.len()
}

/// Production code outside `src/store/`: every file but test files, without
/// its inline test module.
fn production_outside_store() -> Vec<(String, String)> {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&src).expect("under src").to_path_buf();
            let rel_s = rel.to_string_lossy().into_owned();
            let test_file = rel.file_name().is_some_and(|n| n == "tests.rs")
                || rel.components().any(|c| c.as_os_str() == "tests");
            if rel_s.starts_with("store/") || test_file {
                return None;
            }
            let text = fs::read_to_string(&p).expect("readable source");
            let code = code_only(&text);
            let cut = test_module_start(&code);
            Some((rel_s, code[..cut].to_string()))
        })
        .collect()
}

/// Only the store touches SQLite or PostgreSQL: outside `src/store/`, no
/// production code names a `rusqlite` or `tokio_postgres` type (the config
/// reads `store.url` with the client's own parser, and connects nowhere), takes the store's raw connection (`.db()`),
/// hands the store a closure that receives a transaction
/// (`.write(|tx, ..| ..)`) or builds its own blocking bridge; it calls the
/// store's named operations, which a second backend can offer too.
#[test]
fn only_the_store_touches_sqlite() {
    let mut found = Vec::new();
    for (rel, code) in production_outside_store() {
        for (n, line) in code.lines().enumerate() {
            let squeezed: String = line.split_whitespace().collect();
            // The blocking bridge is written once, in `store::blocking` (and
            // the handle); the key rotation's spill files are not the store.
            let bridge = line.contains("spawn_blocking") && rel != "daemon/rotate.rs";
            let postgres = line.contains("tokio_postgres") && rel != "config/postgres.rs";
            if line.contains("rusqlite")
                || postgres
                || squeezed.contains(".write(|")
                || squeezed.contains(".write(move|")
                || squeezed.contains(".db()")
                || bridge
            {
                found.push(format!("src/{rel}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "{} place(s) outside src/store/ reach SQLite directly; add a named store operation:\n{}",
        found.len(),
        found.join("\n")
    );
}
