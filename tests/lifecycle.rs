//! Start-up and shutdown of a token in a real process: no crash or hang at exit, and a token
//! shut down can be built again.

// Helpers here panic on failure, like the tests that call them.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::keys::{build, key, token_with_keys};
use common::{TestHsm, TestToken};

/// Runs `test` of this binary in a child process `times` times; each must exit 0.
fn run_child(hsm: &TestHsm, token: &TestToken, test: &str, times: usize) {
    for run in 0..times {
        let started = Instant::now();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--ignored", "--nocapture"])
            .env("SOFTHSM2_CONF", &hsm.conf)
            .env("RUSTLS_HSM_CHILD", "1")
            .env("PIN_FILE", &token.user_pin_file)
            .env("GUARD_FILE", hsm.path().join("guard.json"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(30) {
                child.kill().unwrap();
                panic!("run {run} of {test} hung at exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = child.wait_with_output().unwrap();
        assert!(
            status.success(),
            "run {run} of {test}: {status}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// Processes that signed and then returned from main crashed (SIGSEGV) or hung in a fifth of
// the runs: r2d2's threads closed sessions or finalized the module during exit.
#[test]
fn a_process_that_signs_and_exits_never_crashes() {
    let (hsm, token) = token_with_keys(&["ec:p256"]);
    run_child(&hsm, &token, "child_builds_and_returns", 150);
    run_child(&hsm, &token, "child_signs_and_returns", 15);
    run_child(&hsm, &token, "child_signs_shuts_down_and_returns", 15);
}

#[test]
#[ignore = "run by a_process_that_signs_and_exits_never_crashes in a child process"]
fn child_builds_and_returns() {
    child_signs(None);
}

#[test]
#[ignore = "run by a_process_that_signs_and_exits_never_crashes in a child process"]
fn child_signs_and_returns() {
    child_signs(Some(false));
}

#[test]
#[ignore = "run by a_process_that_signs_and_exits_never_crashes in a child process"]
fn child_signs_shuts_down_and_returns() {
    child_signs(Some(true));
}

/// Builds a token in a tokio runtime; with `Some(shutdown)` signs from several threads and,
/// when `shutdown`, shuts the token down before returning; with `None` returns at once, while
/// the pool is still opening its first sessions.
fn child_signs(sign: Option<bool>) {
    if std::env::var_os("RUSTLS_HSM_CHILD").is_none() {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap();
    // Exit the moment the runtime is gone, as a program's main would, rather than after the
    // test harness has reported.
    let _exit_now = ExitNow;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    runtime.block_on(async {
        let token = rustls_hsm::HsmToken::builder()
            .module_path(common::softhsm_module())
            .token("signer".parse().unwrap())
            .pin(
                format!("file:{}", var("PIN_FILE"))
                    .parse()
                    .unwrap(),
            )
            .pin_guard_file(var("GUARD_FILE"))
            .pool_size(4)
            .build()
            .unwrap();
        let Some(shutdown) = sign else {
            return;
        };
        let key = token
            .key(&rustls_hsm::pkcs11::KeySelector::label("ec:p256"))
            .unwrap();
        let scheme = key.default_scheme().unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let key = key.clone();
                tokio::task::spawn_blocking(move || key.sign_with(scheme, &[i; 32]).unwrap())
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        if shutdown {
            token.shutdown().unwrap();
        }
    });
}

#[test]
fn a_token_shut_down_can_be_built_again() {
    let (hsm, token) = token_with_keys(&["ec:p256"]);
    let first = build(&hsm, &token, |b| b);
    let signer = key(&first, "ec:p256");
    let scheme = signer.default_scheme().unwrap();
    signer
        .sign_with(scheme, b"before")
        .unwrap();
    first.shutdown().unwrap();
    assert!(matches!(
        signer.sign_with(scheme, b"after shutdown"),
        Err(rustls_hsm::Error::ShutDown { .. })
    ));

    let again = build(&hsm, &token, |b| b);
    key(&again, "ec:p256")
        .sign_with(scheme, b"built again")
        .unwrap();
}

/// Ends the process with status 0 when dropped.
struct ExitNow;

impl Drop for ExitNow {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            std::process::exit(0);
        }
    }
}
