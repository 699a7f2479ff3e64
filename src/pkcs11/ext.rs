//! The calls cryptoki 0.12 cannot make, made on cryptoki's own sessions through the small
//! `rustls-hsm-pkcs11-ext` crate: mechanisms cryptoki cannot name (`CKM_AES_KEY_WRAP_KWP`) and
//! attributes whose value is a template (`CKA_UNWRAP_TEMPLATE`).

use cryptoki::session::Session;
pub use rustls_hsm_pkcs11_ext::{sys, ulongs_from_bytes, Attr, Functions, MechanismInfo, Value};

use super::{Error, Module};

/// The module's functions, for use with `session`.
///
/// `what` says what they are needed for, for the error when they cannot be had: when the module
/// gives each caller its own instance (p11-kit's client module does), cryptoki's sessions mean
/// nothing to a second caller.
pub fn raw_calls(
    module: &Module,
    session: &Session,
    what: &'static str,
) -> Result<Functions, Error> {
    let functions =
        Functions::load(module.path()).map_err(Error::pkcs11("load the module's function list"))?;
    if functions.shares_session(session) {
        Ok(functions)
    } else {
        Err(Error::SeparateInstance {
            module: module.path().to_owned(),
            what,
        })
    }
}
