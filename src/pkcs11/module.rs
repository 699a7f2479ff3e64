//! Loading a vendor's PKCS#11 module and owning its `C_Initialize`/`C_Finalize`.
//!
//! A module is initialised once per canonical path in this process, with OS locking. If someone
//! else initialised it first (`CKR_CRYPTOKI_ALREADY_INITIALIZED`) it is used but never finalized
//! by us; if we initialised it, it is finalized exactly once, when the last [`Module`] handle is
//! dropped or [`Module::finalize`] is called.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use tracing::{debug, warn};

use super::{rv_of, Error};

/// The environment variable that names the module when no path is given.
pub const MODULE_ENV: &str = "RUSTLS_HSM_MODULE";

/// A loaded and initialised PKCS#11 module; cheap to clone, shared per canonical path.
#[derive(Clone, Debug)]
pub struct Module {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    ctx: Pkcs11,
    /// We called `C_Initialize` successfully and so must call `C_Finalize`.
    ours: bool,
    finalized: AtomicBool,
    /// Bumped by every re-initialisation; handles from an older generation are void.
    generation: AtomicU64,
    /// Serialises re-initialisation against itself.
    reload: Mutex<()>,
}

impl Module {
    /// Loads the module at `path` (or returns the one already loaded from the same file).
    ///
    /// # Errors
    ///
    /// Each way a module fails to load has its own [`Error`] variant naming the path and the fix:
    /// a missing file, a file that is not a shared object, one built for another architecture,
    /// one without `C_GetFunctionList`, and a failing `C_Initialize`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let canonical = fs::canonicalize(path).map_err(|_| Error::ModuleMissing {
            path: path.to_owned(),
        })?;
        let mut registry = registry()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A module finalized by `finalize` is initialised anew, as a new generation of handles.
        if let Some(inner) = registry
            .get(&canonical)
            .and_then(Weak::upgrade)
            .filter(|inner| !inner.finalized.load(Ordering::Acquire))
        {
            return Ok(Self { inner });
        }
        check_shared_object(&canonical)?;
        let ctx = Pkcs11::new(&canonical).map_err(|e| load_error(&canonical, e))?;
        keep_loaded(&ctx);
        let ours = initialize(&ctx, &canonical)?;
        debug!(module = %canonical.display(), ours, "module initialised");
        let inner = Arc::new(Inner {
            path: canonical.clone(),
            ctx,
            ours,
            finalized: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            reload: Mutex::new(()),
        });
        registry.insert(canonical, Arc::downgrade(&inner));
        Ok(Self { inner })
    }

    /// Loads the module named by `path`, or else by the `RUSTLS_HSM_MODULE` variable.
    pub fn load_from(path: Option<&Path>) -> Result<Self, Error> {
        match path {
            Some(path) => Self::load(path),
            None => match std::env::var_os(MODULE_ENV) {
                Some(path) => Self::load(PathBuf::from(path)),
                None => Err(Error::ModuleNotNamed),
            },
        }
    }

    /// The module's canonical path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The cryptoki context, for the layers above.
    pub fn context(&self) -> &Pkcs11 {
        &self.inner.ctx
    }

    /// True when this process called `C_Initialize` (and so owns `C_Finalize`).
    pub fn is_ours(&self) -> bool {
        self.inner.ours
    }

    /// A counter that changes whenever the module is re-initialised.
    ///
    /// Sessions and object handles obtained under another generation must not be used.
    pub fn generation(&self) -> u64 {
        self.inner
            .generation
            .load(Ordering::Acquire)
    }

    /// Finalizes and initialises the module again, the only cure for some faults.
    ///
    /// A remoted token (p11-kit) comes back only this way after its server restarts. Every
    /// session and object handle of the old generation becomes invalid; callers must find their
    /// keys again. If `seen_generation` is older than the current one another caller already
    /// reloaded, and nothing is done. A module we did not initialise is not finalized.
    ///
    /// No other thread may be inside the module meanwhile: `C_Finalize` during another call is
    /// undefined behaviour. A token pool drains its sessions, and waits for any it is still
    /// opening, before it calls this.
    pub fn reinitialize(&self, seen_generation: u64) -> Result<(), Error> {
        let _guard = self
            .inner
            .reload
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.generation() != seen_generation {
            return Ok(());
        }
        if self.inner.ours {
            match self.inner.ctx.clone().finalize() {
                Ok(()) => {}
                Err(e) if rv_of(&e) == Some(RvError::CryptokiNotInitialized) => {}
                Err(e) => warn!(module = %self.path().display(), error = %e, "C_Finalize failed"),
            }
            match self
                .inner
                .ctx
                .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            {
                Ok(()) => {}
                Err(e) if rv_of(&e) == Some(RvError::CryptokiAlreadyInitialized) => {}
                Err(source) => {
                    return Err(Error::ModuleInitialize {
                        path: self.path().to_owned(),
                        hint: init_hint(self.path()),
                        source,
                    })
                }
            }
        }
        self.inner
            .generation
            .fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Calls `C_Finalize` now if we own the module; later calls and the drop do nothing.
    ///
    /// Call it after every session is closed, before `main` returns, so that the module's own
    /// teardown never races process exit.
    pub fn finalize(&self) -> Result<(), Error> {
        self.inner.finalize_once()
    }
}

