//! The yardstick signer: `C_Sign` on a pre-opened, logged-in session of the calling thread,
//! straight through cryptoki, with no pool, no checks, no retries and no hand-off of the
//! runtime's worker. It is the least PKCS#11 glue a rustls `SigningKey` can have; rustls-hsm's
//! `HsmKey` is measured against it.
//!
//! Each thread opens its session on its first signature (the warm-up), so sessions exist before
//! measuring starts. The application's login covers them (PKCS#11 logs in per application).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use rustls_hsm::pkcs11::{Curve, KeyKind, Module};
use rustls_hsm::scheme::{HashAlg, Method};
use sha2::{Digest, Sha256, Sha384, Sha512};

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
        if matches!(method, Method::RsaPkcs1DigestInfo(_)) {
            anyhow::bail!("the direct signer does not build DigestInfo for {method}");
        }
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
        let input = token_input(inner.method, message);
        let raw = SESSION.with(|cell| {
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
            session
                .sign(&mechanism(inner.method), inner.handle, &input)
                .map_err(|e| rustls::Error::General(format!("C_Sign: {e}")))
        })?;
        encode(inner.kind, raw)
    }

    fn scheme(&self) -> SignatureScheme {
        self.inner.scheme
    }
}

/// What the token is given for `method`: the message, or its digest.
///
/// `CKM_RSA_PKCS` over a DigestInfo is not covered (the benchmark's clients never offer PKCS#1
/// v1.5 schemes): [`DirectKey::new`] refuses that method.
pub(crate) fn token_input(method: Method, message: &[u8]) -> Vec<u8> {
    match method.prehash() {
        Some(HashAlg::Sha256) => Sha256::digest(message).to_vec(),
        Some(HashAlg::Sha384) => Sha384::digest(message).to_vec(),
        Some(HashAlg::Sha512) => Sha512::digest(message).to_vec(),
        None => message.to_vec(),
    }
}

/// The cryptoki mechanism for `method`, with its parameters.
pub(crate) fn mechanism(method: Method) -> Mechanism<'static> {
    let pss = |h: HashAlg| PkcsPssParams {
        hash_alg: h.mechanism(),
        mgf: match h {
            HashAlg::Sha256 => PkcsMgfType::MGF1_SHA256,
            HashAlg::Sha384 => PkcsMgfType::MGF1_SHA384,
            HashAlg::Sha512 => PkcsMgfType::MGF1_SHA512,
        },
        s_len: (h.output_len() as u64).into(),
    };
    match method {
        Method::EcdsaHashing(HashAlg::Sha256) => Mechanism::EcdsaSha256,
        Method::EcdsaHashing(HashAlg::Sha384) => Mechanism::EcdsaSha384,
        Method::EcdsaHashing(HashAlg::Sha512) => Mechanism::EcdsaSha512,
        Method::Ed25519 => Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
        Method::RsaPssDigest(h) => Mechanism::RsaPkcsPss(pss(h)),
        Method::RsaPssHashing(h @ HashAlg::Sha256) => Mechanism::Sha256RsaPkcsPss(pss(h)),
        Method::RsaPssHashing(h @ HashAlg::Sha384) => Mechanism::Sha384RsaPkcsPss(pss(h)),
        Method::RsaPssHashing(h @ HashAlg::Sha512) => Mechanism::Sha512RsaPkcsPss(pss(h)),
        Method::RsaPkcs1Hashing(HashAlg::Sha256) => Mechanism::Sha256RsaPkcs,
        Method::RsaPkcs1Hashing(HashAlg::Sha384) => Mechanism::Sha384RsaPkcs,
        Method::RsaPkcs1Hashing(HashAlg::Sha512) => Mechanism::Sha512RsaPkcs,
        Method::RsaPkcs1DigestInfo(_) => Mechanism::RsaPkcs,
        Method::EcdsaDigest(_) => Mechanism::Ecdsa,
    }
}

/// The token's raw output as TLS sends it: DER for ECDSA (P-256 only here), as is otherwise.
fn encode(kind: KeyKind, raw: Vec<u8>) -> Result<Vec<u8>, rustls::Error> {
    match kind {
        KeyKind::Ec(Curve::P256) => p256::ecdsa::Signature::from_slice(&raw)
            .map(|s| s.to_der().as_bytes().to_vec())
            .map_err(|e| rustls::Error::General(format!("ECDSA signature out of range: {e}"))),
        KeyKind::Ec(curve) => Err(rustls::Error::General(format!(
            "the direct signer encodes P-256 only, not {curve:?}"
        ))),
        KeyKind::Ed25519 | KeyKind::Rsa(_) => Ok(raw),
    }
}
