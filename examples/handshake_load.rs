//! A TLS handshake load generator: full handshakes (no resumption, no tickets) against a server
//! at a given concurrency, for a duration or a count, reporting handshakes per second, latency
//! percentiles and errors by kind, as a table or as JSON.
//!
//! The client can present a certificate whose key is on a token (mTLS load): its signatures are
//! then made by rustls-hsm on the client side. The client's own handshake work (key exchange,
//! certificate and signature checks) costs CPU too, and on a small machine shared with the
//! server it competes with it: the report gives the client's CPU time per handshake so that a
//! reader can tell.

#[path = "handshake_load/client.rs"]
mod client;
#[path = "handshake_load/cpu.rs"]
mod cpu;
#[path = "handshake_load/engine.rs"]
mod engine;

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use hyper::Uri;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::ServerName;
use rustls::RootCertStore;
use rustls_hsm::cert;
use rustls_hsm::pin::PinSource;
use rustls_hsm::pkcs11::{KeySelector, TokenSelector};
use rustls_hsm::resolver::ClientCertResolver;
use rustls_hsm::HsmToken;
use serde_json::json;

use crate::client::{ClientSpec, TlsVersion, Trust};
use crate::cpu::ThreadCpu;
use crate::engine::{HttpRequest, Limit, LoadOutcome, LoadSpec};

/// Command-line options.
#[derive(Debug, Parser)]
#[command(
    about = "Full TLS handshakes against a server at a given concurrency",
    after_help = "Exits 1 when any connection failed or none succeeded. Progress goes to stderr \
                  once a second; the report (table, or JSON with --json) to stdout."
)]
struct Args {
    /// The server, https://HOST[:PORT][/PATH]; PATH is what --http requests.
    url: Uri,
    /// Connect to this address instead of resolving HOST (SNI and the name checked stay HOST).
    #[arg(long, value_name = "ADDR")]
    connect: Option<SocketAddr>,
    /// Connections in flight at once.
    #[arg(short = 'c', long, default_value_t = 1)]
    concurrency: usize,
    /// How long to run, e.g. 10s, 500ms, 2m (default 10s).
    #[arg(short = 'd', long, value_parser = parse_duration, conflicts_with = "count")]
    duration: Option<Duration>,
    /// Stop after this many successful connections.
    #[arg(short = 'n', long)]
    count: Option<u64>,
    /// Run this long first without counting, so that the server warms up.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Offer only this TLS version (default: both).
    #[arg(long, value_enum)]
    tls: Option<TlsVersion>,
    /// Offer only this signature scheme; repeat for several (ecdsa_secp256r1_sha256,
    /// rsa_pss_rsae_sha256, ed25519, ...). Default: every scheme rustls verifies.
    #[arg(long = "scheme", value_name = "NAME")]
    schemes: Vec<String>,
    /// PEM file of the CAs to trust for the server's certificate.
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// Accept any server certificate (the handshake signature is still checked).
    #[arg(long, conflicts_with = "ca_file")]
    insecure_accept_any_cert: bool,
    /// Send one HTTP/1.1 GET of the URL's path per connection and require a 2xx answer.
    #[arg(long)]
    http: bool,
    /// The longest one connection may take, connect to close.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Worker threads of the client's runtime (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress lines.
    #[arg(short = 'q', long)]
    quiet: bool,
    #[command(flatten)]
    client_key: ClientKeyArgs,
}

