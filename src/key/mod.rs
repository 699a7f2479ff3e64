//! The rustls-facing signing key: [`HsmKey`] implements `rustls::sign::SigningKey` for a key on
//! a token, choosing schemes from what the token can do and signing through the token's pool.

mod token;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use rustls::pki_types::{CertificateDer, SubjectPublicKeyInfoDer};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use tracing::{debug, debug_span, trace};

use crate::pkcs11::{
    find_key, find_key_on, rv_name, rv_of, spki_fingerprint, KeyKind, KeySelector,
};
use crate::pool::{Checkout, Fault, Flight, Live, TokenPool};
use crate::scheme::{scheme_name, sign_message, Method, PublicKeyVerifier, SchemePlan, SignError};
use crate::stats::Outcome;
use crate::Error;

pub use token::{HsmToken, HsmTokenBuilder};

/// A private key on a token, usable by rustls as a `SigningKey`. Cheap to clone.
#[derive(Clone)]
pub struct HsmKey {
    inner: Arc<KeyInner>,
}

#[derive(Debug)]
struct KeyInner {
    pool: Arc<TokenPool>,
    label: String,
    id: Vec<u8>,
    kind: KeyKind,
    spki: Vec<u8>,
    fingerprint: String,
    verifier: PublicKeyVerifier,
    verify_before_release: bool,
    /// Signatures quicker than this (µs) are made on the calling thread.
    inline_limit_us: u64,
    /// This key's recent `C_Sign` time in µs (see `folded_sign_time`); `u64::MAX` until the
    /// first signature.
    recent_sign_us: AtomicU64,
    /// Handle and plan for one module generation; redone after any reload.
    resolved: RwLock<Resolved>,
}

#[derive(Clone, Debug)]
struct Resolved {
    generation: u64,
    handle: Option<cryptoki::object::ObjectHandle>,
    plan: Arc<SchemePlan>,
}

impl HsmKey {
    fn load(token: &HsmToken, selector: &KeySelector) -> Result<Self, Error> {
        let pool = &token.pool;
        let flight = pool.enter()?;
        let live = flight.live();
        pool.ensure_login(live)?;
        let checkout = pool.checkout(live)?;
        let found = find_key_on(&checkout.session, selector, &live.token, true)?;
        drop(checkout);

        let plan = SchemePlan::for_key(found.kind, &live.mechanisms);
        let name = found.describe();
        if plan.usable().next().is_none() || (!plan.serves_tls13() && !token.options.tls12_only) {
            return Err(Error::NoTls13 {
                token: live.token.describe(),
                key: name,
                gap: plan.tls13_gap(),
            });
        }
        let verifier = PublicKeyVerifier::new(&found.spki).map_err(|e| Error::Verify {
            token: live.token.describe(),
            key: name.clone(),
            source: e,
        })?;
        debug!(key = %found.label, kind = %found.kind, schemes = ?plan.usable().map(|(s, _)| scheme_name(s)).collect::<Vec<_>>(), "key loaded");
        Ok(Self {
            inner: Arc::new(KeyInner {
                pool: pool.clone(),
                label: found.label.clone(),
                id: found.id.clone(),
                kind: found.kind,
                fingerprint: spki_fingerprint(&found.spki),
                spki: found.spki,
                verifier,
                verify_before_release: token.options.verify_before_release,
                inline_limit_us: u64::try_from(
                    token
                        .options
                        .inline_sign_limit
                        .as_micros(),
                )
                .unwrap_or(u64::MAX),
                recent_sign_us: AtomicU64::new(u64::MAX),
                resolved: RwLock::new(Resolved {
                    generation: live.generation,
                    handle: Some(found.private),
                    plan: Arc::new(plan),
                }),
            }),
        })
    }

    /// The key's public half as DER SubjectPublicKeyInfo.
    pub fn spki(&self) -> &[u8] {
        &self.inner.spki
    }

    /// SHA-256 of the SubjectPublicKeyInfo, lowercase hex.
    pub fn fingerprint(&self) -> &str {
        &self.inner.fingerprint
    }

    /// Key type and size.
    pub fn kind(&self) -> KeyKind {
        self.inner.kind
    }

    /// `CKA_LABEL`.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// `CKA_ID`.
    pub fn id(&self) -> &[u8] {
        &self.inner.id
    }

