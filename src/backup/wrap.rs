//! Backing a key up: `C_WrapKey` under a trusted KEK with RFC 5649 AES key wrap with padding.
//!
//! The key's backup policy and the KEK's attributes are read and checked before any wrap call,
//! so a refusal names the attribute instead of relaying a token's vague return code (SoftHSM
//! answers `CKR_KEY_UNEXTRACTABLE` or `CKR_KEY_NOT_WRAPPABLE`). Private keys are never wrapped
//! with a CBC mechanism: only RFC 5649, whose integrity check authenticates the wrapped bytes,
//! under whichever of its two PKCS#11 names the token offers ([`KeyWrap`]).

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;

use super::format::{now_rfc3339, Backup};
use super::kek::find_kek;
use super::probe::refuse_leaky_token;
use super::Error;
use crate::pkcs11::ext::{raw_calls, sys, Attr};
use crate::pkcs11::{self, find_key_on, BackupPolicy, KeyObject, KeySelector, Module, Token};

/// RFC 5649 AES key wrap with padding, under one of the two names PKCS#11 gives it.
///
/// PKCS#11 2.40 calls it `CKM_AES_KEY_WRAP_PAD` (SoftHSM); 3.1 adds `CKM_AES_KEY_WRAP_KWP`
/// (kryoptic offers only this one). Both produce RFC 5649 ciphertext.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum KeyWrap {
    /// `CKM_AES_KEY_WRAP_PAD` (0x210A).
    Pad,
    /// `CKM_AES_KEY_WRAP_KWP` (0x210B), which cryptoki 0.12 cannot name.
    Kwp,
}

impl KeyWrap {
    /// Both names, in order of preference (cryptoki can call the first itself).
    pub const ALL: [Self; 2] = [Self::Pad, Self::Kwp];

    /// The mechanism's name, as backup files record it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pad => "CKM_AES_KEY_WRAP_PAD",
            Self::Kwp => "CKM_AES_KEY_WRAP_KWP",
        }
    }

    /// The mechanism named `name`, if it is one of the two.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == name)
    }

    /// The mechanism's number.
    pub fn mechanism_type(self) -> sys::CK_MECHANISM_TYPE {
        match self {
            Self::Pad => sys::CKM_AES_KEY_WRAP_PAD,
            Self::Kwp => sys::CKM_AES_KEY_WRAP_KWP,
        }
    }

    /// The forms the token offers for `op`, in order of preference.
    ///
    /// `CKM_AES_KEY_WRAP_KWP` is asked about through the module's own function list, so a
    /// module that gives each caller its own instance (p11-kit's client) reports only the PAD
    /// form.
    pub(crate) fn offered(module: &Module, session: &Session, token: &Token, op: Op) -> Vec<Self> {
        let allowed = |wrap: bool, unwrap: bool| match op {
            Op::Wrap => wrap,
            Op::Unwrap => unwrap,
        };
        let mut offered = Vec::new();
        if let Ok(info) = module
            .context()
            .get_mechanism_info(token.slot, MechanismType::AES_KEY_WRAP_PAD)
        {
            if allowed(info.wrap(), info.unwrap()) {
                offered.push(Self::Pad);
            }
        }
        if let Ok(raw) = raw_calls(module, session, "ask about CKM_AES_KEY_WRAP_KWP") {
            if let Ok(info) = raw.mechanism_info(token.slot, sys::CKM_AES_KEY_WRAP_KWP) {
                if allowed(info.wrap(), info.unwrap()) {
                    offered.push(Self::Kwp);
                }
            }
        }
        offered
    }

    /// The form to use for `op`: `preferred` when the token offers it, else the first it
    /// offers.
    pub(crate) fn choose(
        module: &Module,
        session: &Session,
        token: &Token,
        op: Op,
        preferred: Option<Self>,
    ) -> Result<Self, Error> {
        let offered = Self::offered(module, session, token, op);
        preferred
            .filter(|p| offered.contains(p))
            .or_else(|| offered.first().copied())
            .ok_or_else(|| Error::MechanismMissing {
                token: token.describe(),
                op: match op {
                    Op::Unwrap => "unwrap",
                    Op::Wrap => "wrap",
                },
                reason: "the token offers neither CKM_AES_KEY_WRAP_PAD nor CKM_AES_KEY_WRAP_KWP \
                         with that flag; private keys are never wrapped with CBC"
                    .into(),
            })
    }

    /// `C_WrapKey` of `key` under `kek`.
    pub(crate) fn wrap(
        self,
        module: &Module,
        session: &Session,
        kek: ObjectHandle,
        key: ObjectHandle,
    ) -> Result<Vec<u8>, Error> {
        let op = match self {
            Self::Pad => "wrap the key (C_WrapKey, CKM_AES_KEY_WRAP_PAD)",
            Self::Kwp => "wrap the key (C_WrapKey, CKM_AES_KEY_WRAP_KWP)",
        };
        let wrapped =
            match self {
                Self::Pad => session.wrap_key(&Mechanism::AesKeyWrapPad, kek, key),
                Self::Kwp => raw_calls(module, session, "wrap with CKM_AES_KEY_WRAP_KWP")?
                    .wrap_key(session, self.mechanism_type(), kek, key),
            };
        Ok(wrapped.map_err(pkcs11::Error::pkcs11(op))?)
    }

    /// `C_UnwrapKey` of `wrapped` under `kek` into an object made from `template`.
    ///
    /// The inner result is the token's answer, for the caller to explain.
    pub(crate) fn unwrap(
        self,
        module: &Module,
        session: &Session,
        kek: ObjectHandle,
        wrapped: &[u8],
        template: &[Attribute],
    ) -> Result<Result<ObjectHandle, CkError>, Error> {
        Ok(match self {
            Self::Pad => session.unwrap_key(&Mechanism::AesKeyWrapPad, kek, wrapped, template),
            Self::Kwp => {
                let template: Vec<Attr> = template
                    .iter()
                    .map(Attr::from)
                    .collect();
                raw_calls(module, session, "unwrap with CKM_AES_KEY_WRAP_KWP")?.unwrap_key(
                    session,
                    self.mechanism_type(),
                    kek,
                    wrapped,
                    &template,
                )
            }
        })
    }
}

