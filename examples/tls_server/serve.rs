//! Accepting connections, TLS handshakes with per-connection notes, HTTP/1.1 and HTTP/2, and
//! graceful shutdown on SIGTERM or SIGINT.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert, ServerConnection};
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{ServerConfig, SignatureAlgorithm, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_rustls::LazyConfigAcceptor;
use tracing::{debug, info, warn};

/// The body type of every response: the whole body in memory.
type Body = Full<Bytes>;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest `/delay` a client may ask for.
const MAX_DELAY: Duration = Duration::from_secs(10);

/// What every connection's TLS configuration shares.
pub(crate) struct TlsSettings {
    resolver: Arc<dyn ResolvesServerCert>,
    verifier: Arc<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
    sessions: Arc<dyn StoresServerSessions>,
}

impl TlsSettings {
    /// Settings serving the resolver's keys, verifying clients with `verifier`.
    pub(crate) fn new(
        resolver: Arc<dyn ResolvesServerCert>,
        verifier: Arc<dyn ClientCertVerifier>,
    ) -> Self {
        Self {
            resolver,
            verifier,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            sessions: ServerSessionMemoryCache::new(1024),
        }
    }

    /// A configuration for one connection, whose resolver writes into `notes`.
    ///
    /// rustls does not say which signature scheme a handshake used; wrapping the resolver per
    /// connection is how the page can tell. The session cache is shared, so resumption works.
    fn config_for(&self, notes: Arc<HandshakeNotes>) -> anyhow::Result<Arc<ServerConfig>> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .context("protocol versions")?
            .with_client_cert_verifier(self.verifier.clone())
            .with_cert_resolver(Arc::new(NotingResolver {
                inner: self.resolver.clone(),
                notes,
            }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.session_storage = self.sessions.clone();
        Ok(Arc::new(config))
    }
}

/// SIGTERM and SIGINT, registered before the server says it is ready.
pub(crate) struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Replaces the default actions (exit at once) with notification.
    pub(crate) fn register() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("handling SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("handling SIGINT")?,
        })
    }

    /// The name of the first signal that arrives.
    pub(crate) async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Serves until `shutdown` gives its reason (a signal's name, say), then stops accepting and
/// waits for connections to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = &'static str>,
    tls: Arc<TlsSettings>,
    shutdown_timeout: Duration,
) -> anyhow::Result<()> {
    let graceful = GracefulShutdown::new();
    let http = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let mut shutdown = std::pin::pin!(shutdown);
    let reason = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let watcher = graceful.watcher();
                    tokio::spawn(connection(stream, peer, tls.clone(), http.clone(), watcher));
                }
                Err(e) => {
                    // Usually out of file descriptors; pausing lets connections finish.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            reason = &mut shutdown => break reason,
        }
    };
    drop(listener);

    info!(
        reason,
        connections = graceful.count(),
        "shutting down: no new connections, finishing requests in flight"
    );
    if tokio::time::timeout(shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            timeout = ?shutdown_timeout,
            "connections still open after the shutdown timeout; closing them"
        );
    }
    Ok(())
}

/// One connection: handshake, then HTTP until the client or a shutdown ends it.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Arc<TlsSettings>,
    http: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
) {
    let Some((stream, info)) = handshake(stream, peer, &tls).await else {
        return;
    };
    debug!(%peer, version = %info.version, suite = %info.suite, alpn = info.alpn.as_deref().unwrap_or("-"), "handshake done");
    let info = Arc::new(info);
    let service = service_fn(move |request| respond(request, info.clone()));
    let conn = http.serve_connection(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(conn).await {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Runs the TLS handshake; logs one line and returns `None` when it fails.
async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    tls: &TlsSettings,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, ConnInfo)> {
    let acceptor = LazyConfigAcceptor::new(Acceptor::default(), stream);
    let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "TLS handshake failed: unreadable ClientHello");
            return None;
        }
        Err(_) => {
            warn!(%peer, "TLS handshake failed: no ClientHello within {HANDSHAKE_TIMEOUT:?}");
            return None;
        }
    };
    let hello = Hello::from(&start.client_hello());
    let notes = Arc::new(HandshakeNotes::default());
    let config = match tls.config_for(notes.clone()) {
        Ok(config) => config,
        Err(e) => {
            warn!(%peer, error = %e, "TLS configuration failed");
            return None;
        }
    };
    let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config)).await;
    match outcome {
        Ok(Ok(stream)) => {
            let info = ConnInfo::new(stream.get_ref().1, &notes);
            Some((stream, info))
        }
        Ok(Err(e)) => {
            warn!(
                %peer,
                server_name = hello.server_name.as_deref().unwrap_or("-"),
                offered = %hello.schemes,
                reason = %notes.failure_reason(&e),
                "TLS handshake failed"
            );
            None
        }
        Err(_) => {
            warn!(%peer, "TLS handshake failed: not finished within {HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}

/// What the ClientHello said, kept for the failure log line.
struct Hello {
    server_name: Option<String>,
    schemes: String,
}

impl From<&ClientHello<'_>> for Hello {
    fn from(hello: &ClientHello<'_>) -> Self {
        Self {
            server_name: hello.server_name().map(str::to_owned),
            schemes: scheme_list(hello.signature_schemes()),
        }
    }
}

/// What one handshake's resolver saw.
#[derive(Debug, Default)]
struct HandshakeNotes {
    scheme: OnceLock<SignatureScheme>,
    /// Set when no key could serve any scheme the client offered.
    no_key: Mutex<Option<String>>,
}

impl HandshakeNotes {
    fn failure_reason(&self, error: &std::io::Error) -> String {
        let no_key = self
            .no_key
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        match no_key {
            Some(offered) => format!(
                "no configured key can sign with any signature scheme the client offered \
                 ({offered}); add a key of a type the client supports ({error})"
            ),
            None => error.to_string(),
        }
    }
}

/// The resolver a connection's configuration uses: the shared one, taking notes.
#[derive(Debug)]
struct NotingResolver {
    inner: Arc<dyn ResolvesServerCert>,
    notes: Arc<HandshakeNotes>,
}

impl ResolvesServerCert for NotingResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = scheme_list(hello.signature_schemes());
        let Some(found) = self.inner.resolve(hello) else {
            *self
                .notes
                .no_key
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(offered);
            return None;
        };
        Some(Arc::new(CertifiedKey {
            cert: found.cert.clone(),
            key: Arc::new(NotingKey {
                inner: found.key.clone(),
                notes: self.notes.clone(),
            }),
            ocsp: found.ocsp.clone(),
        }))
    }
}