    /// The schemes this key can serve on its token, with their methods.
    pub fn schemes(&self) -> Arc<SchemePlan> {
        self.read_resolved().plan
    }

    /// The scheme rustls-hsm prefers for this key (first usable in preference order).
    pub fn default_scheme(&self) -> Option<SignatureScheme> {
        self.schemes()
            .usable()
            .next()
            .map(|(s, _)| s)
    }

    /// Pairs the key with its certificate chain (leaf first) for rustls.
    ///
    /// # Errors
    ///
    /// [`Error::CertificateMismatch`], naming both fingerprints, when the leaf certificate's
    /// public key is not this key's.
    pub fn certified_key(
        &self,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<CertifiedKey>, Error> {
        let leaf = chain
            .first()
            .ok_or_else(|| Error::Config("the certificate chain is empty".into()))?;
        let cert_spki = crate::pkcs11::spki_of_certificate(leaf)
            .ok_or_else(|| Error::Config("the leaf certificate cannot be parsed".into()))?;
        if cert_spki != self.inner.spki {
            return Err(Error::CertificateMismatch {
                key: self.describe(),
                cert_fingerprint: spki_fingerprint(&cert_spki),
                key_fingerprint: self.inner.fingerprint.clone(),
            });
        }
        Ok(Arc::new(CertifiedKey::new(chain, Arc::new(self.clone()))))
    }

    /// Signs `message` for `scheme` on the token, blocking until done.
    ///
    /// The output is what TLS sends (DER for ECDSA). Unless switched off on the builder, the
    /// signature is verified in software first; a failure is counted and returned, never the
    /// signature.
    pub fn sign_with(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, Error> {
        let pool = &self.inner.pool;
        let flight = match pool.enter() {
            Ok(flight) => flight,
            Err(e) => {
                pool.stats
                    .signature(scheme, Outcome::Refused);
                return Err(e);
            }
        };
        self.sign_in_flight(&flight, scheme, message, None)
    }

    /// Signs at once when that is cheaper than handing an async runtime's worker over: the
    /// token signed with this key quickly of late, it is up, and a session is free now. `None`,
    /// with nothing attempted, otherwise.
    fn sign_now(&self, scheme: SignatureScheme, message: &[u8]) -> Option<Result<Vec<u8>, Error>> {
        let recent = self
            .inner
            .recent_sign_us
            .load(Ordering::Relaxed);
        if recent > self.inner.inline_limit_us {
            return None;
        }
        let pool = &self.inner.pool;
        let flight = pool.enter_now()?;
        let checkout = pool.try_checkout(flight.live())?;
        Some(self.sign_in_flight(&flight, scheme, message, Some(checkout)))
    }

    /// Signs within a flight, on `first` if given (else a session checked out), retrying once
    /// after a failed software check; counts the outcome.
    fn sign_in_flight(
        &self,
        flight: &Flight,
        scheme: SignatureScheme,
        message: &[u8],
        first: Option<Checkout<'_>>,
    ) -> Result<Vec<u8>, Error> {
        let pool = &self.inner.pool;
        let live = flight.live();
        let _span = debug_span!(
            "sign",
            token = %live.token.label,
            key = %self.inner.label,
            scheme = %scheme_name(scheme)
        )
        .entered();
        let mut result = self.sign_verified(live, scheme, message, first);
        if matches!(result, Err(Error::Verify { .. })) {
            // A handle that names another object now (the module was re-initialised behind
            // our back, say) signs with the wrong key: find the key again and try once more.
            self.forget_handle(live.generation);
            pool.stats.retry();
            result = self.sign_verified(live, scheme, message, None);
        }
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(Error::Busy { .. } | Error::Unavailable { .. }) => Outcome::Refused,
            Err(Error::Verify { .. }) => Outcome::VerifyFailed,
            Err(_) => Outcome::Failed,
        };
        pool.stats.signature(scheme, outcome);
        result
    }

    /// Signs, then verifies in software unless switched off; a failed check withholds the
    /// signature.
    fn sign_verified<'l>(
        &self,
        live: &'l Arc<Live>,
        scheme: SignatureScheme,
        message: &[u8],
        first: Option<Checkout<'l>>,
    ) -> Result<Vec<u8>, Error> {
        let signature = self.sign_on(live, scheme, message, first)?;
        if self.inner.verify_before_release {
            if let Err(source) = self
                .inner
                .verifier
                .verify(scheme, message, &signature)
            {
                self.inner
                    .pool
                    .stats
                    .error("verify_failed");
                return Err(Error::Verify {
                    token: self.inner.pool.name.clone(),
                    key: self.describe(),
                    source,
                });
            }
        }
        Ok(signature)
    }

