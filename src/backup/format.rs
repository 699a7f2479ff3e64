//! The backup file: versioned JSON with a SHA-256 integrity check, written atomically, 0600.
//!
//! `docs/backup.md` documents every field. The integrity check catches damage and careless edits
//! before any token call; it is not a signature, and whoever can rewrite the file can recompute
//! it. What resists deliberate tampering is elsewhere: the wrapped bytes are authenticated by
//! RFC 5649 key wrap under the KEK, and a restore test-signs and verifies against the file's
//! public key, so a file whose public key was swapped restores nothing.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::kek::CheckValue;
use super::wrap::KeyWrap;
use super::Error;
use crate::pkcs11::{check_label, kind_of_spki, spki_fingerprint, BackupPolicy, KeyKind};

/// The backup format version this crate writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// The `format` field of every backup file.
pub const FORMAT_NAME: &str = "rustls-hsm-key-backup";

/// A validated backup: one wrapped private key and what is needed to restore and check it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Backup {
    /// `CKA_LABEL` of the key.
    pub label: String,
    /// `CKA_ID` of the key.
    pub id: Vec<u8>,
    /// Key type and size, as read from the public key.
    pub kind: KeyKind,
    /// The backup policy the key was generated with.
    pub policy: BackupPolicy,
    /// The public key as DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// The mechanism it was wrapped with: RFC 5649, by the name the token gave it.
    pub mechanism: KeyWrap,
    /// The label of the KEK it was wrapped under.
    pub kek_label: String,
    /// The KEK's check value, when the token gave one.
    pub kek_check_value: Option<CheckValue>,
    /// The `C_WrapKey` output (RFC 5649 ciphertext of the token's PKCS#8 encoding).
    pub wrapped: Vec<u8>,
    /// Label and serial of the token it came from.
    pub source_token: String,
    /// When the backup was made, RFC 3339 UTC.
    pub created: String,
}

impl Backup {
    /// Reads and checks a backup file: format, version, integrity, then every field.
    ///
    /// A file of a newer format version is refused with a message saying so, before its
    /// content is looked at.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let refuse = |reason: String| Error::File {
            path: path.to_owned(),
            reason,
        };
        let text = read_small_file(path, refuse)?;
        Self::parse(&text).map_err(refuse)
    }

    /// Parses and checks a backup document; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        check_header(text, FORMAT_NAME, "a key backup")?;
        let file: BackupFile = serde_json::from_str(text)
            .map_err(|e| format!("not a valid version {FORMAT_VERSION} backup: {e}"))?;
        check_integrity(&file.content, &file.integrity, FORMAT_NAME)?;
        file.content.validate()
    }

    /// The file's JSON text, with its integrity check.
    pub fn to_json(&self) -> Result<String, String> {
        let content = Content {
            created: self.created.clone(),
            source_token: self.source_token.clone(),
            key: KeyPart {
                label: self.label.clone(),
                id: hex::encode(&self.id),
                key_type: self.kind.to_string(),
                policy: policy_name(self.policy).to_owned(),
                spki: hex::encode(&self.spki),
                spki_sha256: spki_fingerprint(&self.spki),
            },
            wrapping: WrapPart {
                mechanism: self.mechanism.name().to_owned(),
                kek_label: self.kek_label.clone(),
                kek_check_value: self
                    .kek_check_value
                    .map(|v| v.to_string()),
                wrapped_key: hex::encode(&self.wrapped),
            },
        };
        let integrity = integrity_of(&content, FORMAT_NAME)?;
        let file = BackupFile {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            content,
            integrity,
        };
        serde_json::to_string_pretty(&file).map_err(|e| e.to_string())
    }

    /// Writes the file atomically with mode 0600; an existing file is never overwritten.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let text = self
            .to_json()
            .map_err(|reason| Error::File {
                path: path.to_owned(),
                reason,
            })?;
        write_private_file(path, text.as_bytes())
    }
}

