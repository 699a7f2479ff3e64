//! The load loop shared by `handshake_load` and `handshake_bench`: workers that each make one
//! connection after another (TCP connect, full TLS handshake, optionally one HTTP/1.1 request,
//! orderly close), with latency histograms and errors by kind.
//!
//! Every connection is a full handshake: the client configurations built for it disable
//! resumption, so neither session IDs nor tickets are offered.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The largest latency a histogram holds, in microseconds (larger values are clamped).
const MAX_LATENCY_US: u64 = 600_000_000;

/// When a run ends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Limit {
    /// After this many successful connections.
    Count(u64),
    /// After this long; connections in flight then are finished but not counted.
    Duration(Duration),
}

/// One HTTP/1.1 request per connection.
#[derive(Clone, Debug)]
pub(crate) struct HttpRequest {
    /// The `Host` header.
    pub(crate) host: String,
    /// The request target, e.g. `/`.
    pub(crate) path: String,
}

/// What to load and how hard.
#[derive(Clone, Debug)]
pub(crate) struct LoadSpec {
    /// Where to connect.
    pub(crate) addr: SocketAddr,
    /// SNI and the name the certificate is checked against.
    pub(crate) server_name: ServerName<'static>,
    /// The client configuration (resumption off).
    pub(crate) config: Arc<ClientConfig>,
    /// Connections in flight at once.
    pub(crate) concurrency: usize,
    /// When to stop.
    pub(crate) limit: Limit,
    /// One request per connection after the handshake, if any.
    pub(crate) request: Option<HttpRequest>,
    /// The longest one connection may take, from connect to close.
    pub(crate) timeout: Duration,
    /// Print a progress line to stderr once a second.
    pub(crate) progress: bool,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub(crate) struct LoadOutcome {
    /// Successful connections counted (in the window for a timed run).
    pub(crate) handshakes: u64,
    /// Successful connections that finished after the window closed (timed runs).
    pub(crate) tail: u64,
    /// The counting window: the run's length, or until the last success of a counted run.
    pub(crate) window: Duration,
    /// TCP connect plus TLS handshake, microseconds.
    pub(crate) handshake_us: Histogram<u64>,
    /// Request written to response read, microseconds (with `--http`).
    pub(crate) request_us: Option<Histogram<u64>>,
    /// Failed connections by kind.
    pub(crate) errors: BTreeMap<String, u64>,
}

impl LoadOutcome {
    /// Successful handshakes per second over the window.
    pub(crate) fn rate(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.handshakes as f64 / secs
        } else {
            0.0
        }
    }

    /// Failed connections, all kinds.
    pub(crate) fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// A latency histogram in microseconds, 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .expect("1 µs to 600 s at 3 significant digits are valid histogram bounds")
}

/// Records a duration in microseconds, clamped into the histogram's range.
pub(crate) fn record(histogram: &mut Histogram<u64>, took: Duration) {
    let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(us.clamp(1, MAX_LATENCY_US));
}

/// Runs the load on the current tokio runtime and returns what it measured.
pub(crate) async fn run(spec: LoadSpec) -> LoadOutcome {
    let spec = Arc::new(spec);
    let shared = Arc::new(Shared::new(spec.limit));
    let progress = spec.progress.then(|| {
        let shared = shared.clone();
        tokio::spawn(async move { print_progress(&shared).await })
    });

    let mut workers = JoinSet::new();
    for _ in 0..spec.concurrency.max(1) {
        workers.spawn(worker(spec.clone(), shared.clone()));
    }
    let mut outcome = LoadOutcome {
        handshakes: 0,
        tail: 0,
        window: Duration::ZERO,
        handshake_us: new_histogram(),
        request_us: spec
            .request
            .as_ref()
            .map(|_| new_histogram()),
        errors: BTreeMap::new(),
    };
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(tally) => tally.merge_into(&mut outcome),
            Err(e) => {
                *outcome
                    .errors
                    .entry(format!("load worker failed: {e}"))
                    .or_default() += 1
            }
        }
    }
    shared
        .finished
        .store(true, Ordering::Release);
    if let Some(task) = progress {
        task.abort();
    }
    outcome.window = shared.window();
    outcome
}

/// Counters every worker shares.
struct Shared {
    started: Instant,
    limit: Limit,
    /// Connections still to start (counted runs).
    tickets: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    /// Microseconds from start to the last success (counted runs).
    last_success_us: AtomicU64,
    finished: AtomicBool,
}

impl Shared {
    fn new(limit: Limit) -> Self {
        let tickets = match limit {
            Limit::Count(n) => n,
            Limit::Duration(_) => u64::MAX,
        };
        Self {
            started: Instant::now(),
            limit,
            tickets: AtomicU64::new(tickets),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_success_us: AtomicU64::new(0),
            finished: AtomicBool::new(false),
        }
    }

    /// True when the worker may start another connection.
    fn claim(&self) -> bool {
        match self.limit {
            Limit::Duration(d) => self.started.elapsed() < d,
            Limit::Count(_) => self
                .tickets
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok(),
        }
    }

    /// True when a connection that finished at `at` falls in the counting window.
    fn counts(&self, at: Instant) -> bool {
        match self.limit {
            Limit::Duration(d) => at.duration_since(self.started) <= d,
            Limit::Count(_) => true,
        }
    }

    fn window(&self) -> Duration {
        match self.limit {
            Limit::Duration(d) => d,
            Limit::Count(_) => Duration::from_micros(
                self.last_success_us
                    .load(Ordering::Acquire),
            ),
        }
    }
}

