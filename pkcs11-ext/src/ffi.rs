//! The raw calls. Every pointer handed to the module points into memory owned by the calling
//! frame (a [`Template`], a `Vec`, a local), which outlives the call; the module keeps none of
//! them afterwards, as PKCS#11 requires of these functions.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::marker::PhantomData;
use std::path::Path;
use std::ptr;

use cryptoki::context::Function;
use cryptoki::error::{Error, Result, Rv};
use cryptoki::object::ObjectHandle;
use cryptoki_sys::{
    CK_ATTRIBUTE, CK_ATTRIBUTE_TYPE, CK_BBOOL, CK_FUNCTION_LIST, CK_INTERFACE, CK_MECHANISM,
    CK_MECHANISM_INFO, CK_MECHANISM_TYPE, CK_OBJECT_HANDLE, CK_SESSION_HANDLE, CK_SESSION_INFO,
    CK_SLOT_ID, CK_ULONG, CK_UNAVAILABLE_INFORMATION,
};

use crate::{Attr, MechanismInfo, RawTemplate, Value};

/// An object handle the module returned.
pub(crate) fn object(handle: CK_OBJECT_HANDLE) -> ObjectHandle {
    // SAFETY: `new_from_raw` is unsafe only because a made-up number need not name an object;
    // this one was just returned by the module for the session the caller holds.
    unsafe { ObjectHandle::new_from_raw(handle) }
}

/// The type and value bytes of a cryptoki attribute, in the layout PKCS#11 gives them.
pub(crate) fn raw_value(attribute: &cryptoki::object::Attribute) -> (CK_ATTRIBUTE_TYPE, Vec<u8>) {
    let raw = CK_ATTRIBUTE::from(attribute);
    let Ok(n) = usize::try_from(raw.ulValueLen) else {
        return (raw.type_, Vec::new());
    };
    if raw.pValue.is_null() || n == 0 {
        return (raw.type_, Vec::new());
    }
    // SAFETY: cryptoki's conversion points `pValue` at `ulValueLen` bytes inside `attribute`,
    // which is borrowed for this whole function; they are copied before it returns.
    let value = unsafe { std::slice::from_raw_parts(raw.pValue.cast::<u8>(), n) }.to_vec();
    (raw.type_, value)
}

fn len(n: usize) -> Result<CK_ULONG> {
    CK_ULONG::try_from(n).map_err(Error::TryFromInt)
}

fn check(rv: CK_ULONG, function: Function) -> Result<()> {
    Rv::from(rv).into_result(function)
}

/// A loaded module's function list.
///
/// The table is copied out of the module: it holds plain function pointers, which stay valid
/// while `_lib` keeps the library mapped.
pub(crate) struct Module {
    _lib: cryptoki_sys::Pkcs11,
    list: CK_FUNCTION_LIST,
}

macro_rules! function {
    ($module:expr, $name:ident) => {
        $module
            .list
            .$name
            .ok_or(Error::MissingSymbol(stringify!($name)))?
    };
}

