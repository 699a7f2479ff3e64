//! Destroying one key pair: its private half, its public half and its certificates; or the
//! halves of a pair whose other half is missing.

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::{Error, KeyObject, KeySelector};

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

/// Key objects that `selector` names but that do not form a pair: private keys without a public
/// half and public keys without a private half (what an interrupted restore or another tool
/// can leave).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct UnpairedObjects {
    /// Private key objects with no public half.
    pub private: Vec<UnpairedObject>,
    /// Public key objects with no private half.
    pub public: Vec<UnpairedObject>,
}

/// One key object of [`UnpairedObjects`], with the label and id its partner was looked for by.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct UnpairedObject {
    /// The object.
    pub handle: ObjectHandle,
    /// Its `CKA_LABEL`, empty if it has none.
    pub label: String,
    /// Its `CKA_ID`, empty if it has none.
    pub id: Vec<u8>,
}

impl UnpairedObjects {
    /// Nothing was found.
    pub fn is_empty(&self) -> bool {
        self.private.is_empty() && self.public.is_empty()
    }
}

/// Finds the unpaired key objects `selector` names (see [`UnpairedObjects`]).
///
/// A private key counts as unpaired when no public key object has its `CKA_ID` (or, without an
/// id, its label); a public key, when no private key does.
pub fn find_unpaired(session: &Session, selector: &KeySelector) -> Result<UnpairedObjects, Error> {
    let mut found = UnpairedObjects::default();
    for handle in find(session, &selector.template(ObjectClass::PRIVATE_KEY))? {
        found
            .private
            .extend(unpaired(session, handle, ObjectClass::PUBLIC_KEY)?);
    }
    for handle in find(session, &selector.template(ObjectClass::PUBLIC_KEY))? {
        found
            .public
            .extend(unpaired(session, handle, ObjectClass::PRIVATE_KEY)?);
    }
    Ok(found)
}

fn find(session: &Session, template: &[Attribute]) -> Result<Vec<ObjectHandle>, Error> {
    session
        .find_objects(template)
        .map_err(Error::pkcs11("find key objects"))
}

/// The key object with its label and id, if no object of class `partner` has its id (or,
/// without an id, its label).
fn unpaired(
    session: &Session,
    handle: ObjectHandle,
    partner: ObjectClass,
) -> Result<Option<UnpairedObject>, Error> {
    let attrs = session
        .get_attributes(handle, &[AttributeType::Id, AttributeType::Label])
        .map_err(Error::pkcs11("read a key object's id and label"))?;
    let (mut id, mut label) = (Vec::new(), None);
    for attr in attrs {
        match attr {
            Attribute::Id(bytes) => id = bytes,
            Attribute::Label(bytes) => label = Some(bytes),
            _ => {}
        }
    }
    let mut template = vec![Attribute::Class(partner)];
    if !id.is_empty() {
        template.push(Attribute::Id(id.clone()));
    } else if let Some(bytes) = &label {
        template.push(Attribute::Label(bytes.clone()));
    }
    if !find(session, &template)?.is_empty() {
        return Ok(None);
    }
    Ok(Some(UnpairedObject {
        handle,
        label: label.map_or_else(String::new, |bytes| {
            String::from_utf8_lossy(&bytes).into_owned()
        }),
        id,
    }))
}

/// Destroys the objects [`find_unpaired`] found; private keys first.
pub fn destroy_unpaired(session: &Session, objects: &UnpairedObjects) -> Result<(), Error> {
    for object in &objects.private {
        destroy(
            session,
            object.handle,
            "destroy a private key without a public half",
        )?;
    }
    for object in &objects.public {
        destroy(
            session,
            object.handle,
            "destroy a public key without a private half",
        )?;
    }
    Ok(())
}
