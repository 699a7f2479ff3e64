//! `rustls-hsm key ...` against real SoftHSM tokens, checked with pkcs11-tool as an independent
//! client.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::cli::{fails, json, ok, on_terminal, private_keys_seen_by_pkcs11_tool, tool_ok};
use common::{TestHsm, TestToken};
use p256::pkcs8::{DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use sha2::{Digest, Sha256};

/// What pkcs11-tool (OpenSC 0.23) prints for a key generated sensitive and non-extractable.
const GENERATED_ACCESS: &str = "sensitive, always sensitive, never extractable, local";

#[test]
fn generates_every_key_type_sensitive_and_local() {
    let (hsm, token) = TestHsm::with_token("signer");
    let types = [
        "ec:p256", "ec:p384", "ec:p521", "rsa:2048", "rsa:3072", "rsa:4096", "ed25519",
    ];
    for key_type in types {
        let label = format!("k-{key_type}");
        let out = ok(hsm.cli_login(
            &token,
            &["key", "generate", "--label", &label, "--type", key_type],
        ));
        assert!(out.contains(&format!("type:        {key_type}")), "{out}");
    }

    let listed = json(hsm.cli_login(&token, &["key", "list", "--json"]));
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), types.len(), "{listed:#}");
    for key_type in types {
        let key = keys
            .iter()
            .find(|k| k["type"] == key_type)
            .unwrap_or_else(|| panic!("no {key_type} key in {listed:#}"));
        for (flag, want) in [
            ("sensitive", true),
            ("always_sensitive", true),
            ("never_extractable", true),
            ("extractable", false),
            ("local", true),
            ("imported", false),
            ("sign", true),
            ("certificate", false),
        ] {
            assert_eq!(key[flag], want, "{flag} of {key:#}");
        }
        assert_eq!(
            key["spki_sha256"]
                .as_str()
                .unwrap()
                .len(),
            64,
            "{key:#}"
        );
        let uri = key["uri"].as_str().unwrap();
        assert!(uri.starts_with("pkcs11:token=signer;serial="), "{uri}");
        assert!(uri.ends_with(";type=private"), "{uri}");
    }

    let seen = private_keys_seen_by_pkcs11_tool(&hsm, &token);
    assert_eq!(seen.len(), types.len(), "{seen:?}");
    for (label, _, access) in &seen {
        assert_eq!(
            access, GENERATED_ACCESS,
            "pkcs11-tool's access line of `{label}`"
        );
    }
}

#[test]
fn refuses_a_label_or_id_a_private_key_has() {
    let (hsm, token) = TestHsm::with_token("signer");
    let generate = |label: &str, id: &str| {
        hsm.cli_login(
            &token,
            &[
                "key", "generate", "--label", label, "--type", "ec:p256", "--id", id,
            ],
        )
    };
    ok(generate("tls", "0a"));

    let err = fails(generate("tls", "0b"));
    assert!(err.contains("label `tls` already exists"), "{err}");
    let err = fails(generate("other", "0a"));
    assert!(err.contains("id 0a already exists"), "{err}");
    let listed = json(hsm.cli_login(&token, &["key", "list", "--json"]));
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1, "{listed:#}");
}

#[test]
fn shows_keys_made_by_pkcs11_tool() {
    let (hsm, token) = TestHsm::with_token("signer");
    tool_keypair(&hsm, &token, "X", "01");

    let shown = ok(hsm.cli_login(&token, &["key", "show", "X"]));
    assert!(shown.contains("key `X`"), "{shown}");
    assert!(shown.contains("type:        ec:p256"), "{shown}");
    assert!(shown.contains("id:          01"), "{shown}");
    assert!(shown.contains("generated on the token"), "{shown}");

    // The PEM is the key's SPKI: its SHA-256 is the fingerprint shown above it.
    let pem = &shown[shown
        .find("-----BEGIN PUBLIC KEY-----")
        .unwrap()..];
    let (label, der) = der::pem::decode_vec(pem.as_bytes()).unwrap();
    assert_eq!(label, "PUBLIC KEY");
    let fingerprint = hex::encode(Sha256::digest(&der));
    assert!(shown.contains(&fingerprint), "{shown}");
    p256::PublicKey::from_public_key_der(&der).unwrap();

    for selector in [
        "id:01",
        "pkcs11:object=X;id=%01",
        "pkcs11:token=signer;object=X",
    ] {
        let again = ok(hsm.cli_login(&token, &["key", "show", selector]));
        assert!(again.contains(&fingerprint), "{selector}: {again}");
    }
}

