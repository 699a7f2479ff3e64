//! `rustls-hsm doctor`: what the module and its tokens offer, and which TLS signature schemes
//! each token can serve; optionally a login check and a sign-and-verify self-test.

use std::path::Path;

use anyhow::bail;
use cryptoki::session::Session;
use cryptoki::slot::TokenInfo;
use rustls_hsm::pin::PinSource;
use rustls_hsm::pkcs11::{
    find_token, list_keys, list_slots, login_user, mechanism_flags, rv_name, Curve, Error, KeyKind,
    MechanismList, Module, PinState, Token, TokenSelector,
};
use rustls_hsm::scheme::{all_schemes, scheme_name, SchemePlan};
use serde::Serialize;

use crate::common::{error_chain, print_json, read_pin, token_flags, LimitValue, PinSourceParser};
use crate::selftest::{self, SelfTestReport};
use crate::{is_broken_pipe, with_module};

/// The `user_pin` of a token that has none yet.
const USER_PIN_NOT_INITIALISED: &str = "not initialised";

/// Options of `doctor`.
#[derive(Debug, clap::Args)]
pub(crate) struct DoctorArgs {
    /// Report only this token: its label, `serial:XYZ` or a `pkcs11:token=...` URI.
    #[arg(long, value_name = "SEL")]
    token: Option<TokenSelector>,
    /// Log in with the user PIN from this source and list the keys (needs --token).
    #[arg(
        long,
        value_name = "SOURCE",
        value_parser = PinSourceParser,
        allow_hyphen_values = true,
        requires = "token"
    )]
    pin: Option<PinSource>,
    /// Sign with throwaway keys for every scheme the token serves and verify in software.
    #[arg(long, requires_all = ["token", "pin"])]
    self_test: bool,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

/// The `doctor --json` document.
///
/// Top level: `library`, `slots`, `tokens`, `self_test` (null unless `--self-test`).
///
/// - `library`: `path`, `cryptoki_version`, `manufacturer`, `description`, `library_version`,
///   `initialized_by_us` (false when another part of the process had called `C_Initialize`).
/// - `slots[]`: `slot_id` (not a stable name), `description`, `manufacturer`, `token_present`,
///   `removable`, `hardware`, `token_label` (null without a token), `token_initialized`.
/// - `tokens[]`: every initialised token, or the one `--token` names: `label`, `serial`,
///   `model`, `manufacturer`, `slot_id`, `hardware_version`, `firmware_version`, `flags` (words),
///   `user_pin` (`ok`, `count low`, `final try`, `locked`, or `not initialised` when the token
///   has no user PIN yet) and `so_pin` (`ok`, `count low`, `final try`, `locked`), `sessions`
///   (`open`, `max`, `rw_open`, `max_rw`: numbers, or `unlimited` / `unavailable`), `pin_length`
///   (`min`, `max`), `mechanisms[]` (`name`, `number`, `min_key_size`, `max_key_size`, `flags`,
///   `unlisted`), `schemes[]` (`scheme`, `key_type`, `supported`, `method`, `mechanism`,
///   `reason`), and `login` (null without `--pin`; else `ok`, `error`, `keys[]` with `label`,
///   `id`, `type`, `schemes`).
/// - `self_test`: see [`SelfTestReport`].
/// - `error`: see [`ErrorReport`]; null when doctor found nothing wrong.
#[derive(Debug, Serialize)]
struct Report {
    library: LibraryReport,
    slots: Vec<SlotReport>,
    tokens: Vec<TokenReport>,
    self_test: Option<SelfTestReport>,
    error: Option<ErrorReport>,
}

/// The `doctor --json` document when doctor fails before it has a report (the module does not
/// load, no token matches `--token`): only `{"error": {...}}`, see [`ErrorReport`].
#[derive(Debug, Serialize)]
struct ErrorDocument {
    error: ErrorReport,
}

