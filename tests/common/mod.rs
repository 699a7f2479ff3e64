//! Shared set-up for tests against real SoftHSMv2 tokens.
//!
//! Each [`TestHsm`] is a SoftHSM token directory with its own `softhsm2.conf` in a temporary
//! directory, removed when the value drops. Subprocesses get it through their environment;
//! in-process tests call [`TestHsm::use_in_this_process`], which needs one process per test
//! (cargo-nextest), because SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub
)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

/// SoftHSM's module path: `SOFTHSM2_MODULE` if set, else where Debian puts it.
pub fn softhsm_module() -> PathBuf {
    std::env::var_os("SOFTHSM2_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"))
}

/// A private SoftHSM token store.
pub struct TestHsm {
    dir: TempDir,
    pub conf: PathBuf,
    pub module: PathBuf,
}

/// A token created in a [`TestHsm`], with its PINs in 0600 files.
#[derive(Clone, Debug)]
pub struct TestToken {
    pub label: String,
    pub so_pin_file: PathBuf,
    pub user_pin_file: PathBuf,
}

impl TestToken {
    /// `file:...` source of the user PIN.
    pub fn pin_source(&self) -> String {
        format!("file:{}", self.user_pin_file.display())
    }

    /// `file:...` source of the SO PIN.
    pub fn so_pin_source(&self) -> String {
        format!("file:{}", self.so_pin_file.display())
    }

    pub fn user_pin(&self) -> String {
        fs::read_to_string(&self.user_pin_file).unwrap()
    }

    pub fn so_pin(&self) -> String {
        fs::read_to_string(&self.so_pin_file).unwrap()
    }
}

impl TestHsm {
    /// An empty token store (only SoftHSM's free slot).
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("rustls-hsm-test-")
            .tempdir()
            .unwrap();
        let tokens = dir.path().join("tokens");
        fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
                 slots.removable = false\n",
                tokens.display()
            ),
        )
        .unwrap();
        Self {
            dir,
            conf,
            module: softhsm_module(),
        }
    }

    /// A store with one token named `label`.
    pub fn with_token(label: &str) -> (Self, TestToken) {
        let hsm = Self::new();
        let token = hsm.add_token(label);
        (hsm, token)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates a token with SoftHSM's own tool, so tests do not depend on our `token init`.
    pub fn add_token(&self, label: &str) -> TestToken {
        let so_pin = random_pin();
        let user_pin = random_pin();
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", &so_pin, "--pin", &user_pin])
            .output()
            .unwrap();
        assert!(out.status.success(), "softhsm2-util: {}", text(&out));
        TestToken {
            label: label.to_owned(),
            so_pin_file: self.write_secret(&format!("{label}.so-pin"), &so_pin),
            user_pin_file: self.write_secret(&format!("{label}.pin"), &user_pin),
        }
    }

    /// Writes a 0600 file in the store's directory.
    pub fn write_secret(&self, name: &str, value: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(name.replace(['/', ' '], "_"));
        fs::write(&path, value).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// Makes SoftHSM hide mechanisms, as an administrator can (`slots.mechanisms`), e.g.
    /// `-CKM_RSA_PKCS_PSS,CKM_SHA256_RSA_PKCS_PSS` to disable those two.
    pub fn restrict_mechanisms(&self, spec: &str) {
        let mut conf = fs::read_to_string(&self.conf).unwrap();
        conf.push_str(&format!("slots.mechanisms = {spec}\n"));
        fs::write(&self.conf, conf).unwrap();
    }

    /// Points this process's SoftHSM at the store. Call before anything loads the module.
    ///
    /// Safe only with one process per test (cargo-nextest), before other threads start.
    pub fn use_in_this_process(&self) {
        assert!(
            std::env::var_os("NEXTEST").is_some(),
            "in-process HSM tests need one process per test: run them with cargo nextest"
        );
        std::env::set_var("SOFTHSM2_CONF", &self.conf);
    }

    /// `pkcs11-tool` (OpenSC), an independent client, against this store.
    pub fn pkcs11_tool(&self, args: &[&str]) -> Output {
        Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .arg("--module")
            .arg(&self.module)
            .args(args)
            .output()
            .unwrap()
    }

    /// The `rustls-hsm` binary with this store's environment and module.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rustls-hsm"));
        cmd.env("SOFTHSM2_CONF", &self.conf)
            .env("RUSTLS_HSM_MODULE", &self.module)
            .env("RUST_LOG", "warn")
            .env_remove("RUSTLS_HSM_TOKEN");
        cmd
    }
}

/// Sets an environment variable of this test process, for modules that read their settings
/// at `C_Initialize` (SoftHSM, pkcs11-spy). Safe only with one process per test (nextest),
/// before other threads start.
pub fn set_process_env(key: &str, value: impl AsRef<std::ffi::OsStr>) {
    assert!(
        std::env::var_os("NEXTEST").is_some() || std::env::var_os("RUSTLS_HSM_CHILD").is_some(),
        "in-process HSM tests need one process per test: run them with cargo nextest"
    );
    std::env::set_var(key, value);
}

/// A random 8-digit PIN.
pub fn random_pin() -> String {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).unwrap();
    bytes
        .iter()
        .map(|b| char::from(b'0' + b % 10))
        .collect()
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub mod cli;
pub mod keys;
pub mod stack;
pub mod tls;
