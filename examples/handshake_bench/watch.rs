//! Watching a token's session pool while a server is under load: the most sessions in use and
//! open at once, against the pool's cap.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use rustls_hsm::HsmToken;

use crate::results::PoolCheck;

/// How often the pool is sampled; peaks shorter than this can be missed.
const SAMPLE_EVERY: Duration = Duration::from_millis(2);

/// A thread sampling the pool of a token, when there is one.
pub(crate) struct PoolWatch {
    token: Option<HsmToken>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<(u32, u32)>>,
}

impl PoolWatch {
    /// Starts sampling `token`'s pool (does nothing without a token).
    pub(crate) fn start(token: Option<&HsmToken>) -> Self {
        let Some(token) = token.cloned() else {
            return Self {
                token: None,
                stop: None,
                thread: None,
            };
        };
        let (stop, stopped) = mpsc::channel::<()>();
        let watched = token.clone();
        let thread = thread::spawn(move || {
            let (mut in_use, mut open) = (0, 0);
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(SAMPLE_EVERY) {
                let pool = watched.stats().pool;
                in_use = pool.in_use.max(in_use);
                open = pool.open.max(open);
            }
            (in_use, open)
        });
        Self {
            token: Some(token),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops sampling; the peaks with the token's own pool counters.
    pub(crate) fn finish(self) -> Option<PoolCheck> {
        let (token, stop, thread) = (self.token?, self.stop?, self.thread?);
        let _ = stop.send(());
        let (peak_in_use, peak_open) = thread
            .join()
            .unwrap_or((u32::MAX, u32::MAX));
        let stats = token.stats();
        Some(PoolCheck {
            cap: stats.pool.max_size,
            peak_in_use,
            peak_open: peak_open.max(stats.pool.open),
            waits: stats.pool_waits,
            timeouts: stats.pool_timeouts,
            sign_p50_us: stats.sign_latency.p50_us,
        })
    }
}