#[test]
fn a_shared_label_is_ambiguous_until_the_id_is_given() {
    let (hsm, token) = TestHsm::with_token("signer");
    tool_keypair(&hsm, &token, "dup", "02");
    tool_keypair(&hsm, &token, "dup", "03");

    for args in [
        &["key", "show", "dup"][..],
        &["key", "delete", "dup", "--yes"][..],
    ] {
        let err = fails(hsm.cli_login(&token, args));
        assert!(err.contains("matches 2 private keys"), "{err}");
        assert!(err.contains("id 02") && err.contains("id 03"), "{err}");
        assert!(err.contains("id:HEX"), "{err}");
    }
    assert_eq!(private_keys_seen_by_pkcs11_tool(&hsm, &token).len(), 2);

    ok(hsm.cli_login(&token, &["key", "show", "id:02"]));
    ok(hsm.cli_login(&token, &["key", "delete", "id:02", "--yes"]));
    let left = private_keys_seen_by_pkcs11_tool(&hsm, &token);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].1, "03", "{left:?}");
    let public = tool_ok(hsm.pkcs11_tool(&[
        "--token-label",
        "signer",
        "--list-objects",
        "--type",
        "pubkey",
    ]));
    assert!(!public.contains("ID:         02"), "{public}");
    ok(hsm.cli_login(&token, &["key", "show", "dup"]));
}

#[test]
fn delete_needs_confirmation_and_takes_the_certificate_along() {
    let (hsm, token) = TestHsm::with_token("signer");
    for (label, id) in [("tls", "0a"), ("other", "0b")] {
        ok(hsm.cli_login(
            &token,
            &[
                "key", "generate", "--label", label, "--type", "ec:p256", "--id", id,
            ],
        ));
        write_certificate(&hsm, &token, label, id);
    }
    let listed = json(hsm.cli_login(&token, &["key", "list", "--json"]));
    assert!(
        listed["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["certificate"] == true),
        "{listed:#}"
    );

    // Without --yes the label must be typed on a terminal; stdin here is not one.
    let err = fails(hsm.cli_login(&token, &["key", "delete", "tls"]));
    assert!(err.contains("nothing was changed"), "{err}");
    assert_eq!(private_keys_seen_by_pkcs11_tool(&hsm, &token).len(), 2);

    let out = ok(hsm.cli_login(&token, &["key", "delete", "tls", "--yes"]));
    assert!(out.contains("public key, 1 certificate(s)"), "{out}");
    let seen = private_keys_seen_by_pkcs11_tool(&hsm, &token);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0, "other");
    let certs = tool_ok(hsm.pkcs11_tool(&[
        "--token-label",
        "signer",
        "--list-objects",
        "--type",
        "cert",
    ]));
    assert!(!certs.contains("ID:         0a"), "{certs}");
    assert!(certs.contains("ID:         0b"), "{certs}");
}

#[test]
fn delete_accepts_only_the_label_typed_on_a_terminal() {
    let (hsm, token) = TestHsm::with_token("signer");
    ok(hsm.cli_login(
        &token,
        &["key", "generate", "--label", "tls", "--type", "ec:p256"],
    ));
    let delete = hsm.cli_login(&token, &["key", "delete", "tls"]);

    let out = on_terminal(&delete, "tl\n");
    assert!(!out.status.success(), "{}", common::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("the typed text is not `tls`"),
        "{}",
        common::text(&out)
    );
    assert_eq!(private_keys_seen_by_pkcs11_tool(&hsm, &token).len(), 1);

    let out = on_terminal(&delete, "tls\n");
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(private_keys_seen_by_pkcs11_tool(&hsm, &token).is_empty());
}