/// A client certificate whose key is on a token.
#[derive(Debug, clap::Args)]
struct ClientKeyArgs {
    /// Present a client certificate for this key on the token (label, id:HEX or pkcs11: URI).
    #[arg(long, value_name = "KEY")]
    client_key: Option<KeySelector>,
    /// PEM chain of the client certificate, leaf first.
    #[arg(long, value_name = "PEM", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Read the client certificate chain from the token instead of --client-cert.
    #[arg(long, requires = "client_key", conflicts_with = "client_cert")]
    client_cert_from_token: bool,
    /// The PKCS#11 module holding the client key.
    #[arg(long, env = "RUSTLS_HSM_MODULE", value_name = "PATH")]
    module: Option<PathBuf>,
    /// The token holding the client key: label, serial:SERIAL or a pkcs11: URI.
    #[arg(long, env = "RUSTLS_HSM_TOKEN", value_name = "SEL")]
    token: Option<TokenSelector>,
    /// Where to read the token's user PIN: env:NAME, file:PATH, cmd:COMMAND or prompt.
    #[arg(long, value_name = "SOURCE")]
    pin: Option<PinSource>,
    /// Sessions for the client key's signatures (default: rustls-hsm's).
    #[arg(long, value_name = "N")]
    client_pool_size: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) if report.is_clean() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<Report> {
    let target = Target::from_uri(&args.url)?;
    let (client_cert, token) = client_certificate(&args.client_key)?;
    let trust = trust(args)?;
    let schemes = args
        .schemes
        .iter()
        .map(|s| client::parse_scheme(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = client::client_config(ClientSpec {
        version: args.tls,
        schemes,
        trust,
        client_cert,
    })?;

    let cpu = Arc::new(ThreadCpu::default());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("load");
    if let Some(threads) = args.threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = cpu
        .hooks(&mut builder)
        .build()
        .context("starting the async runtime")?;

    let result = runtime.block_on(async {
        let addr = match args.connect {
            Some(addr) => addr,
            None => target.resolve().await?,
        };
        let spec = LoadSpec {
            addr,
            server_name: target.server_name.clone(),
            config,
            concurrency: args.concurrency.max(1),
            limit: Limit::Duration(args.warmup),
            request: args.http.then(|| HttpRequest {
                host: target.host_header.clone(),
                path: target.path.clone(),
            }),
            timeout: args.timeout,
            progress: false,
        };
        let warmup = if args.warmup.is_zero() {
            None
        } else {
            Some(engine::run(spec.clone()).await)
        };
        let before = cpu.total();
        let outcome = engine::run(LoadSpec {
            limit: match (args.count, args.duration) {
                (Some(n), _) => Limit::Count(n),
                (None, d) => Limit::Duration(d.unwrap_or(Duration::from_secs(10))),
            },
            progress: !args.quiet,
            ..spec
        })
        .await;
        let client_cpu = cpu.total().saturating_sub(before);
        anyhow::Ok(Report::new(args, addr, outcome, warmup, client_cpu))
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Some(token) = token {
        token.shutdown()?;
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.table());
    }
    Ok(report)
}

/// The URL's parts a load client needs.
struct Target {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    host_header: String,
    path: String,
}

impl Target {
    fn from_uri(uri: &Uri) -> anyhow::Result<Self> {
        if uri.scheme_str() != Some("https") {
            bail!("the URL must start with https://, got {uri}");
        }
        let host = uri
            .host()
            .context("the URL has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone())
            .with_context(|| format!("`{host}` is not a DNS name or IP address"))?;
        Ok(Self {
            host_header: uri
                .authority()
                .map_or_else(|| host.clone(), ToString::to_string),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), ToString::to_string),
            host,
            port,
            server_name,
        })
    }

    /// The host's first address that accepts a connection (`localhost` may name `::1` first
    /// for a server listening on 127.0.0.1 only).
    async fn resolve(&self) -> anyhow::Result<SocketAddr> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot resolve {}", self.host))?
            .collect();
        for &addr in &addrs {
            if tokio::net::TcpStream::connect(addr)
                .await
                .is_ok()
            {
                return Ok(addr);
            }
        }
        bail!(
            "no address of {} accepts connections on port {} (tried {addrs:?})",
            self.host,
            self.port
        )
    }
}

fn trust(args: &Args) -> anyhow::Result<Trust> {
    if args.insecure_accept_any_cert {
        return Ok(Trust::InsecureAnyCertificate);
    }
    let path = args
        .ca_file
        .as_ref()
        .context("name the server's CA with --ca-file (or --insecure-accept-any-cert)")?;
    let pem = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for ca in cert::chain_from_pem(&pem).with_context(|| format!("in {}", path.display()))? {
        roots.add(ca)?;
    }
    Ok(Trust::Roots(roots))
}

/// The client certificate resolver (key on a token) and the token, when --client-key is given.
type ClientCert = (Option<Arc<dyn ResolvesClientCert>>, Option<HsmToken>);

fn client_certificate(args: &ClientKeyArgs) -> anyhow::Result<ClientCert> {
    let Some(selector) = &args.client_key else {
        return Ok((None, None));
    };
    let mut builder = HsmToken::builder()
        .token(
            args.token
                .clone()
                .context("name the client key's token with --token")?,
        )
        .pin(
            args.pin
                .clone()
                .context("say where the token's user PIN comes from with --pin")?,
        );
    if let Some(module) = &args.module {
        builder = builder.module_path(module);
    }
    if let Some(size) = args.client_pool_size {
        builder = builder.pool_size(size);
    }
    let token = builder.build()?;
    let key = token.key(selector)?;
    let chain = match &args.client_cert {
        Some(path) => cert::chain_from_pem(
            &fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        )?,
        None if args.client_cert_from_token => {
            token.with_session(|session| cert::load_chain(session, key.id(), key.spki()))??
        }
        None => bail!(
            "give the client certificate chain: --client-cert PEM or --client-cert-from-token"
        ),
    };
    let resolver = ClientCertResolver::new(key.certified_key(chain)?);
    Ok((Some(Arc::new(resolver)), Some(token)))
}

/// What a run measured, for people and for machines.
struct Report {
    url: String,
    addr: SocketAddr,
    tls: Option<TlsVersion>,
    schemes: Vec<String>,
    concurrency: usize,
    http: bool,
    client_cert: bool,
    outcome: LoadOutcome,
    warmup_errors: u64,
    client_cpu: Duration,
}

impl Report {
    fn new(
        args: &Args,
        addr: SocketAddr,
        outcome: LoadOutcome,
        warmup: Option<LoadOutcome>,
        client_cpu: Duration,
    ) -> Self {
        Self {
            url: args.url.to_string(),
            addr,
            tls: args.tls,
            schemes: args.schemes.clone(),
            concurrency: args.concurrency.max(1),
            http: args.http,
            client_cert: args.client_key.client_key.is_some(),
            warmup_errors: warmup.map_or(0, |w| w.error_count()),
            outcome,
            client_cpu,
        }
    }

    fn is_clean(&self) -> bool {
        self.outcome.handshakes > 0 && self.outcome.error_count() == 0 && self.warmup_errors == 0
    }

    /// Client CPU per completed connection, microseconds (tail included: it was paid for).
    fn cpu_per_handshake_us(&self) -> f64 {
        let done = self.outcome.handshakes + self.outcome.tail;
        if done == 0 {
            return 0.0;
        }
        self.client_cpu.as_secs_f64() * 1e6 / done as f64
    }

    fn cpu_cores(&self) -> f64 {
        let secs = self.outcome.window.as_secs_f64();
        if secs > 0.0 {
            self.client_cpu.as_secs_f64() / secs
        } else {
            0.0
        }
    }

    fn json(&self) -> serde_json::Value {
        let o = &self.outcome;
        json!({
            "url": self.url,
            "addr": self.addr.to_string(),
            "tls": self.tls.map(TlsVersion::as_str),
            "schemes": self.schemes,
            "concurrency": self.concurrency,
            "http": self.http,
            "client_certificate": self.client_cert,
            "window_s": o.window.as_secs_f64(),
            "handshakes": o.handshakes,
            "handshakes_per_s": o.rate(),
            "latency_us": quantiles(&o.handshake_us),
            "request_latency_us": o.request_us.as_ref().map(quantiles),
            "errors": o.errors,
            "error_count": o.error_count(),
            "warmup_error_count": self.warmup_errors,
            "client_cpu": {
                "seconds": self.client_cpu.as_secs_f64(),
                "per_handshake_us": self.cpu_per_handshake_us(),
                "cores": self.cpu_cores(),
            },
        })
    }

    fn table(&self) -> String {
        let o = &self.outcome;
        let mut out = format!(
            "target        {} ({})\noffer         TLS {}, schemes {}{}\n",
            self.url,
            self.addr,
            self.tls
                .map_or("1.2+1.3", TlsVersion::as_str),
            if self.schemes.is_empty() {
                "all".to_owned()
            } else {
                self.schemes.join(",")
            },
            if self.client_cert {
                ", client certificate (key on token)"
            } else {
                ""
            },
        );
        out += &format!(
            "load          concurrency {}, {:.1} s{}\nhandshakes    {}  ({:.1}/s)\n",
            self.concurrency,
            o.window.as_secs_f64(),
            if self.http {
                ", one HTTP/1.1 request each"
            } else {
                ""
            },
            o.handshakes,
            o.rate(),
        );
        out += &format!("latency       {}\n", latency_line(&o.handshake_us));
        if let Some(request) = &o.request_us {
            out += &format!("request       {}\n", latency_line(request));
        }
        if o.errors.is_empty() && self.warmup_errors == 0 {
            out += "errors        none\n";
        } else {
            out += &format!(
                "errors        {} (warm-up: {})\n",
                o.error_count(),
                self.warmup_errors
            );
            for (kind, n) in &o.errors {
                out += &format!("  {n:>9}  {kind}\n");
            }
        }
        out += &format!(
            "client CPU    {:.0} µs per handshake, {:.2} cores busy\n",
            self.cpu_per_handshake_us(),
            self.cpu_cores()
        );
        out
    }
}

fn quantiles(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "max": h.max(),
        "mean": h.mean(),
    })
}

fn latency_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "-".to_owned();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

/// `10s`, `500ms`, `2m`, `1.5s` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 10s, 500ms or 2m"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        _ => return Err(format!("unknown unit `{unit}` in `{text}`; use ms, s or m")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{text}`: {e}"))
}
