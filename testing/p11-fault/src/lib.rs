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
