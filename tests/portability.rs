//! One acceptance suite on every token stack: token selection, key generation with read-back,
//! scheme selection from the token's mechanisms, and real handshakes (rustls and
//! `openssl s_client`) for every scheme the token can serve, plus mTLS with a client key on the
//! token.
//!
//! Each test starts its own stack (a fresh token) and runs in its own process (cargo nextest).
//! A case is skipped only when the token's own report (its mechanism list, through the
//! library's scheme plan) says it cannot do it, and every skip is printed with that reason.
//! Stacks are chosen with `RUSTLS_HSM_STACKS` (e.g. `softhsm,tpm`; default all).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use cryptoki::mechanism::MechanismType;
use rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    alg_id, AlgorithmIdentifier, CertificateDer, InvalidSignature, SignatureVerificationAlgorithm,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig, SignatureScheme, SupportedProtocolVersion};
use rustls_hsm::pkcs11::{
    find_key, find_token, generate_key_pair, BackupPolicy, Curve, KeyKind, KeySelector, KeySpec,
    MechanismList, Module,
};
use rustls_hsm::resolver::{ClientCertResolver, ServerCertResolver};
use rustls_hsm::scheme::{is_pkcs1, scheme_name, SchemePlan};
use rustls_hsm::{Error, HsmKey, HsmToken};

use common::stack::Stack;
use common::tls::{handshake, openssl_s_client, TestCa, TestServer};

const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// Starts the stack for this test in this process; `None` (printed) when not selected.
fn stack(name: &'static str) -> Option<Stack> {
    let stack = Stack::start(name)?;
    stack.use_in_this_process();
    Some(stack)
}

fn build(stack: &Stack) -> HsmToken {
    build_with(stack, |b| b)
}

fn build_with(
    stack: &Stack,
    tweak: impl FnOnce(rustls_hsm::HsmTokenBuilder) -> rustls_hsm::HsmTokenBuilder,
) -> HsmToken {
    tweak(
        HsmToken::builder()
            .module_path(&stack.module)
            .token(stack.token.label.parse().unwrap())
            .pin(
                stack
                    .token
                    .pin_source()
                    .parse()
                    .unwrap(),
            )
            .pin_guard_file(stack.path().join("pin-guard.json")),
    )
    .build()
    .unwrap()
}

/// Why the token cannot generate `kind`, from its mechanism list; `None` when it can.
fn keygen_gap(kind: KeyKind, mechanisms: &MechanismList) -> Option<String> {
    let (mechanism, bits) = match kind {
        KeyKind::Ec(Curve::P256) => (MechanismType::ECC_KEY_PAIR_GEN, 256),
        KeyKind::Ec(Curve::P384) => (MechanismType::ECC_KEY_PAIR_GEN, 384),
        KeyKind::Ec(Curve::P521) => (MechanismType::ECC_KEY_PAIR_GEN, 521),
        KeyKind::Ed25519 => (MechanismType::ECC_EDWARDS_KEY_PAIR_GEN, 255),
        KeyKind::Rsa(bits) => (MechanismType::RSA_PKCS_KEY_PAIR_GEN, bits),
    };
    let Some(info) = mechanisms.get(mechanism) else {
        return Some(format!("the token lists no {mechanism}"));
    };
    if !info.generate_key_pair() {
        return Some(format!(
            "{mechanism} cannot generate key pairs on this token"
        ));
    }
    // Edwards sizes are reported in bits of the encoding (256 for Ed25519) or of the field.
    let bits = if kind == KeyKind::Ed25519 { 256 } else { bits };
    let (min, max) = (info.min_key_size(), info.max_key_size());
    if (min != 0 && bits < min) || (max != 0 && bits > max) {
        return Some(format!(
            "{mechanism} takes {min}..{max} bit keys, not {bits}"
        ));
    }
    if let Some(why) = mechanisms.known_gap(mechanism, bits) {
        return Some(format!("{mechanism} unusable: {why}"));
    }
    None
}

