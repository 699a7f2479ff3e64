//! Where PINs come from: an environment variable, a file, a command's output or a prompt.
//!
//! A PIN is never taken from a command-line argument or a configuration value: a [`PinSource`]
//! names where to read it, and the value lives only in a [`secrecy::SecretString`].

use std::fmt;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

/// The forms a PIN source takes, shown in every error about one.
pub const PIN_SOURCE_FORMS: &str = "env:NAME, file:PATH, cmd:COMMAND or prompt";

/// Where to read a PIN from.
///
/// Parsed from `env:NAME`, `file:PATH`, `cmd:COMMAND` or `prompt`. Anything else, in particular
/// a bare PIN, is refused so that PINs stay out of shell history, `ps` output and config files.
#[derive(Clone, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum PinSource {
    /// The standard output of a shell command, e.g. a secrets manager's CLI.
    Command(String),
    /// The value of an environment variable.
    Env(String),
    /// The contents of a file, less one trailing newline.
    File(PathBuf),
    /// Ask on the terminal, without echo.
    Prompt,
}

impl PinSource {
    /// Reads the PIN; `what` names it in prompts and errors (e.g. "user PIN").
    ///
    /// An empty PIN is an error: no token uses one, and an empty value almost always means an
    /// unset variable or an empty file.
    pub fn read(&self, what: &str) -> Result<SecretString, PinError> {
        let pin = match self {
            Self::Command(cmd) => read_command(cmd)?,
            Self::Env(name) => read_env(name)?,
            Self::File(path) => read_file(path)?,
            Self::Prompt => read_prompt(what)?,
        };
        if pin.is_empty() {
            return Err(PinError::Empty {
                what: what.to_owned(),
                source_desc: self.to_string(),
            });
        }
        Ok(SecretString::from(pin.as_str()))
    }
}

impl FromStr for PinSource {
    type Err = PinError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        match (kind, rest) {
            ("prompt", "") => Ok(Self::Prompt),
            ("env", name) if !name.is_empty() => Ok(Self::Env(name.to_owned())),
            ("file", path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
            ("cmd", cmd) if !cmd.trim().is_empty() => Ok(Self::Command(cmd.to_owned())),
            ("env" | "file" | "cmd", _) => Err(PinError::Syntax {
                reason: format!("`{kind}:` needs a value after the colon"),
            }),
            // Whatever this is, it may be a PIN: never echo it back.
            _ => Err(PinError::Syntax {
                reason: "a PIN cannot be given directly; say where to read it from".to_owned(),
            }),
        }
    }
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Command(cmd) => write!(f, "cmd:{cmd}"),
            Self::Env(name) => write!(f, "env:{name}"),
            Self::File(path) => write!(f, "file:{}", path.display()),
            Self::Prompt => f.write_str("prompt"),
        }
    }
}

/// Errors reading a PIN; none of them ever contains the PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    /// The command could not be run or failed.
    #[error("PIN command `{command}` failed: {reason}")]
    Command {
        /// The command as configured.
        command: String,
        /// What went wrong (exit status or spawn error), without its output.
        reason: String,
    },
    /// The source produced an empty PIN.
    #[error("{what} from {source_desc} is empty")]
    Empty {
        /// Which PIN.
        what: String,
        /// The source, as written.
        source_desc: String,
    },
    /// The environment variable is not set or not UTF-8.
    #[error("environment variable {name} is not set (or not UTF-8); set it, or use another PIN source ({PIN_SOURCE_FORMS})")]
    Env {
        /// Variable name.
        name: String,
    },
    /// The file could not be read.
    #[error("cannot read PIN file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The terminal prompt failed (no terminal, end of input).
    #[error("cannot prompt for the {what}: {source}; use another PIN source ({PIN_SOURCE_FORMS})")]
    Prompt {
        /// Which PIN.
        what: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The text is not a PIN source.
    #[error("invalid PIN source: {reason}; use one of {PIN_SOURCE_FORMS}")]
    Syntax {
        /// Why it was refused (never contains the text itself).
        reason: String,
    },
}

