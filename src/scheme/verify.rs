//! Checking a signature in software against the key's public key before anyone sees it.
//!
//! Verification uses webpki's algorithms (backed by *ring*, the same code a rustls peer runs),
//! with RustCrypto for P-521, which *ring* lacks. PSS is checked with salt length = hash length,
//! so a token that salts differently is caught here rather than by a strict peer.

use rustls::pki_types::SignatureVerificationAlgorithm;
use rustls::SignatureScheme;
use spki::der::Decode;

use super::plan::scheme_name;

/// A public key ready to verify signatures, parsed once from its SubjectPublicKeyInfo.
#[derive(Clone, Debug)]
pub struct PublicKeyVerifier {
    spki: Vec<u8>,
    /// The subjectPublicKey bit string's bytes.
    key_bits: Vec<u8>,
}

/// A signature that did not verify, or a key or scheme that cannot be checked.
#[derive(Debug, thiserror::Error)]
#[error("software verification of a {scheme} signature failed: {reason}")]
pub struct VerifyError {
    /// The scheme's name.
    pub scheme: String,
    /// Why.
    pub reason: String,
}

impl PublicKeyVerifier {
    /// Parses a DER SubjectPublicKeyInfo.
    pub fn new(spki: &[u8]) -> Result<Self, VerifyError> {
        let info = spki::SubjectPublicKeyInfoRef::from_der(spki).map_err(|e| VerifyError {
            scheme: "any".into(),
            reason: format!("invalid SubjectPublicKeyInfo: {e}"),
        })?;
        let key_bits = info
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| VerifyError {
                scheme: "any".into(),
                reason: "the public key bit string has unused bits".into(),
            })?
            .to_vec();
        Ok(Self {
            spki: spki.to_vec(),
            key_bits,
        })
    }

    /// Verifies a TLS-encoded signature (DER for ECDSA) over `message` for `scheme`.
    pub fn verify(
        &self,
        scheme: SignatureScheme,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), VerifyError> {
        let fail = |reason: String| VerifyError {
            scheme: scheme_name(scheme),
            reason,
        };
        if scheme == SignatureScheme::ECDSA_NISTP521_SHA512 {
            return verify_p521(&self.spki, message, signature).map_err(fail);
        }
        let algorithm = webpki_algorithm(scheme)
            .ok_or_else(|| fail("no software verifier for this scheme".into()))?;
        algorithm
            .verify_signature(&self.key_bits, message, signature)
            .map_err(|_| fail("the signature does not match the public key".into()))
    }

    /// The DER SubjectPublicKeyInfo this verifier checks against.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }
}

/// Verifies one signature; see [`PublicKeyVerifier::verify`].
pub fn verify_signature(
    spki: &[u8],
    scheme: SignatureScheme,
    message: &[u8],
    signature: &[u8],
) -> Result<(), VerifyError> {
    PublicKeyVerifier::new(spki)?.verify(scheme, message, signature)
}

fn webpki_algorithm(
    scheme: SignatureScheme,
) -> Option<&'static dyn SignatureVerificationAlgorithm> {
    use webpki::ring as alg;

    Some(match scheme {
        SignatureScheme::ECDSA_NISTP256_SHA256 => alg::ECDSA_P256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384 => alg::ECDSA_P384_SHA384,
        SignatureScheme::ED25519 => alg::ED25519,
        SignatureScheme::RSA_PKCS1_SHA256 => alg::RSA_PKCS1_2048_8192_SHA256,
        SignatureScheme::RSA_PKCS1_SHA384 => alg::RSA_PKCS1_2048_8192_SHA384,
        SignatureScheme::RSA_PKCS1_SHA512 => alg::RSA_PKCS1_2048_8192_SHA512,
        SignatureScheme::RSA_PSS_SHA256 => alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        SignatureScheme::RSA_PSS_SHA384 => alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
        SignatureScheme::RSA_PSS_SHA512 => alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
        _ => return None,
    })
}

fn verify_p521(spki: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String> {
    use ecdsa::signature::Verifier;
    use spki::DecodePublicKey;

    let public = p521::PublicKey::from_public_key_der(spki).map_err(|e| e.to_string())?;
    let key = p521::ecdsa::VerifyingKey::from_sec1_bytes(&public.to_sec1_bytes())
        .map_err(|e| e.to_string())?;
    let sig = p521::ecdsa::Signature::from_der(signature).map_err(|e| e.to_string())?;
    key.verify(message, &sig)
        .map_err(|_| "the signature does not match the public key".to_string())
}
