//! The KEK ceremony: a new KEK from the token's random generator, split into M-of-N custodian
//! shares (Shamir over GF(256), by the audited `vsss-rs` crate), and its import from M shares
//! into another token.
//!
//! The plaintext KEK exists only in this process, in zeroizing buffers, between
//! `C_GenerateRandom` (or the recombination) and `C_CreateObject`. Each share file holds the
//! threshold and the KEK's check value, so that an import knows how many shares it needs and
//! can tell a recombined key from garbage before the token sees it.

use std::convert::Infallible;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use vsss_rs::Gf256;
use zeroize::{Zeroize, Zeroizing};

use super::format::{
    check_created, check_header, check_integrity, integrity_of, now_rfc3339, read_small_file,
    write_private_file, Integrity, FORMAT_VERSION,
};
use super::kek::{check_kek_can_be_made, create_kek, CheckValue, KekObject, KEK_LEN};
use super::Error;
use crate::pkcs11::{self, Module, Token};

/// The `format` field of every share file.
pub const SHARE_FORMAT_NAME: &str = "rustls-hsm-kek-share";

/// What a ceremony made: the KEK on the token and one file per custodian.
#[derive(Clone, Debug)]
pub struct Ceremony {
    /// The KEK as read back from the token.
    pub kek: KekObject,
    /// The check value computed from the KEK's value (and matched against the token's).
    pub check_value: CheckValue,
    /// The share files, one per custodian, in share order.
    pub files: Vec<PathBuf>,
}

/// One custodian's share of a KEK, validated.
pub struct ShareFile {
    /// The KEK's label at the ceremony.
    pub kek_label: String,
    /// The KEK's check value.
    pub check_value: CheckValue,
    /// How many shares rebuild the KEK.
    pub threshold: u8,
    /// How many shares were made.
    pub shares: u8,
    /// This share's number (its x coordinate), 1 to 255.
    pub index: u8,
    /// When the ceremony ran, RFC 3339 UTC.
    pub created: String,
    share: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for ShareFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareFile")
            .field("kek_label", &self.kek_label)
            .field("check_value", &self.check_value)
            .field("threshold", &self.threshold)
            .field("shares", &self.shares)
            .field("index", &self.index)
            .field("share", &"[redacted]")
            .finish()
    }
}

impl ShareFile {
    /// Reads and checks a share file: format, version, integrity and fields.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let refuse = |reason: String| Error::Share {
            path: path.to_owned(),
            reason,
        };
        let text = read_small_file(path, refuse)?;
        Self::parse(&text).map_err(refuse)
    }

    fn parse(text: &str) -> Result<Self, String> {
        check_header(text, SHARE_FORMAT_NAME, "a KEK share")?;
        let file: ShareDocument = serde_json::from_str(text)
            .map_err(|e| format!("not a valid version {FORMAT_VERSION} share file: {e}"))?;
        check_integrity(&file.content, &file.integrity, SHARE_FORMAT_NAME)?;
        let c = &file.content;
        pkcs11::check_label("field `kek_label`", &c.kek_label)?;
        check_created(&c.created)?;
        let share = Zeroizing::new(
            hex::decode(c.share.as_str()).map_err(|_| "field `share` is not hexadecimal")?,
        );
        if share.len() != KEK_LEN + 1 || share[0] != c.index || c.index == 0 {
            return Err(format!(
                "field `share` is not share {} of a {KEK_LEN}-byte key",
                c.index
            ));
        }
        if c.threshold < 2 || c.threshold > c.shares || c.index > c.shares {
            return Err(format!(
                "inconsistent numbers: share {} of {}, threshold {}",
                c.index, c.shares, c.threshold
            ));
        }
        Ok(Self {
            kek_label: c.kek_label.clone(),
            check_value: c.kek_check_value.parse()?,
            threshold: c.threshold,
            shares: c.shares,
            index: c.index,
            created: c.created.clone(),
            share,
        })
    }

    fn to_json(&self) -> Result<Zeroizing<String>, String> {
        let content = ShareContent {
            created: self.created.clone(),
            kek_label: self.kek_label.clone(),
            kek_check_value: self.check_value.to_string(),
            threshold: self.threshold,
            shares: self.shares,
            index: self.index,
            share: hex::encode(self.share.as_slice()),
        };
        let integrity = integrity_of(&content, SHARE_FORMAT_NAME)?;
        let document = ShareDocument {
            format: SHARE_FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            content,
            integrity,
        };
        serde_json::to_string_pretty(&document)
            .map(Zeroizing::new)
            .map_err(|e| e.to_string())
    }
}

