//! Decoding a PEM private key for import, and the token templates that carry it.
//!
//! The key is found among the PEM blocks of its file (certificates and parameters are skipped);
//! secret parts stay in zeroizing buffers until the token has them.

use cryptoki::object::{Attribute, KeyType, ObjectClass};
use der::Encode;
use pkcs8::{DecodePrivateKey, PrivateKeyInfo};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::PrivateKeyDer;
use zeroize::Zeroizing;

use super::oid_der;
use crate::pkcs11::{Curve, Error};

/// A decoded private key, secret parts in zeroizing buffers.
pub(super) enum KeyMaterial {
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
    /// Finds the one private key among the PEM blocks of `pem` and decodes it.
    ///
    /// Blocks of other kinds (certificates, `EC PARAMETERS`) are skipped; the error says what
    /// was found instead of a key and what is accepted.
    pub(super) fn from_pem(pem: &str) -> Result<Self, String> {
        // Editors on Windows start UTF-8 files with a byte order mark.
        let pem = pem
            .strip_prefix('\u{feff}')
            .unwrap_or(pem);
        if pem.trim().is_empty() {
            return Err(format!("the PEM text is empty; expected {ACCEPTED_PEM}"));
        }
        refuse_encrypted(pem)?;
        // LIMITATION: the PEM parser's base64 buffer is freed without being zeroized; the same
        // base64 is in the caller's (zeroizing) input, and avoiding the copy would need a
        // zeroizing PEM reader.
        let mut blocks = PrivateKeyDer::pem_slice_iter(pem.as_bytes());
        let key = match blocks.next() {
            Some(Ok(key)) => Zeroizing::new(key),
            Some(Err(e)) => return Err(pem_error(&e)),
            None => return Err(no_private_key(pem)),
        };
        match blocks
            .next()
            .map(|next| next.map(Zeroizing::new))
        {
            None => {}
            Some(Ok(_second)) => {
                return Err(
                    "the PEM text holds more than one private key; put the one to import in a \
                     file of its own"
                        .into(),
                )
            }
            Some(Err(e)) => return Err(pem_error(&e)),
        }
        let material = match &*key {
            PrivateKeyDer::Pkcs8(der) => Self::from_pkcs8(der.secret_pkcs8_der())?,
            PrivateKeyDer::Sec1(der) => Self::from_sec1(der.secret_sec1_der())?,
            PrivateKeyDer::Pkcs1(der) => {
                use pkcs1::DecodeRsaPrivateKey;
                let key = rsa::RsaPrivateKey::from_pkcs1_der(der.secret_pkcs1_der())
                    .map_err(|e| format!("invalid PKCS#1 key: {e}"))?;
                Self::Rsa(Box::new(key))
            }
            _ => {
                return Err(format!(
                    "unsupported private key encoding; expected {ACCEPTED_PEM}"
                ))
            }
        };
        material.refuse_weak()?;
        Ok(material)
    }