/// Token selection: by label, by URI and by serial; a label prefix never selects it.
fn token_selection(name: &'static str) {
    let Some(stack) = stack(name) else { return };
    let module = Module::load(&stack.module).unwrap();
    let label = &stack.token.label;

    let case = stack.case("token selection by label, URI and serial");
    let by_label = find_token(&module, &label.parse().unwrap()).unwrap();
    assert_eq!(&by_label.label, label);
    let uri = format!("pkcs11:token={label}");
    let by_uri = find_token(&module, &uri.parse().unwrap()).unwrap();
    assert_eq!(by_uri.slot, by_label.slot);
    let serial = format!("serial:{}", by_label.serial);
    let by_serial = find_token(&module, &serial.parse().unwrap()).unwrap();
    assert_eq!(by_serial.slot, by_label.slot);
    let prefix = &label[..label.len() - 1];
    let err = find_token(&module, &prefix.parse().unwrap()).unwrap_err();
    assert!(
        err.to_string()
            .contains("no initialised token"),
        "{err}"
    );
    case.pass();

    let case = stack.case("token opened with the PIN file");
    let token = build(&stack);
    assert_eq!(&token.token_info().unwrap().label, label);
    assert!(token.stats().logins >= 1);
    case.pass();
}

/// Generates `kind` (or prints why the token cannot), reads it back, then shakes hands for
/// every scheme the library plans for it: with a rustls client offering only that scheme, and
/// with `openssl s_client` limited to it. Returns whether TLS 1.3 was served.
async fn handshakes_for(name: &'static str, spec: &str) -> bool {
    let Some(stack) = stack(name) else {
        return false;
    };
    let kind = spec.parse::<KeySpec>().unwrap().0;
    let token = build(&stack);
    let mechanisms = MechanismList::read(token.module(), token.token_info().unwrap().slot).unwrap();

    let case = stack.case(format!("{spec} key generation and read-back"));
    if let Some(gap) = keygen_gap(kind, &mechanisms) {
        case.skip(&gap);
        return false;
    }
    let label = stack.token.label.clone();
    let generated = token
        .with_session(|session| {
            generate_key_pair(
                session,
                &label,
                spec,
                KeySpec(kind),
                None,
                BackupPolicy::None,
            )
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("{name}: generate {spec}: {e}"));
    let read_back = token
        .with_session(|session| find_key(session, &KeySelector::label(spec), &label, true))
        .unwrap()
        .unwrap();
    assert_eq!(read_back.kind, kind);
    assert_eq!(read_back.spki, generated.spki);
    assert_eq!(read_back.id, generated.id);
    assert!(
        read_back.sensitive && read_back.always_sensitive,
        "{spec}: sensitive"
    );
    assert!(
        !read_back.extractable && read_back.never_extractable,
        "{spec}: extractable"
    );
    assert!(read_back.sign && read_back.local, "{spec}: sign, local");
    case.pass();

    // A key whose token cannot serve it in TLS 1.3 is refused unless TLS 1.2 is enough.
    let planned = SchemePlan::for_key(kind, &mechanisms);
    let key = if planned.serves_tls13() {
        token
            .key(&KeySelector::label(spec))
            .unwrap()
    } else {
        let err = token
            .key(&KeySelector::label(spec))
            .unwrap_err();
        assert!(matches!(err, Error::NoTls13 { .. }), "{spec}: {err}");
        stack
            .case(format!("{spec} TLS 1.3 handshakes"))
            .skip(&planned.tls13_gap());
        build_with(&stack, |b| b.tls12_only(true))
            .key(&KeySelector::label(spec))
            .unwrap()
    };
    assert_eq!(
        *key.schemes(),
        planned,
        "{spec}: the key's plan is the token's"
    );
    let ca = TestCa::new();
    let ca_file = stack.path().join("ca.pem");
    ca.write_pem(&ca_file);
    let mut resolver = ServerCertResolver::new();
    resolver.add(None, certified(&ca, &key, false));
    let server = TestServer::start(Arc::new(resolver)).await;

    let plan = key.schemes();
    assert!(
        plan.entries()
            .iter()
            .any(|e| e.plan.is_ok()),
        "{spec}: no scheme at all"
    );
    for entry in plan.entries() {
        let scheme = entry.scheme;
        let sname = scheme_name(scheme);
        let case = stack.case(format!("{spec} {sname} handshakes"));
        let method = match &entry.plan {
            Ok(method) => method,
            Err(why) => {
                case.skip(why);
                continue;
            }
        };
        let versions = if is_pkcs1(scheme) { TLS12 } else { TLS13 };

        let before = signed(&token, &sname);
        let config = client_offering(&ca, versions, scheme);
        handshake(server.addr, config)
            .await
            .unwrap_or_else(|e| panic!("{name} {spec} {sname} by {method}: rustls: {e}"));
        assert_eq!(signed(&token, &sname), before + 1, "{name} {spec} {sname}");

        let (ok, out) = openssl_s_client(server.addr, &ca_file, &openssl_args(scheme)).await;
        assert!(
            ok,
            "{name} {spec} {sname} by {method}: openssl s_client:\n{out}"
        );
        assert_eq!(signed(&token, &sname), before + 2, "{name} {spec} {sname}");
        println!("{name} {spec} {sname}: served by {method}");
        case.pass();
    }
    let stats = token.stats();
    assert!(stats.errors.is_empty(), "{name} {spec}: {stats:?}");
    planned.serves_tls13()
}

// A token made by tpm2_ptool lists RSA-PSS and signs it on the TPM, sign-only keys included,
// so RSA keys serve TLS 1.3 there (a C_InitToken token leaves PSS unlisted: TLS 1.2 only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_ptool_token_serves_rsa_in_tls13() {
    if handshakes_for("tpm-ptool", "rsa:2048").await {
        return;
    }
    assert!(
        !common::stack::is_selected("tpm-ptool"),
        "RSA served only in TLS 1.2"
    );
}

