//! Destroying one key pair: its private half, its public half and its certificates.

use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::{Error, KeyObject};

/// What [`destroy_key`] destroyed.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct DestroyedKey {
    /// Certificate objects with the key's `CKA_ID`.
    pub certificates: usize,
    /// Whether a public key object was paired with the key and destroyed.
    pub public: bool,
    /// Certificates kept because another private key shares the `CKA_ID`.
    pub shared_certificates: usize,
}

/// Destroys `key`'s private object, its paired public object and its certificates
/// (`C_DestroyObject`).
///
/// Certificates are found by the key's `CKA_ID`; when another private key has the same id they
/// may belong to it, so they are kept and counted in [`DestroyedKey::shared_certificates`]. The
/// private key goes last: if anything fails before, the key can still be found and the command
/// repeated.
pub fn destroy_key(session: &Session, key: &KeyObject) -> Result<DestroyedKey, Error> {
    let mut done = DestroyedKey::default();
    let certificates = certificates_of(session, key)?;
    if shares_id(session, key)? {
        done.shared_certificates = certificates.len();
    } else {
        for handle in certificates {
            destroy(session, handle, "destroy a certificate")?;
            done.certificates += 1;
        }
    }

    if let Some(public) = key.public {
        destroy(session, public, "destroy the public key")?;
        done.public = true;
    }
    destroy(session, key.private, "destroy the private key")?;
    Ok(done)
}

fn certificates_of(session: &Session, key: &KeyObject) -> Result<Vec<ObjectHandle>, Error> {
    if key.id.is_empty() {
        return Ok(Vec::new());
    }
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::Id(key.id.clone()),
        ])
        .map_err(Error::pkcs11("find certificates"))
}

/// True when another private key has the same non-empty `CKA_ID`.
fn shares_id(session: &Session, key: &KeyObject) -> Result<bool, Error> {
    if key.id.is_empty() {
        return Ok(false);
    }
    let same_id = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(key.id.clone()),
        ])
        .map_err(Error::pkcs11("find private keys"))?;
    Ok(same_id
        .iter()
        .any(|h| *h != key.private))
}

fn destroy(session: &Session, handle: ObjectHandle, op: &'static str) -> Result<(), Error> {
    session
        .destroy_object(handle)
        .map_err(Error::pkcs11(op))
}