/// Runs a KEK ceremony on `token`: 32 bytes from `C_GenerateRandom`, split into `shares` shares
/// of which `threshold` rebuild the key, the KEK imported (see [`create_kek`]), and one 0600 file
/// per share written into `out_dir` (created 0700 if missing).
///
/// If writing a share fails, the shares already written are removed and the KEK is destroyed:
/// a KEK without its custodians' shares would make backups that only this token can restore.
#[allow(clippy::too_many_arguments)]
pub fn kek_ceremony(
    module: &Module,
    token: &Token,
    user_pin: &SecretString,
    so_pin: &SecretString,
    label: &str,
    shares: u8,
    threshold: u8,
    out_dir: &Path,
) -> Result<Ceremony, Error> {
    if threshold < 2 || threshold > shares {
        return Err(Error::Refused(format!(
            "a threshold of {threshold} with {shares} shares is impossible: use 2 <= threshold \
             <= shares <= 255"
        )));
    }
    check_kek_can_be_made(module, token, user_pin, label)?;
    let made_dir = !out_dir.exists();
    let files = share_paths(out_dir, label, shares)?;
    // Undoes what this ceremony wrote, never anything that was there before.
    let remove_written = || {
        for file in &files {
            let _ = fs::remove_file(file);
        }
        if made_dir {
            let _ = fs::remove_dir(out_dir);
        }
    };

    // The shares are written before the KEK reaches the token: stopped in between, the
    // custodians hold shares that `kek import` turns into the KEK, and never does a KEK exist
    // that no one holds shares of.
    let made = random_kek(module, token).and_then(|value| {
        let check_value = CheckValue::of_aes256(&value);
        let parts = split(&value, threshold, shares)?;
        write_shares(
            &files,
            &parts,
            label,
            check_value,
            threshold,
            &now_rfc3339(),
        )?;
        let kek = create_kek(module, token, user_pin, so_pin, label, Some(&value))?;
        Ok((kek, check_value))
    });
    match made {
        Ok((kek, check_value)) => Ok(Ceremony {
            kek,
            check_value,
            files,
        }),
        Err(e) => {
            remove_written();
            Err(e)
        }
    }
}

/// Rebuilds a KEK from custodian share files and imports it into `token` as `label`.
///
/// The shares must come from one ceremony (same check value and threshold) and be distinct;
/// fewer than the threshold is [`Error::NotEnoughShares`]. The recombined key must have the
/// check value the shares carry before the token is touched.
pub fn import_kek_from_shares(
    module: &Module,
    token: &Token,
    user_pin: &SecretString,
    so_pin: &SecretString,
    label: &str,
    paths: &[PathBuf],
) -> Result<(KekObject, CheckValue), Error> {
    let Some(first_path) = paths.first() else {
        return Err(Error::Refused(
            "give the custodians' share files with --share".into(),
        ));
    };
    let files = paths
        .iter()
        .map(|p| ShareFile::read(p).map(|s| (p, s)))
        .collect::<Result<Vec<_>, _>>()?;
    let first = &files[0].1;
    let mut distinct: Vec<&ShareFile> = Vec::new();
    for (path, share) in &files {
        if share.check_value != first.check_value
            || share.threshold != first.threshold
            || share.shares != first.shares
        {
            return Err(Error::Share {
                path: (*path).clone(),
                reason: format!(
                    "it belongs to another ceremony than {} (check value {} vs {}, threshold {} \
                     of {} vs {} of {})",
                    first_path.display(),
                    share.check_value,
                    first.check_value,
                    share.threshold,
                    share.shares,
                    first.threshold,
                    first.shares
                ),
            });
        }
        if !distinct
            .iter()
            .any(|s| s.index == share.index)
        {
            distinct.push(share);
        }
    }
    if distinct.len() < usize::from(first.threshold) {
        return Err(Error::NotEnoughShares {
            label: first.kek_label.clone(),
            needed: first.threshold,
            given: distinct.len(),
        });
    }

    let value = combine(&distinct)?;
    let check_value = CheckValue::of_aes256(&value);
    if check_value != first.check_value {
        return Err(Error::Refused(format!(
            "the recombined key has check value {check_value}, but the shares say {}: a share \
             is damaged; nothing was imported",
            first.check_value
        )));
    }
    let kek = create_kek(module, token, user_pin, so_pin, label, Some(&value))?;
    Ok((kek, check_value))
}

