//! rcgen's view of a key on a token: its public key as rcgen writes it, and signatures made by
//! the token when rcgen asks for one.

use std::sync::Mutex;

use der::Decode;
use rcgen::{PublicKeyData, SignatureAlgorithm, SigningKey};
use rustls::SignatureScheme;

use super::Error;
use crate::pkcs11::{Curve, KeyKind};
use crate::HsmKey;

/// The TLS scheme whose signature encoding is the X.509 one for a key of this kind.
///
/// ECDSA signatures are DER in both TLS and X.509; Ed25519 and RSA PKCS#1 v1.5 are raw in both.
/// RSA uses PKCS#1 v1.5 with SHA-256 rather than PSS, the scheme every verifier accepts in
/// certificates (rcgen with *ring* also cannot write PSS parameters). `None` for P-521.
// LIMITATION: P-521 keys cannot sign certificates: rcgen's P-521 algorithms exist only with its
// aws-lc-rs backend. Adding them would take that backend (a second crypto stack) or an rcgen
// release that names P-521 with *ring*.
pub fn x509_scheme(kind: KeyKind) -> Option<SignatureScheme> {
    match kind {
        KeyKind::Ec(Curve::P256) => Some(SignatureScheme::ECDSA_NISTP256_SHA256),
        KeyKind::Ec(Curve::P384) => Some(SignatureScheme::ECDSA_NISTP384_SHA384),
        KeyKind::Ec(Curve::P521) => None,
        KeyKind::Ed25519 => Some(SignatureScheme::ED25519),
        KeyKind::Rsa(_) => Some(SignatureScheme::RSA_PKCS1_SHA256),
    }
}

/// rcgen's signature algorithm for a key of this kind, matching [`x509_scheme`].
pub fn rcgen_algorithm(kind: KeyKind) -> Option<&'static SignatureAlgorithm> {
    match kind {
        KeyKind::Ec(Curve::P256) => Some(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyKind::Ec(Curve::P384) => Some(&rcgen::PKCS_ECDSA_P384_SHA384),
        KeyKind::Ec(Curve::P521) => None,
        KeyKind::Ed25519 => Some(&rcgen::PKCS_ED25519),
        KeyKind::Rsa(_) => Some(&rcgen::PKCS_RSA_SHA256),
    }
}

/// A public key given as a DER SubjectPublicKeyInfo, for the subject of a certificate.
#[derive(Clone, Debug)]
pub struct SpkiPublicKey {
    spki: Vec<u8>,
    key_bits: Vec<u8>,
    algorithm: &'static SignatureAlgorithm,
}

impl SpkiPublicKey {
    /// Parses a DER SubjectPublicKeyInfo of a key type rcgen can certify.
    ///
    /// # Errors
    ///
    /// [`Error::Parse`] for malformed input, [`Error::KeyUnsupported`] for P-521 and unknown key
    /// types.
    pub fn from_der(spki: &[u8]) -> Result<Self, Error> {
        let bad = |reason: String| Error::Parse {
            what: "public key",
            reason,
        };
        let info = spki::SubjectPublicKeyInfoRef::from_der(spki).map_err(|e| bad(e.to_string()))?;
        let key_bits = info
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| bad("the public key bit string has unused bits".into()))?
            .to_vec();
        let kind = spki_kind(&info).ok_or_else(|| {
            bad("unsupported key type: expected ECDSA P-256/P-384, RSA or Ed25519".into())
        })?;
        let algorithm = rcgen_algorithm(kind).ok_or(Error::KeyUnsupported {
            key: "(certificate subject)".into(),
            kind,
            reason: "rcgen with ring cannot sign or certify P-521 keys",
        })?;
        Ok(Self {
            spki: spki.to_vec(),
            key_bits,
            algorithm,
        })
    }
}

impl PublicKeyData for SpkiPublicKey {
    // The token's own encoding, byte for byte, rather than rcgen's re-encoding of it.
    fn subject_public_key_info(&self) -> Vec<u8> {
        self.spki.clone()
    }

