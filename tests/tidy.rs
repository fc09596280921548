//! Style and documentation checks that run under `cargo test`.

use std::path::Path;

use stormledger::ledger::command::{flags, kind};
use stormledger::ledger::{AccountKind, Channel, FailReason, Status, TopUpState};
use stormledger::protocol::{QUERY_KIND_BALANCE, QUERY_KIND_HISTORY, QUERY_KIND_LOOKUP, QUERY_KIND_TOPUP_STATUS};

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

/// The `| code | `name` | ...` rows of every table in the section under `heading` (up to the next
/// heading), in document order.
fn coded_rows(doc: &str, heading: &str) -> Vec<(u64, String)> {
    let line = format!("\n{heading}\n");
    let start = doc.find(&line).unwrap_or_else(|| panic!("docs/protocol.md lacks the heading {heading:?}"));
    let section = &doc[start + line.len()..];
    let section = &section[..section.find("\n#").unwrap_or(section.len())];
    section
        .lines()
        .filter_map(|line| {
            let mut cells = line.strip_prefix('|')?.split('|').map(str::trim);
            let code = cells.next()?.parse().ok()?;
            let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            Some((code, name.to_string()))
        })
        .collect()
}

fn assert_table(doc: &str, heading: &str, mut expected: Vec<(u64, String)>) {
    let mut rows = coded_rows(doc, heading);
    rows.sort();
    expected.sort();
    assert_eq!(rows, expected, "docs/protocol.md, {heading:?}: the (code, name) rows differ from the code");
}

fn named(codes: impl IntoIterator<Item = (u64, &'static str)>) -> Vec<(u64, String)> {
    codes.into_iter().map(|(code, name)| (code, name.to_string())).collect()
}

#[test]
fn the_command_kind_tables_in_the_protocol_doc_match_the_code() {
    let doc = read("docs/protocol.md");
    let defined = (0..=u8::MAX).filter(|&k| kind::name(k) != "unknown");
    // Every kind the code defines, accepted on the wire or not, with its name.
    assert_table(&doc, "### Command kinds", named(defined.clone().map(|k| (k as u64, kind::name(k)))));
    // A reply row for exactly the kinds a client may send.
    let accepted = defined.filter(|&k| kind::is_client_kind(k));
    assert_table(&doc, "### Replies", named(accepted.map(|k| (k as u64, kind::name(k)))));
}

#[test]
fn the_enumerations_in_the_protocol_doc_match_the_code() {
    let doc = read("docs/protocol.md");
    let codes = 0..=u16::from(u8::MAX);
    let account_kinds = codes.clone().filter_map(AccountKind::from_code).map(|k| (k as u64, k.name()));
    assert_table(&doc, "### Account kinds", named(account_kinds));
    let channels = codes.clone().filter_map(Channel::from_code).map(|c| (c as u64, c.name()));
    assert_table(&doc, "### Channels", named(channels));
    let reasons = codes.filter_map(FailReason::from_code).map(|r| (r as u64, r.name()));
    assert_table(&doc, "### Fail reasons", named(reasons));
    let states = (0..=255).filter_map(TopUpState::from_code).map(|s| (s as u64, s.name()));
    assert_table(&doc, "### Top-up states", named(states));
    // The flags and query kinds have no names in the code: the doc's names, the code's values.
    let account_flags = [(flags::REAL_NAME, "real_name"), (flags::MINOR, "minor"), (flags::FROZEN, "frozen")];
    assert_table(&doc, "### Account flags", named(account_flags.map(|(value, name)| (value as u64, name))));
    let query_kinds = [
        (QUERY_KIND_BALANCE, "balance"),
        (QUERY_KIND_HISTORY, "history"),
        (QUERY_KIND_LOOKUP, "lookup"),
        (QUERY_KIND_TOPUP_STATUS, "topup_status"),
    ];
    assert_table(&doc, "### Query kinds", named(query_kinds.map(|(code, name)| (code as u64, name))));
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
