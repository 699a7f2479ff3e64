//! Generating key pairs on a token and importing existing private keys.
//!
//! Every attribute that matters is set explicitly (tokens' defaults differ), and after
//! generation the ones that protect the key are read back: a token that did not honour them
//! gets its new objects destroyed and the caller an error naming the attribute.

mod material;

use std::fmt;
use std::str::FromStr;

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use der::Encode;
use zeroize::Zeroize;

use super::keys::{check_label, read_key, Curve, KeyKind, KeyObject, KeySelector};
use super::Error;
use material::KeyMaterial;

/// A key type and size that `key generate` accepts, e.g. `ec:p256` or `rsa:3072`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct KeySpec(pub KeyKind);

/// The forms of [`KeySpec`], for error messages and help.
pub const KEY_SPEC_FORMS: &str = "ec:p256, ec:p384, ec:p521, rsa:2048, rsa:3072, rsa:4096, ed25519";

impl FromStr for KeySpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let kind = match s {
            "ec:p256" | "ec:prime256v1" | "ec:secp256r1" => KeyKind::Ec(Curve::P256),
            "ec:p384" | "ec:secp384r1" => KeyKind::Ec(Curve::P384),
            "ec:p521" | "ec:secp521r1" => KeyKind::Ec(Curve::P521),
            "rsa:2048" => KeyKind::Rsa(2048),
            "rsa:3072" => KeyKind::Rsa(3072),
            "rsa:4096" => KeyKind::Rsa(4096),
            "ed25519" | "ec:ed25519" => KeyKind::Ed25519,
            _ => {
                return Err(Error::KeyGeneration {
                    reason: format!("unknown key type `{s}`; use one of {KEY_SPEC_FORMS}"),
                })
            }
        };
        Ok(Self(kind))
    }
}

impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether a new private key may ever leave the token, wrapped.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum BackupPolicy {
    /// `CKA_EXTRACTABLE=false`: the key can never leave the token (the default).
    #[default]
    None,
    /// `CKA_EXTRACTABLE=true` with `CKA_WRAP_WITH_TRUSTED=true`: the key can leave only
    /// wrapped under a key the security officer marked trusted.
    WrapWithTrusted,
}

impl FromStr for BackupPolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "wrap-with-trusted" => Ok(Self::WrapWithTrusted),
            _ => Err(Error::KeyGeneration {
                reason: format!("unknown backup policy `{s}`; use none or wrap-with-trusted"),
            }),
        }
    }
}

/// Generates a key pair on the token behind `session` (which must be logged in, read-write).
///
/// Both halves get `label` and the same `CKA_ID` (`id`, or 16 random bytes from the token). A
/// label or id already used by a private key is refused.
pub fn generate_key_pair(
    session: &Session,
    token_label: &str,
    label: &str,
    spec: KeySpec,
    id: Option<Vec<u8>>,
    policy: BackupPolicy,
) -> Result<KeyObject, Error> {
    generate(session, token_label, label, spec, id, policy, true)
}

/// Generates a throwaway key pair as session objects (`CKA_TOKEN=false`).
///
/// The pair is checked like [`generate_key_pair`]'s and disappears when the session closes;
/// destroy it earlier with [`super::destroy_key`]. Tokens without session objects (tpm2-pkcs11)
/// fail in `C_GenerateKeyPair`; callers may fall back to [`generate_key_pair`] and destroy the
/// pair afterwards.
pub fn generate_session_key_pair(
    session: &Session,
    token_label: &str,
    label: &str,
    spec: KeySpec,
) -> Result<KeyObject, Error> {
    generate(
        session,
        token_label,
        label,
        spec,
        None,
        BackupPolicy::None,
        false,
    )
}