#[test]
fn imports_pkcs8_sec1_and_pkcs1_keys_as_non_extractable() {
    let (hsm, token) = TestHsm::with_token("signer");
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();

    // EC keys from the p256 crate, as PKCS#8 and as SEC1.
    for (label, sec1) in [("ec-pkcs8", false), ("ec-sec1", true)] {
        let key = random_p256();
        let pem = if sec1 {
            key.to_sec1_pem(LineEnding::LF)
                .unwrap()
                .to_string()
        } else {
            key.to_pkcs8_pem(LineEnding::LF)
                .unwrap()
                .to_string()
        };
        let path = dir.path().join(format!("{label}.pem"));
        std::fs::write(&path, pem).unwrap();
        let spki = key
            .public_key()
            .to_public_key_der()
            .unwrap();
        expected.push((label, path, hex::encode(Sha256::digest(spki.as_bytes()))));
    }

    // SEC1 from openssl names the curve (the p256 crate's SEC1 above does not).
    let sec1 = dir.path().join("ec-openssl-sec1.pem");
    let sec1_spki = dir.path().join("ec.spki");
    openssl(
        &["ecparam", "-name", "secp384r1", "-genkey", "-noout"],
        &sec1,
    );
    openssl(
        &[
            "pkey",
            "-pubout",
            "-outform",
            "DER",
            "-in",
            sec1.to_str().unwrap(),
        ],
        &sec1_spki,
    );
    let fingerprint = hex::encode(Sha256::digest(std::fs::read(&sec1_spki).unwrap()));
    expected.push(("ec-openssl-sec1", sec1, fingerprint));

    // An RSA key from openssl, converted to PKCS#1 ("BEGIN RSA PRIVATE KEY").
    let pkcs8 = dir.path().join("rsa8.pem");
    let pkcs1 = dir.path().join("rsa-pkcs1.pem");
    let spki = dir.path().join("rsa.spki");
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        &pkcs8,
    );
    openssl(
        &["rsa", "-traditional", "-in", pkcs8.to_str().unwrap()],
        &pkcs1,
    );
    openssl(
        &[
            "pkey",
            "-pubout",
            "-outform",
            "DER",
            "-in",
            pkcs8.to_str().unwrap(),
        ],
        &spki,
    );
    let pem = std::fs::read_to_string(&pkcs1).unwrap();
    assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "{pem}");
    let fingerprint = hex::encode(Sha256::digest(std::fs::read(&spki).unwrap()));
    expected.push(("rsa-pkcs1", pkcs1, fingerprint));

    for (label, path, _) in &expected {
        let out = ok(hsm.cli_login(
            &token,
            &[
                "key",
                "import",
                "--label",
                label,
                "--in",
                path.to_str().unwrap(),
            ],
        ));
        assert!(out.contains("imported"), "{out}");
    }

    let listed = json(hsm.cli_login(&token, &["key", "list", "--json"]));
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), expected.len(), "{listed:#}");
    for (label, _, fingerprint) in &expected {
        let key = keys
            .iter()
            .find(|k| k["label"] == *label)
            .unwrap_or_else(|| panic!("no key `{label}` in {listed:#}"));
        assert_eq!(key["sensitive"], true, "{key:#}");
        assert_eq!(key["extractable"], false, "{key:#}");
        assert_eq!(key["imported"], true, "{key:#}");
        assert_eq!(key["local"], false, "{key:#}");
        assert_eq!(key["spki_sha256"], fingerprint.as_str(), "{key:#}");
    }
}

#[test]
fn imports_openssl_ecparam_output_with_its_parameters_block() {
    // `openssl ecparam -genkey` writes EC PARAMETERS before the key; import failed on the
    // second block with "PEM error in post-encapsulation boundary".
    let (hsm, token) = TestHsm::with_token("signer");
    let key = hsm.path().join("ecparam.pem");
    openssl(&["ecparam", "-name", "prime256v1", "-genkey"], &key);
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN EC PARAMETERS-----"), "{pem}");

    ok(hsm.cli_login(&token, &import_args("ecparam", &key)));
    let listed = json(hsm.cli_login(&token, &["key", "list", "--json"]));
    assert_eq!(listed["keys"][0]["label"], "ecparam", "{listed:#}");
    assert_eq!(
        listed["keys"][0]["spki_sha256"],
        spki_sha256_by_openssl(&key).as_str(),
        "{listed:#}"
    );
}

#[test]
fn imports_a_key_stored_with_its_certificate_in_either_order() {
    // A PEM file with the key and its certificate failed whichever came first.
    let (hsm, token) = TestHsm::with_token("signer");
    let key = hsm.path().join("key.pem");
    let cert = hsm.path().join("cert.pem");
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
        ],
        &key,
    );
    openssl(
        &[
            "req",
            "-x509",
            "-key",
            key.to_str().unwrap(),
            "-subj",
            "/CN=a.test",
            "-days",
            "1",
        ],
        &cert,
    );
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let cert_pem = std::fs::read_to_string(&cert).unwrap();
    for (label, text) in [
        ("key-first", format!("{key_pem}{cert_pem}")),
        ("cert-first", format!("{cert_pem}{key_pem}")),
    ] {
        let path = hsm.path().join(format!("{label}.pem"));
        std::fs::write(&path, text).unwrap();
        ok(hsm.cli_login(&token, &import_args(label, &path)));
    }
    let listed = json(hsm.cli_login(&token, &["key", "list", "--json"]));
    let fingerprint = spki_sha256_by_openssl(&key);
    for key in listed["keys"].as_array().unwrap() {
        assert_eq!(key["spki_sha256"], fingerprint.as_str(), "{listed:#}");
    }
    assert_eq!(listed["keys"].as_array().unwrap().len(), 2, "{listed:#}");
}

