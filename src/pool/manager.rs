//! PKCS#11 sessions as r2d2 connections.
//!
//! A session that returned a session-level error is marked broken and dropped by the pool,
//! never reused; on checkout a session is checked with `C_GetSessionInfo`.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::Fault;
use crate::pkcs11::{rv_of, rv_text};

/// Opens read-write sessions on one slot.
///
/// It holds the module's cryptoki context, not a [`crate::pkcs11::Module`]: r2d2 may drop its
/// manager on one of its own threads, and that must never be what finalizes the module.
#[derive(Debug)]
pub(crate) struct SessionManager {
    pub(crate) ctx: Pkcs11,
    pub(crate) slot: Slot,
    /// Sessions being opened or open and not yet closed, so that the pool can wait for r2d2's
    /// threads to finish with them all before the module is finalized.
    pub(crate) open: Arc<AtomicUsize>,
    /// Set when the token said it has no more sessions to give.
    pub(crate) session_count_hit: Arc<AtomicBool>,
    /// Set when the pool is being closed: r2d2's background threads must not open sessions
    /// while the module is being finalized.
    pub(crate) closing: Arc<AtomicBool>,
    /// The first token or module fault seen while opening or checking a session: r2d2 would
    /// only retry until the checkout timeout, so the pool reports it and reloads instead.
    pub(crate) token_fault: Arc<Mutex<Option<(RvError, String)>>>,
}

impl SessionManager {
    fn note(&self, e: &CkError) {
        if let Some(rv) = rv_of(e).filter(|rv| Fault::of(*rv) == Fault::Token) {
            self.token_fault
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get_or_insert_with(|| (rv, rv_text(e)));
        }
    }
}

/// A pooled session with a flag the signer sets when the session must not be reused.
#[derive(Debug)]
pub(crate) struct PooledSession {
    /// Always `Some` until dropped.
    session: Option<Session>,
    broken: bool,
    open: Arc<AtomicUsize>,
}

impl PooledSession {
    /// Marks the session for dropping when it returns to the pool.
    pub(crate) fn mark_broken(&mut self) {
        self.broken = true;
    }
}

impl Deref for PooledSession {
    type Target = Session;

    fn deref(&self) -> &Session {
        self.session
            .as_ref()
            .expect("a pooled session is only taken out when it is dropped")
    }
}

impl DerefMut for PooledSession {
    fn deref_mut(&mut self) -> &mut Session {
        self.session
            .as_mut()
            .expect("a pooled session is only taken out when it is dropped")
    }
}

impl Drop for PooledSession {
    fn drop(&mut self) {
        // Closes the session (C_CloseSession), then counts it closed.
        drop(self.session.take());
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A cryptoki error as r2d2 needs it (`std::error::Error + 'static`).
#[derive(Debug, thiserror::Error)]
#[error("{}", rv_text(.0))]
pub(crate) struct SessionError(pub(crate) CkError);

impl r2d2::ManageConnection for SessionManager {
    type Connection = PooledSession;
    type Error = SessionError;

    fn connect(&self) -> Result<PooledSession, SessionError> {
        // Counted before the closing check and before C_OpenSession, so that a reload draining
        // this pool waits for an open still under way on an r2d2 thread: C_Finalize while
        // another thread is inside the module is undefined behaviour (SoftHSM crashes).
        self.open.fetch_add(1, Ordering::SeqCst);
        if self.closing.load(Ordering::SeqCst) {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Err(SessionError(CkError::Pkcs11(
                RvError::CryptokiNotInitialized,
                cryptoki::context::Function::OpenSession,
            )));
        }
        match self.ctx.open_rw_session(self.slot) {
            Ok(session) => Ok(PooledSession {
                session: Some(session),
                broken: false,
                open: self.open.clone(),
            }),
            Err(e) => {
                self.open.fetch_sub(1, Ordering::SeqCst);
                if rv_of(&e) == Some(RvError::SessionCount) {
                    self.session_count_hit
                        .store(true, Ordering::Release);
                }
                self.note(&e);
                Err(SessionError(e))
            }
        }
    }

    fn is_valid(&self, conn: &mut PooledSession) -> Result<(), SessionError> {
        conn.get_session_info()
            .map(drop)
            .map_err(|e| {
                self.note(&e);
                SessionError(e)
            })
    }

    fn has_broken(&self, conn: &mut PooledSession) -> bool {
        conn.broken
    }
}

/// Logs r2d2's background connection errors through tracing, at debug: the signing path
/// reports the faults that matter.
#[derive(Debug)]
pub(crate) struct TracingErrorHandler;

impl r2d2::HandleError<SessionError> for TracingErrorHandler {
    fn handle_error(&self, error: SessionError) {
        tracing::debug!(error = %error, "opening a pooled session failed");
    }
}
