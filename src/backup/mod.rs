//! Key backup and restore: private keys wrapped under an AES key-encryption key (KEK) held on the
//! token, the KEK made once and split among custodians, and restores that prove themselves.
//!
//! - [`kek`]: the KEK on a token: made by the security officer, trusted, private, wrap-only;
//! - [`ceremony`]: splitting a new KEK into M-of-N custodian shares, and importing it again;
//! - [`format`](mod@format): the versioned backup file and its integrity check;
//! - [`wrap`]: backing a key up (`C_WrapKey` with RFC 5649 AES key wrap with padding);
//! - [`restore`]: restoring a key (`C_UnwrapKey`), or only checking that a backup restores.
//!
//! The file format and what protects a backup on each token are described in `docs/backup.md`.

pub mod ceremony;
pub mod format;
pub mod kek;
mod probe;
pub mod restore;
pub mod wrap;

use std::path::PathBuf;

pub use ceremony::{import_kek_from_shares, kek_ceremony, Ceremony, ShareFile};
pub use format::{Backup, FORMAT_VERSION};
pub use kek::{
    create_kek, find_kek, locked_unwrap_template, CheckValue, KekObject, UnwrapTemplate,
};
pub use restore::{restore_backup, verify_backup, RestoreReport};
pub use wrap::{create_backup, KeyWrap};

/// Errors of key backup, restore and the KEK ceremony.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backup file is damaged, edited or not a backup.
    #[error("backup file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What we were doing, e.g. "write".
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// A KEK with this label already exists.
    #[error("a key-encryption key labelled `{label}` already exists on token {token}; choose another label")]
    KekExists {
        /// The label asked for.
        label: String,
        /// The token, as described.
        token: String,
    },
    /// No KEK with this label is on the token, or several are.
    #[error("no single key-encryption key labelled `{label}` on token {token}: {reason}")]
    KekNotFound {
        /// The label asked for.
        label: String,
        /// The token, as described.
        token: String,
        /// What was found instead.
        reason: String,
    },
    /// The KEK exists but must not be used.
    #[error("key-encryption key `{label}` on token {token} cannot be used: {reason}")]
    KekUnfit {
        /// The KEK's label.
        label: String,
        /// The token, as described.
        token: String,
        /// Which attribute is wrong, and how to fix it.
        reason: String,
    },
    /// The key's backup policy forbids wrapping it.
    #[error("key {key} cannot be backed up: {reason}")]
    KeyPolicy {
        /// The key, as described.
        key: String,
        /// The attribute and the policy behind it.
        reason: String,
    },
    /// A key with the backup's label or id is already on the token.
    #[error("a key with {what} already exists on token {token}; nothing was restored (delete it first or restore onto another token)")]
    KeyExists {
        /// The colliding label or id.
        what: String,
        /// The token, as described.
        token: String,
    },
    /// The token cannot do RFC 5649 key wrap in a way this crate can ask for.
    #[error("token {token} cannot {op} with RFC 5649 AES key wrap with padding: {reason}")]
    MechanismMissing {
        /// The token, as described.
        token: String,
        /// "wrap" or "unwrap".
        op: &'static str,
        /// What the token offers instead.
        reason: String,
    },
    /// Fewer custodian shares than the threshold were given.
    #[error("{needed} shares are needed to rebuild key-encryption key `{label}` (threshold stored in the share files), but only {given} distinct share(s) were given")]
    NotEnoughShares {
        /// The KEK's label in the share files.
        label: String,
        /// The threshold.
        needed: u8,
        /// Distinct shares given.
        given: usize,
    },
    /// The token lets a sensitive key's value be copied out, so it cannot keep a KEK secret.
    #[error("token {token} cannot keep a key-encryption key secret: {reason}; rustls-hsm keeps no KEK, makes no backup and restores none on it")]
    LeakyToken {
        /// The token, as described.
        token: String,
        /// What the token allowed.
        reason: String,
    },
    /// A PKCS#11 layer error: token, login, key lookup, or a failing call.
    #[error(transparent)]
    Pkcs11(#[from] crate::pkcs11::Error),
    /// The restored key did not pass its checks; its objects were destroyed.
    #[error("the restored key failed its check and was destroyed, nothing was left on the token: {reason}")]
    RestoreCheck {
        /// What did not match.
        reason: String,
    },
    /// A share file is damaged or does not belong with the others.
    #[error("share file {path}: {reason}")]
    Share {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The ceremony or import was asked for something impossible.
    #[error("{0}")]
    Refused(String),
    /// The backup was made under another KEK.
    #[error("wrong key-encryption key: the backup was wrapped under a KEK with check value {expected}, but `{label}` on token {token} has check value {found}; nothing was unwrapped")]
    WrongKek {
        /// The KEK's label.
        label: String,
        /// The token, as described.
        token: String,
        /// The check value in the backup file.
        expected: CheckValue,
        /// The check value of the KEK on the token.
        found: CheckValue,
    },
    /// `C_UnwrapKey` refused the wrapped bytes.
    #[error("the token could not unwrap the key under `{label}` ({}): the wrapped bytes do not authenticate under this KEK (wrong KEK or altered file); nothing was left on the token", crate::pkcs11::rv_text(.source))]
    Unwrap {
        /// The KEK's label.
        label: String,
        /// The PKCS#11 error.
        #[source]
        source: cryptoki::error::Error,
    },
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { op, path, source }
    }
}
