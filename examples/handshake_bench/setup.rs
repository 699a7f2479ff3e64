//! The keys and certificates a benchmark serves: a key pair on the token per key type, a
//! software key of the same type for the in-memory server, and a throwaway software CA that
//! certifies both.

use std::sync::Arc;

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SubjectPublicKeyInfo};
use rsa::pkcs8::EncodePrivateKey;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{RootCertStore, SignatureScheme};
use rustls_hsm::pkcs11::{find_key, generate_key_pair, BackupPolicy, KeyObject, KeySelector};
use rustls_hsm::pkcs11::{Curve, KeyKind, KeySpec, Token};
use serde::{Deserialize, Serialize};

/// The key types the benchmark compares.
#[derive(Clone, Copy, Debug, Deserialize, Eq, Hash, Ord, PartialEq, PartialOrd, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum KeyType {
    /// ECDSA P-256 with SHA-256.
    EcP256,
    /// Ed25519.
    Ed25519,
    /// RSA-2048 with PSS and SHA-256.
    Rsa2048,
}

impl KeyType {
    /// Every key type, in report order.
    pub(crate) const ALL: [Self; 3] = [Self::EcP256, Self::Rsa2048, Self::Ed25519];

    /// Parses `p256`, `rsa2048` or `ed25519`.
    pub(crate) fn parse(text: &str) -> anyhow::Result<Self> {
        match text {
            "p256" | "ec:p256" => Ok(Self::EcP256),
            "rsa2048" | "rsa:2048" => Ok(Self::Rsa2048),
            "ed25519" => Ok(Self::Ed25519),
            _ => anyhow::bail!("unknown key type `{text}`; use p256, rsa2048 or ed25519"),
        }
    }

    /// What reports call it.
    pub(crate) fn title(self) -> &'static str {
        match self {
            Self::EcP256 => "ECDSA P-256",
            Self::Ed25519 => "Ed25519",
            Self::Rsa2048 => "RSA-2048 PSS",
        }
    }

    /// A short name for files.
    pub(crate) fn slug(self) -> &'static str {
        match self {
            Self::EcP256 => "p256",
            Self::Ed25519 => "ed25519",
            Self::Rsa2048 => "rsa2048",
        }
    }

    /// rustls-hsm's key spec for it.
    pub(crate) fn spec(self) -> &'static str {
        match self {
            Self::EcP256 => "ec:p256",
            Self::Ed25519 => "ed25519",
            Self::Rsa2048 => "rsa:2048",
        }
    }

    /// The one scheme the client offers.
    pub(crate) fn scheme(self) -> SignatureScheme {
        match self {
            Self::EcP256 => SignatureScheme::ECDSA_NISTP256_SHA256,
            Self::Ed25519 => SignatureScheme::ED25519,
            Self::Rsa2048 => SignatureScheme::RSA_PSS_SHA256,
        }
    }
}

/// The key pair labelled `label` on the token, generated there first when missing.
pub(crate) fn ensure_token_key(
    session: &cryptoki::session::Session,
    token: &Token,
    label: &str,
    spec: &str,
) -> anyhow::Result<KeyObject> {
    match find_key(session, &KeySelector::label(label), &token.label, true) {
        Ok(found) => Ok(found),
        Err(rustls_hsm::pkcs11::Error::KeyNotFound { .. }) => {
            let spec: KeySpec = spec.parse()?;
            Ok(generate_key_pair(
                session,
                &token.label,
                label,
                spec,
                None,
                BackupPolicy::None,
            )?)
        }
        Err(e) => Err(e.into()),
    }
}

/// A software key of `key_type`, as rustls's ring provider signs with it in memory.
pub(crate) fn software_key(key_type: KeyType) -> anyhow::Result<Arc<dyn SigningKey>> {
    let kind = match key_type {
        KeyType::EcP256 => KeyKind::Ec(Curve::P256),
        KeyType::Ed25519 => KeyKind::Ed25519,
        KeyType::Rsa2048 => KeyKind::Rsa(2048),
    };
    software_key_of(kind)
}

/// A software key of the same type and size as a token key of `kind`.
pub(crate) fn software_key_of(kind: KeyKind) -> anyhow::Result<Arc<dyn SigningKey>> {
    let pkcs8 = match kind {
        KeyKind::Ec(Curve::P256) => {
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?.serialize_der()
        }
        KeyKind::Ec(Curve::P384) => {
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?.serialize_der()
        }
        KeyKind::Ec(Curve::P521) => anyhow::bail!("ring cannot sign with P-521 keys"),
        KeyKind::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519)?.serialize_der(),
        // rcgen on ring cannot make RSA keys; the rsa crate can.
        KeyKind::Rsa(bits) => rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
            .with_context(|| format!("generating an RSA-{bits} key"))?
            .to_pkcs8_der()
            .context("encoding the RSA key")?
            .as_bytes()
            .to_vec(),
    };
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
    Ok(rustls::crypto::ring::sign::any_supported_type(&der)?)
}

/// A throwaway software CA (P-256) that certifies the benchmark's keys for `localhost`.
pub(crate) struct BenchCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

impl BenchCa {
    /// A new CA with a fresh key.
    pub(crate) fn new() -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "rustls-hsm benchmark CA");
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA as the only trust anchor.
    pub(crate) fn roots(&self) -> anyhow::Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.clone())?;
        Ok(roots)
    }

    /// A server certificate for `localhost` certifying `spki`.
    pub(crate) fn leaf(&self, spki: &[u8]) -> anyhow::Result<CertificateDer<'static>> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let public = SubjectPublicKeyInfo::from_der(spki)?;
        Ok(params
            .signed_by(&public, &self.issuer)?
            .der()
            .clone())
    }

    /// `key` with a leaf certificate for its public key.
    pub(crate) fn certify(&self, key: Arc<dyn SigningKey>) -> anyhow::Result<Arc<CertifiedKey>> {
        let spki = key
            .public_key()
            .context("the key has no public key to certify")?;
        let leaf = self.leaf(spki.as_ref())?;
        Ok(Arc::new(CertifiedKey::new(vec![leaf], key)))
    }
}
