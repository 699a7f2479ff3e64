//! Key backup and restore against real SoftHSM tokens: two token stores are two HSMs, A and B.
//! (`tests/backup_stacks.rs` runs the file-and-token attack on every token stack.)
//!
//! A's steps run through the `rustls-hsm` binary; in-process checks use one store per test
//! process (SoftHSM reads `SOFTHSM2_CONF` once), so each test runs in its own process (nextest).

// Helpers here panic on failure, like the tests that call them.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::SignatureScheme;
use rustls_hsm::backup::Backup;
use rustls_hsm::resolver::ServerCertResolver;
use rustls_hsm::scheme::verify_signature;

use common::cli::{fails, ok, tool_ok};
use common::keys::{build, key, spy_module};
use common::tls::{client_config, handshake, TestCa, TestServer};
use common::{TestHsm, TestToken};

const KEK: &str = "backup-kek";

/// One HSM: a token store with one token.
struct Hsm {
    hsm: TestHsm,
    token: TestToken,
}

impl Hsm {
    fn new(label: &str) -> Self {
        let (hsm, token) = TestHsm::with_token(label);
        Self { hsm, token }
    }

    /// `rustls-hsm ARGS --token T --pin P`.
    fn cli(&self, args: &[&str]) -> std::process::Command {
        self.hsm.cli_login(&self.token, args)
    }

    /// `rustls-hsm ARGS --token T --pin P --so-pin S`.
    fn cli_so(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = self.cli(args);
        cmd.args(["--so-pin", &self.token.so_pin_source()]);
        cmd
    }

    fn dir(&self) -> &Path {
        self.hsm.path()
    }

    fn generate(&self, label: &str, policy: &str) {
        ok(self.cli(&[
            "key",
            "generate",
            "--label",
            label,
            "--type",
            "ec:p256",
            "--backup-policy",
            policy,
        ]));
    }

    /// The key's SubjectPublicKeyInfo, from `key show`.
    fn spki(&self, label: &str) -> Vec<u8> {
        let out = ok(self.cli(&["key", "show", label]));
        let pem = &out[out.find("-----BEGIN").unwrap()..];
        der::pem::decode_vec(pem.as_bytes())
            .unwrap()
            .1
    }

    /// How many objects pkcs11-tool (an independent client) sees after logging in.
    fn object_count(&self) -> usize {
        self.tool(&["--list-objects"])
            .lines()
            .filter(|l| !l.starts_with(' ') && l.to_lowercase().contains(" object"))
            .count()
    }

    fn backup(&self, key: &str, kek: &str, out: &Path) -> std::process::Command {
        self.cli(&[
            "backup",
            "create",
            "--key",
            key,
            "--kek",
            kek,
            "--out",
            out.to_str().unwrap(),
        ])
    }

    fn verify(&self, file: &Path, kek: &str) -> std::process::Command {
        self.with_file("verify", file, kek)
    }

    fn restore(&self, file: &Path, kek: &str) -> std::process::Command {
        self.with_file("restore", file, kek)
    }

    /// `rustls-hsm backup VERB --in FILE --kek KEK`.
    fn with_file(&self, verb: &str, file: &Path, kek: &str) -> std::process::Command {
        self.cli(&["backup", verb, "--in", file.to_str().unwrap(), "--kek", kek])
    }

    /// `pkcs11-tool` logged in as the user on this token.
    fn tool(&self, args: &[&str]) -> String {
        let pin = self.token.user_pin();
        let mut all = vec!["--token-label", &self.token.label, "--login", "--pin", &pin];
        all.extend_from_slice(args);
        tool_ok(self.hsm.pkcs11_tool(&all))
    }
}

/// The check value a `kek` command printed.
fn check_value(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("check value: "))
        .unwrap_or_else(|| panic!("no check value in:\n{stdout}"))
        .to_owned()
}

/// A 2-of-3 ceremony on `a`, writing shares into `a`'s directory; returns the check value and
/// the share files.
fn ceremony(a: &Hsm, shares: &str, threshold: &str) -> (String, Vec<PathBuf>) {
    let out_dir = a.dir().join("shares");
    let stdout = ok(a.cli_so(&[
        "kek",
        "ceremony",
        "--label",
        KEK,
        "--shares",
        shares,
        "--threshold",
        threshold,
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]));
    let mut files: Vec<PathBuf> = fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    (check_value(&stdout), files)
}

