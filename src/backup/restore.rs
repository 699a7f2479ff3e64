//! Restoring a backup (`C_UnwrapKey`), and checking one without keeping anything.
//!
//! A restore proves itself: the unwrapped key's attributes are read back, it signs a random
//! message, and the signature must verify in software under the public key in the backup. On
//! any mismatch the restored objects are destroyed and the restore fails.
//!
//! The token enforces the KEK's `CKA_UNWRAP_TEMPLATE` on top of the template given here: a
//! restored key is sensitive and non-extractable whoever unwraps it.

use cryptoki::error::RvError;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use der::Encode;
use rustls::SignatureScheme;
use spki::DecodePublicKey;

use super::format::Backup;
use super::kek::{find_kek, CheckValue, KekObject, UnwrapTemplate};
use super::probe::refuse_leaky_token;
use super::wrap::{KeyWrap, Op};
use super::Error;
use crate::pkcs11::{
    self, list_keys, read_key, rv_of, BackupPolicy, KeyKind, KeyObject, MechanismList, Module,
    Token,
};
use crate::scheme::{scheme_name, sign_message, verify_signature, SchemePlan};

/// What a restore or a verification did.
#[derive(Clone, Debug)]
pub struct RestoreReport {
    /// The restored key as read back (for a verification, the temporary key, now destroyed).
    pub key: KeyObject,
    /// The scheme of the test signature that verified under the backup's public key.
    pub scheme: SignatureScheme,
    /// The check value of the KEK used.
    pub kek_check_value: Option<CheckValue>,
    /// A public key object with the backup's label, id and key was on the token (left by an
    /// interrupted restore) and was replaced.
    pub replaced_public: bool,
}

impl RestoreReport {
    /// The test signature's scheme, in TLS's words.
    pub fn scheme_name(&self) -> String {
        scheme_name(self.scheme)
    }
}

/// Restores `backup` onto the token as a token object with the backup's label and id.
///
/// `session` must be logged in as the user. The key is sensitive, may sign and nothing else,
/// and is non-extractable unless `policy` is wrap-with-trusted, which only a key backed up with
/// that policy may keep. A key with the same label or id already on the token is refused before
/// anything is unwrapped, as is a KEK whose check value differs from the backup's.
pub fn restore_backup(
    module: &Module,
    session: &Session,
    token: &Token,
    backup: &Backup,
    kek_label: &str,
    policy: BackupPolicy,
) -> Result<RestoreReport, Error> {
    if policy == BackupPolicy::WrapWithTrusted && backup.policy != BackupPolicy::WrapWithTrusted {
        return Err(Error::Refused(
            "the backed-up key did not have backup policy wrap-with-trusted, so the restored \
             key cannot get it either"
                .into(),
        ));
    }
    let leftover_public = refuse_existing(session, token, backup)?;
    let target = Target {
        on_token: true,
        label: backup.label.clone(),
        id: backup.id.clone(),
        policy,
        leftover_public,
    };
    // The restored objects stay: they are the point.
    let (report, _kept) = unwrap_checked(module, session, token, backup, kek_label, &target)?;
    Ok(report)
}

/// Checks that `backup` restores on this token, leaving nothing behind.
///
/// The key is unwrapped as a session object (`CKA_TOKEN=false`) under a temporary label and
/// id, test-signs, is verified under the backup's public key, and is destroyed in every case.
pub fn verify_backup(
    module: &Module,
    session: &Session,
    token: &Token,
    backup: &Backup,
    kek_label: &str,
) -> Result<RestoreReport, Error> {
    let id = session
        .generate_random_vec(16)
        .map_err(pkcs11::Error::pkcs11("draw a temporary CKA_ID"))?;
    let target = Target {
        on_token: false,
        label: format!("rustls-hsm-backup-verify-{}", hex::encode(&id[..4])),
        id,
        policy: BackupPolicy::None,
        leftover_public: None,
    };
    let (report, objects) = unwrap_checked(module, session, token, backup, kek_label, &target)?;
    objects.destroy(session)?;
    Ok(report)
}