/// mTLS: the client's key is on the token (ClientCertResolver); the server, also on the token,
/// requires a client certificate from the test CA (WebPkiClientVerifier).
async fn mtls(name: &'static str) {
    let Some(stack) = stack(name) else { return };
    let token = build(&stack);
    let label = stack.token.label.clone();
    token
        .with_session(|session| {
            for key in ["server", "client"] {
                generate_key_pair(
                    session,
                    &label,
                    key,
                    "ec:p256".parse().unwrap(),
                    None,
                    BackupPolicy::None,
                )
                .unwrap();
            }
        })
        .unwrap();
    let server_key = token
        .key(&KeySelector::label("server"))
        .unwrap();
    let client_key = token
        .key(&KeySelector::label("client"))
        .unwrap();
    let ca = TestCa::new();

    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(ca.roots()),
        Arc::new(ring::default_provider()),
    )
    .build()
    .unwrap();
    let mut resolver = ServerCertResolver::new();
    resolver.add(None, certified(&ca, &server_key, false));
    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    let server = TestServer::start_with(config).await;

    for (versions, what) in [(TLS13, "TLS 1.3"), (TLS12, "TLS 1.2")] {
        let case = stack.case(format!("mTLS client key on the token, {what}"));
        let before = signed(&token, "ecdsa_secp256r1_sha256");
        let client = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(ca.roots())
            .with_client_cert_resolver(Arc::new(ClientCertResolver::new(certified(
                &ca,
                &client_key,
                true,
            ))));
        handshake(server.addr, Arc::new(client))
            .await
            .unwrap_or_else(|e| panic!("{name} mTLS {what}: {e}"));
        // One signature by the server key, one by the client key (CertificateVerify).
        assert_eq!(
            signed(&token, "ecdsa_secp256r1_sha256"),
            before + 2,
            "{name} {what}"
        );
        case.pass();
    }

    let case = stack.case("mTLS without a client certificate is refused");
    let anonymous = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(TLS13)
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    assert!(handshake(server.addr, Arc::new(anonymous))
        .await
        .is_err());
    case.pass();
}

fn certified(ca: &TestCa, key: &HsmKey, client: bool) -> Arc<rustls::sign::CertifiedKey> {
    key.certified_key(vec![leaf(ca, key, client)])
        .unwrap()
}

/// A leaf certificate for the key. rcgen (on ring) cannot take a P-521 public key, so for one
/// it certifies a stand-in key, puts the real key in its place and signs the certificate again.
fn leaf(ca: &TestCa, key: &HsmKey, client: bool) -> CertificateDer<'static> {
    use der::{Decode, Encode};

    if key.kind() != KeyKind::Ec(Curve::P521) {
        return ca.leaf(key.spki(), client);
    }
    let stand_in = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let cert = ca.leaf(
        &rcgen::PublicKeyData::subject_public_key_info(&stand_in),
        client,
    );
    let mut cert = x509_cert::Certificate::from_der(&cert).unwrap();
    cert.tbs_certificate
        .subject_public_key_info = spki::SubjectPublicKeyInfoOwned::from_der(key.spki()).unwrap();
    let tbs = cert.tbs_certificate.to_der().unwrap();
    cert.signature = der::asn1::BitString::from_bytes(&ca.sign(&tbs)).unwrap();
    CertificateDer::from(cert.to_der().unwrap())
}

