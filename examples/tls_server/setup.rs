//! Turning the options into a logged-in token, certified keys and the TLS settings.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_hsm::resolver::ServerCertResolver;
use rustls_hsm::{cert, HsmKey, HsmToken};

use crate::serve::TlsSettings;
use crate::{Args, ClientAuth};

/// What the server serves with, ready before the runtime starts.
pub(crate) struct Served {
    /// The token, kept to shut it down at exit.
    pub(crate) token: HsmToken,
    /// Resolver, client verifier and protocol settings.
    pub(crate) tls: Arc<TlsSettings>,
    /// Client authentication, if on.
    pub(crate) client_auth: Option<ClientAuth>,
    /// One line naming the keys, for the startup log.
    pub(crate) summary: String,
}

/// The server as the options describe it (everything but --dev).
pub(crate) fn from_args(args: &Args) -> anyhow::Result<Served> {
    let selector = args
        .token
        .clone()
        .context("name the token with --token (or try --dev)")?;
    let pin = args.pin.clone().context(
        "say where the user PIN comes from with --pin (env:NAME, file:PATH, cmd:COMMAND or prompt)",
    )?;
    if args.keys.is_empty() {
        bail!("name at least one key with --key");
    }
    if !args.cert_from_token && args.certs.len() != args.keys.len() {
        bail!(
            "give one --cert chain file per --key (got {} keys and {} files), or --cert-from-token",
            args.keys.len(),
            args.certs.len()
        );
    }

    let mut builder = HsmToken::builder()
        .token(selector)
        .pin(pin);
    if let Some(module) = &args.module {
        builder = builder.module_path(module);
    }
    if let Some(size) = args.pool_size {
        builder = builder.pool_size(size);
    }
    let token = builder.build()?;

    // LIMITATION: chains come either all from files or all from the token; mixing would need a
    // per-key option syntax (e.g. KEY=FILE), which the example keeps out for simplicity.
    let mut certified = Vec::new();
    for (at, selector) in args.keys.iter().enumerate() {
        let key = token.key(selector)?;
        let chain = if args.cert_from_token {
            token.with_session(|session| cert::load_chain(session, key.id(), key.spki()))??
        } else {
            read_chain(&args.certs[at])?
        };
        certified.push((key.clone(), key.certified_key(chain)?));
    }
    let client_roots = match &args.client_ca {
        Some(path) => Some(read_roots(path)?),
        None if args.client_auth.is_some() => {
            bail!(
                "--client-auth needs --client-ca FILE: the CAs whose client certificates to accept"
            )
        }
        None => None,
    };
    let client_auth = client_roots.as_ref().map(|_| {
        args.client_auth
            .unwrap_or(ClientAuth::Required)
    });
    served(token, &certified, client_roots, client_auth)
}

/// Assembles [`Served`] from certified keys, served in the order given, for any server name.
pub(crate) fn served(
    token: HsmToken,
    certified: &[(HsmKey, Arc<CertifiedKey>)],
    client_roots: Option<RootCertStore>,
    client_auth: Option<ClientAuth>,
) -> anyhow::Result<Served> {
    let mut resolver = ServerCertResolver::new();
    for (_, certified) in certified {
        resolver.add(None, certified.clone());
    }
    let verifier = client_verifier(client_roots, client_auth)?;
    let summary = certified
        .iter()
        .map(|(key, _)| format!("{} ({})", key.label(), key.kind()))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Served {
        token,
        tls: Arc::new(TlsSettings::new(Arc::new(resolver), verifier)),
        client_auth,
        summary,
    })
}

/// Reads a PEM chain, leaf first.
pub(crate) fn read_chain(
    path: &Path,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let pem = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    cert::chain_from_pem(&pem).with_context(|| format!("in {}", path.display()))
}

/// Reads trust anchors from a PEM file of CA certificates.
pub(crate) fn read_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in read_chain(path)? {
        roots
            .add(ca)
            .with_context(|| format!("a CA certificate in {} is not usable", path.display()))?;
    }
    Ok(roots)
}

fn client_verifier(
    roots: Option<RootCertStore>,
    auth: Option<ClientAuth>,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let Some(roots) = roots else {
        return Ok(WebPkiClientVerifier::no_client_auth());
    };
    let builder = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    );
    let builder = match auth {
        Some(ClientAuth::Optional) => builder.allow_unauthenticated(),
        _ => builder,
    };
    builder
        .build()
        .context("building the client certificate verifier")
}
