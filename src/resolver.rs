//! Certificate resolvers: a server that serves several HSM keys by SNI and by what the client
//! can verify, and an mTLS client whose key is on a token.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

/// Picks a certified key by server name, then by the first that can serve a scheme the client
/// offered, in the order they were added (add the preferred one first, e.g. ECDSA before RSA).
#[derive(Debug, Default)]
pub struct ServerCertResolver {
    by_name: HashMap<String, Vec<Arc<CertifiedKey>>>,
    fallback: Vec<Arc<CertifiedKey>>,
}

impl ServerCertResolver {
    /// An empty resolver.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `certified` for `sni_name` (DNS name, case-insensitive), or for any name and for
    /// clients that send none when `sni_name` is `None`.
    pub fn add(&mut self, sni_name: Option<&str>, certified: Arc<CertifiedKey>) -> &mut Self {
        match sni_name {
            Some(name) => self
                .by_name
                .entry(name.to_ascii_lowercase())
                .or_default()
                .push(certified),
            None => self.fallback.push(certified),
        }
        self
    }

    fn candidates(&self, name: Option<&str>) -> &[Arc<CertifiedKey>] {
        name.and_then(|n| {
            self.by_name
                .get(&n.to_ascii_lowercase())
        })
        .map_or(self.fallback.as_slice(), Vec::as_slice)
    }
}

impl ResolvesServerCert for ServerCertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = hello.signature_schemes();
        let found = self
            .candidates(hello.server_name())
            .iter()
            .find(|c| c.key.choose_scheme(offered).is_some())
            .cloned();
        if found.is_none() {
            tracing::debug!(
                server_name = hello.server_name().unwrap_or("-"),
                offered = ?offered,
                "no HSM key can serve a signature scheme the client offered"
            );
        }
        found
    }
}

/// Presents one certified key (key on a token) to servers that ask for a client certificate.
#[derive(Debug)]
pub struct ClientCertResolver {
    certified: Arc<CertifiedKey>,
}

impl ClientCertResolver {
    /// Presents `certified` whenever the server's offered schemes allow it.
    pub fn new(certified: Arc<CertifiedKey>) -> Self {
        Self { certified }
    }
}

impl ResolvesClientCert for ClientCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.certified
            .key
            .choose_scheme(sigschemes)
            .map(|_| self.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
