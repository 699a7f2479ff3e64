//! `rustls-hsm`: the operator's tool for PKCS#11 tokens and the signing keys rustls-hsm uses.

/// `println!` that returns an error instead of panicking when stdout is closed early, as in
/// `rustls-hsm key list | head`; `main` then exits quietly.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// `print!` that returns an error instead of panicking when stdout is closed early.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?
    }};
}

mod backup;
mod cert;
mod common;
mod doctor;
mod kek;
mod key;
mod selftest;
mod token;

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rustls_hsm::pkcs11::Module;
use tracing_subscriber::EnvFilter;

/// Manage PKCS#11 tokens and keys for rustls-hsm, and check what a token can serve.
///
/// PINs are never given directly: every PIN option takes a source, env:NAME, file:PATH,
/// cmd:COMMAND or prompt.
#[derive(Debug, Parser)]
#[command(name = "rustls-hsm", version)]
struct Cli {
    #[command(flatten)]
    global: common::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Back a key up under a key-encryption key, restore it, or check a backup.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Make self-signed certificates, CSRs and CA-issued certificates signed on the token.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Report the module, its slots and tokens, and the TLS signature schemes they can serve.
    Doctor(doctor::DoctorArgs),
    /// Make the key-encryption key for backups: on one token, or split among custodians.
    #[command(subcommand)]
    Kek(kek::KekCommand),
    /// Generate, import, list, show and delete signing keys.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// List and initialise tokens; change or reset the user PIN.
    #[command(subcommand)]
    Token(token::TokenCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(log_filter())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", common::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// True when the reader of our output went away (`| head`): not an error worth reporting.
pub(crate) fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `RUST_LOG`, default `warn`; cryptoki's error for every mechanism it cannot name is silenced
/// unless `RUST_LOG` asks for cryptoki by name.
fn log_filter() -> EnvFilter {
    let wanted = std::env::var("RUST_LOG").unwrap_or_default();
    let filter = match EnvFilter::try_new(&wanted) {
        Ok(filter) if !wanted.trim().is_empty() => filter,
        _ => EnvFilter::new("warn"),
    };
    if wanted.contains("cryptoki") {
        return filter;
    }
    match "cryptoki::mechanism=off".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let module = cli.global.module.as_deref();
    match cli.command {
        Command::Backup(command) => with_module(module, |m| backup::run(m, command)),
        Command::Cert(command) => with_module(module, |m| cert::run(m, command)),
        // Doctor loads the module itself: with --json, a module that fails to load is reported
        // in its JSON too.
        Command::Doctor(args) => doctor::run(module, &args),
        Command::Kek(command) => with_module(module, |m| kek::run(m, command)),
        Command::Key(command) => with_module(module, |m| key::run(m, command)),
        Command::Token(command) => with_module(module, |m| token::run(m, command)),
    }
}

/// Loads the module, runs `command` with it and then finalizes it.
pub(crate) fn with_module(
    path: Option<&Path>,
    command: impl FnOnce(&Module) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let module = Module::load_from(path)?;
    let result = command(&module);
    // Every session is closed by now; finalize before exit rather than in a destructor.
    let finalized = module.finalize();
    result?;
    Ok(finalized?)
}
