//! Tokens with keys on them, and `HsmToken`s over them, for in-process tests.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use std::path::PathBuf;

use rustls_hsm::pkcs11::{generate_key_pair, BackupPolicy, KeySelector, KeySpec};
use rustls_hsm::{HsmKey, HsmToken, HsmTokenBuilder};

use super::{TestHsm, TestToken};

/// A token `signer` with keys of the given types, each labelled by its type (`ec:p256`...);
/// this process's SoftHSM uses the new store.
pub fn token_with_keys(specs: &[&str]) -> (TestHsm, TestToken) {
    let (hsm, token) = TestHsm::with_token("signer");
    hsm.use_in_this_process();
    let built = build(&hsm, &token, |b| b);
    for spec in specs {
        generate(&built, "signer", spec, spec);
    }
    (hsm, token)
}

/// Generates a `spec` key pair labelled `label` on the token `token_label` behind `token`.
pub fn generate(token: &HsmToken, token_label: &str, label: &str, spec: &str) {
    let kind: KeySpec = spec.parse().unwrap();
    token
        .with_session(|session| {
            generate_key_pair(session, token_label, label, kind, None, BackupPolicy::None).unwrap();
        })
        .unwrap();
}

/// An `HsmToken` over `token`, with its PIN guard file in the store's directory.
pub fn build(
    hsm: &TestHsm,
    token: &TestToken,
    tweak: impl FnOnce(HsmTokenBuilder) -> HsmTokenBuilder,
) -> HsmToken {
    tweak(
        HsmToken::builder()
            .module_path(&hsm.module)
            .token(token.label.parse().unwrap())
            .pin(token.pin_source().parse().unwrap())
            .pin_guard_file(guard_file(hsm)),
    )
    .build()
    .unwrap()
}

/// The PIN guard state file tests use.
pub fn guard_file(hsm: &TestHsm) -> PathBuf {
    hsm.path().join("pin-guard.json")
}

/// The key labelled `label`.
pub fn key(token: &HsmToken, label: &str) -> HsmKey {
    token
        .key(&KeySelector::label(label))
        .unwrap()
}

/// OpenSC's pkcs11-spy.so, which logs every call of the module named by `PKCS11SPY`.
pub fn spy_module() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so",
        "/usr/lib/aarch64-linux-gnu/pkcs11/pkcs11-spy.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("OpenSC's pkcs11-spy.so (Debian package opensc-pkcs11)")
}