/// Where and how the key is unwrapped.
struct Target {
    on_token: bool,
    label: String,
    id: Vec<u8>,
    policy: BackupPolicy,
    /// The backup's own public key object, left by an interrupted restore: replaced.
    leftover_public: Option<ObjectHandle>,
}

/// The objects a restore made (a reused public key is not among them); destroyed together when
/// a check fails.
struct Restored {
    private: ObjectHandle,
    public: Option<ObjectHandle>,
}

impl Restored {
    fn destroy(&self, session: &Session) -> Result<(), Error> {
        let mut result = Ok(());
        // The private key first: stopped halfway, this leaves a public key, never a private
        // key without its public half.
        for handle in [self.private]
            .into_iter()
            .chain(self.public)
        {
            if let Err(e) = session.destroy_object(handle) {
                tracing::warn!(%handle, error = %e, "could not destroy a restored object");
                result = Err(pkcs11::Error::pkcs11("destroy a restored object")(e).into());
            }
        }
        result
    }
}

fn unwrap_checked(
    module: &Module,
    session: &Session,
    token: &Token,
    backup: &Backup,
    kek_label: &str,
    target: &Target,
) -> Result<(RestoreReport, Restored), Error> {
    refuse_leaky_token(module, session, token)?;
    let kek = find_kek(module, session, token, kek_label, true)?;
    kek.check_for_unwrap(token)?;
    if target.policy == BackupPolicy::WrapWithTrusted
        && kek.unwrap_template == UnwrapTemplate::Locks
    {
        return Err(locked_restore(&kek, token));
    }
    if let (Some(expected), Some(found)) = (backup.kek_check_value, kek.check_value) {
        if expected != found {
            return Err(Error::WrongKek {
                label: kek.label,
                token: token.describe(),
                expected,
                found,
            });
        }
    }
    let mechanism = KeyWrap::choose(module, session, token, Op::Unwrap, Some(backup.mechanism))?;
    // The public half first: a restore stopped between the two steps leaves only a public key,
    // which a second run recognises and uses, never a private key that nothing can pair.
    // A leftover is replaced, not used: whoever made it, it gets exactly the attributes a
    // restore gives, or the restore stops here.
    if let Some(leftover) = target.leftover_public {
        session
            .destroy_object(leftover)
            .map_err(|e| {
                Error::Refused(format!(
                "a public key object with the backup's label, id and key is on token {} (left by \
                 an interrupted restore, or made by someone else), and it cannot be replaced: \
                 {}; nothing was restored",
                token.describe(),
                pkcs11::rv_text(&e)
            ))
            })?;
    }
    let made_public = Some(
        session
            .create_object(&public_template(backup, target)?)
            .map_err(pkcs11::Error::pkcs11("create the public key object"))?,
    );
    let unwrapped = mechanism
        .unwrap(
            module,
            session,
            kek.handle,
            &backup.wrapped,
            &private_template(backup.kind, target),
        )
        .and_then(|result| {
            result.map_err(|source| {
                if rv_of(&source) == Some(RvError::TemplateInconsistent)
                    && target.policy == BackupPolicy::WrapWithTrusted
                {
                    // A KEK whose template could not be read beforehand.
                    locked_restore(&kek, token)
                } else {
                    Error::Unwrap {
                        label: kek.label.clone(),
                        source,
                    }
                }
            })
        });
    let private = match unwrapped {
        Ok(private) => private,
        Err(e) => {
            if let Some(public) = made_public {
                if let Err(e) = session.destroy_object(public) {
                    tracing::warn!(%public, error = %e, "could not destroy a restored object");
                }
            }
            return Err(e);
        }
    };
    let restored = Restored {
        private,
        public: made_public,
    };
    let checked = check_restored(module, session, token, backup, target, private);
    match checked {
        Ok((key, scheme)) => Ok((
            RestoreReport {
                key,
                scheme,
                kek_check_value: kek.check_value,
                replaced_public: target.leftover_public.is_some(),
            },
            restored,
        )),
        Err(e) => {
            let _ = restored.destroy(session);
            Err(e)
        }
    }
}

