//! The PKCS#11 layer: modules, tokens, key objects and the mechanisms a token offers.
//!
//! Everything here talks to the module through `cryptoki`; the layers above never call it
//! directly except to sign on a pooled session.

mod destroy;
pub mod ext;
mod keygen;
mod keys;
mod login;
mod mechanism;
mod module;
mod token;
mod uri;

use std::path::PathBuf;

use cryptoki::error::{Error as CkError, RvError};

pub use destroy::{
    destroy_key, destroy_unpaired, find_unpaired, DestroyedKey, UnpairedObject, UnpairedObjects,
};
pub use keygen::{
    generate_key_pair, generate_session_key_pair, import_private_key, BackupPolicy, KeySpec,
    KEY_SPEC_FORMS,
};
pub(crate) use keygen::{private_template, trial_aes_key};
pub use keys::{
    check_label, find_key, find_key_on, list_keys, printable, public_key_spki, spki_fingerprint,
    spki_of_certificate, Curve, KeyKind, KeyObject, KeySelector, ObjectClassName,
};
pub(crate) use keys::{kind_of_spki, read_key};
pub(crate) use login::login_so_on;
pub use login::login_user;
pub use mechanism::{mechanism_flags, MechanismList};
pub use module::{Module, MODULE_ENV};
pub use token::{
    change_user_pin, find_token, init_token, list_slots, unlock_user_pin, PinState, Token,
    TokenSelector, MAX_LABEL_LEN,
};
pub use uri::Pkcs11Uri;

