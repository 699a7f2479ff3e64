//! The PKCS#11 calls rustls-hsm needs that cryptoki 0.12 cannot make.
//!
//! cryptoki names mechanisms through a closed list and passes every attribute value as plain
//! bytes. Two things of key backup fall outside that:
//!
//! - **mechanisms it cannot name**, such as `CKM_AES_KEY_WRAP_KWP` (RFC 5649 as PKCS#11 3.1
//!   names it, and the only form kryoptic offers): [`Functions::mechanism_info`],
//!   [`Functions::wrap_key`] and [`Functions::unwrap_key`] take a mechanism by number;
//! - **attributes whose value is a template**, such as `CKA_UNWRAP_TEMPLATE`, which fixes
//!   attributes of every key a wrapping key unwraps: [`Value::Template`] in
//!   [`Functions::generate_key`] and [`Functions::create_object`], and [`Functions::template`]
//!   to read one back.
//!
//! The calls act on sessions and objects that cryptoki opened and found: the module is the one
//! cryptoki loaded (loading a loaded library again returns the same instance), so its
//! initialisation, sessions and login state are shared. Every `unsafe` block of rustls-hsm is
//! in this crate's private `ffi` module.

use std::path::Path;

use cryptoki::error::{Error, Result};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
/// The PKCS#11 constants (`CKA_*`, `CKM_*`, ...) and types the calls here take.
pub use cryptoki_sys as sys;
pub use cryptoki_sys::{CK_ATTRIBUTE_TYPE, CK_MECHANISM_TYPE, CK_ULONG};
use zeroize::Zeroize;

mod ffi;

/// A template as read back: each attribute's type and raw value bytes.
pub type RawTemplate = Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>;

/// An attribute for a template: its type (`CKA_*`) and value.
#[derive(Clone, PartialEq, Eq)]
pub struct Attr {
    /// The attribute type, e.g. `cryptoki_sys::CKA_SENSITIVE`.
    pub kind: CK_ATTRIBUTE_TYPE,
    /// Its value.
    pub value: Value,
}

impl Attr {
    /// A `CK_BBOOL` attribute.
    pub fn bool(kind: CK_ATTRIBUTE_TYPE, value: bool) -> Self {
        Self {
            kind,
            value: Value::Bool(value),
        }
    }

    /// A `CK_ULONG` attribute (classes, key types, lengths).
    pub fn ulong(kind: CK_ATTRIBUTE_TYPE, value: CK_ULONG) -> Self {
        Self {
            kind,
            value: Value::Ulong(value),
        }
    }

    /// A byte-string attribute. The bytes are zeroized when the attribute is dropped.
    pub fn bytes(kind: CK_ATTRIBUTE_TYPE, value: impl Into<Vec<u8>>) -> Self {
        Self {
            kind,
            value: Value::Bytes(value.into()),
        }
    }

    /// An attribute whose value is an array of `CK_ULONG`, such as `CKA_ALLOWED_MECHANISMS`.
    pub fn ulongs(kind: CK_ATTRIBUTE_TYPE, values: &[CK_ULONG]) -> Self {
        Self::bytes(
            kind,
            values
                .iter()
                .flat_map(|v| v.to_ne_bytes())
                .collect::<Vec<u8>>(),
        )
    }

    /// An attribute whose value is a template (`CKA_WRAP_TEMPLATE`, `CKA_UNWRAP_TEMPLATE`,
    /// `CKA_DERIVE_TEMPLATE`).
    pub fn template(kind: CK_ATTRIBUTE_TYPE, value: Vec<Self>) -> Self {
        Self {
            kind,
            value: Value::Template(value),
        }
    }
}

/// Any attribute cryptoki can express, carried over as its raw bytes, so that templates can mix
/// cryptoki's attributes with nested ones.
impl From<&cryptoki::object::Attribute> for Attr {
    fn from(attribute: &cryptoki::object::Attribute) -> Self {
        let (kind, value) = ffi::raw_value(attribute);
        Self::bytes(kind, value)
    }
}

impl std::fmt::Debug for Attr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}={:?}", self.kind, self.value)
    }
}

