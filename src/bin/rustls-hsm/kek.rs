//! `rustls-hsm kek`: make the key-encryption key that wraps backups, on one token or by a
//! custodian ceremony for two.

use std::path::PathBuf;

use clap::Subcommand;
use rustls_hsm::backup::{create_kek, import_kek_from_shares, kek_ceremony, KekObject};
use rustls_hsm::pin::PinSource;
use rustls_hsm::pkcs11::{find_token, Module, Token};

use crate::common::{read_pin, LoginArgs, PinSourceParser};

/// The `kek` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum KekCommand {
    /// Make a new KEK from the token's random generator, split it into custodian shares and
    /// import it; the plaintext exists only in this process's memory and on the token.
    Ceremony {
        #[command(flatten)]
        args: KekArgs,
        /// How many custodian shares to make (N, at most 255).
        #[arg(long, value_name = "N")]
        shares: u8,
        /// How many shares rebuild the KEK (M, at least 2).
        #[arg(long, value_name = "M")]
        threshold: u8,
        /// Where to write the share files, one per custodian (created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
    /// Generate a KEK on this token only; it never leaves it (single-HSM backups).
    Create(KekArgs),
    /// Rebuild a KEK from custodian share files and import it into this token.
    Import {
        #[command(flatten)]
        args: KekArgs,
        /// A custodian's share file; repeat for as many as the threshold.
        #[arg(long = "share", value_name = "FILE", required = true)]
        shares: Vec<PathBuf>,
    },
}

/// Options every `kek` command takes.
#[derive(Debug, clap::Args)]
pub(crate) struct KekArgs {
    #[command(flatten)]
    login: LoginArgs,
    /// Where to read the SO PIN: only the security officer can mark a key trusted.
    #[arg(long, value_name = "SOURCE", value_parser = PinSourceParser, allow_hyphen_values = true)]
    so_pin: PinSource,
    /// The KEK's label (unique among the token's secret keys).
    #[arg(long)]
    label: String,
}

/// Runs a `kek` subcommand.
pub(crate) fn run(module: &Module, command: KekCommand) -> anyhow::Result<()> {
    match command {
        KekCommand::Ceremony {
            args,
            shares,
            threshold,
            out_dir,
        } => {
            let (token, pin, so_pin) = args.open(module)?;
            let done = kek_ceremony(
                module,
                &token,
                &pin,
                &so_pin,
                &args.label,
                shares,
                threshold,
                &out_dir,
            )?;
            print_kek(&token, &done.kek, "created")?;
            outln!("check value: {}", done.check_value);
            outln!(
                "{} shares written, any {threshold} of which rebuild the KEK; give each file to \
                 one custodian:",
                done.files.len()
            );
            for file in &done.files {
                outln!("  {}", file.display());
            }
            Ok(())
        }
        KekCommand::Create(args) => {
            let (token, pin, so_pin) = args.open(module)?;
            let kek = create_kek(module, &token, &pin, &so_pin, &args.label, None)?;
            print_kek(&token, &kek, "generated")?;
            outln!("check value: {}", kek.check_value_text());
            Ok(())
        }
        KekCommand::Import { args, shares } => {
            let (token, pin, so_pin) = args.open(module)?;
            let (kek, check_value) =
                import_kek_from_shares(module, &token, &pin, &so_pin, &args.label, &shares)?;
            print_kek(&token, &kek, "imported")?;
            outln!("check value: {check_value}");
            outln!("custodians: compare this check value with the one the ceremony printed");
            Ok(())
        }
    }
}

impl KekArgs {
    fn open(
        &self,
        module: &Module,
    ) -> anyhow::Result<(Token, secrecy::SecretString, secrecy::SecretString)> {
        let token = find_token(module, &self.login.token)?;
        let pin = read_pin(&self.login.pin, "user PIN")?;
        let so_pin = read_pin(&self.so_pin, "SO PIN")?;
        Ok((token, pin, so_pin))
    }
}

fn print_kek(token: &Token, kek: &KekObject, verb: &str) -> anyhow::Result<()> {
    outln!(
        "{verb} key-encryption key `{}` on token {}: AES-256, trusted, private, sensitive, \
         non-extractable, wrap/unwrap only with RFC 5649; keys it unwraps are forced sensitive \
         and non-extractable (CKA_UNWRAP_TEMPLATE)",
        kek.label,
        token.describe()
    );
    Ok(())
}