/// Why doctor failed, in the `error` field of its JSON document.
///
/// Fields: `message` (the text also printed on stderr), `kind`, and `rv` (the PKCS#11 return
/// code, e.g. `CKR_DEVICE_ERROR`, or null). `kind` is `checks_failed` (the report is complete,
/// and a login, key listing or self-test in it failed), `module_not_named`, `module_missing`,
/// `module_not_shared_object`, `module_wrong_architecture`, `module_no_function_list`,
/// `module_load`, `module_initialize`, `token_not_found`, `token_ambiguous`, `pkcs11` (a
/// PKCS#11 call failed; see `rv`) or `other`.
#[derive(Debug, Serialize)]
struct ErrorReport {
    message: String,
    kind: &'static str,
    rv: Option<String>,
}

impl ErrorReport {
    fn new(e: &anyhow::Error) -> Self {
        let cause = e
            .chain()
            .find_map(|cause| cause.downcast_ref::<Error>());
        let kind = match cause {
            Some(Error::ModuleNotNamed) => "module_not_named",
            Some(Error::ModuleMissing { .. }) => "module_missing",
            Some(Error::ModuleNotSharedObject { .. }) => "module_not_shared_object",
            Some(Error::ModuleWrongArchitecture { .. }) => "module_wrong_architecture",
            Some(Error::ModuleNoFunctionList { .. }) => "module_no_function_list",
            Some(Error::ModuleLoad { .. }) => "module_load",
            Some(Error::ModuleInitialize { .. }) => "module_initialize",
            Some(Error::TokenNotFound { .. }) => "token_not_found",
            Some(Error::TokenAmbiguous { .. }) => "token_ambiguous",
            Some(Error::Pkcs11 { .. }) => "pkcs11",
            _ => "other",
        };
        Self {
            message: error_chain(e),
            kind,
            rv: cause.and_then(Error::rv).map(rv_name),
        }
    }
}

#[derive(Debug, Serialize)]
struct LibraryReport {
    path: String,
    cryptoki_version: String,
    manufacturer: String,
    description: String,
    library_version: String,
    initialized_by_us: bool,
}

#[derive(Debug, Serialize)]
struct SlotReport {
    slot_id: u64,
    description: String,
    manufacturer: String,
    token_present: bool,
    removable: bool,
    hardware: bool,
    token_label: Option<String>,
    token_initialized: bool,
}

#[derive(Debug, Serialize)]
struct TokenReport {
    label: String,
    serial: String,
    model: String,
    manufacturer: String,
    slot_id: u64,
    hardware_version: String,
    firmware_version: String,
    flags: Vec<&'static str>,
    user_pin: &'static str,
    so_pin: &'static str,
    sessions: SessionsReport,
    pin_length: PinLengthReport,
    mechanisms: Vec<MechanismReport>,
    schemes: Vec<SchemeReport>,
    login: Option<LoginReport>,
}

#[derive(Debug, Serialize)]
struct SessionsReport {
    open: LimitValue,
    max: LimitValue,
    rw_open: LimitValue,
    max_rw: LimitValue,
}

#[derive(Debug, Serialize)]
struct PinLengthReport {
    min: usize,
    max: usize,
}

#[derive(Debug, Serialize)]
struct MechanismReport {
    name: String,
    number: u64,
    min_key_size: usize,
    max_key_size: usize,
    flags: Vec<&'static str>,
    unlisted: bool,
}

#[derive(Debug, Serialize)]
struct SchemeReport {
    scheme: String,
    key_type: String,
    supported: bool,
    method: Option<String>,
    mechanism: Option<String>,
    reason: Option<String>,
}

#[derive(Debug, Serialize)]
struct LoginReport {
    ok: bool,
    error: Option<String>,
    keys: Vec<KeyServes>,
}

#[derive(Debug, Serialize)]
struct KeyServes {
    label: String,
    id: String,
    #[serde(rename = "type")]
    key_type: String,
    schemes: Vec<String>,
}

