//! Whether a token keeps a sensitive key's value inside, tried before it may hold a KEK.
//!
//! `CKM_CONCATENATE_BASE_AND_KEY` makes a key from the values of two others. PKCS#11 lets the
//! result be sensitive, but a token that accepts any second key, even a sensitive one that may
//! not derive, lets every PIN holder copy that key's value into one they can cut apart
//! (`CKM_EXTRACT_KEY_FROM_KEY`) and test byte by byte with an HMAC. kryoptic 1.5.4 does so. A
//! KEK on such a token is readable, and with it every backup made under it on any HSM; the
//! backup commands refuse such a token.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::Error;
use crate::pkcs11::{trial_aes_key, Module, Token};

/// Refuses a token on which a sensitive, non-derivable key's value can be copied into a new key.
///
/// Tried with session objects made for the purpose (a generated AES key as the victim, a
/// one-byte secret as the base), which are destroyed whatever happens. A token that does not
/// offer `CKM_CONCATENATE_BASE_AND_KEY` passes; one that offers it but on which the throwaway
/// keys cannot be made is refused, saying so.
pub(crate) fn refuse_leaky_token(
    module: &Module,
    session: &Session,
    token: &Token,
) -> Result<(), Error> {
    let offered = module
        .context()
        .get_mechanism_info(token.slot, MechanismType::CONCATENATE_BASE_AND_KEY)
        .is_ok_and(|info| info.derive());
    if !offered {
        return Ok(());
    }
    let mut made: Vec<ObjectHandle> = Vec::new();
    let outcome = try_concatenation(session, &mut made);
    for handle in made {
        if let Err(e) = session.destroy_object(handle) {
            tracing::debug!(error = %e, "a probe object goes with its session instead");
        }
    }
    let reason = match outcome {
        Outcome::Kept => return Ok(()),
        Outcome::Leaked => "C_DeriveKey with CKM_CONCATENATE_BASE_AND_KEY accepts a sensitive key \
                            that may not derive as its second key, so any holder of the user or \
                            SO PIN can copy a key's value out (kryoptic 1.5.4 does this)"
            .to_owned(),
        Outcome::Untried(e) => format!(
            "it offers CKM_CONCATENATE_BASE_AND_KEY, which can copy a key's value out, but the \
             check of whether it does could not make its throwaway keys ({})",
            crate::pkcs11::rv_text(&e)
        ),
    };
    Err(Error::LeakyToken {
        token: token.describe(),
        reason,
    })
}

/// What the token did with the probe.
enum Outcome {
    /// It refused to derive from the sensitive key.
    Kept,
    /// It derived a key from the sensitive key's value.
    Leaked,
    /// The probe's keys could not be made.
    Untried(cryptoki::error::Error),
}

/// Tries the route with a sensitive, non-derivable victim; every object made goes into `made`.
fn try_concatenation(session: &Session, made: &mut Vec<ObjectHandle>) -> Outcome {
    let victim = trial_aes_key(
        session,
        16,
        &[
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Derive(false),
        ],
    );
    let victim = match victim {
        Ok(victim) => victim,
        Err(e) => return Outcome::Untried(e),
    };
    made.push(victim);
    let base = session.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Value(vec![0]),
        Attribute::Derive(true),
    ]);
    let base = match base {
        Ok(base) => base,
        Err(e) => return Outcome::Untried(e),
    };
    made.push(base);
    match session.derive_key(
        &Mechanism::ConcatenateBaseAndKey(victim),
        base,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
        ],
    ) {
        Ok(derived) => {
            made.push(derived);
            Outcome::Leaked
        }
        Err(_) => Outcome::Kept,
    }
}