    fn der_bytes(&self) -> &[u8] {
        &self.key_bits
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

/// An [`HsmKey`] as an rcgen signing key: rcgen builds the to-be-signed bytes, the token signs.
///
/// rcgen's error type cannot carry our error, so a failed signature is reported to rcgen as
/// `RemoteKeyError` and kept here; [`TokenSigner::finish`] puts it back in the result.
#[derive(Debug)]
pub struct TokenSigner {
    key: HsmKey,
    scheme: SignatureScheme,
    public: SpkiPublicKey,
    failure: Mutex<Option<crate::Error>>,
}

impl TokenSigner {
    /// Wraps `key`, choosing the X.509 signature scheme from its type ([`x509_scheme`]).
    ///
    /// # Errors
    ///
    /// [`Error::KeyUnsupported`] for key types rcgen cannot name (P-521).
    pub fn new(key: HsmKey) -> Result<Self, Error> {
        let unsupported = |reason| Error::KeyUnsupported {
            key: key.label().to_owned(),
            kind: key.kind(),
            reason,
        };
        let scheme = x509_scheme(key.kind())
            .ok_or_else(|| unsupported("rcgen with ring cannot write P-521 signatures"))?;
        let public = SpkiPublicKey::from_der(key.spki()).map_err(|_| {
            unsupported("its public key is not one rcgen can write into a certificate")
        })?;
        Ok(Self {
            key,
            scheme,
            public,
            failure: Mutex::new(None),
        })
    }

    /// The TLS scheme used to sign.
    pub fn scheme(&self) -> SignatureScheme {
        self.scheme
    }

    /// Turns rcgen's result into ours, restoring the token's error for a failed signature.
    pub fn finish<T>(&self, result: Result<T, rcgen::Error>) -> Result<T, Error> {
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        match (result, failure) {
            (Ok(value), _) => Ok(value),
            (Err(_), Some(source)) => Err(Error::Sign {
                key: self.key.label().to_owned(),
                source: Box::new(source),
            }),
            (Err(e), None) => Err(Error::Generate(e)),
        }
    }
}

impl PublicKeyData for TokenSigner {
    fn subject_public_key_info(&self) -> Vec<u8> {
        self.public.subject_public_key_info()
    }

    fn der_bytes(&self) -> &[u8] {
        self.public.der_bytes()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.public.algorithm()
    }
}

impl SigningKey for TokenSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key
            .sign_with(self.scheme, msg)
            .map_err(|e| {
                *self
                    .failure
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(e);
                rcgen::Error::RemoteKeyError
            })
    }
}

/// The key type an SPKI names; RSA sizes are not needed here and read as 0.
fn spki_kind(info: &spki::SubjectPublicKeyInfoRef<'_>) -> Option<KeyKind> {
    use const_oid::db::{rfc5912, rfc8410};

    let oid = info.algorithm.oid;
    if oid == rfc5912::RSA_ENCRYPTION {
        return Some(KeyKind::Rsa(0));
    }
    if oid == rfc8410::ID_ED_25519 {
        return Some(KeyKind::Ed25519);
    }
    if oid != rfc5912::ID_EC_PUBLIC_KEY {
        return None;
    }
    let curve = info.algorithm.parameters_oid().ok()?;
    [Curve::P256, Curve::P384, Curve::P521]
        .into_iter()
        .find(|c| c.oid() == curve)
        .map(KeyKind::Ec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_algorithms_agree() {
        for kind in [
            KeyKind::Ec(Curve::P256),
            KeyKind::Ec(Curve::P384),
            KeyKind::Ed25519,
            KeyKind::Rsa(2048),
        ] {
            assert!(x509_scheme(kind).is_some());
            assert!(rcgen_algorithm(kind).is_some());
        }
        assert!(x509_scheme(KeyKind::Ec(Curve::P521)).is_none());
    }

    #[test]
    fn spki_of_rcgen_key_round_trips() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let spki = key.subject_public_key_info();
        let public = SpkiPublicKey::from_der(&spki).unwrap();
        assert_eq!(public.subject_public_key_info(), spki);
        assert_eq!(public.der_bytes(), key.der_bytes());
        assert_eq!(public.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
        assert!(SpkiPublicKey::from_der(&[0x30, 0x00]).is_err());
    }
}
