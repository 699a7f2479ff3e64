//! The token's own limit: `C_Sign` in a loop on pre-opened, logged-in sessions, one session per
//! thread, nothing else.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use cryptoki::object::ObjectHandle;
use cryptoki::slot::Slot;
use hdrhistogram::Histogram;
use rustls_hsm::pkcs11::Module;
use rustls_hsm::scheme::Method;

use crate::engine::{new_histogram, record};
use rustls_hsm::scheme::{mechanism_for, token_input};

const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const STOPPING: u8 = 2;

/// Signatures made in the window, and how long each took.
pub(crate) struct RawOutcome {
    /// Signatures finished inside the window.
    pub(crate) signatures: u64,
    /// The window.
    pub(crate) window: Duration,
    /// Each `C_Sign` (cryptoki's two calls: length, then signature), microseconds.
    pub(crate) latency_us: Histogram<u64>,
    /// Failed signatures by return code.
    pub(crate) errors: BTreeMap<String, u64>,
}

impl RawOutcome {
    /// Signatures per second.
    pub(crate) fn rate(&self) -> f64 {
        self.signatures as f64 / self.window.as_secs_f64()
    }
}

/// What to sign with.
#[derive(Clone, Debug)]
pub(crate) struct RawKey {
    pub(crate) module: Module,
    pub(crate) slot: Slot,
    pub(crate) handle: ObjectHandle,
    pub(crate) method: Method,
}

/// Signs `message` (hashed first when the method wants a digest, outside the timing) on
/// `threads` sessions at once: `warmup`, then `duration` counted.
pub(crate) fn measure(
    key: &RawKey,
    message: &[u8],
    threads: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<RawOutcome> {
    let input = Arc::new(token_input(key.method, message));
    let mut sessions = Vec::new();
    for _ in 0..threads.max(1) {
        sessions.push(
            key.module
                .context()
                .open_rw_session(key.slot)
                .context("opening a session for raw signing")?,
        );
    }
    let phase = Arc::new(AtomicU8::new(WARMING));
    let start = Arc::new(Barrier::new(sessions.len() + 1));
    let mut workers = Vec::new();
    for session in sessions {
        let (phase, start, input) = (phase.clone(), start.clone(), input.clone());
        let (method, handle) = (key.method, key.handle);
        workers.push(thread::spawn(move || {
            let mut latency = new_histogram();
            let mut errors = BTreeMap::<String, u64>::new();
            let mut count = 0u64;
            let mechanism = mechanism_for(method);
            start.wait();
            loop {
                let began = Instant::now();
                let result = session.sign(&mechanism, handle, &input);
                let took = began.elapsed();
                match phase.load(Ordering::Acquire) {
                    MEASURING => match result {
                        Ok(_) => {
                            count += 1;
                            record(&mut latency, took);
                        }
                        Err(e) => *errors.entry(e.to_string()).or_default() += 1,
                    },
                    STOPPING => break,
                    _ => {}
                }
            }
            (count, latency, errors)
        }));
    }

    start.wait();
    thread::sleep(warmup);
    phase.store(MEASURING, Ordering::Release);
    let began = Instant::now();
    thread::sleep(duration);
    phase.store(STOPPING, Ordering::Release);
    let window = began.elapsed();

    let mut outcome = RawOutcome {
        signatures: 0,
        window,
        latency_us: new_histogram(),
        errors: BTreeMap::new(),
    };
    for worker in workers {
        let (count, latency, errors) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a raw signing thread panicked"))?;
        outcome.signatures += count;
        let _ = outcome.latency_us.add(&latency);
        for (kind, n) in errors {
            *outcome.errors.entry(kind).or_default() += n;
        }
    }
    Ok(outcome)
}
