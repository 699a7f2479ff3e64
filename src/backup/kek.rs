//! The key-encryption key (KEK): an AES-256 key on the token that wraps private keys for backup.
//!
//! A KEK is sensitive, never extractable, wrap/unwrap only, trusted and private. PKCS#11 lets
//! only the security officer set `CKA_TRUSTED`. Where the SO may create private objects
//! (kryoptic) the SO makes the KEK in place, non-modifiable and non-copyable. Where it may not
//! (SoftHSM answers `CKR_USER_NOT_LOGGED_IN`), the SO makes it as a public *session* object,
//! which only this process can see and which vanishes with its session; the user then copies it
//! (`C_CopyObject`) into a private token object that can no longer be modified, and the session
//! object is destroyed. Every attribute is read back afterwards, and a trial copy that would add
//! `CKA_DECRYPT` must be refused.
//!
//! The KEK's `CKA_UNWRAP_TEMPLATE` forces every key it unwraps to be sensitive and
//! non-extractable, whatever template the caller of `C_UnwrapKey` gives, and its
//! `CKA_ALLOWED_MECHANISMS` lets it serve only RFC 5649: with the user PIN, a backup still
//! cannot be unwrapped into a readable key, nor the KEK used as a block decryption oracle
//! (unwrapping with `CKM_AES_CBC`).

use std::fmt;
use std::str::FromStr;

use aes::cipher::{BlockEncrypt, KeyInit};
use cryptoki::error::RvError;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use secrecy::SecretString;
use zeroize::Zeroizing;

use super::probe::refuse_leaky_token;
use super::wrap::{KeyWrap, Op};
use super::Error;
use crate::pkcs11::ext::{raw_calls, sys, ulongs_from_bytes, Attr, Functions, Value};
use crate::pkcs11::{self, login_user, rv_of, Module, PinState, Token};

/// The KEK length in bytes: AES-256.
pub const KEK_LEN: usize = 32;

/// A key check value: the first 3 bytes of AES-ECB encryption of a zero block under the key.
///
/// This is the common KCV of payment HSMs and `CKA_CHECK_VALUE` (PKCS#11 3.0 §4.10). It lets
/// custodians confirm two tokens hold the same key without revealing it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct CheckValue(pub [u8; 3]);

impl CheckValue {
    /// Computes the check value of an AES-256 key in software.
    pub fn of_aes256(key: &[u8; KEK_LEN]) -> Self {
        let cipher = aes::Aes256::new(key.into());
        let mut block = aes::Block::default();
        cipher.encrypt_block(&mut block);
        Self([block[0], block[1], block[2]])
    }
}

impl fmt::Display for CheckValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for CheckValue {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s).map_err(|_| format!("check value `{s}` is not hexadecimal"))?;
        let bytes: [u8; 3] = bytes
            .try_into()
            .map_err(|_| format!("check value `{s}` is not 3 bytes"))?;
        Ok(Self(bytes))
    }
}

/// What a KEK's `CKA_UNWRAP_TEMPLATE` does to the keys it unwraps.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum UnwrapTemplate {
    /// It forces every unwrapped key to be sensitive and non-extractable.
    Locks,
    /// There is none, or it lets an unwrapped key be readable or extractable.
    Weak,
    /// It cannot be read through this module (one that gives each caller its own instance).
    Unknown,
}

impl UnwrapTemplate {
    fn of(template: Option<&[(sys::CK_ATTRIBUTE_TYPE, Vec<u8>)]>) -> Self {
        let found = template.unwrap_or_default();
        let holds = |wanted: &Attr| {
            found.iter().any(|(kind, value)| {
                *kind == wanted.kind
                    && match &wanted.value {
                        Value::Bool(b) => value.len() == 1 && (value[0] != 0) == *b,
                        Value::Ulong(n) => ulongs_from_bytes(value).as_deref() == Some(&[*n]),
                        _ => false,
                    }
            })
        };
        if locked_unwrap_template()
            .iter()
            .all(holds)
        {
            Self::Locks
        } else {
            Self::Weak
        }
    }
}