/// Wraps the key `selector` names under the KEK labelled `kek_label` and returns the backup.
///
/// `session` must be logged in as the user. The key must have been generated with backup
/// policy wrap-with-trusted (`CKA_EXTRACTABLE=true`, `CKA_WRAP_WITH_TRUSTED=true`) and the KEK
/// must be trusted; both are checked before `C_WrapKey`.
pub fn create_backup(
    module: &Module,
    session: &Session,
    token: &Token,
    selector: &KeySelector,
    kek_label: &str,
) -> Result<Backup, Error> {
    let key = find_key_on(session, selector, token, true)?;
    check_policy(&key)?;
    refuse_leaky_token(module, session, token)?;
    let kek = find_kek(module, session, token, kek_label, true)?;
    kek.check_for_wrap(session, token)?;
    refuse_public_trusted_keys(session, token)?;
    let mechanism = KeyWrap::choose(module, session, token, Op::Wrap, None)?;
    let wrapped = match mechanism.wrap(module, session, kek.handle, key.private) {
        Err(Error::Pkcs11(pkcs11::Error::Pkcs11 { source, .. }))
            if pkcs11::rv_of(&source) == Some(RvError::KeyNotWrappable) =>
        {
            return Err(Error::KeyPolicy {
                key: key.describe(),
                reason: format!(
                    "the token refuses to wrap this {} key ({}) although its policy and the KEK \
                     allow it (SoftHSM 2.6 cannot wrap EdDSA keys); keep such a key's \
                     certificate ready to re-issue for a new key instead",
                    key.kind,
                    pkcs11::rv_text(&source)
                ),
            });
        }
        other => other?,
    };
    Ok(Backup {
        label: key.label,
        id: key.id,
        kind: key.kind,
        policy: BackupPolicy::WrapWithTrusted,
        spki: key.spki,
        mechanism,
        kek_label: kek.label,
        kek_check_value: kek.check_value,
        wrapped,
        source_token: format!("`{}` (serial {})", token.label, token.serial),
        created: now_rfc3339(),
    })
}

/// Refuses when the token holds a public trusted wrapping key. Only the security officer can
/// make one, and may know its value: every key with backup policy wrap-with-trusted could be
/// wrapped under it and read. (A session object the SO keeps in its own process cannot be seen
/// from here; see docs/backup.md on what the SO PIN can do.)
fn refuse_public_trusted_keys(session: &Session, token: &Token) -> Result<(), Error> {
    let trusted = session
        .find_objects(&[
            Attribute::Trusted(true),
            Attribute::Wrap(true),
            Attribute::Private(false),
        ])
        .map_err(pkcs11::Error::pkcs11("look for trusted wrapping keys"))?;
    let Some(&first) = trusted.first() else {
        return Ok(());
    };
    let label = session
        .get_attributes(first, &[AttributeType::Label])
        .ok()
        .and_then(|attrs| match attrs.as_slice() {
            [Attribute::Label(l)] => Some(String::from_utf8_lossy(l).into_owned()),
            _ => None,
        })
        .unwrap_or_default();
    Err(Error::Refused(format!(
        "token {} holds a public trusted wrapping key (`{label}`, and {} more): whoever made it \
         (only the security officer can) may know its value and export every key with backup \
         policy wrap-with-trusted under it; the security officer should destroy it before \
         backups are made",
        token.describe(),
        trusted.len() - 1
    )))
}

/// Which half of RFC 5649 a token must offer.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Op {
    Unwrap,
    Wrap,
}

fn check_policy(key: &KeyObject) -> Result<(), Error> {
    let refuse = |reason: &str| {
        Err(Error::KeyPolicy {
            key: key.describe(),
            reason: reason.to_owned(),
        })
    };
    if !key.extractable && !key.local {
        return refuse(
            "CKA_EXTRACTABLE=false: it was not generated on this token but restored from a backup \
             (or imported), and such keys are locked; the backup file it was restored from \
             remains its backup (for an imported key, the file it was imported from)",
        );
    }
    if !key.extractable {
        return refuse(
            "CKA_EXTRACTABLE=false: it was generated with backup policy `none` (the default), \
             so it can never leave the token, not even wrapped; a key that needs a backup must \
             be generated with `--backup-policy wrap-with-trusted`",
        );
    }
    if !key.wrap_with_trusted {
        return refuse(
            "CKA_WRAP_WITH_TRUSTED=false: it does not have backup policy wrap-with-trusted, so \
             any wrapping key could export it; only keys that can leave the token solely under \
             a trusted KEK are backed up",
        );
    }
    if !key.sensitive {
        return refuse("CKA_SENSITIVE=false: its value can be read in plain; it is not backed up");
    }
    Ok(())
}
