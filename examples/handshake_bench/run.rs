//! The main measurement: for each key type and concurrency, raw `C_Sign`, the example server
//! with the key in memory, with the direct signer, and with rustls-hsm at each pool size with
//! verify-before-release on and off, in interleaved rounds.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::ClientConfig;
use rustls_hsm::pin::PinSource;
use rustls_hsm::pkcs11::TokenSelector;
use rustls_hsm::pkcs11::{find_token, login_user, KeySelector, MechanismList, Module, Token};
use rustls_hsm::scheme::{Method, SchemePlan};
use rustls_hsm::HsmToken;

use crate::client::{self, ClientSpec, TlsVersion, Trust};
use crate::cpu::ThreadCpu;
use crate::direct::DirectKey;
use crate::engine::{self, new_histogram, Limit, LoadSpec};
use crate::raw::{self, RawKey};
use crate::results::{curve, median_sorted, Config, Quantiles, Ratio, Record};
use crate::results::{Pairing, Results, RunMeta, Summary};
use crate::server::RunningServer;
use crate::setup::{ensure_token_key, software_key, BenchCa, KeyType};
use crate::watch::PoolWatch;

/// The size of a TLS 1.3 CertificateVerify input with SHA-256: 64 spaces, the 33-byte context
/// string, a zero byte and the transcript hash. Raw signing signs this much.
const CERTIFICATE_VERIFY_LEN: usize = 64 + 33 + 1 + 32;

/// What to measure and against which token.
#[derive(Clone, Debug)]
pub(crate) struct RunArgs {
    pub(crate) module: PathBuf,
    pub(crate) token: TokenSelector,
    pub(crate) pin: PinSource,
    pub(crate) guard_file: PathBuf,
    pub(crate) keys: Vec<KeyType>,
    pub(crate) concurrency: Vec<usize>,
    pub(crate) pool_sizes: Vec<usize>,
    pub(crate) rounds: usize,
    /// Measure only the configurations with these ids (all when empty), e.g. to profile one.
    pub(crate) only: Vec<String>,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
}

/// Runs every point and summarises them.
pub(crate) fn run(args: &RunArgs) -> anyhow::Result<Results> {
    let started = Instant::now();
    let mut meta = RunMeta {
        started: crate::now_text(),
        loadavg_start: crate::loadavg(),
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        rounds: args.rounds,
        concurrency: args.concurrency.clone(),
        pool_sizes: args.pool_sizes.clone(),
        default_pool: crate::default_pool_size(),
        cpus: crate::cpus(),
        ..RunMeta::default()
    };
    let bench = Bench::open(args, &mut meta)?;
    let configs: Vec<Config> = configs(&args.pool_sizes)
        .into_iter()
        .filter(|c| args.only.is_empty() || args.only.contains(&c.id()))
        .collect();
    anyhow::ensure!(
        !configs.is_empty(),
        "--only names no configuration measured"
    );
    let total = args.rounds * args.keys.len() * args.concurrency.len() * configs.len();

    let mut records = Vec::new();
    let mut histograms: HashMap<(KeyType, usize, Config), Histogram<u64>> = HashMap::new();
    let mut done = 0;
    for round in 0..args.rounds {
        for (k, key) in bench.keys.iter().enumerate() {
            for (c, &concurrency) in args.concurrency.iter().enumerate() {
                // Each block starts at another configuration, so none is always first or last.
                let mut order = configs.clone();
                order.rotate_left((round + k + c) % configs.len());
                for config in order {
                    let (record, histogram) = bench.point(key, config, concurrency, round)?;
                    done += 1;
                    eprintln!(
                        "[{done:>4}/{total}] round {} {:<8} c={concurrency:<3} {:<34} {:>9.1}/s  \
                         p50 {:>8} µs  errors {}",
                        round + 1,
                        key.key_type.slug(),
                        config.to_string(),
                        record.rate,
                        record.latency_us.p50,
                        record.errors.values().sum::<u64>(),
                    );
                    let _ = histograms
                        .entry((key.key_type, concurrency, config))
                        .or_insert_with(new_histogram)
                        .add(&histogram);
                    records.push(record);
                }
            }
        }
    }
    drop(bench);

    meta.finished = crate::now_text();
    meta.loadavg_end = crate::loadavg();
    meta.seconds = started.elapsed().as_secs_f64();
    let summaries = summarize(&records, &histograms);
    Ok(Results {
        meta,
        summaries,
        records,
    })
}