/// Imports a PEM private key (PKCS#8, SEC1 or PKCS#1) as a sensitive, non-extractable key with
/// its public half, both under `label` and the same `CKA_ID`.
///
/// `pem` may hold other blocks too (certificates, `EC PARAMETERS`) and start with a UTF-8 byte
/// order mark; it must hold exactly one unencrypted private key. The key material passes
/// through this process in zeroized buffers; the token marks the key `CKA_LOCAL=false`, which
/// listings show as "imported".
///
/// # Errors
///
/// [`Error::KeyImport`] when the text holds no usable key (saying what it holds and what is
/// accepted), the key is encrypted, RSA below 2048 bits or on an unsupported curve, or the token
/// did not keep it sensitive; [`Error::KeyExists`] for a label or id in use.
pub fn import_private_key(
    session: &Session,
    token_label: &str,
    label: &str,
    id: Option<Vec<u8>>,
    pem: &str,
) -> Result<KeyObject, Error> {
    let material = KeyMaterial::from_pem(pem).map_err(|reason| Error::KeyImport { reason })?;
    let id = new_identity(session, token_label, label, id).map_err(as_import_error)?;
    let mut public = public_template(label, &id, true);
    let mut private = private_template(label, &id, BackupPolicy::None, true);
    material
        .fill(&mut public, &mut private)
        .map_err(as_import_error)?;

    let created = session
        .create_object(&private)
        .map_err(Error::pkcs11("create private key object"));
    wipe(&mut private);
    let private_handle = created?;
    let public_handle = match session.create_object(&public) {
        Ok(h) => h,
        Err(e) => {
            destroy_pair(session, private_handle, None);
            return Err(Error::pkcs11("create public key object")(e));
        }
    };
    read_back(session, private_handle, public_handle, |key| {
        if !key.sensitive || key.extractable {
            return Err(Error::KeyImport {
                reason: "the token did not keep the imported key sensitive and non-extractable"
                    .into(),
            });
        }
        Ok(())
    })
}

/// Refuses backup policy wrap-with-trusted on a token that lets the user mark a key trusted:
/// there the policy would let any holder of the user PIN wrap the key under a trusted key they
/// can read. Tried with a throwaway session key, destroyed at once.
fn refuse_user_trust(session: &Session, token_label: &str) -> Result<(), Error> {
    let trial = trial_aes_key(
        session,
        16,
        &[Attribute::Wrap(true), Attribute::Trusted(true)],
    );
    let Ok(trusted) = trial else {
        return Ok(());
    };
    destroy_trial(session, trusted);
    Err(Error::TokenRefused(format!(
        "token `{token_label}` lets the user mark a key trusted (C_GenerateKey accepted \
         CKA_TRUSTED=true in a user session), so backup policy wrap-with-trusted would let any \
         holder of the user PIN wrap the key under a trusted key of their own and read it; use \
         --backup-policy none on this token (kryoptic 1.5.4 behaves so)"
    )))
}

fn generate(
    session: &Session,
    token_label: &str,
    label: &str,
    spec: KeySpec,
    id: Option<Vec<u8>>,
    policy: BackupPolicy,
    on_token: bool,
) -> Result<KeyObject, Error> {
    let id = new_identity(session, token_label, label, id)?;
    if policy == BackupPolicy::WrapWithTrusted {
        refuse_user_trust(session, token_label)?;
        refuse_unwrappable_kind(session, token_label, spec.0)?;
    }
    let (mechanism, public_params) = pair_mechanism(spec.0)?;
    let mut public = public_template(label, &id, on_token);
    public.extend(public_params);
    let private = private_template(label, &id, policy, on_token);
    let (public_handle, private_handle) = generate_pair(session, &mechanism, &public, &private)?;

    read_back(session, private_handle, public_handle, |key| {
        check_generated(key, policy)
    })
}

/// Refuses backup policy wrap-with-trusted for a key type the token cannot wrap at all (SoftHSM
/// 2.6 and EdDSA): there the policy would make the key extractable for nothing.
///
/// Tried with throwaway session objects: a pair of the same type (RSA at 2048 bits) that is
/// extractable without `CKA_WRAP_WITH_TRUSTED`, wrapped under an AES key with
/// `CKM_AES_KEY_WRAP_PAD`. Only `CKR_KEY_NOT_WRAPPABLE` refuses; a token that cannot run the
/// trial (no session objects, no AES key wrap) is left to `backup create` to judge.
fn refuse_unwrappable_kind(
    session: &Session,
    token_label: &str,
    kind: KeyKind,
) -> Result<(), Error> {
    let trial_kind = match kind {
        KeyKind::Rsa(_) => KeyKind::Rsa(2048),
        other => other,
    };
    let (mechanism, public_params) = pair_mechanism(trial_kind)?;
    let mut public = vec![Attribute::Token(false), Attribute::Verify(true)];
    public.extend(public_params);
    let private = [
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Sign(true),
    ];
    let Ok((trial_public, trial_private)) =
        session.generate_key_pair(&mechanism, &public, &private)
    else {
        return Ok(());
    };
    let wrapping = trial_aes_key(session, 32, &[Attribute::Wrap(true)]);
    let refused = match wrapping {
        Ok(wrapping) => {
            let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, trial_private);
            destroy_trial(session, wrapping);
            matches!(&wrapped, Err(e) if super::rv_of(e) == Some(RvError::KeyNotWrappable))
        }
        Err(_) => false,
    };
    destroy_trial(session, trial_private);
    destroy_trial(session, trial_public);
    if refused {
        return Err(Error::TokenRefused(format!(
            "token `{token_label}` cannot wrap {kind} keys (C_WrapKey of a throwaway extractable \
             {trial_kind} key answered CKR_KEY_NOT_WRAPPABLE), so backup policy \
             wrap-with-trusted would make the key extractable without any backup; use \
             --backup-policy none, or another key type (SoftHSM 2.6 cannot wrap EdDSA keys)"
        )));
    }
    Ok(())
}