/// The template every KEK made here carries as `CKA_UNWRAP_TEMPLATE`: whatever it unwraps is a
/// private key, a private object that needs a login, stays sensitive and in the token, and is
/// made unable to derive (a derivation could copy out a secret key's value, as kryoptic's
/// `CKM_XOR_BASE_AND_DATA` would), decrypt, unwrap or sign with recovery. (SoftHSM refuses
/// `CKA_MODIFIABLE=false` and `CKA_COPYABLE=false` in an unwrap, so a PIN holder can later
/// switch those usages on; sensitivity and extractability only ever tighten.)
pub fn locked_unwrap_template() -> Vec<Attr> {
    vec![
        Attr::ulong(sys::CKA_CLASS, sys::CKO_PRIVATE_KEY),
        Attr::bool(sys::CKA_PRIVATE, true),
        Attr::bool(sys::CKA_SENSITIVE, true),
        Attr::bool(sys::CKA_EXTRACTABLE, false),
        Attr::bool(sys::CKA_DERIVE, false),
        Attr::bool(sys::CKA_DECRYPT, false),
        Attr::bool(sys::CKA_UNWRAP, false),
        Attr::bool(sys::CKA_SIGN_RECOVER, false),
    ]
}

/// A KEK found on a token, with the attributes that decide whether it may be used.
#[derive(Clone, Debug)]
pub struct KekObject {
    /// The object's handle in the current module generation.
    pub handle: ObjectHandle,
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_CHECK_VALUE`, when the token offers it.
    pub check_value: Option<CheckValue>,
    /// `CKA_KEY_TYPE` is `CKK_AES` and `CKA_VALUE_LEN` is 32.
    pub is_aes256: bool,
    /// `CKA_TRUSTED`.
    pub trusted: bool,
    /// `CKA_PRIVATE`.
    pub private: bool,
    /// `CKA_SENSITIVE`.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`.
    pub extractable: bool,
    /// `CKA_WRAP`.
    pub wrap: bool,
    /// `CKA_UNWRAP`.
    pub unwrap: bool,
    /// `CKA_ENCRYPT` or `CKA_DECRYPT`: such a key could decrypt wrapped keys block by block.
    pub encrypt_or_decrypt: bool,
    /// `CKA_MODIFIABLE`.
    pub modifiable: bool,
    /// What its `CKA_UNWRAP_TEMPLATE` does to unwrapped keys.
    pub unwrap_template: UnwrapTemplate,
    /// `CKA_ALLOWED_MECHANISMS`, when it has one and it can be read.
    pub allowed_mechanisms: Option<Vec<sys::CK_MECHANISM_TYPE>>,
}

