//! Making one signature on a session by a planned [`Method`], in the form TLS expects.
//!
//! Raw ECDSA results (r‖s) are DER-encoded by the `ecdsa` crate, which emits minimal integers for
//! every leading-zero case. A single-part `C_Sign` is used for every method: mechanisms such as
//! `CKM_ECDSA` and `CKM_RSA_PKCS` are single-part only on many tokens.

use cryptoki::error::Error as CkError;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use sha2::{Digest, Sha256, Sha384, Sha512};

use super::plan::{HashAlg, Method};
use crate::pkcs11::{Curve, KeyKind};

/// Errors making a signature; [`SignError::Token`] keeps the module's return code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The module returned an error.
    #[error("{}", crate::pkcs11::rv_text(.0))]
    Token(#[source] CkError),
    /// The token returned a signature of the wrong length.
    #[error("token returned a {got}-byte signature for {method}, expected {expected} bytes (inconsistent length)")]
    Length {
        /// The method used.
        method: Method,
        /// Bytes returned.
        got: usize,
        /// Bytes expected for this key.
        expected: usize,
    },
    /// The token's output could not be encoded as TLS expects.
    #[error("cannot encode the token's {method} signature: {reason}")]
    Encoding {
        /// The method used.
        method: Method,
        /// Why.
        reason: String,
    },
    /// The method does not fit the key.
    #[error("method {method} does not fit a {kind} key")]
    Mismatch {
        /// The method asked for.
        method: Method,
        /// The key's kind.
        kind: KeyKind,
    },
}

/// Signs `message` with the private key `key` by `method`, returning TLS-ready bytes.
///
/// The host hashes first when the method says so; ECDSA output is DER. The token's output
/// length is checked against the key: ECDSA exactly 2×field length, RSA the modulus length,
/// Ed25519 64 bytes.
pub fn sign_message(
    session: &Session,
    key: ObjectHandle,
    kind: KeyKind,
    method: Method,
    message: &[u8],
) -> Result<Vec<u8>, SignError> {
    check_fits(kind, method)?;
    let input = token_input(method, message);
    let mechanism = mechanism_for(method);
    let raw = session
        .sign(&mechanism, key, &input)
        .map_err(SignError::Token)?;
    finish(kind, method, raw)
}

/// What the token is given for `method`: the message, its digest, or a DigestInfo.
pub fn token_input(method: Method, message: &[u8]) -> Vec<u8> {
    match method {
        Method::EcdsaDigest(h) | Method::RsaPssDigest(h) => digest(h, message),
        Method::RsaPkcs1DigestInfo(h) => {
            let mut info = digest_info_prefix(h).to_vec();
            info.extend_from_slice(&digest(h, message));
            info
        }
        _ => message.to_vec(),
    }
}

/// The PKCS#11 mechanism for `method`, with its parameters (PSS: salt = hash length, MGF1
/// with the same hash; EdDSA: pure, no parameters).
pub fn mechanism_for(method: Method) -> Mechanism<'static> {
    let pss = |h: HashAlg| PkcsPssParams {
        hash_alg: h.mechanism(),
        mgf: match h {
            HashAlg::Sha256 => PkcsMgfType::MGF1_SHA256,
            HashAlg::Sha384 => PkcsMgfType::MGF1_SHA384,
            HashAlg::Sha512 => PkcsMgfType::MGF1_SHA512,
        },
        s_len: (h.output_len() as u64).into(),
    };
    match method {
        Method::EcdsaDigest(_) => Mechanism::Ecdsa,
        Method::EcdsaHashing(HashAlg::Sha256) => Mechanism::EcdsaSha256,
        Method::EcdsaHashing(HashAlg::Sha384) => Mechanism::EcdsaSha384,
        Method::EcdsaHashing(HashAlg::Sha512) => Mechanism::EcdsaSha512,
        Method::Ed25519 => Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
        Method::RsaPkcs1DigestInfo(_) => Mechanism::RsaPkcs,
        Method::RsaPkcs1Hashing(HashAlg::Sha256) => Mechanism::Sha256RsaPkcs,
        Method::RsaPkcs1Hashing(HashAlg::Sha384) => Mechanism::Sha384RsaPkcs,
        Method::RsaPkcs1Hashing(HashAlg::Sha512) => Mechanism::Sha512RsaPkcs,
        Method::RsaPssDigest(h) => Mechanism::RsaPkcsPss(pss(h)),
        Method::RsaPssHashing(h @ HashAlg::Sha256) => Mechanism::Sha256RsaPkcsPss(pss(h)),
        Method::RsaPssHashing(h @ HashAlg::Sha384) => Mechanism::Sha384RsaPkcsPss(pss(h)),
        Method::RsaPssHashing(h @ HashAlg::Sha512) => Mechanism::Sha512RsaPkcsPss(pss(h)),
    }
}