#[test]
fn imports_a_key_file_that_starts_with_a_byte_order_mark() {
    // A UTF-8 BOM (Windows editors) failed with "PEM preamble contains invalid data".
    let (hsm, token) = TestHsm::with_token("signer");
    let key = random_p256();
    let pem = key
        .to_pkcs8_pem(LineEnding::CRLF)
        .unwrap();
    let path = hsm.path().join("bom.pem");
    std::fs::write(&path, format!("\u{feff}{}", pem.as_str())).unwrap();

    ok(hsm.cli_login(&token, &import_args("bom", &path)));
    let listed = json(hsm.cli_login(&token, &["key", "list", "--json"]));
    let spki = key
        .public_key()
        .to_public_key_der()
        .unwrap();
    assert_eq!(
        listed["keys"][0]["spki_sha256"],
        hex::encode(Sha256::digest(spki.as_bytes())).as_str(),
        "{listed:#}"
    );
}

#[test]
fn import_errors_say_what_was_found_and_what_is_accepted() {
    // Import errors were PEM parser jargon prefixed "key generation:".
    let (hsm, token) = TestHsm::with_token("signer");
    let key = hsm.path().join("key.pem");
    let cert = hsm.path().join("cert.pem");
    let encrypted = hsm.path().join("encrypted.pem");
    let empty = hsm.path().join("empty.pem");
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
        &key,
    );
    openssl(
        &[
            "req",
            "-x509",
            "-key",
            key.to_str().unwrap(),
            "-subj",
            "/CN=a.test",
            "-days",
            "1",
        ],
        &cert,
    );
    openssl(
        &[
            "pkey",
            "-in",
            key.to_str().unwrap(),
            "-aes256",
            "-passout",
            "pass:secret",
        ],
        &encrypted,
    );
    std::fs::write(&empty, "").unwrap();
    let accepted = "expected PRIVATE KEY (PKCS#8), EC PRIVATE KEY (SEC1) or RSA PRIVATE KEY \
                    (PKCS#1)";
    let cases = [
        (
            &cert,
            "key import: no private key in the PEM text: found CERTIFICATE; ",
        ),
        (
            &encrypted,
            "key import: the key is encrypted (ENCRYPTED PRIVATE KEY): decrypt it first",
        ),
        (&empty, "key import: the PEM text is empty; "),
    ];
    for (path, message) in cases {
        let err = fails(hsm.cli_login(&token, &import_args("k", path)));
        assert!(
            err.contains(&format!("importing {}", path.display())),
            "{err}"
        );
        assert!(err.contains(message), "{err}");
        assert!(!err.contains("key generation"), "{err}");
        if path != &encrypted {
            assert!(err.contains(accepted), "{err}");
        }
    }
    let der = hsm.path().join("key.der");
    openssl(
        &["pkey", "-in", key.to_str().unwrap(), "-outform", "DER"],
        &der,
    );
    let err = fails(hsm.cli_login(&token, &import_args("k", &der)));
    assert!(err.contains("is not PEM text but binary data"), "{err}");
    assert!(err.contains("openssl pkey -inform DER"), "{err}");
    assert!(private_keys_seen_by_pkcs11_tool(&hsm, &token).is_empty());
}

#[test]
fn import_refuses_rsa_below_2048_bits() {
    // A 1024-bit key went onto the token although no TLS peer would accept its signatures.
    let (hsm, token) = TestHsm::with_token("signer");
    let key = hsm.path().join("rsa1024.pem");
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
        ],
        &key,
    );

    let err = fails(hsm.cli_login(&token, &import_args("weak", &key)));
    assert!(
        err.contains("key import: RSA-1024 is below 2048 bits, the least TLS peers accept"),
        "{err}"
    );
    assert!(private_keys_seen_by_pkcs11_tool(&hsm, &token).is_empty());
}