/// Runs `doctor` with the module at `module_path` (else from the environment).
///
/// With `--json` every outcome prints one JSON document: the report, or only an `error` when
/// doctor fails before it has one (see [`Report`]).
pub(crate) fn run(module_path: Option<&Path>, args: &DoctorArgs) -> anyhow::Result<()> {
    let mut printed = false;
    let result = with_module(module_path, |module| {
        let report = report(module, args)?;
        printed = true;
        if args.json {
            print_json(&report)?;
        } else {
            print_text(&report)?;
        }
        match report.error {
            Some(error) => bail!(error.message),
            None => Ok(()),
        }
    });
    if let (Err(e), true, false) = (&result, args.json, printed) {
        if !is_broken_pipe(e) {
            let document = ErrorDocument {
                error: ErrorReport::new(e),
            };
            if let Err(print) = print_json(&document) {
                tracing::warn!(error = %print, "could not print the JSON error document");
            }
        }
    }
    result
}

/// Reads everything the report holds; a login or self-test failure is recorded in it, any
/// other failure returned.
fn report(module: &Module, args: &DoctorArgs) -> anyhow::Result<Report> {
    let library = library_report(module)?;
    let (slots, tokens) = slot_reports(module, args.token.as_ref())?;
    let mut report = Report {
        library,
        slots,
        tokens: Vec::new(),
        self_test: None,
        error: None,
    };
    let mut failures = Vec::new();
    for token in &tokens {
        let mechanisms = MechanismList::read(module, token.slot)?;
        let mut token_report = token_report(token, &mechanisms);
        if let Some(pin) = &args.pin {
            let (login, session) = login_report(module, token, pin, &mechanisms);
            if let Some(error) = &login.error {
                failures.push(error.clone());
            }
            token_report.login = Some(login);
            if let (true, Some(session)) = (args.self_test, session) {
                let outcome = selftest::run(token, &session, &mechanisms);
                if !outcome.passed {
                    failures.push(format!("self-test on token {}", token.describe()));
                }
                report.self_test = Some(outcome);
            }
        }
        report.tokens.push(token_report);
    }
    if !failures.is_empty() {
        report.error = Some(ErrorReport {
            message: format!("doctor found problems: {}", failures.join("; ")),
            kind: "checks_failed",
            rv: None,
        });
    }
    Ok(report)
}

fn library_report(module: &Module) -> anyhow::Result<LibraryReport> {
    let info = module
        .context()
        .get_library_info()
        .map_err(|source| Error::Pkcs11 {
            op: "read library info (C_GetInfo)",
            source,
        })?;
    Ok(LibraryReport {
        path: module.path().display().to_string(),
        cryptoki_version: info.cryptoki_version().to_string(),
        manufacturer: trim(info.manufacturer_id()),
        description: trim(info.library_description()),
        library_version: info.library_version().to_string(),
        initialized_by_us: module.is_ours(),
    })
}

/// Every slot, and the tokens to report on: the one selected, or every initialised one.
fn slot_reports(
    module: &Module,
    selector: Option<&TokenSelector>,
) -> anyhow::Result<(Vec<SlotReport>, Vec<Token>)> {
    let mut slots = Vec::new();
    let mut tokens = Vec::new();
    for (slot, token) in list_slots(module)? {
        let info = module
            .context()
            .get_slot_info(slot)
            .map_err(|source| Error::Pkcs11 {
                op: "read slot info",
                source,
            })?;
        slots.push(SlotReport {
            slot_id: slot.id(),
            description: trim(info.slot_description()),
            manufacturer: trim(info.manufacturer_id()),
            token_present: info.token_present(),
            removable: info.removable_device(),
            hardware: info.hardware_slot(),
            token_label: token.as_ref().map(|t| t.label.clone()),
            token_initialized: token
                .as_ref()
                .is_some_and(|t| t.info.token_initialized()),
        });
        if let Some(token) = token.filter(|t| t.info.token_initialized()) {
            tokens.push(token);
        }
    }
    if let Some(selector) = selector {
        tokens = vec![find_token(module, selector)?];
    }
    Ok((slots, tokens))
}

