//! Sessions and login for one token: an r2d2 pool of sessions, one long-lived session that
//! holds the login, the lockout guard, and recovery from faults.
//!
//! Return codes are sorted into three kinds. Session faults drop the session and retry once on
//! a fresh one. Token and module faults make the token unavailable: signatures fail at once
//! while a background thread finalizes and re-initialises the module at most once per
//! interval, logs in again and lets every key find itself again. PIN faults are never retried.

mod gate;
mod guard;
mod login;
mod manager;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use cryptoki::error::RvError;
use cryptoki::session::Session;
use secrecy::SecretString;
use tracing::{debug, info, warn};

use self::gate::{Gate, Permit};
use self::manager::{SessionManager, TracingErrorHandler};
use crate::pkcs11::{find_token, rv_name, MechanismList, Module, Token, TokenSelector};
use crate::stats::{PoolSnapshot, Stats};
use crate::Error;

pub use guard::default_guard_file;
pub use login::LockoutPolicy;

/// How a return code is handled.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Fault {
    /// The key handle is void or names another object: find the key again, retry once.
    Handle,
    /// Not logged in: log in once, then retry once.
    Login,
    /// Anything else: fail this signature only.
    Other,
    /// Wrong or locked PIN: never retried, never reloads.
    Pin,
    /// The session is void: drop it and retry once on a fresh one.
    Session,
    /// The token or module is gone: make the token unavailable and reload in the background.
    Token,
}

impl Fault {
    pub(crate) fn of(rv: RvError) -> Self {
        match rv {
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::OperationActive
            | RvError::OperationNotInitialized => Self::Session,
            // A key checked at load to be a signing key of this type that is suddenly of another
            // type, or may not sign, means the handle now names another object.
            RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid
            | RvError::KeyTypeInconsistent
            | RvError::KeyFunctionNotPermitted => Self::Handle,
            RvError::UserNotLoggedIn => Self::Login,
            RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::GeneralError
            | RvError::CryptokiNotInitialized
            | RvError::SlotIdInvalid => Self::Token,
            RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired => Self::Pin,
            _ => Self::Other,
        }
    }
}

/// Settings of a token's pool, validated by the builder.
#[derive(Clone, Debug)]
pub(crate) struct PoolConfig {
    pub(crate) pool_size: usize,
    pub(crate) checkout_timeout: Duration,
    pub(crate) reload_interval: Duration,
    pub(crate) lockout: LockoutPolicy,
    pub(crate) test_on_checkout: bool,
}

/// One token's sessions, login and recovery state, shared by its keys.
pub(crate) struct TokenPool {
    module: Module,
    selector: TokenSelector,
    pin: SecretString,
    guard: guard::PinGuard,
    config: PoolConfig,
    state: RwLock<State>,
    recovery: Mutex<Recovery>,
    recovered: Condvar,
    /// Live tokens a fault took down, kept until the reload drains them: dropping one closes
    /// its sessions, which must not race the module's re-initialisation.
    retired: Mutex<Vec<Arc<Live>>>,
    pub(crate) stats: Stats,
    /// Names the token in errors, fixed at first load.
    pub(crate) name: String,
}

#[derive(Debug)]
enum State {
    Closed,
    Down(String),
    Up(Arc<Live>),
}

#[derive(Debug, Default)]
struct Recovery {
    /// A background thread is reloading.
    running: bool,
    /// An attempt is in progress right now.
    attempting: bool,
    /// Bumped after every attempt, so waiters see that one finished.
    attempts: u64,
}

/// The token as loaded in one module generation.
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) generation: u64,
    pub(crate) token: Token,
    pub(crate) mechanisms: MechanismList,
    login_session: Mutex<Option<Session>>,
    pool: r2d2::Pool<SessionManager>,
    gate: Gate,
    session_count_hit: Arc<AtomicBool>,
    /// A token fault seen by the session manager (see [`SessionManager`]).
    token_fault: Arc<Mutex<Option<(RvError, String)>>>,
    closing: Arc<AtomicBool>,
    /// Pooled sessions open now; see [`drain`].
    open_sessions: Arc<AtomicUsize>,
    in_flight: AtomicUsize,
    max_size: u32,
}

/// A checked-out session with its gate permit; back to the pool on drop.
pub(crate) struct Checkout<'a> {
    pub(crate) session: r2d2::PooledConnection<SessionManager>,
    _permit: Permit<'a>,
}

