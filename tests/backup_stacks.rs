//! Backups on every token stack: a KEK (made on the token, and imported from a ceremony's
//! shares), a backup, a verification that leaves nothing, a restore that proves itself, and the
//! attack a backup must resist, by someone holding the file and the token.
//!
//! A stack whose token cannot do RFC 5649 key wrap is skipped with the token's reason; a module
//! through which a KEK cannot be made safely must refuse to make one.
//! Each test starts its own stack and runs in its own process (cargo nextest).

#![allow(clippy::unwrap_used)]

mod common;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use rustls_hsm::backup::{
    create_backup, create_kek, find_kek, import_kek_from_shares, kek_ceremony,
    locked_unwrap_template, restore_backup, verify_backup, Backup, Error, KeyWrap, UnwrapTemplate,
};
use rustls_hsm::pkcs11::ext::{raw_calls, sys, Attr};
use rustls_hsm::pkcs11::{
    self, destroy_key, find_key_on, find_token, generate_key_pair, login_user, BackupPolicy, Curve,
    KeyKind, KeySelector, KeySpec, Module, Token, TokenSelector,
};
use secrecy::SecretString;

use common::stack::Stack;

const KEK: &str = "backup-kek";

struct Setup {
    stack: Stack,
    module: Module,
    token: Token,
    pin: SecretString,
    so_pin: SecretString,
}

fn setup(name: &'static str) -> Option<Setup> {
    let stack = Stack::start(name)?;
    stack.use_in_this_process();
    let module = Module::load(&stack.module).unwrap();
    let token = find_token(&module, &TokenSelector::Label(stack.token.label.clone())).unwrap();
    let pin = SecretString::from(stack.token.user_pin());
    let so_pin = SecretString::from(stack.token.so_pin());
    Some(Setup {
        stack,
        module,
        token,
        pin,
        so_pin,
    })
}

/// Every object a logged-in user sees.
fn object_count(session: &Session) -> usize {
    session.find_objects(&[]).unwrap().len()
}

