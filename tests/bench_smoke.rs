//! The load generator and the handshake benchmark run, briefly, and write well-formed JSON,
//! tables and plots. Nothing here asserts on speed: these are tools, and their figures depend on
//! the machine.

// Helpers here panic on failure, like the tests that call them.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use common::{softhsm_module, text, TestHsm};

/// An example binary of this build, up to date.
///
/// `cargo test` builds the examples with the tests; `cargo nextest run` may not (`--test
/// bench_smoke`), and has released the build lock before tests run, so under nextest the example
/// is built here (a no-op when it is fresh).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/bench_smoke-<hash> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap();
    if std::env::var_os("NEXTEST").is_some() {
        let profile = match profile_dir
            .file_name()
            .and_then(|n| n.to_str())
        {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--profile", profile, "--example", name])
            .status()
            .unwrap();
        assert!(status.success(), "building example {name}");
    }
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the examples",
        path.display()
    );
    path
}

/// The example HTTPS server on a dev token of its own, on a free port.
struct DevServer {
    child: Child,
    url: String,
    state: PathBuf,
}

impl DevServer {
    fn start(state: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(example("tls_server"))
            .args(["--dev", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Read stdout to its end on a thread: the server prints more after the address, and
        // would fail writing to a closed pipe.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.starts_with("listening on ") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the server says where it listens");
        let addr = line
            .trim_start_matches("listening on https://")
            .trim_end_matches('/');
        let port = addr.rsplit(':').next().unwrap();
        Self {
            child,
            url: format!("https://localhost:{port}/"),
            state: state.to_owned(),
        }
    }

    /// handshake_load against this server, trusting its dev CA, with extra arguments.
    fn load(&self, args: &[&str]) -> std::process::Output {
        Command::new(example("handshake_load"))
            .arg(&self.url)
            .arg("--ca-file")
            .arg(self.state.join("ca.pem"))
            .args(args)
            .env("SOFTHSM2_CONF", self.state.join("softhsm2.conf"))
            .env_remove("RUSTLS_HSM_MODULE")
            .env_remove("RUSTLS_HSM_TOKEN")
            .output()
            .unwrap()
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(out)))
}

#[test]
fn handshake_load_reports_handshakes_latency_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = DevServer::start(&dir.path().join("dev"), &[]);