impl Module {
    pub(crate) fn load(path: &Path) -> Result<Self> {
        // SAFETY: loading a library runs its initialisers. The caller names a PKCS#11 module
        // that cryptoki has already loaded in this process, so `dlopen` returns that same
        // instance and runs nothing new; the library stays mapped while `_lib` lives.
        let lib = unsafe { cryptoki_sys::Pkcs11::new(path) }.map_err(Error::LibraryLoading)?;
        // Modules need not export each function by name (kryoptic exports only the entry
        // points), and a module may hand out more than one function table (p11-kit's client
        // gives each caller its own virtual module, initialised separately). So the table is
        // fetched exactly as cryptoki fetches it: the default C_GetInterface table when the
        // module has one, else C_GetFunctionList.
        let mut list: *mut CK_FUNCTION_LIST = ptr::null_mut();
        if let Ok(get_interface) = lib.C_GetInterface.as_ref() {
            let mut interface: *mut CK_INTERFACE = ptr::null_mut();
            // SAFETY: NULL name and version ask for the default interface, whose address the
            // module writes into a local.
            let rv = unsafe { get_interface(ptr::null_mut(), ptr::null_mut(), &mut interface, 0) };
            check(rv, Function::GetInterface)?;
            if !interface.is_null() {
                // SAFETY: a non-NULL interface points at the module's static CK_INTERFACE.
                let table = unsafe { (*interface).pFunctionList }.cast::<CK_FUNCTION_LIST>();
                // SAFETY: every interface table begins with a CK_VERSION; cryptoki takes the
                // table only from version 3, and falls back to C_GetFunctionList otherwise.
                if !table.is_null() && unsafe { (*table).version.major } >= 3 {
                    list = table;
                }
            }
        }
        if list.is_null() {
            let get_list = lib
                .C_GetFunctionList
                .as_ref()
                .map_err(|_| Error::MissingSymbol("C_GetFunctionList"))?;
            // SAFETY: the module writes a pointer to its own static function table into `list`.
            let rv = unsafe { get_list(&mut list) };
            check(rv, Function::GetFunctionList)?;
        }
        if list.is_null() {
            return Err(Error::NullFunctionPointer);
        }
        // SAFETY: `list` points at the module's function table, which lives as long as the
        // library is mapped. A version 3 table starts with the same fields as a version 2 one,
        // in the same order, and only those are read.
        let list = unsafe { *list };
        Ok(Self { _lib: lib, list })
    }

    /// `C_GetSessionInfo`: the session's slot and state.
    pub(crate) fn session_info(
        &self,
        session: CK_SESSION_HANDLE,
    ) -> Result<(CK_SLOT_ID, CK_ULONG)> {
        let get = function!(self, C_GetSessionInfo);
        let mut info = CK_SESSION_INFO {
            slotID: 0,
            state: 0,
            flags: 0,
            ulDeviceError: 0,
        };
        // SAFETY: `info` is a plain C struct owned by this frame, written by the module.
        let rv = unsafe { get(session, &mut info) };
        check(rv, Function::GetSessionInfo)?;
        Ok((info.slotID, info.state))
    }

    pub(crate) fn attribute_bytes(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        kind: CK_ATTRIBUTE_TYPE,
    ) -> Result<Option<Vec<u8>>> {
        let get = function!(self, C_GetAttributeValue);
        let mut attr = CK_ATTRIBUTE {
            type_: kind,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        };
        // SAFETY: a NULL value asks for the length only, written into `attr`.
        let rv = unsafe { get(session, object, &mut attr, 1) };
        check(rv, Function::GetAttributeValue)?;
        if attr.ulValueLen == CK_UNAVAILABLE_INFORMATION {
            return Ok(None);
        }
        let mut value = vec![0u8; usize::try_from(attr.ulValueLen).map_err(Error::TryFromInt)?];
        attr.pValue = value.as_mut_ptr().cast::<c_void>();
        // SAFETY: `value` holds exactly the length the module reported and outlives the call.
        let rv = unsafe { get(session, object, &mut attr, 1) };
        check(rv, Function::GetAttributeValue)?;
        value.truncate(usize::try_from(attr.ulValueLen).map_err(Error::TryFromInt)?);
        Ok(Some(value))
    }

    pub(crate) fn mechanism_info(
        &self,
        slot: CK_SLOT_ID,
        mechanism: CK_MECHANISM_TYPE,
    ) -> Result<MechanismInfo> {
        let get = function!(self, C_GetMechanismInfo);
        let mut info = CK_MECHANISM_INFO {
            ulMinKeySize: 0,
            ulMaxKeySize: 0,
            flags: 0,
        };
        // SAFETY: `info` is a plain C struct owned by this frame, written by the module.
        let rv = unsafe { get(slot, mechanism, &mut info) };
        check(rv, Function::GetMechanismInfo)?;
        Ok(MechanismInfo {
            min_key_size: info.ulMinKeySize,
            max_key_size: info.ulMaxKeySize,
            flags: info.flags,
        })
    }