fn round_trip_and_attack(name: &'static str) {
    let Some(s) = setup(name) else { return };
    let case = s
        .stack
        .case("backup: KEK, backup, verify, restore, and the file-and-token attack");
    let kek = match create_kek(&s.module, &s.token, &s.pin, &s.so_pin, KEK, None) {
        Ok(kek) => kek,
        Err(e @ Error::MechanismMissing { .. }) => {
            // The token's own mechanism list: no RFC 5649 key wrap, so no KEK and no backups.
            return case.skip(&e.to_string());
        }
        Err(e @ Error::LeakyToken { .. }) => {
            // Refused because the token lets a sensitive key's value be copied: show it does.
            assert_sensitive_values_leak(&s);
            let user = login_user(&s.module, &s.token, &s.pin).unwrap();
            let secret_keys = user
                .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
                .unwrap();
            assert!(
                secret_keys.is_empty(),
                "{name}: objects were left: {secret_keys:?}"
            );
            println!("{name}: refused, rightly: {e}");
            // Where the user may mark keys trusted, no key is born backup-able either.
            let user_trusts = user.generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(false),
                    Attribute::ValueLen(16.into()),
                    Attribute::Wrap(true),
                    Attribute::Trusted(true),
                ],
            );
            let generated = generate_key_pair(
                &user,
                &s.token.label,
                "backup-able",
                KeySpec(KeyKind::Ec(Curve::P256)),
                None,
                BackupPolicy::WrapWithTrusted,
            );
            if user_trusts.is_ok() {
                let err = generated.unwrap_err().to_string();
                assert!(err.contains("lets the user mark a key trusted"), "{err}");
                println!("{name}: wrap-with-trusted refused, rightly: {err}");
            } else {
                generated.unwrap();
            }
            return case.pass();
        }
        Err(Error::Pkcs11(e @ pkcs11::Error::SeparateInstance { .. })) => {
            // A module that offers RFC 5649 but hides its sessions from the raw calls: no KEK
            // is made without the unwrap template.
            let text = e.to_string();
            assert!(text.contains("its own instance"), "{text}");
            let user = login_user(&s.module, &s.token, &s.pin).unwrap();
            let secret_keys = user
                .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
                .unwrap();
            assert!(secret_keys.is_empty(), "a refused KEK was left behind");
            println!("{name}: KEK creation refused: {text}");
            return case.pass();
        }
        Err(e) => panic!("{name}: kek create: {e}"),
    };
    assert!(kek.trusted && kek.private && !kek.extractable && !kek.modifiable);
    assert_eq!(kek.unwrap_template, UnwrapTemplate::Locks);

    let user = login_user(&s.module, &s.token, &s.pin).unwrap();
    let generate = |label: &str, policy| {
        generate_key_pair(
            &user,
            &s.token.label,
            label,
            KeySpec(KeyKind::Ec(Curve::P256)),
            None,
            policy,
        )
        .unwrap()
    };
    generate("plain", BackupPolicy::None);
    let original = generate("tls", BackupPolicy::WrapWithTrusted);
    let select = |label: &str| label.parse::<KeySelector>().unwrap();

    // A default-policy key is refused before any wrap call.
    let err = create_backup(&s.module, &user, &s.token, &select("plain"), KEK).unwrap_err();
    assert!(
        err.to_string()
            .contains("CKA_EXTRACTABLE=false"),
        "{err}"
    );

    let backup = create_backup(&s.module, &user, &s.token, &select("tls"), KEK).unwrap();
    println!("{name}: wrapped with {}", backup.mechanism.name());
    assert_eq!(backup.spki, original.spki);
    let file = s.stack.path().join("tls.backup");
    backup.write(&file).unwrap();
    let backup = Backup::read(&file).unwrap();

    // Verify leaves the token as it was.
    let before = object_count(&user);
    let report = verify_backup(&s.module, &user, &s.token, &backup, KEK).unwrap();
    assert!(report.key.sensitive && !report.key.extractable);
    assert_eq!(object_count(&user), before);

    // The key is lost.
    let key = find_key_on(&user, &select("tls"), &s.token, true).unwrap();
    destroy_key(&user, &key).unwrap();
    // A flipped byte in the wrapped key fails and leaves nothing.
    let mut forged = backup.clone();
    forged.wrapped[9] ^= 1;
    let err =
        restore_backup(&s.module, &user, &s.token, &forged, KEK, BackupPolicy::None).unwrap_err();
    assert!(
        err.to_string()
            .contains("do not authenticate"),
        "{err}"
    );
    assert_eq!(object_count(&user), before - 2);

    // Restored: locked, and signing as the original did.
    let restored =
        restore_backup(&s.module, &user, &s.token, &backup, KEK, BackupPolicy::None).unwrap();
    assert!(restored.key.sensitive && !restored.key.extractable);
    assert_eq!(restored.key.spki, original.spki);
    assert_eq!(restored.key.id, original.id);
    user.logout().unwrap();
    drop(user);

    attack(&s, &backup);
    planted_keks_are_refused(&s);
    case.pass();
}

/// A trusted KEK the security officer planted as a public or modifiable object could later
/// decrypt the backups made under it: `backup create` refuses it, naming the attribute.
fn planted_keks_are_refused(s: &Setup) {
    let name = s.stack.name;
    let so = s
        .module
        .context()
        .open_rw_session(s.token.slot)
        .unwrap();
    so.login(UserType::So, Some(&s.so_pin))
        .unwrap();
    let raw = raw_calls(&s.module, &so, "test").unwrap();
    let mechanisms: Vec<u64> = KeyWrap::ALL
        .iter()
        .map(|m| m.mechanism_type())
        .collect();
    let plant = |label: &str, private: bool, modifiable: bool| {
        let mut template: Vec<Attr> = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(private),
            Attribute::Modifiable(modifiable),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Trusted(true),
        ]
        .iter()
        .map(Attr::from)
        .collect();
        template.push(Attr::ulongs(sys::CKA_ALLOWED_MECHANISMS, &mechanisms));
        // Everything a KEK made here has, but for the attribute under test.
        template.push(Attr::template(
            sys::CKA_UNWRAP_TEMPLATE,
            locked_unwrap_template(),
        ));
        raw.generate_key(&so, sys::CKM_AES_KEY_GEN, &template)
    };
    // SoftHSM's SO cannot make private objects; kryoptic's can.
    let mut planted = vec![("public-kek", "a public object is usable without any PIN")];
    plant("public-kek", false, false).unwrap();
    if plant("modifiable-kek", true, true).is_ok() {
        planted.push(("modifiable-kek", "CKA_MODIFIABLE=true"));
    }
    so.logout().unwrap();
    drop(so);

    let user = login_user(&s.module, &s.token, &s.pin).unwrap();
    generate_key_pair(
        &user,
        &s.token.label,
        "planted-test",
        KeySpec(KeyKind::Ec(Curve::P256)),
        None,
        BackupPolicy::WrapWithTrusted,
    )
    .unwrap();
    println!(
        "{name}: planted {:?}",
        planted
            .iter()
            .map(|(kek, _)| *kek)
            .collect::<Vec<_>>()
    );
    for (kek, expected) in planted {
        let err = create_backup(
            &s.module,
            &user,
            &s.token,
            &"planted-test".parse().unwrap(),
            kek,
        )
        .unwrap_err();
        assert!(err.to_string().contains(expected), "{name}: {kek}: {err}");
    }
    // While the public one is there, no backup is made even under the genuine KEK.
    let err = create_backup(
        &s.module,
        &user,
        &s.token,
        &"planted-test".parse().unwrap(),
        KEK,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("public trusted wrapping key (`public-kek`"),
        "{name}: {err}"
    );
}

