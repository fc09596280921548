//! Style and documentation checks that run under `cargo test`.

use std::path::Path;

use stormledger::ledger::Status;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

#[test]
fn the_status_table_in_the_protocol_doc_matches_the_code() {
    let doc = read("docs/protocol.md");
    for status in Status::ALL {
        let row = format!("| {} | `{}` |", status.code(), status.name());
        assert!(doc.contains(&row), "docs/protocol.md lacks the row {row}");
    }
}

#[test]
fn the_ledger_does_no_io_and_reads_no_clock() {
    let forbidden =
        ["std::fs", "std::net", "std::time", "SystemTime", "Instant", "tokio", "rand::", "std::env", "thread::"];
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ledger")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for word in forbidden {
            assert!(!text.contains(word), "{} uses {word}: the ledger must stay deterministic", path.display());
        }
    }
}

#[test]
fn every_module_says_what_it_owns() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().unwrap() != "main.rs" {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(text.starts_with("//!"), "{} does not open with a //! module doc", path.display());
            }
        }
    }
}

#[test]
fn the_readme_starts_with_the_run_and_test_commands() {
    let readme = read("README.md");
    let head: String = readme.lines().take(20).collect::<Vec<_>>().join("\n");
    assert!(head.contains("cargo run --release"), "README must open with the command that runs the server");
    assert!(head.contains("cargo test --workspace"), "README must open with the test command");
    let ci = read(".ci/run");
    assert!(ci.contains("cargo test --workspace"), ".ci/run must run the README's test command");
}
