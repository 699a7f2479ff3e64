//! Counters an application can export: signatures, latency, pool use, errors, logins,
//! recoveries. Updating them costs a few relaxed atomic adds per signature.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rustls::SignatureScheme;
use serde::Serialize;

use crate::scheme::{all_schemes, scheme_name};

/// Outcomes a signature can have.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Outcome {
    Ok = 0,
    Failed = 1,
    VerifyFailed = 2,
    Refused = 3,
}

const OUTCOMES: usize = 4;
const SCHEMES: usize = 10;
/// Latency buckets: under 2^k microseconds for k in 0..LAT_BUCKETS, the last one open-ended.
const LAT_BUCKETS: usize = 24;

/// Live counters of one token and its keys.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    signatures: [[AtomicU64; OUTCOMES]; SCHEMES],
    latency_buckets: [AtomicU64; LAT_BUCKETS],
    latency_total_us: AtomicU64,
    latency_max_us: AtomicU64,
    pool_waits: AtomicU64,
    pool_timeouts: AtomicU64,
    logins: AtomicU64,
    guard_refusals: AtomicU64,
    retries: AtomicU64,
    reload_attempts: AtomicU64,
    reloads_ok: AtomicU64,
    fail_fast: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub(crate) fn signature(&self, scheme: SignatureScheme, outcome: Outcome) {
        if let Some(i) = scheme_index(scheme) {
            self.signatures[i][outcome as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn latency(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = (u64::BITS - us.leading_zeros()) as usize;
        self.latency_buckets[bucket.min(LAT_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.latency_total_us
            .fetch_add(us, Ordering::Relaxed);
        self.latency_max_us
            .fetch_max(us, Ordering::Relaxed);
    }

    pub(crate) fn error(&self, name: &str) {
        let mut errors = self
            .errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *errors
            .entry(name.to_owned())
            .or_default() += 1;
    }

    pub(crate) fn pool_wait(&self) {
        self.pool_waits
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn pool_timeout(&self) {
        self.pool_timeouts
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn login(&self) {
        self.logins
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn guard_refusal(&self) {
        self.guard_refusals
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn retry(&self) {
        self.retries
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reload_attempt(&self, ok: bool) {
        self.reload_attempts
            .fetch_add(1, Ordering::Relaxed);
        if ok {
            self.reloads_ok
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn fail_fast(&self) {
        self.fail_fast
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, pool: PoolSnapshot) -> StatsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut signatures = Vec::new();
        for (i, (scheme, _)) in all_schemes().into_iter().enumerate() {
            let row = &self.signatures[i];
            let counts = SchemeCounts {
                scheme: scheme_name(scheme),
                ok: load(&row[Outcome::Ok as usize]),
                failed: load(&row[Outcome::Failed as usize]),
                verify_failed: load(&row[Outcome::VerifyFailed as usize]),
                refused: load(&row[Outcome::Refused as usize]),
            };
            if counts.ok + counts.failed + counts.verify_failed + counts.refused > 0 {
                signatures.push(counts);
            }
        }
        let buckets: Vec<u64> = self
            .latency_buckets
            .iter()
            .map(load)
            .collect();
        let count: u64 = buckets.iter().sum();
        StatsSnapshot {
            signatures,
            sign_latency: LatencySnapshot {
                count,
                mean_us: load(&self.latency_total_us)
                    .checked_div(count)
                    .unwrap_or_default(),
                p50_us: quantile(&buckets, count, 0.50),
                p99_us: quantile(&buckets, count, 0.99),
                max_us: load(&self.latency_max_us),
            },
            pool,
            pool_waits: load(&self.pool_waits),
            pool_timeouts: load(&self.pool_timeouts),
            logins: load(&self.logins),
            guard_refusals: load(&self.guard_refusals),
            retries: load(&self.retries),
            reload_attempts: load(&self.reload_attempts),
            reloads_ok: load(&self.reloads_ok),
            fail_fast: load(&self.fail_fast),
            errors: self
                .errors
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        }
    }
}

/// A point-in-time copy of a token's counters.
#[derive(Clone, Debug, Serialize)]
pub struct StatsSnapshot {
    /// Handshake signatures by scheme and outcome (schemes never used are left out).
    pub signatures: Vec<SchemeCounts>,
    /// Time spent in the token per signature (checkout excluded).
    pub sign_latency: LatencySnapshot,
    /// The session pool now.
    pub pool: PoolSnapshot,
    /// Checkouts that found no idle session and had to wait.
    pub pool_waits: u64,
    /// Checkouts that gave up: the typed busy error.
    pub pool_timeouts: u64,
    /// `C_Login` calls made.
    pub logins: u64,
    /// Logins the lockout guard refused to attempt.
    pub guard_refusals: u64,
    /// Signatures retried once on a fresh session or after a new login.
    pub retries: u64,
    /// Module reloads attempted after token faults.
    pub reload_attempts: u64,
    /// Module reloads that brought the token back.
    pub reloads_ok: u64,
    /// Signatures refused at once while the token was unavailable.
    pub fail_fast: u64,
    /// PKCS#11 errors by return-code name (and our own error kinds).
    pub errors: BTreeMap<String, u64>,
}

/// Signature counts for one scheme.
#[derive(Clone, Debug, Serialize)]
pub struct SchemeCounts {
    /// The scheme, e.g. `ecdsa_secp256r1_sha256`.
    pub scheme: String,
    /// Signed, verified and released.
    pub ok: u64,
    /// The token or encoder failed.
    pub failed: u64,
    /// Signed but failed software verification; withheld.
    pub verify_failed: u64,
    /// Refused before reaching the token (busy, unavailable).
    pub refused: u64,
}

/// Sign latency summary; quantiles are upper bounds of power-of-two microsecond buckets.
#[derive(Clone, Debug, Serialize)]
pub struct LatencySnapshot {
    /// Signatures measured.
    pub count: u64,
    /// Mean, microseconds.
    pub mean_us: u64,
    /// Median (bucket upper bound), microseconds.
    pub p50_us: u64,
    /// 99th percentile (bucket upper bound), microseconds.
    pub p99_us: u64,
    /// Maximum, microseconds.
    pub max_us: u64,
}

/// The session pool's size and use.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PoolSnapshot {
    /// The cap: configured size limited by the token's session limits.
    pub max_size: u32,
    /// Sessions open in the pool.
    pub open: u32,
    /// Sessions checked out now.
    pub in_use: u32,
    /// True while the token is usable.
    pub available: bool,
}

fn scheme_index(scheme: SignatureScheme) -> Option<usize> {
    let i = all_schemes()
        .iter()
        .position(|(s, _)| *s == scheme)?;
    (i < SCHEMES).then_some(i)
}

fn quantile(buckets: &[u64], count: u64, q: f64) -> u64 {
    if count == 0 {
        return 0;
    }
    let target = ((count as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (k, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= target {
            return 1u64 << k;
        }
    }
    u64::MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_quantiles() {
        let stats = Stats::default();
        for _ in 0..99 {
            stats.latency(Duration::from_micros(100));
        }
        stats.latency(Duration::from_millis(10));
        stats.signature(SignatureScheme::ED25519, Outcome::Ok);
        stats.error("CKR_DEVICE_ERROR");
        let snap = stats.snapshot(PoolSnapshot::default());
        assert_eq!(snap.sign_latency.count, 100);
        assert_eq!(snap.sign_latency.p50_us, 128);
        assert_eq!(snap.sign_latency.max_us, 10_000);
        assert_eq!(snap.signatures.len(), 1);
        assert_eq!(snap.errors["CKR_DEVICE_ERROR"], 1);
    }
}
