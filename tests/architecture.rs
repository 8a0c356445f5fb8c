//! The crate's layers import one way. A workspace of crates would enforce
//! this by construction; in one crate this test does: it reads `src/`,
//! derives each top-level module's `crate::` imports (in `use` lines and in
//! paths written inline), and fails on an edge that is not in [`ALLOWED`],
//! or on any cycle among the edges found.
//!
//! The layers, top to bottom:
//! `demo → sim → server → api → engine → cache → downstream → resilience →
//! auth / inbound → telemetry → deadline → config → error → component / pb`.
//! Test code (`#[cfg(test)]` and `tests.rs` files) may reach anywhere.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Each module and the modules it may import.
const ALLOWED: &[(&str, &[&str])] = &[
    ("demo", &["server", "sim", "config"]),
    (
        "sim",
        &[
            "server",
            "deadline",
            "component",
            "pb",
            "config",
            "telemetry",
        ],
    ),
    (
        "server",
        &[
            "api",
            "engine",
            "auth",
            "inbound",
            "downstream",
            "telemetry",
            "config",
            "component",
            "pb",
        ],
    ),
    (
        "api",
        &[
            "engine",
            "cache",
            "downstream",
            "auth",
            "inbound",
            "telemetry",
            "deadline",
            "error",
            "component",
            "pb",
        ],
    ),
    (
        "engine",
        &[
            "cache",
            "downstream",
            "resilience",
            "telemetry",
            "deadline",
            "config",
            "error",
            "component",
            "pb",
        ],
    ),
    (
        "cache",
        &[
            "resilience",
            "telemetry",
            "deadline",
            "config",
            "error",
            "component",
            "pb",
        ],
    ),
    (
        "downstream",
        &[
            "resilience",
            "telemetry",
            "deadline",
            "config",
            "error",
            "component",
            "pb",
        ],
    ),
    (
        "resilience",
        &["telemetry", "deadline", "config", "error", "component"],
    ),
    ("auth", &["telemetry", "config", "error", "component", "pb"]),
    ("inbound", &["telemetry", "error"]),
    ("telemetry", &["config", "error", "component"]),
    ("deadline", &["config", "error"]),
    ("config", &["component", "pb"]),
    ("error", &["component"]),
    ("component", &[]),
    ("pb", &[]),
];

/// The first path segment of every `crate::` reference in `code`:
/// `crate::a::b` gives `a`; `crate::{a::b, c}` gives `a` and `c`.
fn references(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Split the group's top level at commas.
            let (mut depth, mut start) = (0usize, 0usize);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(&group[start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

/// Source without test code and without line comments (docs may name any
/// module).
fn production_code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            walk(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// Top-level module → the other top-level modules it imports.
fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    walk(Path::new("src"), &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix("src").expect("under src");
        let first = relative
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let is_test_file = file.file_name().is_some_and(|n| n == "tests.rs");
        if first == "lib" || first == "main" || is_test_file {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read");
        let refs = references(&production_code(&text));
        let entry = edges.entry(first.clone()).or_default();
        entry.extend(refs.into_iter().filter(|r| *r != first));
    }
    edges
}

/// A cycle among `edges`, if there is one.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

#[test]
fn the_parser_finds_grouped_inline_and_nested_imports() {
    let code = "use crate::{a::b, c::{d, e::f}, g};\nfn x() { crate::h::i(); }";
    let found: Vec<_> = references(code).into_iter().collect();
    assert_eq!(found, ["a", "c", "g", "h"]);
    let looped: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "a")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), BTreeSet::from([v.to_string()])))
        .collect();
    assert!(cycle(&looped).is_some());
}

#[test]
fn layers_import_one_way() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let edges = edges();
    assert!(edges.len() >= 15, "found only {:?}", edges.keys());
    let mut wrong = Vec::new();
    for (module, imports) in &edges {
        let Some(ok) = allowed.get(module.as_str()) else {
            wrong.push(format!(
                "{module}: a new module; give it a place in ALLOWED"
            ));
            continue;
        };
        for import in imports {
            if !ok.contains(&import.as_str()) {
                wrong.push(format!("{module} → {import}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering (fix the import, or move the code down):\n{}",
        wrong.join("\n")
    );
    assert_eq!(cycle(&edges), None, "an import cycle");
}
