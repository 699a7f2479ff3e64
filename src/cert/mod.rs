//! X.509 certificates for keys on a token: self-signed certificates, PKCS#10 requests and
//! certificates issued by a CA whose key is on a token too, all signed on the token through
//! rcgen's remote-key support; and certificates stored on, and read back from, the token.

mod names;
mod signer;
mod store;

use std::time::Duration;

use der::{Decode, Encode};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use crate::pkcs11::KeyKind;
use crate::HsmKey;

pub use names::{Subject, SubjectAltName};
pub use signer::{rcgen_algorithm, x509_scheme, SpkiPublicKey, TokenSigner};
pub use store::{load_chain, store_certificate};

/// The longest validity [`CertProfile`] accepts, in days (about 100 years).
pub const MAX_DAYS: u32 = 36_525;

/// How far back a new certificate's validity starts, so that peers whose clocks lag still
/// accept it.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Errors making, reading or storing certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The CA certificate's public key is not the CA key's.
    #[error("the CA certificate does not belong to CA key `{key}`: its public key SHA-256 is {cert_fingerprint}, the key's is {key_fingerprint}; pass the CA key's own certificate")]
    CaMismatch {
        /// The CA key's label.
        key: String,
        /// SHA-256 of the certificate's SubjectPublicKeyInfo.
        cert_fingerprint: String,
        /// SHA-256 of the key's SubjectPublicKeyInfo.
        key_fingerprint: String,
    },
    /// A certificate or request could not be parsed.
    #[error("invalid {what}: {reason}")]
    Parse {
        /// What was being read, e.g. "certificate" or "PEM file".
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// Another certificate already has the key's `CKA_ID`.
    #[error("{count} other certificate(s) with CKA_ID {id} are already on the token; pass --replace to replace them")]
    CertificateExists {
        /// The id, hex.
        id: String,
        /// How many.
        count: usize,
    },
    /// rcgen refused the parameters or the request.
    #[error("building the certificate failed: {0}")]
    Generate(#[source] rcgen::Error),
    /// The key has a type rcgen cannot certify.
    #[error("key `{key}` ({kind}) cannot sign certificates here: {reason}")]
    KeyUnsupported {
        /// The key's label.
        key: String,
        /// Its type.
        kind: KeyKind,
        /// Why.
        reason: &'static str,
    },
    /// No certificate for the key is on the token.
    #[error("no X.509 certificate with CKA_ID {id} holding the key's public key is on the token; store one with `rustls-hsm cert self-signed --store-on-token` or pass the chain as a file")]
    NoCertificate {
        /// The id, hex.
        id: String,
    },
    /// A PKCS#11 call failed.
    #[error(transparent)]
    Pkcs11(#[from] crate::pkcs11::Error),
    /// An alternative name is malformed.
    #[error("invalid subject alternative name `{san}`: {reason}")]
    San {
        /// The name as given.
        san: String,
        /// Why it was refused.
        reason: String,
    },
    /// The token failed to sign the certificate or request.
    #[error("signing with key `{key}` on the token failed")]
    Sign {
        /// The key's label.
        key: String,
        /// The signing key's error.
        #[source]
        source: Box<crate::Error>,
    },
    /// A subject is malformed.
    #[error("invalid subject `{subject}`: {reason}")]
    Subject {
        /// The subject as given.
        subject: String,
        /// Why it was refused.
        reason: String,
    },
    /// A validity period is out of range.
    #[error("invalid validity of {days} days: use 1 to {MAX_DAYS}")]
    Validity {
        /// The days asked for.
        days: u32,
    },
}

/// What a certificate is for; decides key usage, extended key usage and basic constraints.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum CertUsage {
    /// A CA that issues end-entity certificates only (path length 0): keyCertSign, cRLSign.
    Ca,
    /// A TLS client: digitalSignature, clientAuth.
    Client,
    /// A TLS server: digitalSignature, serverAuth.
    Server,
}

/// The parts of a certificate the caller chooses, checked when built.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct CertProfile {
    usage: CertUsage,
    subject: Subject,
    sans: Vec<SubjectAltName>,
    days: u32,
}

impl CertProfile {
    /// A profile for `usage` with `subject`, no alternative names and 365 days of validity.
    pub fn new(usage: CertUsage, subject: Subject) -> Self {
        Self {
            usage,
            subject,
            sans: Vec::new(),
            days: 365,
        }
    }

    /// Adds subject alternative names.
    pub fn sans(mut self, sans: impl IntoIterator<Item = SubjectAltName>) -> Self {
        self.sans.extend(sans);
        self
    }

    /// Sets the validity in days, from now.
    ///
    /// # Errors
    ///
    /// [`Error::Validity`] outside 1..=[`MAX_DAYS`].
    pub fn days(mut self, days: u32) -> Result<Self, Error> {
        if days == 0 || days > MAX_DAYS {
            return Err(Error::Validity { days });
        }
        self.days = days;
        Ok(self)
    }

