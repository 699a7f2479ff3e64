//! Fault cases on real token stacks: a network HSM (SoftHSM behind `p11-kit server`) killed and
//! restarted under load or kept down for seconds, and a TPM (swtpm with tpm2-abrmd) restarted
//! while idle. The TLS server is never restarted; recovery is the library's module reload.
//!
//! Each test prints its figures (handshakes failed, seconds to recover, the token's counters).

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use rustls_hsm::pkcs11::KeySelector;
use rustls_hsm::resolver::ServerCertResolver;
use rustls_hsm::{HsmToken, StatsSnapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::keys::generate;
use common::stack::Stack;
use common::tls::{client_config, handshake, TestCa, TestServer};

const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
const RELOAD_INTERVAL: Duration = Duration::from_millis(500);
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(2);

/// One handshake as a client saw it.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    started: Instant,
    ended: Instant,
    ok: bool,
}

/// A stack with a P-256 key on its token and a TLS server signing with it.
///
/// Fields drop in order: the server and token go before the stack they need.
struct Rig {
    server: TestServer,
    token: HsmToken,
    client: Arc<ClientConfig>,
    stack: Stack,
}

impl Rig {
    async fn start(name: &'static str) -> Option<Self> {
        let stack = Stack::start(name)?;
        stack.use_in_this_process();
        let token = HsmToken::builder()
            .module_path(&stack.module)
            .token(stack.token.label.parse().unwrap())
            .pin(
                stack
                    .token
                    .pin_source()
                    .parse()
                    .unwrap(),
            )
            .pin_guard_file(stack.path().join("pin-guard.json"))
            .reload_interval(RELOAD_INTERVAL)
            .checkout_timeout(CHECKOUT_TIMEOUT)
            .pool_size(4)
            .build()
            .unwrap();
        generate(&token, &stack.token.label, "tls", "ec:p256");
        let key = token
            .key(&KeySelector::label("tls"))
            .unwrap();
        let ca = TestCa::new();
        let mut resolver = ServerCertResolver::new();
        resolver.add(
            None,
            key.certified_key(vec![ca.leaf(key.spki(), false)])
                .unwrap(),
        );
        let server = TestServer::start(Arc::new(resolver)).await;
        let client = client_config(&ca, TLS13, &[]);
        Some(Self {
            stack,
            token,
            server,
            client,
        })
    }

    async fn handshake(&self) -> Attempt {
        timed_handshake(self.server.addr, self.client.clone()).await
    }

    /// Clients handshaking back to back until `stop` is set; every attempt is recorded.
    fn load(
        &self,
        clients: usize,
        stop: &Arc<AtomicBool>,
    ) -> (Arc<Mutex<Vec<Attempt>>>, Vec<tokio::task::JoinHandle<()>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (log, stop) = (log.clone(), stop.clone());
                let (addr, config) = (self.server.addr, self.client.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let attempt = timed_handshake(addr, config.clone()).await;
                        log.lock().unwrap().push(attempt);
                        if !attempt.ok {
                            // A failed handshake is fast; do not spin on it.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                })
            })
            .collect();
        (log, tasks)
    }
}

async fn timed_handshake(addr: SocketAddr, config: Arc<ClientConfig>) -> Attempt {
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), handshake(addr, config)).await;
    Attempt {
        started,
        ended: Instant::now(),
        ok: matches!(result, Ok(Ok(_))),
    }
}

/// Seconds from `back` to the end of the first successful handshake started after it.
fn recovery_seconds(attempts: &[Attempt], back: Instant) -> Option<f64> {
    attempts
        .iter()
        .filter(|a| a.ok && a.started >= back)
        .map(|a| {
            a.ended
                .duration_since(back)
                .as_secs_f64()
        })
        .reduce(f64::min)
}

fn figures(what: &str, stats: &StatsSnapshot) {
    println!(
        "{what}: reload_attempts {}, reloads_ok {}, fail_fast {}, errors {:?}",
        stats.reload_attempts, stats.reloads_ok, stats.fail_fast, stats.errors
    );
}

// A network HSM that drops and comes back must not need a server restart: the in-flight
// signatures fail, the module is reloaded, and handshakes succeed again within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11kit_server_killed_and_restarted_under_load() {
    let Some(rig) = Rig::start("p11kit").await else {
        return;
    };
    let case = rig
        .stack
        .case("p11-kit server killed and restarted under load");
    let stop = Arc::new(AtomicBool::new(false));
    let (log, tasks) = rig.load(4, &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let killed = Instant::now();
    rig.stack.stop(None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.stack.restart();
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    let attempts = log.lock().unwrap().clone();
    let failed: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| !a.ok)
        .collect();
    let recovered = recovery_seconds(&attempts, back);
    let stats = rig.token.stats();
    println!(
        "p11kit kill/restart: {} handshakes, {} failed (all between the kill and {:.3} s after \
         the server was back), recovered {:?} s after the server was back",
        attempts.len(),
        failed.len(),
        failed
            .iter()
            .map(|a| a
                .started
                .saturating_duration_since(back)
                .as_secs_f64())
            .fold(0.0, f64::max),
        recovered
    );
    figures("p11kit kill/restart", &stats);

    assert!(
        attempts
            .iter()
            .any(|a| a.ok && a.ended < killed),
        "handshakes before the kill"
    );
    let recovered = recovered.expect("a handshake succeeded after the server was back");
    assert!(recovered < 1.0, "recovered after {recovered:.3} s");
    // Failures belong to the outage: none started a second after the server was back.
    let late = failed
        .iter()
        .filter(|a| a.started > back + Duration::from_secs(1))
        .count();
    assert_eq!(late, 0, "handshakes failed after recovery");
    assert!(stats.reloads_ok >= 1, "{stats:?}");
    assert!(
        stats
            .errors
            .contains_key("CKR_DEVICE_ERROR"),
        "{stats:?}"
    );
    case.pass();
}

