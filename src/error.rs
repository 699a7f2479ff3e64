//! The errors of the signing key, its token and its session pool.

use std::path::PathBuf;
use std::time::Duration;

use crate::pin::PinError;
use crate::scheme::{SignError, VerifyError};

/// Errors from [`crate::HsmToken`] and [`crate::HsmKey`].
///
/// Each variant that an operator can fix says how. None of them ever contains a PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Every pooled session was in use for the whole checkout timeout.
    #[error("HSM busy: no session of token {token} became free within {waited:?}; raise the pool size (if the token allows more sessions) or the checkout timeout")]
    Busy {
        /// The token.
        token: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The certificate's public key is not the HSM key's.
    #[error("the certificate does not belong to key {key}: certificate public key SHA-256 {cert_fingerprint}, HSM key {key_fingerprint}")]
    CertificateMismatch {
        /// The key.
        key: String,
        /// SHA-256 of the certificate's SubjectPublicKeyInfo.
        cert_fingerprint: String,
        /// SHA-256 of the key's SubjectPublicKeyInfo.
        key_fingerprint: String,
    },
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The key found again after a reload is not the key that was loaded.
    #[error("key {key} changed: loaded with public key SHA-256 {expected}, the token now has {found} under that id; refusing to sign with it")]
    KeyChanged {
        /// The key.
        key: String,
        /// Fingerprint at load.
        expected: String,
        /// Fingerprint now.
        found: String,
    },
    /// The token cannot serve any TLS 1.3 scheme for this key.
    #[error("token {token} cannot sign TLS 1.3 handshakes with key {key}: {gap}; use a key type the token fully supports, or build the key with tls12_only(true)")]
    NoTls13 {
        /// The token.
        token: String,
        /// The key.
        key: String,
        /// What is missing, per scheme.
        gap: String,
    },
    /// No scheme the peer offered can be served.
    #[error("key {key} on token {token} cannot serve {scheme}")]
    SchemeUnavailable {
        /// The token.
        token: String,
        /// The key.
        key: String,
        /// The scheme asked for.
        scheme: String,
    },
    /// A PIN could not be read.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// The token said the PIN is wrong. It is never tried again automatically.
    #[error("wrong user PIN for token {token}: the token refused it (CKR_PIN_INCORRECT); it is recorded in {guard_file} and will not be tried again until the PIN source gives a different value")]
    PinIncorrect {
        /// The token.
        token: String,
        /// The guard's state file.
        guard_file: PathBuf,
    },
    /// The user PIN is locked.
    #[error("the user PIN of token {token} is locked (CKR_PIN_LOCKED); the security officer must reset it: rustls-hsm token unlock --token ... --so-pin SOURCE --new-pin SOURCE")]
    PinLocked {
        /// The token.
        token: String,
    },
    /// The lockout guard refused to try the PIN.
    #[error("not logging in to token {token}: {reason}")]
    PinRefused {
        /// The token.
        token: String,
        /// Why (final try, locked, a PIN value that failed before).
        reason: String,
    },
    /// A PKCS#11 layer error (module, token, key lookup).
    #[error(transparent)]
    Pkcs11(#[from] crate::pkcs11::Error),
    /// The pin guard's state file could not be read or written.
    #[error("PIN guard state file {path}: {reason}")]
    PinGuard {
        /// The state file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The token failed to sign.
    #[error("signing with key {key} ({scheme}) on token {token} failed: {source}")]
    Sign {
        /// The token.
        token: String,
        /// The key.
        key: String,
        /// The scheme.
        scheme: String,
        /// What the token or encoder said.
        #[source]
        source: SignError,
    },
    /// The token is unavailable; recovery runs in the background.
    #[error("token {token} is unavailable ({reason}); reconnecting in the background, at most once every {interval:?}")]
    Unavailable {
        /// The token.
        token: String,
        /// The fault that made it unavailable.
        reason: String,
        /// The reload interval.
        interval: Duration,
    },
    /// A signature made by the token did not verify; it was not released.
    #[error("signature from token {token} with key {key} failed verification and was withheld: {source}")]
    Verify {
        /// The token.
        token: String,
        /// The key.
        key: String,
        /// The verifier's reason.
        #[source]
        source: VerifyError,
    },
    /// The token was shut down.
    #[error("token {token} was shut down")]
    ShutDown {
        /// The token.
        token: String,
    },
}

impl From<Error> for rustls::Error {
    fn from(e: Error) -> Self {
        Self::General(e.to_string())
    }
}
