//! `docs/ARCHITECTURE.md` stays true: every function its tables name exists in the file
//! they name, and every file it names exists.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// (function, file) of every table row whose last two cells are `` `fn` `` and `` `path` ``.
fn named_functions(doc: &str) -> Vec<(String, String)> {
    doc.lines()
        .filter(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            let [.., function, file] = cells.as_slice() else {
                return None;
            };
            let unquote = |s: &str| {
                s.strip_prefix('`')
                    .and_then(|s| s.strip_suffix('`'))
                    .map(str::to_owned)
            };
            let (function, file) = (unquote(function)?, unquote(file)?);
            file.ends_with(".rs").then_some((function, file))
        })
        .collect()
}

/// Whether `source` defines a function `name` (free, method or async).
fn defines(source: &str, name: &str) -> bool {
    source.lines().any(|l| {
        let l = l.trim_start();
        let l = l
            .strip_prefix("pub(crate) ")
            .or_else(|| l.strip_prefix("pub(super) "))
            .or_else(|| l.strip_prefix("pub "))
            .unwrap_or(l);
        let l = l.strip_prefix("async ").unwrap_or(l);
        l.strip_prefix("fn ").is_some_and(|rest| {
            rest.starts_with(&format!("{name}(")) || rest.starts_with(&format!("{name}<"))
        })
    })
}

#[test]
fn the_step_tables_name_functions_that_exist_where_they_say() {
    let root = repo();
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let rows = named_functions(&doc);
    assert!(
        rows.len() >= 40,
        "the step tables name {} functions",
        rows.len()
    );
    let missing: Vec<String> = rows
        .iter()
        .filter(|(function, file)| {
            std::fs::read_to_string(root.join(file)).map_or(true, |s| !defines(&s, function))
        })
        .map(|(function, file)| format!("{function} in {file}"))
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names what is not there: {missing:?}"
    );
}

#[test]
fn the_invariant_table_names_tests_that_exist() {
    let root = repo();
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let tests = std::fs::read_dir(root.join("e2e/tests"))
        .expect("e2e/tests")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect::<Vec<_>>()
        .join("\n");
    let section = doc
        .split("## The invariants")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("an invariants section");
    let named: Vec<&str> = section
        .lines()
        .filter(|l| l.starts_with('|'))
        .filter_map(|l| l.trim_matches('|').split('|').nth(2))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        .filter(|n| !n.ends_with(".rs") && !n.contains('*'))
        .collect();
    assert!(
        named.len() >= 10,
        "the invariants name {} tests",
        named.len()
    );
    for name in named {
        assert!(
            defines(&tests, name),
            "ARCHITECTURE.md names test {name}, which e2e/tests does not define"
        );
    }
}

#[test]
fn workers_cross_into_async_code_at_one_place() {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("node/").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let node = repo().join("daemon/src/node");
    let mut files = Vec::new();
    walk(&node, &mut files);
    assert!(files.len() > 20, "{} files under node/", files.len());
    let crossing: Vec<String> = files
        .iter()
        .filter(|f| !f.ends_with("shared.rs"))
        .filter(|f| std::fs::read_to_string(f).is_ok_and(|s| s.contains("block_on(")))
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        crossing.is_empty(),
        "only Node::wait_on (shared.rs) may block on async code: {crossing:?}"
    );
}

#[test]
fn the_parser_sees_a_row_and_a_definition() {
    let rows = named_functions("| step | `go` | `a/b.rs` |\n| x | y | z |\n");
    assert_eq!(rows, [("go".to_owned(), "a/b.rs".to_owned())]);
    assert!(defines("    pub(super) fn go(&self) {}", "go"));
    assert!(defines("pub async fn go<E>() {}", "go"));
    assert!(!defines("fn gone() {}", "go"));
}
