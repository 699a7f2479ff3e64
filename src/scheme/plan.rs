//! Which TLS signature schemes a key on a token can serve, and by which mechanism.
//!
//! The plan is computed once from the token's mechanism list when a key is loaded (and again
//! after a module reload). Signing follows the plan: a digest goes only to a mechanism that
//! expects one (`CKM_ECDSA`, `CKM_RSA_PKCS_PSS`, `CKM_RSA_PKCS` over a DigestInfo), the message
//! only to one that hashes (`CKM_ECDSA_SHA*`, `CKM_SHA*_RSA_PKCS[_PSS]`, `CKM_EDDSA`).

use std::fmt;

use cryptoki::mechanism::MechanismType;
use rustls::SignatureScheme;

use crate::pkcs11::{Curve, KeyKind, MechanismList};

/// The smallest RSA modulus TLS peers built on webpki accept, and so the least rustls-hsm
/// plans schemes for.
pub const MIN_RSA_BITS: usize = 2048;

/// A hash function used by a scheme.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum HashAlg {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// Digest length in bytes (also the PSS salt length used).
    pub fn output_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }

    /// The PKCS#11 digest mechanism, as named in PSS parameters.
    pub fn mechanism(self) -> MechanismType {
        match self {
            Self::Sha256 => MechanismType::SHA256,
            Self::Sha384 => MechanismType::SHA384,
            Self::Sha512 => MechanismType::SHA512,
        }
    }
}

/// How one signature is made on the token.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Method {
    /// Hash on the host, then `CKM_ECDSA` over the digest.
    EcdsaDigest(HashAlg),
    /// `CKM_ECDSA_SHA*` over the message.
    EcdsaHashing(HashAlg),
    /// `CKM_EDDSA` (pure Ed25519) over the message.
    Ed25519,
    /// Hash on the host, then `CKM_RSA_PKCS` over the DER DigestInfo.
    RsaPkcs1DigestInfo(HashAlg),
    /// `CKM_SHA*_RSA_PKCS` over the message.
    RsaPkcs1Hashing(HashAlg),
    /// Hash on the host, then `CKM_RSA_PKCS_PSS` (salt = hash length, MGF1 with the same hash).
    RsaPssDigest(HashAlg),
    /// `CKM_SHA*_RSA_PKCS_PSS` over the message (salt = hash length, MGF1 with the same hash).
    RsaPssHashing(HashAlg),
}

impl Method {
    /// The PKCS#11 mechanism this method calls.
    pub fn mechanism(self) -> MechanismType {
        match self {
            Self::EcdsaDigest(_) => MechanismType::ECDSA,
            Self::EcdsaHashing(HashAlg::Sha256) => MechanismType::ECDSA_SHA256,
            Self::EcdsaHashing(HashAlg::Sha384) => MechanismType::ECDSA_SHA384,
            Self::EcdsaHashing(HashAlg::Sha512) => MechanismType::ECDSA_SHA512,
            Self::Ed25519 => MechanismType::EDDSA,
            Self::RsaPkcs1DigestInfo(_) => MechanismType::RSA_PKCS,
            Self::RsaPkcs1Hashing(HashAlg::Sha256) => MechanismType::SHA256_RSA_PKCS,
            Self::RsaPkcs1Hashing(HashAlg::Sha384) => MechanismType::SHA384_RSA_PKCS,
            Self::RsaPkcs1Hashing(HashAlg::Sha512) => MechanismType::SHA512_RSA_PKCS,
            Self::RsaPssDigest(_) => MechanismType::RSA_PKCS_PSS,
            Self::RsaPssHashing(HashAlg::Sha256) => MechanismType::SHA256_RSA_PKCS_PSS,
            Self::RsaPssHashing(HashAlg::Sha384) => MechanismType::SHA384_RSA_PKCS_PSS,
            Self::RsaPssHashing(HashAlg::Sha512) => MechanismType::SHA512_RSA_PKCS_PSS,
        }
    }

    /// The hash the host computes first, if any.
    pub fn prehash(self) -> Option<HashAlg> {
        match self {
            Self::EcdsaDigest(h) | Self::RsaPkcs1DigestInfo(h) | Self::RsaPssDigest(h) => Some(h),
            _ => None,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mechanism = self.mechanism();
        match self {
            Self::EcdsaDigest(h) | Self::RsaPssDigest(h) => {
                write!(f, "{mechanism} over a host {h:?} digest")
            }
            Self::RsaPkcs1DigestInfo(h) => write!(f, "{mechanism} over a {h:?} DigestInfo"),
            _ => write!(f, "{mechanism}"),
        }
    }
}

/// One TLS scheme and how (or why not) this token serves it for this key.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct SchemeEntry {
    /// The TLS signature scheme.
    pub scheme: SignatureScheme,
    /// How it is signed, or why it cannot be.
    pub plan: Result<Method, String>,
}