impl Inner {
    fn finalize_once(&self) -> Result<(), Error> {
        if !self.ours
            || self
                .finalized
                .swap(true, Ordering::AcqRel)
        {
            return Ok(());
        }
        match self.ctx.clone().finalize() {
            Ok(()) => Ok(()),
            Err(e) if rv_of(&e) == Some(RvError::CryptokiNotInitialized) => Ok(()),
            Err(source) => Err(Error::Pkcs11 {
                op: "finalize module",
                source,
            }),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.finalize_once() {
            warn!(module = %self.path.display(), error = %e, "finalizing module failed");
        }
    }
}

/// Keeps the shared library mapped until the process exits.
///
/// Unloading a module runs its static destructors; done on whatever thread drops the last
/// handle, that can race the process's own exit handlers (SoftHSM crashes). A loaded module
/// costs only its mapping, so it is never unloaded.
fn keep_loaded(ctx: &Pkcs11) {
    static KEPT: OnceLock<Mutex<Vec<Pkcs11>>> = OnceLock::new();
    KEPT.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(ctx.clone());
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<Inner>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Weak<Inner>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Returns whether we initialised the module (false when someone else had).
fn initialize(ctx: &Pkcs11, path: &Path) -> Result<bool, Error> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(true),
        Err(e) if rv_of(&e) == Some(RvError::CryptokiAlreadyInitialized) => {
            debug!(module = %path.display(), "module was initialised by someone else; it will not be finalized by us");
            Ok(false)
        }
        Err(source) => Err(Error::ModuleInitialize {
            path: path.to_owned(),
            hint: init_hint(path),
            source,
        }),
    }
}

/// What to check when `C_Initialize` fails, for the modules whose needs we know.
fn init_hint(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.contains("softhsm") {
        "SoftHSM reads its configuration from the file named by SOFTHSM2_CONF (default \
         /etc/softhsm/softhsm2.conf): set SOFTHSM2_CONF to a readable config whose \
         directories.tokendir exists"
            .into()
    } else if name.contains("kryoptic") {
        "kryoptic needs KRYOPTIC_CONF set to its token configuration file".into()
    } else if name.contains("tpm2") {
        "tpm2-pkcs11 needs TPM2_PKCS11_STORE and TPM2_PKCS11_TCTI set, and the TPM (or its \
         resource manager) running"
            .into()
    } else if name.contains("p11-kit-client") {
        "the p11-kit client needs P11_KIT_SERVER_ADDRESS naming a running `p11-kit server`".into()
    } else {
        "check the vendor's documentation for the configuration file or environment variables \
         the module needs"
            .into()
    }
}

