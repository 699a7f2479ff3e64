//! Generating key pairs on a token and importing existing private keys.
//!
//! Every attribute that matters is set explicitly (tokens' defaults differ), and after
//! generation the ones that protect the key are read back: a token that did not honour them
//! gets its new objects destroyed and the caller an error naming the attribute.

use std::fmt;
use std::str::FromStr;

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use der::Encode;
use pkcs8::{DecodePrivateKey, PrivateKeyInfo};
use zeroize::{Zeroize, Zeroizing};

use super::keys::{read_key, Curve, KeyKind, KeyObject, KeySelector};
use super::Error;

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
/// The key material passes through this process in zeroized buffers; the token marks the key
/// `CKA_LOCAL=false`, which listings show as "imported".
pub fn import_private_key(
    session: &Session,
    token_label: &str,
    label: &str,
    id: Option<Vec<u8>>,
    pem: &str,
) -> Result<KeyObject, Error> {
    let id = new_identity(session, token_label, label, id)?;
    let material = KeyMaterial::from_pem(pem)?;
    let mut public = public_template(label, &id, true);
    let mut private = private_template(label, &id, BackupPolicy::None, true);
    material.fill(&mut public, &mut private)?;

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
    let checked = read_key(session, private_handle).and_then(|key| {
        if !key.sensitive || key.extractable {
            return Err(Error::KeyGeneration {
                reason: "the token did not keep the imported key sensitive and non-extractable"
                    .into(),
            });
        }
        Ok(key)
    });
    if checked.is_err() {
        destroy_pair(session, private_handle, Some(public_handle));
    }
    checked
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
    let (mechanism, public_params) = match spec.0 {
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
    };
    let mut public = public_template(label, &id, on_token);
    public.extend(public_params);
    let private = private_template(label, &id, policy, on_token);
    let (public_handle, private_handle) = generate_pair(session, &mechanism, &public, &private)?;

    let checked = read_key(session, private_handle).and_then(|key| {
        check_generated(&key, policy)?;
        Ok(key)
    });
    if checked.is_err() {
        destroy_pair(session, private_handle, Some(public_handle));
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
    if label.is_empty() {
        return Err(Error::KeyGeneration {
            reason: "a key needs a non-empty label".into(),
        });
    }
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

fn private_template(
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

/// A decoded private key, secret parts in zeroizing buffers.
enum KeyMaterial {
    Ec {
        curve: Curve,
        scalar: Zeroizing<Vec<u8>>,
        point: Vec<u8>,
    },
    Ed25519 {
        seed: Zeroizing<Vec<u8>>,
        point: Vec<u8>,
    },
    Rsa(Box<rsa::RsaPrivateKey>),
}

impl KeyMaterial {
    fn from_pem(pem: &str) -> Result<Self, Error> {
        let bad = |reason: String| Error::KeyGeneration {
            reason: format!("cannot import the key: {reason}"),
        };
        let (tag, der) = pem_rfc7468_decode(pem).map_err(bad)?;
        match tag.as_str() {
            "PRIVATE KEY" => Self::from_pkcs8(&der).map_err(bad),
            "EC PRIVATE KEY" => {
                let key = sec1::EcPrivateKey::try_from(der.as_slice())
                    .map_err(|e| bad(format!("invalid SEC1 key: {e}")))?;
                let curve = match key
                    .parameters
                    .and_then(|p| p.named_curve())
                {
                    Some(oid) => [Curve::P256, Curve::P384, Curve::P521]
                        .into_iter()
                        .find(|c| c.oid() == oid)
                        .ok_or_else(|| bad(format!("unsupported curve {oid}")))?,
                    // RFC 5915 wants the curve named, but RustCrypto's encoder leaves it out;
                    // the scalar's length differs for every supported curve.
                    None => [Curve::P256, Curve::P384, Curve::P521]
                        .into_iter()
                        .find(|c| c.field_len() == key.private_key.len())
                        .ok_or_else(|| {
                            bad("the SEC1 key names no curve, and its length fits none".into())
                        })?,
                };
                ec_material(curve, key.private_key).map_err(bad)
            }
            "RSA PRIVATE KEY" => {
                use pkcs1::DecodeRsaPrivateKey;
                let key = rsa::RsaPrivateKey::from_pkcs1_der(&der)
                    .map_err(|e| bad(format!("invalid PKCS#1 key: {e}")))?;
                Ok(Self::Rsa(Box::new(key)))
            }
            other => Err(bad(format!(
                "PEM label `{other}` is not a private key; expected PRIVATE KEY (PKCS#8), EC \
                 PRIVATE KEY (SEC1) or RSA PRIVATE KEY (PKCS#1); encrypted keys must be \
                 decrypted first"
            ))),
        }
    }

    fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let info = PrivateKeyInfo::try_from(der).map_err(|e| format!("invalid PKCS#8: {e}"))?;
        let alg = info.algorithm.oid;
        if alg == const_oid::db::rfc5912::RSA_ENCRYPTION {
            let key = rsa::RsaPrivateKey::from_pkcs8_der(der).map_err(|e| e.to_string())?;
            return Ok(Self::Rsa(Box::new(key)));
        }
        if alg == const_oid::db::rfc8410::ID_ED_25519 {
            let key = ed25519_dalek::SigningKey::from_pkcs8_der(der).map_err(|e| e.to_string())?;
            return Ok(Self::Ed25519 {
                seed: Zeroizing::new(key.to_bytes().to_vec()),
                point: key.verifying_key().to_bytes().to_vec(),
            });
        }
        if alg == const_oid::db::rfc5912::ID_EC_PUBLIC_KEY {
            let oid = info
                .algorithm
                .parameters_oid()
                .map_err(|e| format!("EC key without a named curve: {e}"))?;
            let curve = [Curve::P256, Curve::P384, Curve::P521]
                .into_iter()
                .find(|c| c.oid() == oid)
                .ok_or_else(|| format!("unsupported curve {oid}"))?;
            let key = sec1::EcPrivateKey::try_from(info.private_key)
                .map_err(|e| format!("invalid EC key: {e}"))?;
            return ec_material(curve, key.private_key);
        }
        Err(format!("unsupported key algorithm {alg}"))
    }

    fn fill(&self, public: &mut Vec<Attribute>, private: &mut Vec<Attribute>) -> Result<(), Error> {
        use rsa::traits::{PrivateKeyParts, PublicKeyParts};

        match self {
            Self::Ec {
                curve,
                scalar,
                point,
            } => {
                let params = oid_der(curve.oid())?;
                let point = der_octet_string(point)?;
                public.extend([
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::EcParams(params.clone()),
                    Attribute::EcPoint(point),
                ]);
                private.extend([
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::EcParams(params),
                    Attribute::Value(scalar.to_vec()),
                ]);
            }
            Self::Ed25519 { seed, point } => {
                let params = oid_der(const_oid::db::rfc8410::ID_ED_25519)?;
                public.extend([
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::KeyType(KeyType::EC_EDWARDS),
                    Attribute::EcParams(params.clone()),
                    Attribute::EcPoint(der_octet_string(point)?),
                ]);
                private.extend([
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(KeyType::EC_EDWARDS),
                    Attribute::EcParams(params),
                    Attribute::Value(seed.to_vec()),
                ]);
            }
            Self::Rsa(key) => {
                let primes = key.primes();
                if primes.len() != 2 {
                    return Err(Error::KeyGeneration {
                        reason: "multi-prime RSA keys cannot be imported".into(),
                    });
                }
                let (Some(dp), Some(dq), Some(qinv)) = (key.dp(), key.dq(), key.crt_coefficient())
                else {
                    return Err(Error::KeyGeneration {
                        reason: "the RSA key lacks its CRT values".into(),
                    });
                };
                let n = key.n().to_bytes_be();
                let e = key.e().to_bytes_be();
                public.extend([
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::KeyType(KeyType::RSA),
                    Attribute::Modulus(n.clone()),
                    Attribute::PublicExponent(e.clone()),
                ]);
                private.extend([
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(KeyType::RSA),
                    Attribute::Modulus(n),
                    Attribute::PublicExponent(e),
                    Attribute::PrivateExponent(key.d().to_bytes_be()),
                    Attribute::Prime1(primes[0].to_bytes_be()),
                    Attribute::Prime2(primes[1].to_bytes_be()),
                    Attribute::Exponent1(dp.to_bytes_be()),
                    Attribute::Exponent2(dq.to_bytes_be()),
                    Attribute::Coefficient(qinv.to_bytes_be()),
                ]);
            }
        }
        Ok(())
    }
}

fn ec_material(curve: Curve, scalar: &[u8]) -> Result<KeyMaterial, String> {
    let invalid = |_| "the EC private key is not valid for its curve".to_string();
    let point = match curve {
        Curve::P256 => p256::SecretKey::from_slice(scalar)
            .map_err(invalid)?
            .public_key()
            .to_sec1_bytes(),
        Curve::P384 => p384::SecretKey::from_slice(scalar)
            .map_err(invalid)?
            .public_key()
            .to_sec1_bytes(),
        Curve::P521 => p521::SecretKey::from_slice(scalar)
            .map_err(invalid)?
            .public_key()
            .to_sec1_bytes(),
    };
    Ok(KeyMaterial::Ec {
        curve,
        scalar: Zeroizing::new(scalar.to_vec()),
        point: point.to_vec(),
    })
}

fn der_octet_string(bytes: &[u8]) -> Result<Vec<u8>, Error> {
    der::asn1::OctetStringRef::new(bytes)
        .and_then(|o| o.to_der())
        .map_err(|e| Error::KeyGeneration {
            reason: format!("encoding the EC point: {e}"),
        })
}

/// Decodes one PEM block, keeping the DER in a zeroizing buffer.
fn pem_rfc7468_decode(pem: &str) -> Result<(String, Zeroizing<Vec<u8>>), String> {
    let (label, der) =
        der::pem::decode_vec(pem.trim().as_bytes()).map_err(|e| format!("not PEM: {e}"))?;
    Ok((label.to_owned(), Zeroizing::new(der)))
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

    #[test]
    fn sec1_without_a_curve_is_read_by_length() {
        // p256's own SEC1 encoder omits the curve parameters.
        let key = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let pem = key
            .to_sec1_pem(der::pem::LineEnding::LF)
            .unwrap();
        assert!(matches!(
            KeyMaterial::from_pem(&pem).unwrap(),
            KeyMaterial::Ec {
                curve: Curve::P256,
                ..
            }
        ));
    }

    #[test]
    fn refuses_non_key_pem() {
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(KeyMaterial::from_pem(pem).is_err());
    }
}
