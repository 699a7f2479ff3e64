//! `rustls-hsm key`: generate, import, list, show and delete signing keys on a token.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context};
use clap::Subcommand;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use der::pem::LineEnding;
use rustls_hsm::pkcs11::{
    destroy_key, destroy_unpaired, find_key_on, find_unpaired, generate_key_pair,
    import_private_key, list_keys, printable, BackupPolicy, Curve, Error, KeyKind, KeyObject,
    KeySelector, KeySpec, Module, Pkcs11Uri, Token,
};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::common::{confirm_by_typing, print_json, LoginArgs};

/// The `key` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum KeyCommand {
    /// Delete a key pair and its certificates.
    Delete {
        #[command(flatten)]
        login: LoginArgs,
        /// The key: its label, `id:HEX` or a `pkcs11:` URI.
        key: KeySelector,
        /// Delete without asking to type the label.
        #[arg(long)]
        yes: bool,
    },
    /// Generate a key pair on the token; the private half never leaves it.
    Generate(GenerateArgs),
    /// Import a PEM private key (PKCS#8, SEC1 or PKCS#1) as a non-extractable key.
    Import {
        #[command(flatten)]
        login: LoginArgs,
        /// The new key's label.
        #[arg(long)]
        label: String,
        /// The new key's CKA_ID in hex; random by default.
        #[arg(long, value_name = "HEX")]
        id: Option<KeyId>,
        /// The PEM file holding the private key.
        #[arg(long = "in", value_name = "KEY.pem")]
        input: PathBuf,
    },
    /// List the private keys on the token.
    List {
        #[command(flatten)]
        login: LoginArgs,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one key, with its public key as PEM.
    Show {
        #[command(flatten)]
        login: LoginArgs,
        /// The key: its label, `id:HEX` or a `pkcs11:` URI.
        key: KeySelector,
    },
}

/// Options of `key generate`.
#[derive(Debug, clap::Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    login: LoginArgs,
    /// The new key's label (unique among the token's private keys).
    #[arg(long)]
    label: String,
    /// Key type: ec:p256, ec:p384, ec:p521, rsa:2048, rsa:3072, rsa:4096 or ed25519.
    #[arg(long = "type", value_name = "TYPE")]
    key_type: KeySpec,
    /// The new key's CKA_ID in hex; random by default.
    #[arg(long, value_name = "HEX")]
    id: Option<KeyId>,
    /// none: the key never leaves the token; wrap-with-trusted: only wrapped by a trusted key.
    #[arg(long, value_name = "POLICY", default_value = "none")]
    backup_policy: BackupPolicy,
}

/// Runs a `key` subcommand.
pub(crate) fn run(module: &Module, command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Delete { login, key, yes } => delete(module, &login, &key, yes),
        KeyCommand::Generate(args) => {
            let (token, session) = args.login.login(module)?;
            let key = generate_key_pair(
                &session,
                &token.label,
                &args.label,
                args.key_type,
                args.id.map(|id| id.0),
                args.backup_policy,
            )?;
            outln!("generated key pair on token {}", token.describe());
            print_key(&KeyEntry::new(&token, &key))?;
            Ok(())
        }
        KeyCommand::Import {
            login,
            label,
            id,
            input,
        } => import(module, &login, &label, id, &input),
        KeyCommand::List { login, json } => list(module, &login, json),
        KeyCommand::Show { login, key } => {
            let (token, session) = login.login(module)?;
            let key = find_key_on(&session, &key, &token, true)?;
            print_key(&KeyEntry::new(&token, &key))?;
            let pem = der::Document::try_from(key.spki.as_slice())
                .and_then(|doc| doc.to_pem("PUBLIC KEY", LineEnding::LF))
                .context("encoding the public key as PEM")?;
            out!("{pem}");
            Ok(())
        }
    }
}

