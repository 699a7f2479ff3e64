//! The PIN lockout guard's memory: PIN values a token refused, kept across restarts.
//!
//! Tokens lock after a few wrong PINs, and some (TPM-backed ones) lock without changing any
//! PKCS#11 flag. A server restarted by a supervisor with a wrong PIN in its secret store would
//! spend one try per restart. So after `CKR_PIN_INCORRECT` the refused value is recorded here,
//! as an Argon2id hash with a random salt (never the PIN), keyed by module and token, and login
//! with that same value is never attempted again; a changed PIN value logs in normally.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::Error;

/// The default state file: `$STATE_DIRECTORY` (systemd), else `$XDG_STATE_HOME/rustls-hsm`,
/// else `~/.local/state/rustls-hsm`, else the temporary directory; file `pin-guard.json`.
pub fn default_guard_file() -> PathBuf {
    let dir = std::env::var_os("STATE_DIRECTORY")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_STATE_HOME").map(|d| PathBuf::from(d).join("rustls-hsm")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/rustls-hsm"))
        })
        .unwrap_or_else(|| std::env::temp_dir().join("rustls-hsm"));
    dir.join("pin-guard.json")
}

/// Remembers refused PIN values in a state file.
#[derive(Debug)]
pub(crate) struct PinGuard {
    path: PathBuf,
    /// Serialises read-modify-write of the file within this process.
    lock: Mutex<()>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct GuardFile {
    version: u32,
    refused: Vec<Refusal>,
}

#[derive(Debug, Deserialize, Serialize)]
struct Refusal {
    /// Canonical module path.
    module: String,
    token_serial: String,
    token_label: String,
    /// Argon2id PHC string of the refused PIN.
    pin_hash: String,
    /// Unix seconds.
    refused_at: u64,
}

/// Which token a PIN belongs to.
pub(crate) struct TokenKey<'a> {
    pub(crate) module: &'a Path,
    pub(crate) serial: &'a str,
    pub(crate) label: &'a str,
}

impl TokenKey<'_> {
    fn matches(&self, r: &Refusal) -> bool {
        r.module == self.module.to_string_lossy()
            && r.token_serial == self.serial
            && r.token_label == self.label
    }
}

impl PinGuard {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            lock: Mutex::new(()),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// True when this PIN value was refused by this token before.
    pub(crate) fn was_refused(
        &self,
        token: &TokenKey<'_>,
        pin: &SecretString,
    ) -> Result<bool, Error> {
        let _lock = self.lock();
        let file = self.read()?;
        let argon = Argon2::default();
        Ok(file
            .refused
            .iter()
            .filter(|r| token.matches(r))
            .any(|r| {
                PasswordHash::new(&r.pin_hash).is_ok_and(|hash| {
                    argon
                        .verify_password(pin.expose_secret().as_bytes(), &hash)
                        .is_ok()
                })
            }))
    }

    /// Records that the token refused this PIN value.
    pub(crate) fn record_refusal(
        &self,
        token: &TokenKey<'_>,
        pin: &SecretString,
    ) -> Result<(), Error> {
        let _lock = self.lock();
        let mut file = self.read()?;
        let mut salt = [0u8; 16];
        getrandom::getrandom(&mut salt).map_err(|e| self.err(e.to_string()))?;
        let salt = SaltString::encode_b64(&salt).map_err(|e| self.err(e.to_string()))?;
        let hash = Argon2::default()
            .hash_password(pin.expose_secret().as_bytes(), &salt)
            .map_err(|e| self.err(e.to_string()))?
            .to_string();
        file.version = 1;
        file.refused.push(Refusal {
            module: token
                .module
                .to_string_lossy()
                .into_owned(),
            token_serial: token.serial.to_owned(),
            token_label: token.label.to_owned(),
            pin_hash: hash,
            refused_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
        });
        self.write(&file)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read(&self) -> Result<GuardFile, Error> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                self.err(format!(
                    "not a PIN guard file ({e}); fix or remove it (removing it forgets which PIN \
                     values the token refused)"
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(GuardFile::default()),
            Err(e) => Err(self.err(e.to_string())),
        }
    }

    /// Writes atomically: a 0600 temporary file beside the target, fsync, rename.
    fn write(&self, file: &GuardFile) -> Result<(), Error> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // A directory we create is ours alone; one that exists is left as its owner set it.
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(|e| self.err(e.to_string()))?;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        let tmp = self.path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(file).map_err(|e| self.err(e.to_string()))?;
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| self.err(e.to_string()))?;
        out.write_all(&json)
            .and_then(|()| out.sync_all())
            .map_err(|e| self.err(e.to_string()))?;
        fs::rename(&tmp, &self.path).map_err(|e| self.err(e.to_string()))
    }

    fn err(&self, reason: String) -> Error {
        Error::PinGuard {
            path: self.path.clone(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A guard file placed in an application's shared directory once made that directory 0700.
    #[test]
    fn leaves_an_existing_directory_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let guard = PinGuard::new(dir.path().join("guard.json"));
        let token = TokenKey {
            module: Path::new("/m.so"),
            serial: "01",
            label: "t",
        };
        guard
            .record_refusal(&token, &SecretString::from("1111"))
            .unwrap();
        let mode = fs::metadata(dir.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn remembers_refused_values_only() {
        let dir = tempfile::tempdir().unwrap();
        let guard = PinGuard::new(dir.path().join("state/guard.json"));
        let token = TokenKey {
            module: Path::new("/m.so"),
            serial: "01",
            label: "t",
        };
        let bad = SecretString::from("1111");
        let good = SecretString::from("2222");
        assert!(!guard.was_refused(&token, &bad).unwrap());
        guard
            .record_refusal(&token, &bad)
            .unwrap();
        assert!(guard.was_refused(&token, &bad).unwrap());
        assert!(!guard
            .was_refused(&token, &good)
            .unwrap());

        // Another guard over the same file (a restarted process) remembers it too.
        let again = PinGuard::new(dir.path().join("state/guard.json"));
        assert!(again.was_refused(&token, &bad).unwrap());
        let other = TokenKey {
            serial: "02",
            ..token
        };
        assert!(!again.was_refused(&other, &bad).unwrap());

        let text = fs::read_to_string(dir.path().join("state/guard.json")).unwrap();
        assert!(!text.contains("1111"), "{text}");
        let mode = fs::metadata(dir.path().join("state/guard.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