/// Raw, in-memory, direct, then rustls-hsm at each pool size with verify on and off.
fn configs(pool_sizes: &[usize]) -> Vec<Config> {
    let mut configs = vec![Config::RawSign, Config::InMemory, Config::Direct];
    for &pool in pool_sizes {
        for verify in [true, false] {
            configs.push(Config::Hsm { pool, verify });
        }
    }
    configs
}

/// The token, its login, the client runtime and the keys, for the whole run.
struct Bench {
    module: Module,
    token: Token,
    args: RunArgs,
    client: tokio::runtime::Runtime,
    client_cpu: Arc<ThreadCpu>,
    keys: Vec<BenchKey>,
    /// Holds the login: PKCS#11 logs in per application while any session is open, so pools
    /// built and dropped point after point, and the direct signer's sessions, stay logged in.
    _login: cryptoki::session::Session,
}

/// One key type, ready to serve every way.
struct BenchKey {
    key_type: KeyType,
    label: String,
    raw: RawKey,
    /// The leaf certifying the token key.
    token_leaf: CertificateDer<'static>,
    in_memory: Arc<CertifiedKey>,
    direct: Arc<CertifiedKey>,
    client: Arc<ClientConfig>,
}

impl Bench {
    fn open(args: &RunArgs, meta: &mut RunMeta) -> anyhow::Result<Self> {
        let module = Module::load(&args.module)?;
        let token = find_token(&module, &args.token)?;
        let pin = args.pin.read("user PIN")?;
        let login = login_user(&module, &token, &pin)?;
        let mechanisms = MechanismList::read(&module, token.slot)?;
        let ca = BenchCa::new()?;
        meta.module = module.path().display().to_string();
        meta.library = crate::library_text(&module);
        meta.token = crate::token_text(&token);

        let mut keys = Vec::new();
        for &key_type in &args.keys {
            let key = BenchKey::prepare(&module, &token, &login, &mechanisms, &ca, key_type)?;
            meta.mechanisms
                .insert(key_type.slug().to_owned(), key.raw.method.to_string());
            keys.push(key);
        }

        let client_cpu = Arc::new(ThreadCpu::default());
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder
            .enable_all()
            .thread_name("bench-load");
        let client = client_cpu
            .hooks(&mut builder)
            .build()
            .context("starting the load runtime")?;
        Ok(Self {
            module,
            token,
            args: args.clone(),
            client,
            client_cpu,
            keys,
            _login: login,
        })
    }