    /// One signature on a pooled session (`first`, if given, for the first try), with at most
    /// one retry after a session, handle or login fault.
    fn sign_on<'l>(
        &self,
        live: &'l Arc<Live>,
        scheme: SignatureScheme,
        message: &[u8],
        mut first: Option<Checkout<'l>>,
    ) -> Result<Vec<u8>, Error> {
        let pool = &self.inner.pool;
        let mut retried = false;
        loop {
            let (handle, method) = self.resolve(live, scheme)?;
            let mut checkout = match first.take() {
                Some(checkout) => checkout,
                None => pool.checkout(live)?,
            };
            let started = Instant::now();
            let result = sign_message(&checkout.session, handle, self.inner.kind, method, message);
            let took = started.elapsed();
            pool.stats.latency(took);
            trace!(
                key = %self.inner.label,
                mechanism = %method.mechanism(),
                ok = result.is_ok(),
                micros = took.as_micros() as u64,
                "C_Sign"
            );
            let err = match result {
                Ok(signature) => {
                    self.note_sign_time(took);
                    return Ok(signature);
                }
                Err(err) => err,
            };
            let (rv, fault) = match &err {
                SignError::Token(e) => {
                    let rv = rv_of(e);
                    (rv, rv.map_or(Fault::Other, Fault::of))
                }
                // Output that does not fit the key (a 132-byte signature from a P-256 key, say)
                // means the handle now names another object.
                _ => (None, Fault::Handle),
            };
            match rv {
                Some(rv) => pool.stats.error(&rv_name(rv)),
                None => pool.stats.error("bad_signature_output"),
            }
            debug!(key = %self.inner.label, scheme = %scheme_name(scheme), mechanism = %method.mechanism(), rv = ?rv, ?fault, "signature failed");
            match fault {
                Fault::Session => checkout.session.mark_broken(),
                Fault::Handle => {
                    checkout.session.mark_broken();
                    self.forget_handle(live.generation);
                }
                Fault::Login | Fault::Other | Fault::Pin | Fault::Token => {}
            }
            drop(checkout);
            if fault == Fault::Token {
                pool.fault(live, err.to_string());
            }
            let retryable = matches!(fault, Fault::Session | Fault::Handle | Fault::Login);
            if retried || !retryable {
                return Err(Error::Sign {
                    token: pool.name.clone(),
                    key: self.describe(),
                    scheme: scheme_name(scheme),
                    source: err,
                });
            }
            retried = true;
            pool.stats.retry();
            // Closing every session also ends the login: check it before the retry.
            pool.ensure_login(live)?;
        }
    }

    /// The key handle and method for the live generation, finding the key again (by
    /// `CKA_ID` and label, checked against the loaded public key) when the handle is void.
    fn resolve(
        &self,
        live: &Live,
        scheme: SignatureScheme,
    ) -> Result<(cryptoki::object::ObjectHandle, Method), Error> {
        let current = self.read_resolved();
        let resolved = match current.handle {
            Some(handle) if current.generation == live.generation => (handle, current.plan),
            _ => self.refind(live)?,
        };
        let method = resolved
            .1
            .method(scheme)
            .ok_or_else(|| Error::SchemeUnavailable {
                token: self.inner.pool.name.clone(),
                key: self.describe(),
                scheme: scheme_name(scheme),
            })?;
        Ok((resolved.0, method))
    }

    fn refind(
        &self,
        live: &Live,
    ) -> Result<(cryptoki::object::ObjectHandle, Arc<SchemePlan>), Error> {
        let pool = &self.inner.pool;
        pool.ensure_login(live)?;
        let selector = KeySelector {
            label: Some(self.inner.label.clone()),
            id: (!self.inner.id.is_empty()).then(|| self.inner.id.clone()),
            ..KeySelector::default()
        };
        let checkout = pool.checkout(live)?;
        let found = find_key(&checkout.session, &selector, &live.token.label, true)?;
        drop(checkout);
        if found.spki != self.inner.spki {
            return Err(Error::KeyChanged {
                key: self.describe(),
                expected: self.inner.fingerprint.clone(),
                found: spki_fingerprint(&found.spki),
            });
        }
        let plan = Arc::new(SchemePlan::for_key(found.kind, &live.mechanisms));
        *self
            .inner
            .resolved
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Resolved {
            generation: live.generation,
            handle: Some(found.private),
            plan: plan.clone(),
        };
        debug!(key = %self.inner.label, generation = live.generation, "key found again");
        Ok((found.private, plan))
    }

    /// Folds one `C_Sign` time into the key's recent signing time.
    fn note_sign_time(&self, took: std::time::Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let recent = &self.inner.recent_sign_us;
        let before = recent.load(Ordering::Relaxed);
        recent.store(folded_sign_time(before, us), Ordering::Relaxed);
    }

    fn forget_handle(&self, generation: u64) {
        let mut resolved = self
            .inner
            .resolved
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if resolved.generation == generation {
            resolved.handle = None;
        }
    }

    fn read_resolved(&self) -> Resolved {
        self.inner
            .resolved
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn describe(&self) -> String {
        format!(
            "`{}` (id {})",
            self.inner.label,
            hex::encode(&self.inner.id)
        )
    }
}