impl KekObject {
    /// Refuses a KEK that must not wrap a key for backup: untrusted, not AES-256, not wrap-only,
    /// not private, modifiable, able to serve other mechanisms than RFC 5649, copyable with new
    /// rights (tried on `session`), or without the unwrap template that locks what it unwraps.
    ///
    /// A KEK that someone could change or copy, or that the security officer could have planted
    /// as a public object, could later decrypt the backups made under it.
    pub fn check_for_wrap(&self, session: &Session, token: &Token) -> Result<(), Error> {
        if !self.trusted {
            return Err(self.unfit(
                token,
                "CKA_TRUSTED=false: keys generated with backup policy wrap-with-trusted can be \
                 wrapped only under a key the security officer marked trusted; make the KEK with \
                 `rustls-hsm kek create`, `kek ceremony` or `kek import`",
            ));
        }
        self.check_common(token)?;
        if !self.wrap {
            return Err(self.unfit(token, "CKA_WRAP=false: it cannot wrap keys"));
        }
        const REMAKE: &str = "; make the KEK with `rustls-hsm kek create`, `kek ceremony` or \
                              `kek import`";
        if !self.private {
            return Err(self.unfit(
                token,
                &format!("CKA_PRIVATE=false: anyone with the token could use it{REMAKE}"),
            ));
        }
        if self.modifiable {
            return Err(self.unfit(
                token,
                &format!(
                    "CKA_MODIFIABLE=true: it could be given CKA_DECRYPT and decrypt backups{REMAKE}"
                ),
            ));
        }
        let rfc5649_only = self
            .allowed_mechanisms
            .as_deref()
            .is_some_and(|list| {
                !list.is_empty()
                    && list.iter().all(|m| {
                        KeyWrap::ALL
                            .iter()
                            .any(|w| w.mechanism_type() == *m)
                    })
            });
        if !rfc5649_only && self.unwrap_template != UnwrapTemplate::Unknown {
            return Err(self.unfit(
                token,
                &format!(
                    "its CKA_ALLOWED_MECHANISMS does not restrict it to RFC 5649, so it could \
                     unwrap with CBC or ECB as a decryption oracle{REMAKE}"
                ),
            ));
        }
        refuse_copies_with_new_rights(session, self, token)?;
        match self.unwrap_template {
            UnwrapTemplate::Locks => {}
            UnwrapTemplate::Weak => {
                return Err(self.unfit(
                    token,
                    "its CKA_UNWRAP_TEMPLATE does not lock what it unwraps (a sensitive, \
                     non-extractable private key that cannot derive, decrypt or unwrap), so a \
                     holder of the user PIN could unwrap a backup into a readable key; make a \
                     KEK with `rustls-hsm kek create`, `kek ceremony` or `kek import`",
                ))
            }
            UnwrapTemplate::Unknown => tracing::warn!(
                kek = %self.label,
                "the KEK's CKA_UNWRAP_TEMPLATE cannot be read through this module; it is \
                 checked where the token's own module is loaded"
            ),
        }
        Ok(())
    }

    /// Refuses a KEK that cannot unwrap a backup.
    pub fn check_for_unwrap(&self, token: &Token) -> Result<(), Error> {
        self.check_common(token)?;
        if !self.unwrap {
            return Err(self.unfit(token, "CKA_UNWRAP=false: it cannot unwrap keys"));
        }
        Ok(())
    }

    fn check_common(&self, token: &Token) -> Result<(), Error> {
        if !self.is_aes256 {
            return Err(self.unfit(token, "it is not an AES-256 key"));
        }
        if !self.sensitive || self.extractable {
            return Err(self.unfit(
                token,
                "it is extractable or not sensitive, so its value could leave the token",
            ));
        }
        if self.encrypt_or_decrypt {
            return Err(self.unfit(
                token,
                "CKA_ENCRYPT or CKA_DECRYPT is set, so it could decrypt wrapped keys block by \
                 block; a KEK must be wrap/unwrap only",
            ));
        }
        Ok(())
    }

    fn unfit(&self, token: &Token, reason: &str) -> Error {
        Error::KekUnfit {
            label: self.label.clone(),
            token: token.describe(),
            reason: reason.to_owned(),
        }
    }

    /// The check value as text, or a word saying the token does not give one.
    pub fn check_value_text(&self) -> String {
        self.check_value.map_or_else(
            || "unavailable (the token has no CKA_CHECK_VALUE)".into(),
            |v| v.to_string(),
        )
    }
}

