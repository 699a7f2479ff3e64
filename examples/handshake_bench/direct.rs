//! The yardstick signer: `C_Sign` on a pre-opened, logged-in session of the calling thread,
//! through rustls-hsm's one-signature call (`scheme::sign_message`: the planned mechanism, the
//! output length check and ECDSA's DER), with no pool, no verification, no retries and no
//! hand-off of the runtime's worker. It is the least PKCS#11 glue a rustls `SigningKey` can have; rustls-hsm's
//! `HsmKey` is measured against it.
//!
//! Each thread opens its session on its first signature (the warm-up), so sessions exist before
//! measuring starts. The application's login covers them (PKCS#11 logs in per application).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use rustls_hsm::pkcs11::{KeyKind, Module};
use rustls_hsm::scheme::{sign_message, Method};

/// Distinguishes keys, so that a thread's session is not reused across modules.
static NEXT_KEY_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's session: the key id it was opened for, and the session.
    static SESSION: RefCell<Option<(u64, Session)>> = const { RefCell::new(None) };
}

/// A key on the token signed with `C_Sign` on a per-thread session.
#[derive(Clone, Debug)]
pub(crate) struct DirectKey {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: u64,
    module: Module,
    slot: Slot,
    handle: ObjectHandle,
    kind: KeyKind,
    scheme: SignatureScheme,
    method: Method,
    spki: Vec<u8>,
}

impl DirectKey {
    /// Signs for `scheme` by `method` (as rustls-hsm planned it) with the private key `handle`.
    pub(crate) fn new(
        module: Module,
        slot: Slot,
        handle: ObjectHandle,
        kind: KeyKind,
        scheme: SignatureScheme,
        method: Method,
        spki: Vec<u8>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                id: NEXT_KEY_ID.fetch_add(1, Ordering::Relaxed),
                module,
                slot,
                handle,
                kind,
                scheme,
                method,
                spki,
            }),
        })
    }
}

impl SigningKey for DirectKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&self.inner.scheme)
            .then(|| Box::new(self.clone()) as Box<dyn Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.inner.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.inner.kind {
            KeyKind::Ec(_) => SignatureAlgorithm::ECDSA,
            KeyKind::Ed25519 => SignatureAlgorithm::ED25519,
            KeyKind::Rsa(_) => SignatureAlgorithm::RSA,
        }
    }
}

impl Signer for DirectKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let inner = &self.inner;
        SESSION.with(|cell| {
            let mut held = cell.borrow_mut();
            if held.as_ref().map(|(id, _)| *id) != Some(inner.id) {
                let session = inner
                    .module
                    .context()
                    .open_rw_session(inner.slot)
                    .map_err(|e| rustls::Error::General(format!("C_OpenSession: {e}")))?;
                *held = Some((inner.id, session));
            }
            let (_, session) = held
                .as_ref()
                .expect("the session was opened just above when missing");
            sign_message(session, inner.handle, inner.kind, inner.method, message)
                .map_err(|e| rustls::Error::General(e.to_string()))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.inner.scheme
    }
}
