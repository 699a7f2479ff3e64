//! Faults for tests, injected into a real PKCS#11 module loaded in the same process.
//!
//! `dlopen` of a path that is already loaded returns the same library, so a call made here
//! reaches the very module instance (and sessions) that the code under test uses. Nothing is
//! faked: the module itself does the work.

use std::path::Path;

/// Calls `C_CloseAllSessions(slot)` on the module at `path`, closing every session this process
/// has on that slot (the login ends with the last one, as the standard says).
///
/// Returns the module's return value (`0` is `CKR_OK`).
pub fn close_all_sessions(path: &Path, slot: u64) -> Result<u64, String> {
    #[allow(unsafe_code)]
    // SAFETY: loading a PKCS#11 module runs its initialisers, which is what the test wants; the
    // module is already loaded and initialised by the code under test, and `C_CloseAllSessions`
    // takes a plain slot id and no pointers.
    unsafe {
        let module = cryptoki_sys::Pkcs11::new(path).map_err(|e| e.to_string())?;
        let close = module
            .C_CloseAllSessions
            .as_ref()
            .map_err(|e| e.to_string())?;
        Ok(close(slot as cryptoki_sys::CK_SLOT_ID))
    }
}

/// Calls `C_Initialize(NULL)` on the module at `path`, as another library in the same process
/// would; returns the module's return value.
pub fn initialize(path: &Path) -> Result<u64, String> {
    #[allow(unsafe_code)]
    // SAFETY: `C_Initialize` with a NULL argument is defined by the standard (no locking
    // callbacks; the module may use its own).
    unsafe {
        let module = cryptoki_sys::Pkcs11::new(path).map_err(|e| e.to_string())?;
        let init = module
            .C_Initialize
            .as_ref()
            .map_err(|e| e.to_string())?;
        let rv = init(std::ptr::null_mut());
        // Stay loaded, as the other library would: unloading would drop the module's state.
        std::mem::forget(module);
        Ok(rv)
    }
}

/// Calls `C_Finalize(NULL)` on the module at `path`, behind the back of the code under test.
pub fn finalize(path: &Path) -> Result<u64, String> {
    #[allow(unsafe_code)]
    // SAFETY: `C_Finalize` takes a reserved pointer that must be NULL.
    unsafe {
        let module = cryptoki_sys::Pkcs11::new(path).map_err(|e| e.to_string())?;
        let fin = module
            .C_Finalize
            .as_ref()
            .map_err(|e| e.to_string())?;
        Ok(fin(std::ptr::null_mut()))
    }
}

/// Calls `C_GetInfo` on the module at `path`: `CKR_OK` (0) while the module is initialised,
/// `CKR_CRYPTOKI_NOT_INITIALIZED` (0x190) once it is finalized.
pub fn get_info(path: &Path) -> Result<u64, String> {
    #[allow(unsafe_code)]
    // SAFETY: the output structure is a plain C struct owned by this frame.
    unsafe {
        let module = cryptoki_sys::Pkcs11::new(path).map_err(|e| e.to_string())?;
        let get_info = module
            .C_GetInfo
            .as_ref()
            .map_err(|e| e.to_string())?;
        let mut info = std::mem::zeroed::<cryptoki_sys::CK_INFO>();
        Ok(get_info(&mut info))
    }
}