/// Generates a throwaway AES session key of `len` bytes with the `usage` attributes, for trying
/// what a token allows; destroy it with [`destroy_trial`].
pub(crate) fn trial_aes_key(
    session: &Session,
    len: u64,
    usage: &[Attribute],
) -> cryptoki::error::Result<ObjectHandle> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::ValueLen(len.into()),
    ];
    template.extend_from_slice(usage);
    session.generate_key(&Mechanism::AesKeyGen, &template)
}

/// Destroys a throwaway session object; one that stays goes with its session.
fn destroy_trial(session: &Session, handle: ObjectHandle) {
    if let Err(e) = session.destroy_object(handle) {
        tracing::debug!(error = %e, "the trial object goes with its session instead");
    }
}

/// The key-pair generation mechanism for `kind` and the public template's parameters.
fn pair_mechanism(kind: KeyKind) -> Result<(Mechanism<'static>, Vec<Attribute>), Error> {
    Ok(match kind {
        KeyKind::Ec(curve) => (
            Mechanism::EccKeyPairGen,
            vec![Attribute::EcParams(oid_der(curve.oid())?)],
        ),
        KeyKind::Ed25519 => (
            Mechanism::EccEdwardsKeyPairGen,
            vec![Attribute::EcParams(oid_der(
                const_oid::db::rfc8410::ID_ED_25519,
            )?)],
        ),
        KeyKind::Rsa(bits) => (
            Mechanism::RsaPkcsKeyPairGen,
            vec![
                Attribute::ModulusBits((bits as u64).into()),
                Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            ],
        ),
    })
}

/// Reads a new pair back and checks it; a pair that fails is destroyed, both halves.
fn read_back(
    session: &Session,
    private: ObjectHandle,
    public: ObjectHandle,
    check: impl FnOnce(&KeyObject) -> Result<(), Error>,
) -> Result<KeyObject, Error> {
    let checked = read_key(session, private).and_then(|key| {
        check(&key)?;
        Ok(key)
    });
    if checked.is_err() {
        destroy_pair(session, private, Some(public));
    }
    checked
}

/// Checks that no private key has `label` (or `id`), and draws a random 16-byte id from the
/// token when none is given.
fn new_identity(
    session: &Session,
    token_label: &str,
    label: &str,
    id: Option<Vec<u8>>,
) -> Result<Vec<u8>, Error> {
    refuse_duplicates(session, token_label, label, id.as_deref())?;
    match id {
        Some(id) => Ok(id),
        None => session
            .generate_random_vec(16)
            .map_err(Error::pkcs11("draw a random CKA_ID")),
    }
}

/// `C_GenerateKeyPair`, retried once without the public key's usage flags when the token
/// refuses them with `CKR_GENERAL_ERROR`.
///
/// tpm2-pkcs11 (1.9) derives `CKA_VERIFY` and `CKA_ENCRYPT` for the public half from the TPM key
/// it makes and fails when the template says otherwise; for a sign-only key it derives them
/// swapped, so no explicit public template is accepted. The public half's usage flags protect
/// nothing (the private half is what `check_generated` reads back), so the pair is made with the
/// token's own values instead.
fn generate_pair(
    session: &Session,
    mechanism: &Mechanism<'_>,
    public: &[Attribute],
    private: &[Attribute],
) -> Result<(ObjectHandle, ObjectHandle), Error> {
    let first = session.generate_key_pair(mechanism, public, private);
    let refused = matches!(&first, Err(e) if super::rv_of(e) == Some(RvError::GeneralError));
    if !refused {
        return first.map_err(Error::pkcs11("generate key pair (C_GenerateKeyPair)"));
    }
    let without_usage: Vec<Attribute> = public
        .iter()
        .filter(|a| !is_public_usage(a))
        .cloned()
        .collect();
    session
        .generate_key_pair(mechanism, &without_usage, private)
        .map_err(Error::pkcs11("generate key pair (C_GenerateKeyPair)"))
}