/// The schemes a key can be used for, in order of preference, each with its method.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct SchemePlan {
    entries: Vec<SchemeEntry>,
}

impl SchemePlan {
    /// Plans every scheme that fits the key's type against the token's mechanisms.
    ///
    /// Preference: for RSA, PSS before PKCS#1 v1.5 and stronger hashes first (as rustls orders
    /// its own RSA schemes); for each scheme, a mechanism that hashes on the token before host
    /// hashing plus a raw mechanism.
    pub fn for_key(kind: KeyKind, mechanisms: &MechanismList) -> Self {
        let bits = match kind {
            KeyKind::Ec(Curve::P256) => 256,
            KeyKind::Ec(Curve::P384) => 384,
            KeyKind::Ec(Curve::P521) => 521,
            KeyKind::Ed25519 => 256,
            KeyKind::Rsa(bits) => bits,
        };
        let entries = candidates(kind)
            .into_iter()
            .map(|(scheme, methods)| SchemeEntry {
                scheme,
                plan: match kind {
                    KeyKind::Rsa(bits) if bits < MIN_RSA_BITS => Err(format!(
                        "RSA-{bits} is below {MIN_RSA_BITS} bits, the least that rustls and \
                         webpki peers accept"
                    )),
                    _ => pick(&methods, mechanisms, bits),
                },
            })
            .collect();
        Self { entries }
    }

    /// Every scheme considered for this key, usable or not.
    pub fn entries(&self) -> &[SchemeEntry] {
        &self.entries
    }

    /// The usable schemes, in order of preference.
    pub fn usable(&self) -> impl Iterator<Item = (SignatureScheme, Method)> + '_ {
        self.entries.iter().filter_map(|e| {
            e.plan
                .as_ref()
                .ok()
                .map(|m| (e.scheme, *m))
        })
    }

    /// The method for `scheme`, if usable.
    pub fn method(&self, scheme: SignatureScheme) -> Option<Method> {
        self.usable()
            .find(|(s, _)| *s == scheme)
            .map(|(_, m)| m)
    }

    /// The first scheme in our order of preference that the peer offered and we can serve.
    pub fn choose(&self, offered: &[SignatureScheme]) -> Option<(SignatureScheme, Method)> {
        self.usable()
            .find(|(s, _)| offered.contains(s))
    }

    /// True when at least one scheme usable in TLS 1.3 is served (TLS 1.3 forbids PKCS#1 v1.5
    /// signatures in the handshake).
    pub fn serves_tls13(&self) -> bool {
        self.usable().any(|(s, _)| !is_pkcs1(s))
    }

    /// Why TLS 1.3 cannot be served: the TLS 1.3 schemes and why each is missing.
    pub fn tls13_gap(&self) -> String {
        let reasons: Vec<String> = self
            .entries
            .iter()
            .filter(|e| !is_pkcs1(e.scheme))
            .filter_map(|e| {
                e.plan
                    .as_ref()
                    .err()
                    .map(|why| format!("{:?}: {why}", e.scheme))
            })
            .collect();
        reasons.join("; ")
    }
}

/// True for the RSA PKCS#1 v1.5 schemes, which TLS 1.3 allows only in certificates.
pub fn is_pkcs1(scheme: SignatureScheme) -> bool {
    matches!(
        scheme,
        SignatureScheme::RSA_PKCS1_SHA256
            | SignatureScheme::RSA_PKCS1_SHA384
            | SignatureScheme::RSA_PKCS1_SHA512
    )
}

/// Every TLS signature scheme rustls-hsm can plan, with the key kind it needs, for reports.
pub fn all_schemes() -> Vec<(SignatureScheme, &'static str)> {
    vec![
        (SignatureScheme::ECDSA_NISTP256_SHA256, "ec:p256"),
        (SignatureScheme::ECDSA_NISTP384_SHA384, "ec:p384"),
        (SignatureScheme::ECDSA_NISTP521_SHA512, "ec:p521"),
        (SignatureScheme::RSA_PSS_SHA256, "rsa"),
        (SignatureScheme::RSA_PSS_SHA384, "rsa"),
        (SignatureScheme::RSA_PSS_SHA512, "rsa"),
        (SignatureScheme::RSA_PKCS1_SHA256, "rsa"),
        (SignatureScheme::RSA_PKCS1_SHA384, "rsa"),
        (SignatureScheme::RSA_PKCS1_SHA512, "rsa"),
        (SignatureScheme::ED25519, "ed25519"),
    ]
}

