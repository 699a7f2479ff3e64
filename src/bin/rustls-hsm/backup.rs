//! `rustls-hsm backup`: back a key up under a KEK, restore it, or check that a backup restores.

use std::path::PathBuf;

use clap::Subcommand;
use rustls_hsm::backup::{create_backup, restore_backup, verify_backup, Backup, RestoreReport};
use rustls_hsm::pkcs11::{BackupPolicy, KeySelector, Module};

use crate::common::LoginArgs;

/// The `backup` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum BackupCommand {
    /// Wrap a key under a trusted KEK into a backup file (0600, never overwritten).
    Create {
        #[command(flatten)]
        login: LoginArgs,
        /// The key: its label, `id:HEX` or a `pkcs11:` URI.
        #[arg(long)]
        key: KeySelector,
        /// The label of the KEK to wrap it under.
        #[arg(long, value_name = "LABEL")]
        kek: String,
        /// The backup file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Restore a backup onto a token, test-sign, and keep it only if the signature verifies.
    Restore {
        /// The backup file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// The label of the KEK on this token.
        #[arg(long, value_name = "LABEL")]
        kek: String,
        #[command(flatten)]
        login: LoginArgs,
        /// none: the restored key never leaves the token; wrap-with-trusted: it may be backed up
        /// again (only for keys backed up with that policy, and only under a KEK whose unwrap
        /// template allows it: KEKs made by rustls-hsm lock every key they unwrap).
        #[arg(long, value_name = "POLICY", default_value = "none")]
        backup_policy: BackupPolicy,
    },
    /// Check a backup: unwrap it as a temporary object, test-sign, verify, destroy.
    Verify {
        /// The backup file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// The label of the KEK on this token.
        #[arg(long, value_name = "LABEL")]
        kek: String,
        #[command(flatten)]
        login: LoginArgs,
    },
}

/// Runs a `backup` subcommand.
pub(crate) fn run(module: &Module, command: BackupCommand) -> anyhow::Result<()> {
    match command {
        BackupCommand::Create {
            login,
            key,
            kek,
            out,
        } => {
            if out.symlink_metadata().is_ok() {
                anyhow::bail!(
                    "{} already exists; choose another name (backups are never overwritten)",
                    out.display()
                );
            }
            let (token, session) = login.login(module)?;
            let backup = create_backup(module, &session, &token, &key, &kek)?;
            backup.write(&out)?;
            outln!(
                "backed up key `{}` (id {}, {}) from token {} to {}",
                backup.label,
                hex::encode(&backup.id),
                backup.kind,
                token.describe(),
                out.display()
            );
            outln!(
                "wrapped with {} under `{}`, check value {}",
                backup.mechanism.name(),
                backup.kek_label,
                backup
                    .kek_check_value
                    .map_or_else(|| "unavailable".into(), |v| v.to_string())
            );
            Ok(())
        }
        BackupCommand::Restore {
            input,
            kek,
            login,
            backup_policy,
        } => {
            let backup = Backup::read(&input)?;
            let (token, session) = login.login(module)?;
            let report = restore_backup(module, &session, &token, &backup, &kek, backup_policy)?;
            outln!(
                "restored key `{}` (id {}, {}) onto token {}",
                report.key.label,
                hex::encode(&report.key.id),
                report.key.kind,
                token.describe()
            );
            if report.replaced_public {
                outln!(
                    "replaced the public key object an interrupted restore had left (same label, \
                     id and key)"
                );
            }
            print_check(&report)?;
            Ok(())
        }
        BackupCommand::Verify { input, kek, login } => {
            let backup = Backup::read(&input)?;
            let (token, session) = login.login(module)?;
            let report = verify_backup(module, &session, &token, &backup, &kek)?;
            outln!(
                "backup {} of key `{}` (id {}, {}) is good on token {}",
                input.display(),
                backup.label,
                hex::encode(&backup.id),
                backup.kind,
                token.describe()
            );
            print_check(&report)?;
            outln!("the temporary objects were destroyed; nothing was left on the token");
            Ok(())
        }
    }
}

fn print_check(report: &RestoreReport) -> anyhow::Result<()> {
    outln!(
        "test signature ({}) verified under the backup's public key; KEK check value {}",
        report.scheme_name(),
        report
            .kek_check_value
            .map_or_else(|| "unavailable".into(), |v| v.to_string())
    );
    outln!(
        "  flags: sensitive={}, extractable={}, sign={}",
        report.key.sensitive,
        report.key.extractable,
        report.key.sign
    );
    Ok(())
}