/// Finds the one private secret key labelled `label` and reads its attributes.
///
/// Public secret keys with the label are passed over (and logged): anyone may create one, and
/// a KEK must not be usable without a PIN.
///
/// `logged_in` says whether `session` is logged in: a KEK is a private object, invisible
/// otherwise, and the error says so.
pub fn find_kek(
    module: &Module,
    session: &Session,
    token: &Token,
    label: &str,
    logged_in: bool,
) -> Result<KekObject, Error> {
    let (private, public) = secret_keys_labelled(session, label)?;
    let not_found = |reason: String| Error::KekNotFound {
        label: label.to_owned(),
        token: token.describe(),
        reason,
    };
    if public > 0 {
        tracing::warn!(
            label,
            public,
            "ignored public secret keys carrying the KEK label: usable without a PIN, never a KEK"
        );
    }
    match private.as_slice() {
        [handle] => read_kek(module, session, *handle),
        [] if public > 0 => Err(not_found(format!(
            "only {public} public secret key(s) carry this label, and a public object is usable \
             without any PIN, so it cannot be a KEK (one made by rustls-hsm is private); remove \
             it with the token's tools and name the real KEK"
        ))),
        [] if logged_in => Err(not_found(
            "there is none; make one with `rustls-hsm kek create`, `kek ceremony` or `kek import`"
                .into(),
        )),
        [] => Err(not_found(
            "the session is not logged in, and a KEK is a private object".into(),
        )),
        many => Err(not_found(format!(
            "{} private secret keys carry this label; KEK labels must be unique",
            many.len()
        ))),
    }
}

/// The private secret keys labelled `label`, and how many public ones carry it too.
///
/// A public secret key is usable without any PIN, so it is never a KEK, whoever made it: one
/// carrying the label (anyone may create public objects) neither blocks nor stands in.
fn secret_keys_labelled(
    session: &Session,
    label: &str,
) -> Result<(Vec<ObjectHandle>, usize), Error> {
    let find = |private: bool| {
        session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Private(private),
            ])
            .map_err(pkcs11::Error::pkcs11("find key-encryption keys"))
    };
    Ok((find(true)?, find(false)?.len()))
}

/// Creates a KEK on the token: generated there (`value` = `None`) or imported from `value`.
///
/// The user logs in first to check that no secret key has the label; the security officer then
/// makes the KEK as a public session object with `CKA_TRUSTED=true`, and the user copies it into
/// a private token object with `CKA_MODIFIABLE=false` and destroys the session object. The new
/// KEK's attributes are read back, and with an imported value its `CKA_CHECK_VALUE` (where the
/// token gives one) must match the check value computed here; a KEK failing a check is
/// destroyed. PINs locked or on their final try are not tried.
pub fn create_kek(
    module: &Module,
    token: &Token,
    user_pin: &SecretString,
    so_pin: &SecretString,
    label: &str,
    value: Option<&Zeroizing<[u8; KEK_LEN]>>,
) -> Result<KekObject, Error> {
    check_kek_can_be_made(module, token, user_pin, label)?;

    let so = login_so(module, token, so_pin)?;
    let mechanisms = kek_mechanisms(module, &so, token)?;
    // Where the SO may make private objects (kryoptic), the KEK is made in place, private and
    // with CKA_COPYABLE=false; elsewhere (SoftHSM) as a public session object that the user
    // copies into a private one.
    let make = |storage| make_kek(module, &so, token, label, value, &mechanisms, storage);
    let temporary = match make(Storage::PrivateToken) {
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(error = %e, "the SO cannot make the KEK in place; making a session object to copy");
            Some(make(Storage::PublicSession)?)
        }
    };
    logout(&so)?;

    let user = login_user(module, token, user_pin)?;
    let copied = match temporary {
        None => find_kek(module, &user, token, label, true)?.handle,
        Some(temporary) => {
            let copied = user
                .copy_object(
                    temporary,
                    &[
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Modifiable(false),
                    ],
                )
                .map_err(pkcs11::Error::pkcs11(
                    "copy the new KEK into a private token object (C_CopyObject)",
                ))?;
            if let Err(e) = user.destroy_object(temporary) {
                tracing::debug!(error = %e, "the KEK's session object goes with its session instead");
            }
            copied
        }
    };
    drop(so);

    let checked = read_kek(module, &user, copied).and_then(|kek| {
        check_created(&kek, token, value, &mechanisms)?;
        refuse_copies_with_new_rights(&user, &kek, token)?;
        Ok(kek)
    });
    if checked.is_err() {
        if let Err(e) = user.destroy_object(copied) {
            tracing::warn!(error = %e, "could not destroy a rejected key-encryption key");
        }
    }
    checked
}