    /// The certificate's purpose.
    pub fn usage(&self) -> CertUsage {
        self.usage
    }

    /// The subject.
    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// rcgen parameters: names, validity, a random serial and the usage's extensions.
    fn params(&self) -> Result<CertificateParams, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = self.subject.to_distinguished_name();
        params.subject_alt_names = self
            .sans
            .iter()
            .map(SubjectAltName::to_san_type)
            .collect::<Result<_, _>>()?;
        apply_usage(&mut params, self.usage, self.days)?;
        Ok(params)
    }
}

/// A certificate as parsed for the checks and attributes this module needs.
#[derive(Clone, Debug)]
pub struct ParsedCertificate {
    /// DER of the subject name.
    pub subject_der: Vec<u8>,
    /// DER of the issuer name.
    pub issuer_der: Vec<u8>,
    /// DER of the serial number INTEGER.
    pub serial_der: Vec<u8>,
    /// DER of the SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// The subject as RFC 4514 text.
    pub subject: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl ParsedCertificate {
    /// True when subject and issuer are the same name (a root or a self-signed leaf).
    pub fn is_self_issued(&self) -> bool {
        self.subject_der == self.issuer_der
    }
}

/// Makes a self-signed certificate for `key`, signed on its token.
///
/// The signature algorithm follows the key: ECDSA P-256 with SHA-256, P-384 with SHA-384,
/// Ed25519, and RSA PKCS#1 v1.5 with SHA-256 (see [`x509_scheme`]).
pub fn self_signed(key: &HsmKey, profile: &CertProfile) -> Result<CertificateDer<'static>, Error> {
    let signer = TokenSigner::new(key.clone())?;
    let params = profile.params()?;
    let cert = params.self_signed(&signer);
    signer
        .finish(cert)
        .map(|c| c.der().clone())
}

/// Makes a PKCS#10 certificate signing request for `key`, signed on its token.
///
/// The request carries the subject and alternative names only; the CA decides usage and
/// validity.
pub fn csr(
    key: &HsmKey,
    subject: &Subject,
    sans: &[SubjectAltName],
) -> Result<CertificateSigningRequestDer<'static>, Error> {
    let signer = TokenSigner::new(key.clone())?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject.to_distinguished_name();
    params.subject_alt_names = sans
        .iter()
        .map(SubjectAltName::to_san_type)
        .collect::<Result<_, _>>()?;
    let request = params.serialize_request(&signer);
    signer
        .finish(request)
        .map(|r| r.der().clone())
}

/// Issues a certificate for the public key `subject_spki`, signed by `ca_key` on its token.
///
/// `ca_cert` must hold `ca_key`'s public key; its subject becomes the issuer, its subject key
/// identifier the authority key identifier. The new certificate does not outlive the CA's.
pub fn issue(
    ca_key: &HsmKey,
    ca_cert: &CertificateDer<'_>,
    subject_spki: &[u8],
    profile: &CertProfile,
) -> Result<CertificateDer<'static>, Error> {
    let public = SpkiPublicKey::from_der(subject_spki)?;
    let (signer, ca) = ca_signer(ca_key, ca_cert)?;
    let mut params = profile.params()?;
    params.use_authority_key_identifier_extension = true;
    clamp_to_issuer(&mut params, &ca);
    let issuer = Issuer::from_ca_cert_der(ca_cert, &signer).map_err(Error::Generate)?;
    let cert = params.signed_by(&public, &issuer);
    signer
        .finish(cert)
        .map(|c| c.der().clone())
}

/// Issues a certificate for a PKCS#10 request, signed by `ca_key` on its token.
///
/// The request's signature is checked first. Its subject and alternative names are kept;
/// everything else it asks for (CA status, key usages, extensions) is replaced by what `usage`
/// prescribes, so a request cannot make itself a CA.
pub fn issue_from_csr(
    ca_key: &HsmKey,
    ca_cert: &CertificateDer<'_>,
    csr: &CertificateSigningRequestDer<'_>,
    usage: CertUsage,
    days: u32,
) -> Result<CertificateDer<'static>, Error> {
    if days == 0 || days > MAX_DAYS {
        return Err(Error::Validity { days });
    }
    let mut request = CertificateSigningRequestParams::from_der(csr).map_err(|e| Error::Parse {
        what: "certificate signing request",
        reason: e.to_string(),
    })?;
    let (signer, ca) = ca_signer(ca_key, ca_cert)?;
    let requested = std::mem::take(&mut request.params);
    let mut params = CertificateParams::default();
    params.distinguished_name = requested.distinguished_name;
    params.subject_alt_names = requested.subject_alt_names;
    apply_usage(&mut params, usage, days)?;
    params.use_authority_key_identifier_extension = true;
    clamp_to_issuer(&mut params, &ca);
    request.params = params;
    let issuer = Issuer::from_ca_cert_der(ca_cert, &signer).map_err(Error::Generate)?;
    let cert = request.signed_by(&issuer);
    signer
        .finish(cert)
        .map(|c| c.der().clone())
}