/// One key in `key list --json`.
///
/// Fields: `label`, `id` (CKA_ID, lowercase hex), `type` (`ec:p256`, `rsa:2048`, `ed25519`...),
/// `algorithm` (`ec`, `rsa`, `ed25519`), `bits`, `curve` (`P-256`/`P-384`/`P-521`/`Ed25519`, or
/// null for RSA), `uri` (RFC 7512), `spki_sha256` (lowercase hex of the SHA-256 of the DER
/// SubjectPublicKeyInfo), `sensitive`, `extractable`, `never_extractable`, `always_sensitive`,
/// `local`, `imported` (= not local), `sign`, `certificate` (a certificate with the same id is
/// on the token). Keys that cannot be read appear as [`UnreadableKey`]s, with an `error`.
#[derive(Debug, Serialize)]
struct KeyEntry {
    label: String,
    id: String,
    #[serde(rename = "type")]
    key_type: String,
    algorithm: &'static str,
    bits: usize,
    curve: Option<&'static str>,
    uri: String,
    spki_sha256: String,
    sensitive: bool,
    extractable: bool,
    never_extractable: bool,
    always_sensitive: bool,
    local: bool,
    imported: bool,
    sign: bool,
    certificate: bool,
}

impl KeyEntry {
    fn new(token: &Token, key: &KeyObject) -> Self {
        let (algorithm, bits, curve) = match key.kind {
            KeyKind::Ec(Curve::P256) => ("ec", 256, Some("P-256")),
            KeyKind::Ec(Curve::P384) => ("ec", 384, Some("P-384")),
            KeyKind::Ec(Curve::P521) => ("ec", 521, Some("P-521")),
            KeyKind::Ed25519 => ("ed25519", 256, Some("Ed25519")),
            KeyKind::Rsa(bits) => ("rsa", bits, None),
        };
        Self {
            label: key.label.clone(),
            id: hex::encode(&key.id),
            key_type: key.kind.to_string(),
            algorithm,
            bits,
            curve,
            uri: Pkcs11Uri::for_object(&token.label, &token.serial, &key.label, &key.id, "private"),
            spki_sha256: key.fingerprint(),
            sensitive: key.sensitive,
            extractable: key.extractable,
            never_extractable: key.never_extractable,
            always_sensitive: key.always_sensitive,
            local: key.local,
            imported: !key.local,
            sign: key.sign,
            certificate: key.has_certificate,
        }
    }

    fn flags(&self) -> Vec<&'static str> {
        [
            (self.sensitive, "sensitive"),
            (self.always_sensitive, "always sensitive"),
            (self.extractable, "extractable"),
            (self.never_extractable, "never extractable"),
            // Not extractable now, though it once was or came wrapped (a restored backup).
            (
                !self.extractable && !self.never_extractable,
                "non-extractable",
            ),
            (self.local, "generated on the token"),
            (self.imported, "imported"),
            (!self.sign, "cannot sign"),
        ]
        .into_iter()
        .filter_map(|(set, word)| set.then_some(word))
        .collect()
    }
}

fn print_key(key: &KeyEntry) -> anyhow::Result<()> {
    outln!("key `{}`", printable(&key.label));
    outln!("  id:          {}", key.id);
    outln!("  type:        {}", key.key_type);
    outln!("  uri:         {}", key.uri);
    outln!("  spki sha256: {}", key.spki_sha256);
    outln!("  flags:       {}", key.flags().join(", "));
    outln!(
        "  certificate: {}",
        if key.certificate { "present" } else { "none" }
    );
    Ok(())
}

fn import(
    module: &Module,
    login: &LoginArgs,
    label: &str,
    id: Option<KeyId>,
    input: &Path,
) -> anyhow::Result<()> {
    let pem = read_pem(input)?;
    let (token, session) = login.login(module)?;
    let key = import_private_key(&session, &token.label, label, id.map(|id| id.0), &pem)
        .with_context(|| format!("importing {}", input.display()))?;
    outln!("imported key on token {}", token.describe());
    print_key(&KeyEntry::new(&token, &key))?;
    Ok(())
}

