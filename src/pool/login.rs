//! Logging in without ever locking the token.
//!
//! Before every `C_Login` the token's flags are read: a locked PIN, a PIN on its final try (and,
//! by policy, one whose count is low) are refused, leaving the last try to a person. A PIN value
//! the token refused before is not tried again (see [`super::guard`]). `CKR_PIN_INCORRECT` is
//! never retried, and `CKR_USER_ALREADY_LOGGED_IN` counts as success.

use cryptoki::error::RvError;
use cryptoki::session::{Session, SessionState, UserType};
use secrecy::SecretString;
use tracing::debug;

use super::guard::{PinGuard, TokenKey};
use crate::pkcs11::{rv_of, Module, PinState, Token};
use crate::Error;

/// When to stop logging in automatically.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum LockoutPolicy {
    /// Refuse when the token reports a low count, final try or locked PIN.
    RefuseAtCountLow,
    /// Refuse when the token reports final try or locked (the default).
    #[default]
    RefuseAtFinalTry,
}

/// Why a login did not happen or failed.
#[derive(Debug)]
pub(crate) enum LoginOutcome {
    /// Logged in (or already was).
    LoggedIn,
    /// Already logged in; no `C_Login` was made.
    AlreadyLoggedIn,
}

/// Logs `session` in as the user, after the lockout checks.
pub(crate) fn login(
    module: &Module,
    token: &Token,
    session: &Session,
    pin: &SecretString,
    guard: &PinGuard,
    policy: LockoutPolicy,
) -> Result<LoginOutcome, Error> {
    if let Ok(info) = session.get_session_info() {
        if matches!(
            info.session_state(),
            SessionState::RoUser | SessionState::RwUser
        ) {
            return Ok(LoginOutcome::AlreadyLoggedIn);
        }
    }
    let refused = |reason: String| Error::PinRefused {
        token: token.describe(),
        reason,
    };
    let key = TokenKey {
        module: module.path(),
        serial: &token.serial,
        label: &token.label,
    };
    if guard.was_refused(&key, pin)? {
        return Err(refused(format!(
            "the token refused this PIN value before (recorded in {}); fix the PIN source; \
             login is attempted again as soon as it gives a different value",
            guard.path().display()
        )));
    }
    let info = token.refresh(module)?;
    match PinState::user(&info) {
        PinState::Locked => {
            return Err(Error::PinLocked {
                token: token.describe(),
            })
        }
        PinState::FinalTry => {
            return Err(refused(
                "the user PIN is on its final try; not attempting login, the last try is left \
                 to a person (the security officer resets it with `rustls-hsm token unlock`)"
                    .into(),
            ))
        }
        PinState::CountLow if policy == LockoutPolicy::RefuseAtCountLow => {
            return Err(refused(
                "the token reports earlier wrong PINs (count low) and the policy refuses to try \
                 further; log in once by hand to reset the count"
                    .into(),
            ))
        }
        _ => {}
    }

    debug!(token = %token.label, "C_Login");
    match session.login(UserType::User, Some(pin)) {
        Ok(()) => Ok(LoginOutcome::LoggedIn),
        Err(e) => match rv_of(&e) {
            Some(RvError::UserAlreadyLoggedIn) => Ok(LoginOutcome::AlreadyLoggedIn),
            Some(RvError::PinIncorrect) => {
                guard.record_refusal(&key, pin)?;
                Err(Error::PinIncorrect {
                    token: token.describe(),
                    guard_file: guard.path().to_owned(),
                })
            }
            Some(RvError::PinLocked) => Err(Error::PinLocked {
                token: token.describe(),
            }),
            _ => Err(crate::pkcs11::Error::Pkcs11 {
                op: "log in (C_Login)",
                source: e,
            }
            .into()),
        },
    }
}