fn read_env(name: &str) -> Result<Zeroizing<String>, PinError> {
    std::env::var(name)
        .map(Zeroizing::new)
        .map_err(|_| PinError::Env {
            name: name.to_owned(),
        })
}

fn read_file(path: &std::path::Path) -> Result<Zeroizing<String>, PinError> {
    let file_err = |source| PinError::File {
        path: path.to_owned(),
        source,
    };
    warn_if_shared(path);
    let bytes = Zeroizing::new(fs::read(path).map_err(file_err)?);
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        file_err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the PIN file is not UTF-8",
        ))
    })?;
    Ok(Zeroizing::new(strip_one_newline(text).to_owned()))
}

#[cfg(unix)]
fn warn_if_shared(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;

    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "PIN file is readable by group or others; chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_shared(_path: &std::path::Path) {}

fn read_command(cmd: &str) -> Result<Zeroizing<String>, PinError> {
    let fail = |reason: String| PinError::Command {
        command: cmd.to_owned(),
        reason,
    };
    let output = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| fail(e.to_string()))?;
    let stdout = Zeroizing::new(output.stdout);
    if !output.status.success() {
        return Err(fail(output.status.to_string()));
    }
    let text = std::str::from_utf8(&stdout).map_err(|_| fail("output is not UTF-8".into()))?;
    Ok(Zeroizing::new(strip_one_newline(text).to_owned()))
}

fn read_prompt(what: &str) -> Result<Zeroizing<String>, PinError> {
    rpassword::prompt_password(format!("{what}: "))
        .map(Zeroizing::new)
        .map_err(|source| PinError::Prompt {
            what: what.to_owned(),
            source,
        })
}

fn strip_one_newline(text: &str) -> &str {
    text.strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text)
}

/// Compares two PINs without exposing them elsewhere.
pub(crate) fn same_pin(a: &SecretString, b: &SecretString) -> bool {
    a.expose_secret() == b.expose_secret()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            "env:HSM_PIN"
                .parse::<PinSource>()
                .unwrap(),
            PinSource::Env("HSM_PIN".into())
        );
        assert_eq!(
            "file:/run/pin"
                .parse::<PinSource>()
                .unwrap(),
            PinSource::File("/run/pin".into())
        );
        assert_eq!(
            "cmd:pass show hsm"
                .parse::<PinSource>()
                .unwrap(),
            PinSource::Command("pass show hsm".into())
        );
        assert_eq!("prompt".parse::<PinSource>().unwrap(), PinSource::Prompt);
    }

    #[test]
    fn refuses_bare_pin_without_echoing_it() {
        let err = "123456"
            .parse::<PinSource>()
            .unwrap_err()
            .to_string();
        assert!(!err.contains("123456"), "{err}");
        assert!(err.contains("env:NAME"), "{err}");
        let err = "pin:9876"
            .parse::<PinSource>()
            .unwrap_err()
            .to_string();
        assert!(!err.contains("9876"), "{err}");
        assert!("env:".parse::<PinSource>().is_err());
    }

    #[test]
    fn file_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        fs::write(&path, "12 34\n\n").unwrap();
        let pin = PinSource::File(path)
            .read("user PIN")
            .unwrap();
        assert_eq!(pin.expose_secret(), "12 34\n");
    }

    #[test]
    fn command_output_is_the_pin() {
        let pin = PinSource::Command("printf '4321\\n'".into())
            .read("user PIN")
            .unwrap();
        assert_eq!(pin.expose_secret(), "4321");
        let err = PinSource::Command("exit 3".into())
            .read("user PIN")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("exit status: 3"),
            "{err}"
        );
    }

    #[test]
    fn empty_pin_is_refused() {
        let err = PinSource::Command("true".into())
            .read("SO PIN")
            .unwrap_err();
        assert!(err.to_string().contains("SO PIN"), "{err}");
    }
}