#[test]
fn key_list_shows_what_it_can_read_of_an_unreadable_key() {
    // An unreadable key was listed as a bare error, without its handle, label or id, and the
    // error named the key twice ("public key of `x`: public key of `x`").
    let (hsm, token) = TestHsm::with_token("signer");
    tool_keypair(&hsm, &token, "good", "01");
    tool_keypair(&hsm, &token, "orphan", "02");
    tool_ok(hsm.pkcs11_tool(&[
        "--token-label",
        &token.label,
        "--login",
        "--pin",
        &token.user_pin(),
        "--delete-object",
        "--type",
        "pubkey",
        "--id",
        "02",
    ]));

    let listed = json(hsm.cli_login(&token, &["key", "list", "--json"]));
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{listed:#}");
    let good = keys
        .iter()
        .find(|k| k["label"] == "good")
        .unwrap();
    assert!(good.get("error").is_none(), "{listed:#}");
    let orphan = keys
        .iter()
        .find(|k| k.get("error").is_some())
        .unwrap_or_else(|| panic!("no unreadable entry in {listed:#}"));
    assert_eq!(orphan["label"], "orphan", "{orphan:#}");
    assert_eq!(orphan["id"], "02", "{orphan:#}");
    assert_eq!(orphan["ck_key_type"], "CKK_EC", "{orphan:#}");
    assert_eq!(orphan["sensitive"], true, "{orphan:#}");
    assert!(orphan["handle"].is_u64(), "{orphan:#}");
    let error = orphan["error"].as_str().unwrap();
    assert_eq!(
        error
            .matches("public key of `orphan`")
            .count(),
        1,
        "{error}"
    );
    assert!(
        error.contains("no public key object; the public half is missing"),
        "{error}"
    );

    let text = ok(hsm.cli_login(&token, &["key", "list"]));
    assert!(text.contains("key `good`"), "{text}");
    assert!(
        text.contains("unreadable key `orphan` (id 02, CKK_EC, handle "),
        "{text}"
    );
}

/// `key import --label LABEL --in PATH`.
fn import_args<'a>(label: &'a str, path: &'a std::path::Path) -> [&'a str; 6] {
    [
        "key",
        "import",
        "--label",
        label,
        "--in",
        path.to_str().unwrap(),
    ]
}

/// Lowercase hex SHA-256 of the SubjectPublicKeyInfo of a PEM key file, computed by openssl.
fn spki_sha256_by_openssl(key: &std::path::Path) -> String {
    let spki = key.with_extension("spki");
    openssl(
        &[
            "pkey",
            "-pubout",
            "-outform",
            "DER",
            "-in",
            key.to_str().unwrap(),
        ],
        &spki,
    );
    hex::encode(Sha256::digest(std::fs::read(&spki).unwrap()))
}

/// A key pair made by pkcs11-tool, not by us.
fn tool_keypair(hsm: &TestHsm, token: &TestToken, label: &str, id: &str) {
    tool_ok(hsm.pkcs11_tool(&[
        "--token-label",
        &token.label,
        "--login",
        "--pin",
        &token.user_pin(),
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        label,
        "--id",
        id,
    ]));
}

/// Stores a self-signed certificate (not for this key; only its CKA_ID matters) on the token.
fn write_certificate(hsm: &TestHsm, token: &TestToken, label: &str, id: &str) {
    let certified = rcgen::generate_simple_self_signed(vec![format!("{label}.test")]).unwrap();
    let path = hsm
        .path()
        .join(format!("{label}.crt.der"));
    std::fs::write(&path, certified.cert.der()).unwrap();
    tool_ok(hsm.pkcs11_tool(&[
        "--token-label",
        &token.label,
        "--login",
        "--pin",
        &token.user_pin(),
        "--write-object",
        path.to_str().unwrap(),
        "--type",
        "cert",
        "--id",
        id,
        "--label",
        label,
    ]));
}

fn random_p256() -> p256::SecretKey {
    loop {
        let mut scalar = [0u8; 32];
        getrandom::getrandom(&mut scalar).unwrap();
        if let Ok(key) = p256::SecretKey::from_slice(&scalar) {
            return key;
        }
    }
}

/// Runs `openssl ARGS -out OUT`, asserting success.
fn openssl(args: &[&str], out: &std::path::Path) {
    let result = Command::new("openssl")
        .args(args)
        .arg("-out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "openssl {args:?}: {}",
        common::text(&result)
    );
}

// `key delete --token A 'pkcs11:token=B;id=%56'` once deleted the key with id 56 on token A.
#[test]
fn a_key_uri_naming_another_token_is_refused() {
    let (hsm, signer) = TestHsm::with_token("signer");
    let other = hsm.add_token("other");
    for token in [&signer, &other] {
        ok(hsm.cli_login(
            token,
            &[
                "key", "generate", "--label", "same", "--type", "ec:p256", "--id", "56",
            ],
        ));
    }
    let err = fails(hsm.cli_login(
        &signer,
        &["key", "delete", "pkcs11:token=other;id=%56", "--yes"],
    ));
    assert!(err.contains("names token `other`"), "{err}");
    assert_eq!(private_keys_seen_by_pkcs11_tool(&hsm, &signer).len(), 1);
    ok(hsm.cli_login(&signer, &["key", "show", "pkcs11:token=signer;id=%56"]));
}