/// Checks, as the user, everything that would stop a KEK from being made: an empty or taken
/// label, a token that cannot keep it secret, no RFC 5649 key wrap. A ceremony runs this before
/// anything is written.
pub(crate) fn check_kek_can_be_made(
    module: &Module,
    token: &Token,
    user_pin: &SecretString,
    label: &str,
) -> Result<(), Error> {
    if label.is_empty() {
        return Err(Error::Refused(
            "a key-encryption key needs a non-empty label".into(),
        ));
    }
    let user = login_user(module, token, user_pin)?;
    refuse_existing(&user, token, label)?;
    refuse_leaky_token(module, &user, token)?;
    kek_mechanisms(module, &user, token)?;
    logout(&user)
}

/// Opens a read-write session and logs the security officer in, unless the SO PIN is locked or
/// on its final try.
fn login_so(module: &Module, token: &Token, so_pin: &SecretString) -> Result<Session, Error> {
    let info = token.refresh(module)?;
    let refusal = match PinState::so(&info) {
        PinState::Locked => Some("the SO PIN is locked"),
        PinState::FinalTry => Some(
            "the SO PIN is on its final try and a wrong PIN would lock it; leave the last try to \
             a person",
        ),
        PinState::CountLow | PinState::Ok => None,
    };
    if let Some(reason) = refusal {
        return Err(pkcs11::Error::LoginRefused {
            token: token.describe(),
            reason,
        }
        .into());
    }
    let session = module
        .context()
        .open_rw_session(token.slot)
        .map_err(pkcs11::Error::pkcs11("open a read-write session"))?;
    pkcs11::login_so_on(&session, token, so_pin)?;
    Ok(session)
}

fn logout(session: &Session) -> Result<(), Error> {
    match session.logout() {
        Ok(()) => Ok(()),
        Err(e) if rv_of(&e) == Some(RvError::UserNotLoggedIn) => Ok(()),
        Err(e) => Err(pkcs11::Error::pkcs11("log out")(e).into()),
    }
}

fn refuse_existing(session: &Session, token: &Token, label: &str) -> Result<(), Error> {
    pkcs11::check_label("the KEK label", label).map_err(Error::Refused)?;
    // A public secret key with the label is no KEK and is passed over by every lookup.
    let (found, _public) = secret_keys_labelled(session, label)?;
    if found.is_empty() {
        Ok(())
    } else {
        Err(Error::KekExists {
            label: label.to_owned(),
            token: token.describe(),
        })
    }
}

/// The RFC 5649 mechanisms the KEK may serve: those the token offers for wrapping or unwrapping.
fn kek_mechanisms(
    module: &Module,
    session: &Session,
    token: &Token,
) -> Result<Vec<sys::CK_MECHANISM_TYPE>, Error> {
    let mut mechanisms: Vec<_> = KeyWrap::offered(module, session, token, Op::Wrap)
        .into_iter()
        .chain(KeyWrap::offered(module, session, token, Op::Unwrap))
        .map(KeyWrap::mechanism_type)
        .collect();
    mechanisms.sort_unstable();
    mechanisms.dedup();
    if mechanisms.is_empty() {
        // Names the missing mechanisms.
        KeyWrap::choose(module, session, token, Op::Wrap, None)?;
    }
    Ok(mechanisms)
}

/// Where the SO makes the KEK.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Storage {
    /// In place: a private, non-modifiable, non-copyable token object.
    PrivateToken,
    /// A public session object, gone when the session closes, for the user to copy.
    PublicSession,
}

