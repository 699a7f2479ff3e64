//! PIN lockout on tokens that really lock: kryoptic (10 wrong PINs; final try flagged with one
//! left) and the TPM (its dictionary-attack lockout, set by the stack to 3 tries, locks every
//! login without changing any PKCS#11 flag).
//!
//! A TLS server is started again and again with a wrong PIN, as a supervisor restarting a
//! failing service would, each start a child process sharing the lockout guard's state file.
//! Every `C_Login` is counted by OpenSC's pkcs11-spy, through which each start loads the
//! module, and by the library's own debug event before each call. The spy sees nothing on
//! kryoptic (OpenSC 0.23's spy hands the `C_GetInterface` list of a PKCS#11 3.0 module through
//! unwrapped), so there the token's own failure counter is read as well.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use rustls_hsm::pkcs11::KeySelector;
use rustls_hsm::resolver::ServerCertResolver;
use rustls_hsm::HsmToken;

use common::stack::Stack;
use common::tls::{client_config, handshake, TestCa, TestServer};

const RESTARTS: usize = 12;
const WRONG_PIN: &str = "99999999";

/// Puts a TLS key on the token (logging in by hand, not through the spy).
fn with_tls_key(stack: &Stack) {
    let out = stack.pkcs11_tool(&[
        "--token-label",
        &stack.token.label,
        "--login",
        "--pin",
        &stack.token.user_pin(),
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "tls",
        "--id",
        "01",
        "--usage-sign",
    ]);
    assert!(out.status.success(), "{}", common::text(&out));
}

/// One server start in a child process; the spy logs its PKCS#11 calls to `spy_log`.
fn server_start(stack: &Stack, pin_file: &Path, spy_log: &Path) -> Output {
    let mut cmd = stack.command(std::env::current_exe().unwrap());
    cmd.args(["child_server_start", "--exact", "--ignored", "--nocapture"])
        .env("RUSTLS_HSM_CHILD", "1")
        .env("CHILD_LABEL", &stack.token.label)
        .env("CHILD_PIN_FILE", pin_file)
        .env("CHILD_GUARD_FILE", stack.path().join("pin-guard.json"))
        .env("PKCS11SPY", &stack.module)
        .env("PKCS11SPY_OUTPUT", spy_log);
    cmd.output().unwrap()
}

/// `C_Login` calls the spy logged.
fn spied_logins(spy_log: &Path) -> usize {
    std::fs::read_to_string(spy_log)
        .unwrap_or_default()
        .matches("C_Login")
        .count()
}

