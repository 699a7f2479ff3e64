//! An HTTPS server (HTTP/1.1 and HTTP/2) whose TLS handshakes are signed by keys in a PKCS#11
//! HSM.
//!
//! `--dev` needs nothing but SoftHSM: it makes a token under `.state/dev`, keys and certificates
//! on it, and prints `curl` and `openssl s_client` commands to try. Otherwise name the module,
//! token, PIN source, keys and their certificate chains.

mod dev;
mod serve;
mod setup;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use rustls_hsm::pin::PinSource;
use rustls_hsm::pkcs11::{KeySelector, TokenSelector};
use tracing::{error, info};

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "HTTPS server whose TLS keys stay in a PKCS#11 HSM")]
struct Args {
    /// Create or reuse a SoftHSM development token with keys and certificates, then serve.
    #[arg(long)]
    dev: bool,
    /// Where --dev keeps its token, PINs and certificates.
    #[arg(long, default_value = ".state/dev")]
    state_dir: PathBuf,
    /// The PKCS#11 module (vendor .so); --dev defaults to SoftHSM's.
    #[arg(long, env = "RUSTLS_HSM_MODULE")]
    module: Option<PathBuf>,
    /// The token: label, serial:SERIAL or a pkcs11: URI.
    #[arg(long, env = "RUSTLS_HSM_TOKEN")]
    token: Option<TokenSelector>,
    /// A key to serve: label, id:HEX or pkcs11: URI. Repeat for several (e.g. ECDSA then RSA).
    #[arg(long = "key")]
    keys: Vec<KeySelector>,
    /// Where to read the user PIN: env:NAME, file:PATH, cmd:COMMAND or prompt.
    #[arg(long)]
    pin: Option<PinSource>,
    /// PEM chain (leaf first) for each --key, in the same order.
    #[arg(long = "cert")]
    certs: Vec<PathBuf>,
    /// Read each key's chain from certificates stored on the token instead of --cert files.
    #[arg(long, conflicts_with = "certs")]
    cert_from_token: bool,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// PEM file of CAs whose client certificates are accepted (turns on mTLS).
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Whether a client certificate is required (default with --client-ca) or optional.
    #[arg(long, value_enum)]
    client_auth: Option<ClientAuth>,
    /// Most PKCS#11 sessions to keep open.
    #[arg(long)]
    pool_size: Option<usize>,
    /// How long shutdown waits for requests in flight, in seconds.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

/// Whether clients must present a certificate.
#[derive(Clone, Copy, Debug, Eq, PartialEq, ValueEnum)]
enum ClientAuth {
    /// A client without a certificate is served; one with a bad certificate is refused.
    Optional,
    /// A client without a valid certificate is refused.
    Required,
}

fn main() -> ExitCode {
    let args = Args::parse();

    // Before anything else, while this is the only thread: see `dev::claim_environment`.
    let dev_paths = if args.dev {
        match dev::claim_environment(&args.state_dir) {
            Ok(paths) => Some(paths),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };

    init_tracing();
    match run(&args, dev_paths) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, dev_paths: Option<dev::DevPaths>) -> anyhow::Result<()> {
    let served = match &dev_paths {
        Some(paths) => dev::prepare(paths, args)?,
        None => setup::from_args(args)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;

    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let signals = serve::Signals::register()?;
        info!(%addr, keys = served.summary, "listening");
        println!("listening on https://{addr}/");
        if let Some(paths) = &dev_paths {
            dev::print_try_commands(paths, addr, served.client_auth.is_some());
        }
        serve::serve(
            listener,
            signals.recv(),
            served.tls.clone(),
            Duration::from_secs(args.shutdown_timeout),
        )
        .await
    });
    runtime.shutdown_timeout(Duration::from_secs(1));

    // Every connection is gone: close the sessions and finalize the module, once.
    served
        .token
        .shutdown()
        .context("closing the token's sessions")?;
    info!("stopped");
    result
}

/// `RUST_LOG`, default `info`; cryptoki's error line for each mechanism it cannot name is noise
/// and stays off unless `RUST_LOG` names cryptoki.
fn init_tracing() {
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let mut filter = tracing_subscriber::EnvFilter::try_new(&wanted)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !wanted.contains("cryptoki") {
        if let Ok(directive) = "cryptoki::mechanism=off".parse() {
            filter = filter.add_directive(directive);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