/// The SO's KEK: trusted, wrap/unwrap only.
///
/// Its `CKA_UNWRAP_TEMPLATE` and `CKA_ALLOWED_MECHANISMS` are beyond cryptoki, so it is made
/// through the module's own functions.
fn make_kek(
    module: &Module,
    so: &Session,
    token: &Token,
    label: &str,
    value: Option<&Zeroizing<[u8; KEK_LEN]>>,
    mechanisms: &[sys::CK_MECHANISM_TYPE],
    storage: Storage,
) -> Result<ObjectHandle, Error> {
    let raw = raw_calls(
        module,
        so,
        "give a key-encryption key its CKA_UNWRAP_TEMPLATE",
    )?;
    let mut template: Vec<Attr> = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Trusted(true),
    ]
    .iter()
    .chain(match storage {
        Storage::PrivateToken => &[
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(false),
            Attribute::Copyable(false),
        ][..],
        Storage::PublicSession => &[Attribute::Token(false), Attribute::Private(false)][..],
    })
    .map(Attr::from)
    .collect();
    template.push(Attr::template(
        sys::CKA_UNWRAP_TEMPLATE,
        locked_unwrap_template(),
    ));
    template.push(Attr::ulongs(sys::CKA_ALLOWED_MECHANISMS, mechanisms));
    let made = match value {
        None => {
            template.push(Attr::ulong(sys::CKA_VALUE_LEN, KEK_LEN as sys::CK_ULONG));
            raw.generate_key(so, sys::CKM_AES_KEY_GEN, &template)
                .map_err(pkcs11::Error::pkcs11(
                    "generate the KEK (C_GenerateKey, SO session)",
                ))
                .map_err(Error::from)
        }
        Some(value) => {
            let mut create = template.clone();
            // The attribute's bytes are zeroized when the template is dropped.
            create.push(Attr::bytes(sys::CKA_VALUE, value.to_vec()));
            match raw.create_object(so, &create) {
                // kryoptic 1.5.4 refuses CKA_TRUSTED from C_CreateObject but takes it from
                // C_UnwrapKey: carry the value in under a one-time transport key.
                Err(e) if rv_of(&e) == Some(RvError::AttributeTypeInvalid) => {
                    tracing::debug!(
                        "the token refuses CKA_TRUSTED on C_CreateObject; importing the KEK \
                         through C_UnwrapKey"
                    );
                    import_by_unwrap(module, so, &raw, token, &template, value)
                }
                other => other
                    .map_err(pkcs11::Error::pkcs11(
                        "import the KEK (C_CreateObject, SO session)",
                    ))
                    .map_err(Error::from),
            }
        }
    };
    made
}

/// Refuses a KEK that can be copied with new rights: such a copy (say with `CKA_DECRYPT=true`)
/// would decrypt backups, whatever the original's attributes say. Tried with a session copy,
/// which is destroyed at once if the token allows it.
fn refuse_copies_with_new_rights(
    session: &Session,
    kek: &KekObject,
    token: &Token,
) -> Result<(), Error> {
    let copy = session.copy_object(
        kek.handle,
        &[Attribute::Token(false), Attribute::Decrypt(true)],
    );
    match copy {
        Err(_) => Ok(()),
        Ok(handle) => {
            if let Err(e) = session.destroy_object(handle) {
                tracing::warn!(error = %e, "a KEK's trial copy goes with its session instead");
            }
            Err(kek.unfit(
                token,
                "the token lets anyone logged in copy it with CKA_DECRYPT=true (it honours \
                 neither CKA_MODIFIABLE=false nor CKA_COPYABLE=false on C_CopyObject), and such \
                 a copy would decrypt backups",
            ))
        }
    }
}