/// The refusal of `--backup-policy wrap-with-trusted` under a KEK that locks restored keys.
fn locked_restore(kek: &KekObject, token: &Token) -> Error {
    Error::KekUnfit {
        label: kek.label.clone(),
        token: token.describe(),
        reason: "its CKA_UNWRAP_TEMPLATE forces every key it unwraps to be sensitive and \
                 non-extractable, so a restored key cannot keep backup policy \
                 wrap-with-trusted; restore without --backup-policy, and keep the backup file \
                 (it stays valid) as this key's backup"
            .into(),
    }
}

fn check_restored(
    module: &Module,
    session: &Session,
    token: &Token,
    backup: &Backup,
    target: &Target,
    private: ObjectHandle,
) -> Result<(KeyObject, SignatureScheme), Error> {
    let fail = |reason: String| Error::RestoreCheck { reason };
    let key = read_key(session, private)?;
    let want_extractable = target.policy == BackupPolicy::WrapWithTrusted;
    let checks = [
        ("CKA_SENSITIVE", key.sensitive, true),
        ("CKA_EXTRACTABLE", key.extractable, want_extractable),
        ("CKA_SIGN", key.sign, true),
        (
            "CKA_WRAP_WITH_TRUSTED",
            key.wrap_with_trusted || !want_extractable,
            true,
        ),
    ];
    for (name, have, want) in checks {
        if have != want {
            return Err(fail(format!(
                "the token did not honour {name}={want} (it reads {have})"
            )));
        }
    }
    if key.kind != backup.kind {
        return Err(fail(format!(
            "the unwrapped key is {}, the backup says {}",
            key.kind, backup.kind
        )));
    }

    let mechanisms = MechanismList::read(module, token.slot)?;
    let plan = SchemePlan::for_key(key.kind, &mechanisms);
    let Some((scheme, method)) = plan.usable().next() else {
        return Err(fail(format!(
            "the token offers no mechanism to sign with a {} key",
            key.kind
        )));
    };
    let mut message = b"rustls-hsm backup check\n".to_vec();
    message.extend(
        session
            .generate_random_vec(32)
            .map_err(pkcs11::Error::pkcs11("draw a test message"))?,
    );
    let signature = sign_message(session, private, key.kind, method, &message)
        .map_err(|e| fail(format!("the test signature failed: {e}")))?;
    verify_signature(&backup.spki, scheme, &message, &signature).map_err(|e| {
        fail(format!(
            "the unwrapped key's signature does not verify under the backup's public key \
             ({e}); the file's public key does not belong to the wrapped key"
        ))
    })?;
    Ok((key, scheme))
}

