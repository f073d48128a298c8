//! The tree reads as a pipeline only while its top-level modules do not import each other in a
//! circle: this test reads `detector/src` and fails on any cycle of `crate::<module>` references
//! between top-level modules (and between the engine's own modules), naming the cycle.
//! Test-only code (`tests.rs`, `*_tests.rs`, `testutil.rs`, the `#[cfg(test)]` module at the end
//! of a file) is left out: tests may reach across layers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn is_test_file(p: &Path) -> bool {
    let name = p.file_name().unwrap().to_str().unwrap();
    name == "tests.rs" || name.ends_with("_tests.rs") || name == "testutil.rs"
}

/// The file's production code: up to its inline `#[cfg(test)] mod NAME {` block (a
/// `#[cfg(test)] mod tests;` declaration does not end it), without `//` comments.
fn production_code(text: &str) -> String {
    let end = text
        .match_indices("#[cfg(test)]\nmod ")
        .find(|(i, m)| {
            text[i + m.len()..]
                .lines()
                .next()
                .is_some_and(|l| l.trim_end().ends_with('{'))
        })
        .map_or(text.len(), |(i, _)| i);
    text[..end]
        .lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers that follow `prefix` in `code` (`crate::engine::x` gives `engine`), with
/// grouped paths expanded (`super::{flow_id::X, verdict}` gives `flow_id` and `verdict`).
fn referenced(code: &str, prefix: &str) -> BTreeSet<String> {
    let ident = |s: &str| {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<String>()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices(prefix) {
        let rest = &code[i + prefix.len()..];
        let Some(group) = rest.strip_prefix('{') else {
            out.insert(ident(rest));
            continue;
        };
        // The group's items at depth 0: each starts with a module name.
        let mut depth = 0;
        let mut item_start = true;
        for (j, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                c if item_start && !c.is_whitespace() => {
                    out.insert(ident(&group[j..]));
                    item_start = false;
                }
                _ => {}
            }
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

/// A cycle in `edges`, if any, as the modules along it.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut cycle = path[at..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

/// Module graph of the files under `dir`, grouped by their first path component below `dir`
/// (a file `x.rs` or a directory `x/`), with edges from the references `refs` finds.
fn graph(
    dir: &Path,
    refs: impl Fn(&str) -> BTreeSet<String>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files.iter().filter(|f| !is_test_file(f)) {
        let rel = f.strip_prefix(dir).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" || module == "mod" {
            continue;
        }
        let code = production_code(&std::fs::read_to_string(f).unwrap());
        let out = edges.entry(module.clone()).or_default();
        out.extend(refs(&code).into_iter().filter(|m| *m != module));
    }
    // Only edges to modules of this graph.
    let known: BTreeSet<String> = edges.keys().cloned().collect();
    for out in edges.values_mut() {
        out.retain(|m| known.contains(m));
    }
    edges
}

#[test]
fn top_level_modules_import_each_other_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = graph(&src, |code| referenced(code, "crate::"));
    assert!(edges.len() > 10, "found only {:?}", edges.keys());
    assert!(
        edges["pipeline"].contains("engine"),
        "the reader found no edges"
    );
    if let Some(c) = find_cycle(&edges) {
        panic!("import cycle between top-level modules: {}", c.join(" -> "));
    }
}

#[test]
fn engine_modules_import_each_other_without_cycles() {
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let edges = graph(&engine, |code| {
        let mut r = referenced(code, "super::");
        r.extend(referenced(code, "crate::engine::"));
        r
    });
    assert!(
        edges["decide"].contains("verdict"),
        "the reader found no edges"
    );
    if let Some(c) = find_cycle(&edges) {
        panic!("import cycle between engine modules: {}", c.join(" -> "));
    }
}

#[test]
fn grouped_paths_name_each_module() {
    let r = referenced(
        "use super::{flow_id::{FlowId, NO_EVENT}, verdict::X, self};\nuse super::shadow::Y;",
        "super::",
    );
    assert_eq!(
        r.into_iter().collect::<Vec<_>>(),
        ["flow_id", "shadow", "verdict"]
    );
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("c".into());
    edges.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&edges).unwrap(), ["a", "b", "c", "a"]);
    edges.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&edges), None);
}
