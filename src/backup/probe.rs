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
use crate::pkcs11::{Module, Token};

/// Refuses a token on which a sensitive, non-derivable key's value can be copied into a new key.
///
/// Tried with session objects made for the purpose (a generated AES key as the victim, a
/// one-byte secret as the base), which are destroyed whatever happens. A token that does not
/// offer `CKM_CONCATENATE_BASE_AND_KEY` passes.
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
    let leaks = try_concatenation(session, &mut made);
    for handle in made {
        if let Err(e) = session.destroy_object(handle) {
            tracing::debug!(error = %e, "a probe object goes with its session instead");
        }
    }
    if leaks {
        Err(Error::LeakyToken {
            token: token.describe(),
            reason: "C_DeriveKey with CKM_CONCATENATE_BASE_AND_KEY accepts a sensitive key that \
                     may not derive as its second key, so any holder of the user or SO PIN can \
                     copy a key's value out (kryoptic 1.5.4 does this)"
                .into(),
        })
    } else {
        Ok(())
    }
}

/// True when the token derived a key from a sensitive, non-derivable victim's value.
fn try_concatenation(session: &Session, made: &mut Vec<ObjectHandle>) -> bool {
    let victim = session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::ValueLen(16.into()),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Derive(false),
        ],
    );
    let base = session.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Value(vec![0]),
        Attribute::Derive(true),
    ]);
    let (Ok(victim), Ok(base)) = (victim, base) else {
        // Without both objects the route cannot be tried; a token that cannot make them
        // cannot make a KEK either.
        return false;
    };
    made.extend([victim, base]);
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
            true
        }
        Err(_) => false,
    }
}
