//! The TPM token's session limit (1,024 sessions; the next `C_OpenSession` gives
//! `CKR_SESSION_COUNT`): a pool configured far larger is capped below it, and thousands of
//! concurrent signatures never run into it; the excess waits or gets the typed busy error.
//!
//! The signatures come from threads calling `HsmKey::sign_with` rather than from handshakes:
//! the TPM signs about 250 P-256 signatures a second, so 3,000 handshakes would spend most of
//! the CI budget in TLS and sockets without asking more of the pool.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cryptoki::error::{Error as CkError, RvError};
use rustls::SignatureScheme;
use rustls_hsm::pkcs11::KeySelector;
use rustls_hsm::{Error, HsmToken};

use common::keys::generate;
use common::stack::Stack;

const CONFIGURED_POOL: usize = 2_000;
const CALLERS: usize = 3_000;
const TPM_SESSION_LIMIT: u32 = 1_024;

// A pool larger than the token allows must be capped, not run into CKR_SESSION_COUNT.
#[test]
fn tpm_session_limit_caps_the_pool() {
    let Some(stack) = Stack::start("tpm") else {
        return;
    };
    stack.use_in_this_process();
    let case = stack.case(format!(
        "pool of {CONFIGURED_POOL} on a {TPM_SESSION_LIMIT}-session token, {CALLERS} concurrent \
         signatures"
    ));
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
        .pool_size(CONFIGURED_POOL)
        .checkout_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    generate(&token, &stack.token.label, "tls", "ec:p256");
    let key = token
        .key(&KeySelector::label("tls"))
        .unwrap();
    let max_size = token.stats().pool.max_size;
    assert!(
        max_size < TPM_SESSION_LIMIT,
        "pool capped at {max_size} sessions"
    );

    let start = Arc::new(Barrier::new(CALLERS));
    let started = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let (key, start) = (key.clone(), start.clone());
            std::thread::Builder::new()
                .stack_size(512 * 1024)
                .spawn(move || {
                    start.wait();
                    let message = format!("signature {i}");
                    key.sign_with(SignatureScheme::ECDSA_NISTP256_SHA256, message.as_bytes())
                })
                .unwrap()
        })
        .collect();
    let (mut ok, mut busy, mut other) = (0, 0, Vec::new());
    for caller in callers {
        match caller.join().unwrap() {
            Ok(_) => ok += 1,
            Err(Error::Busy { .. }) => busy += 1,
            Err(e) => other.push(e.to_string()),
        }
    }
    let took = started.elapsed();
    let stats = token.stats();
    println!(
        "tpm session limit: pool configured {CONFIGURED_POOL}, capped at {max_size}; {CALLERS} \
         concurrent signatures in {took:.1?}: {ok} signed, {busy} busy, {} other errors; {} \
         sessions open; errors {:?}",
        other.len(),
        stats.pool.open,
        stats.errors
    );

    assert!(
        other.is_empty(),
        "errors other than busy: {:?}",
        &other[..other.len().min(5)]
    );
    assert!(
        !stats
            .errors
            .contains_key("CKR_SESSION_COUNT"),
        "{:?}",
        stats.errors
    );
    assert!(stats.pool.open <= max_size, "{:?}", stats.pool);
    assert!(ok > 0, "nothing was signed");
    assert_eq!(stats.pool_timeouts as usize, busy);

    // The limit is real: the token itself refuses sessions past about 1,024 in all. The exact
    // point moves by a session or two between runs (tpm2-pkcs11 checks its count and adds the
    // session under separate locks), so the test reads the token's own count at the refusal
    // instead of assuming it.
    let slot = token.token_info().unwrap().slot;
    let context = token.module().context();
    let mut extra = Vec::new();
    let refused = loop {
        match context.open_rw_session(slot) {
            Ok(session) => extra.push(session),
            Err(e) => break e,
        }
        assert!(
            extra.len() <= TPM_SESSION_LIMIT as usize,
            "no session limit"
        );
    };
    let at_refusal = context.get_token_info(slot).unwrap();
    let pool_open = token.stats().pool.open;
    println!(
        "tpm session limit: {} more sessions opened beside the pool before {refused:?}; the token \
         counts {:?} sessions ({:?} read-write), the pool {pool_open}",
        extra.len(),
        at_refusal.session_count(),
        at_refusal.rw_session_count(),
    );
    assert!(
        matches!(refused, CkError::Pkcs11(RvError::SessionCount, _)),
        "{refused}"
    );
    let counted = at_refusal
        .session_count()
        .expect("tpm2-pkcs11 counts its sessions") as usize;
    assert!(
        counted >= TPM_SESSION_LIMIT as usize,
        "refused at {counted} sessions"
    );
    // Every read-write session the token counts is the pool's or the test's: the pool's count
    // is the truth and it leaked none. (The read-only one is the pool's login session.)
    assert_eq!(
        at_refusal.rw_session_count(),
        Some((pool_open as usize + extra.len()) as u64)
    );
    assert_eq!(counted, pool_open as usize + extra.len() + 1);
    drop(extra);
    case.pass();
}