    let out = server.load(&[
        "--count",
        "20",
        "--concurrency",
        "2",
        "--tls",
        "1.3",
        "--scheme",
        "ecdsa_secp256r1_sha256",
        "--json",
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report = json(&out);
    assert_eq!(report["handshakes"], 20, "{report}");
    assert_eq!(report["error_count"], 0, "{report}");
    assert_eq!(report["tls"], "1.3");
    assert!(
        report["handshakes_per_s"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{report}"
    );
    for q in ["p50", "p90", "p99", "max"] {
        assert!(
            report["latency_us"][q]
                .as_u64()
                .unwrap()
                > 0,
            "{report}"
        );
    }
    assert!(report["request_latency_us"].is_null());
    assert!(report["client_cpu"]["per_handshake_us"].is_number());

    // TLS 1.2 and RSA, with one request per connection, as a table for people.
    let out = server.load(&[
        "--count",
        "5",
        "--tls",
        "1.2",
        "--scheme",
        "rsa_pss_rsae_sha256",
        "--http",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for row in [
        "handshakes    5",
        "latency",
        "request",
        "errors        none",
    ] {
        assert!(table.contains(row), "{table}");
    }
}

#[test]
fn handshake_load_presents_a_client_key_from_the_token_and_counts_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("dev");
    let server = DevServer::start(&state, &["--client-auth", "required"]);

    // mTLS: the client's signatures are made on the dev token by rustls-hsm.
    let pin = format!("file:{}", state.join("user.pin").display());
    let cert = state.join("client.pem");
    let out = server.load(&[
        "--count",
        "10",
        "--concurrency",
        "2",
        "--http",
        "--json",
        "--quiet",
        "--module",
        softhsm_module().to_str().unwrap(),
        "--token",
        "rustls-hsm-dev",
        "--pin",
        &pin,
        "--client-key",
        "dev-client",
        "--client-cert",
        cert.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report = json(&out);
    assert_eq!(report["handshakes"], 10, "{report}");
    assert_eq!(report["client_certificate"], true);
    assert!(
        report["request_latency_us"]["p50"]
            .as_u64()
            .unwrap()
            > 0,
        "{report}"
    );

    // Without a client certificate every connection is refused: counted by kind, exit status 1.
    let out = server.load(&["--count", "4", "--tls", "1.3", "--json", "--quiet"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = json(&out);
    assert_eq!(report["handshakes"], 0, "{report}");
    assert_eq!(report["error_count"], 4, "{report}");
    let kinds: Vec<&String> = report["errors"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert!(
        kinds
            .iter()
            .all(|k| k.contains("CertificateRequired")),
        "{kinds:?}"
    );
}

#[test]
fn handshake_bench_runs_every_configuration_and_writes_its_report() {
    let (hsm, token) = TestHsm::with_token("bench");
    let out_dir = hsm.path().join("out");
    let bench = |args: &[&str]| {
        let out = Command::new(example("handshake_bench"))
            .args(args)
            .env("SOFTHSM2_CONF", &hsm.conf)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    let pin = token.pin_source();
    let module = hsm.module.to_str().unwrap();
    let out = out_dir.to_str().unwrap();
    let on_token = [
        "--module", module, "--token", "bench", "--pin", &pin, "--out", out,
    ];

    let mut run = on_token.to_vec();
    run.extend([
        "--keys",
        "p256",
        "--concurrency",
        "1,2",
        "--pool-sizes",
        "1",
        "--rounds",
        "1",
        "--warmup-ms",
        "50",
        "--duration-ms",
        "200",
    ]);
    bench(&[&["run"][..], &run].concat());
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap())
            .unwrap();
    let summaries = results["summaries"].as_array().unwrap();
    // raw, in-memory, direct, and rustls-hsm with verify on and off, at two concurrencies
    assert_eq!(summaries.len(), 10, "{results}");
    for summary in summaries {
        assert!(
            summary["rate"]["median"]
                .as_f64()
                .unwrap()
                > 0.0,
            "{summary}"
        );
        assert_eq!(summary["errors"], serde_json::json!({}), "{summary}");
        if summary["config"] != "raw-sign" {
            assert!(
                summary["vs_direct"]["rate"]["median"].is_number(),
                "{summary}"
            );
            assert!(
                summary["vs_in_memory"]["cpu_bound"]["median"].is_number(),
                "{summary}"
            );
        }
        if let Some(pool) = summary["pool"].as_object() {
            assert!(
                pool["peak_in_use"].as_u64() <= pool["cap"].as_u64(),
                "{summary}"
            );
        }
    }

    let mut slow = on_token.to_vec();
    slow.extend([
        "--idle-ms",
        "200",
        "--storm-ms",
        "500",
        "--storm-concurrency",
        "4",
    ]);
    bench(&[&["slow"][..], &slow].concat());
    let slow: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("slow.json")).unwrap()).unwrap();
    assert_eq!(
        slow["scenarios"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "{slow}"
    );

    let doc = hsm.path().join("benchmarks.md");
    bench(&["report", "--out", out, "--doc", doc.to_str().unwrap()]);
    let report = std::fs::read_to_string(&doc).unwrap();
    for section in ["## Targets", "## ECDSA P-256", "## Slow token"] {
        assert!(report.contains(section), "{report}");
    }
    for plot in ["throughput-p256.svg", "latency-p256.svg", "slow-token.svg"] {
        let svg = std::fs::read_to_string(out_dir.join(plot)).unwrap();
        assert!(svg.starts_with("<svg"), "{plot}");
        assert!(report.contains(plot), "{plot} is not linked");
    }
}