fn signed(token: &HsmToken, scheme: &str) -> u64 {
    token
        .stats()
        .signatures
        .iter()
        .find(|c| c.scheme == scheme)
        .map_or(0, |c| c.ok)
}

/// `openssl s_client` options that allow only `scheme`.
fn openssl_args(scheme: SignatureScheme) -> Vec<&'static str> {
    let (version, sigalg) = match scheme {
        SignatureScheme::RSA_PKCS1_SHA256 => ("-tls1_2", "RSA+SHA256"),
        SignatureScheme::RSA_PKCS1_SHA384 => ("-tls1_2", "RSA+SHA384"),
        SignatureScheme::RSA_PKCS1_SHA512 => ("-tls1_2", "RSA+SHA512"),
        SignatureScheme::RSA_PSS_SHA256 => ("-tls1_3", "rsa_pss_rsae_sha256"),
        SignatureScheme::RSA_PSS_SHA384 => ("-tls1_3", "rsa_pss_rsae_sha384"),
        SignatureScheme::RSA_PSS_SHA512 => ("-tls1_3", "rsa_pss_rsae_sha512"),
        SignatureScheme::ECDSA_NISTP256_SHA256 => ("-tls1_3", "ecdsa_secp256r1_sha256"),
        SignatureScheme::ECDSA_NISTP384_SHA384 => ("-tls1_3", "ecdsa_secp384r1_sha384"),
        SignatureScheme::ECDSA_NISTP521_SHA512 => ("-tls1_3", "ecdsa_secp521r1_sha512"),
        SignatureScheme::ED25519 => ("-tls1_3", "ed25519"),
        other => panic!("no openssl name for {other:?}"),
    };
    vec![version, "-sigalgs", sigalg]
}

/// A rustls client that offers only `scheme`. ring cannot verify P-521 signatures, so that
/// scheme is verified by the RustCrypto `p521` crate instead.
fn client_offering(
    ca: &TestCa,
    versions: &[&'static SupportedProtocolVersion],
    scheme: SignatureScheme,
) -> Arc<ClientConfig> {
    let mut provider: CryptoProvider = ring::default_provider();
    let all = provider.signature_verification_algorithms;
    let mapping: Vec<(
        SignatureScheme,
        &'static [&'static dyn SignatureVerificationAlgorithm],
    )> = if scheme == SignatureScheme::ECDSA_NISTP521_SHA512 {
        vec![(scheme, &[&P521Sha512])]
    } else {
        all.mapping
            .iter()
            .filter(|(s, _)| *s == scheme)
            .copied()
            .collect()
    };
    assert!(!mapping.is_empty(), "no verifier for {scheme:?}");
    provider.signature_verification_algorithms = WebPkiSupportedAlgorithms {
        all: all.all,
        mapping: Box::leak(mapping.into_boxed_slice()),
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// ECDSA P-521 with SHA-512, for the handshake's CertificateVerify only.
#[derive(Debug)]
struct P521Sha512;

impl SignatureVerificationAlgorithm for P521Sha512 {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        use ecdsa::signature::Verifier;

        let key =
            p521::ecdsa::VerifyingKey::from_sec1_bytes(public_key).map_err(|_| InvalidSignature)?;
        let signature =
            p521::ecdsa::Signature::from_der(signature).map_err(|_| InvalidSignature)?;
        key.verify(message, &signature)
            .map_err(|_| InvalidSignature)
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::ECDSA_P521
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::ECDSA_SHA512
    }
}

/// The suite for one stack, as a module of tests named after the stack.
macro_rules! suite {
    ($($stack:ident),* $(,)?) => {$(
        mod $stack {
            const STACK: &str = stringify!($stack);

            #[test]
            fn token_selection() {
                super::token_selection(STACK);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn handshakes_ec_p256() {
                super::handshakes_for(STACK, "ec:p256").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn handshakes_ec_p384() {
                super::handshakes_for(STACK, "ec:p384").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn handshakes_ec_p521() {
                super::handshakes_for(STACK, "ec:p521").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn handshakes_rsa_2048() {
                super::handshakes_for(STACK, "rsa:2048").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn handshakes_rsa_3072() {
                super::handshakes_for(STACK, "rsa:3072").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn handshakes_rsa_4096() {
                super::handshakes_for(STACK, "rsa:4096").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn handshakes_ed25519() {
                super::handshakes_for(STACK, "ed25519").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mtls_with_a_client_key_on_the_token() {
                super::mtls(STACK).await;
            }
        }
    )*};
}

suite!(softhsm, kryoptic, tpm, p11kit);
