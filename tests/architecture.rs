//! The layout rule of `docs/design.md`: the offline tools and the modules they share depend on
//! the archive contract, the store, the Kafka client configuration, the configuration, the topic
//! selection and the record type, never on the daemon's pipeline stages (nor the shared modules
//! on the tools).
//! A tool reads what the archiver wrote, not how it got there; a second archive format then
//! slots into `archive` without touching the tools' imports of the stages.

use std::path::{Path, PathBuf};

/// What each group of files may name after `crate::`.
const RULES: &[(&str, &[&str])] = &[
    ("src/tools", &["archive", "config", "exit", "kafka", "record", "store", "tools", "topics"]),
    ("src/archive", &["archive", "record"]),
    ("src/store.rs", &["config"]),
    ("src/kafka.rs", &["config", "record", "topics"]),
    ("src/config.rs", &["archive", "config", "topics"]),
    ("src/record.rs", &[]),
    ("src/topics.rs", &[]),
];

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The source without comments, string and char literals (each replaced by a space), so that a
/// comment mentioning the pipeline is not an import of it.
fn code_only(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let (mut out, mut i) = (String::with_capacity(src.len()), 0);
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !prev_is_ident(&b, i) {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
            out.push(' ');
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                i += if b[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(' ');
        } else if c == '\'' && (next == Some('\\') || b.get(i + 2) == Some(&'\'')) {
            // A char literal ('x', '\n', '\''); a lifetime has no closing quote.
            i += if next == Some('\\') { 2 } else { 1 };
            while i < b.len() && b[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push(' ');
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_is_ident(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

/// The first path segment after every `crate::` (and `super::super::` from a subfolder), with
/// `crate::{a, b::c}` groups taken apart.
fn crate_modules(code: &str) -> Vec<String> {
    let code = code.split_whitespace().collect::<Vec<_>>().join(" ").replace(" ::", "::").replace(":: ", "::");
    let mut out = Vec::new();
    for start in ["crate::", "super::super::"] {
        for (at, _) in code.match_indices(start) {
            if at > 0 && code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let rest = &code[at + start.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let (mut depth, mut item, mut first) = (0, String::new(), true);
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            first = true;
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 && first && (c.is_alphanumeric() || c == '_') {
                        item.push(c);
                    } else if !item.is_empty() {
                        out.push(std::mem::take(&mut item));
                        first = false;
                    }
                }
                if !item.is_empty() {
                    out.push(item);
                }
            } else {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                out.push(name);
            }
        }
    }
    out
}

/// Every `file: crate::module` that breaks the rules, in the crate at `root`.
fn violations(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for (place, allowed) in RULES {
        for file in rust_files(&root.join(place)) {
            let code = code_only(&std::fs::read_to_string(&file).unwrap());
            for module in crate_modules(&code) {
                // Items of lib.rs itself (crate::SPOOL_CACHE_BYTES, crate::RunError) are wiring too.
                if !allowed.contains(&module.as_str()) {
                    out.push(format!("{}: crate::{module}", file.strip_prefix(root).unwrap().display()));
                }
            }
        }
    }
    out
}

#[test]
fn tools_and_shared_modules_never_use_the_pipeline_stages() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tools = rust_files(&root.join("src/tools"));
    assert!(tools.len() >= 4, "the tools folder holds check, verify, restore, bench-store: {tools:?}");
    let found = violations(root);
    assert!(
        found.is_empty(),
        "these files use modules outside what docs/design.md allows them (tools and shared modules \
         never depend on the pipeline stages):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_rule_sees_every_way_of_naming_a_module() {
    let code = code_only(
        r#"
        // use crate::pipeline::upload;  (a comment is not an import)
        const S: &str = "crate::pipeline::status";
        use crate::archive::{self, Plan};
        use crate::{config::Config, pipeline::{commit, upload}};
        use crate :: spool :: Spool;
        fn f<'a>(c: char) -> bool { c == '{' || c == '\'' }
        let _ = super::super::pipeline::status::Status::new();
        let _ = crate::store::build(&c);
    "#,
    );
    assert_eq!(crate_modules(&code), ["archive", "config", "pipeline", "spool", "store", "pipeline"]);
}