fn token_report(token: &Token, mechanisms: &MechanismList) -> TokenReport {
    let info = &token.info;
    TokenReport {
        label: token.label.clone(),
        serial: token.serial.clone(),
        model: trim(info.model()),
        manufacturer: trim(info.manufacturer_id()),
        slot_id: token.slot.id(),
        hardware_version: info.hardware_version().to_string(),
        firmware_version: info.firmware_version().to_string(),
        flags: token_flags(info),
        user_pin: user_pin_state(info),
        so_pin: PinState::so(info).as_str(),
        sessions: SessionsReport {
            open: LimitValue::from_count(info.session_count()),
            max: LimitValue::from_limit(info.max_session_count()),
            rw_open: LimitValue::from_count(info.rw_session_count()),
            max_rw: LimitValue::from_limit(info.max_rw_session_count()),
        },
        pin_length: PinLengthReport {
            min: info.min_pin_length(),
            max: info.max_pin_length(),
        },
        mechanisms: mechanisms
            .iter()
            .map(|(mechanism, info)| MechanismReport {
                name: mechanism.to_string(),
                number: *mechanism,
                min_key_size: info.min_key_size(),
                max_key_size: info.max_key_size(),
                flags: mechanism_flags(info),
                unlisted: mechanisms.is_unlisted(mechanism),
            })
            .collect(),
        schemes: scheme_reports(mechanisms),
        login: None,
    }
}

/// The user PIN's state in words; a token without `CKF_USER_PIN_INITIALIZED` has none to check.
fn user_pin_state(info: &TokenInfo) -> &'static str {
    if info.user_pin_initialized() {
        PinState::user(info).as_str()
    } else {
        USER_PIN_NOT_INITIALISED
    }
}

/// For each TLS scheme, whether a representative key of its kind could be served, and how.
fn scheme_reports(mechanisms: &MechanismList) -> Vec<SchemeReport> {
    all_schemes()
        .into_iter()
        .map(|(scheme, kind_name)| {
            let kind = representative_kind(kind_name);
            let plan = SchemePlan::for_key(kind, mechanisms);
            let entry = plan
                .entries()
                .iter()
                .find(|e| e.scheme == scheme);
            let (method, reason) = match entry.map(|e| &e.plan) {
                Some(Ok(method)) => (Some(*method), None),
                Some(Err(why)) => (None, Some(why.clone())),
                None => (None, Some(format!("not planned for {kind} keys"))),
            };
            SchemeReport {
                scheme: scheme_name(scheme),
                key_type: kind.to_string(),
                supported: method.is_some(),
                method: method.map(|m| m.to_string()),
                mechanism: method.map(|m| m.mechanism().to_string()),
                reason,
            }
        })
        .collect()
}

/// The key kind a scheme is checked with: `all_schemes` names a curve, `rsa` or `ed25519`.
pub(crate) fn representative_kind(name: &str) -> KeyKind {
    match name {
        "ec:p384" => KeyKind::Ec(Curve::P384),
        "ec:p521" => KeyKind::Ec(Curve::P521),
        "ed25519" => KeyKind::Ed25519,
        "rsa" => KeyKind::Rsa(2048),
        _ => KeyKind::Ec(Curve::P256),
    }
}

fn login_report(
    module: &Module,
    token: &Token,
    pin: &PinSource,
    mechanisms: &MechanismList,
) -> (LoginReport, Option<Session>) {
    let attempt = read_pin(pin, "user PIN").and_then(|pin| Ok(login_user(module, token, &pin)?));
    let session = match attempt {
        Ok(session) => session,
        Err(e) => {
            let report = LoginReport {
                ok: false,
                error: Some(error_chain(&e)),
                keys: Vec::new(),
            };
            return (report, None);
        }
    };
    let keys = match list_keys(&session) {
        Ok(keys) => keys,
        Err(e) => {
            let report = LoginReport {
                ok: false,
                error: Some(format!("logged in, but listing keys failed: {e}")),
                keys: Vec::new(),
            };
            return (report, Some(session));
        }
    };
    let keys = keys
        .into_iter()
        .flatten()
        .map(|key| KeyServes {
            label: key.label.clone(),
            id: hex::encode(&key.id),
            key_type: key.kind.to_string(),
            schemes: SchemePlan::for_key(key.kind, mechanisms)
                .usable()
                .map(|(scheme, _)| scheme_name(scheme))
                .collect(),
        })
        .collect();
    let report = LoginReport {
        ok: true,
        error: None,
        keys,
    };
    (report, Some(session))
}

