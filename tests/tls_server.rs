//! End-to-end tests of the example server (`examples/tls_server`) over real sockets, each with
//! SoftHSM tokens of its own, driven by `curl`, `openssl s_client` and the example client as
//! independent peers.
// Helpers below unwrap where a failure is a bug in the test itself (a poisoned log lock, a test
// binary outside a target directory).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use common::text;
use tempfile::TempDir;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// How long a server may take to start (a first dev run generates an RSA key and certificates).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// How long one client command may take before the test calls it a hang.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn dev_default_serves_the_page_over_tls13_and_h2() -> TestResult {
    let dir = TempDir::new()?;
    let server = Server::start_dev(dir.path(), &[])?;

    let page = server.curl(&[])?;
    assert!(page.contains("TLS version: TLSv1_3"), "{page}");
    assert!(page.contains("HTTP version: HTTP/2.0"), "{page}");
    assert!(
        page.contains("Signature scheme: ECDSA_NISTP256_SHA256"),
        "{page}"
    );
    assert!(page.contains("Client certificate: none"), "{page}");
    let page = server.curl(&["--http1.1"])?;
    assert!(page.contains("HTTP version: HTTP/1.1"), "{page}");
    let health = server.curl_path("/healthz", &[])?;
    assert_eq!(health, "ok\n");

    let out = server.s_client(&[])?;
    let shown = text(&out);
    assert!(shown.contains("Verify return code: 0 (ok)"), "{shown}");
    Ok(())
}

#[test]
fn both_keys_serve_what_each_client_offers() -> TestResult {
    let dir = TempDir::new()?;
    let server = Server::start_dev(dir.path(), &[])?;

    for (args, protocol, peer_type) in [
        (&["-tls1_2", "-sigalgs", "RSA+SHA256"][..], "TLSv1.2", "RSA"),
        (
            &["-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256"][..],
            "TLSv1.3",
            "RSA-PSS",
        ),
        (
            &["-sigalgs", "ecdsa_secp256r1_sha256"][..],
            "TLSv1.3",
            "ECDSA",
        ),
    ] {
        let out = server.s_client(args)?;
        let shown = text(&out);
        assert!(out.status.success(), "{args:?}: {shown}");
        assert!(
            shown.contains(&format!("New, {protocol}, Cipher is")),
            "{args:?}: {shown}"
        );
        assert!(
            shown.contains(&format!("Peer signature type: {peer_type}\n")),
            "{args:?}: {shown}"
        );
        assert!(
            shown.contains("Verify return code: 0 (ok)"),
            "{args:?}: {shown}"
        );
    }
    Ok(())
}

#[test]
fn an_offer_no_key_can_serve_fails_at_once_with_a_reason() -> TestResult {
    let dir = TempDir::new()?;
    let server = Server::start_dev(dir.path(), &[])?;

    let started = Instant::now();
    let out = server.s_client(&["-sigalgs", "ed25519"])?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let line = server.wait_for_log("TLS handshake failed")?;
    assert!(line.contains("no configured key can sign"), "{line}");
    assert!(line.contains("ED25519"), "{line}");
    Ok(())
}

#[test]
fn openssl_verifies_the_chains_made_on_the_token() -> TestResult {
    let dir = TempDir::new()?;
    let server = Server::start_dev(dir.path(), &[])?;
    let state = server.state_dir();

    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(state.join("ca.pem"))
        .arg(state.join("server-ec.pem"))
        .arg(state.join("server-rsa.pem"))
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    let out = Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(state.join("ca.pem"))
        .arg(state.join("client.pem"))
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    // A client certificate is not good for a server.
    let out = Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-CAfile"])
        .arg(state.join("ca.pem"))
        .arg(state.join("client.pem"))
        .output()?;
    assert!(!out.status.success(), "{}", text(&out));
    Ok(())
}

#[test]
fn mtls_accepts_the_token_client_and_rejects_the_rest() -> TestResult {
    let dir = TempDir::new()?;
    let server = Server::start_dev(dir.path(), &["--client-auth", "required"])?;

    // The example client, its key on the dev token, is accepted and named on the page.
    let out = run_with_timeout(
        Command::new(example("tls_client"))
            .current_dir(dir.path())
            .args(["--dev", "--url"])
            .arg(format!("https://localhost:{}/", server.addr.port())),
    )?;
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("200 OK"), "{shown}");
    assert!(shown.contains("CN=rustls-hsm dev client"), "{shown}");

    // Without a certificate: refused, and the server says why.
    assert!(server.curl(&[]).is_err());
    let line = server.wait_for_log("peer sent no certificates")?;
    assert!(line.contains("TLS handshake failed"), "{line}");

    // A certificate from a CA the server does not know: refused.
    let (cert, key) = unknown_client_cert(dir.path())?;
    let refused = server.curl(&["--cert", &cert, "--key", &key]);
    assert!(refused.is_err(), "{refused:?}");
    let line = server.wait_for_log("invalid peer certificate")?;
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert!(line.contains("TLS handshake failed"), "{line}");
    Ok(())
}