/// A signing key that records the scheme rustls chose.
#[derive(Debug)]
struct NotingKey {
    inner: Arc<dyn SigningKey>,
    notes: Arc<HandshakeNotes>,
}

impl SigningKey for NotingKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let signer = self.inner.choose_scheme(offered)?;
        let _ = self.notes.scheme.set(signer.scheme());
        Some(signer)
    }

    fn public_key(&self) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'_>> {
        self.inner.public_key()
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.inner.algorithm()
    }
}

/// What the page reports about the connection.
#[derive(Debug)]
struct ConnInfo {
    version: String,
    suite: String,
    scheme: Option<SignatureScheme>,
    alpn: Option<String>,
    client_subject: Option<String>,
}

impl ConnInfo {
    fn new(conn: &ServerConnection, notes: &HandshakeNotes) -> Self {
        let client_subject = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| match rustls_hsm::cert::parse_certificate(leaf) {
                Ok(parsed) => parsed.subject,
                Err(_) => "(unparsable certificate)".to_owned(),
            });
        Self {
            version: conn
                .protocol_version()
                .map_or("-".into(), |v| {
                    v.as_str()
                        .map_or(format!("{v:?}"), str::to_owned)
                }),
            suite: conn
                .negotiated_cipher_suite()
                .map_or("-".into(), |s| format!("{:?}", s.suite())),
            scheme: notes.scheme.get().copied(),
            alpn: conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            client_subject,
        }
    }
}

async fn respond(
    request: Request<Incoming>,
    info: Arc<ConnInfo>,
) -> Result<Response<Body>, Infallible> {
    debug!(method = %request.method(), path = request.uri().path(), version = ?request.version(), "request");
    let response = match request.uri().path() {
        "/" => page(&info, request.version()),
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/delay" => {
            let wanted = query_ms(request.uri().query()).unwrap_or(1000);
            let delay = Duration::from_millis(wanted).min(MAX_DELAY);
            tokio::time::sleep(delay).await;
            text(StatusCode::OK, format!("waited {} ms\n", delay.as_millis()))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    };
    Ok(response)
}

fn page(info: &ConnInfo, version: hyper::Version) -> Response<Body> {
    let mut html = String::from(
        "<!doctype html>\n<html><head><title>rustls-hsm</title></head><body>\n\
         <h1>Hello from rustls-hsm</h1>\n<p>This handshake was signed inside a PKCS#11 \
         token.</p>\n<ul>\n",
    );
    let scheme = info
        .scheme
        .map_or("unknown (resumed session)".into(), |s| format!("{s:?}"));
    let client = info
        .client_subject
        .clone()
        .unwrap_or_else(|| "none".into());
    for (name, value) in [
        ("TLS version", info.version.as_str()),
        ("Cipher suite", info.suite.as_str()),
        ("Signature scheme", scheme.as_str()),
        ("HTTP version", &format!("{version:?}")),
        ("Client certificate", client.as_str()),
    ] {
        let _ = writeln!(html, "<li>{name}: {}</li>", escape(value));
    }
    html.push_str("</ul>\n</body></html>\n");
    Response::builder()
        .header("content-type", "text/html; charset=utf-8")
        .body(full(html))
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "error\n".into()))
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    response
}

fn query_ms(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))?
        .parse()
        .ok()
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
}

fn escape(value: &str) -> String {
    value
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn scheme_list(schemes: &[SignatureScheme]) -> String {
    let names: Vec<String> = schemes
        .iter()
        .map(|s| format!("{s:?}"))
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
