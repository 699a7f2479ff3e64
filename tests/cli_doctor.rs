//! `rustls-hsm doctor` and module loading, against real SoftHSM tokens.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::cli::{fails, json, ok, output, tool_ok};
use common::{text, TestHsm};

/// The TLS schemes SoftHSM 2.6 serves: ECDSA on three curves, RSA PSS and PKCS#1, Ed25519.
const SOFTHSM_SCHEMES: [&str; 10] = [
    "ecdsa_secp256r1_sha256",
    "ecdsa_secp384r1_sha384",
    "ecdsa_secp521r1_sha512",
    "rsa_pss_rsae_sha256",
    "rsa_pss_rsae_sha384",
    "rsa_pss_rsae_sha512",
    "rsa_pkcs1_sha256",
    "rsa_pkcs1_sha384",
    "rsa_pkcs1_sha512",
    "ed25519",
];

#[test]
fn doctor_shows_a_fresh_token_with_mechanisms_and_schemes() {
    let (hsm, _token) = TestHsm::with_token("signer");

    let text = ok(hsm.cli().arg("doctor"));
    assert!(text.contains("PKCS#11 library "), "{text}");
    assert!(text.contains("cryptoki version: 2.40"), "{text}");
    assert!(text.contains("token `signer` (serial "), "{text}");
    assert!(
        text.contains("flags:        rng, login_required, user_pin_initialized"),
        "{text}"
    );
    assert!(text.contains("user PIN:     ok"), "{text}");
    assert!(text.contains("max unlimited"), "{text}");
    assert!(text.contains("CKM_ECDSA "), "{text}");
    assert!(text.contains("CKM_EDDSA "), "{text}");
    assert!(text.contains("TLS signature schemes:"), "{text}");
    for scheme in SOFTHSM_SCHEMES {
        let line = text
            .lines()
            .find(|l| {
                l.trim_start()
                    .starts_with(&format!("{scheme} "))
            })
            .unwrap_or_else(|| panic!("no line for {scheme}: {text}"));
        assert!(line.contains(" yes "), "{line}");
    }
    assert!(
        text.contains("ecdsa_secp256r1_sha256   yes  CKM_ECDSA over a host Sha256 digest"),
        "{text}"
    );
}