fn print_text(report: &Report) -> anyhow::Result<()> {
    let lib = &report.library;
    outln!("PKCS#11 library {}", lib.path);
    outln!("  cryptoki version: {}", lib.cryptoki_version);
    outln!("  manufacturer:     {}", lib.manufacturer);
    outln!("  description:      {}", lib.description);
    outln!("  library version:  {}", lib.library_version);
    outln!(
        "  initialised by:   {}",
        if lib.initialized_by_us {
            "this process (C_Initialize)"
        } else {
            "someone else in this process"
        }
    );
    outln!();
    outln!("slots");
    for slot in &report.slots {
        let token = match (&slot.token_label, slot.token_initialized) {
            (Some(label), true) => format!("token `{label}`"),
            (Some(_), false) => "token not initialised".to_owned(),
            (None, _) => "no token".to_owned(),
        };
        outln!("  slot {:#x}: {} ({token})", slot.slot_id, slot.description);
    }
    for token in &report.tokens {
        outln!();
        print_token(token)?;
    }
    if let Some(self_test) = &report.self_test {
        outln!();
        selftest::print_text(self_test)?;
    }
    Ok(())
}

fn print_token(t: &TokenReport) -> anyhow::Result<()> {
    outln!(
        "token `{}` (serial {}, slot {:#x})",
        t.label,
        t.serial,
        t.slot_id
    );
    outln!("  model:        {}", t.model);
    outln!("  manufacturer: {}", t.manufacturer);
    outln!(
        "  versions:     hardware {}, firmware {}",
        t.hardware_version,
        t.firmware_version
    );
    outln!("  flags:        {}", t.flags.join(", "));
    if t.user_pin == USER_PIN_NOT_INITIALISED {
        outln!(
            "  user PIN:     {} (the security officer sets it with `rustls-hsm token unlock`)",
            t.user_pin
        );
    } else {
        outln!("  user PIN:     {}", t.user_pin);
    }
    outln!("  SO PIN:       {}", t.so_pin);
    let s = &t.sessions;
    outln!(
        "  sessions:     {} open of max {}; read-write {} open of max {}",
        s.open,
        s.max,
        s.rw_open,
        s.max_rw
    );
    outln!(
        "  PIN length:   {} to {}",
        t.pin_length.min,
        t.pin_length.max
    );
    outln!("  mechanisms ({}):", t.mechanisms.len());
    for m in &t.mechanisms {
        let unlisted = if m.unlisted { " (not listed)" } else { "" };
        outln!(
            "    {:<34} {:>5}..{:<6} {}{unlisted}",
            m.name,
            m.min_key_size,
            m.max_key_size,
            m.flags.join(", ")
        );
    }
    outln!("  TLS signature schemes:");
    for s in &t.schemes {
        match (&s.method, &s.reason) {
            (Some(method), _) => outln!("    {:<24} yes  {method}", s.scheme),
            (None, Some(reason)) => outln!("    {:<24} no   {reason}", s.scheme),
            (None, None) => outln!("    {:<24} no", s.scheme),
        }
    }
    if let Some(login) = &t.login {
        match &login.error {
            None => outln!("  login:        ok, {} private key(s)", login.keys.len()),
            Some(error) => outln!("  login:        FAILED: {error}"),
        }
        for key in &login.keys {
            outln!(
                "    key `{}` (id {}, {}): {}",
                key.label,
                key.id,
                key.key_type,
                if key.schemes.is_empty() {
                    "serves no TLS scheme".to_owned()
                } else {
                    key.schemes.join(", ")
                }
            );
        }
    }
    Ok(())
}

fn trim(field: &str) -> String {
    field
        .trim_end_matches([' ', '\0'])
        .to_owned()
}