/// An attribute value.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// `CK_BBOOL`.
    Bool(bool),
    /// `CK_ULONG`.
    Ulong(CK_ULONG),
    /// Bytes, zeroized on drop: templates can carry key values.
    Bytes(Vec<u8>),
    /// A nested template.
    Template(Vec<Attr>),
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bool(b) => write!(f, "{b}"),
            Self::Ulong(n) => write!(f, "{n:#x}"),
            // Byte values can be keys: only their length is shown.
            Self::Bytes(b) => write!(f, "<{} bytes>", b.len()),
            Self::Template(t) => f.debug_list().entries(t).finish(),
        }
    }
}

impl Drop for Value {
    fn drop(&mut self) {
        if let Self::Bytes(bytes) = self {
            bytes.zeroize();
        }
    }
}

/// Reads an array of `CK_ULONG` (such as `CKA_ALLOWED_MECHANISMS`) from an attribute's bytes;
/// `None` when the length is not a whole number of them.
pub fn ulongs_from_bytes(bytes: &[u8]) -> Option<Vec<CK_ULONG>> {
    const SIZE: usize = std::mem::size_of::<CK_ULONG>();
    if !bytes.len().is_multiple_of(SIZE) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(SIZE)
            .map(|c| {
                let mut word = [0; SIZE];
                word.copy_from_slice(c);
                CK_ULONG::from_ne_bytes(word)
            })
            .collect(),
    )
}

/// What a token reports of a mechanism (`CK_MECHANISM_INFO`).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct MechanismInfo {
    /// `ulMinKeySize`.
    pub min_key_size: CK_ULONG,
    /// `ulMaxKeySize`.
    pub max_key_size: CK_ULONG,
    /// `flags` (`CKF_WRAP`, `CKF_UNWRAP`, ...).
    pub flags: CK_ULONG,
}

impl MechanismInfo {
    /// `CKF_WRAP` is set.
    pub fn wrap(&self) -> bool {
        self.flags & cryptoki_sys::CKF_WRAP != 0
    }

    /// `CKF_UNWRAP` is set.
    pub fn unwrap(&self) -> bool {
        self.flags & cryptoki_sys::CKF_UNWRAP != 0
    }
}

/// The functions of a PKCS#11 module that cryptoki has loaded and initialised.
pub struct Functions {
    module: ffi::Module,
}

impl std::fmt::Debug for Functions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Functions")
            .finish_non_exhaustive()
    }
}

impl Functions {
    /// Loads the module at `path`, which cryptoki must already have loaded and initialised in
    /// this process (this crate never calls `C_Initialize` or `C_Finalize`).
    pub fn load(path: &Path) -> Result<Self> {
        Ok(Self {
            module: ffi::Module::load(path)?,
        })
    }

    /// Whether `session`, opened through cryptoki, is a session of the module instance these
    /// functions reach (`C_GetSessionInfo` answers for it, with the same slot and state).
    ///
    /// It is not when the module gives each caller its own instance, as p11-kit's client module
    /// does; then none of the calls here can be used with cryptoki's sessions.
    pub fn shares_session(&self, session: &Session) -> bool {
        let Ok(ours) = session.get_session_info() else {
            return false;
        };
        match self
            .module
            .session_info(session.handle())
        {
            Ok((slot, state)) => {
                slot == ours.slot_id().id()
                    && cryptoki::session::SessionState::try_from(state)
                        .is_ok_and(|state| state == ours.session_state())
            }
            Err(_) => false,
        }
    }

    /// `C_GetMechanismInfo` for the mechanism numbered `mechanism`.
    pub fn mechanism_info(
        &self,
        slot: cryptoki::slot::Slot,
        mechanism: CK_MECHANISM_TYPE,
    ) -> Result<MechanismInfo> {
        self.module
            .mechanism_info(slot.id(), mechanism)
    }

    /// `C_WrapKey` with a mechanism that takes no parameter, e.g. `CKM_AES_KEY_WRAP_KWP`.
    pub fn wrap_key(
        &self,
        session: &Session,
        mechanism: CK_MECHANISM_TYPE,
        wrapping_key: ObjectHandle,
        key: ObjectHandle,
    ) -> Result<Vec<u8>> {
        self.module.wrap_key(
            session.handle(),
            mechanism,
            wrapping_key.handle(),
            key.handle(),
        )
    }