/// One worker's share of the results, merged at the end (no locks while running).
struct Tally {
    handshakes: u64,
    tail: u64,
    handshake_us: Histogram<u64>,
    request_us: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn merge_into(self, outcome: &mut LoadOutcome) {
        outcome.handshakes += self.handshakes;
        outcome.tail += self.tail;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = outcome
            .handshake_us
            .add(&self.handshake_us);
        if let Some(request) = &mut outcome.request_us {
            let _ = request.add(&self.request_us);
        }
        for (kind, n) in self.errors {
            *outcome.errors.entry(kind).or_default() += n;
        }
    }
}

/// Timings of one successful connection.
struct Timing {
    handshake: Duration,
    request: Option<Duration>,
}

async fn worker(spec: Arc<LoadSpec>, shared: Arc<Shared>) -> Tally {
    let mut tally = Tally {
        handshakes: 0,
        tail: 0,
        handshake_us: new_histogram(),
        request_us: new_histogram(),
        errors: BTreeMap::new(),
    };
    while shared.claim() {
        let result = tokio::time::timeout(spec.timeout, connection(&spec)).await;
        let done = Instant::now();
        let result = result.unwrap_or_else(|_| Err(format!("timeout after {:?}", spec.timeout)));
        match result {
            Ok(timing) if shared.counts(done) => {
                tally.handshakes += 1;
                record(&mut tally.handshake_us, timing.handshake);
                if let Some(request) = timing.request {
                    record(&mut tally.request_us, request);
                }
                shared
                    .successes
                    .fetch_add(1, Ordering::Relaxed);
                let at = u64::try_from(
                    done.duration_since(shared.started)
                        .as_micros(),
                )
                .unwrap_or(u64::MAX);
                shared
                    .last_success_us
                    .fetch_max(at, Ordering::AcqRel);
            }
            Ok(_) => tally.tail += 1,
            Err(kind) => {
                shared
                    .failures
                    .fetch_add(1, Ordering::Relaxed);
                *tally.errors.entry(kind).or_default() += 1;
            }
        }
    }
    tally
}

/// One connection: connect, handshake, optional request, close. Errors are their kind.
async fn connection(spec: &LoadSpec) -> Result<Timing, String> {
    let started = Instant::now();
    let tcp = TcpStream::connect(spec.addr)
        .await
        .map_err(|e| format!("connect: {:?}", e.kind()))?;
    // Handshake flights are small writes; Nagle's algorithm would hold them back.
    let _ = tcp.set_nodelay(true);
    let mut tls = TlsConnector::from(spec.config.clone())
        .connect(spec.server_name.clone(), tcp)
        .await
        .map_err(|e| io_kind("handshake", &e))?;
    let handshake = started.elapsed();

    let request = match &spec.request {
        Some(request) => Some(http_request(&mut tls, request).await?),
        None => {
            close(&mut tls).await?;
            None
        }
    };
    Ok(Timing { handshake, request })
}

/// Sends one `GET` with `Connection: close` and reads the response to its end.
async fn http_request(
    tls: &mut TlsStream<TcpStream>,
    request: &HttpRequest,
) -> Result<Duration, String> {
    let started = Instant::now();
    let text = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: rustls-hsm-handshake-load\r\n\
         Connection: close\r\n\r\n",
        request.path, request.host
    );
    tls.write_all(text.as_bytes())
        .await
        .map_err(|e| io_kind("request", &e))?;
    tls.flush()
        .await
        .map_err(|e| io_kind("request", &e))?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response).await {
        Ok(_) => {}
        // A server that closes without close_notify after a complete response is common.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(io_kind("response", &e)),
    }
    let took = started.elapsed();
    let status = response
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| std::str::from_utf8(code).ok())
        .ok_or_else(|| "response: not HTTP/1.1".to_owned())?;
    if !status.starts_with('2') {
        return Err(format!("response: status {status}"));
    }
    Ok(took)
}

/// Sends close_notify and waits for the server to close too, so that an alert the server sends
/// after the client's Finished (TLS 1.3: a refused client certificate) is seen and counted.
async fn close(tls: &mut TlsStream<TcpStream>) -> Result<(), String> {
    tls.shutdown()
        .await
        .map_err(|e| io_kind("close", &e))?;
    let mut rest = Vec::new();
    match tls.read_to_end(&mut rest).await {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) && e
                .get_ref()
                .is_none_or(|inner| !inner.is::<rustls::Error>()) =>
        {
            Ok(())
        }
        Err(e) => Err(io_kind("after handshake", &e)),
    }
}

/// An error's kind for the report: rustls's own error when there is one, else the I/O kind.
fn io_kind(stage: &str, error: &std::io::Error) -> String {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => format!("{stage}: {tls}"),
        None => format!("{stage}: {:?}", error.kind()),
    }
}

async fn print_progress(shared: &Shared) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut last = 0;
    loop {
        ticker.tick().await;
        if shared.finished.load(Ordering::Acquire) {
            return;
        }
        let now = shared.successes.load(Ordering::Relaxed);
        let failures = shared.failures.load(Ordering::Relaxed);
        eprintln!(
            "{:>6.1}s  {now:>9} handshakes  {:>7}/s now  {failures} errors",
            shared.started.elapsed().as_secs_f64(),
            now - last,
        );
        last = now;
    }
}