/// Catches the commonest ways a path is not a loadable module before `dlopen` gives a terse
/// message: not ELF at all, or ELF for another word size or machine.
fn check_shared_object(path: &Path) -> Result<(), Error> {
    let mut header = [0u8; 20];
    let read = fs::File::open(path).and_then(|mut f| f.read(&mut header));
    let not_so = |detail: &str| Error::ModuleNotSharedObject {
        path: path.to_owned(),
        detail: detail.to_owned(),
    };
    match read {
        Ok(n) if n >= 20 && header[..4] == *b"\x7fELF" => {}
        Ok(_) => return Err(not_so("the file does not start with an ELF header")),
        Err(e) => return Err(not_so(&e.to_string())),
    }
    // e_ident[EI_CLASS] is 1 for 32-bit and 2 for 64-bit objects.
    let class_bits = match header[4] {
        1 => 32,
        2 => 64,
        _ => return Err(not_so("the ELF header has an unknown class")),
    };
    let little_endian = header[5] == 1;
    let e_type = read_u16(&header[16..18], little_endian);
    let e_machine = read_u16(&header[18..20], little_endian);
    // ET_DYN is 3: a shared object (or a position-independent executable).
    if e_type != 3 {
        return Err(not_so("it is an ELF file but not a shared object"));
    }
    let (expected_machine, expected_name) = host_machine();
    if class_bits != usize::BITS || expected_machine.is_some_and(|m| m != e_machine) {
        return Err(Error::ModuleWrongArchitecture {
            path: path.to_owned(),
            found: format!("{class_bits}-bit, {}", machine_name(e_machine)),
            expected: format!("{}-bit, {expected_name}", usize::BITS),
        });
    }
    Ok(())
}

fn read_u16(bytes: &[u8], little_endian: bool) -> u16 {
    let pair = [bytes[0], bytes[1]];
    if little_endian {
        u16::from_le_bytes(pair)
    } else {
        u16::from_be_bytes(pair)
    }
}

fn host_machine() -> (Option<u16>, &'static str) {
    match std::env::consts::ARCH {
        "x86_64" => (Some(62), "x86-64"),
        "aarch64" => (Some(183), "AArch64"),
        "x86" => (Some(3), "x86"),
        "arm" => (Some(40), "ARM"),
        "riscv64" => (Some(243), "RISC-V"),
        "powerpc64" => (Some(21), "PowerPC64"),
        "s390x" => (Some(22), "S/390"),
        other => (None, other),
    }
}

fn machine_name(machine: u16) -> String {
    match machine {
        3 => "x86".into(),
        21 => "PowerPC64".into(),
        22 => "S/390".into(),
        40 => "ARM".into(),
        62 => "x86-64".into(),
        183 => "AArch64".into(),
        243 => "RISC-V".into(),
        other => format!("ELF machine {other}"),
    }
}

fn load_error(path: &Path, e: CkError) -> Error {
    match e {
        CkError::MissingSymbol(_) => Error::ModuleNoFunctionList {
            path: path.to_owned(),
        },
        CkError::LibraryLoading(source) => Error::ModuleLoad {
            path: path.to_owned(),
            detail: source.to_string(),
        },
        source => Error::ModuleInitialize {
            path: path.to_owned(),
            hint: init_hint(path),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_files_that_are_not_shared_objects() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("module.so");
        fs::write(&text, "not a library at all").unwrap();
        let err = Module::load(&text).unwrap_err();
        assert!(matches!(err, Error::ModuleNotSharedObject { .. }), "{err}");
    }

    #[test]
    fn refuses_other_architectures() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arm.so");
        // A 64-bit little-endian ET_DYN header for AArch64 (or x86-64 when we are AArch64).
        let mut header = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
        header.extend([0; 8]);
        header.extend(3u16.to_le_bytes());
        let other = if std::env::consts::ARCH == "aarch64" {
            62u16
        } else {
            183
        };
        header.extend(other.to_le_bytes());
        header.extend([0; 44]);
        fs::write(&path, header).unwrap();
        let err = Module::load(&path).unwrap_err();
        assert!(
            matches!(err, Error::ModuleWrongArchitecture { .. }),
            "{err}"
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Module::load("/nonexistent/libnothing.so").unwrap_err();
        assert!(err
            .to_string()
            .contains("/nonexistent/libnothing.so"));
    }
}