/// Someone holds the backup file and the token. Without the user PIN nothing unwraps; with the
/// SO PIN or the user PIN, nothing unwraps into a readable key, and the KEK cannot serve as a
/// block decryption oracle.
fn attack(s: &Setup, backup: &Backup) {
    let name = s.stack.name;
    let session = s
        .module
        .context()
        .open_rw_session(s.token.slot)
        .unwrap();

    // No login: the KEK is a private object, invisible; no object the session can see
    // unwraps the backup, by any name of RFC 5649.
    let seen = session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .unwrap();
    assert!(seen.is_empty(), "{name}: a public session sees {seen:?}");
    for candidate in session.find_objects(&[]).unwrap() {
        assert_unwrap_refused(s, &session, backup, candidate, "a public session");
    }

    // The security officer: kryoptic shows the SO private objects, SoftHSM does not. Either
    // way nothing readable comes out.
    session
        .login(UserType::So, Some(&s.so_pin))
        .unwrap();
    for candidate in session.find_objects(&[]).unwrap() {
        assert_unwrap_refused(s, &session, backup, candidate, "the SO");
    }
    let secret_keys = session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .unwrap();
    for candidate in secret_keys {
        assert_no_decrypting_copy(&session, candidate, &format!("{name}: the SO"));
    }
    session.logout().unwrap();
    drop(session);

    // The user: the KEK's unwrap template and allowed mechanisms hold.
    let user = login_user(&s.module, &s.token, &s.pin).unwrap();
    let kek = find_kek(&s.module, &user, &s.token, KEK, true).unwrap();
    assert_unwrap_refused(s, &user, backup, kek.handle, "the user");
    assert_no_decrypting_copy(&user, kek.handle, &format!("{name}: the user"));
    assert!(
        user.update_attributes(kek.handle, &[Attribute::Decrypt(true)])
            .is_err(),
        "{name}: the user gave the KEK CKA_DECRYPT"
    );
    assert!(kek
        .allowed_mechanisms
        .is_some_and(|list| {
            !list.is_empty()
                && list.iter().all(|m| {
                    KeyWrap::ALL
                        .iter()
                        .any(|w| w.mechanism_type() == *m)
                })
        }));
    let oracle = user.unwrap_key(
        &Mechanism::AesCbc([0; 16]),
        kek.handle,
        &backup.wrapped[..16],
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ],
    );
    assert!(
        oracle.is_err(),
        "{name}: a CBC unwrap under the KEK succeeded"
    );
}

/// The route by which a token gives away a sensitive key's value: `CKM_CONCATENATE_BASE_AND_KEY`
/// with a key that is sensitive and may not derive as its second key. The derived key holds the
/// base's byte and the victim's 16 bytes (`CKA_VALUE_LEN` 17), whether or not it is readable.
fn assert_sensitive_values_leak(s: &Setup) {
    let user = login_user(&s.module, &s.token, &s.pin).unwrap();
    let victim = user
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Value(vec![0x5a; 16]),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Derive(false),
        ])
        .unwrap();
    let base = user
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Value(vec![0]),
            Attribute::Derive(true),
        ])
        .unwrap();
    let derived = user
        .derive_key(
            &Mechanism::ConcatenateBaseAndKey(victim),
            base,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
            ],
        )
        .expect("the token refused the derivation it was refused for");
    let len = user
        .get_attributes(derived, &[cryptoki::object::AttributeType::ValueLen])
        .unwrap();
    assert!(
        matches!(len.as_slice(), [Attribute::ValueLen(n)] if u64::from(*n) == 17),
        "{len:?}"
    );
}

