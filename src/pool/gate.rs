//! A counting gate in front of the r2d2 pool whose size can shrink at run time.
//!
//! r2d2's size is fixed when the pool is built; when the token says it has no more sessions
//! (`CKR_SESSION_COUNT`), the gate lowers how many checkouts may run at once to the number of
//! sessions that did open, so the excess waits (or gets the busy error) instead of asking the
//! token for sessions it cannot give.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    freed: Condvar,
}

#[derive(Debug)]
struct GateState {
    permits: usize,
    in_use: usize,
}

/// Holds one of the gate's permits until dropped.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    gate: &'a Gate,
}

impl Gate {
    pub(crate) fn new(permits: usize) -> Self {
        Self {
            state: Mutex::new(GateState {
                permits: permits.max(1),
                in_use: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// Takes a permit, waiting up to `timeout`; `None` when none came free in time.
    /// The second value says whether the caller had to wait.
    pub(crate) fn acquire(&self, timeout: Duration) -> Option<(Permit<'_>, bool)> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        let mut waited = false;
        while state.in_use >= state.permits {
            waited = true;
            let left = deadline.checked_duration_since(Instant::now())?;
            state = self
                .freed
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        state.in_use += 1;
        Some((Permit { gate: self }, waited))
    }

    /// Lowers the number of permits (never below one).
    pub(crate) fn shrink_to(&self, permits: usize) -> usize {
        let mut state = self.lock();
        state.permits = state.permits.min(permits.max(1));
        state.permits
    }

    pub(crate) fn permits(&self) -> usize {
        self.lock().permits
    }

    pub(crate) fn in_use(&self) -> usize {
        self.lock().in_use
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.in_use -= 1;
        drop(state);
        self.gate.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_then_times_out_and_shrinks() {
        let gate = Gate::new(2);
        let a = gate.acquire(Duration::ZERO).unwrap();
        let _b = gate.acquire(Duration::ZERO).unwrap();
        assert!(gate
            .acquire(Duration::from_millis(10))
            .is_none());
        drop(a);
        assert!(gate.acquire(Duration::ZERO).is_some());
        assert_eq!(gate.shrink_to(1), 1);
        assert_eq!(gate.shrink_to(5), 1);
    }
}
