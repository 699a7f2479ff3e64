//! Handshake benchmark: on one machine and one token, in one run, full TLS handshakes per second
//! and their latency with the key on the token (rustls-hsm), against the same example server
//! with the key in memory, against a direct `C_Sign` signer, and against the token's raw
//! signing rate; plus a slow token's behaviour under a handshake storm; and the report.
//!
//! `scripts/bench` runs all of it and writes docs/benchmarks.md. Subcommands:
//!
//! - `run`: the main measurement, to `results.json`;
//! - `slow`: the slow-token scenarios, to `slow.json`;
//! - `report`: tables and plots from those files.
//!
//! The servers run in this process on their own tokio runtime (the example server's accept loop,
//! TLS settings and HTTP service, from examples/tls_server/serve.rs); the load generator
//! (examples/handshake_load's engine) runs on another. Both runtimes and the token (SoftHSM is a
//! library) share the machine's CPUs, as a real server and its clients would not: the report
//! gives each side's CPU time per handshake.

// Shared with the handshake_load example, which uses parts this benchmark does not.
#[path = "../handshake_load/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "../handshake_load/cpu.rs"]
mod cpu;
mod direct;
#[path = "../handshake_load/engine.rs"]
#[allow(dead_code)]
mod engine;
mod plot;
mod raw;
mod report;
mod results;
mod run;
#[path = "../tls_server/serve.rs"]
#[allow(dead_code)] // the example's signal handling is not used here
mod serve;
mod server;
mod setup;
mod slow;
mod watch;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rustls_hsm::pin::PinSource;
use rustls_hsm::pkcs11::{Module, Token, TokenSelector};

use crate::setup::KeyType;

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "Handshake benchmark: rustls-hsm against in-memory, direct and raw signing")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure every configuration at every concurrency, in interleaved rounds.
    Run(RunOptions),
    /// Measure a slow token: requests on an open connection during a handshake storm.
    Slow(SlowOptions),
    /// Write the report (Markdown and SVG plots) from the JSON results.
    Report(ReportOptions),
}