fn share_paths(out_dir: &Path, label: &str, shares: u8) -> Result<Vec<PathBuf>, Error> {
    if !out_dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out_dir)
            .map_err(Error::io("create directory", out_dir))?;
        fs::set_permissions(out_dir, fs::Permissions::from_mode(0o700))
            .map_err(Error::io("restrict", out_dir))?;
    }
    let stem: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    // `../x` would give `.._x-share-...`: a hidden file that `ls` does not show.
    let stem = stem.trim_start_matches('.');
    let stem = if stem.is_empty() { "kek" } else { stem };
    let files: Vec<PathBuf> = (1..=shares)
        .map(|i| out_dir.join(format!("{stem}-share-{i}-of-{shares}.json")))
        .collect();
    if let Some(existing) = files.iter().find(|f| f.exists()) {
        return Err(Error::Refused(format!(
            "{} already exists; choose an empty --out-dir (if a ceremony for this KEK was \
             stopped after writing its shares, its custodians can bring the KEK in with \
             `rustls-hsm kek import` instead)",
            existing.display()
        )));
    }
    Ok(files)
}

fn random_kek(module: &Module, token: &Token) -> Result<Zeroizing<[u8; KEK_LEN]>, Error> {
    // A read-write session: some tokens refuse an SO login while a read-only one is open.
    let session = module
        .context()
        .open_rw_session(token.slot)
        .map_err(pkcs11::Error::pkcs11("open a session"))?;
    let mut value = Zeroizing::new([0u8; KEK_LEN]);
    session
        .generate_random_slice(value.as_mut_slice())
        .map_err(pkcs11::Error::pkcs11("draw the KEK (C_GenerateRandom)"))?;
    Ok(value)
}

fn split(
    value: &Zeroizing<[u8; KEK_LEN]>,
    threshold: u8,
    shares: u8,
) -> Result<Vec<Zeroizing<Vec<u8>>>, Error> {
    let mut rng = OsRandom::default();
    let parts = Gf256::split_array(
        usize::from(threshold),
        usize::from(shares),
        value.as_slice(),
        &mut rng,
    )
    .map_err(|e| Error::Refused(format!("splitting the KEK failed: {e:?}")))?;
    let parts: Vec<Zeroizing<Vec<u8>>> = parts
        .into_iter()
        .map(Zeroizing::new)
        .collect();
    if rng.failed {
        return Err(Error::Refused(
            "the operating system's random generator failed while splitting the KEK; nothing \
             was created"
                .into(),
        ));
    }
    // Recombine the first `threshold` shares before anyone relies on them.
    let first: Vec<Vec<u8>> = parts[..usize::from(threshold)]
        .iter()
        .map(|p| p.to_vec())
        .collect();
    let back = Zeroizing::new(Gf256::combine_array(&first).unwrap_or_default());
    wipe_all(first);
    if back.as_slice() != value.as_slice() {
        return Err(Error::Refused(
            "the shares do not rebuild the KEK; nothing was created".into(),
        ));
    }
    Ok(parts)
}

fn combine(shares: &[&ShareFile]) -> Result<Zeroizing<[u8; KEK_LEN]>, Error> {
    let parts: Vec<Vec<u8>> = shares
        .iter()
        .map(|s| s.share.to_vec())
        .collect();
    let combined = Gf256::combine_array(&parts);
    wipe_all(parts);
    let combined = Zeroizing::new(
        combined.map_err(|e| Error::Refused(format!("recombining the shares failed: {e:?}")))?,
    );
    let mut value = Zeroizing::new([0u8; KEK_LEN]);
    if combined.len() != KEK_LEN {
        return Err(Error::Refused(format!(
            "the shares rebuild {} bytes, not a {KEK_LEN}-byte KEK",
            combined.len()
        )));
    }
    value.copy_from_slice(&combined);
    Ok(value)
}