    /// Measures one configuration once: its record and latency histogram.
    fn point(
        &self,
        key: &BenchKey,
        config: Config,
        concurrency: usize,
        round: usize,
    ) -> anyhow::Result<(Record, Histogram<u64>)> {
        let (certified, token) = match config {
            Config::RawSign => return self.raw_point(key, concurrency, round),
            Config::InMemory => (key.in_memory.clone(), None),
            Config::Direct => (key.direct.clone(), None),
            Config::Hsm { pool, verify } => {
                let token = HsmToken::builder()
                    .module(self.module.clone())
                    .token(TokenSelector::Serial(self.token.serial.clone()))
                    .pin(self.args.pin.clone())
                    .pin_guard_file(&self.args.guard_file)
                    .pool_size(pool)
                    .insecure_skip_verify_before_release(!verify)
                    .build()?;
                let hsm_key = token.key(&KeySelector::label(&key.label))?;
                let certified = hsm_key.certified_key(vec![key.token_leaf.clone()])?;
                (certified, Some(token))
            }
        };
        let server = RunningServer::start(certified)?;
        let watch = PoolWatch::start(token.as_ref());

        let spec = LoadSpec {
            addr: server.addr,
            server_name: ServerName::try_from("localhost")?.to_owned(),
            config: key.client.clone(),
            concurrency,
            limit: Limit::Duration(self.args.warmup),
            request: None,
            timeout: Duration::from_secs(10),
            progress: false,
        };
        let warm = self
            .client
            .block_on(engine::run(spec.clone()));
        let (server_before, client_before) = (server.cpu.total(), self.client_cpu.total());
        let outcome = self
            .client
            .block_on(engine::run(LoadSpec {
                limit: Limit::Duration(self.args.duration),
                ..spec
            }));
        let server_cpu = server
            .cpu
            .total()
            .saturating_sub(server_before);
        let client_cpu = self
            .client_cpu
            .total()
            .saturating_sub(client_before);
        server.stop()?;
        let pool = watch.finish();
        drop(token);

        let mut errors = outcome.errors.clone();
        for (kind, n) in warm.errors {
            *errors
                .entry(format!("warm-up: {kind}"))
                .or_default() += n;
        }
        if let Some(pool) = &pool {
            if pool.timeouts > 0 {
                *errors
                    .entry("pool checkout timeouts".into())
                    .or_default() += pool.timeouts;
            }
        }
        let done = (outcome.handshakes + outcome.tail).max(1) as f64;
        let record = Record {
            key: key.key_type,
            concurrency,
            config,
            round,
            rate: outcome.rate(),
            count: outcome.handshakes,
            window_s: outcome.window.as_secs_f64(),
            latency_us: Quantiles::of(&outcome.handshake_us),
            errors,
            server_cpu_us: Some(server_cpu.as_secs_f64() * 1e6 / done),
            client_cpu_us: Some(client_cpu.as_secs_f64() * 1e6 / done),
            pool,
        };
        Ok((record, outcome.handshake_us))
    }

    /// Raw `C_Sign` at `concurrency` threads, one session each.
    fn raw_point(
        &self,
        key: &BenchKey,
        concurrency: usize,
        round: usize,
    ) -> anyhow::Result<(Record, Histogram<u64>)> {
        let message = [0x20u8; CERTIFICATE_VERIFY_LEN];
        let outcome = raw::measure(
            &key.raw,
            &message,
            concurrency,
            self.args.warmup,
            self.args.duration,
        )?;
        let record = Record {
            key: key.key_type,
            concurrency,
            config: Config::RawSign,
            round,
            rate: outcome.rate(),
            count: outcome.signatures,
            window_s: outcome.window.as_secs_f64(),
            latency_us: Quantiles::of(&outcome.latency_us),
            errors: outcome.errors,
            server_cpu_us: None,
            client_cpu_us: None,
            pool: None,
        };
        Ok((record, outcome.latency_us))
    }
}

impl BenchKey {
    fn prepare(
        module: &Module,
        token: &Token,
        session: &cryptoki::session::Session,
        mechanisms: &MechanismList,
        ca: &BenchCa,
        key_type: KeyType,
    ) -> anyhow::Result<Self> {
        let label = format!("bench-{}", key_type.slug());
        let object = ensure_token_key(session, token, &label, key_type.spec())?;
        let scheme = key_type.scheme();
        let method: Method = SchemePlan::for_key(object.kind, mechanisms)
            .method(scheme)
            .with_context(|| {
                format!(
                    "token {} cannot sign {scheme:?} with a {} key",
                    token.describe(),
                    object.kind
                )
            })?;
        let direct = DirectKey::new(
            module.clone(),
            token.slot,
            object.private,
            object.kind,
            scheme,
            method,
            object.spki.clone(),
        )?;
        let direct: Arc<dyn SigningKey> = Arc::new(direct);
        let client = client::client_config(ClientSpec {
            version: Some(TlsVersion::Tls13),
            schemes: vec![scheme],
            trust: Trust::Roots(ca.roots()?),
            client_cert: None,
        })?;
        Ok(Self {
            key_type,
            raw: RawKey {
                module: module.clone(),
                slot: token.slot,
                handle: object.private,
                method,
            },
            token_leaf: ca.leaf(&object.spki)?,
            in_memory: ca.certify(software_key(key_type)?)?,
            direct: ca.certify(direct)?,
            client,
            label,
        })
    }
}