fn import(b: &Hsm, shares: &[&PathBuf]) -> std::process::Command {
    let mut cmd = b.cli_so(&["kek", "import", "--label", KEK]);
    for share in shares {
        cmd.arg("--share").arg(share);
    }
    cmd
}

/// HSM A with a ceremony KEK and a wrap-with-trusted key `tls` backed up; HSM B with the KEK
/// imported from two shares.
struct Backed {
    a: Hsm,
    b: Hsm,
    file: PathBuf,
}

fn backed_up_pair() -> Backed {
    let a = Hsm::new("hsm-a");
    let b = Hsm::new("hsm-b");
    let (kcv_a, shares) = ceremony(&a, "3", "2");
    let kcv_b = check_value(&ok(import(&b, &[&shares[0], &shares[2]])));
    assert_eq!(kcv_a, kcv_b, "both HSMs must hold the same KEK");
    a.generate("tls", "wrap-with-trusted");
    let file = a.dir().join("tls.backup");
    ok(a.backup("tls", KEK, &file));
    Backed { a, b, file }
}

/// One HSM with a KEK of its own (`kek create`) and a backup of its key `tls`.
fn backed_up_on_one_hsm() -> (Hsm, PathBuf) {
    let a = Hsm::new("hsm-a");
    ok(a.cli_so(&["kek", "create", "--label", KEK]));
    a.generate("tls", "wrap-with-trusted");
    let file = a.dir().join("tls.backup");
    ok(a.backup("tls", KEK, &file));
    (a, file)
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceremony_backup_restore_on_a_second_hsm_serves_tls() {
    let a = Hsm::new("hsm-a");
    let b = Hsm::new("hsm-b");

    // A 2-of-3 ceremony on A: one 0600 file per custodian in a 0700 directory.
    let (kcv_a, shares) = ceremony(&a, "3", "2");
    assert_eq!(shares.len(), 3);
    assert_eq!(mode(&a.dir().join("shares")), 0o700);
    for share in &shares {
        assert_eq!(mode(share), 0o600, "{}", share.display());
    }
    // Any two shares give B the same KEK: the check values match.
    let kcv_b = check_value(&ok(import(&b, &[&shares[0], &shares[2]])));
    assert_eq!(kcv_a, kcv_b);

    // A wrap-with-trusted key on A, backed up into a 0600 file.
    a.generate("tls", "wrap-with-trusted");
    let a_spki = a.spki("tls");
    let file = a.dir().join("tls.backup");
    ok(a.backup("tls", KEK, &file));
    assert_eq!(mode(&file), 0o600);
    let backup = Backup::read(&file).unwrap();
    assert_eq!(backup.spki, a_spki);
    assert_eq!(
        backup
            .kek_check_value
            .unwrap()
            .to_string(),
        kcv_a,
        "the file names the KEK by its check value"
    );

    // Restored on B: sensitive, non-extractable, same id and public key.
    let restored = ok(b.restore(&file, KEK));
    assert!(
        restored.contains("verified under the backup's public key"),
        "{restored}"
    );
    let list = common::cli::json(b.cli(&["key", "list", "--json"]));
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{list:#}");
    assert_eq!(keys[0]["label"], "tls");
    assert_eq!(keys[0]["sensitive"], true);
    assert_eq!(keys[0]["extractable"], false);
    assert_eq!(keys[0]["id"], hex::encode(&backup.id));
    let text = ok(b.cli(&["key", "list"]));
    assert!(
        text.contains("flags:       sensitive, non-extractable"),
        "{text}"
    );
    assert_eq!(
        keys[0]["spki_sha256"],
        rustls_hsm::pkcs11::spki_fingerprint(&a_spki)
    );
    // A second restore of the same key is refused.
    let err = fails(b.restore(&file, KEK));
    assert!(err.contains("already exists"), "{err}");

    // In this process, B signs, and the signature verifies under A's public key.
    b.hsm.use_in_this_process();
    let token = build(&b.hsm, &b.token, |t| t);
    let restored_key = key(&token, "tls");
    let message = b"signed on HSM B";
    let signature = restored_key
        .sign_with(SignatureScheme::ECDSA_NISTP256_SHA256, message)
        .unwrap();
    verify_signature(
        &a_spki,
        SignatureScheme::ECDSA_NISTP256_SHA256,
        message,
        &signature,
    )
    .unwrap();

    // A TLS server on B with A's certificate completes handshakes.
    let ca = TestCa::new();
    let mut resolver = ServerCertResolver::new();
    resolver.add(
        None,
        restored_key
            .certified_key(vec![ca.leaf(&a_spki, false)])
            .unwrap(),
    );
    let server = TestServer::start(Arc::new(resolver)).await;
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        handshake(server.addr, client_config(&ca, versions, &[]))
            .await
            .unwrap();
    }
}

#[test]
fn default_policy_key_and_untrusted_kek_are_refused_before_any_wrap_call() {
    let a = Hsm::new("hsm-a");
    ok(a.cli_so(&["kek", "create", "--label", KEK]));
    a.generate("plain", "none");
    a.generate("tls", "wrap-with-trusted");
    // A private, wrap-capable AES key that the security officer never marked trusted.
    a.tool(&[
        "--keygen",
        "--key-type",
        "AES:32",
        "--label",
        "untrusted",
        "--usage-wrap",
        "--sensitive",
        "--private",
    ]);

    // SoftHSM cannot wrap EdDSA keys: the policy is refused when the key would be born, said
    // so rather than leaving an extractable key that no backup can take; nothing stays.
    let before = a.object_count();
    let ed = |policy| {
        a.cli(&[
            "key",
            "generate",
            "--label",
            "ed",
            "--type",
            "ed25519",
            "--backup-policy",
            policy,
        ])
    };
    let err = fails(ed("wrap-with-trusted"));
    assert!(err.contains("cannot wrap ed25519 keys"), "{err}");
    assert!(err.contains("SoftHSM 2.6 cannot wrap EdDSA keys"), "{err}");
    assert_eq!(a.object_count(), before, "the trial left objects");
    ok(ed("none"));

    for (key, kek, expected) in [
        (
            "plain",
            KEK,
            ["CKA_EXTRACTABLE=false", "backup policy `none`"],
        ),
        ("tls", "untrusted", ["CKA_TRUSTED=false", "marked trusted"]),
    ] {
        let log = a.dir().join(format!("spy-{key}.log"));
        let out = a.dir().join(format!("{key}.backup"));
        let mut cmd = a.backup(key, kek, &out);
        cmd.arg("--module")
            .arg(spy_module())
            .env("PKCS11SPY", &a.hsm.module)
            .env("PKCS11SPY_OUTPUT", &log);
        let err = fails(cmd);
        for text in expected {
            assert!(err.contains(text), "`{text}` missing from: {err}");
        }
        let calls = fs::read_to_string(&log).unwrap();
        assert!(calls.contains("C_FindObjects"), "the spy saw no calls");
        assert!(
            !calls.contains("C_WrapKey"),
            "C_WrapKey was called for {key}"
        );
        assert!(!out.exists());
    }
}

#[test]
fn damaged_or_mismatched_backups_fail_and_leave_nothing_on_the_token() {
    let Backed { a, b, file } = backed_up_pair();
    ok(b.cli_so(&["kek", "create", "--label", "other-kek"]));
    a.generate("other", "wrap-with-trusted");
    let text = fs::read_to_string(&file).unwrap();
    let backup = Backup::parse(&text).unwrap();

    let write = |name: &str, content: &str| {
        let path = a.dir().join(name);
        fs::write(&path, content).unwrap();
        path
    };
    let mut forged_wrap = backup.clone();
    forged_wrap.wrapped[9] ^= 0x01;
    let mut forged_spki = backup;
    forged_spki.spki = a.spki("other");
    let flipped = {
        let at = text
            .find("\"wrapped_key\": \"")
            .unwrap()
            + 20;
        let mut bytes = text.clone().into_bytes();
        bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
        String::from_utf8(bytes).unwrap()
    };
    let cases = [
        (
            "wrong KEK",
            file.clone(),
            "other-kek",
            "wrong key-encryption key",
        ),
        (
            "truncated",
            write("truncated", &text[..text.len() / 2]),
            KEK,
            "truncated",
        ),
        (
            "flipped byte",
            write("flipped", &flipped),
            KEK,
            "integrity check failed",
        ),
        (
            "newer format",
            write(
                "newer",
                &text.replacen("\"version\": 1", "\"version\": 2", 1),
            ),
            KEK,
            "format version 2 is newer",
        ),
        // The integrity check recomputed by a forger: the key wrap's own check catches it.
        (
            "forged wrapped bytes",
            write("forged-wrap", &forged_wrap.to_json().unwrap()),
            KEK,
            "do not authenticate under this KEK",
        ),
        // A public key that is not the wrapped key's: the test signature catches it.
        (
            "forged public key",
            write("forged-spki", &forged_spki.to_json().unwrap()),
            KEK,
            "does not verify under the backup's public key",
        ),
    ];
    for (case, path, kek, expected) in cases {
        let before = b.object_count();
        assert!(before >= 2, "B holds its two KEKs");
        let err = fails(b.restore(&path, kek));
        assert!(
            err.contains(expected),
            "{case}: `{expected}` missing from: {err}"
        );
        assert_eq!(b.object_count(), before, "{case} left objects on the token");
    }
    // The genuine file still restores.
    ok(b.restore(&file, KEK));
    // Then the same key under another label and id, or with an empty id, is refused.
    let before = b.object_count();
    let mut relabelled = Backup::parse(&text).unwrap();
    relabelled.label = "copy".into();
    relabelled.id = vec![0xdd];
    let mut no_id = relabelled.clone();
    no_id.id.clear();
    let mut no_label = relabelled.clone();
    no_label.label.clear();
    // Labels are printed: a forged one must not be able to rewrite the operator's terminal.
    let mut escapes = relabelled.clone();
    escapes.label = "tls\u{1b}[2J\nrestored: ok".into();
    for (case, forged, expected) in [
        ("relabelled", relabelled, "the same public key"),
        ("empty id", no_id, "field `key.id` is empty"),
        ("empty label", no_label, "field `key.label` is empty"),
        ("control characters", escapes, "control character"),
    ] {
        let path = write(case, &forged.to_json().unwrap());
        let err = fails(b.restore(&path, KEK));
        assert!(
            err.contains(expected),
            "{case}: `{expected}` missing from: {err}"
        );
        assert!(!err.contains('\u{1b}'), "{case}: {err:?}");
        assert_eq!(b.object_count(), before, "{case} left objects on the token");
        // What restore refuses, verify does not call good.
        if case != "relabelled" {
            let err = fails(b.verify(&path, KEK));
            assert!(err.contains(expected), "verify, {case}: {err}");
        }
    }
    // Whatever a forged file holds reaches the terminal escaped, and a time must be a time.
    let escaped_field = text.replacen("\"created\"", "\"\\u001b[2Jcreated\"", 1);
    let escaped_algorithm = text.replacen("\"sha-256\"", "\"\\u001b[2J\"", 1);
    let mut not_a_time = Backup::parse(&text).unwrap();
    not_a_time.created = "yesterday".into();
    for (case, content, expected) in [
        ("escape in a field name", escaped_field, "unknown field"),
        (
            "escape in a value",
            escaped_algorithm,
            "unknown integrity algorithm",
        ),
        ("not a time", not_a_time.to_json().unwrap(), "RFC 3339"),
    ] {
        let path = write(case, &content);
        let err = fails(b.verify(&path, KEK));
        assert!(err.contains(expected), "{case}: {err}");
        assert!(!err.contains('\u{1b}'), "{case}: {err:?}");
    }
    // A version of the wrong type is named as such, not as damaged JSON.
    let path = write(
        "string-version",
        &text.replacen("\"version\": 1", "\"version\": \"1\"", 1),
    );
    let err = fails(b.verify(&path, KEK));
    assert!(err.contains("must be a whole number"), "{err}");
    // A device, a FIFO or a directory is not read at all (a FIFO would wait for a writer), a
    // huge file not past the limit.
    let fifo = a.dir().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let huge = a.dir().join("huge");
    fs::File::create(&huge)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    for (path, expected) in [
        (Path::new("/dev/zero"), "not a regular file"),
        (fifo.as_path(), "not a regular file"),
        (a.dir(), "not a regular file"),
        (huge.as_path(), "larger than"),
    ] {
        let err = fails(b.verify(path, KEK));
        assert!(err.contains(expected), "{}: {err}", path.display());
    }
}

#[test]
fn a_public_key_carrying_the_kek_label_neither_blocks_nor_stands_in() {
    let (a, file) = backed_up_on_one_hsm();
    // Anyone may create a public object: here an AES key with the KEK's label, and another
    // under a label no KEK has.
    let value = a.dir().join("aes.bin");
    fs::write(&value, [7u8; 32]).unwrap();
    for label in [KEK, "decoy"] {
        a.tool(&[
            "--write-object",
            value.to_str().unwrap(),
            "--type",
            "secrkey",
            "--key-type",
            "AES:32",
            "--label",
            label,
        ]);
    }
    let out = ok(a.verify(&file, KEK));
    assert!(out.contains("is good"), "{out}");
    let err = fails(a.verify(&file, "decoy"));
    assert!(err.contains("usable without any PIN"), "{err}");
    // Nor does it keep a real KEK from taking that label.
    ok(a.cli_so(&["kek", "create", "--label", "decoy"]));
    ok(a.backup("tls", "decoy", &a.dir().join("decoy.backup")));
}

#[test]
fn backup_verify_leaves_the_token_unchanged() {
    let (a, file) = backed_up_on_one_hsm();

    let before = a.object_count();
    assert_eq!(before, 3, "the KEK and the key pair");
    let out = ok(a.verify(&file, KEK));
    assert!(out.contains("is good"), "{out}");
    assert!(
        out.contains("verified under the backup's public key"),
        "{out}"
    );
    assert_eq!(a.object_count(), before);
}

#[test]
fn one_share_short_of_the_threshold_cannot_import_the_kek() {
    let a = Hsm::new("hsm-a");
    let b = Hsm::new("hsm-b");
    let (_, shares) = ceremony(&a, "5", "3");
    let before = b.object_count();

    // Two distinct shares (one given twice) of a 3-of-5 split.
    let err = fails(import(&b, &[&shares[0], &shares[3], &shares[0]]));
    assert!(
        err.contains("3 shares are needed") && err.contains("only 2 distinct"),
        "{err}"
    );
    assert_eq!(b.object_count(), before, "no KEK may be created");
    ok(import(&b, &[&shares[0], &shares[3], &shares[4]]));
}

#[test]
fn a_lost_key_restores_on_the_same_hsm_locked_whatever_is_asked() {
    let (a, file) = backed_up_on_one_hsm();
    let spki = a.spki("tls");
    ok(a.cli(&["key", "delete", "tls", "--yes"]));

    // What a restore stopped between its two steps leaves: the public key object alone. A
    // public key of another key under the label is refused; the backup's own is used.
    let write_public = |label: &str, spki: &[u8]| {
        let der = a
            .dir()
            .join(format!("{label}-public.der"));
        fs::write(&der, spki).unwrap();
        a.tool(&[
            "--write-object",
            der.to_str().unwrap(),
            "--type",
            "pubkey",
            "--label",
            label,
            "--id",
            &hex::encode(&Backup::read(&file).unwrap().id),
        ]);
    };
    a.generate("other", "none");
    let other_spki = a.spki("other");
    ok(a.cli(&["key", "delete", "other", "--yes"]));
    write_public("tls", &other_spki);
    // `key list` shows it, and how to remove it.
    let listed = ok(a.cli(&["key", "list"]));
    assert!(
        listed.contains("public key \"tls\"") && listed.contains("has no private key"),
        "{listed}"
    );
    let list = common::cli::json(a.cli(&["key", "list", "--json"]));
    assert_eq!(
        list["public_keys_without_private_key"][0]["label"], "tls",
        "{list:#}"
    );
    let err = fails(a.restore(&file, KEK));
    assert!(
        err.contains("public key object with label `tls` and no private key")
            && err.contains("rustls-hsm key delete 'tls'"),
        "{err}"
    );
    // As the message says, `key delete` removes a public key without its private half.
    let deleted = ok(a.cli(&["key", "delete", "tls", "--yes"]));
    assert!(
        deleted.contains("0 private key(s) without a public half and 1 public key(s)"),
        "{deleted}"
    );
    write_public("tls", &spki);

    // The KEK's unwrap template locks restored keys: keeping wrap-with-trusted is refused
    // before anything is unwrapped, and says why.
    let before = a.object_count();
    let mut keep = a.restore(&file, KEK);
    keep.args(["--backup-policy", "wrap-with-trusted"]);
    let err = fails(keep);
    assert!(
        err.contains("CKA_UNWRAP_TEMPLATE") && err.contains("keep the backup file"),
        "{err}"
    );
    assert_eq!(a.object_count(), before);

    let restored = ok(a.restore(&file, KEK));
    assert!(
        restored.contains("replaced the public key object an interrupted restore had left"),
        "{restored}"
    );
    assert_eq!(
        a.object_count(),
        before + 1,
        "the leftover public key is replaced, not doubled"
    );
    assert_eq!(a.spki("tls"), spki);
    let list = common::cli::json(a.cli(&["key", "list", "--json"]));
    assert_eq!(list["keys"][0]["extractable"], false, "{list:#}");
    assert_eq!(list["keys"][0]["sensitive"], true, "{list:#}");
    // The file stays the key's backup: it verifies again, and the restored key cannot leave.
    ok(a.verify(&file, KEK));
    let err = fails(a.backup("tls", KEK, &a.dir().join("again.backup")));
    assert!(
        err.contains("CKA_EXTRACTABLE=false") && err.contains("restored from a backup"),
        "{err}"
    );
    assert_eq!(list["keys"].as_array().unwrap().len(), 1, "{list:#}");

    // A key backed up without that policy cannot gain it at restore.
    let mut narrowed = Backup::read(&file).unwrap();
    narrowed.policy = rustls_hsm::pkcs11::BackupPolicy::None;
    narrowed.label = "other".into();
    narrowed.id = vec![7];
    let path = a.dir().join("narrowed.backup");
    narrowed.write(&path).unwrap();
    let mut widen = a.restore(&path, KEK);
    widen.args(["--backup-policy", "wrap-with-trusted"]);
    let err = fails(widen);
    assert!(err.contains("cannot get it either"), "{err}");

    // A private key whose public half is gone (another tool, an old interruption): `key
    // delete` removes it, and the backup restores again.
    a.tool(&["--delete-object", "--type", "pubkey", "--label", "tls"]);
    let deleted = ok(a.cli(&["key", "delete", "tls", "--yes"]));
    assert!(
        deleted.contains("1 private key(s) without a public half and 0 public key(s)"),
        "{deleted}"
    );
    ok(a.restore(&file, KEK));
}

#[test]
fn a_wrong_so_pin_is_named_as_such() {
    let a = Hsm::new("hsm-a");
    let wrong = a.dir().join("wrong-so.pin");
    fs::write(&wrong, "not-the-so-pin").unwrap();
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = a.cli(&["kek", "create", "--label", KEK]);
    cmd.arg("--so-pin")
        .arg(format!("file:{}", wrong.display()));
    let err = fails(cmd);
    assert!(
        err.contains("wrong SO PIN for token") && err.contains("hsm-a"),
        "{err}"
    );
    assert!(!err.contains("not-the-so-pin"), "the PIN leaked: {err}");
    // A ceremony that fails at the SO login takes back the shares it wrote.
    let out_dir = a.dir().join("shares");
    let mut cmd = a.cli(&[
        "kek",
        "ceremony",
        "--label",
        KEK,
        "--shares",
        "3",
        "--threshold",
        "2",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    cmd.arg("--so-pin")
        .arg(format!("file:{}", wrong.display()));
    let err = fails(cmd);
    assert!(err.contains("wrong SO PIN"), "{err}");
    assert!(!out_dir.exists(), "the failed ceremony left its shares");
    // Nothing was made, and the right SO PIN still works.
    ok(a.cli_so(&["kek", "create", "--label", KEK]));
}