impl fmt::Debug for HsmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmKey")
            .field("token", &self.inner.pool.name)
            .field("label", &self.inner.label)
            .field("id", &hex::encode(&self.inner.id))
            .field("kind", &self.inner.kind)
            .field("fingerprint", &self.inner.fingerprint)
            .finish_non_exhaustive()
    }
}

impl SigningKey for HsmKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let (scheme, _) = self.schemes().choose(offered)?;
        Some(Box::new(HsmSigner {
            key: self.clone(),
            scheme,
        }))
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

/// Signs for one scheme chosen in a handshake.
#[derive(Debug)]
struct HsmSigner {
    key: HsmKey,
    scheme: SignatureScheme,
}

impl Signer for HsmSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let key = &self.key;
        let result = match key.sign_now(self.scheme, message) {
            Some(result) => result,
            None => off_executor(|| key.sign_with(self.scheme, message)),
        };
        result.map_err(|e| {
            debug!(error = %e, "handshake signature failed");
            rustls::Error::from(e)
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// A key's recent signing time after a signature that took `us`: a quicker signature sets it, a
/// slower one lifts it by an eighth of the difference.
///
/// The token's own signing time shows in its quickest signatures. On a busy machine a soft
/// token's signatures also wait for a CPU, which says nothing about whether handing the worker
/// over would help, so such waits lift the figure only slowly; a token that turns slow (a remote
/// HSM whose latency rises tenfold, say) lifts it past the limit within one or two signatures.
fn folded_sign_time(before: u64, us: u64) -> u64 {
    if us <= before {
        us
    } else {
        before + (us - before) / 8
    }
}

/// Runs a blocking token call so that it does not stall an async runtime.
///
/// rustls signs synchronously inside the handshake. On a multi-threaded tokio runtime the call
/// runs under `block_in_place`, which hands this worker's other tasks to another worker while
/// the token works, so established connections keep being served. Elsewhere (a plain thread, or
/// a current-thread runtime, where nothing can take over) it simply blocks. Handshake signatures
/// that a token makes quickly skip this (see `HsmTokenBuilder::inline_sign_limit`).
pub(crate) fn off_executor<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};

    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::folded_sign_time;

    #[test]
    fn signing_time_follows_quick_signatures_and_rises_slowly() {
        // The first signature sets it.
        assert_eq!(folded_sign_time(u64::MAX, 700), 700);
        // A soft token waiting for a CPU now and then stays near its own time.
        let mut recent = 700;
        for us in [1300, 1400, 700, 1300, 1250] {
            recent = folded_sign_time(recent, us);
        }
        assert!(recent < 1000, "{recent}");
        // A token that turns tenfold slower is past a 1 ms limit after one such signature.
        assert!(folded_sign_time(700, 7000) > 1000);
    }
}