    /// Adds the key's attributes to the public and private templates.
    pub(super) fn fill(
        &self,
        public: &mut Vec<Attribute>,
        private: &mut Vec<Attribute>,
    ) -> Result<(), Error> {
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
                    return Err(Error::KeyImport {
                        reason: "multi-prime RSA keys cannot be imported".into(),
                    });
                }
                let (Some(dp), Some(dq), Some(qinv)) = (key.dp(), key.dq(), key.crt_coefficient())
                else {
                    return Err(Error::KeyImport {
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
            let curve = curve_of(oid)?;
            let key = sec1::EcPrivateKey::try_from(info.private_key)
                .map_err(|e| format!("invalid EC key: {e}"))?;
            return ec_material(curve, key.private_key);
        }
        Err(format!(
            "unsupported key algorithm {alg}; RSA, ECDSA and Ed25519 keys can be imported"
        ))
    }

    fn from_sec1(der: &[u8]) -> Result<Self, String> {
        let key =
            sec1::EcPrivateKey::try_from(der).map_err(|e| format!("invalid SEC1 key: {e}"))?;
        let curve = match key
            .parameters
            .and_then(|p| p.named_curve())
        {
            Some(oid) => curve_of(oid)?,
            // RFC 5915 wants the curve named, but RustCrypto's encoder leaves it out; the
            // scalar's length differs for every supported curve.
            None => [Curve::P256, Curve::P384, Curve::P521]
                .into_iter()
                .find(|c| c.field_len() == key.private_key.len())
                .ok_or("the SEC1 key names no curve, and its length fits none")?,
        };
        ec_material(curve, key.private_key)
    }

    /// Refuses keys too weak for TLS, before they reach the token.
    fn refuse_weak(&self) -> Result<(), String> {
        use rsa::traits::PublicKeyParts;

        if let Self::Rsa(key) = self {
            let bits = key.n().bits();
            if bits < 2048 {
                return Err(format!(
                    "RSA-{bits} is below 2048 bits, the least TLS peers accept"
                ));
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
        .map_err(|e| Error::KeyImport {
            reason: format!("encoding the EC point: {e}"),
        })
}

/// The PEM blocks `import_private_key` accepts, for error messages.
const ACCEPTED_PEM: &str =
    "PRIVATE KEY (PKCS#8), EC PRIVATE KEY (SEC1) or RSA PRIVATE KEY (PKCS#1)";

/// Refuses encrypted keys, PKCS#8 or legacy OpenSSL (`Proc-Type: 4,ENCRYPTED`) alike.
fn refuse_encrypted(pem: &str) -> Result<(), String> {
    let encrypted = if pem_labels(pem).contains(&"ENCRYPTED PRIVATE KEY") {
        "ENCRYPTED PRIVATE KEY"
    } else if pem.lines().any(|line| {
        line.trim_start()
            .strip_prefix("Proc-Type:")
            .is_some_and(|v| v.contains("ENCRYPTED"))
    }) {
        "Proc-Type: 4,ENCRYPTED"
    } else {
        return Ok(());
    };
    Err(format!(
        "the key is encrypted ({encrypted}): decrypt it first (openssl pkey -in KEY.pem -out \
         PLAIN.pem), import the plain copy, then delete it"
    ))
}

/// Says what the PEM text holds when it holds no private key.
fn no_private_key(pem: &str) -> String {
    let labels = pem_labels(pem);
    if labels.is_empty() {
        return format!(
            "no PEM block (-----BEGIN ...-----) in the text; expected {ACCEPTED_PEM} (convert a \
             DER key with openssl pkey -inform DER -in KEY.der -out KEY.pem)"
        );
    }
    let mut found: Vec<&str> = Vec::new();
    for label in labels {
        if !found.contains(&label) {
            found.push(label);
        }
    }
    format!(
        "no private key in the PEM text: found {}; expected {ACCEPTED_PEM}",
        found.join(", ")
    )
}

/// The labels of the PEM blocks in `pem`, in order, e.g. `CERTIFICATE`.
fn pem_labels(pem: &str) -> Vec<&str> {
    pem.lines()
        .filter_map(|line| {
            line.trim()
                .strip_prefix("-----BEGIN ")?
                .strip_suffix("-----")
        })
        .collect()
}

/// The PEM parser's error in words (its own text prints labels as byte arrays).
fn pem_error(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "malformed PEM: the {} block has no END line",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "malformed PEM: bad BEGIN line `{}`",
            String::from_utf8_lossy(line)
        ),
        // The decoder's detail may describe secret bytes; the block is what matters.
        pem::Error::Base64Decode(_) => "malformed PEM: a block's base64 is damaged".into(),
        other => format!("malformed PEM: {other}"),
    }
}

/// The supported curve with this OID.
fn curve_of(oid: const_oid::ObjectIdentifier) -> Result<Curve, String> {
    [Curve::P256, Curve::P384, Curve::P521]
        .into_iter()
        .find(|c| c.oid() == oid)
        .ok_or_else(|| format!("unsupported curve {oid}; P-256, P-384 and P-521 are supported"))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn key_after_ec_parameters_is_found() {
        // `openssl ecparam -genkey` writes the curve first; it failed as a bad END line.
        let pem = format!("{P256_PARAMETERS}{}", sec1_key());
        assert!(matches!(
            KeyMaterial::from_pem(&pem).unwrap(),
            KeyMaterial::Ec {
                curve: Curve::P256,
                ..
            }
        ));
    }

    #[test]
    fn key_is_found_beside_a_certificate_in_either_order() {
        // A key file with its certificate failed as a bad END line.
        let cert = rcgen::generate_simple_self_signed(vec!["a.test".into()])
            .unwrap()
            .cert
            .pem();
        for pem in [
            format!("{}{cert}", sec1_key()),
            format!("{cert}{}", sec1_key()),
        ] {
            assert!(KeyMaterial::from_pem(&pem).is_ok(), "{pem}");
        }
    }

    #[test]
    fn byte_order_mark_is_skipped() {
        // A BOM from a Windows editor failed as "invalid data (NUL byte)".
        let pem = format!("\u{feff}{}", sec1_key());
        assert!(KeyMaterial::from_pem(&pem).is_ok());
    }

    #[test]
    fn empty_or_keyless_text_says_what_it_found_and_what_is_accepted() {
        // These failed with "PEM preamble contains invalid data (NUL byte)".
        for empty in ["", "\u{feff}", " \n"] {
            let err = error_of(empty);
            assert!(err.contains("the PEM text is empty"), "{err}");
            assert!(err.contains(ACCEPTED_PEM), "{err}");
        }
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = error_of(&format!("{P256_PARAMETERS}{cert}"));
        assert!(
            err.contains("found EC PARAMETERS, CERTIFICATE; expected PRIVATE KEY (PKCS#8)"),
            "{err}"
        );
        let err = error_of("not a key at all\n");
        assert!(err.contains("no PEM block"), "{err}");
    }

    #[test]
    fn encrypted_keys_must_be_decrypted_first() {
        // An encrypted key must be named as such, not reported as "no private key".
        let pkcs8 = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE \
                     KEY-----\n";
        let legacy = "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: \
                      AES-128-CBC,00\n\nAAAA\n-----END EC PRIVATE KEY-----\n";
        for pem in [pkcs8, legacy] {
            let err = error_of(pem);
            assert!(err.contains("the key is encrypted"), "{err}");
            assert!(err.contains("decrypt it first"), "{err}");
        }
    }

    #[test]
    fn two_private_keys_are_refused() {
        // Importing whichever came first would be a guess.
        let err = error_of(&format!("{}{}", sec1_key(), sec1_key()));
        assert!(err.contains("more than one private key"), "{err}");
    }

    #[test]
    fn unterminated_block_is_named_in_words() {
        // The parser's own text prints the label as a byte array.
        let err = error_of("-----BEGIN PRIVATE KEY-----\nAAAA\n");
        assert!(
            err.contains("the PRIVATE KEY block has no END line"),
            "{err}"
        );
    }

    /// The DER of the prime256v1 OID, as `openssl ecparam` writes it before the key.
    const P256_PARAMETERS: &str =
        "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n";

    fn sec1_key() -> String {
        p256::SecretKey::from_slice(&[7u8; 32])
            .unwrap()
            .to_sec1_pem(der::pem::LineEnding::LF)
            .unwrap()
            .to_string()
    }

    fn error_of(pem: &str) -> String {
        match KeyMaterial::from_pem(pem) {
            Ok(_) => panic!("accepted:\n{pem}"),
            Err(e) => e,
        }
    }
}
