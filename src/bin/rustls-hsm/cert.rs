//! `rustls-hsm cert`: certificates and requests for keys on a token, signed on the token.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use rustls_hsm::cert::{self, CertProfile, CertUsage, Subject, SubjectAltName};
use rustls_hsm::pkcs11::{KeySelector, Module};
use rustls_hsm::{HsmKey, HsmToken};

use crate::common::LoginArgs;

/// The `cert` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum CertCommand {
    /// Make a PKCS#10 certificate signing request for a key, signed on the token.
    Csr {
        #[command(flatten)]
        login: LoginArgs,
        /// The key: its label, `id:HEX` or a `pkcs11:` URI.
        #[arg(long)]
        key: KeySelector,
        #[command(flatten)]
        names: NameArgs,
        /// Write the request here (PEM) instead of to stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Print the certificate chain of a key stored on the token (PEM, leaf first).
    Export {
        #[command(flatten)]
        login: LoginArgs,
        /// The key: its label, `id:HEX` or a `pkcs11:` URI.
        #[arg(long)]
        key: KeySelector,
        /// Write the chain here instead of to stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Issue a certificate with a CA key on the token, for a CSR or another key on the token.
    Issue(IssueArgs),
    /// Make a self-signed certificate for a key, signed on the token.
    SelfSigned {
        #[command(flatten)]
        login: LoginArgs,
        /// The key: its label, `id:HEX` or a `pkcs11:` URI.
        #[arg(long)]
        key: KeySelector,
        #[command(flatten)]
        names: NameArgs,
        #[command(flatten)]
        usage: UsageArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// Options of `cert issue`.
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("subject_key").required(true).args(["csr", "key"]))]
pub(crate) struct IssueArgs {
    #[command(flatten)]
    login: LoginArgs,
    /// The CA's key on the token.
    #[arg(long)]
    ca_key: KeySelector,
    /// The CA's certificate (PEM); it must hold the CA key's public key.
    #[arg(long, value_name = "FILE")]
    ca_cert: PathBuf,
    /// A PKCS#10 request (PEM) to certify; its subject and alternative names are kept.
    #[arg(long, value_name = "FILE")]
    csr: Option<PathBuf>,
    /// Certify this key on the same token instead of a request (needs --subject).
    #[arg(long, conflicts_with = "csr")]
    key: Option<KeySelector>,
    /// Subject and alternative names, for --key.
    #[command(flatten)]
    names: OptionalNameArgs,
    #[command(flatten)]
    usage: UsageArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Subject and alternative names.
#[derive(Debug, clap::Args)]
pub(crate) struct NameArgs {
    /// The subject, e.g. `CN=www.example.com,O=Example` (types CN, O, OU, C, ST, L).
    #[arg(long)]
    subject: Subject,
    /// A subject alternative name: DNS:name, IP:address, EMAIL:address or URI:uri; repeatable.
    #[arg(long = "san", value_name = "SAN")]
    sans: Vec<SubjectAltName>,
}

/// Subject and alternative names where a CSR may supply them instead.
#[derive(Debug, clap::Args)]
pub(crate) struct OptionalNameArgs {
    /// The subject, e.g. `CN=www.example.com,O=Example` (types CN, O, OU, C, ST, L).
    #[arg(long, conflicts_with = "csr")]
    subject: Option<Subject>,
    /// A subject alternative name: DNS:name, IP:address, EMAIL:address or URI:uri; repeatable.
    #[arg(long = "san", value_name = "SAN", conflicts_with = "csr")]
    sans: Vec<SubjectAltName>,
}

/// What the certificate is for, and for how long.
#[derive(Debug, clap::Args)]
pub(crate) struct UsageArgs {
    /// A TLS client certificate (clientAuth) instead of a server one (serverAuth).
    #[arg(long, conflicts_with = "ca")]
    client: bool,
    /// A CA certificate (keyCertSign, path length 0) instead of a server one.
    #[arg(long)]
    ca: bool,
    /// Validity in days from now.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

impl UsageArgs {
    fn usage(&self) -> CertUsage {
        if self.ca {
            CertUsage::Ca
        } else if self.client {
            CertUsage::Client
        } else {
            CertUsage::Server
        }
    }
}

/// Where the certificate goes.
#[derive(Debug, clap::Args)]
pub(crate) struct OutputArgs {
    /// Write the certificate here (PEM) instead of to stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Also store it on the token next to its key (same CKA_ID and label).
    #[arg(long)]
    store_on_token: bool,
    /// With --store-on-token, replace certificates already stored for the key.
    #[arg(long, requires = "store_on_token")]
    replace: bool,
}

/// Runs a `cert` subcommand.
pub(crate) fn run(module: &Module, command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Csr {
            login,
            key,
            names,
            out,
        } => with_token(module, &login, |token| {
            let key = token.key(&key)?;
            let request = cert::csr(&key, &names.subject, &names.sans)?;
            emit(
                out.as_deref(),
                &cert::csr_to_pem(&request),
                "certificate request",
            )
        }),
        CertCommand::Export { login, key, out } => with_token(module, &login, |token| {
            let key = token.key(&key)?;
            let chain =
                token.with_session(|session| cert::load_chain(session, key.id(), key.spki()))??;
            emit(
                out.as_deref(),
                &cert::chain_to_pem(&chain),
                "certificate chain",
            )
        }),
        CertCommand::Issue(args) => with_token(module, &args.login, |token| issue(token, &args)),
        CertCommand::SelfSigned {
            login,
            key,
            names,
            usage,
            output,
        } => with_token(module, &login, |token| {
            let key = token.key(&key)?;
            let profile = CertProfile::new(usage.usage(), names.subject)
                .sans(names.sans)
                .days(usage.days)?;
            let issued = cert::self_signed(&key, &profile)?;
            finish(token, &key, &issued, &output)
        }),
    }
}

fn issue(token: &HsmToken, args: &IssueArgs) -> anyhow::Result<()> {
    let ca_key = token.key(&args.ca_key)?;
    let ca_pem = read(&args.ca_cert)?;
    let ca_cert = cert::chain_from_pem(&ca_pem)
        .with_context(|| format!("in {}", args.ca_cert.display()))?
        .into_iter()
        .next()
        .context("the CA certificate file is empty")?;
    let usage = args.usage.usage();
    if let Some(path) = &args.csr {
        if args.output.store_on_token {
            bail!("--store-on-token needs --key: a CSR's key is not on this token");
        }
        let request =
            cert::csr_from_pem(&read(path)?).with_context(|| format!("in {}", path.display()))?;
        let issued = cert::issue_from_csr(&ca_key, &ca_cert, &request, usage, args.usage.days)?;
        return emit(
            args.output.out.as_deref(),
            &cert::chain_to_pem(&[issued]),
            "certificate",
        );
    }
    let selector = args
        .key
        .as_ref()
        .context("give --csr FILE or --key KEY")?;
    let subject = args
        .names
        .subject
        .clone()
        .context("--key needs --subject (a CSR would carry it)")?;
    let key = token.key(selector)?;
    let profile = CertProfile::new(usage, subject)
        .sans(args.names.sans.clone())
        .days(args.usage.days)?;
    let issued = cert::issue(&ca_key, &ca_cert, key.spki(), &profile)?;
    finish(token, &key, &issued, &args.output)
}

/// Writes the certificate out and, if asked, stores it on the token.
fn finish(
    token: &HsmToken,
    key: &HsmKey,
    issued: &rustls::pki_types::CertificateDer<'static>,
    output: &OutputArgs,
) -> anyhow::Result<()> {
    if output.store_on_token {
        token.with_session(|session| {
            cert::store_certificate(session, key.label(), key.id(), issued, output.replace)
        })??;
        eprintln!(
            "stored the certificate on the token with key `{}` (id {})",
            key.label(),
            hex::encode(key.id())
        );
    }
    emit(
        output.out.as_deref(),
        &cert::chain_to_pem(std::slice::from_ref(issued)),
        "certificate",
    )
}

/// Logs in through the session pool, runs `f`, then closes the sessions.
fn with_token(
    module: &Module,
    login: &LoginArgs,
    f: impl FnOnce(&HsmToken) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let token = HsmToken::builder()
        .module(module.clone())
        .token(login.token.clone())
        .pin(login.pin.clone())
        .pool_size(1)
        .build()?;
    let result = f(&token);
    token.shutdown()?;
    result
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Prints PEM to stdout, or writes it to `out`.
fn emit(out: Option<&Path>, pem: &str, what: &str) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            fs::write(path, pem).with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote the {what} to {}", path.display());
        }
        None => out!("{pem}"),
    }
    Ok(())
}