/// Reads a PEM file into a zeroizing buffer; a binary file (DER) is refused with how to convert.
fn read_pem(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let bytes =
        Zeroizing::new(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    match std::str::from_utf8(&bytes) {
        Ok(text) => Ok(Zeroizing::new(text.to_owned())),
        Err(_) => bail!(
            "{} is not PEM text but binary data; convert a DER key first with `openssl pkey \
             -inform DER -in KEY.der -out KEY.pem`",
            path.display()
        ),
    }
}

fn list(module: &Module, login: &LoginArgs, json: bool) -> anyhow::Result<()> {
    let (token, session) = login.login(module)?;
    let keys = list_keys(&session)?;
    let mut unreadable = unreadable_handles(&session, &keys).into_iter();
    let entries: Vec<Result<KeyEntry, UnreadableKey>> = keys
        .iter()
        .map(|key| match key {
            Ok(key) => Ok(KeyEntry::new(&token, key)),
            Err(e) => Err(UnreadableKey::read(&session, unreadable.next(), e)),
        })
        .collect();
    let lone_public = lone_public_keys(&session)?;
    if json {
        let entries: Vec<serde_json::Value> = entries
            .iter()
            .map(|entry| match entry {
                Ok(key) => serde_json::to_value(key),
                Err(unreadable) => serde_json::to_value(unreadable),
            })
            .collect::<Result<_, _>>()
            .context("encoding JSON")?;
        return print_json(&serde_json::json!({
            "keys": entries,
            "public_keys_without_private_key": lone_public,
        }));
    }
    if entries.is_empty() {
        outln!("no private keys on token {}", token.describe());
    }
    for entry in &entries {
        match entry {
            Ok(key) => print_key(key)?,
            Err(unreadable) => outln!("{}", printable(&unreadable.to_string())),
        }
    }
    for lone in &lone_public {
        outln!(
            "public key {:?} (id {}) has no private key (an interrupted restore or another \
             tool left it); `rustls-hsm key delete` with its label removes it",
            lone.label,
            lone.id
        );
    }
    Ok(())
}

/// A public key object whose private half is not on the token, in `key list`.
///
/// In `key list --json` these appear under `public_keys_without_private_key`, each with
/// `label` and `id` (lowercase hex).
#[derive(Debug, Serialize)]
struct LonePublicKey {
    label: String,
    id: String,
}

fn lone_public_keys(session: &Session) -> anyhow::Result<Vec<LonePublicKey>> {
    let unpaired = find_unpaired(session, &KeySelector::default())?;
    Ok(unpaired
        .public
        .into_iter()
        .map(|object| LonePublicKey {
            label: object.label,
            id: hex::encode(object.id),
        })
        .collect())
}

/// The handles of the private keys that `list_keys` could not read, in its order.
///
/// `list_keys` reports an unreadable key by its error alone. Its handles come from the same
/// `C_FindObjects` search in the same session, which yields the same objects in the same order,
/// so the handles not among the readable keys belong to the errors, in turn. If the token
/// changed in between (the counts differ), no handle is given rather than a wrong one.
// LIMITATION: pairing by order stands in for the handle `list_keys` does not return with an
// error; returning it there (a handle beside each result) would make this search unnecessary.
fn unreadable_handles(session: &Session, keys: &[Result<KeyObject, Error>]) -> Vec<ObjectHandle> {
    let Ok(handles) = session.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)]) else {
        return Vec::new();
    };
    if handles.len() != keys.len() {
        return Vec::new();
    }
    let readable: Vec<ObjectHandle> = keys
        .iter()
        .flatten()
        .map(|key| key.private)
        .collect();
    handles
        .into_iter()
        .filter(|h| !readable.contains(h))
        .collect()
}

/// A private key that could not be read whole, with the attributes that could be read.
///
/// In `key list --json` it appears as `{"error": "...", "handle": N, "label": ..., "id": ...,
/// "ck_key_type": "CKK_EC", "sensitive": ..., "extractable": ..., "local": ..., "sign": ...}`;
/// `handle` is valid only in that session (not a stable name), and any field that could not be
/// read is null.
#[derive(Debug, Serialize)]
struct UnreadableKey {
    error: String,
    handle: Option<u64>,
    label: Option<String>,
    id: Option<String>,
    ck_key_type: Option<String>,
    sensitive: Option<bool>,
    extractable: Option<bool>,
    local: Option<bool>,
    sign: Option<bool>,
}

