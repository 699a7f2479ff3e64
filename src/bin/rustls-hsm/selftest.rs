//! `doctor --self-test`: sign with throwaway keys for every scheme the token serves, verify in
//! software, and destroy the keys whatever happens.

use cryptoki::session::Session;
use rustls::SignatureScheme;
use rustls_hsm::pkcs11::{
    destroy_key, generate_key_pair, generate_session_key_pair, BackupPolicy, KeyKind, KeyObject,
    KeySpec, MechanismList, Token,
};
use rustls_hsm::scheme::{
    all_schemes, scheme_name, sign_message, verify_signature, Method, SchemePlan,
};
use serde::Serialize;
use tracing::{debug, error};

use crate::doctor::representative_kind;

/// The `self_test` member of `doctor --json`.
///
/// Fields: `token` (label), `passed` (no scheme failed and at least one passed), `results[]`
/// with `scheme`, `key_type`, `mechanism` (the method, null when skipped), `result` (`PASS`,
/// `FAIL` or `SKIP`), `error` (why it failed or was skipped, else null).
#[derive(Debug, Serialize)]
pub(crate) struct SelfTestReport {
    token: String,
    pub(crate) passed: bool,
    results: Vec<SelfTestResult>,
}

#[derive(Debug, Serialize)]
struct SelfTestResult {
    scheme: String,
    key_type: String,
    mechanism: Option<String>,
    result: &'static str,
    error: Option<String>,
}

/// Runs the self-test on a logged-in read-write session.
pub(crate) fn run(token: &Token, session: &Session, mechanisms: &MechanismList) -> SelfTestReport {
    let mut results = Vec::new();
    let mut kinds: Vec<KeyKind> = Vec::new();
    for (_, name) in all_schemes() {
        let kind = representative_kind(name);
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    for kind in kinds {
        results.extend(test_kind(token, session, mechanisms, kind));
    }
    let passed = results
        .iter()
        .any(|r| r.result == "PASS")
        && results
            .iter()
            .all(|r| r.result != "FAIL");
    SelfTestReport {
        token: token.label.clone(),
        passed,
        results,
    }
}

/// Prints the PASS/FAIL table.
pub(crate) fn print_text(report: &SelfTestReport) -> anyhow::Result<()> {
    outln!("self-test on token `{}`", report.token);
    outln!("  {:<24} {:<8} {:<44} result", "scheme", "key", "mechanism");
    for r in &report.results {
        outln!(
            "  {:<24} {:<8} {:<44} {}",
            r.scheme,
            r.key_type,
            r.mechanism.as_deref().unwrap_or("-"),
            r.result
        );
        if let Some(error) = &r.error {
            outln!("      {error}");
        }
    }
    outln!(
        "  {}",
        if report.passed {
            "self-test passed"
        } else {
            "self-test FAILED"
        }
    );
    Ok(())
}

/// Tests every scheme of one key kind with one throwaway key.
fn test_kind(
    token: &Token,
    session: &Session,
    mechanisms: &MechanismList,
    kind: KeyKind,
) -> Vec<SelfTestResult> {
    let plan = SchemePlan::for_key(kind, mechanisms);
    let schemes: Vec<SignatureScheme> = all_schemes()
        .into_iter()
        .filter(|(_, name)| representative_kind(name) == kind)
        .map(|(scheme, _)| scheme)
        .collect();
    let row = |scheme, method: Option<Method>, result, error: Option<String>| SelfTestResult {
        scheme: scheme_name(scheme),
        key_type: kind.to_string(),
        mechanism: method.map(|m| m.to_string()),
        result,
        error,
    };
    let mut rows = Vec::new();
    let mut usable = Vec::new();
    for entry in plan
        .entries()
        .iter()
        .filter(|e| schemes.contains(&e.scheme))
    {
        match &entry.plan {
            Ok(method) => usable.push((entry.scheme, *method)),
            Err(why) => rows.push(row(entry.scheme, None, "SKIP", Some(why.clone()))),
        }
    }
    if usable.is_empty() {
        return rows;
    }

    let key =
        match Throwaway::generate(token, session, kind) {
            Ok(key) => key,
            Err(e) => {
                let why = format!("generating a throwaway {kind} key: {e}");
                rows.extend(usable.iter().map(|(scheme, method)| {
                    row(*scheme, Some(*method), "FAIL", Some(why.clone()))
                }));
                return rows;
            }
        };
    for (scheme, method) in usable {
        match sign_and_verify(session, &key.key, scheme, method) {
            Ok(()) => rows.push(row(scheme, Some(method), "PASS", None)),
            Err(why) => rows.push(row(scheme, Some(method), "FAIL", Some(why))),
        }
    }
    rows
}

fn sign_and_verify(
    session: &Session,
    key: &KeyObject,
    scheme: SignatureScheme,
    method: Method,
) -> Result<(), String> {
    let mut message = [0u8; 64];
    getrandom::getrandom(&mut message).map_err(|e| format!("drawing a random message: {e}"))?;
    let signature = sign_message(session, key.private, key.kind, method, &message)
        .map_err(|e| format!("signing: {e}"))?;
    verify_signature(&key.spki, scheme, &message, &signature).map_err(|e| e.to_string())
}

/// A key pair that is destroyed when dropped, whether the test passed, failed or panicked.
struct Throwaway<'a> {
    session: &'a Session,
    key: KeyObject,
}

impl<'a> Throwaway<'a> {
    /// Generates session objects where the token has them, else token objects.
    fn generate(token: &Token, session: &'a Session, kind: KeyKind) -> anyhow::Result<Self> {
        let mut suffix = [0u8; 6];
        getrandom::getrandom(&mut suffix)?;
        let label = format!("rustls-hsm-self-test-{}", hex::encode(suffix));
        let spec = KeySpec(kind);
        let key = match generate_session_key_pair(session, &token.label, &label, spec) {
            Ok(key) => key,
            // LIMITATION: token objects outlive a crash between here and the drop; they carry
            // the self-test label so that an operator can find and delete them.
            Err(e) if e.rv().is_some() => {
                debug!(error = %e, key_type = %kind, "no session key pair; using token objects");
                generate_key_pair(
                    session,
                    &token.label,
                    &label,
                    spec,
                    None,
                    BackupPolicy::None,
                )?
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Self { session, key })
    }
}

impl Drop for Throwaway<'_> {
    fn drop(&mut self) {
        if let Err(e) = destroy_key(self.session, &self.key) {
            error!(key = %self.key.describe(), error = %e, "could not destroy a self-test key; delete it with `rustls-hsm key delete`");
        }
    }
}