/// Refuses when a key with the backup's public key, label or id is on the token, except the
/// backup's own public key object alone, left by an interrupted restore (same label, id and
/// public key): that one is returned, to be replaced.
fn refuse_existing(
    session: &Session,
    token: &Token,
    backup: &Backup,
) -> Result<Option<ObjectHandle>, Error> {
    // Keys are found again by label and id: a restored key needs both.
    if backup.label.is_empty() || backup.id.is_empty() {
        return Err(Error::Refused(
            "the backup gives the key an empty label or id, and rustls-hsm finds keys by both; \
             nothing was restored"
                .into(),
        ));
    }
    let exists = |what: String| Error::KeyExists {
        what,
        token: token.describe(),
    };
    // The same key under another label or id would be a second copy of it.
    for key in list_keys(session)?
        .into_iter()
        .flatten()
    {
        if key.spki == backup.spki {
            return Err(exists(format!(
                "the same public key (as `{}`, id {})",
                key.label,
                hex::encode(&key.id)
            )));
        }
    }
    let label = Attribute::Label(backup.label.as_bytes().to_vec());
    let id = Attribute::Id(backup.id.clone());
    let find = |class, attribute: &Attribute| {
        session
            .find_objects(&[Attribute::Class(class), attribute.clone()])
            .map_err(pkcs11::Error::pkcs11("look for existing keys"))
    };
    let label_text = format!("label `{}`", backup.label);
    let id_text = format!("id {}", hex::encode(&backup.id));
    for (attribute, what) in [(&label, &label_text), (&id, &id_text)] {
        if !find(ObjectClass::PRIVATE_KEY, attribute)?.is_empty() {
            return Err(exists(what.clone()));
        }
    }
    let by_label = find(ObjectClass::PUBLIC_KEY, &label)?;
    let by_id = find(ObjectClass::PUBLIC_KEY, &id)?;
    match (by_label.as_slice(), by_id.as_slice()) {
        ([], []) => Ok(None),
        ([one], [same])
            if one == same
                && pkcs11::public_key_spki(session, *one, &backup.label)
                    .is_ok_and(|spki| spki == backup.spki) =>
        {
            tracing::info!(
                label = %backup.label,
                "using the public key object an interrupted restore left"
            );
            Ok(Some(*one))
        }
        (by_label, _) => {
            let (what, selector) = if by_label.is_empty() {
                (id_text, format!("id:{}", hex::encode(&backup.id)))
            } else {
                (label_text, backup.label.clone())
            };
            Err(Error::Refused(format!(
                "a public key object with {what} and no private key is on token {} (left by an \
                 interrupted restore of another backup, or by another tool); nothing was \
                 restored. Remove it with `rustls-hsm key delete '{selector}'` or restore onto \
                 another token",
                token.describe(),
            )))
        }
    }
}

fn key_type(kind: KeyKind) -> KeyType {
    match kind {
        KeyKind::Ec(_) => KeyType::EC,
        KeyKind::Ed25519 => KeyType::EC_EDWARDS,
        KeyKind::Rsa(_) => KeyType::RSA,
    }
}

fn private_template(kind: KeyKind, target: &Target) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type(kind)),
    ];
    template.extend(pkcs11::private_template(
        &target.label,
        &target.id,
        target.policy,
        target.on_token,
    ));
    // What a KEK's unwrap template pins beyond the key's own template (SoftHSM wants every
    // pinned attribute stated).
    template.push(Attribute::SignRecover(false));
    template
}

/// The public key object, rebuilt from the backup's SubjectPublicKeyInfo.
fn public_template(backup: &Backup, target: &Target) -> Result<Vec<Attribute>, Error> {
    let bad = |reason: String| Error::File {
        path: "(backup)".into(),
        reason,
    };
    let mut template = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(key_type(backup.kind)),
        Attribute::Token(target.on_token),
        Attribute::Private(false),
        Attribute::Label(target.label.as_bytes().to_vec()),
        Attribute::Id(target.id.clone()),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
    ];
    match backup.kind {
        KeyKind::Rsa(_) => {
            use rsa::traits::PublicKeyParts;

            let key = rsa::RsaPublicKey::from_public_key_der(&backup.spki)
                .map_err(|e| bad(format!("RSA public key: {e}")))?;
            template.push(Attribute::Modulus(key.n().to_bytes_be()));
            template.push(Attribute::PublicExponent(key.e().to_bytes_be()));
        }
        KeyKind::Ec(_) | KeyKind::Ed25519 => {
            let oid = match backup.kind {
                KeyKind::Ec(curve) => curve.oid(),
                _ => const_oid::db::rfc8410::ID_ED_25519,
            };
            let info = spki::SubjectPublicKeyInfoRef::try_from(backup.spki.as_slice())
                .map_err(|e| bad(format!("public key: {e}")))?;
            let point = info
                .subject_public_key
                .as_bytes()
                .ok_or_else(|| bad("the public key has unused bits".into()))?;
            let encode = |e: der::Error| bad(format!("encoding the public key: {e}"));
            template.push(Attribute::EcParams(oid.to_der().map_err(encode)?));
            template.push(Attribute::EcPoint(
                der::asn1::OctetStringRef::new(point)
                    .and_then(|o| o.to_der())
                    .map_err(encode)?,
            ));
        }
    }
    Ok(template)
}