#[test]
fn optional_client_auth_serves_clients_without_a_certificate() -> TestResult {
    let dir = TempDir::new()?;
    let server = Server::start_dev(dir.path(), &["--client-auth", "optional"])?;

    let page = server.curl(&[])?;
    assert!(page.contains("Client certificate: none"), "{page}");
    let (cert, key) = unknown_client_cert(dir.path())?;
    assert!(server
        .curl(&["--cert", &cert, "--key", &key])
        .is_err());
    Ok(())
}

#[test]
fn sigterm_finishes_every_request_in_flight_and_exits_zero() -> TestResult {
    const CONNECTIONS: usize = 32;
    let dir = TempDir::new()?;
    let mut server = Server::start_dev(dir.path(), &[])?;
    let ca = server.state_dir().join("ca.pem");

    let runtime = tokio::runtime::Runtime::new()?;
    let responses = runtime.block_on(async {
        let connector = tls_connector(&ca)?;
        // Every connection handshakes and sends its request before the signal.
        let mut streams = Vec::new();
        for _ in 0..CONNECTIONS {
            streams.push(send_delayed_request(&connector, server.addr).await?);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.signal("TERM")?;
        let readers: Vec<_> = streams
            .into_iter()
            .map(|stream| tokio::spawn(read_to_end(stream)))
            .collect();
        let mut responses = Vec::new();
        for reader in readers {
            responses.push(reader.await??);
        }
        Ok::<_, Box<dyn std::error::Error>>(responses)
    })?;

    for response in &responses {
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.ends_with("waited 1500 ms\n"), "{response}");
    }
    let status = server.wait_exit(Duration::from_secs(30))?;
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(server
        .log()
        .contains("reason=\"SIGTERM\""));
    assert!(std::net::TcpStream::connect(server.addr).is_err());
    Ok(())
}

#[test]
fn dev_default_reuses_its_token_keys_and_certificates() -> TestResult {
    let dir = TempDir::new()?;
    let mut first = Server::start_dev(dir.path(), &[])?;
    first.signal("TERM")?;
    assert_eq!(
        first
            .wait_exit(Duration::from_secs(30))?
            .code(),
        Some(0)
    );
    let state = first.state_dir();
    let ca_before = std::fs::read(state.join("ca.pem"))?;

    let second = Server::start_dev(dir.path(), &[])?;
    let log = second.log();
    assert!(!log.contains("created the dev token"), "{log}");
    assert!(!log.contains("generated a dev key"), "{log}");
    assert!(!log.contains("issued"), "{log}");
    assert_eq!(std::fs::read(state.join("ca.pem"))?, ca_before);
    let page = second.curl(&[])?;
    assert!(page.contains("TLS version: TLSv1_3"), "{page}");

    // One key per label on the token, as the operator tool lists them.
    let out = Command::new(env!("CARGO_BIN_EXE_rustls-hsm"))
        .env("SOFTHSM2_CONF", state.join("softhsm2.conf"))
        .env("RUSTLS_HSM_MODULE", common::softhsm_module())
        .args([
            "key",
            "list",
            "--json",
            "--token",
            "rustls-hsm-dev",
            "--pin",
        ])
        .arg(format!("file:{}", state.join("user.pin").display()))
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut labels: Vec<&str> = listed["keys"]
        .as_array()
        .ok_or("no keys array")?
        .iter()
        .filter_map(|k| k["label"].as_str())
        .collect();
    labels.sort_unstable();
    assert_eq!(
        labels,
        ["dev-ca", "dev-client", "dev-server-ec", "dev-server-rsa"]
    );
    Ok(())
}

