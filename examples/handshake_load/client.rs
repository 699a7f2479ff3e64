//! Client configurations for load: protocol version, the signature schemes offered, trust, and
//! an optional client certificate, always without resumption.

use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls::{SupportedProtocolVersion, ALL_VERSIONS};

/// Which TLS version the client offers.
#[derive(Clone, Copy, Debug, Eq, PartialEq, clap::ValueEnum)]
pub(crate) enum TlsVersion {
    /// TLS 1.2 only.
    #[value(name = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[value(name = "1.3")]
    Tls13,
}

impl TlsVersion {
    /// The name used in reports.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Tls12 => "1.2",
            Self::Tls13 => "1.3",
        }
    }
}

/// How the client checks the server's certificate.
#[derive(Debug)]
pub(crate) enum Trust {
    /// Chain to one of these roots, name checked.
    Roots(RootCertStore),
    /// Any certificate; the handshake signature is still checked against the certificate's key.
    InsecureAnyCertificate,
}

/// Everything a load client's configuration is made from.
#[derive(Debug)]
pub(crate) struct ClientSpec {
    /// Offer only this version (both when `None`).
    pub(crate) version: Option<TlsVersion>,
    /// Offer only these schemes (all the provider supports when empty).
    pub(crate) schemes: Vec<SignatureScheme>,
    /// Server certificate checking.
    pub(crate) trust: Trust,
    /// Presents a client certificate when the server asks.
    pub(crate) client_cert: Option<Arc<dyn ResolvesClientCert>>,
}

/// A rustls client configuration for full handshakes: resumption is disabled.
pub(crate) fn client_config(spec: ClientSpec) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(provider_offering(&spec.schemes));
    let versions: &[&'static SupportedProtocolVersion] = match spec.version {
        Some(TlsVersion::Tls12) => &[&rustls::version::TLS12],
        Some(TlsVersion::Tls13) => &[&rustls::version::TLS13],
        None => ALL_VERSIONS,
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .context("protocol versions")?;
    let builder = match spec.trust {
        Trust::Roots(roots) => builder.with_root_certificates(roots),
        Trust::InsecureAnyCertificate => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(InsecureAnyCertificate {
                algorithms: provider.signature_verification_algorithms,
            })),
    };
    let mut config = match spec.client_cert {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The ring provider, with signature verification limited to `schemes` (all when empty), so
/// that the client's `signature_algorithms` offer is exactly those.
pub(crate) fn provider_offering(schemes: &[SignatureScheme]) -> CryptoProvider {
    let mut provider = ring::default_provider();
    if !schemes.is_empty() {
        let all = provider.signature_verification_algorithms;
        let mapping: Vec<_> = all
            .mapping
            .iter()
            .filter(|(s, _)| schemes.contains(s))
            .copied()
            .collect();
        provider.signature_verification_algorithms = WebPkiSupportedAlgorithms {
            all: all.all,
            // The provider wants a 'static table; one small leak per configuration built.
            mapping: Box::leak(mapping.into_boxed_slice()),
        };
    }
    provider
}

/// Parses a scheme by its TLS registry name (`ecdsa_secp256r1_sha256`, `rsa_pss_rsae_sha256`,
/// `ed25519`...), as rustls-hsm's reports name them.
pub(crate) fn parse_scheme(name: &str) -> anyhow::Result<SignatureScheme> {
    let known: Vec<(SignatureScheme, String)> = rustls_hsm::scheme::all_schemes()
        .into_iter()
        .map(|(s, _)| (s, rustls_hsm::scheme::scheme_name(s)))
        .collect();
    if let Some((scheme, _)) = known.iter().find(|(_, n)| n == name) {
        return Ok(*scheme);
    }
    let names: Vec<&str> = known
        .iter()
        .map(|(_, n)| n.as_str())
        .collect();
    bail!(
        "unknown signature scheme `{name}`; known: {}",
        names.join(", ")
    )
}

/// Accepts any server certificate but checks the handshake signature against its key.
#[derive(Debug)]
struct InsecureAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for InsecureAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
