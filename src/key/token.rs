//! [`HsmToken`]: one token's sessions and login, from which [`HsmKey`]s are taken.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use secrecy::SecretString;

use super::HsmKey;
use crate::pin::{same_pin, PinSource};
use crate::pkcs11::{find_token, KeySelector, Module, Token, TokenSelector};
use crate::pool::{default_guard_file, default_pool_size, LockoutPolicy, PoolConfig, TokenPool};
use crate::stats::StatsSnapshot;
use crate::Error;

/// A token with a pool of logged-in sessions, shared by the keys taken from it.
///
/// ```no_run
/// use rustls_hsm::HsmToken;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let token = HsmToken::builder()
///     .module_path("/usr/lib/softhsm/libsofthsm2.so")
///     .token("signer".parse()?)
///     .pin("env:HSM_PIN".parse()?)
///     .pool_size(8)
///     .build()?;
/// let key = token.key(&"tls-ec".parse()?)?;
/// # let chain = Vec::new();
/// let certified = key.certified_key(chain)?; // an Arc<rustls::sign::CertifiedKey>
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct HsmToken {
    pub(crate) pool: Arc<TokenPool>,
    pub(crate) options: KeyOptions,
}

/// Per-key behaviour set on the token builder.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyOptions {
    pub(crate) verify_before_release: bool,
    pub(crate) tls12_only: bool,
    pub(crate) inline_sign_limit: Duration,
}

/// Builds an [`HsmToken`]; every setting is validated once, in [`HsmTokenBuilder::build`].
#[derive(Debug, Default)]
pub struct HsmTokenBuilder {
    module: Option<Module>,
    module_path: Option<PathBuf>,
    token: Option<TokenSelector>,
    pin: Option<PinSource>,
    pin_secret: Option<SecretString>,
    pool_size: Option<usize>,
    checkout_timeout: Option<Duration>,
    reload_interval: Option<Duration>,
    guard_file: Option<PathBuf>,
    lockout: LockoutPolicy,
    insecure_skip_verify: bool,
    skip_session_check: bool,
    tls12_only: bool,
    inline_sign_limit: Option<Duration>,
}

impl HsmToken {
    /// Starts building a token.
    pub fn builder() -> HsmTokenBuilder {
        HsmTokenBuilder::default()
    }

    /// Takes the one key `selector` names from the token, ready to sign.
    ///
    /// # Errors
    ///
    /// No key or more than one key matches; the public half cannot be found; or the token cannot
    /// serve any TLS 1.3 scheme for this key (unless the builder allowed TLS 1.2 only).
    pub fn key(&self, selector: &KeySelector) -> Result<HsmKey, Error> {
        HsmKey::load(self, selector)
    }

    /// The token as found when the pool was (re)built.
    pub fn token_info(&self) -> Result<Token, Error> {
        let flight = self.pool.enter()?;
        Ok(flight.live().token.clone())
    }

    /// The module the token lives in.
    pub fn module(&self) -> &Module {
        self.pool.module()
    }

    /// Runs `f` on a pooled, logged-in read-write session, for operations such as creating or
    /// finding objects. Blocking; do not call it on an async executor thread.
    pub fn with_session<R>(
        &self,
        f: impl FnOnce(&cryptoki::session::Session) -> R,
    ) -> Result<R, Error> {
        let flight = self.pool.enter()?;
        let live = flight.live();
        self.pool.ensure_login(live)?;
        let checkout = self.pool.checkout(live)?;
        Ok(f(&checkout.session))
    }

    /// A snapshot of the token's counters: signatures, latency, pool, errors, recoveries.
    pub fn stats(&self) -> StatsSnapshot {
        self.pool
            .stats
            .snapshot(self.pool.pool_snapshot())
    }

    /// Closes every session and finalizes the module if we initialised it and no other
    /// [`HsmToken`] uses it. Keys taken from this token fail afterwards.
    pub fn shutdown(&self) -> Result<(), Error> {
        self.pool.shutdown();
        let shared = registry()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .filter_map(Weak::upgrade)
            .any(|p| !Arc::ptr_eq(&p, &self.pool) && p.module().path() == self.module().path());
        if !shared {
            self.module().finalize()?;
        }
        Ok(())
    }
}

impl HsmTokenBuilder {
    /// Uses an already loaded module.
    pub fn module(mut self, module: Module) -> Self {
        self.module = Some(module);
        self
    }