#[test]
fn doctor_json_has_the_documented_fields() {
    let (hsm, _token) = TestHsm::with_token("signer");
    let serial = hsm.serial_of("signer");

    let report = json(hsm.cli().args(["doctor", "--json"]));
    let library = &report["library"];
    assert_eq!(library["cryptoki_version"], "2.40", "{library:#}");
    assert_eq!(library["manufacturer"], "SoftHSM", "{library:#}");
    assert_eq!(library["initialized_by_us"], true, "{library:#}");
    assert!(
        library["path"]
            .as_str()
            .unwrap()
            .ends_with("libsofthsm2.so"),
        "{library:#}"
    );
    for field in ["description", "library_version"] {
        assert!(library[field].is_string(), "{field} in {library:#}");
    }
    assert!(
        report["slots"]
            .as_array()
            .unwrap()
            .len()
            >= 2,
        "{report:#}"
    );
    assert!(report["self_test"].is_null(), "{report:#}");

    let tokens = report["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1, "only initialised tokens: {report:#}");
    let token = &tokens[0];
    assert_eq!(token["label"], "signer");
    assert_eq!(token["serial"], serial.as_str());
    assert_eq!(token["model"], "SoftHSM v2");
    assert_eq!(token["user_pin"], "ok");
    assert_eq!(token["so_pin"], "ok");
    assert_eq!(token["sessions"]["max"], "unlimited", "{token:#}");
    assert_eq!(token["sessions"]["max_rw"], "unlimited", "{token:#}");
    assert_eq!(token["sessions"]["open"], "unavailable", "{token:#}");
    assert_eq!(token["pin_length"]["min"], 4, "{token:#}");
    assert!(token["login"].is_null(), "{token:#}");
    let flags = token["flags"].as_array().unwrap();
    assert!(
        flags
            .iter()
            .any(|f| f == "token_initialized"),
        "{token:#}"
    );

    let mechanisms = token["mechanisms"].as_array().unwrap();
    let ecdsa = mechanisms
        .iter()
        .find(|m| m["name"] == "CKM_ECDSA")
        .unwrap_or_else(|| panic!("no CKM_ECDSA in {token:#}"));
    assert_eq!(ecdsa["number"], 0x1041, "{ecdsa:#}");
    assert_eq!(ecdsa["max_key_size"], 521, "{ecdsa:#}");
    assert!(ecdsa["min_key_size"].is_u64(), "{ecdsa:#}");
    assert_eq!(ecdsa["unlisted"], false, "{ecdsa:#}");
    assert!(
        ecdsa["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "sign"),
        "{ecdsa:#}"
    );

    let schemes = token["schemes"].as_array().unwrap();
    assert_eq!(schemes.len(), SOFTHSM_SCHEMES.len(), "{token:#}");
    for scheme in schemes {
        assert_eq!(scheme["supported"], true, "{scheme:#}");
        assert!(scheme["method"].is_string(), "{scheme:#}");
        assert!(scheme["mechanism"].is_string(), "{scheme:#}");
        assert!(scheme["reason"].is_null(), "{scheme:#}");
    }
    let p256 = schemes
        .iter()
        .find(|s| s["scheme"] == "ecdsa_secp256r1_sha256")
        .unwrap();
    assert_eq!(p256["key_type"], "ec:p256");
    assert_eq!(p256["mechanism"], "CKM_ECDSA");
}

#[test]
fn self_test_passes_every_scheme_and_leaves_no_keys() {
    let (hsm, token) = TestHsm::with_token("signer");
    ok(hsm.cli_login(
        &token,
        &["key", "generate", "--label", "keep", "--type", "ec:p256"],
    ));

    let report = json(hsm.cli_login(&token, &["doctor", "--self-test", "--json"]));
    let self_test = &report["self_test"];
    assert_eq!(self_test["passed"], true, "{self_test:#}");
    assert_eq!(self_test["token"], "signer", "{self_test:#}");
    let results = self_test["results"].as_array().unwrap();
    for scheme in SOFTHSM_SCHEMES {
        let result = results
            .iter()
            .find(|r| r["scheme"] == scheme)
            .unwrap_or_else(|| panic!("no result for {scheme}: {self_test:#}"));
        assert_eq!(result["result"], "PASS", "{result:#}");
        assert!(result["mechanism"].is_string(), "{result:#}");
        assert!(result["error"].is_null(), "{result:#}");
    }
    let login = &report["tokens"][0]["login"];
    assert_eq!(login["ok"], true, "{login:#}");
    assert_eq!(login["keys"][0]["label"], "keep", "{login:#}");
    assert_eq!(
        login["keys"][0]["schemes"][0], "ecdsa_secp256r1_sha256",
        "{login:#}"
    );

    let text = ok(hsm.cli_login(&token, &["doctor", "--self-test"]));
    assert!(text.contains("self-test passed"), "{text}");
    assert_eq!(
        text.matches(" PASS").count(),
        SOFTHSM_SCHEMES.len(),
        "{text}"
    );
    assert!(!text.contains("FAIL"), "{text}");

    // The throwaway keys are gone; the operator's key is untouched.
    let objects = tool_ok(hsm.pkcs11_tool(&[
        "--token-label",
        "signer",
        "--login",
        "--pin",
        &token.user_pin(),
        "--list-objects",
    ]));
    assert!(!objects.contains("self-test"), "{objects}");
    assert_eq!(
        objects
            .matches("Private Key Object")
            .count(),
        1,
        "{objects}"
    );
    assert_eq!(
        objects
            .matches("Public Key Object")
            .count(),
        1,
        "{objects}"
    );
}

#[test]
fn self_test_needs_a_token_and_a_pin() {
    let (hsm, token) = TestHsm::with_token("signer");
    let err = fails(
        hsm.cli()
            .args(["doctor", "--self-test"]),
    );
    assert!(err.contains("--token"), "{err}");
    let err = fails(
        hsm.cli()
            .args(["doctor", "--self-test", "--token", "signer"]),
    );
    assert!(err.contains("--pin"), "{err}");
    let err = fails(
        hsm.cli()
            .args(["doctor", "--pin", &token.pin_source()]),
    );
    assert!(err.contains("--token"), "{err}");
}

#[test]
fn doctor_with_a_wrong_pin_says_so() {
    let (hsm, _token) = TestHsm::with_token("signer");
    let wrong = hsm.write_secret("wrong.pin", "00000000");
    let err = fails(hsm.cli().args([
        "doctor",
        "--token",
        "signer",
        "--pin",
        &format!("file:{}", wrong.display()),
    ]));
    assert!(err.contains("wrong user PIN for token `signer`"), "{err}");
    assert!(err.contains("CKR_PIN_INCORRECT"), "{err}");
}

#[test]
fn doctor_json_prints_a_document_for_every_failure() {
    // `doctor --json` printed nothing on stdout when it failed before its report.
    let (hsm, _token) = TestHsm::with_token("signer");
    let wrong = hsm.write_secret("wrong.pin", "00000000");
    let wrong = format!("file:{}", wrong.display());
    let cases: [(&[&str], &str, &str); 3] = [
        (
            &["--module", "/nonexistent/libvendor.so", "doctor", "--json"],
            "module_missing",
            "PKCS#11 module /nonexistent/libvendor.so does not exist",
        ),
        (
            &["doctor", "--json", "--token", "nosuch"],
            "token_not_found",
            "no initialised token matches `label:nosuch`",
        ),
        (
            &["doctor", "--json", "--token", "signer", "--pin", &wrong],
            "checks_failed",
            "doctor found problems: wrong user PIN for token `signer`",
        ),
    ];
    for (args, kind, message) in cases {
        let out = output(hsm.cli().args(args));
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let stdout = String::from_utf8(out.stdout.clone()).unwrap();
        let document: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("{args:?}: stdout is not one JSON document ({e}): {stdout}")
        });
        assert_eq!(document["error"]["kind"], kind, "{document:#}");
        let reported = document["error"]["message"]
            .as_str()
            .unwrap();
        assert!(reported.starts_with(message), "{document:#}");
        // The return code is named once, not again in cryptoki's own words.
        assert!(!reported.contains("PKCS11 error"), "{document:#}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("error: {reported}")), "{stderr}");
    }

    // The wrong PIN still leaves the full report, with the login failure in it.
    let out = output(
        hsm.cli()
            .args(["doctor", "--json", "--token", "signer", "--pin", &wrong]),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["tokens"][0]["login"]["ok"], false, "{report:#}");
    assert_eq!(report["tokens"][0]["label"], "signer", "{report:#}");

    let fine = json(hsm.cli().args(["doctor", "--json"]));
    assert!(fine["error"].is_null(), "{fine:#}");
}

#[test]
fn doctor_says_a_user_pin_never_set_is_not_initialised() {
    // A token without CKF_USER_PIN_INITIALIZED was reported with "user PIN: ok".
    let hsm = TestHsm::new();
    tool_ok(hsm.pkcs11_tool(&[
        "--init-token",
        "--slot-index",
        "0",
        "--label",
        "nopin",
        "--so-pin",
        "12345678",
    ]));

    let report = json(
        hsm.cli()
            .args(["doctor", "--json", "--token", "nopin"]),
    );
    let token = &report["tokens"][0];
    assert_eq!(token["user_pin"], "not initialised", "{report:#}");
    assert_eq!(token["so_pin"], "ok", "{report:#}");
    let text = ok(hsm
        .cli()
        .args(["doctor", "--token", "nopin"]));
    assert!(text.contains("user PIN:     not initialised"), "{text}");
    assert!(text.contains("rustls-hsm token unlock"), "{text}");
}

#[test]
fn missing_module_file_is_named() {
    let hsm = TestHsm::new();
    let err = fails(
        hsm.cli()
            .args(["--module", "/nonexistent/libvendor.so", "doctor"]),
    );
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("PKCS#11 module /nonexistent/libvendor.so does not exist"),
        "{err}"
    );
}

#[test]
fn text_file_is_not_a_module() {
    let hsm = TestHsm::new();
    let path = hsm.path().join("module.so");
    std::fs::write(&path, "this is a text file\n").unwrap();
    let err = fails(
        hsm.cli()
            .arg("--module")
            .arg(&path)
            .arg("doctor"),
    );
    assert!(err.contains("is not a shared library"), "{err}");
    assert!(err.contains("does not start with an ELF header"), "{err}");
}

#[test]
fn shared_library_without_pkcs11_is_refused() {
    let hsm = TestHsm::new();
    let library = loaded_system_library();
    let err = fails(
        hsm.cli()
            .arg("--module")
            .arg(&library)
            .arg("doctor"),
    );
    assert!(
        err.contains("is a shared library but not a PKCS#11 module"),
        "{}: {err}",
        library.display()
    );
    assert!(err.contains("C_GetFunctionList"), "{err}");
}

#[test]
fn module_for_another_architecture_is_refused() {
    let hsm = TestHsm::new();
    let path = hsm.path().join("foreign.so");
    // A 64-bit little-endian ET_DYN header for AArch64 (or x86-64 when we are AArch64).
    let (machine, name) = if std::env::consts::ARCH == "aarch64" {
        (62u16, "x86-64")
    } else {
        (183u16, "AArch64")
    };
    let mut header = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
    header.extend([0; 8]);
    header.extend(3u16.to_le_bytes());
    header.extend(machine.to_le_bytes());
    header.extend([0; 44]);
    std::fs::write(&path, header).unwrap();

    let err = fails(
        hsm.cli()
            .arg("--module")
            .arg(&path)
            .arg("doctor"),
    );
    assert!(
        err.contains(&format!("was built for 64-bit, {name}")),
        "{err}"
    );
    assert!(
        err.contains("install the module built for this machine"),
        "{err}"
    );
}

#[test]
fn softhsm_without_its_config_names_softhsm2_conf() {
    let hsm = TestHsm::new();
    let missing = hsm.path().join("missing.conf");
    let err = fails(
        hsm.cli()
            .env("SOFTHSM2_CONF", &missing)
            .arg("doctor"),
    );
    assert!(err.contains("C_Initialize"), "{err}");
    assert!(err.contains("set SOFTHSM2_CONF"), "{err}");
}

#[test]
fn no_module_named_says_how_to_name_one() {
    let hsm = TestHsm::new();
    let err = fails(
        hsm.cli()
            .env_remove("RUSTLS_HSM_MODULE")
            .args(["token", "list"]),
    );
    assert!(
        err.contains("pass --module PATH or set RUSTLS_HSM_MODULE"),
        "{err}"
    );
}

/// A C library this test process has loaded (libc, libm or libgcc_s): surely a shared object,
/// surely not a PKCS#11 module, and found without guessing the distribution's paths.
fn loaded_system_library() -> PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(PathBuf::from)
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| {
                    ["libc.so", "libm.so", "libgcc_s.so"]
                        .iter()
                        .any(|p| n.starts_with(p))
                })
        })
        .unwrap_or_else(|| panic!("no libc-family library in /proc/self/maps:\n{maps}"))
}

// A reader that goes away early (`rustls-hsm doctor | head`) once made the tool panic.
#[test]
fn output_closed_early_exits_quietly() {
    let (hsm, _token) = TestHsm::with_token("signer");
    let mut child = hsm
        .cli()
        .arg("doctor")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