// While the HSM stays down, handshakes fail at once (never waiting out the checkout timeout),
// the module is reloaded at most once per interval, and established connections are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11kit_server_down_for_seconds() {
    let Some(rig) = Rig::start("p11kit").await else {
        return;
    };
    let case = rig
        .stack
        .case("p11-kit server down for 5 s");
    assert!(rig.handshake().await.ok);

    // An established connection, pinged through the outage.
    let tcp = tokio::net::TcpStream::connect(rig.server.addr)
        .await
        .unwrap();
    let mut open = tokio_rustls::TlsConnector::from(rig.client.clone())
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();

    let down = Instant::now();
    rig.stack.stop(None);
    let before = rig.token.stats();
    let mut attempts = Vec::new();
    let mut pings = 0;
    while down.elapsed() < Duration::from_secs(5) {
        attempts.push(rig.handshake().await);
        open.write_all(b"ping\n").await.unwrap();
        let mut buf = [0u8; 5];
        open.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong\n");
        pings += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let down_for = down.elapsed();
    let during = rig.token.stats();
    rig.stack.restart();
    let back = Instant::now();
    let mut recovered = None;
    while back.elapsed() < Duration::from_secs(3) {
        let attempt = rig.handshake().await;
        if attempt.ok {
            recovered = Some(
                attempt
                    .ended
                    .duration_since(back)
                    .as_secs_f64(),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let failed: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| !a.ok)
        .collect();
    let slowest = failed
        .iter()
        .map(|a| a.ended.duration_since(a.started))
        .max()
        .unwrap_or_default();
    let reloads = during.reload_attempts - before.reload_attempts;
    let expected = down_for.as_secs_f64() / RELOAD_INTERVAL.as_secs_f64();
    println!(
        "p11kit down {:.1} s: {} handshakes, {} failed, slowest failure {slowest:?}, {pings} \
         pings on an open connection answered, {reloads} reload attempts (elapsed/interval \
         {expected:.1}), recovered {recovered:?} s after the server was back",
        down_for.as_secs_f64(),
        attempts.len(),
        failed.len()
    );
    figures("p11kit down", &rig.token.stats());

    assert_eq!(failed.len(), attempts.len(), "no handshake can succeed");
    assert!(slowest < CHECKOUT_TIMEOUT / 4, "a failure took {slowest:?}");
    assert!(
        (reloads as f64) <= expected + 2.0 && (reloads as f64) >= expected / 2.0,
        "{reloads} reload attempts in {down_for:?}"
    );
    assert!(pings >= 20, "pings: {pings}");
    let recovered = recovered.expect("handshakes succeed once the server is back");
    assert!(recovered < 1.0, "recovered after {recovered:.3} s");
    case.pass();
}

// A TPM (swtpm and its resource manager) restarted while the server is idle: the next
// handshakes recover without a server restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_restarted_while_idle() {
    tpm_part_restarted_while_idle("swtpm", "swtpm and tpm2-abrmd restarted while idle").await;
}

// The resource manager alone restarted (the TPM keeps its state): the same recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_resource_manager_restarted_while_idle() {
    tpm_part_restarted_while_idle("abrmd", "tpm2-abrmd restarted while idle").await;
}

async fn tpm_part_restarted_while_idle(part: &str, what: &str) {
    let Some(rig) = Rig::start("tpm").await else {
        return;
    };
    let case = rig.stack.case(what);
    assert!(rig.handshake().await.ok);

    rig.stack.stop(Some(part));
    rig.stack.restart();
    let back = Instant::now();
    let mut attempts = Vec::new();
    while back.elapsed() < Duration::from_secs(5) {
        let attempt = rig.handshake().await;
        attempts.push(attempt);
        if attempt.ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed = attempts
        .iter()
        .filter(|a| !a.ok)
        .count();
    let recovered = recovery_seconds(&attempts, back);
    println!(
        "{what}: {failed} handshakes failed, recovered {recovered:?} s after the TPM was back"
    );
    let stats = rig.token.stats();
    figures(what, &stats);

    let recovered = recovered.expect("handshakes succeed once the TPM is back");
    assert!(recovered < 1.0, "recovered after {recovered:.3} s");
    for _ in 0..5 {
        assert!(rig.handshake().await.ok);
    }
    assert!(stats.reloads_ok >= 1, "{stats:?}");
    case.pass();
}