    pub(crate) fn wrap_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        wrapping_key: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
    ) -> Result<Vec<u8>> {
        let wrap = function!(self, C_WrapKey);
        let mut mechanism = plain(mechanism);
        let mut wrapped_len: CK_ULONG = 0;
        // SAFETY: a NULL output buffer asks only for the length, written into a local.
        let rv = unsafe {
            wrap(
                session,
                &mut mechanism,
                wrapping_key,
                key,
                ptr::null_mut(),
                &mut wrapped_len,
            )
        };
        check(rv, Function::WrapKey)?;
        let mut wrapped = vec![0; usize::try_from(wrapped_len).map_err(Error::TryFromInt)?];
        // SAFETY: `wrapped` holds `wrapped_len` bytes, as the length argument says; the module
        // writes at most that many and stores the count it wrote.
        let rv = unsafe {
            wrap(
                session,
                &mut mechanism,
                wrapping_key,
                key,
                wrapped.as_mut_ptr(),
                &mut wrapped_len,
            )
        };
        check(rv, Function::WrapKey)?;
        wrapped.truncate(usize::try_from(wrapped_len).map_err(Error::TryFromInt)?);
        Ok(wrapped)
    }

    pub(crate) fn unwrap_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        unwrapping_key: CK_OBJECT_HANDLE,
        wrapped: &[u8],
        template: &Template<'_>,
    ) -> Result<CK_OBJECT_HANDLE> {
        let unwrap = function!(self, C_UnwrapKey);
        let mut mechanism = plain(mechanism);
        let mut attrs = template.attrs.clone();
        let mut handle: CK_OBJECT_HANDLE = 0;
        // SAFETY: the wrapped bytes are only read; `attrs` and the values its pointers reach
        // (owned by `template`) live until the call returns; the handle goes into a local.
        let rv = unsafe {
            unwrap(
                session,
                &mut mechanism,
                unwrapping_key,
                wrapped.as_ptr().cast_mut(),
                len(wrapped.len())?,
                attrs.as_mut_ptr(),
                len(attrs.len())?,
                &mut handle,
            )
        };
        check(rv, Function::UnwrapKey)?;
        Ok(handle)
    }

    pub(crate) fn generate_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        template: &Template<'_>,
    ) -> Result<CK_OBJECT_HANDLE> {
        let generate = function!(self, C_GenerateKey);
        let mut mechanism = plain(mechanism);
        let mut attrs = template.attrs.clone();
        let mut handle: CK_OBJECT_HANDLE = 0;
        // SAFETY: as for `unwrap_key`: the template's memory outlives the call.
        let rv = unsafe {
            generate(
                session,
                &mut mechanism,
                attrs.as_mut_ptr(),
                len(attrs.len())?,
                &mut handle,
            )
        };
        check(rv, Function::GenerateKey)?;
        Ok(handle)
    }

    pub(crate) fn create_object(
        &self,
        session: CK_SESSION_HANDLE,
        template: &Template<'_>,
    ) -> Result<CK_OBJECT_HANDLE> {
        let create = function!(self, C_CreateObject);
        let mut attrs = template.attrs.clone();
        let mut handle: CK_OBJECT_HANDLE = 0;
        // SAFETY: as for `unwrap_key`: the template's memory outlives the call.
        let rv = unsafe { create(session, attrs.as_mut_ptr(), len(attrs.len())?, &mut handle) };
        check(rv, Function::CreateObject)?;
        Ok(handle)
    }

    /// Reads a template-valued attribute in the three steps PKCS#11 prescribes: the array's
    /// size, then each element's type and length, then the values.
    pub(crate) fn template(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        kind: CK_ATTRIBUTE_TYPE,
    ) -> Result<Option<RawTemplate>> {
        let get = function!(self, C_GetAttributeValue);
        let mut outer = CK_ATTRIBUTE {
            type_: kind,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        };
        // SAFETY: a NULL value asks for the length only, written into `outer`.
        let rv = unsafe { get(session, object, &mut outer, 1) };
        check(rv, Function::GetAttributeValue)?;
        if outer.ulValueLen == CK_UNAVAILABLE_INFORMATION {
            return Ok(None);
        }
        let bytes = usize::try_from(outer.ulValueLen).map_err(Error::TryFromInt)?;
        let size = std::mem::size_of::<CK_ATTRIBUTE>();
        if !bytes.is_multiple_of(size) {
            return Err(Error::InvalidValue);
        }
        // Types set to CK_UNAVAILABLE_INFORMATION ask the module to name them (kryoptic
        // insists on it; 0 would read as CKA_CLASS repeated).
        let mut inner = vec![
            CK_ATTRIBUTE {
                type_: CK_UNAVAILABLE_INFORMATION,
                pValue: ptr::null_mut(),
                ulValueLen: 0,
            };
            bytes / size
        ];
        if inner.is_empty() {
            return Ok(Some(Vec::new()));
        }
        outer.pValue = inner.as_mut_ptr().cast::<c_void>();
        // SAFETY: `inner` has room for exactly `ulValueLen` bytes of CK_ATTRIBUTE, each with a
        // NULL value: the module fills in types and lengths only.
        let rv = unsafe { get(session, object, &mut outer, 1) };
        check(rv, Function::GetAttributeValue)?;
        let mut values = Vec::with_capacity(inner.len());
        for attr in &inner {
            if attr.ulValueLen == CK_UNAVAILABLE_INFORMATION {
                return Err(Error::InvalidValue);
            }
            values.push(vec![
                0u8;
                usize::try_from(attr.ulValueLen)
                    .map_err(Error::TryFromInt)?
            ]);
        }
        for (attr, value) in inner.iter_mut().zip(&mut values) {
            attr.pValue = value.as_mut_ptr().cast::<c_void>();
        }
        // SAFETY: every element now points at a buffer of the length the module reported, owned
        // by `values`, which outlives the call.
        let rv = unsafe { get(session, object, &mut outer, 1) };
        check(rv, Function::GetAttributeValue)?;
        Ok(Some(
            inner
                .iter()
                .map(|a| a.type_)
                .zip(values)
                .collect(),
        ))
    }
}