/// Parses a DER certificate into the fields this module uses.
pub fn parse_certificate(cert: &CertificateDer<'_>) -> Result<ParsedCertificate, Error> {
    let bad = |e: der::Error| Error::Parse {
        what: "certificate",
        reason: e.to_string(),
    };
    let parsed = x509_cert::Certificate::from_der(cert).map_err(bad)?;
    let tbs = parsed.tbs_certificate;
    let not_after = OffsetDateTime::UNIX_EPOCH
        + tbs
            .validity
            .not_after
            .to_unix_duration();
    Ok(ParsedCertificate {
        subject_der: tbs.subject.to_der().map_err(bad)?,
        issuer_der: tbs.issuer.to_der().map_err(bad)?,
        serial_der: tbs
            .serial_number
            .to_der()
            .map_err(bad)?,
        spki_der: tbs
            .subject_public_key_info
            .to_der()
            .map_err(bad)?,
        subject: tbs.subject.to_string(),
        not_after,
    })
}

/// Reads every `CERTIFICATE` block of a PEM text, in order.
///
/// # Errors
///
/// [`Error::Parse`] for malformed PEM or a text without certificates.
pub fn chain_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Parse {
            what: "PEM certificate file",
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(Error::Parse {
            what: "PEM certificate file",
            reason: "it holds no CERTIFICATE block".into(),
        });
    }
    Ok(chain)
}

/// Reads the `CERTIFICATE REQUEST` block of a PEM text.
pub fn csr_from_pem(pem: &[u8]) -> Result<CertificateSigningRequestDer<'static>, Error> {
    CertificateSigningRequestDer::from_pem_slice(pem).map_err(|e| Error::Parse {
        what: "PEM certificate request",
        reason: e.to_string(),
    })
}

/// PEM text of certificates, one `CERTIFICATE` block each, in order.
pub fn chain_to_pem(chain: &[CertificateDer<'_>]) -> String {
    chain
        .iter()
        .map(|cert| pem_block("CERTIFICATE", cert))
        .collect()
}

/// PEM text of a certificate signing request.
pub fn csr_to_pem(csr: &CertificateSigningRequestDer<'_>) -> String {
    pem_block("CERTIFICATE REQUEST", csr.as_ref())
}

fn pem_block(label: &str, der: &[u8]) -> String {
    der::pem::encode_string(label, der::pem::LineEnding::LF, der)
        .expect("PEM encoding of an in-memory buffer with a fixed ASCII label cannot fail")
}

/// Key usage, extended key usage, basic constraints, validity and a serial for `usage`.
fn apply_usage(params: &mut CertificateParams, usage: CertUsage, days: u32) -> Result<(), Error> {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(i64::from(days));
    params.serial_number = Some(random_serial()?);
    match usage {
        CertUsage::Ca => {
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
            ];
        }
        CertUsage::Client | CertUsage::Server => {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![if usage == CertUsage::Server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
        }
    }
    Ok(())
}

/// 16 random bytes, positive and without a leading zero byte (RFC 5280 section 4.1.2.2).
fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| Error::Parse {
        what: "random serial number",
        reason: e.to_string(),
    })?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The CA key's signer, after checking that `ca_cert` is the CA key's certificate.
fn ca_signer(
    ca_key: &HsmKey,
    ca_cert: &CertificateDer<'_>,
) -> Result<(TokenSigner, ParsedCertificate), Error> {
    let ca = parse_certificate(ca_cert)?;
    if ca.spki_der != ca_key.spki() {
        return Err(Error::CaMismatch {
            key: ca_key.label().to_owned(),
            cert_fingerprint: crate::pkcs11::spki_fingerprint(&ca.spki_der),
            key_fingerprint: crate::pkcs11::spki_fingerprint(ca_key.spki()),
        });
    }
    Ok((TokenSigner::new(ca_key.clone())?, ca))
}

fn clamp_to_issuer(params: &mut CertificateParams, ca: &ParsedCertificate) {
    if params.not_after > ca.not_after {
        params.not_after = ca.not_after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_refuse_empty_and_huge_validity() {
        let profile = CertProfile::new(CertUsage::Server, Subject::common_name("x"));
        assert!(profile.clone().days(0).is_err());
        assert!(profile
            .clone()
            .days(MAX_DAYS + 1)
            .is_err());
        assert!(profile.days(30).is_ok());
    }

    #[test]
    fn serials_are_positive_without_leading_zero() {
        for _ in 0..64 {
            let serial = random_serial().unwrap().to_bytes();
            assert_eq!(serial.len(), 16);
            assert!(serial[0] & 0x80 == 0 && serial[0] != 0);
        }
    }

    #[test]
    fn pem_round_trips() {
        let der = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let pem = chain_to_pem(&[der.clone(), der.clone()]);
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert_eq!(
            chain_from_pem(pem.as_bytes()).unwrap(),
            vec![der.clone(), der]
        );
        assert!(chain_from_pem(b"nothing here").is_err());
    }
}
