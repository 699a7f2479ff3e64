//! Pieces every subcommand shares: global options, PIN and token arguments, confirmations,
//! token flags in words and error printing.

use std::ffi::OsStr;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::builder::TypedValueParser;
use clap::error::ErrorKind;
use cryptoki::error::Error as CkError;
use cryptoki::slot::{Limit, TokenInfo};
use rustls_hsm::pin::PinSource;
use rustls_hsm::pkcs11::{find_token, login_user, rv_name, Module, Token, TokenSelector};
use secrecy::SecretString;

/// Options accepted by every command.
#[derive(Debug, clap::Args)]
pub(crate) struct GlobalArgs {
    /// The vendor's PKCS#11 module (.so); defaults to the RUSTLS_HSM_MODULE variable.
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) module: Option<PathBuf>,
}

/// A token and the user PIN to log in to it with, as key commands take them.
#[derive(Debug, clap::Args)]
pub(crate) struct LoginArgs {
    /// The token: its label, `serial:XYZ` or a `pkcs11:token=...` URI.
    #[arg(long, value_name = "SEL")]
    pub(crate) token: TokenSelector,
    /// Where to read the user PIN: env:NAME, file:PATH, cmd:COMMAND or prompt.
    #[arg(long, value_name = "SOURCE", value_parser = PinSourceParser, allow_hyphen_values = true)]
    pub(crate) pin: PinSource,
}

impl LoginArgs {
    /// Finds the token, reads the PIN and logs in on a read-write session.
    pub(crate) fn login(
        &self,
        module: &Module,
    ) -> anyhow::Result<(Token, cryptoki::session::Session)> {
        let token = find_token(module, &self.token)?;
        let pin = read_pin(&self.pin, "user PIN")?;
        let session = login_user(module, &token, &pin)?;
        Ok((token, session))
    }
}

/// Parses a PIN source for clap without ever echoing the rejected text (it may be a PIN).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PinSourceParser;

impl TypedValueParser for PinSourceParser {
    type Value = PinSource;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<PinSource, clap::Error> {
        let name = arg.map_or_else(|| "PIN source".to_owned(), ToString::to_string);
        let refuse = |reason: String| {
            clap::Error::raw(
                ErrorKind::ValueValidation,
                format!("invalid value for '{name}': {reason}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| refuse("it is not UTF-8".into()))?;
        text.parse()
            .map_err(|e: rustls_hsm::pin::PinError| refuse(e.to_string()))
    }
}

/// Reads a PIN from its source; `what` names it in prompts and errors.
pub(crate) fn read_pin(source: &PinSource, what: &str) -> anyhow::Result<SecretString> {
    source
        .read(what)
        .with_context(|| format!("reading the {what}"))
}

/// Asks the operator to type `expected` on the terminal before a destructive step.
///
/// `what` is a clause that stands alone before a colon, e.g. "deleting key `k` from token `t`".
///
/// Refused when stdin is not a terminal (no person is there to type) or the text differs;
/// `bypass` names the option that skips the question in scripts.
pub(crate) fn confirm_by_typing(expected: &str, what: &str, bypass: &str) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!(
            "{what}: confirming it needs the label typed on a terminal, and stdin is not one; \
             nothing was changed (scripts pass {bypass})"
        );
    }
    eprint!("{what}: type `{expected}` to confirm: ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("reading the confirmation")?;
    if line.trim_end_matches(['\r', '\n']) != expected {
        bail!("the typed text is not `{expected}`; nothing was changed");
    }
    Ok(())
}

/// The token's flags in words, in the order the spec lists them.
pub(crate) fn token_flags(info: &TokenInfo) -> Vec<&'static str> {
    [
        (info.rng(), "rng"),
        (info.write_protected(), "write_protected"),
        (info.login_required(), "login_required"),
        (info.user_pin_initialized(), "user_pin_initialized"),
        (info.restore_key_not_needed(), "restore_key_not_needed"),
        (info.clock_on_token(), "clock_on_token"),
        (
            info.protected_authentication_path(),
            "protected_authentication_path",
        ),
        (info.dual_crypto_operations(), "dual_crypto_operations"),
        (info.token_initialized(), "token_initialized"),
        (info.secondary_authentication(), "secondary_authentication"),
        (info.user_pin_count_low(), "user_pin_count_low"),
        (info.user_pin_final_try(), "user_pin_final_try"),
        (info.user_pin_locked(), "user_pin_locked"),
        (info.user_pin_to_be_changed(), "user_pin_to_be_changed"),
        (info.so_pin_count_low(), "so_pin_count_low"),
        (info.so_pin_final_try(), "so_pin_final_try"),
        (info.so_pin_locked(), "so_pin_locked"),
        (info.so_pin_to_be_changed(), "so_pin_to_be_changed"),
        (info.error_state(), "error_state"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect()
}

/// A session or PIN limit as JSON: a number, or "unlimited" / "unavailable".
#[derive(Clone, Debug, serde::Serialize)]
#[serde(untagged)]
pub(crate) enum LimitValue {
    /// An explicit value.
    Number(u64),
    /// `CK_EFFECTIVELY_INFINITE` or `CK_UNAVAILABLE_INFORMATION`, in words.
    Word(&'static str),
}

impl LimitValue {
    /// Converts cryptoki's limit.
    pub(crate) fn from_limit(limit: Limit) -> Self {
        match limit {
            Limit::Max(n) => Self::Number(n),
            Limit::Infinite => Self::Word("unlimited"),
            Limit::Unavailable => Self::Word("unavailable"),
        }
    }

    /// A current count, where `None` means the token does not say.
    pub(crate) fn from_count(count: Option<u64>) -> Self {
        count.map_or(Self::Word("unavailable"), Self::Number)
    }
}

impl std::fmt::Display for LimitValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Word(w) => f.write_str(w),
        }
    }
}

/// Prints a value as pretty JSON on stdout.
pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("encoding JSON")?;
    outln!("{text}");
    Ok(())
}

/// The error and every cause, joined by `: `, skipping causes the message already contains.
///
/// A PKCS#11 return code that the message already names (`C_Login returned CKR_PIN_INCORRECT`)
/// is not repeated in cryptoki's own words.
pub(crate) fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        let named_already = match cause.downcast_ref::<CkError>() {
            Some(CkError::Pkcs11(rv, _)) => text.contains(&rv_name(*rv)),
            _ => false,
        };
        if named_already || text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    // Errors quote labels and file contents; no control character but a line break reaches
    // the terminal raw.
    text.lines()
        .map(|line| rustls_hsm::pkcs11::printable(line).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}