/// `C_Login` calls the library announced in a child's output (its debug event).
fn traced_logins(out: &Output) -> usize {
    stdout(out)
        .lines()
        .filter(|l| l.contains("rustls_hsm::pool::login") && l.contains("C_Login"))
        .count()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn token_flags(stack: &Stack) -> String {
    let out = stack.pkcs11_tool(&["-L"]);
    common::text(&out)
        .lines()
        .find(|l| l.contains("token flags"))
        .unwrap_or_default()
        .to_owned()
}

/// Wrong PINs a person can still enter before kryoptic reports its count low (3 tries left);
/// the count is then reset with the right PIN.
fn kryoptic_tries_before_count_low(stack: &Stack) -> usize {
    let mut tries = 0;
    while !token_flags(stack).contains("count low") {
        assert_eq!(stack.login_by_hand("00000000"), "CKR_PIN_INCORRECT");
        tries += 1;
        assert!(tries <= 10, "no count-low flag after {tries} wrong PINs");
    }
    assert_eq!(stack.login_by_hand(&stack.token.user_pin()), "CKR_OK");
    tries
}

/// Restarts the server `RESTARTS` times with a wrong PIN; returns the `C_Login` calls made, as
/// the library traced them and as the spy saw them.
fn restart_with_wrong_pin(stack: &Stack, spy_log: &Path) -> (usize, usize) {
    let wrong = stack.path().join("wrong.pin");
    std::fs::write(&wrong, WRONG_PIN).unwrap();
    let mut traced = 0;
    for restart in 0..RESTARTS {
        let out = server_start(stack, &wrong, spy_log);
        traced += traced_logins(&out);
        let text = stdout(&out);
        assert!(!out.status.success(), "restart {restart} came up:\n{text}");
        assert!(!text.contains(WRONG_PIN), "the PIN in the output: {text}");
        let expected = if restart == 0 {
            "CKR_PIN_INCORRECT"
        } else {
            "refused this PIN value before"
        };
        assert!(
            text.contains(expected),
            "restart {restart}: {}",
            common::text(&out)
        );
    }
    (traced, spied_logins(spy_log))
}

/// The corrected PIN brings the server up, with one `C_Login`.
fn corrected_pin_brings_the_server_up(stack: &Stack, spy_log: &Path) {
    let out = server_start(stack, &stack.token.user_pin_file, spy_log);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(stdout(&out).contains("handshake ok"), "{}", stdout(&out));
    assert_eq!(traced_logins(&out), 1, "C_Login calls with the right PIN");
}

// Twelve restarts with a wrong PIN must not lock kryoptic (it locks after 10): the guard lets
// the first one try and refuses the same value afterwards.
#[test]
fn kryoptic_wrong_pin_across_restarts_does_not_lock() {
    let Some(stack) = Stack::start("kryoptic") else {
        return;
    };
    let case = stack.case(format!(
        "wrong PIN across {RESTARTS} server restarts leaves the token unlocked"
    ));
    with_tls_key(&stack);
    let spy_log = stack.path().join("spy.log");

    let (traced, _) = restart_with_wrong_pin(&stack, &spy_log);
    // The token's own count: one failure spent, so six more wrong PINs (not seven) reach the
    // mark that three tries are left.
    let left = kryoptic_tries_before_count_low(&stack);
    println!(
        "kryoptic: {RESTARTS} restarts with a wrong PIN made {traced} C_Login call(s); the token \
         then took {left} more wrong PINs before its count was low (7 on a fresh token)"
    );
    assert_eq!(traced, 1, "C_Login calls across {RESTARTS} restarts");
    assert_eq!(left, 6, "wrong PINs the token counted from the restarts");
    assert_eq!(stack.login_by_hand(&stack.token.user_pin()), "CKR_OK");
    corrected_pin_brings_the_server_up(&stack, &spy_log);
    case.pass();
}

// A PIN already on its final try is left to a person: the server does not spend it, not even
// with the right PIN.
#[test]
fn kryoptic_final_try_is_left_to_a_person() {
    let Some(stack) = Stack::start("kryoptic") else {
        return;
    };
    let case = stack.case("PIN on its final try: the server never calls C_Login");
    with_tls_key(&stack);
    for _ in 0..9 {
        assert_eq!(stack.login_by_hand("00000000"), "CKR_PIN_INCORRECT");
    }
    assert!(token_flags(&stack).contains("final user PIN try"));

    let spy_log = stack.path().join("spy.log");
    let mut traced = 0;
    for _ in 0..3 {
        let out = server_start(&stack, &stack.token.user_pin_file, &spy_log);
        assert!(!out.status.success(), "{}", common::text(&out));
        assert!(stdout(&out).contains("final try"), "{}", common::text(&out));
        traced += traced_logins(&out);
    }
    println!("kryoptic: 3 restarts with the PIN on its final try made {traced} C_Login calls");
    assert_eq!(traced, 0, "C_Login calls on a PIN at its final try");
    // Any login, even with the right PIN, would have cleared the flag.
    assert!(token_flags(&stack).contains("final user PIN try"));

    // The person's login resets the count; the server comes up again.
    assert_eq!(stack.login_by_hand(&stack.token.user_pin()), "CKR_OK");
    corrected_pin_brings_the_server_up(&stack, &spy_log);
    case.pass();
}

// The TPM's dictionary-attack lockout changes no PKCS#11 flag, so only the guard's memory of
// refused values keeps restarts from locking it.
#[test]
fn tpm_wrong_pin_across_restarts_does_not_lock() {
    let Some(stack) = Stack::start("tpm") else {
        return;
    };
    let case = stack.case(format!(
        "wrong PIN across {RESTARTS} server restarts leaves the TPM unlocked"
    ));
    with_tls_key(&stack);
    let right = stack.token.user_pin();

    // The lockout is real: three wrong PINs by hand lock out even the right one.
    for _ in 0..3 {
        assert_eq!(stack.login_by_hand("00000000"), "CKR_PIN_INCORRECT");
    }
    assert_eq!(stack.login_by_hand(&right), "CKR_PIN_LOCKED");
    let out = stack
        .command("tpm2_dictionarylockout")
        .arg("--clear-lockout")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    assert_eq!(stack.login_by_hand(&right), "CKR_OK");

    let spy_log = stack.path().join("spy.log");
    let (traced, spied) = restart_with_wrong_pin(&stack, &spy_log);
    println!(
        "tpm: {RESTARTS} restarts with a wrong PIN made {spied} C_Login call(s) (spy), {traced} \
         (library trace)"
    );
    assert_eq!(spied, 1, "C_Login calls across {RESTARTS} restarts (spy)");
    assert_eq!(
        traced, 1,
        "C_Login calls across {RESTARTS} restarts (trace)"
    );
    assert_eq!(
        stack.login_by_hand(&right),
        "CKR_OK",
        "a person can still log in"
    );
    corrected_pin_brings_the_server_up(&stack, &spy_log);
    case.pass();
}

/// The child side: one server start through pkcs11-spy, then one handshake.
#[test]
#[ignore = "run by the lockout tests in a child process"]
fn child_server_start() {
    if std::env::var_os("RUSTLS_HSM_CHILD").is_none() {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap();
    tracing_subscriber::fmt()
        .with_env_filter("rustls_hsm=debug")
        .with_ansi(false)
        .with_writer(std::io::stdout)
        .init();
    let built = HsmToken::builder()
        .module_path(spy_module())
        .token(var("CHILD_LABEL").parse().unwrap())
        .pin(
            format!("file:{}", var("CHILD_PIN_FILE"))
                .parse()
                .unwrap(),
        )
        .pin_guard_file(var("CHILD_GUARD_FILE"))
        .build();
    let token = match built {
        Ok(token) => token,
        Err(e) => {
            println!("error: {e}");
            std::process::exit(1);
        }
    };
    let key = token
        .key(&KeySelector::label("tls"))
        .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let ca = TestCa::new();
        let mut resolver = ServerCertResolver::new();
        resolver.add(
            None,
            key.certified_key(vec![ca.leaf(key.spki(), false)])
                .unwrap(),
        );
        let server = TestServer::start(Arc::new(resolver)).await;
        let versions = &[&rustls::version::TLS13];
        handshake(server.addr, client_config(&ca, versions, &[]))
            .await
            .unwrap();
    });
    println!("handshake ok");
}

fn spy_module() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so",
        "/usr/lib/aarch64-linux-gnu/pkcs11/pkcs11-spy.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("OpenSC's pkcs11-spy.so (Debian package opensc-pkcs11)")
}
