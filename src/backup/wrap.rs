//! Backing a key up: `C_WrapKey` under a trusted KEK with RFC 5649 AES key wrap with padding.
//!
//! The key's backup policy and the KEK's attributes are read and checked before any wrap call,
//! so a refusal names the attribute instead of relaying a token's vague return code (SoftHSM
//! answers `CKR_KEY_UNEXTRACTABLE` or `CKR_KEY_NOT_WRAPPABLE`). Private keys are never wrapped
//! with a CBC mechanism: only `CKM_AES_KEY_WRAP_PAD`, whose integrity check authenticates the
//! wrapped bytes.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::session::Session;

use super::format::{now_rfc3339, Backup};
use super::kek::find_kek;
use super::Error;
use crate::pkcs11::{self, find_key_on, BackupPolicy, KeyObject, KeySelector, Module, Token};

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
    let kek = find_kek(session, token, kek_label, true)?;
    kek.check_for_wrap(token)?;
    check_mechanism(module, token, Op::Wrap)?;

    let wrapped = session
        .wrap_key(&Mechanism::AesKeyWrapPad, kek.handle, key.private)
        .map_err(pkcs11::Error::pkcs11(
            "wrap the key (C_WrapKey, CKM_AES_KEY_WRAP_PAD)",
        ))?;
    Ok(Backup {
        label: key.label,
        id: key.id,
        kind: key.kind,
        policy: BackupPolicy::WrapWithTrusted,
        spki: key.spki,
        kek_label: kek.label,
        kek_check_value: kek.check_value,
        wrapped,
        source_token: format!("`{}` (serial {})", token.label, token.serial),
        created: now_rfc3339(),
    })
}

/// Which half of RFC 5649 a token must offer.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Op {
    Unwrap,
    Wrap,
}

/// Refuses when the token lacks `CKM_AES_KEY_WRAP_PAD` for `op`.
pub(crate) fn check_mechanism(module: &Module, token: &Token, op: Op) -> Result<(), Error> {
    let missing = |reason: String| Error::MechanismMissing {
        token: token.describe(),
        op: match op {
            Op::Unwrap => "unwrap",
            Op::Wrap => "wrap",
        },
        reason,
    };
    // LIMITATION: kryoptic offers RFC 5649 only as CKM_AES_KEY_WRAP_KWP (0x210B), which
    // cryptoki 0.12.1 cannot name (no Mechanism variant, and vendor mechanisms must be at least
    // CKM_VENDOR_DEFINED), so such tokens cannot back up or restore keys. Supporting them needs
    // a cryptoki release with the mechanism, or an isolated unsafe module calling C_WrapKey.
    let info = module
        .context()
        .get_mechanism_info(token.slot, MechanismType::AES_KEY_WRAP_PAD)
        .map_err(|e| {
            missing(format!(
                "the token does not offer it ({}); tokens that implement RFC 5649 only as \
                 CKM_AES_KEY_WRAP_KWP (kryoptic) cannot be used, because cryptoki 0.12.1 cannot \
                 name that mechanism",
                pkcs11::rv_text(&e)
            ))
        })?;
    let allowed = match op {
        Op::Unwrap => info.unwrap(),
        Op::Wrap => info.wrap(),
    };
    if allowed {
        Ok(())
    } else {
        Err(missing("the token lists it without that flag".into()))
    }
}

fn check_policy(key: &KeyObject) -> Result<(), Error> {
    let refuse = |reason: &str| {
        Err(Error::KeyPolicy {
            key: key.describe(),
            reason: reason.to_owned(),
        })
    };
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