/// The current time as RFC 3339 UTC, seconds precision.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

/// Writes `bytes` to `path` atomically: a 0600 temporary file beside it, fsync, a hard link to
/// `path` (which fails if anything, even a dangling symlink, has the name by then), and fsync of
/// the directory. Refuses when `path` exists.
pub(crate) fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    if path.symlink_metadata().is_ok() {
        return Err(Error::Refused(format!(
            "{} already exists; choose another name (files are never overwritten)",
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut nonce = [0u8; 6];
    getrandom::getrandom(&mut nonce).map_err(|e| Error::Io {
        op: "draw a temporary name for",
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let temporary = dir.join(format!(".{name}.{}.tmp", hex::encode(nonce)));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        // The mode above is filtered by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        match fs::hard_link(&temporary, path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the file appeared while it was being written; it was left alone",
                ));
            }
            // A file system without hard links: rename, after one more look.
            Err(_) if path.symlink_metadata().is_err() => fs::rename(&temporary, path)?,
            other => other?,
        }
        fs::File::open(&dir)?.sync_all()
    })();
    // Gone after a rename; after a link, or a failure, the temporary name goes.
    let _ = fs::remove_file(&temporary);
    written.map_err(Error::io("write", path))
}

/// The largest backup or share file read: an RSA-8192 backup is about 14 KiB.
pub(crate) const MAX_FILE_LEN: u64 = 1024 * 1024;

/// Reads a backup or share file: a regular file of at most [`MAX_FILE_LEN`] bytes, as UTF-8.
///
/// A device, pipe or directory is refused before reading, and a larger file after reading one
/// byte past the limit, so `--in /dev/zero` or a huge file cannot exhaust memory.
pub(crate) fn read_small_file(
    path: &Path,
    refuse: impl Fn(String) -> Error,
) -> Result<zeroize::Zeroizing<String>, Error> {
    use std::io::Read;
    let not_regular =
        || refuse("not a regular file; give the path of a backup or share file".into());
    // Checked before opening too: opening a FIFO for reading waits for a writer.
    if !fs::metadata(path)
        .map_err(Error::io("read", path))?
        .is_file()
    {
        return Err(not_regular());
    }
    let file = fs::File::open(path).map_err(Error::io("read", path))?;
    if !file
        .metadata()
        .map_err(Error::io("read", path))?
        .is_file()
    {
        return Err(not_regular());
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    file.take(MAX_FILE_LEN + 1)
        .read_to_string(&mut text)
        .map_err(Error::io("read", path))?;
    if text.len() as u64 > MAX_FILE_LEN {
        return Err(refuse(format!(
            "larger than {MAX_FILE_LEN} bytes, far more than any backup or share file; \
             not read"
        )));
    }
    Ok(text)
}

/// Checks that a file's `created` field is an RFC 3339 time, as written.
pub(crate) fn check_created(created: &str) -> Result<(), String> {
    time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
        .map(drop)
        .map_err(|_| {
            format!(
                "field `created` is {:?}; it must be an RFC 3339 time such as \
                 2026-12-03T17:22:15Z",
                created
            )
        })
}

/// Checks `format` and `version` before anything else, so that a newer file says so.
pub(crate) fn check_header(text: &str, format: &str, what: &str) -> Result<(), String> {
    let header: Header = serde_json::from_str(text)
        .map_err(|e| format!("not readable as {what} file: truncated or damaged JSON ({e})"))?;
    if header.format.as_deref() != Some(format) {
        return Err(format!(
            "not {what} file: its `format` is {:?}, expected `{format}`",
            header.format.unwrap_or_default()
        ));
    }
    let Some(version) = header.version else {
        return Err("no format version".into());
    };
    match version.as_u64() {
        Some(v) if v == u64::from(FORMAT_VERSION) => Ok(()),
        Some(v) if v > u64::from(FORMAT_VERSION) => Err(format!(
            "format version {v} is newer than this rustls-hsm reads (version {FORMAT_VERSION}); \
             use a newer rustls-hsm"
        )),
        Some(v) => Err(format!("unknown format version {v}")),
        None => Err(format!(
            "field `version` is {version}; it must be a whole number such as {FORMAT_VERSION}"
        )),
    }
}

/// The integrity block: SHA-256 over a domain string and the content's compact JSON.
pub(crate) fn integrity_of(content: &impl Serialize, format: &str) -> Result<Integrity, String> {
    let json = zeroize::Zeroizing::new(serde_json::to_vec(content).map_err(|e| e.to_string())?);
    let mut hash = Sha256::new();
    hash.update(format!("{format}/{FORMAT_VERSION}\n").as_bytes());
    hash.update(json.as_slice());
    Ok(Integrity {
        algorithm: INTEGRITY_ALGORITHM.to_owned(),
        digest: hex::encode(hash.finalize()),
    })
}

/// Recomputes the integrity block and compares.
pub(crate) fn check_integrity(
    content: &impl Serialize,
    integrity: &Integrity,
    format: &str,
) -> Result<(), String> {
    if integrity.algorithm != INTEGRITY_ALGORITHM {
        return Err(format!(
            "unknown integrity algorithm `{}`",
            integrity.algorithm
        ));
    }
    let expected = integrity_of(content, format)?;
    if expected.digest != integrity.digest {
        return Err(
            "integrity check failed: the content does not match its SHA-256 digest; the file \
             was damaged or edited"
                .into(),
        );
    }
    Ok(())
}

const INTEGRITY_ALGORITHM: &str = "sha-256";

/// The integrity block of backup and share files.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Integrity {
    pub(crate) algorithm: String,
    pub(crate) digest: String,
}