fn write_shares(
    files: &[PathBuf],
    parts: &[Zeroizing<Vec<u8>>],
    label: &str,
    check_value: CheckValue,
    threshold: u8,
    created: &str,
) -> Result<(), Error> {
    let shares =
        u8::try_from(parts.len()).map_err(|_| Error::Refused("at most 255 shares".into()))?;
    for (file, part) in files.iter().zip(parts) {
        let share = ShareFile {
            kek_label: label.to_owned(),
            check_value,
            threshold,
            shares,
            index: part[0],
            created: created.to_owned(),
            share: part.clone(),
        };
        let text = share
            .to_json()
            .map_err(|reason| Error::Share {
                path: file.clone(),
                reason,
            })?;
        write_private_file(file, text.as_bytes())?;
    }
    Ok(())
}

fn wipe_all(parts: Vec<Vec<u8>>) {
    for mut part in parts {
        part.zeroize();
    }
}

/// The operating system's random generator for the polynomial coefficients, in the shape
/// `vsss-rs` takes; a failure is recorded (and the split refused) instead of panicking.
#[derive(Default)]
struct OsRandom {
    failed: bool,
}

impl rand_core::TryRng for OsRandom {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut bytes = [0u8; 4];
        self.fill(&mut bytes);
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut bytes = [0u8; 8];
        self.fill(&mut bytes);
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.fill(dst);
        Ok(())
    }
}

impl rand_core::TryCryptoRng for OsRandom {}

impl OsRandom {
    fn fill(&mut self, dst: &mut [u8]) {
        if getrandom::getrandom(dst).is_err() {
            self.failed = true;
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ShareDocument {
    format: String,
    version: u32,
    content: ShareContent,
    integrity: Integrity,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ShareContent {
    created: String,
    kek_label: String,
    kek_check_value: String,
    threshold: u8,
    shares: u8,
    index: u8,
    share: String,
}

impl Drop for ShareContent {
    fn drop(&mut self) {
        self.share.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_file_names_stay_in_the_directory_and_visible() {
        let dir = tempfile::tempdir().unwrap();
        for (label, first) in [
            ("backup-kek", "backup-kek-share-1-of-2.json"),
            ("../../evil", "_.._evil-share-1-of-2.json"),
            ("..", "kek-share-1-of-2.json"),
            ("a/b c", "a_b_c-share-1-of-2.json"),
        ] {
            let files = share_paths(dir.path(), label, 2).unwrap();
            assert_eq!(files[0], dir.path().join(first), "{label}");
        }
    }

    fn shares_of(value: [u8; KEK_LEN], threshold: u8, count: u8) -> Vec<ShareFile> {
        let value = Zeroizing::new(value);
        split(&value, threshold, count)
            .unwrap()
            .into_iter()
            .map(|part| ShareFile {
                kek_label: "kek".into(),
                check_value: CheckValue::of_aes256(&value),
                threshold,
                shares: count,
                index: part[0],
                created: now_rfc3339(),
                share: part,
            })
            .collect()
    }

    #[test]
    fn any_threshold_of_shares_rebuilds_the_key() {
        let shares = shares_of([7; KEK_LEN], 2, 3);
        for pair in [[0, 1], [0, 2], [1, 2]] {
            let chosen: Vec<&ShareFile> = pair
                .iter()
                .map(|i| &shares[*i])
                .collect();
            assert_eq!(*combine(&chosen).unwrap(), [7; KEK_LEN]);
        }
    }

    #[test]
    fn share_files_round_trip_and_detect_edits() {
        let shares = shares_of([9; KEK_LEN], 3, 5);
        let text = shares[4].to_json().unwrap();
        let back = ShareFile::parse(&text).unwrap();
        assert_eq!((back.index, back.threshold, back.shares), (5, 3, 5));
        assert_eq!(back.share, shares[4].share);
        let edited = text.replacen("\"threshold\": 3", "\"threshold\": 2", 1);
        let err = ShareFile::parse(&edited).unwrap_err();
        assert!(err.contains("integrity check failed"), "{err}");
        assert!(!format!("{back:?}").contains(&hex::encode(back.share.as_slice())));
    }
}
