//! Running the `rustls-hsm` binary in tests: success and failure with useful messages, JSON.

use std::borrow::BorrowMut;
use std::process::{Command, Output, Stdio};

use super::{text, TestHsm, TestToken};

impl TestHsm {
    /// `rustls-hsm ARGS --token LABEL --pin file:...` for a command that logs in.
    pub fn cli_login(&self, token: &TestToken, args: &[&str]) -> Command {
        let mut cmd = self.cli();
        cmd.args(args)
            .args(["--token", &token.label, "--pin", &token.pin_source()]);
        cmd
    }

    /// The serial of the token labelled `label`, from `token list --json`.
    pub fn serial_of(&self, label: &str) -> String {
        self.token_entry(label)["token"]["serial"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The slot id the token labelled `label` sits in now (read at run time, never assumed).
    pub fn slot_of(&self, label: &str) -> u64 {
        self.token_entry(label)["slot_id"]
            .as_u64()
            .unwrap()
    }

    fn token_entry(&self, label: &str) -> serde_json::Value {
        let list = json(
            self.cli()
                .args(["token", "list", "--json"]),
        );
        let slots = list["slots"].as_array().unwrap();
        let mut found: Vec<_> = slots
            .iter()
            .filter(|s| s["token"]["label"] == label && s["token"]["initialized"] == true)
            .cloned()
            .collect();
        assert_eq!(found.len(), 1, "one token `{label}` expected in {list:#}");
        found.remove(0)
    }
}

/// Runs the command with stdin closed; asserts it succeeded and returns stdout.
pub fn ok(mut cmd: impl BorrowMut<Command>) -> String {
    let cmd = cmd.borrow_mut();
    let out = output(&mut *cmd);
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs the command with stdin closed; asserts it failed and returns stderr.
pub fn fails(mut cmd: impl BorrowMut<Command>) -> String {
    let cmd = cmd.borrow_mut();
    let out = output(&mut *cmd);
    assert!(
        !out.status.success(),
        "{cmd:?} should have failed:\n{}",
        text(&out)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// Runs the command, asserts success and parses stdout as JSON.
pub fn json(cmd: impl BorrowMut<Command>) -> serde_json::Value {
    let stdout = ok(cmd);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stdout}"))
}

/// Runs the command with stdin closed.
pub fn output(mut cmd: impl BorrowMut<Command>) -> Output {
    cmd.borrow_mut()
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Asserts a pkcs11-tool run succeeded and returns its stdout.
pub fn tool_ok(out: Output) -> String {
    assert!(out.status.success(), "pkcs11-tool failed:\n{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// The private key objects pkcs11-tool lists: `(label, id, access line)` per object.
pub fn private_keys_seen_by_pkcs11_tool(
    hsm: &TestHsm,
    token: &TestToken,
) -> Vec<(String, String, String)> {
    let listing = tool_ok(hsm.pkcs11_tool(&[
        "--token-label",
        &token.label,
        "--login",
        "--pin",
        &token.user_pin(),
        "--list-objects",
        "--type",
        "privkey",
    ]));
    let mut keys = Vec::new();
    for block in listing
        .split("Private Key Object")
        .skip(1)
    {
        let field = |name: &str| {
            block
                .lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        keys.push((field("label:"), field("ID:"), field("Access:")));
    }
    keys
}

/// Runs the command on a pseudo-terminal (util-linux `script`) and types `typed` into it, for
/// prompts that insist on a terminal. Returns the output; the transcript is in stdout.
pub fn on_terminal(cmd: &Command, typed: &str) -> Output {
    let quote = |s: &std::ffi::OsStr| {
        format!(
            "'{}'",
            s.to_str()
                .unwrap()
                .replace('\'', r"'\''")
        )
    };
    let line: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect();
    let mut script = Command::new("script");
    script
        .args(["-q", "-e", "-c", &line.join(" "), "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in cmd.get_envs() {
        match value {
            Some(value) => script.env(name, value),
            None => script.env_remove(name),
        };
    }
    let mut child = script.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), typed.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}