/// Medians, merged latencies and round-paired ratios per configuration.
fn summarize(
    records: &[Record],
    histograms: &HashMap<(KeyType, usize, Config), Histogram<u64>>,
) -> Vec<Summary> {
    let mut groups: BTreeMap<(KeyType, usize, Config), Vec<&Record>> = BTreeMap::new();
    for record in records {
        groups
            .entry((record.key, record.concurrency, record.config))
            .or_default()
            .push(record);
    }
    let paired = |group: &[&Record], other: Config| pair(records, group, other);

    let mut summaries = Vec::new();
    for ((key, concurrency, config), group) in &groups {
        let empty = new_histogram();
        let histogram = histograms
            .get(&(*key, *concurrency, *config))
            .unwrap_or(&empty);
        let is_server = *config != Config::RawSign;
        let mut errors = BTreeMap::new();
        for record in group {
            for (kind, n) in &record.errors {
                *errors.entry(kind.clone()).or_default() += n;
            }
        }
        let pool = group
            .iter()
            .filter_map(|r| r.pool.clone())
            .max_by_key(|p| (p.peak_in_use.saturating_sub(p.cap), p.peak_open, p.timeouts));
        summaries.push(Summary {
            key: *key,
            concurrency: *concurrency,
            config: *config,
            rate: Ratio::of(group.iter().map(|r| r.rate).collect()).unwrap_or(Ratio {
                median: 0.0,
                min: 0.0,
                max: 0.0,
            }),
            latency_us: Quantiles::of(histogram),
            curve: curve(histogram),
            vs_direct: is_server
                .then(|| paired(group, Config::Direct))
                .flatten(),
            vs_in_memory: is_server
                .then(|| paired(group, Config::InMemory))
                .flatten(),
            vs_no_verify: match config {
                Config::Hsm { pool, verify: true } => paired(
                    group,
                    Config::Hsm {
                        pool: *pool,
                        verify: false,
                    },
                ),
                _ => None,
            },
            errors,
            server_cpu_us: median_of(
                group
                    .iter()
                    .filter_map(|r| r.server_cpu_us),
            ),
            client_cpu_us: median_of(
                group
                    .iter()
                    .filter_map(|r| r.client_cpu_us),
            ),
            pool,
        });
    }
    summaries
}

/// `group` (one configuration's rounds) against `other` at the same key, concurrency and round.
fn pair(records: &[Record], group: &[&Record], other: Config) -> Option<Pairing> {
    let mut rate = Vec::new();
    let mut cpu_bound = Vec::new();
    let mut server_cpu = Vec::new();
    for this in group {
        let Some(base) = records.iter().find(|r| {
            r.key == this.key
                && r.concurrency == this.concurrency
                && r.config == other
                && r.round == this.round
        }) else {
            continue;
        };
        rate.push(this.rate / base.rate);
        if let (Some(s), Some(c), Some(bs), Some(bc)) = (
            this.server_cpu_us,
            this.client_cpu_us,
            base.server_cpu_us,
            base.client_cpu_us,
        ) {
            cpu_bound.push((bs + bc) / (s + c));
            server_cpu.push(bs / s);
        }
    }
    Some(Pairing {
        rate: Ratio::of(rate)?,
        cpu_bound: Ratio::of(cpu_bound),
        server_cpu: Ratio::of(server_cpu),
    })
}

fn median_of(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(median_sorted(&values))
}
