//! An mTLS client whose client-certificate key is in a PKCS#11 HSM: fetches one URL from the
//! example server and prints the response.
//!
//! `--dev` uses the example server's dev token (run `tls_server --dev --client-auth required`
//! first): its `dev-client` key, `client.pem` and `ca.pem`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use rustls_hsm::cert;
use rustls_hsm::pin::PinSource;
use rustls_hsm::pkcs11::{KeySelector, TokenSelector};
use rustls_hsm::resolver::ClientCertResolver;
use rustls_hsm::HsmToken;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "Fetch a URL over mTLS with a client key kept in a PKCS#11 HSM")]
struct Args {
    /// Use the example server's dev token, key, certificate and CA (see tls_server --dev).
    #[arg(long)]
    dev: bool,
    /// The dev state directory.
    #[arg(long, default_value = ".state/dev")]
    state_dir: PathBuf,
    /// The PKCS#11 module (vendor .so); --dev defaults to SoftHSM's.
    #[arg(long, env = "RUSTLS_HSM_MODULE")]
    module: Option<PathBuf>,
    /// The token: label, serial:SERIAL or a pkcs11: URI.
    #[arg(long, env = "RUSTLS_HSM_TOKEN")]
    token: Option<TokenSelector>,
    /// The client key: label, id:HEX or pkcs11: URI.
    #[arg(long)]
    key: Option<KeySelector>,
    /// Where to read the user PIN: env:NAME, file:PATH, cmd:COMMAND or prompt.
    #[arg(long)]
    pin: Option<PinSource>,
    /// PEM chain of the client certificate, leaf first.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Read the client certificate chain from the token instead of --cert.
    #[arg(long, conflicts_with = "cert")]
    cert_from_token: bool,
    /// PEM file of CAs to trust for the server's certificate.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// What to fetch.
    #[arg(long, default_value = "https://localhost:8443/")]
    url: Uri,
}

/// The options with --dev's defaults filled in.
struct Resolved {
    module: Option<PathBuf>,
    token: TokenSelector,
    key: KeySelector,
    pin: PinSource,
    cert: Option<PathBuf>,
    ca_file: PathBuf,
    guard_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let resolved = match resolve(
        args.dev
            .then_some(args.state_dir.as_path()),
        &args,
    ) {
        Ok(resolved) => resolved,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // As in tls_server: cryptoki's line for each mechanism it cannot name is noise.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,cryptoki::mechanism=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match fetch(&resolved, &args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Fills in --dev's defaults; with --dev, points SoftHSM at the dev token's configuration.
///
/// Runs first in `main`, while this is the only thread: changing the environment races with
/// reads of it in other threads, and SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`.
fn resolve(dev_dir: Option<&Path>, args: &Args) -> anyhow::Result<Resolved> {
    let Some(dir) = dev_dir else {
        return Ok(Resolved {
            module: args.module.clone(),
            token: args
                .token
                .clone()
                .context("name the token with --token (or use --dev)")?,
            key: args
                .key
                .clone()
                .context("name the client key with --key")?,
            pin: args
                .pin
                .clone()
                .context("say where the user PIN comes from with --pin")?,
            cert: args.cert.clone(),
            ca_file: args
                .ca_file
                .clone()
                .context("name the server's CA with --ca-file")?,
            guard_file: None,
        });
    };
    let conf = dir.join("softhsm2.conf");
    if !conf.exists() {
        bail!(
            "{} does not exist: start the server with --dev --state-dir {} first",
            conf.display(),
            dir.display()
        );
    }
    #[allow(clippy::disallowed_methods)] // single-threaded still: see above
    std::env::set_var("SOFTHSM2_CONF", &conf);
    Ok(Resolved {
        module: Some(
            args.module
                .clone()
                .unwrap_or_else(|| "/usr/lib/softhsm/libsofthsm2.so".into()),
        ),
        token: args
            .token
            .clone()
            .unwrap_or(TokenSelector::Label("rustls-hsm-dev".into())),
        key: args
            .key
            .clone()
            .unwrap_or_else(|| KeySelector::label("dev-client")),
        pin: args
            .pin
            .clone()
            .unwrap_or_else(|| PinSource::File(dir.join("user.pin"))),
        cert: args
            .cert
            .clone()
            .or_else(|| (!args.cert_from_token).then(|| dir.join("client.pem"))),
        ca_file: args
            .ca_file
            .clone()
            .unwrap_or_else(|| dir.join("ca.pem")),
        guard_file: Some(dir.join("pin-guard.json")),
    })
}

/// Fetches the URL and prints the response; true when the status is a success.
fn fetch(resolved: &Resolved, args: &Args) -> anyhow::Result<bool> {
    let mut builder = HsmToken::builder()
        .token(resolved.token.clone())
        .pin(resolved.pin.clone())
        .pool_size(1);
    if let Some(module) = &resolved.module {
        builder = builder.module_path(module);
    }
    if let Some(guard) = &resolved.guard_file {
        builder = builder.pin_guard_file(guard);
    }
    let token = builder.build()?;
    let key = token.key(&resolved.key)?;
    let chain = match &resolved.cert {
        Some(path) => cert::chain_from_pem(
            &fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        )?,
        None => token.with_session(|session| cert::load_chain(session, key.id(), key.spki()))??,
    };
    let certified = key.certified_key(chain)?;

    let mut roots = RootCertStore::empty();
    let ca_pem = fs::read(&resolved.ca_file)
        .with_context(|| format!("cannot read {}", resolved.ca_file.display()))?;
    for ca in cert::chain_from_pem(&ca_pem)? {
        roots.add(ca)?;
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(ClientCertResolver::new(certified)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(get(Arc::new(config), &args.url));
    drop(runtime);
    token.shutdown()?;
    result
}

async fn get(config: Arc<ClientConfig>, url: &Uri) -> anyhow::Result<bool> {
    if url.scheme_str() != Some("https") {
        bail!("only https:// URLs are supported, not {url}");
    }
    let host = url
        .host()
        .context("the URL has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let server_name = ServerName::try_from(host.clone())?;
    let tls = TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .context("TLS handshake failed")?;

    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let path = url
        .path_and_query()
        .map_or("/", |p| p.as_str());
    let authority = url
        .authority()
        .map_or(host.clone(), |a| a.to_string());
    let request = Request::get(path)
        .header("host", authority)
        .body(Empty::<Bytes>::new())?;
    let response = sender
        .send_request(request)
        .await
        .context("the request failed (a server refusing the client certificate ends it here)")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await?
        .to_bytes();
    println!("{status}");
    print!("{}", String::from_utf8_lossy(&body));
    Ok(status.is_success())
}
