//! Logging the user in on a fresh read-write session, without spending a PIN's last try.

use cryptoki::error::RvError;
use cryptoki::session::{Session, UserType};
use secrecy::SecretString;

use super::{rv_of, Error, Module, PinState, Token};

/// Opens a read-write session on `token` and logs the user in with `pin`.
///
/// Before `C_Login` the token's flags are read again: a user PIN that is locked or on its final
/// try is not tried at all ([`Error::LoginRefused`]), so that a wrong PIN in a script never
/// locks the token; the last try is left to a person. `CKR_USER_ALREADY_LOGGED_IN` (another
/// session of this process is logged in) counts as success, and `CKR_PIN_INCORRECT` becomes
/// [`Error::PinIncorrect`].
pub fn login_user(module: &Module, token: &Token, pin: &SecretString) -> Result<Session, Error> {
    let info = token.refresh(module)?;
    if let Some(reason) = login_refusal(PinState::user(&info)) {
        return Err(Error::LoginRefused {
            token: token.describe(),
            reason,
        });
    }
    let session = module
        .context()
        .open_rw_session(token.slot)
        .map_err(Error::pkcs11("open a read-write session"))?;
    match session.login(UserType::User, Some(pin)) {
        Ok(()) => Ok(session),
        Err(e) if rv_of(&e) == Some(RvError::UserAlreadyLoggedIn) => Ok(session),
        Err(source) if rv_of(&source) == Some(RvError::PinIncorrect) => Err(Error::PinIncorrect {
            token: token.describe(),
            source,
        }),
        Err(e) => Err(Error::pkcs11("log in as user")(e)),
    }
}

/// Logs the security officer in on `session`; `CKR_PIN_INCORRECT` becomes
/// [`Error::SoPinIncorrect`], naming the token.
pub(crate) fn login_so_on(
    session: &Session,
    token: &Token,
    so_pin: &SecretString,
) -> Result<(), Error> {
    match session.login(UserType::So, Some(so_pin)) {
        Ok(()) => Ok(()),
        Err(source) if rv_of(&source) == Some(RvError::PinIncorrect) => {
            Err(Error::SoPinIncorrect {
                token: token.describe(),
                source,
            })
        }
        Err(e) => Err(Error::pkcs11("log in as security officer")(e)),
    }
}

/// Why a login must not be attempted in this PIN state, if it must not.
fn login_refusal(state: PinState) -> Option<&'static str> {
    match state {
        PinState::FinalTry => Some(
            "the user PIN is on its final try and a wrong PIN would lock it; leave the last try \
             to a person (if the PIN is lost, the security officer resets it with `rustls-hsm \
             token unlock`)",
        ),
        PinState::Locked => Some(
            "the user PIN is locked; the security officer resets it with `rustls-hsm token \
             unlock`",
        ),
        PinState::CountLow | PinState::Ok => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_final_try_and_locked() {
        assert!(login_refusal(PinState::Ok).is_none());
        assert!(login_refusal(PinState::CountLow).is_none());
        let final_try = login_refusal(PinState::FinalTry).unwrap();
        assert!(
            final_try.contains("leave the last try to a person"),
            "{final_try}"
        );
        assert!(final_try.contains("rustls-hsm token unlock"), "{final_try}");
        let locked = login_refusal(PinState::Locked).unwrap();
        assert!(locked.contains("rustls-hsm token unlock"), "{locked}");
    }
}