/// The token to measure on.
#[derive(Debug, clap::Args)]
struct TokenOptions {
    /// The PKCS#11 module.
    #[arg(long, env = "RUSTLS_HSM_MODULE", value_name = "PATH")]
    module: PathBuf,
    /// The token: label, serial:SERIAL or a pkcs11: URI.
    #[arg(long, value_name = "SEL")]
    token: TokenSelector,
    /// Where to read the user PIN: env:NAME, file:PATH, cmd:COMMAND.
    #[arg(long, value_name = "SOURCE")]
    pin: PinSource,
    /// The PIN guard's state file.
    #[arg(long, value_name = "PATH")]
    guard_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RunOptions {
    #[command(flatten)]
    token: TokenOptions,
    /// Where results.json goes.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Key types, comma-separated: p256, rsa2048, ed25519.
    #[arg(long, value_delimiter = ',', default_value = "p256,rsa2048,ed25519")]
    keys: Vec<String>,
    /// Concurrencies, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// rustls-hsm pool sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pool_sizes: Vec<usize>,
    /// Rounds; each measures every configuration once, in rotated order.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measure only these configurations (raw-sign, in-memory, direct, hsm-pool4-verify,
    /// hsm-pool4-noverify, ...), e.g. to profile one.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Uncounted time before each point, in milliseconds.
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
    /// Counted time per point, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
}

#[derive(Debug, clap::Args)]
struct SlowOptions {
    #[command(flatten)]
    token: TokenOptions,
    /// Where slow.json goes.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// What the token is, in words, for the report.
    #[arg(long, default_value = "slow token")]
    token_name: String,
    /// The key's type, as rustls-hsm names it (ec:p256, rsa:4096, ...).
    #[arg(long, default_value = "ec:p256")]
    key_spec: String,
    /// rustls-hsm's pool size.
    #[arg(long, default_value_t = 1)]
    pool_size: usize,
    /// Handshakes in flight during the storm.
    #[arg(long, default_value_t = 64)]
    storm_concurrency: usize,
    /// Probe alone before the storm, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    idle_ms: u64,
    /// The storm's length, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    storm_ms: u64,
    /// Time between two probe requests, in milliseconds.
    #[arg(long, default_value_t = 20)]
    probe_interval_ms: u64,
}

#[derive(Debug, clap::Args)]
struct ReportOptions {
    /// The directory holding results.json (and slow.json); plots are written there.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The Markdown file to write.
    #[arg(long, value_name = "FILE")]
    doc: PathBuf,
    /// `name: value` lines about the machine and versions, as scripts/bench collects them.
    #[arg(long, value_name = "FILE")]
    environment: Option<PathBuf>,
    /// Hand-written analysis appended to the report.
    #[arg(long, value_name = "FILE")]
    notes: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match dispatch(args.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(options) => {
            let keys = options
                .keys
                .iter()
                .map(|k| KeyType::parse(k))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let args = run::RunArgs {
                guard_file: guard_file(&options.token, &options.out),
                module: options.token.module,
                token: options.token.token,
                pin: options.token.pin,
                keys,
                concurrency: options.concurrency,
                pool_sizes: options.pool_sizes,
                rounds: options.rounds.max(1),
                only: options.only,
                warmup: Duration::from_millis(options.warmup_ms),
                duration: Duration::from_millis(options.duration_ms),
            };
            let results = run::run(&args)?;
            write_json(&options.out.join("results.json"), &results)
        }
        Command::Slow(options) => {
            let args = slow::SlowArgs {
                guard_file: guard_file(&options.token, &options.out),
                module: options.token.module,
                token: options.token.token,
                pin: options.token.pin,
                token_name: options.token_name,
                key_spec: options.key_spec,
                pool_size: options.pool_size.max(1),
                storm_concurrency: options.storm_concurrency.max(1),
                idle: Duration::from_millis(options.idle_ms),
                storm: Duration::from_millis(options.storm_ms),
                probe_interval: Duration::from_millis(options.probe_interval_ms.max(1)),
            };
            let results = slow::run(&args)?;
            write_json(&options.out.join("slow.json"), &results)
        }
        Command::Report(options) => report::write(
            &options.out,
            &options.doc,
            options.environment.as_deref(),
            options.notes.as_deref(),
        ),
    }
}

fn guard_file(token: &TokenOptions, out: &Path) -> PathBuf {
    token
        .guard_file
        .clone()
        .unwrap_or_else(|| out.join("pin-guard.json"))
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Compact, with fractions cut to three decimals: the main run's records and latency curves
    // make a large file, and more digits than that are noise.
    let mut json = serde_json::to_value(value)?;
    round_floats(&mut json);
    let text = serde_json::to_string(&json)?;
    fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// Rounds every non-integer number in `value` to three decimals.
fn round_floats(value: &mut serde_json::Value) {
    use serde_json::Value;

    match value {
        Value::Number(n) if n.is_f64() => {
            if let Some(rounded) = n
                .as_f64()
                .map(|f| (f * 1000.0).round() / 1000.0)
                .and_then(serde_json::Number::from_f64)
            {
                *n = rounded;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(round_floats),
        Value::Object(fields) => fields
            .values_mut()
            .for_each(round_floats),
        _ => {}
    }
}

/// rustls-hsm's default pool size on this machine: twice the CPUs, at least 4.
pub(crate) fn default_pool_size() -> usize {
    (cpus() * 2).max(4)
}

/// The CPUs this process may use.
pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The load average line, e.g. `2.51 3.86 3.12`.
pub(crate) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// The time now, UTC, RFC 3339.
pub(crate) fn now_text() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

/// The module's own description and version (`C_GetInfo`).
pub(crate) fn library_text(module: &Module) -> String {
    match module.context().get_library_info() {
        Ok(info) => format!(
            "{} {} ({}, Cryptoki {})",
            info.library_description().trim(),
            info.library_version(),
            info.manufacturer_id().trim(),
            info.cryptoki_version()
        ),
        Err(e) => format!("unknown ({e})"),
    }
}

/// The token's label, manufacturer, model and firmware.
pub(crate) fn token_text(token: &Token) -> String {
    let info = &token.info;
    format!(
        "`{}`: {} {}, firmware {}",
        token.label,
        info.manufacturer_id()
            .trim_matches(|c: char| c == ' ' || c == '\0'),
        info.model()
            .trim_matches(|c: char| c == ' ' || c == '\0'),
        info.firmware_version()
    )
}
