//! The committed capability table (docs/capabilities.md) is what the token stacks report now.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::stack::{is_selected, ALL_STACKS};

// A planning change that alters what a token can serve must come with the regenerated table.
#[test]
fn committed_capability_table_matches_the_stacks() {
    if let Some(missing) = ALL_STACKS
        .iter()
        .find(|s| !is_selected(s))
    {
        println!("SKIP capability table: needs every stack, and {missing} is not selected");
        return;
    }
    let table = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/capability-table");
    let out = Command::new(table)
        .arg("--check")
        .env("RUSTLS_HSM_BIN", env!("CARGO_BIN_EXE_rustls-hsm"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docs/capabilities.md is stale; run scripts/capability-table:\n{}",
        common::text(&out)
    );
}