fn is_public_usage(attribute: &Attribute) -> bool {
    matches!(
        attribute,
        Attribute::Verify(_) | Attribute::Encrypt(_) | Attribute::Wrap(_) | Attribute::Derive(_)
    )
}

fn refuse_duplicates(
    session: &Session,
    token_label: &str,
    label: &str,
    id: Option<&[u8]>,
) -> Result<(), Error> {
    check_label("the label", label).map_err(|reason| Error::KeyGeneration { reason })?;
    let exists = |selector: KeySelector, what: String| -> Result<(), Error> {
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                match selector.id {
                    Some(id) => Attribute::Id(id),
                    None => Attribute::Label(
                        selector
                            .label
                            .unwrap_or_default()
                            .into_bytes(),
                    ),
                },
            ])
            .map_err(Error::pkcs11("look for existing keys"))?;
        if found.is_empty() {
            Ok(())
        } else {
            Err(Error::KeyExists {
                what,
                token: token_label.to_owned(),
            })
        }
    };
    exists(KeySelector::label(label), format!("label `{label}`"))?;
    if let Some(id) = id {
        exists(KeySelector::id(id), format!("id {}", hex::encode(id)))?;
    }
    Ok(())
}

fn public_template(label: &str, id: &[u8], on_token: bool) -> Vec<Attribute> {
    vec![
        Attribute::Token(on_token),
        Attribute::Private(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
    ]
}

/// The attributes of a signing key's private half: private, sensitive, sign only; extractable
/// only under `wrap-with-trusted`.
pub(crate) fn private_template(
    label: &str,
    id: &[u8],
    policy: BackupPolicy,
    on_token: bool,
) -> Vec<Attribute> {
    let extractable = policy == BackupPolicy::WrapWithTrusted;
    let mut template = vec![
        Attribute::Token(on_token),
        Attribute::Private(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
        Attribute::Sensitive(true),
        Attribute::Extractable(extractable),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ];
    if extractable {
        template.push(Attribute::WrapWithTrusted(true));
    }
    template
}

fn check_generated(key: &KeyObject, policy: BackupPolicy) -> Result<(), Error> {
    let want_extractable = policy == BackupPolicy::WrapWithTrusted;
    let checks = [
        ("CKA_SENSITIVE", key.sensitive, true),
        ("CKA_ALWAYS_SENSITIVE", key.always_sensitive, true),
        ("CKA_EXTRACTABLE", key.extractable, want_extractable),
        (
            "CKA_NEVER_EXTRACTABLE",
            key.never_extractable,
            !want_extractable,
        ),
        ("CKA_SIGN", key.sign, true),
        ("CKA_LOCAL", key.local, true),
        (
            "CKA_WRAP_WITH_TRUSTED",
            key.wrap_with_trusted || !want_extractable,
            true,
        ),
    ];
    for (name, have, want) in checks {
        if have != want {
            return Err(Error::KeyGeneration {
                reason: format!(
                    "the token did not honour {name}={want} on the new private key (it reads \
                     {have}); both halves were destroyed"
                ),
            });
        }
    }
    Ok(())
}

fn destroy_pair(session: &Session, private: ObjectHandle, public: Option<ObjectHandle>) {
    for handle in std::iter::once(private).chain(public) {
        if let Err(e) = session.destroy_object(handle) {
            tracing::warn!(%handle, error = %e, "could not destroy a rejected key object");
        }
    }
}

fn oid_der(oid: const_oid::ObjectIdentifier) -> Result<Vec<u8>, Error> {
    oid.to_der()
        .map_err(|e| Error::KeyGeneration {
            reason: format!("encoding the curve OID: {e}"),
        })
}

/// Zeroizes secret values in a template once the token has them.
fn wipe(template: &mut [Attribute]) {
    for attr in template {
        match attr {
            Attribute::Value(v)
            | Attribute::PrivateExponent(v)
            | Attribute::Prime1(v)
            | Attribute::Prime2(v)
            | Attribute::Exponent1(v)
            | Attribute::Exponent2(v)
            | Attribute::Coefficient(v) => v.zeroize(),
            _ => {}
        }
    }
}

/// An import failure for a check shared with key generation.
fn as_import_error(e: Error) -> Error {
    match e {
        Error::KeyGeneration { reason } => Error::KeyImport { reason },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_key_specs() {
        assert_eq!(
            "ec:p384".parse::<KeySpec>().unwrap().0,
            KeyKind::Ec(Curve::P384)
        );
        assert_eq!("rsa:3072".parse::<KeySpec>().unwrap().0, KeyKind::Rsa(3072));
        let err = "rsa:1024"
            .parse::<KeySpec>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("rsa:2048"), "{err}");
    }
}
