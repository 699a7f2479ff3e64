//! CPU time of a tokio runtime's threads, from Linux's `/proc` (schedstat, else stat ticks).
//!
//! Load generator and server share the machine; how much CPU each side burns per handshake is
//! what tells a reader whether the client limited the measurement. A runtime built with
//! [`ThreadCpu::hooks`] reports its threads' time on CPU, including threads that have exited.

use std::collections::HashSet;
use std::fs;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Time on CPU of the threads registered with it.
#[derive(Debug, Default)]
pub(crate) struct ThreadCpu {
    live: Mutex<HashSet<u32>>,
    /// Nanoseconds of threads that have stopped.
    ended_ns: AtomicU64,
}

impl ThreadCpu {
    /// Adds the hooks that register a runtime's threads.
    pub(crate) fn hooks<'b>(
        self: &Arc<Self>,
        builder: &'b mut tokio::runtime::Builder,
    ) -> &'b mut tokio::runtime::Builder {
        let start = self.clone();
        let stop = self.clone();
        builder
            .on_thread_start(move || start.thread_started())
            .on_thread_stop(move || stop.thread_stopped())
    }

    /// CPU time of every registered thread so far.
    pub(crate) fn total(&self) -> Duration {
        let live: Vec<u32> = self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .copied()
            .collect();
        let live_ns: u64 = live
            .iter()
            .filter_map(|tid| thread_ns(&format!("/proc/self/task/{tid}")))
            .sum();
        Duration::from_nanos(live_ns + self.ended_ns.load(Ordering::Acquire))
    }

    fn thread_started(&self) {
        if let Some(tid) = current_tid() {
            self.live
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(tid);
        }
    }

    fn thread_stopped(&self) {
        let Some(tid) = current_tid() else {
            return;
        };
        if let Some(ns) = thread_ns("/proc/thread-self") {
            self.ended_ns
                .fetch_add(ns, Ordering::AcqRel);
        }
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&tid);
    }
}

fn current_tid() -> Option<u32> {
    let link = fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// A thread's time on CPU in nanoseconds: schedstat's first field, else stat's ticks.
fn thread_ns(dir: &str) -> Option<u64> {
    if let Some(ns) = fs::read_to_string(format!("{dir}/schedstat"))
        .ok()
        .and_then(|text| {
            text.split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    {
        return Some(ns);
    }
    stat_ticks(dir)
        .map(|ticks| u64::try_from(ticks_to_duration(ticks).as_nanos()).unwrap_or(u64::MAX))
}

/// utime + stime from `<dir>/stat`, in clock ticks.
fn stat_ticks(dir: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("{dir}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last `)`.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Linux reports ticks at USER_HZ, 100 on every architecture it supports.
fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 10)
}
