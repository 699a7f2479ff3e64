//! Token stacks for the portability and fault suites: SoftHSMv2, kryoptic, tpm2-pkcs11 on
//! swtpm, and SoftHSM behind `p11-kit server`.
//!
//! A [`Stack`] runs `scripts/stacks/<name>-start` on a fresh temporary directory (a fresh token
//! with a known label and PIN files), reads the environment the script wrote, and runs
//! `<name>-stop` and removes the directory on drop. Which stacks run is chosen by
//! `RUSTLS_HSM_STACKS` (comma-separated; default all). Every case outcome, skips with their
//! reason included, is printed and, when `RUSTLS_HSM_STACK_REPORT` names a file, appended there
//! for the per-stack summary of `scripts/test`.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub
)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

use super::TestToken;

/// Every stack, in the order suites run them.
pub const ALL_STACKS: [&str; 4] = ["softhsm", "kryoptic", "tpm", "p11kit"];

/// A running token stack with one fresh token.
pub struct Stack {
    pub name: &'static str,
    dir: TempDir,
    /// The variables a client needs, as the start script wrote them.
    pub env: Vec<(String, String)>,
    /// The PKCS#11 module clients load.
    pub module: PathBuf,
    pub token: TestToken,
}

impl Stack {
    /// Starts `name` for this test, or prints why not and returns `None` when
    /// `RUSTLS_HSM_STACKS` does not select it.
    pub fn start(name: &'static str) -> Option<Self> {
        if !is_selected(name) {
            println!("SKIP {name}: stack not selected by RUSTLS_HSM_STACKS");
            return None;
        }
        Some(Self::start_now(name))
    }

    fn start_now(name: &'static str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("rustls-hsm-{name}-"))
            .tempdir()
            .unwrap();
        let stack_dir = dir.path().join("stack");
        let started = Command::new(script(&format!("{name}-start")))
            .arg(&stack_dir)
            .output()
            .unwrap();
        if !started.status.success() {
            // Whatever did start must not outlive the test.
            let _ = Command::new(script(&format!("{name}-stop")))
                .arg(&stack_dir)
                .status();
            panic!("{name}-start: {}", super::text(&started));
        }
        let env = read_env(&stack_dir.join("env"));
        let module = PathBuf::from(
            &env.iter()
                .find(|(k, _)| k == "RUSTLS_HSM_MODULE")
                .expect("the stack's env names RUSTLS_HSM_MODULE")
                .1,
        );
        let token = TestToken {
            label: fs::read_to_string(stack_dir.join("label")).unwrap(),
            so_pin_file: stack_dir.join("so.pin"),
            user_pin_file: stack_dir.join("user.pin"),
        };
        Self {
            name,
            dir,
            env,
            module,
            token,
        }
    }

    /// The stack's state directory, as given to its scripts.
    pub fn stack_dir(&self) -> PathBuf {
        self.dir.path().join("stack")
    }

    /// A scratch directory of this test, removed with the stack.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Sets the stack's environment in this process. Call before anything loads the module.
    ///
    /// Safe only with one process per test (cargo-nextest), before other threads start.
    pub fn use_in_this_process(&self) {
        assert!(
            std::env::var_os("NEXTEST").is_some(),
            "in-process stack tests need one process per test: run them with cargo nextest"
        );
        for (k, v) in &self.env {
            std::env::set_var(k, v);
        }
    }

    /// A command with the stack's environment.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// `pkcs11-tool` (OpenSC), an independent client, against the stack's module.
    pub fn pkcs11_tool(&self, args: &[&str]) -> Output {
        self.command("pkcs11-tool")
            .arg("--module")
            .arg(&self.module)
            .args(args)
            .output()
            .unwrap()
    }

    /// Logs in with `pin` through `pkcs11-tool`, as a person would; the return code's name
    /// (`CKR_OK` on success).
    pub fn login_by_hand(&self, pin: &str) -> String {
        let out = self.pkcs11_tool(&[
            "--token-label",
            &self.token.label,
            "--login",
            "--pin",
            pin,
            "-O",
        ]);
        if out.status.success() {
            return "CKR_OK".into();
        }
        let text = super::text(&out);
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .find(|w| w.starts_with("CKR_"))
            .unwrap_or("failed without a return code")
            .to_owned()
    }

    /// Stops part of the stack (`<name>-stop DIR [part]`): a fault to recover from.
    pub fn stop(&self, part: Option<&str>) {
        let dir = self.stack_dir();
        let mut args = vec![dir.to_str().unwrap()];
        args.extend(part);
        run_script(&format!("{}-stop", self.name), &args);
    }

    /// Starts whatever part of the stack is not running (`<name>-start DIR`).
    pub fn restart(&self) {
        let dir = self.stack_dir();
        run_script(&format!("{}-start", self.name), &[dir.to_str().unwrap()]);
    }

    /// A case report for this stack: prints and records its outcome.
    pub fn case(&self, case: impl Into<String>) -> Case {
        Case {
            stack: self.name,
            case: case.into(),
            done: false,
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let dir = self.stack_dir();
        let stop = script(&format!("{}-stop", self.name));
        let _ = Command::new(stop).arg(dir).status();
    }
}

/// One case of a suite on one stack; recorded as failed if dropped before `pass` or `skip`
/// (a panic in the case).
pub struct Case {
    stack: &'static str,
    case: String,
    done: bool,
}

impl Case {
    pub fn pass(mut self) {
        self.done = true;
        record(self.stack, &self.case, "pass", "");
    }

    /// A case the token cannot do, with the reason from its capability report.
    pub fn skip(mut self, reason: &str) {
        self.done = true;
        record(self.stack, &self.case, "skip", reason);
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        if !self.done {
            record(self.stack, &self.case, "fail", "");
        }
    }
}

/// Stacks chosen by `RUSTLS_HSM_STACKS` (all when unset or empty).
pub fn selected() -> Vec<&'static str> {
    ALL_STACKS
        .into_iter()
        .filter(|s| is_selected(s))
        .collect()
}

/// Whether `RUSTLS_HSM_STACKS` selects `name`; a variant such as `tpm-ptool` goes with its
/// stack (`tpm`).
pub fn is_selected(name: &str) -> bool {
    let family = name.split('-').next().unwrap_or(name);
    match std::env::var("RUSTLS_HSM_STACKS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .any(|s| s.trim() == name || s.trim() == family),
        _ => true,
    }
}

/// The path of `scripts/stacks/<name>`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/stacks")
        .join(name)
}

fn run_script(name: &str, args: &[&str]) {
    let out = Command::new(script(name))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{name}: {}", super::text(&out));
}

/// Parses the `export NAME='value'` lines a start script writes.
fn read_env(path: &Path) -> Vec<(String, String)> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let (k, v) = line
                .strip_prefix("export ")?
                .split_once('=')?;
            Some((k.to_owned(), v.trim_matches('\'').to_owned()))
        })
        .collect()
}

fn record(stack: &str, case: &str, outcome: &str, reason: &str) {
    let line = if reason.is_empty() {
        format!("{stack}\t{case}\t{outcome}")
    } else {
        format!("{stack}\t{case}\t{outcome}\t{reason}")
    };
    // Printed in every case: a skip is never silent.
    println!("{}", line.replace('\t', " | "));
    if let Some(path) = std::env::var_os("RUSTLS_HSM_STACK_REPORT") {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(file, "{line}").unwrap();
    }
}
