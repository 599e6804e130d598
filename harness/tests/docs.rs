//! The documents that list the invariants list exactly the ones the code
//! checks: README's table and docs/design.md's table name every invariant of
//! `Invariant::ALL`, and nothing else.

use std::path::Path;

use hvo_harness::invariant::Invariant;

/// The first cells of a markdown table's rows whose header's first cell is
/// `invariant`, with the backquotes taken off.
fn invariant_rows(doc: &str) -> Vec<String> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 3 {
            in_table = false;
            continue;
        }
        if cells[1] == "invariant" {
            in_table = true;
            continue;
        }
        if in_table && !cells[1].starts_with("---") {
            rows.push(cells[1].trim_matches('`').to_string());
        }
    }
    rows
}

fn check(relative: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut listed = invariant_rows(&doc);
    listed.sort();
    let mut known: Vec<String> = Invariant::ALL.iter().map(|i| i.name().to_string()).collect();
    known.sort();
    assert_eq!(listed, known, "{relative}'s invariant table does not match Invariant::ALL");
}

#[test]
fn readme_lists_every_invariant() {
    check("README.md");
}

#[test]
fn design_document_lists_every_invariant() {
    check("docs/design.md");
}