/// Checks the token's output length and encodes it for TLS.
pub(crate) fn finish(kind: KeyKind, method: Method, raw: Vec<u8>) -> Result<Vec<u8>, SignError> {
    let expected = kind.signature_len();
    if raw.len() != expected {
        return Err(SignError::Length {
            method,
            got: raw.len(),
            expected,
        });
    }
    match kind {
        KeyKind::Ec(curve) => {
            ecdsa_der(curve, &raw).map_err(|reason| SignError::Encoding { method, reason })
        }
        KeyKind::Ed25519 | KeyKind::Rsa(_) => Ok(raw),
    }
}

fn check_fits(kind: KeyKind, method: Method) -> Result<(), SignError> {
    let fits = match method {
        Method::EcdsaDigest(_) | Method::EcdsaHashing(_) => matches!(kind, KeyKind::Ec(_)),
        Method::Ed25519 => kind == KeyKind::Ed25519,
        _ => matches!(kind, KeyKind::Rsa(_)),
    };
    if fits {
        Ok(())
    } else {
        Err(SignError::Mismatch { method, kind })
    }
}

fn digest(h: HashAlg, message: &[u8]) -> Vec<u8> {
    match h {
        HashAlg::Sha256 => Sha256::digest(message).to_vec(),
        HashAlg::Sha384 => Sha384::digest(message).to_vec(),
        HashAlg::Sha512 => Sha512::digest(message).to_vec(),
    }
}

/// The DER DigestInfo prefix for `h`, from the `rsa` crate's PKCS#1 v1.5 tables.
fn digest_info_prefix(h: HashAlg) -> Box<[u8]> {
    match h {
        HashAlg::Sha256 => rsa::Pkcs1v15Sign::new::<Sha256>().prefix,
        HashAlg::Sha384 => rsa::Pkcs1v15Sign::new::<Sha384>().prefix,
        HashAlg::Sha512 => rsa::Pkcs1v15Sign::new::<Sha512>().prefix,
    }
}

/// Raw fixed-width r‖s to a DER `Ecdsa-Sig-Value` with minimal integers.
pub(crate) fn ecdsa_der(curve: Curve, raw: &[u8]) -> Result<Vec<u8>, String> {
    let invalid = |e: ecdsa::Error| format!("r or s out of range: {e}");
    Ok(match curve {
        Curve::P256 => p256::ecdsa::Signature::from_slice(raw)
            .map_err(invalid)?
            .to_der()
            .as_bytes()
            .to_vec(),
        Curve::P384 => p384::ecdsa::Signature::from_slice(raw)
            .map_err(invalid)?
            .to_der()
            .as_bytes()
            .to_vec(),
        Curve::P521 => p521::ecdsa::Signature::from_slice(raw)
            .map_err(invalid)?
            .to_der()
            .as_bytes()
            .to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_der_is_minimal_for_leading_zeros() {
        // r with a leading zero byte, s with the high bit set: DER must drop the zero from r
        // and add one in front of s.
        let mut raw = [0u8; 64];
        raw[1] = 0x01;
        raw[31] = 0x05;
        raw[32] = 0x80;
        raw[63] = 0x01;
        let der = ecdsa_der(Curve::P256, &raw).unwrap();
        let parsed = p256::ecdsa::Signature::from_der(&der).unwrap();
        assert_eq!(&parsed.to_bytes()[..], &raw[..]);
        // SEQUENCE { INTEGER 31 bytes, INTEGER 33 bytes (0x00 then 0x80...) }
        assert_eq!(&der[..4], &[0x30, 0x44, 0x02, 0x1f]);
        assert_eq!(&der[35..38], &[0x02, 0x21, 0x00]);
    }

    #[test]
    fn wrong_lengths_are_errors_not_truncations() {
        let err = finish(
            KeyKind::Ec(Curve::P256),
            Method::EcdsaDigest(HashAlg::Sha256),
            vec![1; 63],
        )
        .unwrap_err();
        assert!(matches!(
            err,
            SignError::Length {
                got: 63,
                expected: 64,
                ..
            }
        ));
        assert!(finish(
            KeyKind::Rsa(2048),
            Method::RsaPssDigest(HashAlg::Sha256),
            vec![1; 257]
        )
        .is_err());
    }

    #[test]
    fn digest_info_matches_rfc8017() {
        let input = token_input(Method::RsaPkcs1DigestInfo(HashAlg::Sha256), b"abc");
        // RFC 8017 section 9.2 note 1: the SHA-256 DigestInfo prefix.
        let prefix = hex::decode("3031300d060960864801650304020105000420").unwrap();
        assert_eq!(&input[..19], prefix.as_slice());
        assert_eq!(&input[19..], &Sha256::digest(b"abc")[..]);
    }

    #[test]
    fn methods_must_fit_keys() {
        assert!(check_fits(KeyKind::Ed25519, Method::EcdsaDigest(HashAlg::Sha256)).is_err());
        assert!(check_fits(KeyKind::Rsa(2048), Method::Ed25519).is_err());
    }
}