/// Imports `value` with `template` through `C_UnwrapKey` under a one-time transport key: an AES
/// session object whose random value exists only in this process and which is destroyed at once.
/// The value is wrapped for it in software with RFC 5649.
fn import_by_unwrap(
    module: &Module,
    so: &Session,
    raw: &Functions,
    token: &Token,
    template: &[Attr],
    value: &Zeroizing<[u8; KEK_LEN]>,
) -> Result<ObjectHandle, Error> {
    let mechanism = KeyWrap::choose(module, so, token, Op::Unwrap, None)?;
    let mut transport = Zeroizing::new([0u8; KEK_LEN]);
    getrandom::getrandom(transport.as_mut_slice())
        .map_err(|e| Error::Refused(format!("the system's random generator: {e}")))?;
    let mut wrapped = Zeroizing::new([0u8; KEK_LEN + 8]);
    aes_kw::KekAes256::new(transport.as_ref().into())
        .wrap_with_padding(value.as_slice(), wrapped.as_mut_slice())
        .map_err(|e| Error::Refused(format!("wrapping the KEK for transport: {e}")))?;
    let transport_key = raw
        .create_object(
            so,
            &[
                Attr::ulong(sys::CKA_CLASS, sys::CKO_SECRET_KEY),
                Attr::ulong(sys::CKA_KEY_TYPE, sys::CKK_AES),
                Attr::bool(sys::CKA_TOKEN, false),
                Attr::bool(sys::CKA_PRIVATE, false),
                Attr::bool(sys::CKA_SENSITIVE, true),
                Attr::bool(sys::CKA_EXTRACTABLE, false),
                Attr::bool(sys::CKA_UNWRAP, true),
                Attr::bool(sys::CKA_WRAP, false),
                Attr::bool(sys::CKA_ENCRYPT, false),
                Attr::bool(sys::CKA_DECRYPT, false),
                Attr::bytes(sys::CKA_VALUE, transport.to_vec()),
            ],
        )
        .map_err(pkcs11::Error::pkcs11(
            "create the one-time transport key (C_CreateObject)",
        ))?;
    let imported = raw
        .unwrap_key(
            so,
            mechanism.mechanism_type(),
            transport_key,
            wrapped.as_slice(),
            template,
        )
        .map_err(pkcs11::Error::pkcs11(
            "import the KEK (C_UnwrapKey under a transport key, SO session)",
        ))
        .map_err(Error::from);
    if let Err(e) = so.destroy_object(transport_key) {
        tracing::warn!(error = %e, "the transport key goes with its session instead");
    }
    imported
}

fn check_created(
    kek: &KekObject,
    token: &Token,
    value: Option<&Zeroizing<[u8; KEK_LEN]>>,
    mechanisms: &[sys::CK_MECHANISM_TYPE],
) -> Result<(), Error> {
    let checks = [
        ("CKA_PRIVATE", kek.private, true),
        ("CKA_TRUSTED", kek.trusted, true),
        ("CKA_SENSITIVE", kek.sensitive, true),
        ("CKA_EXTRACTABLE", kek.extractable, false),
        ("CKA_WRAP", kek.wrap, true),
        ("CKA_UNWRAP", kek.unwrap, true),
        ("CKA_ENCRYPT or CKA_DECRYPT", kek.encrypt_or_decrypt, false),
        ("CKA_MODIFIABLE", kek.modifiable, false),
        ("CKK_AES with CKA_VALUE_LEN 32", kek.is_aes256, true),
        (
            "CKA_UNWRAP_TEMPLATE (sensitive, non-extractable)",
            kek.unwrap_template == UnwrapTemplate::Locks,
            true,
        ),
        (
            "CKA_ALLOWED_MECHANISMS (RFC 5649 only)",
            kek.allowed_mechanisms.as_deref() == Some(mechanisms),
            true,
        ),
    ];
    for (name, have, want) in checks {
        if have != want {
            return Err(kek.unfit(
                token,
                &format!(
                    "the token did not honour {name}={want} on the new KEK (it reads {have}); \
                     the KEK was destroyed"
                ),
            ));
        }
    }
    if let (Some(value), Some(on_token)) = (value, kek.check_value) {
        let computed = CheckValue::of_aes256(value);
        if computed != on_token {
            return Err(kek.unfit(
                token,
                &format!(
                    "the token reports check value {on_token} for the imported KEK, but its value \
                     has {computed}; the KEK was destroyed"
                ),
            ));
        }
    }
    Ok(())
}

