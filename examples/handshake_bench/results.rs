//! What a benchmark run records, as written to and read from its JSON files.

use std::collections::BTreeMap;
use std::fmt;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::setup::KeyType;

/// One way of serving (or, for `RawSign`, of signing without TLS).
#[derive(Clone, Copy, Debug, Deserialize, Eq, Hash, Ord, PartialEq, PartialOrd, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Config {
    /// `C_Sign` in a loop, one pre-opened session per thread: the token's own limit.
    RawSign,
    /// The example server with a software key of the same type: the TLS stack's own limit.
    InMemory,
    /// The example server with the direct signer: the least PKCS#11 glue possible.
    Direct,
    /// The example server with rustls-hsm's `HsmKey`.
    Hsm {
        /// Pool size.
        pool: usize,
        /// Verify-before-release on.
        verify: bool,
    },
}

impl Config {
    /// A stable identifier: `raw-sign`, `in-memory`, `direct`, `hsm-pool4-verify`, ...
    pub(crate) fn id(self) -> String {
        match self {
            Self::RawSign => "raw-sign".into(),
            Self::InMemory => "in-memory".into(),
            Self::Direct => "direct".into(),
            Self::Hsm { pool, verify } => format!(
                "hsm-pool{pool}-{}",
                if verify { "verify" } else { "noverify" }
            ),
        }
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RawSign => f.write_str("raw C_Sign (signatures/s)"),
            Self::InMemory => f.write_str("in-memory key"),
            Self::Direct => f.write_str("direct signer"),
            Self::Hsm { pool, verify: true } => write!(f, "rustls-hsm, pool {pool}"),
            Self::Hsm {
                pool,
                verify: false,
            } => write!(f, "rustls-hsm, pool {pool}, no verify"),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub(crate) struct Quantiles {
    pub(crate) p50: u64,
    pub(crate) p90: u64,
    pub(crate) p99: u64,
    pub(crate) p999: u64,
    pub(crate) max: u64,
    pub(crate) mean: f64,
}

impl Quantiles {
    /// The histogram's percentiles (all zero when it is empty).
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// The latency distribution as (quantile, µs) points from 0 to 0.999, spaced evenly in
/// "nines", for plotting.
pub(crate) fn curve(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    (0..=60)
        .map(|i| {
            let nines = f64::from(i) * 0.05;
            let q = 1.0 - 10f64.powf(-nines);
            (q, h.value_at_quantile(q))
        })
        .collect()
}

/// The session pool as sampled during a point.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub(crate) struct PoolCheck {
    /// The pool's cap (configured size, limited by the token).
    pub(crate) cap: u32,
    /// Most sessions seen checked out at once.
    pub(crate) peak_in_use: u32,
    /// Most sessions seen open at once.
    pub(crate) peak_open: u32,
    /// Checkouts that waited for a session.
    pub(crate) waits: u64,
    /// Checkouts that gave up.
    pub(crate) timeouts: u64,
    /// rustls-hsm's sign latency median (power-of-two bucket bound), microseconds.
    pub(crate) sign_p50_us: u64,
}

impl PoolCheck {
    /// True when the pool stayed within its cap.
    pub(crate) fn within_cap(&self) -> bool {
        self.peak_in_use <= self.cap && self.peak_open <= self.cap
    }
}

/// One configuration measured once.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub(crate) struct Record {
    pub(crate) key: KeyType,
    pub(crate) concurrency: usize,
    pub(crate) config: Config,
    pub(crate) round: usize,
    /// Handshakes (or, raw, signatures) per second.
    pub(crate) rate: f64,
    pub(crate) count: u64,
    pub(crate) window_s: f64,
    pub(crate) latency_us: Quantiles,
    pub(crate) errors: BTreeMap<String, u64>,
    /// Server runtime CPU per handshake, microseconds.
    pub(crate) server_cpu_us: Option<f64>,
    /// Client runtime CPU per handshake, microseconds.
    pub(crate) client_cpu_us: Option<f64>,
    pub(crate) pool: Option<PoolCheck>,
}

/// A ratio between two configurations, paired round by round.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
pub(crate) struct Ratio {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Ratio {
    /// Median, min and max of `values` (`None` when empty).
    pub(crate) fn of(mut values: Vec<f64>) -> Option<Self> {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        Some(Self {
            median: median_sorted(&values),
            min: values[0],
            max: values[values.len() - 1],
        })
    }
}

/// The median of sorted values.
pub(crate) fn median_sorted(values: &[f64]) -> f64 {
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// One configuration against another at the same concurrency, paired round by round.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
pub(crate) struct Pairing {
    /// Handshakes per second, this over the other: what the targets are stated in.
    pub(crate) rate: Ratio,
    /// The other's CPU per handshake (server + client) over this one's: the rate ratio a
    /// machine saturated by this process would show. Steadier than `rate` on a shared machine.
    pub(crate) cpu_bound: Option<Ratio>,
    /// The other's server CPU per handshake over this one's: the rate ratio of a saturated
    /// server whose clients run elsewhere.
    pub(crate) server_cpu: Option<Ratio>,
}

/// One configuration at one concurrency over all rounds.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub(crate) struct Summary {
    pub(crate) key: KeyType,
    pub(crate) concurrency: usize,
    pub(crate) config: Config,
    /// Median rate over the rounds, and its spread.
    pub(crate) rate: Ratio,
    /// Latency over all rounds together.
    pub(crate) latency_us: Quantiles,
    /// The distribution, (quantile, µs).
    pub(crate) curve: Vec<(f64, u64)>,
    /// Against the direct signer.
    pub(crate) vs_direct: Option<Pairing>,
    /// Against the in-memory key.
    pub(crate) vs_in_memory: Option<Pairing>,
    /// Verify on against verify off at the same pool size.
    pub(crate) vs_no_verify: Option<Pairing>,
    pub(crate) errors: BTreeMap<String, u64>,
    /// Medians over the rounds.
    pub(crate) server_cpu_us: Option<f64>,
    pub(crate) client_cpu_us: Option<f64>,
    /// The worst round's pool figures.
    pub(crate) pool: Option<PoolCheck>,
}

/// About the run: what, where, how long.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub(crate) struct RunMeta {
    pub(crate) module: String,
    pub(crate) library: String,
    pub(crate) token: String,
    /// Mechanism used per key type, as rustls-hsm planned it.
    pub(crate) mechanisms: BTreeMap<String, String>,
    pub(crate) duration_s: f64,
    pub(crate) warmup_s: f64,
    pub(crate) rounds: usize,
    pub(crate) concurrency: Vec<usize>,
    pub(crate) pool_sizes: Vec<usize>,
    /// rustls-hsm's default pool size on this machine.
    pub(crate) default_pool: usize,
    pub(crate) cpus: usize,
    pub(crate) started: String,
    pub(crate) finished: String,
    pub(crate) loadavg_start: String,
    pub(crate) loadavg_end: String,
    pub(crate) seconds: f64,
}

/// Everything `run` writes.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub(crate) struct Results {
    pub(crate) meta: RunMeta,
    pub(crate) summaries: Vec<Summary>,
    pub(crate) records: Vec<Record>,
}