fn plain(mechanism: CK_MECHANISM_TYPE) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    }
}

/// A template in PKCS#11's layout. The `CK_ATTRIBUTE` array points into the caller's byte
/// values (borrowed for `'a`) and into boxes and nested templates owned here, whose heap memory
/// does not move when the `Template` does.
pub(crate) struct Template<'a> {
    attrs: Vec<CK_ATTRIBUTE>,
    // Boxed so that each value keeps its address whatever is pushed after it.
    #[allow(clippy::vec_box)]
    _bools: Vec<Box<CK_BBOOL>>,
    #[allow(clippy::vec_box)]
    _ulongs: Vec<Box<CK_ULONG>>,
    _nested: Vec<Template<'a>>,
    _values: PhantomData<&'a [Attr]>,
}

impl<'a> Template<'a> {
    #[cfg(test)]
    pub(crate) fn attrs(&self) -> &[CK_ATTRIBUTE] {
        &self.attrs
    }

    pub(crate) fn new(template: &'a [Attr]) -> Result<Self> {
        let mut built = Self {
            attrs: Vec::with_capacity(template.len()),
            _bools: Vec::new(),
            _ulongs: Vec::new(),
            _nested: Vec::new(),
            _values: PhantomData,
        };
        for attr in template {
            let (value, value_len): (*mut c_void, usize) = match &attr.value {
                Value::Bool(b) => {
                    let mut boxed = Box::new(CK_BBOOL::from(*b));
                    let at: *mut CK_BBOOL = &mut *boxed;
                    built._bools.push(boxed);
                    (at.cast(), std::mem::size_of::<CK_BBOOL>())
                }
                Value::Ulong(n) => {
                    let mut boxed = Box::new(*n);
                    let at: *mut CK_ULONG = &mut *boxed;
                    built._ulongs.push(boxed);
                    (at.cast(), std::mem::size_of::<CK_ULONG>())
                }
                // The module only reads input values.
                Value::Bytes(bytes) => (bytes.as_ptr().cast_mut().cast(), bytes.len()),
                Value::Template(inner) => {
                    let mut nested = Template::new(inner)?;
                    let at = nested.attrs.as_mut_ptr();
                    let size = nested.attrs.len() * std::mem::size_of::<CK_ATTRIBUTE>();
                    built._nested.push(nested);
                    (at.cast(), size)
                }
            };
            built.attrs.push(CK_ATTRIBUTE {
                type_: attr.kind,
                pValue: value,
                ulValueLen: len(value_len)?,
            });
        }
        Ok(built)
    }
}