/// A copy of `object` that may decrypt (and so undo the key wrap) must be refused.
fn assert_no_decrypting_copy(session: &Session, object: cryptoki::object::ObjectHandle, who: &str) {
    for change in [
        vec![Attribute::Token(false), Attribute::Decrypt(true)],
        vec![Attribute::Token(false), Attribute::Modifiable(true)],
        vec![Attribute::Token(false), Attribute::Extractable(true)],
        vec![Attribute::Token(false), Attribute::Sensitive(false)],
    ] {
        if let Ok(copy) = session.copy_object(object, &change) {
            panic!("{who} copied object {object} with {change:?}: {copy}");
        }
    }
}

/// Unwrapping `backup` under `key` into a readable key must fail, with each RFC 5649 form the
/// token offers.
fn assert_unwrap_refused(
    s: &Setup,
    session: &Session,
    backup: &Backup,
    key: cryptoki::object::ObjectHandle,
    who: &str,
) {
    let as_attrs = |template: &[Attribute]| {
        template
            .iter()
            .map(Attr::from)
            .collect::<Vec<_>>()
    };
    // A readable private key; a public one; and a locked secret whose value a derivation could copy out
    // (kryoptic's CKM_XOR_BASE_AND_DATA) or an HMAC could test byte by byte.
    let templates = [
        as_attrs(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ]),
        // Locked, but public: anyone could sign with it without a PIN.
        as_attrs(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Derive(false),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::SignRecover(false),
        ]),
        as_attrs(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Derive(true),
            Attribute::Sign(true),
        ]),
    ];
    let raw = raw_calls(&s.module, session, "test").unwrap();
    for (mechanism, template) in KeyWrap::ALL
        .into_iter()
        .flat_map(|m| templates.iter().map(move |t| (m, t)))
    {
        let result = raw.unwrap_key(
            session,
            mechanism.mechanism_type(),
            key,
            &backup.wrapped,
            template,
        );
        if let Ok(handle) = result {
            panic!(
                "{}: {who} unwrapped the backup with {} under object {key} into {template:?}: \
                 {handle}",
                s.stack.name,
                mechanism.name()
            );
        }
    }
}

/// A ceremony's shares import the same KEK again (here under a second label on the same
/// token): the check values agree, and a backup made under one KEK restores under the other.
fn ceremony_import(name: &'static str) {
    let Some(s) = setup(name) else { return };
    let case = s
        .stack
        .case("backup: 2-of-3 ceremony, import, restore under the imported KEK");
    let out_dir = s.stack.path().join("shares");
    let ceremony = match kek_ceremony(&s.module, &s.token, &s.pin, &s.so_pin, KEK, 3, 2, &out_dir) {
        Ok(c) => c,
        Err(e @ Error::MechanismMissing { .. }) => return case.skip(&e.to_string()),
        Err(e @ Error::LeakyToken { .. }) => {
            assert_sensitive_values_leak(&s);
            assert!(
                !out_dir.exists(),
                "{name}: the refused ceremony left its output directory"
            );
            println!("{name}: ceremony refused, rightly: {e}");
            return case.pass();
        }
        Err(Error::Pkcs11(e @ pkcs11::Error::SeparateInstance { .. })) => {
            println!("{name}: ceremony refused: {e}");
            return case.pass();
        }
        Err(e) => panic!("{name}: ceremony: {e}"),
    };
    let (imported, check_value) = import_kek_from_shares(
        &s.module,
        &s.token,
        &s.pin,
        &s.so_pin,
        "imported-kek",
        &[ceremony.files[0].clone(), ceremony.files[2].clone()],
    )
    .unwrap();
    assert_eq!(check_value, ceremony.check_value);
    assert!(imported.trusted && imported.private && !imported.extractable);
    assert_eq!(imported.unwrap_template, UnwrapTemplate::Locks);

    let user = login_user(&s.module, &s.token, &s.pin).unwrap();
    generate_key_pair(
        &user,
        &s.token.label,
        "tls",
        KeySpec(KeyKind::Ec(Curve::P384)),
        None,
        BackupPolicy::WrapWithTrusted,
    )
    .unwrap();
    let backup = create_backup(
        &s.module,
        &user,
        &s.token,
        &"tls".parse::<KeySelector>().unwrap(),
        KEK,
    )
    .unwrap();
    let report = verify_backup(&s.module, &user, &s.token, &backup, "imported-kek").unwrap();
    println!(
        "{name}: a backup under `{KEK}` verified under `imported-kek` ({})",
        report.scheme_name()
    );
    case.pass();
}

