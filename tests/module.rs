//! Who owns `C_Initialize` and `C_Finalize`, and signing after the module is re-initialised by
//! someone else, against a real SoftHSMv2 module.

// Helpers here panic on failure, like the tests that call them.
#![allow(clippy::unwrap_used)]

mod common;

use rustls_hsm::pkcs11::{find_key, generate_key_pair, BackupPolicy, KeySelector, Module};
use rustls_hsm::scheme::verify_signature;

use common::keys::{build, key, spy_module, token_with_keys};
use common::TestHsm;

const CKR_OK: u64 = 0;

#[test]
fn a_module_initialised_by_someone_else_is_used_but_never_finalized() {
    let hsm = TestHsm::new();
    hsm.use_in_this_process();
    // Another library in the process initialised the module first.
    assert_eq!(p11_fault::initialize(&hsm.module).unwrap(), CKR_OK);

    let module = Module::load(&hsm.module).unwrap();
    assert!(!module.is_ours());
    module.finalize().unwrap();
    drop(module);

    // Still initialised for its owner.
    assert_eq!(p11_fault::get_info(&hsm.module).unwrap(), CKR_OK);
    assert_eq!(p11_fault::finalize(&hsm.module).unwrap(), CKR_OK);
}

#[test]
fn a_module_we_initialised_is_finalized_exactly_once() {
    let (hsm, token) = TestHsm::with_token("signer");
    hsm.use_in_this_process();
    let log = hsm.path().join("spy.log");
    common::set_process_env("PKCS11SPY", &hsm.module);
    common::set_process_env("PKCS11SPY_OUTPUT", &log);

    {
        let first = Module::load(spy_module()).unwrap();
        let second = Module::load(spy_module()).unwrap();
        assert!(first.is_ours() && second.is_ours());
        let built = rustls_hsm::HsmToken::builder()
            .module(second)
            .token("signer".parse().unwrap())
            .pin(token.pin_source().parse().unwrap())
            .pin_guard_file(hsm.path().join("guard.json"))
            .build()
            .unwrap();
        built.shutdown().unwrap();
        first.finalize().unwrap();
    }

    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(log.matches("C_Initialize").count(), 1, "C_Initialize calls");
    assert_eq!(log.matches("C_Finalize").count(), 1, "C_Finalize calls");
}

#[test]
fn after_a_reinitialisation_behind_our_back_only_the_right_key_signs() {
    let (hsm, token) = token_with_keys(&["ec:p256"]);
    // One session, so that r2d2 has none to open on its own threads when the module is
    // finalized under it: C_Finalize while another thread is inside a module is undefined
    // behaviour, and SoftHSM crashes.
    let hsm_token = build(&hsm, &token, |b| b.pool_size(1));
    let a = key(&hsm_token, "ec:p256");
    let scheme = a.default_scheme().unwrap();
    a.sign_with(scheme, b"before").unwrap();

    // Someone else finalizes and initialises the module: our generation counter never hears of
    // it, every session and handle we hold is void, and handle numbers start again at 1.
    assert_eq!(p11_fault::finalize(&hsm.module).unwrap(), CKR_OK);
    assert_eq!(p11_fault::initialize(&hsm.module).unwrap(), CKR_OK);
    let module = Module::load(&hsm.module).unwrap();
    let slot = hsm_token.token_info().unwrap().slot;
    let session = module
        .context()
        .open_rw_session(slot)
        .unwrap();
    session
        .login(
            cryptoki::session::UserType::User,
            Some(&token.user_pin().into()),
        )
        .unwrap();
    // Keys of other types under the old handle numbers give other errors than a P-256 key
    // would: a 132-byte P-521 signature, an RSA key refusing ECDSA.
    for (i, spec) in ["ec:p521", "rsa:2048", "ec:p256", "ec:p521"]
        .iter()
        .enumerate()
    {
        let label = format!("other-{i}");
        let spec = spec.parse().unwrap();
        generate_key_pair(&session, "signer", &label, spec, None, BackupPolicy::None).unwrap();
        find_key(&session, &KeySelector::label(&label), "signer", true).unwrap();
    }

    // The first signature may fail while the pool notices; every one after it is A's.
    let _ = a.sign_with(scheme, b"noticing");
    for i in 0..10 {
        let message = format!("after {i}");
        let signature = a
            .sign_with(scheme, message.as_bytes())
            .unwrap_or_else(|e| panic!("signature {i}: {e}\n{:?}", hsm_token.stats()));
        verify_signature(a.spki(), scheme, message.as_bytes(), &signature)
            .unwrap_or_else(|e| panic!("signature {i} not made by key A: {e}"));
    }
    drop(session);
}