/// Counts an operation in flight on a [`Live`] until dropped.
pub(crate) struct Flight(Arc<Live>);

impl Flight {
    fn new(live: Arc<Live>) -> Self {
        live.in_flight
            .fetch_add(1, Ordering::AcqRel);
        Self(live)
    }

    pub(crate) fn live(&self) -> &Arc<Live> {
        &self.0
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for TokenPool {
    /// Closes every session before the module handle goes (and with it, perhaps, `C_Finalize`).
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for TokenPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenPool")
            .field("token", &self.name)
            .field("module", &self.module.path())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TokenPool {
    /// Finds the token, logs in and opens the pool.
    pub(crate) fn open(
        module: Module,
        selector: TokenSelector,
        pin: SecretString,
        guard_file: std::path::PathBuf,
        config: PoolConfig,
    ) -> Result<Arc<Self>, Error> {
        let mut pool = Self {
            module,
            selector,
            pin,
            guard: guard::PinGuard::new(guard_file),
            config,
            state: RwLock::new(State::Down("not loaded yet".into())),
            recovery: Mutex::new(Recovery::default()),
            recovered: Condvar::new(),
            retired: Mutex::new(Vec::new()),
            stats: Stats::default(),
            name: String::new(),
        };
        let live = pool.load()?;
        pool.name = live.token.describe();
        info!(
            token = %live.token.label,
            serial = %live.token.serial,
            pool_size = live.max_size,
            "token ready"
        );
        *pool.write_state() = State::Up(Arc::new(live));
        Ok(Arc::new(pool))
    }

    pub(crate) fn module(&self) -> &Module {
        &self.module
    }

    pub(crate) fn pin(&self) -> &SecretString {
        &self.pin
    }

    /// The live token, entering a flight; fails fast (after waiting for an attempt already in
    /// progress, at most the checkout timeout) while the token is down.
    pub(crate) fn enter(self: &Arc<Self>) -> Result<Flight, Error> {
        if let Some(flight) = self.enter_now() {
            return Ok(flight);
        }
        if self.is_closed() {
            return Err(Error::ShutDown {
                token: self.name.clone(),
            });
        }
        Ok(Flight::new(self.wait_for_recovery()?))
    }

    /// The live token if it is up right now, entering a flight; `None` rather than waiting
    /// for a reload (or when shut down).
    pub(crate) fn enter_now(&self) -> Option<Flight> {
        match &*self.read_state() {
            State::Up(live) if live.generation == self.module.generation() => {
                Some(Flight::new(live.clone()))
            }
            _ => None,
        }
    }

    /// A session if one is free right now: no waiting, no opening, nothing counted.
    pub(crate) fn try_checkout<'a>(&self, live: &'a Live) -> Option<Checkout<'a>> {
        // The full checkout caps the pool first when the token ran out of sessions.
        if live
            .session_count_hit
            .load(Ordering::Acquire)
        {
            return None;
        }
        let (permit, _) = live.gate.acquire(Duration::ZERO)?;
        let session = live.pool.try_get()?;
        Some(Checkout {
            session,
            _permit: permit,
        })
    }

    /// Checks out a session, waiting at most the checkout timeout.
    pub(crate) fn checkout<'a>(self: &Arc<Self>, live: &'a Live) -> Result<Checkout<'a>, Error> {
        if live
            .session_count_hit
            .swap(false, Ordering::AcqRel)
        {
            let open = live.pool.state().connections as usize;
            let now = live.gate.shrink_to(open);
            warn!(token = %live.token.label, sessions = now, "token has no more sessions (CKR_SESSION_COUNT); pool capped");
            self.stats.error("CKR_SESSION_COUNT");
        }
        let timeout = self.config.checkout_timeout;
        let started = Instant::now();
        let busy = || Error::Busy {
            token: self.name.clone(),
            waited: timeout,
        };
        let Some((permit, waited)) = live.gate.acquire(timeout) else {
            self.stats.pool_wait();
            self.stats.pool_timeout();
            return Err(busy());
        };
        let session = match live.pool.try_get() {
            Some(session) => {
                if waited {
                    self.stats.pool_wait();
                }
                session
            }
            None => {
                self.stats.pool_wait();
                self.wait_for_session(live, started)?
            }
        };
        Ok(Checkout {
            session,
            _permit: permit,
        })
    }

    /// Waits for a pooled session until the checkout timeout, in short steps so that a token
    /// fault seen while opening or checking sessions fails the checkout at once and starts a
    /// reload, instead of waiting out the timeout on a token that is gone.
    fn wait_for_session(
        self: &Arc<Self>,
        live: &Live,
        started: Instant,
    ) -> Result<r2d2::PooledConnection<SessionManager>, Error> {
        const STEP: Duration = Duration::from_millis(50);
        let timeout = self.config.checkout_timeout;
        loop {
            let fault = live
                .token_fault
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone();
            if let Some((rv, reason)) = fault {
                self.fault(live, format!("opening a session: {reason}"));
                self.stats.error(&rv_name(rv));
                self.stats.fail_fast();
                return Err(Error::Unavailable {
                    token: self.name.clone(),
                    reason,
                    interval: self.config.reload_interval,
                });
            }
            let left = timeout.saturating_sub(started.elapsed());
            match live.pool.get_timeout(left.min(STEP)) {
                Ok(session) => return Ok(session),
                Err(e) if left <= STEP => {
                    self.stats.pool_timeout();
                    debug!(error = %e, "pool checkout failed");
                    return Err(Error::Busy {
                        token: self.name.clone(),
                        waited: timeout,
                    });
                }
                Err(_) => {}
            }
        }
    }

    /// Logs in again if the token forgot the login (all sessions were closed, say).
    pub(crate) fn ensure_login(&self, live: &Live) -> Result<(), Error> {
        let mut holder = live
            .login_session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let alive = holder
            .as_ref()
            .is_some_and(|s| s.get_session_info().is_ok());
        if !alive {
            *holder = None;
            let session = self
                .module
                .context()
                .open_ro_session(live.token.slot)
                .map_err(crate::pkcs11::Error::pkcs11("open the login session"))?;
            *holder = Some(session);
        }
        let session = holder
            .as_ref()
            .expect("the login session was opened just above when missing");
        self.login(&live.token, session)
    }

    /// Marks the token down after a token or module fault and starts recovery.
    pub(crate) fn fault(self: &Arc<Self>, live: &Live, reason: String) {
        {
            let mut state = self.write_state();
            if let State::Up(current) = &*state {
                if current.generation != live.generation {
                    return;
                }
                warn!(token = %live.token.label, reason = %reason, "token unavailable; reloading the module in the background");
                self.retire(std::mem::replace(&mut *state, State::Down(reason)));
            }
        }
        self.start_recovery();
    }

    pub(crate) fn pool_snapshot(&self) -> PoolSnapshot {
        match &*self.read_state() {
            State::Up(live) => {
                let state = live.pool.state();
                PoolSnapshot {
                    max_size: live.gate.permits() as u32,
                    open: state.connections,
                    in_use: live.gate.in_use() as u32,
                    available: true,
                }
            }
            _ => PoolSnapshot::default(),
        }
    }

    /// True once [`TokenPool::shutdown`] ran.
    pub(crate) fn is_closed(&self) -> bool {
        matches!(*self.read_state(), State::Closed)
    }

    /// Closes every session; later calls fail with [`Error::ShutDown`].
    pub(crate) fn shutdown(&self) {
        let old = std::mem::replace(&mut *self.write_state(), State::Closed);
        if let State::Up(live) = old {
            drain(live);
        }
        for live in self.take_retired() {
            drain(live);
        }
    }

    /// Keeps a live token taken down for the reload to drain.
    fn retire(&self, old: State) {
        if let State::Up(live) = old {
            self.retired
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(live);
        }
    }

    fn take_retired(&self) -> Vec<Arc<Live>> {
        std::mem::take(
            &mut *self
                .retired
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    fn login(&self, token: &Token, session: &Session) -> Result<(), Error> {
        let result = login::login(
            &self.module,
            token,
            session,
            &self.pin,
            &self.guard,
            self.config.lockout,
        );
        match &result {
            Ok(login::LoginOutcome::LoggedIn) => self.stats.login(),
            Ok(login::LoginOutcome::AlreadyLoggedIn) => {}
            Err(Error::PinRefused { .. }) => self.stats.guard_refusal(),
            Err(Error::PinIncorrect { .. }) => {
                self.stats.login();
                self.stats.error("CKR_PIN_INCORRECT");
            }
            Err(Error::PinLocked { .. }) => self.stats.error("CKR_PIN_LOCKED"),
            Err(_) => {}
        }
        result.map(drop)
    }

    /// Finds the token, reads its mechanisms, logs in and builds the pool.
    fn load(&self) -> Result<Live, Error> {
        let generation = self.module.generation();
        let token = find_token(&self.module, &self.selector)?;
        let mechanisms = MechanismList::read(&self.module, token.slot)?;
        let login_session = self
            .module
            .context()
            .open_ro_session(token.slot)
            .map_err(crate::pkcs11::Error::pkcs11("open the login session"))?;
        self.login(&token, &login_session)?;

        let max_size = pool_cap(self.config.pool_size, &token);
        let session_count_hit = Arc::new(AtomicBool::new(false));
        let closing = Arc::new(AtomicBool::new(false));
        let token_fault = Arc::new(Mutex::new(None));
        let open_sessions = Arc::new(AtomicUsize::new(0));
        let manager = SessionManager {
            ctx: self.module.context().clone(),
            open: open_sessions.clone(),
            slot: token.slot,
            session_count_hit: session_count_hit.clone(),
            closing: closing.clone(),
            token_fault: token_fault.clone(),
        };
        let pool = r2d2::Pool::builder()
            .max_size(max_size)
            .min_idle(Some(max_size.min(2)))
            .max_lifetime(None)
            .idle_timeout(Some(Duration::from_secs(600)))
            .connection_timeout(self.config.checkout_timeout)
            .test_on_check_out(self.config.test_on_checkout)
            .error_handler(Box::new(TracingErrorHandler))
            .build(manager)
            .map_err(|e| {
                Error::Config(format!(
                    "cannot open sessions on token {}: {e}",
                    token.describe()
                ))
            })?;
        Ok(Live {
            generation,
            token,
            mechanisms,
            login_session: Mutex::new(Some(login_session)),
            pool,
            gate: Gate::new(max_size as usize),
            session_count_hit,
            closing,
            open_sessions,
            token_fault,
            in_flight: AtomicUsize::new(0),
            max_size,
        })
    }

    fn wait_for_recovery(self: &Arc<Self>) -> Result<Arc<Live>, Error> {
        // A module reload by someone else (another token on the same module) voids our
        // sessions too: treat it as a fault of our own.
        {
            let mut state = self.write_state();
            if let State::Up(live) = &*state {
                if live.generation != self.module.generation() {
                    let down = State::Down("the module was re-initialised".into());
                    self.retire(std::mem::replace(&mut *state, down));
                }
            }
        }
        self.start_recovery();
        let deadline = Instant::now() + self.config.checkout_timeout;
        let mut recovery = self.lock_recovery();
        if recovery.attempting {
            let seen = recovery.attempts;
            while recovery.attempts == seen {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                recovery = self
                    .recovered
                    .wait_timeout(recovery, left)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
        }
        drop(recovery);
        match &*self.read_state() {
            State::Up(live) if live.generation == self.module.generation() => Ok(live.clone()),
            State::Closed => Err(Error::ShutDown {
                token: self.name.clone(),
            }),
            State::Down(reason) => {
                self.stats.fail_fast();
                Err(Error::Unavailable {
                    token: self.name.clone(),
                    reason: reason.clone(),
                    interval: self.config.reload_interval,
                })
            }
            State::Up(_) => Err(Error::Unavailable {
                token: self.name.clone(),
                reason: "the module was re-initialised".into(),
                interval: self.config.reload_interval,
            }),
        }
    }

    fn start_recovery(self: &Arc<Self>) {
        let mut recovery = self.lock_recovery();
        if recovery.running {
            return;
        }
        recovery.running = true;
        // Marked attempting before the thread starts, so callers right now wait for it.
        recovery.attempting = true;
        drop(recovery);
        let weak = Arc::downgrade(self);
        let spawned = thread::Builder::new()
            .name("rustls-hsm-recovery".into())
            .spawn(move || recovery_loop(weak));
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the recovery thread");
            let mut recovery = self.lock_recovery();
            recovery.running = false;
            recovery.attempting = false;
        }
    }

    /// One reload: drop the old sessions, re-initialise the module unless someone already did,
    /// then load again. Returns whether to stop trying.
    fn attempt_reload(&self) -> Result<(), (Error, bool)> {
        let old = match std::mem::replace(&mut *self.write_state(), State::Down("reloading".into()))
        {
            State::Up(live) => vec![live],
            State::Closed => {
                *self.write_state() = State::Closed;
                return Ok(());
            }
            State::Down(_) => Vec::new(),
        };
        let old: Vec<Arc<Live>> = old
            .into_iter()
            .chain(self.take_retired())
            .collect();
        let seen = old
            .iter()
            .map(|l| l.generation)
            .max()
            .unwrap_or_else(|| self.module.generation());
        for live in old {
            drain(live);
        }
        if self.module.generation() == seen {
            self.module
                .reinitialize(seen)
                .map_err(|e| (e.into(), false))?;
        }
        match self.load() {
            Ok(live) => {
                info!(token = %live.token.label, generation = live.generation, "token back");
                let mut state = self.write_state();
                if !matches!(*state, State::Closed) {
                    *state = State::Up(Arc::new(live));
                }
                Ok(())
            }
            Err(e) => {
                let stop = matches!(
                    e,
                    Error::PinIncorrect { .. } | Error::PinLocked { .. } | Error::PinRefused { .. }
                );
                *self.write_state() = State::Down(e.to_string());
                Err((e, stop))
            }
        }
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_recovery(&self) -> MutexGuard<'_, Recovery> {
        self.recovery
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Reload attempts, one per interval, until the token is back, a PIN fault needs a person, or
/// the token is dropped.
fn recovery_loop(weak: Weak<TokenPool>) {
    loop {
        let Some(pool) = weak.upgrade() else { return };
        pool.lock_recovery().attempting = true;
        let result = pool.attempt_reload();
        let stop = match &result {
            Ok(()) => true,
            Err((e, stop)) => {
                warn!(token = %pool.name, error = %e, "reload failed");
                *stop
            }
        };
        pool.stats
            .reload_attempt(result.is_ok());
        if let Err((e, _)) = &result {
            if let Some(rv) = e_rv(e) {
                pool.stats.error(&rv_name(rv));
            }
        }
        let interval = pool.config.reload_interval;
        {
            let mut recovery = pool.lock_recovery();
            recovery.attempting = false;
            recovery.attempts += 1;
            if stop {
                recovery.running = false;
            }
        }
        pool.recovered.notify_all();
        drop(pool);
        if stop {
            return;
        }
        thread::sleep(interval);
    }
}

fn e_rv(e: &Error) -> Option<RvError> {
    match e {
        Error::Pkcs11(inner) => inner.rv(),
        _ => None,
    }
}

/// Waits (bounded) for operations on `live` to finish, then closes its sessions and waits
/// until r2d2's threads have closed them all, so that nothing touches the module once this
/// returns (it may be finalized next). If operations do not finish, the sessions are leaked
/// rather than closed later: after a re-initialisation their handle numbers may name other
/// sessions.
fn drain(live: Arc<Live>) {
    live.closing
        .store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while (live.in_flight.load(Ordering::Acquire) > 0 || Arc::strong_count(&live) > 1)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(2));
    }
    if Arc::strong_count(&live) > 1 {
        warn!(token = %live.token.label, "operations still in flight after 5 s; abandoning their sessions");
        std::mem::forget(live);
        return;
    }
    let open = live.open_sessions.clone();
    let label = live.token.label.clone();
    // Dropping the pool closes its idle sessions, here or on an r2d2 thread still finishing a
    // job.
    drop(live);
    while open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    if open.load(Ordering::SeqCst) > 0 {
        warn!(token = %label, "pooled sessions still open after 5 s");
    }
}

/// The configured size, limited by the token's session limits (one session holds the login).
fn pool_cap(configured: usize, token: &Token) -> u32 {
    let limits = [
        token.info.max_session_count(),
        token.info.max_rw_session_count(),
    ];
    let mut cap = configured.max(1);
    for limit in limits {
        if let Some(max) = Option::<u64>::from(limit) {
            let usable = usize::try_from(max.saturating_sub(1)).unwrap_or(usize::MAX);
            if usable < cap {
                warn!(
                    token = %token.label,
                    configured,
                    token_limit = max,
                    "pool size capped by the token's session limit"
                );
                cap = usable.max(1);
            }
        }
    }
    u32::try_from(cap).unwrap_or(u32::MAX)
}

/// The default pool size: two sessions per CPU, at least four.
pub(crate) fn default_pool_size() -> usize {
    thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4)
        .max(4)
}
