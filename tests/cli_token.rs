//! `rustls-hsm token ...` and token selection, against real SoftHSM tokens.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::Stdio;

use common::cli::{fails, json, ok, on_terminal, output};
use common::{random_pin, TestHsm};

#[test]
fn token_list_shows_every_slot_and_token() {
    let (hsm, _token) = TestHsm::with_token("signer");

    let list = json(
        hsm.cli()
            .args(["token", "list", "--json"]),
    );
    let slots = list["slots"].as_array().unwrap();
    let signer = slots
        .iter()
        .find(|s| s["token"]["label"] == "signer")
        .unwrap_or_else(|| panic!("no token `signer` in {list:#}"));
    assert_eq!(signer["token"]["initialized"], true, "{signer:#}");
    assert_eq!(signer["token"]["model"], "SoftHSM v2", "{signer:#}");
    assert_eq!(
        signer["token"]["manufacturer"], "SoftHSM project",
        "{signer:#}"
    );
    assert_eq!(
        signer["token"]["serial"]
            .as_str()
            .unwrap()
            .len(),
        16,
        "{signer:#}"
    );
    let flags = signer["token"]["flags"]
        .as_array()
        .unwrap();
    for flag in [
        "login_required",
        "token_initialized",
        "user_pin_initialized",
        "rng",
    ] {
        assert!(
            flags.iter().any(|f| f == flag),
            "{flag} missing in {signer:#}"
        );
    }
    // SoftHSM always keeps one free slot with an uninitialised token.
    assert!(
        slots
            .iter()
            .any(|s| s["token"]["initialized"] == false),
        "{list:#}"
    );

    let text = ok(hsm.cli().args(["token", "list"]));
    assert!(text.contains("label:        signer"), "{text}");
    assert!(text.contains("token_initialized"), "{text}");
    assert!(text.contains("token not initialised"), "{text}");
}

