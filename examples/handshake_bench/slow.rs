//! Slow-token behaviour: while a storm of handshakes queues on a slow token, does a client with
//! an established connection still get answers promptly?
//!
//! A probe opens one connection (HTTP/1.1, kept alive) and sends `GET /healthz` at a fixed
//! interval, first with the server idle, then during a handshake storm. The same is done with
//! rustls-hsm, with the direct signer (which signs on the runtime's worker threads, as naive
//! signers do) and with the key in memory.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::ClientConfig;
use rustls_hsm::pin::PinSource;
use rustls_hsm::pkcs11::TokenSelector;
use rustls_hsm::pkcs11::{find_token, login_user, KeySelector, MechanismList, Module};
use rustls_hsm::scheme::{is_pkcs1, SchemePlan};
use rustls_hsm::HsmToken;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::client::{self, ClientSpec, TlsVersion, Trust};
use crate::direct::DirectKey;
use crate::engine::{self, new_histogram, record, Limit, LoadSpec};
use crate::raw::{self, RawKey};
use crate::results::{curve, Quantiles, SlowResults, SlowScenario};
use crate::server::RunningServer;
use crate::setup::{ensure_token_key, software_key_of, BenchCa};
use crate::watch::PoolWatch;

const IDLE: u8 = 0;
const STORM: u8 = 1;
const DONE: u8 = 2;

/// The slow token and the storm.
#[derive(Clone, Debug)]
pub(crate) struct SlowArgs {
    pub(crate) module: std::path::PathBuf,
    pub(crate) token: TokenSelector,
    pub(crate) pin: PinSource,
    pub(crate) guard_file: std::path::PathBuf,
    /// What the token is, in words, for the report.
    pub(crate) token_name: String,
    pub(crate) key_spec: String,
    pub(crate) pool_size: usize,
    pub(crate) storm_concurrency: usize,
    pub(crate) idle: Duration,
    pub(crate) storm: Duration,
    pub(crate) probe_interval: Duration,
}

/// Runs the three scenarios.
pub(crate) fn run(args: &SlowArgs) -> anyhow::Result<SlowResults> {
    let started = crate::now_text();
    let loadavg_start = crate::loadavg();
    let module = Module::load(&args.module)?;
    let token = find_token(&module, &args.token)?;
    let pin = args.pin.read("user PIN")?;
    let login = login_user(&module, &token, &pin)?;
    let mechanisms = MechanismList::read(&module, token.slot)?;
    let ca = BenchCa::new()?;

    let label = format!("bench-slow-{}", args.key_spec.replace(':', "-"));
    let object = ensure_token_key(&login, &token, &label, &args.key_spec)?;
    let (scheme, method) = SchemePlan::for_key(object.kind, &mechanisms)
        .usable()
        .find(|(s, _)| !is_pkcs1(*s))
        .with_context(|| format!("the token cannot serve TLS 1.3 with a {} key", object.kind))?;
    eprintln!("slow token: C_Sign for 2 s on one session");
    let raw_key = RawKey {
        module: module.clone(),
        slot: token.slot,
        handle: object.private,
        method,
    };
    let sign = raw::measure(
        &raw_key,
        &[0x20; 130],
        1,
        Duration::from_millis(200),
        Duration::from_secs(2),
    )?;

    let client = client::client_config(ClientSpec {
        version: Some(TlsVersion::Tls13),
        schemes: vec![scheme],
        trust: Trust::Roots(ca.roots()?),
        client_cert: None,
    })?;
    let load = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-storm")
        .build()?;
    let leaf = ca.leaf(&object.spki)?;

    let mut scenarios = Vec::new();
    let hsm_token = HsmToken::builder()
        .module(module.clone())
        .token(TokenSelector::Serial(token.serial.clone()))
        .pin(args.pin.clone())
        .pin_guard_file(&args.guard_file)
        .pool_size(args.pool_size)
        .build()?;
    let hsm_key = hsm_token.key(&KeySelector::label(&label))?;
    let certified = hsm_key.certified_key(vec![leaf.clone()])?;
    let name = format!("rustls-hsm (pool {})", args.pool_size);
    scenarios.push(scenario(
        &name,
        certified,
        Some(&hsm_token),
        &client,
        args,
        &load,
    )?);
    drop(hsm_key);
    drop(hsm_token);

    let direct: Arc<dyn SigningKey> = Arc::new(DirectKey::new(
        module.clone(),
        token.slot,
        object.private,
        object.kind,
        scheme,
        method,
        object.spki.clone(),
    )?);
    let certified = Arc::new(CertifiedKey::new(vec![leaf], direct));
    scenarios.push(scenario(
        "direct signer (C_Sign on the worker thread)",
        certified,
        None,
        &client,
        args,
        &load,
    )?);

    let certified = ca.certify(software_key_of(object.kind)?)?;
    scenarios.push(scenario(
        "in-memory key",
        certified,
        None,
        &client,
        args,
        &load,
    )?);
    load.shutdown_timeout(Duration::from_secs(2));
    drop(login);

    Ok(SlowResults {
        token_name: args.token_name.clone(),
        module: module.path().display().to_string(),
        library: crate::library_text(&module),
        token: crate::token_text(&token),
        key_spec: args.key_spec.clone(),
        mechanism: method.to_string(),
        pool_size: args.pool_size,
        storm_concurrency: args.storm_concurrency,
        storm_s: args.storm.as_secs_f64(),
        probe_interval_ms: u64::try_from(args.probe_interval.as_millis()).unwrap_or(u64::MAX),
        sign_rate: sign.rate(),
        sign_us: Quantiles::of(&sign.latency_us),
        scenarios,
        started,
        loadavg_start,
        loadavg_end: crate::loadavg(),
    })
}