    /// Loads the module at `path` (default: the `RUSTLS_HSM_MODULE` variable).
    pub fn module_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.module_path = Some(path.into());
        self
    }

    /// Which token to use.
    pub fn token(mut self, selector: TokenSelector) -> Self {
        self.token = Some(selector);
        self
    }

    /// Where to read the user PIN from; read once, at build.
    pub fn pin(mut self, source: PinSource) -> Self {
        self.pin = Some(source);
        self
    }

    /// The user PIN itself, for applications with their own secret store.
    pub fn pin_secret(mut self, pin: SecretString) -> Self {
        self.pin_secret = Some(pin);
        self
    }

    /// The most sessions to keep (default: twice the CPUs, at least 4), further capped by the
    /// token's own session limits.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = Some(size);
        self
    }

    /// How long a signature waits for a free session before failing with [`Error::Busy`]
    /// (default 2 s).
    pub fn checkout_timeout(mut self, timeout: Duration) -> Self {
        self.checkout_timeout = Some(timeout);
        self
    }

    /// The least time between two module reloads after token faults (default 500 ms).
    pub fn reload_interval(mut self, interval: Duration) -> Self {
        self.reload_interval = Some(interval);
        self
    }

    /// The lockout guard's state file (default [`default_guard_file`]).
    pub fn pin_guard_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.guard_file = Some(path.into());
        self
    }

    /// When to stop logging in automatically (default: at final try).
    pub fn lockout_policy(mut self, policy: LockoutPolicy) -> Self {
        self.lockout = policy;
        self
    }

    /// Skips checking each signature in software before releasing it (checked by default).
    ///
    /// A token that returns a bad signature then breaks handshakes instead of being caught.
    pub fn insecure_skip_verify_before_release(mut self, skip: bool) -> Self {
        self.insecure_skip_verify = skip;
        self
    }

    /// Skips `C_GetSessionInfo` on each checkout (checked by default); broken sessions are
    /// still dropped when a signature fails on them.
    pub fn skip_session_check_on_checkout(mut self, skip: bool) -> Self {
        self.skip_session_check = skip;
        self
    }

    /// Signatures the token has lately made faster than this run on the calling thread; slower
    /// ones first hand an async runtime's worker over to its other tasks (default 1 ms).
    ///
    /// Handing the worker over (tokio's `block_in_place`) keeps established connections served
    /// while a slow token works, but switching threads costs tens of microseconds of CPU per
    /// signature, more than a fast token takes to sign. A signature also stays on the calling
    /// thread only when a session is free at once. `Duration::ZERO` always hands over.
    pub fn inline_sign_limit(mut self, limit: Duration) -> Self {
        self.inline_sign_limit = Some(limit);
        self
    }

    /// Accepts keys the token can serve only for TLS 1.2 (RSA without PSS, say).
    pub fn tls12_only(mut self, allow: bool) -> Self {
        self.tls12_only = allow;
        self
    }

    /// Loads the module, finds the token, logs in and opens the session pool.
    ///
    /// Building the same token twice in one process shares one pool and login; giving it a
    /// different PIN the second time is an error.
    pub fn build(self) -> Result<HsmToken, Error> {
        let module = match (self.module, self.module_path) {
            (Some(module), None) => module,
            (None, path) => Module::load_from(path.as_deref())?,
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "give the module either loaded or as a path, not both".into(),
                ))
            }
        };
        let selector = self
            .token
            .ok_or_else(|| Error::Config("no token selected".into()))?;
        let pin = match (self.pin_secret, self.pin) {
            (Some(pin), None) => pin,
            (None, Some(source)) => source.read("user PIN")?,
            (None, None) => return Err(Error::Config("no user PIN source given".into())),
            (Some(_), Some(_)) => {
                return Err(Error::Config("give a PIN source or a PIN, not both".into()))
            }
        };
        let config = PoolConfig {
            pool_size: self
                .pool_size
                .unwrap_or_else(default_pool_size),
            checkout_timeout: self
                .checkout_timeout
                .unwrap_or(Duration::from_secs(2)),
            reload_interval: self
                .reload_interval
                .unwrap_or(Duration::from_millis(500)),
            lockout: self.lockout,
            test_on_checkout: !self.skip_session_check,
        };
        if config.pool_size == 0 {
            return Err(Error::Config("pool size must be at least 1".into()));
        }
        let options = KeyOptions {
            verify_before_release: !self.insecure_skip_verify,
            tls12_only: self.tls12_only,
            inline_sign_limit: self
                .inline_sign_limit
                .unwrap_or(Duration::from_millis(1)),
        };

        let token = find_token(&module, &selector)?;
        let id = (
            module.path().to_owned(),
            token.serial.clone(),
            token.label.clone(),
        );
        let mut registry = registry()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(pool) = registry
            .get(&id)
            .and_then(Weak::upgrade)
            .filter(|pool| !pool.is_closed())
        {
            if !same_pin(pool.pin(), &pin) {
                return Err(Error::Config(format!(
                    "token {} is already in use in this process with a different PIN",
                    token.describe()
                )));
            }
            return Ok(HsmToken { pool, options });
        }
        let guard_file = self
            .guard_file
            .unwrap_or_else(default_guard_file);
        let pool = TokenPool::open(module, selector, pin, guard_file, config)?;
        registry.insert(id, Arc::downgrade(&pool));
        Ok(HsmToken { pool, options })
    }
}

type Registry = HashMap<(PathBuf, String, String), Weak<TokenPool>>;

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}