#[test]
fn label_selects_exactly_one_of_similar_tokens() {
    let (hsm, signer) = TestHsm::with_token("signer");
    let signer2 = hsm.add_token("signer2");
    let serial = hsm.serial_of("signer");
    assert_ne!(serial, hsm.serial_of("signer2"));

    let report = json(
        hsm.cli()
            .args(["doctor", "--json", "--token", "signer"]),
    );
    let tokens = report["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1, "{report:#}");
    assert_eq!(tokens[0]["serial"], serial.as_str(), "{report:#}");

    // A key made through `--token signer` lands on signer, not signer2.
    ok(hsm.cli_login(
        &signer,
        &["key", "generate", "--label", "k", "--type", "ec:p256"],
    ));
    let on_signer = json(hsm.cli_login(&signer, &["key", "list", "--json"]));
    assert_eq!(
        on_signer["keys"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{on_signer:#}"
    );
    let on_signer2 = json(hsm.cli_login(&signer2, &["key", "list", "--json"]));
    assert!(
        on_signer2["keys"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{on_signer2:#}"
    );

    let by_serial =
        json(
            hsm.cli()
                .args(["doctor", "--json", "--token", &format!("serial:{serial}")]),
        );
    assert_eq!(by_serial["tokens"][0]["label"], "signer", "{by_serial:#}");
}

#[test]
fn percent_encoded_uri_selects_the_token() {
    let (hsm, _plain) = TestHsm::with_token("signer");
    let spaced = hsm.add_token("my signer");

    let report = json(
        hsm.cli()
            .args(["doctor", "--json", "--token", "pkcs11:token=my%20signer"]),
    );
    let tokens = report["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1, "{report:#}");
    assert_eq!(tokens[0]["label"], "my signer", "{report:#}");
    assert_eq!(tokens[0]["serial"], hsm.serial_of("my signer").as_str());

    let listed = json(hsm.cli().args([
        "key",
        "list",
        "--json",
        "--token",
        "pkcs11:token=my%20signer",
        "--pin",
        &spaced.pin_source(),
    ]));
    assert!(
        listed["keys"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{listed:#}"
    );
}

#[test]
fn init_refuses_a_label_another_token_has() {
    let (hsm, signer) = TestHsm::with_token("signer");

    let err = fails(hsm.cli().args([
        "token",
        "init",
        "--label",
        "signer",
        "--so-pin",
        &signer.so_pin_source(),
        "--pin",
        &signer.pin_source(),
    ]));
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("label `signer` is already used"), "{err}");
    let list = json(
        hsm.cli()
            .args(["token", "list", "--json"]),
    );
    let count = list["slots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["token"]["label"] == "signer")
        .count();
    assert_eq!(count, 1, "{list:#}");
}

#[test]
fn init_reads_pins_from_env_file_and_command() {
    let hsm = TestHsm::new();
    let so_pin = random_pin();
    let user_pin = random_pin();
    let so_file = hsm.write_secret("so.pin", &so_pin);
    let user_file = hsm.write_secret("user.pin", &user_pin);
    let sources = [
        (
            "from-env",
            "env:TEST_SO_PIN".to_owned(),
            "env:TEST_USER_PIN".to_owned(),
        ),
        (
            "from-file",
            format!("file:{}", so_file.display()),
            format!("file:{}", user_file.display()),
        ),
        (
            "from-cmd",
            format!("cmd:cat '{}'", so_file.display()),
            format!("cmd:printf '%s\\n' \"$(cat '{}')\"", user_file.display()),
        ),
    ];
    for (label, so_source, user_source) in &sources {
        let out = ok(hsm
            .cli()
            .env("TEST_SO_PIN", &so_pin)
            .env("TEST_USER_PIN", &user_pin)
            .args(["token", "init", "--label", label])
            .args(["--so-pin", so_source, "--pin", user_source]));
        assert!(
            out.contains(&format!("initialised token `{label}`")),
            "{out}"
        );

        // The user PIN works for our login and for an independent client.
        json(
            hsm.cli()
                .env("TEST_USER_PIN", &user_pin)
                .args(["key", "list", "--json", "--token", label])
                .args(["--pin", user_source]),
        );
        let tool = hsm.pkcs11_tool(&[
            "--token-label",
            label,
            "--login",
            "--pin",
            &user_pin,
            "--list-objects",
        ]);
        assert!(tool.status.success(), "{}", common::text(&tool));
    }
}

#[test]
fn literal_pins_are_refused_and_never_echoed() {
    let hsm = TestHsm::new();
    for args in [
        ["--so-pin", "1234", "--pin", "env:UNUSED"],
        ["--so-pin", "env:UNUSED", "--pin", "1234"],
        ["--so-pin", "env:UNUSED", "--pin", "pin:1234"],
        ["--so-pin", "env:UNUSED", "--pin", "-1234"],
    ] {
        let err = fails(
            hsm.cli()
                .args(["token", "init", "--label", "t"])
                .args(args),
        );
        assert!(!err.contains("1234"), "the PIN was echoed: {err}");
        assert!(err.contains("a PIN cannot be given directly"), "{err}");
        assert!(
            err.contains("env:NAME, file:PATH, cmd:COMMAND or prompt"),
            "{err}"
        );
    }
    let err = fails(
        hsm.cli()
            .args(["key", "list", "--token", "t", "--pin", "918273"]),
    );
    assert!(!err.contains("918273"), "the PIN was echoed: {err}");
}

#[test]
fn reinit_needs_confirmation_and_keys_survive_without_it() {
    let (hsm, signer) = TestHsm::with_token("signer");
    ok(hsm.cli_login(
        &signer,
        &[
            "key", "generate", "--label", "precious", "--type", "ec:p256",
        ],
    ));
    let slot = hsm.slot_of("signer").to_string();
    let init = |extra: &[&str]| {
        let mut cmd = hsm.cli();
        cmd.args(["token", "init", "--label", "signer", "--slot-id", &slot])
            .args(["--so-pin", &signer.so_pin_source()])
            .args(["--pin", &signer.pin_source()])
            .args(extra);
        cmd
    };

    let err = fails(&mut init(&[]));
    assert!(err.contains("already initialised"), "{err}");
    assert!(err.contains("--yes-destroy-all-keys"), "{err}");

    // Typing the label is a person's job: piped text is refused, even the right label.
    for typed in ["signer\n", "wrong\n"] {
        let mut child = init(&["--reinitialize"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(typed.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "{}", common::text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("nothing was changed"), "{err}");
    }

    let keys = json(hsm.cli_login(&signer, &["key", "list", "--json"]));
    assert_eq!(keys["keys"][0]["label"], "precious", "{keys:#}");

    let new_pin = hsm.write_secret("new.pin", &random_pin());
    let new_source = format!("file:{}", new_pin.display());
    ok(hsm.cli().args([
        "token",
        "init",
        "--label",
        "signer",
        "--slot-id",
        &slot,
        "--so-pin",
        &signer.so_pin_source(),
        "--pin",
        &new_source,
        "--yes-destroy-all-keys",
    ]));
    let keys = json(hsm.cli().args([
        "key",
        "list",
        "--json",
        "--token",
        "signer",
        "--pin",
        &new_source,
    ]));
    assert!(
        keys["keys"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{keys:#}"
    );
}

#[test]
fn init_prints_the_slot_later_runs_find_the_token_in() {
    // SoftHSM moves a token to its lasting slot at the next C_Initialize; init printed the old.
    let hsm = TestHsm::new();
    let so_pin = hsm.write_secret("so.pin", &random_pin());
    let user_pin = hsm.write_secret("user.pin", &random_pin());
    let out = ok(hsm.cli().args([
        "token",
        "init",
        "--label",
        "fresh",
        "--so-pin",
        &format!("file:{}", so_pin.display()),
        "--pin",
        &format!("file:{}", user_pin.display()),
    ]));
    let expected = format!(
        "initialised token `fresh` (serial {}, slot {:#x})",
        hsm.serial_of("fresh"),
        hsm.slot_of("fresh")
    );
    assert!(out.contains(&expected), "{out}\nexpected: {expected}");
}

#[test]
fn reinit_refused_on_a_pipe_reads_as_a_sentence() {
    // The refusal read "…destroys every key on it needs the label typed on a terminal".
    let (hsm, signer) = TestHsm::with_token("signer");
    let slot = hsm.slot_of("signer").to_string();
    let err = fails(
        hsm.cli()
            .args(["token", "init", "--label", "signer", "--slot-id", &slot])
            .args(["--so-pin", &signer.so_pin_source()])
            .args(["--pin", &signer.pin_source(), "--reinitialize"]),
    );
    assert!(
        err.contains(
            "destroys every key on it: confirming it needs the label typed on a terminal, and \
             stdin is not one; nothing was changed (scripts pass --yes-destroy-all-keys)"
        ),
        "{err}"
    );
}

#[test]
fn reinitialize_after_typing_the_label_on_a_terminal() {
    let (hsm, signer) = TestHsm::with_token("signer");
    ok(hsm.cli_login(
        &signer,
        &["key", "generate", "--label", "old", "--type", "ec:p256"],
    ));
    let slot = hsm.slot_of("signer").to_string();
    let mut init = hsm.cli();
    init.args(["token", "init", "--label", "signer", "--slot-id", &slot])
        .args(["--so-pin", &signer.so_pin_source()])
        .args(["--pin", &signer.pin_source()])
        .arg("--reinitialize");

    let out = on_terminal(&init, "signer2\n");
    assert!(!out.status.success(), "{}", common::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("the typed text is not `signer`"),
        "{}",
        common::text(&out)
    );
    let keys = json(hsm.cli_login(&signer, &["key", "list", "--json"]));
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1, "{keys:#}");

    let out = on_terminal(&init, "signer\n");
    assert!(out.status.success(), "{}", common::text(&out));
    let keys = json(hsm.cli_login(&signer, &["key", "list", "--json"]));
    assert!(
        keys["keys"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{keys:#}"
    );
}

#[test]
fn change_pin_and_unlock() {
    let (hsm, signer) = TestHsm::with_token("signer");
    let second = hsm.write_secret("second.pin", &random_pin());
    let second = format!("file:{}", second.display());
    let third = hsm.write_secret("third.pin", &random_pin());
    let third = format!("file:{}", third.display());
    let list_with = |pin: &str| {
        let mut cmd = hsm.cli();
        cmd.args(["key", "list", "--token", "signer", "--pin", pin]);
        cmd
    };

    ok(hsm.cli().args([
        "token",
        "change-pin",
        "--token",
        "signer",
        "--pin",
        &signer.pin_source(),
        "--new-pin",
        &second,
    ]));
    let err = fails(&mut list_with(&signer.pin_source()));
    assert!(err.contains("wrong user PIN for token `signer`"), "{err}");
    ok(&mut list_with(&second));

    ok(hsm.cli().args([
        "token",
        "unlock",
        "--token",
        "signer",
        "--so-pin",
        &signer.so_pin_source(),
        "--new-pin",
        &third,
    ]));
    fails(&mut list_with(&second));
    ok(&mut list_with(&third));
}

#[test]
fn unknown_token_lists_the_tokens_present() {
    let (hsm, _signer) = TestHsm::with_token("signer");
    let out = output(
        hsm.cli()
            .args(["doctor", "--token", "nosuch"]),
    );
    assert!(!out.status.success(), "{}", common::text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no initialised token matches `label:nosuch`"),
        "{err}"
    );
    assert!(err.contains("`signer`"), "{err}");
}
