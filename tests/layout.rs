//! The house: every room of `src/` imports only the rooms below it, so the tree reads as a frame
//! walks and no import loop can form. Read from the source files themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The rooms, bottom first: each may import only those before it.
const ORDER: &[&str] = &[
    "sync", "wire", "secrets", "shutdown", "stats", "frame", "images", "events", "source",
    "pipeline", "teach", "publish", "config", "ops", "app",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` → ["a", "b"]; `src/a/mod.rs` → ["a"].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The production code of a file: test modules and comments left out.
fn production_code(text: &str) -> String {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    code.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The rooms a file's code names: `crate::room::...` and, below the top, `super::...`.
fn rooms_named(module: &[String], code: &str) -> BTreeSet<String> {
    let mut rooms = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let room: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !room.is_empty() {
            rooms.insert(room);
        }
    }
    if code.contains("super::") && module.len() >= 2 {
        rooms.insert(module[0].clone());
    }
    rooms
}

fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let module = module_of(&src, &file);
        let Some(room) = module.first().cloned() else {
            continue;
        };
        if room == "lib" || room == "main" {
            continue;
        }
        let code = production_code(&std::fs::read_to_string(&file).unwrap());
        let named = rooms_named(&module, &code);
        let entry = graph.entry(room.clone()).or_default();
        entry.extend(named.into_iter().filter(|r| *r != room));
    }
    graph
}

#[test]
fn every_room_imports_only_the_rooms_below_it() {
    let graph = imports();
    let rank = |room: &str| ORDER.iter().position(|r| *r == room);
    let mut problems = Vec::new();
    for (room, named) in &graph {
        let Some(mine) = rank(room) else {
            problems.push(format!("src/{room} is not in the house's ORDER"));
            continue;
        };
        for other in named {
            match rank(other) {
                Some(theirs) if theirs < mine => {}
                Some(_) => problems.push(format!("{room} imports {other}, a room above it")),
                None => problems.push(format!("{room} imports {other}, which is not a room")),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The check above saw the real tree: the stages' rooms import what they must.
    assert!(graph["pipeline"].contains("source"), "{graph:?}");
    assert!(graph["app"].contains("ops"), "{graph:?}");
}

#[test]
fn the_bottom_imports_nothing_of_vigil_above_it() {
    let graph = imports();
    for bottom in ["sync", "wire", "frame"] {
        let named = graph.get(bottom).cloned().unwrap_or_default();
        assert!(
            named.iter().all(|r| ["sync", "wire"].contains(&r.as_str())),
            "{bottom} imports {named:?}"
        );
    }
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/vigil-engine/src");
    let mut files = Vec::new();
    rust_files(&engine, &mut files);
    for f in files {
        let code = std::fs::read_to_string(&f).unwrap();
        assert!(!code.contains("vigil::"), "{} imports vigil", f.display());
    }
}