#[test]
fn operator_certificates_serve_keys_named_on_the_command_line() -> TestResult {
    let (hsm, token) = common::TestHsm::with_token("web");
    let dir = hsm.path();
    let cli = |args: &[&str]| -> Result<Output, Box<dyn std::error::Error>> {
        let out = hsm
            .cli()
            .args(args)
            .args(["--token", "web", "--pin", &token.pin_source()])
            .current_dir(dir)
            .output()?;
        if !out.status.success() {
            return Err(format!("rustls-hsm {args:?}: {}", text(&out)).into());
        }
        Ok(out)
    };
    for (label, kind) in [
        ("ca", "ec:p256"),
        ("tls-ec", "ec:p256"),
        ("tls-rsa", "rsa:2048"),
    ] {
        cli(&["key", "generate", "--label", label, "--type", kind])?;
    }
    cli(&[
        "cert",
        "self-signed",
        "--key",
        "ca",
        "--ca",
        "--subject",
        "CN=Web CA",
    ])
    .and_then(|out| Ok(std::fs::write(dir.join("ca.pem"), out.stdout)?))?;

    // RSA: a CSR made on the token, checked by openssl, issued by the CA on the same token.
    cli(&[
        "cert",
        "csr",
        "--key",
        "tls-rsa",
        "--subject",
        "CN=localhost",
    ])
    .and_then(|out| Ok(std::fs::write(dir.join("rsa.csr"), out.stdout)?))?;
    let out = Command::new("openssl")
        .args(["req", "-verify", "-noout", "-in"])
        .arg(dir.join("rsa.csr"))
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    cli(&[
        "cert",
        "issue",
        "--ca-key",
        "ca",
        "--ca-cert",
        "ca.pem",
        "--csr",
        "rsa.csr",
    ])
    .and_then(|out| Ok(std::fs::write(dir.join("rsa.pem"), out.stdout)?))?;
    // The CSR named no alternative names; a server certificate for localhost needs one.
    cli(&[
        "cert",
        "issue",
        "--ca-key",
        "ca",
        "--ca-cert",
        "ca.pem",
        "--key",
        "tls-rsa",
    ])
    .err()
    .ok_or("issuing for a key without --subject must fail")?;
    cli(&[
        "cert",
        "issue",
        "--ca-key",
        "ca",
        "--ca-cert",
        "ca.pem",
        "--key",
        "tls-rsa",
        "--subject",
        "CN=localhost",
        "--san",
        "DNS:localhost",
        "--out",
        "rsa.pem",
    ])?;
    // EC: issued for the key on the token and stored next to it.
    cli(&[
        "cert",
        "issue",
        "--ca-key",
        "ca",
        "--ca-cert",
        "ca.pem",
        "--key",
        "tls-ec",
        "--subject",
        "CN=localhost",
        "--san",
        "DNS:localhost",
        "--store-on-token",
        "--out",
        "ec.pem",
    ])?;
    let out = Command::new("openssl")
        .args(["verify", "-CAfile", "ca.pem", "rsa.pem", "ec.pem"])
        .current_dir(dir)
        .output()?;
    assert!(out.status.success(), "{}", text(&out));

    // Chains from files, both keys.
    let mut cmd = Command::new(example("tls_server"));
    cmd.env("SOFTHSM2_CONF", &hsm.conf)
        .arg("--module")
        .arg(&hsm.module)
        .args([
            "--token",
            "web",
            "--pin",
            &token.pin_source(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args([
            "--key", "tls-ec", "--cert", "ec.pem", "--key", "tls-rsa", "--cert", "rsa.pem",
        ]);
    cmd.current_dir(dir);
    let server = Server::start(cmd, dir)?;
    let out =
        server.s_client_with_ca(&dir.join("ca.pem"), &["-tls1_2", "-sigalgs", "RSA+SHA256"])?;
    assert!(
        text(&out).contains("Verify return code: 0 (ok)"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("Peer signature type: RSA\n"),
        "{}",
        text(&out)
    );
    drop(server);

    // The EC chain from the token.
    let mut cmd = Command::new(example("tls_server"));
    cmd.env("SOFTHSM2_CONF", &hsm.conf)
        .arg("--module")
        .arg(&hsm.module)
        .args([
            "--token",
            "web",
            "--pin",
            &token.pin_source(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--key", "tls-ec", "--cert-from-token"]);
    cmd.current_dir(dir);
    let server = Server::start(cmd, dir)?;
    let out = server.s_client_with_ca(&dir.join("ca.pem"), &[])?;
    assert!(
        text(&out).contains("Verify return code: 0 (ok)"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("Peer signature type: ECDSA\n"),
        "{}",
        text(&out)
    );
    Ok(())
}

#[test]
fn example_certificate_script_makes_certificates_openssl_accepts() -> TestResult {
    let dir = TempDir::new()?;
    let out_dir = dir.path().join("out");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/make-example-certs.sh");
    for run in ["first", "second"] {
        let out = Command::new(&script)
            .arg("--out")
            .arg(&out_dir)
            .env("RUSTLS_HSM_BIN", env!("CARGO_BIN_EXE_rustls-hsm"))
            .env("RUSTLS_HSM_MODULE", common::softhsm_module())
            .env_remove("SOFTHSM2_CONF")
            .output()?;
        let shown = text(&out);
        assert!(out.status.success(), "{run} run: {shown}");
        // Keys are made once and reused.
        assert_eq!(
            shown.contains("generated key"),
            run == "first",
            "{run} run: {shown}"
        );
        for file in ["server-ec.pem", "server-rsa.pem", "client.pem"] {
            assert!(shown.contains(&format!("{file}: OK")), "{run} run: {shown}");
        }
    }
    Ok(())
}

#[test]
fn issuing_checks_the_ca_and_never_grants_ca_status() -> TestResult {
    let (hsm, token) = common::TestHsm::with_token("ca");
    let dir = hsm.path();
    let cli = |args: &[&str]| -> Result<Output, Box<dyn std::error::Error>> {
        Ok(hsm
            .cli()
            .args(args)
            .args(["--token", "ca", "--pin", &token.pin_source()])
            .current_dir(dir)
            .output()?)
    };
    for label in ["ca", "other"] {
        let out = cli(&["key", "generate", "--label", label, "--type", "ec:p256"])?;
        assert!(out.status.success(), "{}", text(&out));
    }
    for (label, file) in [("ca", "ca.pem"), ("other", "other.pem")] {
        let out = cli(&[
            "cert",
            "self-signed",
            "--key",
            label,
            "--ca",
            "--subject",
            "CN=CA",
            "--out",
            file,
            "--store-on-token",
        ])?;
        assert!(out.status.success(), "{}", text(&out));
    }

    // A request asking to be a CA, made by openssl with a software key.
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-subj",
            "/CN=sneaky",
            "-keyout",
            "sneaky.key",
            "-out",
            "sneaky.csr",
        ])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .current_dir(dir)
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    let out = cli(&[
        "cert",
        "issue",
        "--ca-key",
        "ca",
        "--ca-cert",
        "ca.pem",
        "--csr",
        "sneaky.csr",
        "--out",
        "sneaky.pem",
    ])?;
    assert!(out.status.success(), "{}", text(&out));
    let out = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-ext",
            "basicConstraints",
            "-in",
            "sneaky.pem",
        ])
        .current_dir(dir)
        .output()?;
    assert!(text(&out).contains("CA:FALSE"), "{}", text(&out));

    // The CA certificate must be the CA key's.
    let out = cli(&[
        "cert",
        "issue",
        "--ca-key",
        "ca",
        "--ca-cert",
        "other.pem",
        "--csr",
        "sneaky.csr",
        "--out",
        "x.pem",
    ])?;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("does not belong to CA key `ca`"),
        "{}",
        text(&out)
    );

    // A second, different certificate for a key is stored only with --replace.
    let again = [
        "cert",
        "self-signed",
        "--key",
        "ca",
        "--ca",
        "--subject",
        "CN=CA 2",
        "--store-on-token",
    ];
    let out = cli(&again)?;
    assert!(!out.status.success());
    assert!(text(&out).contains("--replace"), "{}", text(&out));
    let out = cli(&[&again[..], &["--replace", "--out", "ca2.pem"]].concat())?;
    assert!(out.status.success(), "{}", text(&out));
    let exported = cli(&["cert", "export", "--key", "ca"])?;
    assert!(exported.status.success(), "{}", text(&exported));
    assert_eq!(exported.stdout, std::fs::read(dir.join("ca2.pem"))?);
    Ok(())
}

/// A running example server, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `tls_server --dev` in `dir` on a free port, with extra arguments.
    fn start_dev(dir: &Path, extra: &[&str]) -> Result<Self, Box<dyn std::error::Error>> {
        let mut cmd = Command::new(example("tls_server"));
        cmd.current_dir(dir)
            .args(["--dev", "--listen", "127.0.0.1:0"])
            .args(extra);
        Self::start(cmd, dir)
    }

    fn start(mut cmd: Command, dir: &Path) -> Result<Self, Box<dyn std::error::Error>> {
        let mut child = cmd
            .env("RUST_LOG", "info,tls_server=debug")
            .env_remove("RUSTLS_HSM_MODULE")
            .env_remove("RUSTLS_HSM_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock()
                    .unwrap()
                    .push(strip_ansi(&line));
            }
        });
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(addr) = line
                    .strip_prefix("listening on https://")
                    .and_then(|rest| rest.strip_suffix('/'))
                {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let mut server = Self {
            child,
            addr: "0.0.0.0:0".parse()?,
            dir: dir.to_owned(),
            log,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => server.addr = addr.parse()?,
            Err(_) => {
                return Err(format!("server did not start; log:\n{}", server.log()).into());
            }
        }
        Ok(server)
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join(".state/dev")
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for a log line containing `needle`.
    fn wait_for_log(&self, needle: &str) -> Result<String, Box<dyn std::error::Error>> {
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(line) = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return Ok(line.clone());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err(format!("no log line with `{needle}`; log:\n{}", self.log()).into())
    }

    /// `curl` for `/` trusting the dev CA; the body, or an error with curl's output.
    fn curl(&self, args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
        self.curl_path("/", args)
    }

    fn curl_path(&self, path: &str, args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
        let out = run_with_timeout(
            Command::new("curl")
                .args(["--silent", "--show-error", "--fail", "--max-time", "15"])
                .arg("--cacert")
                .arg(self.state_dir().join("ca.pem"))
                .args(args)
                .arg(format!("https://localhost:{}{path}", self.addr.port())),
        )?;
        if !out.status.success() {
            return Err(format!("curl failed: {}", text(&out)).into());
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `openssl s_client` against the server, trusting the dev CA; stdin closed.
    fn s_client(&self, args: &[&str]) -> Result<Output, Box<dyn std::error::Error>> {
        self.s_client_with_ca(&self.state_dir().join("ca.pem"), args)
    }

    fn s_client_with_ca(
        &self,
        ca: &Path,
        args: &[&str],
    ) -> Result<Output, Box<dyn std::error::Error>> {
        run_with_timeout(
            Command::new("openssl")
                .arg("s_client")
                .arg("-connect")
                .arg(format!("localhost:{}", self.addr.port()))
                .arg("-CAfile")
                .arg(ca)
                .args(["-servername", "localhost"])
                .args(args),
        )
    }

    fn signal(&self, name: &str) -> Result<(), Box<dyn std::error::Error>> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            return Err(format!("kill -{name} failed").into());
        }
        Ok(())
    }

    fn wait_exit(
        &mut self,
        limit: Duration,
    ) -> Result<std::process::ExitStatus, Box<dyn std::error::Error>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(
                    format!("server still running after {limit:?}; log:\n{}", self.log()).into(),
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The path of an example binary built for this test run, building it if needed.
///
/// Integration tests do not build examples when run with `--test`; cargo does it here, with
/// this test's profile, features and target directory, so nothing is compiled twice.
fn example(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_owned();
    BUILD.call_once(|| {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args([
            "build",
            "--quiet",
            "--example",
            "tls_server",
            "--example",
            "tls_client",
        ])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(profile_dir.parent().unwrap());
        if cfg!(feature = "cli") {
            cmd.args(["--features", "cli"]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "building the examples: {}",
            text(&out)
        );
    });
    profile_dir.join("examples").join(name)
}

/// Runs a command with stdin closed, failing if it runs longer than [`CLIENT_TIMEOUT`].
fn run_with_timeout(cmd: &mut Command) -> Result<Output, Box<dyn std::error::Error>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            return Err(format!("{cmd:?} hung; {}", text(&out)).into());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

/// A self-signed client certificate and key from `openssl req`, unknown to the server.
fn unknown_client_cert(dir: &Path) -> Result<(String, String), Box<dyn std::error::Error>> {
    let cert = dir.join("stranger.pem");
    let key = dir.join("stranger.key");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=stranger"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=clientAuth", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    if !out.status.success() {
        return Err(format!("openssl req: {}", text(&out)).into());
    }
    Ok((cert.display().to_string(), key.display().to_string()))
}

fn tls_connector(ca: &Path) -> Result<tokio_rustls::TlsConnector, Box<dyn std::error::Error>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_hsm::cert::chain_from_pem(&std::fs::read(ca)?)? {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

type ClientStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Connects, handshakes and sends `GET /delay?ms=1500` (HTTP/1.1, then close).
async fn send_delayed_request(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> Result<ClientStream, Box<dyn std::error::Error>> {
    use tokio::io::AsyncWriteExt;

    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(b"GET /delay?ms=1500 HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await?;
    tls.flush().await?;
    Ok(tls)
}

async fn read_to_end(mut stream: ClientStream) -> Result<String, std::io::Error> {
    use tokio::io::AsyncReadExt;

    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// Drops terminal colour codes from a log line.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