#[derive(Deserialize)]
struct Header {
    format: Option<String>,
    version: Option<serde_json::Value>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct BackupFile {
    format: String,
    version: u32,
    content: Content,
    integrity: Integrity,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Content {
    created: String,
    source_token: String,
    key: KeyPart,
    wrapping: WrapPart,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct KeyPart {
    label: String,
    id: String,
    #[serde(rename = "type")]
    key_type: String,
    policy: String,
    spki: String,
    spki_sha256: String,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct WrapPart {
    mechanism: String,
    kek_label: String,
    kek_check_value: Option<String>,
    wrapped_key: String,
}

impl Content {
    fn validate(self) -> Result<Backup, String> {
        let hex_field = |name: &str, value: &str| {
            hex::decode(value).map_err(|_| format!("field `{name}` is not hexadecimal"))
        };
        let spki = hex_field("key.spki", &self.key.spki)?;
        let kind =
            kind_of_spki(&spki).ok_or("field `key.spki` is not a public key rustls-hsm can use")?;
        if kind.to_string() != self.key.key_type {
            return Err(format!(
                "field `key.type` says {}, but the public key is {kind}",
                self.key.key_type
            ));
        }
        if spki_fingerprint(&spki) != self.key.spki_sha256 {
            return Err("field `key.spki_sha256` does not match the public key".into());
        }
        let policy = match self.key.policy.as_str() {
            "none" => BackupPolicy::None,
            "wrap-with-trusted" => BackupPolicy::WrapWithTrusted,
            other => return Err(format!("unknown backup policy `{other}`")),
        };
        let mechanism = KeyWrap::from_name(&self.wrapping.mechanism).ok_or_else(|| {
            format!(
                "unknown wrapping mechanism `{}`; this rustls-hsm restores only {} and {}",
                self.wrapping.mechanism,
                KeyWrap::Pad.name(),
                KeyWrap::Kwp.name()
            )
        })?;
        let wrapped = hex_field("wrapping.wrapped_key", &self.wrapping.wrapped_key)?;
        // RFC 5649 output is a whole number of 8-byte blocks, at least two.
        if wrapped.len() < 16 || wrapped.len() % 8 != 0 {
            return Err(format!(
                "field `wrapping.wrapped_key` has {} bytes; RFC 5649 output is a multiple of 8 \
                 bytes, at least 16",
                wrapped.len()
            ));
        }
        let kek_check_value = self
            .wrapping
            .kek_check_value
            .as_deref()
            .map(str::parse)
            .transpose()?;
        // Keys are found again by label and id: a restored key needs both.
        check_label("field `key.label`", &self.key.label)?;
        let id = hex_field("key.id", &self.key.id)?;
        if id.is_empty() {
            return Err(
                "field `key.id` is empty; rustls-hsm finds keys by label and id, so a restored \
                 key needs both"
                    .into(),
            );
        }
        for (field, text) in [
            ("field `wrapping.kek_label`", &self.wrapping.kek_label),
            ("field `source_token`", &self.source_token),
        ] {
            if text.chars().any(char::is_control) {
                return Err(format!("{field} holds control characters"));
            }
        }
        check_created(&self.created)?;
        Ok(Backup {
            label: self.key.label,
            id,
            kind,
            policy,
            spki,
            mechanism,
            kek_label: self.wrapping.kek_label,
            kek_check_value,
            wrapped,
            source_token: self.source_token,
            created: self.created,
        })
    }
}

fn policy_name(policy: BackupPolicy) -> &'static str {
    match policy {
        BackupPolicy::None => "none",
        BackupPolicy::WrapWithTrusted => "wrap-with-trusted",
    }
}

#[cfg(test)]
mod tests {
    use spki::EncodePublicKey;

    use super::*;
    use crate::pkcs11::Curve;

    fn sample() -> Backup {
        let spki = p256::SecretKey::from_slice(&[7; 32])
            .unwrap()
            .public_key()
            .to_public_key_der()
            .unwrap()
            .into_vec();
        Backup {
            label: "tls".into(),
            id: vec![1, 2],
            kind: KeyKind::Ec(Curve::P256),
            policy: BackupPolicy::WrapWithTrusted,
            spki,
            mechanism: KeyWrap::Pad,
            kek_label: "kek".into(),
            kek_check_value: Some(CheckValue([1, 2, 3])),
            wrapped: vec![9; 48],
            source_token: "`a` (serial 1)".into(),
            created: now_rfc3339(),
        }
    }

    #[test]
    fn round_trips() {
        let backup = sample();
        let text = backup.to_json().unwrap();
        assert_eq!(Backup::parse(&text).unwrap(), backup);
    }

    #[test]
    fn edits_fail_the_integrity_check() {
        let text = sample().to_json().unwrap();
        let edited = text.replacen("\"tls\"", "\"tls2\"", 1);
        let err = Backup::parse(&edited).unwrap_err();
        assert!(err.contains("integrity check failed"), "{err}");
    }

    #[test]
    fn newer_versions_and_truncation_are_named() {
        let text = sample().to_json().unwrap();
        let newer = text.replacen("\"version\": 1", "\"version\": 2", 1);
        let err = Backup::parse(&newer).unwrap_err();
        assert!(err.contains("format version 2 is newer"), "{err}");
        let err = Backup::parse(&text[..text.len() / 2]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        let err = Backup::parse("{\"format\": \"something\", \"version\": 1}").unwrap_err();
        assert!(err.contains("not a key backup file"), "{err}");
    }

    #[test]
    fn files_are_private_and_nothing_is_overwritten_not_even_through_a_dangling_link() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tls.backup");
        sample().write(&file).unwrap();
        let mode = fs::metadata(&file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert!(sample().write(&file).is_err());

        let target = dir.path().join("elsewhere");
        let link = dir.path().join("link.backup");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = sample().write(&link).unwrap_err();
        assert!(
            err.to_string()
                .contains("already exists"),
            "{err}"
        );
        assert!(!target.exists(), "the write followed the link");
        // Only the two names made here remain: no temporary files.
        assert_eq!(
            fs::read_dir(dir.path())
                .unwrap()
                .count(),
            2
        );
    }
}