fn read_kek(module: &Module, session: &Session, handle: ObjectHandle) -> Result<KekObject, Error> {
    let attrs = session
        .get_attributes(
            handle,
            &[
                AttributeType::Label,
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::CheckValue,
                AttributeType::Trusted,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Modifiable,
            ],
        )
        .map_err(pkcs11::Error::pkcs11("read the KEK's attributes"))?;
    let mut kek = KekObject {
        handle,
        label: String::new(),
        check_value: None,
        is_aes256: false,
        trusted: false,
        private: false,
        sensitive: false,
        extractable: true,
        wrap: false,
        unwrap: false,
        encrypt_or_decrypt: false,
        modifiable: true,
        unwrap_template: UnwrapTemplate::Unknown,
        allowed_mechanisms: None,
    };
    let (mut aes, mut len32) = (false, false);
    for attr in attrs {
        match attr {
            Attribute::Label(v) => kek.label = String::from_utf8_lossy(&v).into_owned(),
            Attribute::KeyType(t) => aes = t == KeyType::AES,
            Attribute::ValueLen(n) => len32 = u64::from(n) == KEK_LEN as u64,
            Attribute::CheckValue(v) => {
                kek.check_value = <[u8; 3]>::try_from(v.as_slice())
                    .ok()
                    .map(CheckValue)
            }
            Attribute::Trusted(b) => kek.trusted = b,
            Attribute::Private(b) => kek.private = b,
            Attribute::Sensitive(b) => kek.sensitive = b,
            Attribute::Extractable(b) => kek.extractable = b,
            Attribute::Wrap(b) => kek.wrap = b,
            Attribute::Unwrap(b) => kek.unwrap = b,
            Attribute::Encrypt(b) | Attribute::Decrypt(b) => kek.encrypt_or_decrypt |= b,
            Attribute::Modifiable(b) => kek.modifiable = b,
            _ => {}
        }
    }
    kek.is_aes256 = aes && len32;
    match raw_calls(module, session, "read a KEK's CKA_UNWRAP_TEMPLATE") {
        Ok(raw) => {
            let template = raw
                .template(session, handle, sys::CKA_UNWRAP_TEMPLATE)
                .map_err(pkcs11::Error::pkcs11("read the KEK's CKA_UNWRAP_TEMPLATE"))?;
            kek.unwrap_template = UnwrapTemplate::of(template.as_deref());
            kek.allowed_mechanisms = raw
                .attribute_bytes(session, handle, sys::CKA_ALLOWED_MECHANISMS)
                .map_err(pkcs11::Error::pkcs11(
                    "read the KEK's CKA_ALLOWED_MECHANISMS",
                ))?
                .and_then(|bytes| ulongs_from_bytes(&bytes))
                .filter(|list| !list.is_empty());
        }
        Err(pkcs11::Error::SeparateInstance { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(kek)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value_is_aes_ecb_of_a_zero_block() {
        // openssl enc -aes-256-ecb -nopad -K 0707...07 over 16 zero bytes starts 0a4dee.
        assert_eq!(CheckValue::of_aes256(&[7; 32]).to_string(), "0a4dee");
        assert_eq!(
            "0a4dee"
                .parse::<CheckValue>()
                .unwrap()
                .0,
            [0x0a, 0x4d, 0xee]
        );
        assert!("0a4d".parse::<CheckValue>().is_err());
        assert!("zzzzzz".parse::<CheckValue>().is_err());
    }
}