#[test]
fn softhsm_round_trip_and_attack() {
    round_trip_and_attack("softhsm");
}

#[test]
fn kryoptic_round_trip_and_attack() {
    round_trip_and_attack("kryoptic");
}

#[test]
fn tpm_round_trip_and_attack() {
    round_trip_and_attack("tpm");
}

#[test]
fn p11kit_round_trip_and_attack() {
    round_trip_and_attack("p11kit");
}

#[test]
fn softhsm_ceremony_import() {
    ceremony_import("softhsm");
}

#[test]
fn kryoptic_ceremony_import() {
    ceremony_import("kryoptic");
}

/// A backup made on SoftHSM, which names RFC 5649 `CKM_AES_KEY_WRAP_PAD`, restores on kryoptic,
/// which offers it only as `CKM_AES_KEY_WRAP_KWP`; the two HSMs share a KEK from one ceremony.
#[test]
fn softhsm_backup_restores_on_kryoptic() {
    let Some(b) = setup("kryoptic") else { return };
    let case = b
        .stack
        .case("backup: a SoftHSM backup (CKM_AES_KEY_WRAP_PAD) restores here");
    let (hsm, a_token) = common::TestHsm::with_token("hsm-a");
    hsm.use_in_this_process();
    let a_module = Module::load(&hsm.module).unwrap();
    let a = find_token(&a_module, &TokenSelector::Label(a_token.label.clone())).unwrap();
    let a_pin = SecretString::from(a_token.user_pin());
    let a_so_pin = SecretString::from(a_token.so_pin());

    let ceremony = kek_ceremony(
        &a_module,
        &a,
        &a_pin,
        &a_so_pin,
        KEK,
        3,
        2,
        &hsm.path().join("shares"),
    )
    .unwrap();
    let imported = import_kek_from_shares(
        &b.module,
        &b.token,
        &b.pin,
        &b.so_pin,
        KEK,
        &[ceremony.files[1].clone(), ceremony.files[2].clone()],
    );
    let check_value = match imported {
        Ok((_, check_value)) => check_value,
        Err(e @ Error::LeakyToken { .. }) => {
            // This token would give the KEK away, and with it every SoftHSM backup.
            assert_sensitive_values_leak(&b);
            println!("kryoptic: import refused, rightly: {e}");
            return case.pass();
        }
        Err(e) => panic!("kek import: {e}"),
    };
    assert_eq!(check_value, ceremony.check_value);

    let a_user = login_user(&a_module, &a, &a_pin).unwrap();
    let original = generate_key_pair(
        &a_user,
        &a.label,
        "tls",
        KeySpec(KeyKind::Ec(Curve::P256)),
        None,
        BackupPolicy::WrapWithTrusted,
    )
    .unwrap();
    let backup = create_backup(&a_module, &a_user, &a, &"tls".parse().unwrap(), KEK).unwrap();
    assert_eq!(backup.mechanism, KeyWrap::Pad);

    let b_user = login_user(&b.module, &b.token, &b.pin).unwrap();
    let restored = restore_backup(
        &b.module,
        &b_user,
        &b.token,
        &backup,
        KEK,
        BackupPolicy::None,
    )
    .unwrap();
    assert_eq!(restored.key.spki, original.spki);
    assert!(restored.key.sensitive && !restored.key.extractable);
    println!(
        "kryoptic: restored a SoftHSM backup, test signature {} verified",
        restored.scheme_name()
    );
    case.pass();
}