    /// `C_UnwrapKey` with a mechanism that takes no parameter; returns the new key.
    pub fn unwrap_key(
        &self,
        session: &Session,
        mechanism: CK_MECHANISM_TYPE,
        unwrapping_key: ObjectHandle,
        wrapped: &[u8],
        template: &[Attr],
    ) -> Result<ObjectHandle> {
        let template = ffi::Template::new(template)?;
        self.module
            .unwrap_key(
                session.handle(),
                mechanism,
                unwrapping_key.handle(),
                wrapped,
                &template,
            )
            .map(ffi::object)
    }

    /// `C_GenerateKey` with a mechanism that takes no parameter and a template that may nest.
    pub fn generate_key(
        &self,
        session: &Session,
        mechanism: CK_MECHANISM_TYPE,
        template: &[Attr],
    ) -> Result<ObjectHandle> {
        let template = ffi::Template::new(template)?;
        self.module
            .generate_key(session.handle(), mechanism, &template)
            .map(ffi::object)
    }

    /// `C_CreateObject` with a template that may nest.
    pub fn create_object(&self, session: &Session, template: &[Attr]) -> Result<ObjectHandle> {
        let template = ffi::Template::new(template)?;
        self.module
            .create_object(session.handle(), &template)
            .map(ffi::object)
    }

    /// Reads the attribute `kind` of `object` as raw bytes (for values cryptoki cannot decode,
    /// such as a `CKA_ALLOWED_MECHANISMS` list naming mechanisms it does not know).
    ///
    /// `Ok(None)` when the object has no such attribute, the token does not know it, or its
    /// value is unavailable (sensitive).
    pub fn attribute_bytes(
        &self,
        session: &Session,
        object: ObjectHandle,
        kind: CK_ATTRIBUTE_TYPE,
    ) -> Result<Option<Vec<u8>>> {
        match self
            .module
            .attribute_bytes(session.handle(), object.handle(), kind)
        {
            Err(Error::Pkcs11(
                cryptoki::error::RvError::AttributeTypeInvalid
                | cryptoki::error::RvError::AttributeSensitive,
                _,
            )) => Ok(None),
            other => other,
        }
    }

    /// Reads the template-valued attribute `kind` of `object`: each inner attribute's type and
    /// raw value bytes (a `CK_BBOOL` is one byte).
    ///
    /// `Ok(None)` when the object has no such attribute, or the token does not know it
    /// (`CKR_ATTRIBUTE_TYPE_INVALID`).
    pub fn template(
        &self,
        session: &Session,
        object: ObjectHandle,
        kind: CK_ATTRIBUTE_TYPE,
    ) -> Result<Option<RawTemplate>> {
        match self
            .module
            .template(session.handle(), object.handle(), kind)
        {
            Err(Error::Pkcs11(cryptoki::error::RvError::AttributeTypeInvalid, _)) => Ok(None),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_values_are_not_shown() {
        let attr = Attr::bytes(sys::CKA_VALUE, vec![0x42; 32]);
        assert_eq!(format!("{attr:?}"), "0x11=<32 bytes>");
        let nested = Attr::template(sys::CKA_UNWRAP_TEMPLATE, vec![attr]);
        assert!(!format!("{nested:?}").contains("42"));
    }

    #[test]
    fn ulong_arrays_round_trip() {
        let list = [sys::CKM_AES_KEY_WRAP_PAD, sys::CKM_AES_KEY_WRAP_KWP];
        let attr = Attr::ulongs(sys::CKA_ALLOWED_MECHANISMS, &list);
        let Value::Bytes(bytes) = &attr.value else {
            panic!("an array is carried as bytes");
        };
        assert_eq!(ulongs_from_bytes(bytes), Some(list.to_vec()));
        assert_eq!(ulongs_from_bytes(&bytes[1..]), None);
    }

    #[test]
    fn nested_templates_are_laid_out_as_arrays_of_ck_attribute() {
        let template = [
            Attr::bool(sys::CKA_TOKEN, true),
            Attr::template(
                sys::CKA_UNWRAP_TEMPLATE,
                vec![
                    Attr::bool(sys::CKA_SENSITIVE, true),
                    Attr::bool(sys::CKA_EXTRACTABLE, false),
                ],
            ),
        ];
        let raw = ffi::Template::new(&template).unwrap();
        let (token, nested) = (raw.attrs()[0], raw.attrs()[1]);
        assert_eq!(token.ulValueLen, 1);
        assert_eq!(
            nested.ulValueLen as usize,
            2 * std::mem::size_of::<sys::CK_ATTRIBUTE>()
        );
    }
}