impl Results {
    /// The summary of `config` for `key` at `concurrency`.
    pub(crate) fn get(&self, key: KeyType, concurrency: usize, config: Config) -> Option<&Summary> {
        self.summaries
            .iter()
            .find(|s| s.key == key && s.concurrency == concurrency && s.config == config)
    }
}

/// One slow-token scenario: a probe on an established connection, idle and during a storm.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub(crate) struct SlowScenario {
    /// Which server: rustls-hsm, direct signer, in-memory.
    pub(crate) server: String,
    pub(crate) probe_idle_us: Quantiles,
    pub(crate) probe_idle_count: u64,
    pub(crate) probe_storm_us: Quantiles,
    pub(crate) probe_storm_count: u64,
    pub(crate) probe_curve_idle: Vec<(f64, u64)>,
    pub(crate) probe_curve_storm: Vec<(f64, u64)>,
    pub(crate) probe_errors: u64,
    pub(crate) storm_rate: f64,
    pub(crate) storm_handshake_us: Quantiles,
    pub(crate) storm_errors: BTreeMap<String, u64>,
    pub(crate) pool: Option<PoolCheck>,
}

/// Everything `slow` writes.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub(crate) struct SlowResults {
    /// What the slow token is, in words.
    pub(crate) token_name: String,
    pub(crate) module: String,
    pub(crate) library: String,
    pub(crate) token: String,
    pub(crate) key_spec: String,
    pub(crate) mechanism: String,
    pub(crate) pool_size: usize,
    pub(crate) storm_concurrency: usize,
    pub(crate) storm_s: f64,
    pub(crate) probe_interval_ms: u64,
    /// `C_Sign` on one session, for scale.
    pub(crate) sign_rate: f64,
    pub(crate) sign_us: Quantiles,
    pub(crate) scenarios: Vec<SlowScenario>,
    pub(crate) started: String,
    pub(crate) loadavg_start: String,
    pub(crate) loadavg_end: String,
}