impl UnreadableKey {
    /// Reads each attribute on its own, so that one the token refuses hides no other.
    fn read(session: &Session, handle: Option<ObjectHandle>, error: &Error) -> Self {
        let mut key = Self {
            error: error.to_string(),
            // CK_OBJECT_HANDLE is a C unsigned long: u64 here, u32 on some platforms.
            #[allow(clippy::useless_conversion)]
            handle: handle.map(|h| u64::from(h.handle())),
            label: None,
            id: None,
            ck_key_type: None,
            sensitive: None,
            extractable: None,
            local: None,
            sign: None,
        };
        let Some(handle) = handle else {
            return key;
        };
        let wanted = [
            AttributeType::Label,
            AttributeType::Id,
            AttributeType::KeyType,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::Local,
            AttributeType::Sign,
        ];
        for attribute in wanted
            .into_iter()
            .filter_map(|t| {
                session
                    .get_attributes(handle, &[t])
                    .ok()
            })
            .flatten()
        {
            match attribute {
                Attribute::Label(v) => key.label = Some(String::from_utf8_lossy(&v).into_owned()),
                Attribute::Id(v) => key.id = Some(hex::encode(v)),
                Attribute::KeyType(t) => key.ck_key_type = Some(t.to_string()),
                Attribute::Sensitive(b) => key.sensitive = Some(b),
                Attribute::Extractable(b) => key.extractable = Some(b),
                Attribute::Local(b) => key.local = Some(b),
                Attribute::Sign(b) => key.sign = Some(b),
                _ => {}
            }
        }
        key
    }
}

impl fmt::Display for UnreadableKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unknown = || "?".to_owned();
        write!(
            f,
            "unreadable key `{}` (id {}, {}, handle {}): {}",
            self.label
                .clone()
                .unwrap_or_else(unknown),
            self.id.clone().unwrap_or_else(unknown),
            self.ck_key_type
                .clone()
                .unwrap_or_else(unknown),
            self.handle
                .map_or_else(unknown, |h| h.to_string()),
            self.error
        )
    }
}

fn delete(
    module: &Module,
    login: &LoginArgs,
    selector: &KeySelector,
    yes: bool,
) -> anyhow::Result<()> {
    let (token, session) = login.login(module)?;
    let key = match find_key_on(&session, selector, &token, true) {
        Ok(key) => key,
        // Half a pair (an interrupted restore, another tool): delete what is there.
        Err(e @ (Error::KeyNotFound { .. } | Error::PublicKey { .. })) => {
            return delete_unpaired(&session, &token, selector, yes, e)
        }
        Err(e) => return Err(e.into()),
    };
    if !yes {
        confirm_by_typing(
            &key.label,
            &format!(
                "deleting key {} from token {}",
                key.describe(),
                token.describe()
            ),
            "--yes",
        )?;
    }
    let done = destroy_key(&session, &key)?;
    outln!(
        "deleted key {}: private key, {}, {} certificate(s)",
        key.describe(),
        if done.public {
            "public key"
        } else {
            "no public key object"
        },
        done.certificates
    );
    if done.shared_certificates > 0 {
        outln!(
            "kept {} certificate(s) with id {}: another private key has the same id",
            done.shared_certificates,
            hex::encode(&key.id)
        );
    }
    Ok(())
}

/// Deletes key objects whose other half is missing; `not_paired` is the error the pair lookup
/// gave, returned when there is nothing of the kind either.
fn delete_unpaired(
    session: &Session,
    token: &Token,
    selector: &KeySelector,
    yes: bool,
    not_paired: Error,
) -> anyhow::Result<()> {
    let unpaired = find_unpaired(session, selector)?;
    if unpaired.is_empty() {
        return Err(not_paired.into());
    }
    let what = format!(
        "{} private key(s) without a public half and {} public key(s) without a private half \
         matching `{selector}`",
        unpaired.private.len(),
        unpaired.public.len()
    );
    if !yes {
        confirm_by_typing(
            &selector.to_string(),
            &format!("deleting {what} from token {}", token.describe()),
            "--yes",
        )?;
    }
    destroy_unpaired(session, &unpaired)?;
    outln!("deleted {what}");
    Ok(())
}

/// A `CKA_ID` given in hex on the command line.
#[derive(Clone, Debug)]
pub(crate) struct KeyId(Vec<u8>);

impl FromStr for KeyId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let id = hex::decode(text.trim_start_matches("0x"))
            .map_err(|_| "the id must be hexadecimal, e.g. 01 or a1b2".to_owned())?;
        if id.is_empty() {
            return Err("the id must not be empty".into());
        }
        Ok(Self(id))
    }
}
