//! Token and key selection edge cases against real SoftHSM tokens, through the library.

// Helpers here panic on failure, like the tests that call them.
#![allow(clippy::unwrap_used)]

mod common;

use rustls_hsm::pkcs11::{find_token, init_token, list_slots, Error, KeySelector, Module};

use common::keys::{build, token_with_keys};
use common::TestHsm;

fn secret(text: &str) -> secrecy::SecretString {
    secrecy::SecretString::from(text)
}

// `token init --label 'sp2 '` once ran C_InitToken, then failed to find the token it made
// (SoftHSM dropped the blank) and never set its user PIN.
#[test]
fn a_label_ending_in_blanks_is_refused_before_the_token_is_touched() {
    let hsm = TestHsm::new();
    hsm.use_in_this_process();
    let module = Module::load(&hsm.module).unwrap();
    let err = init_token(
        &module,
        None,
        "sp2 ",
        &secret("12345678"),
        &secret("1234"),
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("use `sp2`"), "{err}");
    let uninitialised = list_slots(&module)
        .unwrap()
        .into_iter()
        .filter_map(|(_, t)| t)
        .filter(|t| !t.info.token_initialized())
        .count();
    assert_eq!(uninitialised, 1, "the free slot is still free");

    init_token(
        &module,
        None,
        "sp2",
        &secret("12345678"),
        &secret("1234"),
        false,
    )
    .unwrap();
    // A selector's padding does not matter either.
    let found = find_token(&module, &"sp2 ".parse().unwrap()).unwrap();
    assert_eq!(found.label, "sp2");
}

// A key URI naming token B once found a key with the same id on token A and used (or
// deleted) it.
#[test]
fn a_key_uri_naming_another_token_is_refused() {
    let (hsm, token) = token_with_keys(&["ec:p256"]);
    hsm.add_token("other");
    let hsm_token = build(&hsm, &token, |b| b);
    let serial = hsm_token.token_info().unwrap().serial;

    for uri in [
        "pkcs11:token=other;object=ec:p256".to_owned(),
        "pkcs11:serial=0000000000000000;object=ec:p256".to_owned(),
    ] {
        let selector: KeySelector = uri.parse().unwrap();
        let err = hsm_token.key(&selector).unwrap_err();
        assert!(
            matches!(&err, rustls_hsm::Error::Pkcs11(Error::KeySelector { .. })),
            "{uri}: {err}"
        );
    }
    let right: KeySelector = format!("pkcs11:token=signer;serial={serial};object=ec:p256")
        .parse()
        .unwrap();
    hsm_token.key(&right).unwrap();
}