/// The name rustls and the TLS registry use, e.g. `ecdsa_secp256r1_sha256`.
pub fn scheme_name(scheme: SignatureScheme) -> String {
    match scheme {
        SignatureScheme::ECDSA_NISTP256_SHA256 => "ecdsa_secp256r1_sha256".into(),
        SignatureScheme::ECDSA_NISTP384_SHA384 => "ecdsa_secp384r1_sha384".into(),
        SignatureScheme::ECDSA_NISTP521_SHA512 => "ecdsa_secp521r1_sha512".into(),
        SignatureScheme::RSA_PSS_SHA256 => "rsa_pss_rsae_sha256".into(),
        SignatureScheme::RSA_PSS_SHA384 => "rsa_pss_rsae_sha384".into(),
        SignatureScheme::RSA_PSS_SHA512 => "rsa_pss_rsae_sha512".into(),
        SignatureScheme::RSA_PKCS1_SHA256 => "rsa_pkcs1_sha256".into(),
        SignatureScheme::RSA_PKCS1_SHA384 => "rsa_pkcs1_sha384".into(),
        SignatureScheme::RSA_PKCS1_SHA512 => "rsa_pkcs1_sha512".into(),
        SignatureScheme::ED25519 => "ed25519".into(),
        other => format!("{other:?}"),
    }
}

fn candidates(kind: KeyKind) -> Vec<(SignatureScheme, Vec<Method>)> {
    use HashAlg::{Sha256, Sha384, Sha512};

    let ecdsa = |scheme, h| {
        (
            scheme,
            vec![Method::EcdsaHashing(h), Method::EcdsaDigest(h)],
        )
    };
    match kind {
        KeyKind::Ec(Curve::P256) => vec![ecdsa(SignatureScheme::ECDSA_NISTP256_SHA256, Sha256)],
        KeyKind::Ec(Curve::P384) => vec![ecdsa(SignatureScheme::ECDSA_NISTP384_SHA384, Sha384)],
        KeyKind::Ec(Curve::P521) => vec![ecdsa(SignatureScheme::ECDSA_NISTP521_SHA512, Sha512)],
        KeyKind::Ed25519 => vec![(SignatureScheme::ED25519, vec![Method::Ed25519])],
        KeyKind::Rsa(_) => {
            let pss = |scheme, h| {
                (
                    scheme,
                    vec![Method::RsaPssHashing(h), Method::RsaPssDigest(h)],
                )
            };
            let pkcs1 = |scheme, h| {
                (
                    scheme,
                    vec![Method::RsaPkcs1Hashing(h), Method::RsaPkcs1DigestInfo(h)],
                )
            };
            vec![
                pss(SignatureScheme::RSA_PSS_SHA512, Sha512),
                pss(SignatureScheme::RSA_PSS_SHA384, Sha384),
                pss(SignatureScheme::RSA_PSS_SHA256, Sha256),
                pkcs1(SignatureScheme::RSA_PKCS1_SHA512, Sha512),
                pkcs1(SignatureScheme::RSA_PKCS1_SHA384, Sha384),
                pkcs1(SignatureScheme::RSA_PKCS1_SHA256, Sha256),
            ]
        }
    }
}

fn pick(methods: &[Method], mechanisms: &MechanismList, bits: usize) -> Result<Method, String> {
    if let Some(method) = methods
        .iter()
        .find(|m| mechanisms.can_sign(m.mechanism(), bits))
    {
        return Ok(*method);
    }
    let names: Vec<String> = methods
        .iter()
        .map(|m| {
            let mechanism = m.mechanism();
            match (
                mechanisms.get(mechanism),
                mechanisms.known_gap(mechanism, bits),
            ) {
                (None, _) => format!("no {mechanism}"),
                (Some(info), _) if !info.sign() => format!("{mechanism} cannot sign"),
                (Some(_), Some(why)) => format!("{mechanism} unusable: {why}"),
                (Some(info), None) => format!(
                    "{mechanism} takes {}..{} bit keys, not {bits}",
                    info.min_key_size(),
                    info.max_key_size()
                ),
            }
        })
        .collect();
    Err(names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    // An imported RSA-1024 key once loaded with six schemes, and every signature then failed
    // verification: peers (and our own check) refuse RSA below 2048 bits.
    #[test]
    fn rsa_below_2048_bits_serves_no_scheme() {
        let plan = SchemePlan::for_key(KeyKind::Rsa(1024), &MechanismList::default());
        assert!(plan.usable().next().is_none());
        assert!(
            plan.tls13_gap()
                .contains("RSA-1024 is below 2048 bits"),
            "{}",
            plan.tls13_gap()
        );
    }
}