/// Errors of the PKCS#11 layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// More than one key matched.
    #[error("key selector `{selector}` matches {count} private keys: {matches}; add an id (id:HEX) or a more specific URI")]
    KeyAmbiguous {
        /// The selector as given.
        selector: String,
        /// How many matched.
        count: usize,
        /// One line per match: label, id, type.
        matches: String,
    },
    /// A key with this label or id already exists.
    #[error("a private key with {what} already exists on token `{token}`; choose another label/id or delete it first")]
    KeyExists {
        /// Which attribute collided, e.g. "label `tls`".
        what: String,
        /// The token label.
        token: String,
    },
    /// Generating a key failed a check.
    #[error("key generation: {reason}")]
    KeyGeneration {
        /// What went wrong.
        reason: String,
    },
    /// Importing a private key failed: the input is not a usable key, or the token refused it.
    #[error("key import: {reason}")]
    KeyImport {
        /// What went wrong, and what is accepted.
        reason: String,
    },
    /// No key matched.
    #[error("no private key matches `{selector}` on token `{token}`{hint}")]
    KeyNotFound {
        /// The selector as given.
        selector: String,
        /// The token label.
        token: String,
        /// A hint, e.g. that the session is not logged in.
        hint: String,
    },
    /// The key selector is malformed.
    #[error("invalid key selector `{selector}`: {reason}")]
    KeySelector {
        /// The selector as given.
        selector: String,
        /// Why it was refused.
        reason: String,
    },
    /// Login was not attempted: the user PIN is locked or on its final try.
    #[error("not attempting login to token {token}: {reason}")]
    LoginRefused {
        /// The token, as [`Token::describe`] names it.
        token: String,
        /// Why, and what to do.
        reason: &'static str,
    },
    /// The module path was given neither as an option nor in the environment.
    #[error("no PKCS#11 module named: pass --module PATH or set RUSTLS_HSM_MODULE")]
    ModuleNotNamed,
    /// `C_Initialize` failed.
    #[error("C_Initialize of {path} failed: {}; {hint}", rv_text(.source))]
    ModuleInitialize {
        /// The module.
        path: PathBuf,
        /// What to check.
        hint: String,
        /// The PKCS#11 error.
        #[source]
        source: CkError,
    },
    /// `dlopen` failed for another reason.
    #[error("cannot load PKCS#11 module {path}: {detail}")]
    ModuleLoad {
        /// The module.
        path: PathBuf,
        /// The loader's message.
        detail: String,
    },
    /// The file does not exist.
    #[error("PKCS#11 module {path} does not exist; install the vendor's package or fix the path (for SoftHSM: /usr/lib/softhsm/libsofthsm2.so)")]
    ModuleMissing {
        /// The module path as given.
        path: PathBuf,
    },
    /// The shared object lacks `C_GetFunctionList`.
    #[error("{path} is a shared library but not a PKCS#11 module: it has no C_GetFunctionList; point --module at the vendor's PKCS#11 library")]
    ModuleNoFunctionList {
        /// The module.
        path: PathBuf,
    },
    /// The file is not a shared object.
    #[error("{path} is not a shared library ({detail}); point --module at the vendor's PKCS#11 .so file")]
    ModuleNotSharedObject {
        /// The module.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },
    /// The shared object is for another architecture.
    #[error("{path} was built for {found}, but this program is {expected}; install the module built for this machine")]
    ModuleWrongArchitecture {
        /// The module.
        path: PathBuf,
        /// What the file is.
        found: String,
        /// What we need.
        expected: String,
    },
    /// `C_Login` said the user PIN is wrong.
    #[error("wrong user PIN for token {token} ({}); check the PIN source (every wrong PIN counts towards locking it)", rv_text(.source))]
    PinIncorrect {
        /// The token, as [`Token::describe`] names it.
        token: String,
        /// The PKCS#11 error (`CKR_PIN_INCORRECT` from `C_Login`).
        #[source]
        source: CkError,
    },
    /// `C_Login` said the security officer's PIN is wrong.
    #[error("wrong SO PIN for token {token} ({}); check the SO PIN source (every wrong PIN counts towards locking it, and only re-initialising the token, which erases it, clears a locked SO PIN)", rv_text(.source))]
    SoPinIncorrect {
        /// The token, as [`Token::describe`] names it.
        token: String,
        /// The PKCS#11 error (`CKR_PIN_INCORRECT` from `C_Login`).
        #[source]
        source: CkError,
    },
    /// A PKCS#11 call failed.
    #[error("{op}: {}", rv_text(.source))]
    Pkcs11 {
        /// What we were doing.
        op: &'static str,
        /// The PKCS#11 error, with the failing function.
        #[source]
        source: CkError,
    },
    /// The module gives each caller its own instance, so calls cryptoki cannot make cannot be
    /// made on cryptoki's sessions.
    #[error("module {} gives each caller its own instance (p11-kit's client module does), so rustls-hsm cannot {what} through it (cryptoki 0.12 has no call for that); do it on a host that loads the token's own module", .module.display())]
    SeparateInstance {
        /// The module path.
        module: PathBuf,
        /// What needed the call.
        what: &'static str,
    },
    /// The token's public key attributes could not be turned into a SubjectPublicKeyInfo.
    #[error("public key of `{key}`: {reason}")]
    PublicKey {
        /// The key label.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// More than one token matched.
    #[error("token selector `{selector}` matches {count} tokens: {matches}; select by serial or a URI with serial=")]
    TokenAmbiguous {
        /// The selector as given.
        selector: String,
        /// How many matched.
        count: usize,
        /// One entry per match: label, serial, slot.
        matches: String,
    },
    /// A token operation was refused before any PKCS#11 call.
    #[error("{0}")]
    TokenRefused(String),
    /// No token matched.
    #[error("no initialised token matches `{selector}`; tokens present: {available}")]
    TokenNotFound {
        /// The selector as given.
        selector: String,
        /// The tokens that do exist.
        available: String,
    },
    /// The token selector is malformed.
    #[error("invalid token selector `{selector}`: {reason}")]
    TokenSelector {
        /// The selector as given.
        selector: String,
        /// Why it was refused.
        reason: String,
    },
    /// A `pkcs11:` URI is malformed.
    #[error("invalid PKCS#11 URI `{uri}`: {reason}")]
    Uri {
        /// The URI (any PIN redacted).
        uri: String,
        /// Why it was refused.
        reason: String,
    },
}

impl Error {
    /// The PKCS#11 return code behind this error, if there is one.
    pub fn rv(&self) -> Option<RvError> {
        match self {
            Self::Pkcs11 { source, .. }
            | Self::ModuleInitialize { source, .. }
            | Self::PinIncorrect { source, .. } => rv_of(source),
            _ => None,
        }
    }

    pub(crate) fn pkcs11(op: &'static str) -> impl FnOnce(CkError) -> Self {
        move |source| Self::Pkcs11 { op, source }
    }
}

/// The return code inside a cryptoki error, if it came from the module.
pub fn rv_of(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// The spec's name for a return code, e.g. `CKR_PIN_INCORRECT`.
pub fn rv_name(rv: RvError) -> String {
    let camel = format!("{rv:?}");
    let mut name = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// A short text for a cryptoki error: the function and the return code's name.
pub(crate) fn rv_text(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("C_{function:?} returned {}", rv_name(*rv)),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_code_names_follow_the_spec() {
        assert_eq!(rv_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            rv_name(RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(
            rv_name(RvError::CryptokiAlreadyInitialized),
            "CKR_CRYPTOKI_ALREADY_INITIALIZED"
        );
    }
}
