//! Real TLS peers for handshake tests: a tokio-rustls server whose key is on the token, a
//! rustls client, and `openssl s_client`.
//!
//! Certificates come from a throwaway software CA made per test; the leaf certifies the HSM
//! key's public key, so every handshake signature is made on the token.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SubjectPublicKeyInfo};
use rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::ResolvesServerCert;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig, SignatureScheme, SupportedProtocolVersion,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A throwaway software CA.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA key again, for signing by hand what rcgen cannot build (see [`TestCa::sign`]).
    key: KeyPair,
    pub cert: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "rustls-hsm test CA");
        let cert = params.self_signed(&key).unwrap();
        let copy = KeyPair::try_from(key.serialize_der().as_slice()).unwrap();
        Self {
            issuer: Issuer::new(params, key),
            key: copy,
            cert: cert.der().clone(),
        }
    }

    /// Signs `data` with the CA key (ECDSA P-256 with SHA-256, DER), as in its certificates.
    pub fn sign(&self, data: &[u8]) -> Vec<u8> {
        rcgen::SigningKey::sign(&self.key, data).unwrap()
    }

    /// A leaf certificate for `localhost` certifying `spki` (the HSM key's public key).
    pub fn leaf(&self, spki: &[u8], client: bool) -> CertificateDer<'static> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let public = SubjectPublicKeyInfo::from_der(spki).unwrap();
        params
            .signed_by(&public, &self.issuer)
            .unwrap()
            .der()
            .clone()
    }

    pub fn write_pem(&self, path: &Path) {
        let pem = pem_of(&self.cert);
        std::fs::write(path, pem).unwrap();
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        roots
    }
}

fn pem_of(cert: &CertificateDer<'_>) -> String {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, cert.as_ref()).unwrap()
}

/// A TLS server on 127.0.0.1 that answers each connection's lines with `pong\n`.
pub struct TestServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(resolver: Arc<dyn ResolvesServerCert>) -> Self {
        let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        Self::start_with(config).await
    }

    pub async fn start_with(mut config: ServerConfig) -> Self {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 64];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(b"pong\n").await.is_err() {
                            return;
                        }
                        let _ = tls.flush().await;
                    }
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A rustls client config trusting `ca`, offering only `schemes` (all when empty) over
/// `versions`.
pub fn client_config(
    ca: &TestCa,
    versions: &[&'static SupportedProtocolVersion],
    schemes: &[SignatureScheme],
) -> Arc<ClientConfig> {
    let provider = provider_offering(schemes);
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// The ring provider, with signature verification limited to `schemes` (all when empty), so
/// the client's offer in the handshake is exactly those.
pub fn provider_offering(schemes: &[SignatureScheme]) -> CryptoProvider {
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
            mapping: Box::leak(mapping.into_boxed_slice()),
        };
    }
    provider
}

/// One full handshake plus a ping; returns the negotiated protocol version.
pub async fn handshake(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<rustls::ProtocolVersion, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"ping\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    if &buf != b"pong\n" {
        return Err(format!("unexpected answer {buf:?}"));
    }
    let version = tls
        .get_ref()
        .1
        .protocol_version()
        .ok_or("no protocol version")?;
    Ok(version)
}

/// Runs `openssl s_client` against `addr` with extra `args`; returns its combined output and
/// whether it verified the chain and finished the handshake.
pub async fn openssl_s_client(addr: SocketAddr, ca_file: &Path, args: &[&str]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-servername")
        .arg("localhost")
        .arg("-CAfile")
        .arg(ca_file)
        .arg("-verify_return_error")
        .arg("-no_ticket")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"ping\n")
        .await
        .unwrap();
    drop(stdin);
    let out = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("openssl s_client hung")
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = text.contains("Verify return code: 0 (ok)") && !text.contains("handshake failure");
    (ok, text)
}