/// One server: probe alone, then probe during the storm.
fn scenario(
    name: &str,
    certified: Arc<CertifiedKey>,
    token: Option<&HsmToken>,
    client: &Arc<ClientConfig>,
    args: &SlowArgs,
    load: &tokio::runtime::Runtime,
) -> anyhow::Result<SlowScenario> {
    eprintln!("slow token: {name}");
    let server = RunningServer::start(certified)?;
    let watch = PoolWatch::start(token);
    let probe = Probe::start(server.addr, client.clone(), args.probe_interval)?;
    thread::sleep(args.idle);

    probe
        .phase
        .store(STORM, Ordering::Release);
    let storm = load.block_on(engine::run(LoadSpec {
        addr: server.addr,
        server_name: ServerName::try_from("localhost")?.to_owned(),
        config: client.clone(),
        concurrency: args.storm_concurrency,
        limit: Limit::Duration(args.storm),
        request: None,
        timeout: Duration::from_secs(60),
        progress: false,
    }));
    probe
        .phase
        .store(DONE, Ordering::Release);
    let tally = probe.finish()?;
    server.stop()?;
    let pool = watch.finish();

    Ok(SlowScenario {
        server: name.to_owned(),
        probe_idle_us: Quantiles::of(&tally.idle),
        probe_idle_count: tally.idle.len(),
        probe_storm_us: Quantiles::of(&tally.storm),
        probe_storm_count: tally.storm.len(),
        probe_curve_idle: curve(&tally.idle),
        probe_curve_storm: curve(&tally.storm),
        probe_errors: tally.errors,
        storm_rate: storm.rate(),
        storm_handshake_us: Quantiles::of(&storm.handshake_us),
        storm_errors: storm.errors,
        pool,
    })
}

/// Request latencies on the established connection, by phase.
struct ProbeTally {
    idle: Histogram<u64>,
    storm: Histogram<u64>,
    errors: u64,
}

/// The probe client: its own thread and single-threaded runtime, so the storm's client work
/// does not delay it.
struct Probe {
    phase: Arc<AtomicU8>,
    thread: thread::JoinHandle<anyhow::Result<ProbeTally>>,
}

impl Probe {
    /// Connects (one handshake) and starts probing; returns once the connection is up.
    fn start(
        addr: std::net::SocketAddr,
        config: Arc<ClientConfig>,
        interval: Duration,
    ) -> anyhow::Result<Self> {
        let phase = Arc::new(AtomicU8::new(IDLE));
        let (ready, connected) = mpsc::channel();
        let flag = phase.clone();
        let thread = thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(probe(addr, config, interval, flag, ready))
        });
        match connected.recv_timeout(Duration::from_secs(30)) {
            Ok(()) => Ok(Self { phase, thread }),
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e.context("the probe could not connect")),
                _ => bail!("the probe could not connect within 30 s"),
            },
        }
    }

    fn finish(self) -> anyhow::Result<ProbeTally> {
        self.phase
            .store(DONE, Ordering::Release);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
    }
}

async fn probe(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
    interval: Duration,
    phase: Arc<AtomicU8>,
    ready: mpsc::Sender<()>,
) -> anyhow::Result<ProbeTally> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let tls = TlsConnector::from(config)
        .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
        .await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let _ = ready.send(());

    let mut tally = ProbeTally {
        idle: new_histogram(),
        storm: new_histogram(),
        errors: 0,
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = phase.load(Ordering::Acquire);
        if now == DONE {
            return Ok(tally);
        }
        let began = Instant::now();
        let request = Request::get("/healthz")
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())?;
        let answered = match sender.send_request(request).await {
            Ok(response) => response
                .into_body()
                .collect()
                .await
                .is_ok(),
            Err(_) => false,
        };
        if !answered {
            tally.errors += 1;
            return Ok(tally);
        }
        let histogram = if now == IDLE {
            &mut tally.idle
        } else {
            &mut tally.storm
        };
        record(histogram, began.elapsed());
    }
}
