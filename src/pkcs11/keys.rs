//! Finding key pairs on a token and reading their public halves as SubjectPublicKeyInfo.
//!
//! A selector must name exactly one private key: "the first match" is never used. Private
//! objects are visible only in a logged-in session, so "not logged in" is told apart from "no
//! such key".

use std::fmt;
use std::str::FromStr;

use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use der::asn1::{ObjectIdentifier, OctetStringRef, PrintableStringRef};
use der::Decode;
use sha2::{Digest, Sha256};
use spki::EncodePublicKey;

use super::token::trim_field;
use super::{Error, Pkcs11Uri, Token};

/// How to pick one key pair on a token.
///
/// Parsed from `pkcs11:object=...;id=...` (a URI), `id:HEX`, `label:NAME` or a plain label. A
/// URI's token attributes (`token=`, `serial=`) must match the token the key is looked up on
/// ([`find_key_on`]).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct KeySelector {
    /// `CKA_LABEL` to match exactly.
    pub label: Option<String>,
    /// `CKA_ID` to match exactly.
    pub id: Option<Vec<u8>>,
    /// The token label a URI named, if any.
    pub token: Option<String>,
    /// The token serial a URI named, if any.
    pub serial: Option<String>,
}

impl KeySelector {
    /// Selects by label.
    pub fn label(label: impl Into<String>) -> Self {
        Self {
            label: Some(label.into()),
            ..Self::default()
        }
    }

    /// Selects by `CKA_ID`.
    pub fn id(id: impl Into<Vec<u8>>) -> Self {
        Self {
            id: Some(id.into()),
            ..Self::default()
        }
    }

    /// Refuses a selector whose URI names another token than `token`.
    pub fn check_token(&self, token: &Token) -> Result<(), Error> {
        let mismatch = |what: &str, named: &str, have: &str| Error::KeySelector {
            selector: self.to_string(),
            reason: format!(
                "it names {what} `{named}`, but the key is looked up on token {} ({what} \
                 `{have}`); select that token, or drop {what} from the URI",
                token.describe()
            ),
        };
        if let Some(named) = &self.token {
            if trim_field(named) != token.label {
                return Err(mismatch("token", named, &token.label));
            }
        }
        if let Some(named) = &self.serial {
            if trim_field(named) != token.serial {
                return Err(mismatch("serial", named, &token.serial));
            }
        }
        Ok(())
    }

    pub(crate) fn template(&self, class: ObjectClass) -> Vec<Attribute> {
        let mut template = vec![Attribute::Class(class)];
        if let Some(label) = &self.label {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &self.id {
            template.push(Attribute::Id(id.clone()));
        }
        template
    }
}

impl FromStr for KeySelector {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| Error::KeySelector {
            selector: s.to_owned(),
            reason: reason.to_owned(),
        };
        let selector = if s.starts_with("pkcs11:") {
            let uri: Pkcs11Uri = s.parse()?;
            if let Some(kind) = uri.object_type.as_deref() {
                if !matches!(kind, "private" | "public" | "cert") {
                    return Err(bad(
                        "type= must be private, public or cert for a signing key",
                    ));
                }
            }
            Self {
                label: uri.object,
                id: uri.id,
                token: uri.token,
                serial: uri.serial,
            }
        } else if let Some(hex_id) = s.strip_prefix("id:") {
            let id = hex::decode(hex_id.trim_start_matches("0x"))
                .map_err(|_| bad("the id is not hexadecimal"))?;
            Self::id(id)
        } else {
            Self::label(s.strip_prefix("label:").unwrap_or(s))
        };
        if selector
            .label
            .as_deref()
            .is_none_or(str::is_empty)
            && selector
                .id
                .as_deref()
                .is_none_or(<[u8]>::is_empty)
        {
            return Err(bad(
                "name a key by label, id:HEX or a URI with object= or id=",
            ));
        }
        Ok(selector)
    }
}

impl fmt::Display for KeySelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.label, &self.id) {
            (Some(label), None) => write!(f, "label:{label}"),
            (None, Some(id)) => write!(f, "id:{}", hex::encode(id)),
            (Some(label), Some(id)) => write!(f, "label:{label} id:{}", hex::encode(id)),
            (None, None) => f.write_str("(nothing)"),
        }
    }
}

/// A named elliptic curve for ECDSA keys.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum Curve {
    /// NIST P-256 (secp256r1).
    P256,
    /// NIST P-384 (secp384r1).
    P384,
    /// NIST P-521 (secp521r1).
    P521,
}

impl Curve {
    /// The curve's OID.
    pub fn oid(self) -> ObjectIdentifier {
        match self {
            Self::P256 => const_oid::db::rfc5912::SECP_256_R_1,
            Self::P384 => const_oid::db::rfc5912::SECP_384_R_1,
            Self::P521 => const_oid::db::rfc5912::SECP_521_R_1,
        }
    }

    /// Bytes of one coordinate (and of each of r and s in a raw signature).
    pub fn field_len(self) -> usize {
        match self {
            Self::P256 => 32,
            Self::P384 => 48,
            Self::P521 => 66,
        }
    }

    fn from_oid(oid: ObjectIdentifier) -> Option<Self> {
        [Self::P256, Self::P384, Self::P521]
            .into_iter()
            .find(|c| c.oid() == oid)
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "prime256v1" | "secp256r1" | "P-256" => Some(Self::P256),
            "secp384r1" | "P-384" => Some(Self::P384),
            "secp521r1" | "P-521" => Some(Self::P521),
            _ => None,
        }
    }
}

/// What kind of key a pair is.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum KeyKind {
    /// ECDSA on a NIST curve.
    Ec(Curve),
    /// Ed25519.
    Ed25519,
    /// RSA with a modulus of this many bits.
    Rsa(usize),
}

impl KeyKind {
    /// The largest signature this key makes, in bytes (raw r‖s for ECDSA).
    pub fn signature_len(self) -> usize {
        match self {
            Self::Ec(curve) => 2 * curve.field_len(),
            Self::Ed25519 => 64,
            Self::Rsa(bits) => bits.div_ceil(8),
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ec(Curve::P256) => f.write_str("ec:p256"),
            Self::Ec(Curve::P384) => f.write_str("ec:p384"),
            Self::Ec(Curve::P521) => f.write_str("ec:p521"),
            Self::Ed25519 => f.write_str("ed25519"),
            Self::Rsa(bits) => write!(f, "rsa:{bits}"),
        }
    }
}

/// The object classes a URI's `type=` names.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ObjectClassName {
    /// `cert`
    Certificate,
    /// `private`
    Private,
    /// `public`
    Public,
}

/// A key pair found on a token, with the attributes that decide how it may be used.
#[derive(Clone, Debug)]
pub struct KeyObject {
    /// The private key's handle in the current module generation.
    pub private: ObjectHandle,
    /// The public key's handle, when the token holds one.
    pub public: Option<ObjectHandle>,
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_ID`.
    pub id: Vec<u8>,
    /// Key type and size.
    pub kind: KeyKind,
    /// The public key as DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// `CKA_SENSITIVE`.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`.
    pub extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE`.
    pub always_sensitive: bool,
    /// `CKA_NEVER_EXTRACTABLE`.
    pub never_extractable: bool,
    /// `CKA_LOCAL`: generated on the token; false means imported.
    pub local: bool,
    /// `CKA_SIGN`.
    pub sign: bool,
    /// `CKA_WRAP_WITH_TRUSTED`.
    pub wrap_with_trusted: bool,
    /// A certificate object with the same `CKA_ID` exists.
    pub has_certificate: bool,
}

impl KeyObject {
    /// SHA-256 of the SubjectPublicKeyInfo, lowercase hex.
    pub fn fingerprint(&self) -> String {
        spki_fingerprint(&self.spki)
    }

    /// One line for messages: label, id and type.
    pub fn describe(&self) -> String {
        format!(
            "`{}` (id {}, {})",
            printable(&self.label),
            hex::encode(&self.id),
            self.kind
        )
    }
}

/// A label (or other token text) as it may be printed: control characters escaped.
///
/// Labels made by other tools, or restored from a forged backup before labels were checked,
/// could otherwise rewrite the operator's terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped.into()
}

/// Refuses a label that is empty or holds control characters.
///
/// Labels are printed, and those in backup and share files are not authenticated: a control
/// character could rewrite the operator's terminal, so none is taken for a key rustls-hsm makes.
pub fn check_label(field: &str, label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err(format!(
            "{field} is empty; rustls-hsm finds keys by label, so it must name one"
        ));
    }
    if let Some(c) = label.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{field} {:?} holds the control character {:?}; use printable characters only",
            label, c
        ));
    }
    Ok(())
}

/// SHA-256 of a DER SubjectPublicKeyInfo, lowercase hex.
pub fn spki_fingerprint(spki: &[u8]) -> String {
    hex::encode(Sha256::digest(spki))
}

/// [`find_key`] on `token`, after checking that a URI selector names that token.
pub fn find_key_on(
    session: &Session,
    selector: &KeySelector,
    token: &Token,
    logged_in: bool,
) -> Result<KeyObject, Error> {
    selector.check_token(token)?;
    find_key(session, selector, &token.label, logged_in)
}

/// Finds the one private key that `selector` names, paired with its public half.
///
/// `logged_in` says whether `session` is logged in; when it is not and nothing is found, the
/// error says so instead of claiming the key does not exist.
pub fn find_key(
    session: &Session,
    selector: &KeySelector,
    token_label: &str,
    logged_in: bool,
) -> Result<KeyObject, Error> {
    let handles = session
        .find_objects(&selector.template(ObjectClass::PRIVATE_KEY))
        .map_err(Error::pkcs11("find private keys"))?;
    match handles.len() {
        0 => Err(Error::KeyNotFound {
            selector: selector.to_string(),
            token: token_label.to_owned(),
            hint: not_found_hint(session, selector, logged_in),
        }),
        1 => read_key(session, handles[0]),
        count => {
            let matches: Vec<String> = handles
                .iter()
                .map(|h| describe_handle(session, *h))
                .collect();
            Err(Error::KeyAmbiguous {
                selector: selector.to_string(),
                count,
                matches: matches.join(", "),
            })
        }
    }
}

/// Every private key on the token (the session must be logged in to see them).
pub fn list_keys(session: &Session) -> Result<Vec<Result<KeyObject, Error>>, Error> {
    let handles = session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .map_err(Error::pkcs11("find private keys"))?;
    Ok(handles
        .into_iter()
        .map(|h| read_key(session, h))
        .collect())
}

fn not_found_hint(session: &Session, selector: &KeySelector, logged_in: bool) -> String {
    if !logged_in {
        return ": the session is not logged in, and private keys are visible only after login"
            .into();
    }
    let public = session
        .find_objects(&selector.template(ObjectClass::PUBLIC_KEY))
        .map(|v| v.len())
        .unwrap_or(0);
    if public > 0 {
        " (a public key matches, but its private half is not on this token)".into()
    } else {
        String::new()
    }
}

fn describe_handle(session: &Session, handle: ObjectHandle) -> String {
    match read_key(session, handle) {
        Ok(key) => key.describe(),
        Err(e) => format!("(handle {handle}: {e})"),
    }
}

/// Reads a private key's attributes, pairs it with its public key and builds its SPKI.
pub(crate) fn read_key(session: &Session, private: ObjectHandle) -> Result<KeyObject, Error> {
    let attrs = session
        .get_attributes(
            private,
            &[
                AttributeType::Label,
                AttributeType::Id,
                AttributeType::KeyType,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Local,
                AttributeType::Sign,
                AttributeType::WrapWithTrusted,
            ],
        )
        .map_err(Error::pkcs11("read private key attributes"))?;
    let mut key = PrivateAttrs::default();
    for attr in attrs {
        key.absorb(attr);
    }
    let label = String::from_utf8_lossy(&key.label).into_owned();
    let public = find_public(session, &key.id, &label, key.key_type)?;
    let spki = match public {
        Some(handle) => spki_from_object(session, handle, &label),
        None => Err(Error::PublicKey {
            key: label.clone(),
            reason: "no public key object".into(),
        }),
    }
    .or_else(|e| spki_from_private(session, private, &label).map_err(|_| e))
    .or_else(|e| spki_from_certificate(session, &key.id).ok_or(e))
    .map_err(|e| Error::PublicKey {
        key: label.clone(),
        reason: format!(
            "{}; the public half is missing and cannot be rebuilt from the private object or a \
             certificate with the same CKA_ID: import the public key or its certificate",
            // The cause names the key already; keep only its reason so the key is named once.
            match e {
                Error::PublicKey { reason, .. } => reason,
                other => other.to_string(),
            }
        ),
    })?;
    let kind = kind_of_spki(&spki).ok_or_else(|| Error::PublicKey {
        key: label.clone(),
        reason: "unsupported key type (rustls-hsm serves ECDSA P-256/P-384/P-521, RSA and Ed25519)"
            .into(),
    })?;
    let has_certificate = !key.id.is_empty()
        && !session
            .find_objects(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::Id(key.id.clone()),
            ])
            .map_err(Error::pkcs11("find certificates"))?
            .is_empty();
    Ok(KeyObject {
        private,
        public,
        label,
        id: key.id,
        kind,
        spki,
        sensitive: key.sensitive,
        extractable: key.extractable,
        always_sensitive: key.always_sensitive,
        never_extractable: key.never_extractable,
        local: key.local,
        sign: key.sign,
        wrap_with_trusted: key.wrap_with_trusted,
        has_certificate,
    })
}

#[derive(Default)]
struct PrivateAttrs {
    label: Vec<u8>,
    id: Vec<u8>,
    key_type: Option<KeyType>,
    sensitive: bool,
    extractable: bool,
    always_sensitive: bool,
    never_extractable: bool,
    local: bool,
    sign: bool,
    wrap_with_trusted: bool,
}

impl PrivateAttrs {
    fn absorb(&mut self, attr: Attribute) {
        match attr {
            Attribute::Label(v) => self.label = v,
            Attribute::Id(v) => self.id = v,
            Attribute::KeyType(t) => self.key_type = Some(t),
            Attribute::Sensitive(b) => self.sensitive = b,
            Attribute::Extractable(b) => self.extractable = b,
            Attribute::AlwaysSensitive(b) => self.always_sensitive = b,
            Attribute::NeverExtractable(b) => self.never_extractable = b,
            Attribute::Local(b) => self.local = b,
            Attribute::Sign(b) => self.sign = b,
            Attribute::WrapWithTrusted(b) => self.wrap_with_trusted = b,
            _ => {}
        }
    }
}

/// Pairs by `CKA_ID` first, then by label; several candidates of the right type are ambiguous.
fn find_public(
    session: &Session,
    id: &[u8],
    label: &str,
    key_type: Option<KeyType>,
) -> Result<Option<ObjectHandle>, Error> {
    let mut candidates = Vec::new();
    for attr in [
        (!id.is_empty()).then(|| Attribute::Id(id.to_vec())),
        (!label.is_empty()).then(|| Attribute::Label(label.as_bytes().to_vec())),
    ]
    .into_iter()
    .flatten()
    {
        let mut template = vec![Attribute::Class(ObjectClass::PUBLIC_KEY), attr];
        if let Some(t) = key_type {
            template.push(Attribute::KeyType(t));
        }
        candidates = session
            .find_objects(&template)
            .map_err(Error::pkcs11("find public keys"))?;
        if !candidates.is_empty() {
            break;
        }
    }
    match candidates.len() {
        0 => Ok(None),
        1 => Ok(Some(candidates[0])),
        // Several public keys share the id: which one belongs to this private key is unknown,
        // so rebuild the public key from the private object instead of guessing.
        _ => Ok(None),
    }
}

/// Builds the SPKI from a public key object's attributes.
pub fn public_key_spki(
    session: &Session,
    public: ObjectHandle,
    label: &str,
) -> Result<Vec<u8>, Error> {
    spki_from_object(session, public, label)
}

fn spki_from_object(
    session: &Session,
    handle: ObjectHandle,
    label: &str,
) -> Result<Vec<u8>, Error> {
    let attrs = session
        .get_attributes(
            handle,
            &[
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::EcPoint,
                AttributeType::Modulus,
                AttributeType::PublicExponent,
            ],
        )
        .map_err(Error::pkcs11("read public key attributes"))?;
    let mut parts = PublicParts::default();
    for attr in attrs {
        parts.absorb(attr);
    }
    parts.spki(label)
}

/// RSA private keys carry the modulus and public exponent; some tokens also give EC points.
fn spki_from_private(
    session: &Session,
    private: ObjectHandle,
    label: &str,
) -> Result<Vec<u8>, Error> {
    spki_from_object(session, private, label)
}

fn spki_from_certificate(session: &Session, id: &[u8]) -> Option<Vec<u8>> {
    if id.is_empty() {
        return None;
    }
    let certs = session
        .find_objects(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::Id(id.to_vec()),
        ])
        .ok()?;
    let handle = *certs.first()?;
    let value = session
        .get_attributes(handle, &[AttributeType::Value])
        .ok()?
        .into_iter()
        .find_map(|a| match a {
            Attribute::Value(v) => Some(v),
            _ => None,
        })?;
    spki_of_certificate(&value)
}

/// The DER SubjectPublicKeyInfo inside a DER certificate, if it parses.
pub fn spki_of_certificate(cert_der: &[u8]) -> Option<Vec<u8>> {
    use der::Encode;

    let cert = x509_cert::Certificate::from_der(cert_der).ok()?;
    cert.tbs_certificate
        .subject_public_key_info
        .to_der()
        .ok()
}

#[derive(Default)]
struct PublicParts {
    key_type: Option<KeyType>,
    ec_params: Option<Vec<u8>>,
    ec_point: Option<Vec<u8>>,
    modulus: Option<Vec<u8>>,
    exponent: Option<Vec<u8>>,
}

impl PublicParts {
    fn absorb(&mut self, attr: Attribute) {
        match attr {
            Attribute::KeyType(t) => self.key_type = Some(t),
            Attribute::EcParams(v) => self.ec_params = Some(v),
            Attribute::EcPoint(v) => self.ec_point = Some(v),
            Attribute::Modulus(v) => self.modulus = Some(v),
            Attribute::PublicExponent(v) => self.exponent = Some(v),
            _ => {}
        }
    }

    fn spki(self, label: &str) -> Result<Vec<u8>, Error> {
        let bad = |reason: String| Error::PublicKey {
            key: label.to_owned(),
            reason,
        };
        match self.key_type {
            Some(t) if t == KeyType::RSA => {
                let (Some(n), Some(e)) = (self.modulus, self.exponent) else {
                    return Err(bad(
                        "RSA key without CKA_MODULUS or CKA_PUBLIC_EXPONENT".into()
                    ));
                };
                rsa_spki(&n, &e).map_err(bad)
            }
            Some(t) if t == KeyType::EC || t == KeyType::EC_EDWARDS => {
                let (Some(params), Some(point)) = (self.ec_params, self.ec_point) else {
                    return Err(bad("EC key without CKA_EC_PARAMS or CKA_EC_POINT".into()));
                };
                ec_spki(&params, &point).map_err(bad)
            }
            Some(t) => Err(bad(format!("unsupported key type {t}"))),
            None => Err(bad("no CKA_KEY_TYPE".into())),
        }
    }
}

fn rsa_spki(n: &[u8], e: &[u8]) -> Result<Vec<u8>, String> {
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(n),
        rsa::BigUint::from_bytes_be(e),
    )
    .map_err(|e| format!("invalid RSA public key: {e}"))?;
    key.to_public_key_der()
        .map(|d| d.into_vec())
        .map_err(|e| e.to_string())
}

/// The curve named by `CKA_EC_PARAMS`: a DER OID or, on some tokens, a PrintableString name.
pub(crate) fn curve_of_params(params: &[u8]) -> Result<ParamsCurve, String> {
    if let Ok(oid) = ObjectIdentifier::from_der(params) {
        if oid == const_oid::db::rfc8410::ID_ED_25519 {
            return Ok(ParamsCurve::Ed25519);
        }
        return Curve::from_oid(oid)
            .map(ParamsCurve::Weierstrass)
            .ok_or_else(|| format!("unsupported curve {oid}"));
    }
    if let Ok(name) = PrintableStringRef::from_der(params) {
        if name.as_str() == "edwards25519" {
            return Ok(ParamsCurve::Ed25519);
        }
        return Curve::from_name(name.as_str())
            .map(ParamsCurve::Weierstrass)
            .ok_or_else(|| format!("unsupported curve `{}`", name.as_str()));
    }
    Err("CKA_EC_PARAMS is neither an OID nor a curve name".into())
}

/// A curve as `CKA_EC_PARAMS` names it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum ParamsCurve {
    Ed25519,
    Weierstrass(Curve),
}

/// Decodes `CKA_EC_POINT`, accepting the DER OCTET STRING form and the raw point, and knowing
/// the curve's length so that a raw point is never mistaken for DER (or truncated).
pub(crate) fn ec_point_bytes(point: &[u8], raw_len: usize) -> Result<&[u8], String> {
    if point.len() == raw_len {
        return Ok(point);
    }
    match OctetStringRef::from_der(point) {
        Ok(inner) if inner.as_bytes().len() == raw_len => Ok(inner.as_bytes()),
        _ => Err(format!(
            "CKA_EC_POINT has {} bytes; expected a {raw_len}-byte point, raw or DER-wrapped",
            point.len()
        )),
    }
}

fn ec_spki(params: &[u8], point: &[u8]) -> Result<Vec<u8>, String> {
    let der = match curve_of_params(params)? {
        ParamsCurve::Ed25519 => {
            let bytes: [u8; 32] = ec_point_bytes(point, 32)?
                .try_into()
                .map_err(|_| "Ed25519 point is not 32 bytes".to_string())?;
            ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                .map_err(|e| format!("invalid Ed25519 point: {e}"))?
                .to_public_key_der()
        }
        ParamsCurve::Weierstrass(curve) => {
            let sec1 = ec_point_bytes(point, 1 + 2 * curve.field_len())?;
            let invalid = |_| "the EC point is not on the curve".to_string();
            match curve {
                Curve::P256 => p256::PublicKey::from_sec1_bytes(sec1)
                    .map_err(invalid)?
                    .to_public_key_der(),
                Curve::P384 => p384::PublicKey::from_sec1_bytes(sec1)
                    .map_err(invalid)?
                    .to_public_key_der(),
                Curve::P521 => p521::PublicKey::from_sec1_bytes(sec1)
                    .map_err(invalid)?
                    .to_public_key_der(),
            }
        }
    };
    der.map(|d| d.into_vec())
        .map_err(|e| e.to_string())
}

/// The key kind an SPKI describes.
pub(crate) fn kind_of_spki(spki: &[u8]) -> Option<KeyKind> {
    use rsa::traits::PublicKeyParts;
    use spki::DecodePublicKey;

    let info = spki::SubjectPublicKeyInfoRef::from_der(spki).ok()?;
    let alg = info.algorithm.oid;
    if alg == const_oid::db::rfc8410::ID_ED_25519 {
        return Some(KeyKind::Ed25519);
    }
    if alg == const_oid::db::rfc5912::RSA_ENCRYPTION {
        let key = rsa::RsaPublicKey::from_public_key_der(spki).ok()?;
        return Some(KeyKind::Rsa(key.n().bits()));
    }
    if alg == const_oid::db::rfc5912::ID_EC_PUBLIC_KEY {
        let params = info.algorithm.parameters?;
        let oid = params
            .decode_as::<ObjectIdentifier>()
            .ok()?;
        return Curve::from_oid(oid).map(KeyKind::Ec);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_with_control_characters_are_refused_and_printed_escaped() {
        assert_eq!(printable("tls-2026 ✓"), "tls-2026 ✓");
        assert_eq!(printable("a\u{1b}[2J\nb"), "a\\u{1b}[2J\\nb");
        assert!(check_label("the label", "tls").is_ok());
        let err = check_label("the label", "a\rb").unwrap_err();
        assert!(
            err.contains("control character") && !err.contains('\r'),
            "{err}"
        );
        assert!(check_label("the label", "")
            .unwrap_err()
            .contains("empty"));
    }

    #[test]
    fn parses_key_selectors() {
        assert_eq!(
            "tls".parse::<KeySelector>().unwrap(),
            KeySelector::label("tls")
        );
        assert_eq!(
            "id:01ff"
                .parse::<KeySelector>()
                .unwrap(),
            KeySelector::id(vec![1, 0xff])
        );
        let uri: KeySelector = "pkcs11:token=t;object=a%20b;id=%01;type=private"
            .parse()
            .unwrap();
        assert_eq!(uri.label.as_deref(), Some("a b"));
        assert_eq!(uri.id.as_deref(), Some(&[1][..]));
        assert!("id:zz".parse::<KeySelector>().is_err());
        assert!("pkcs11:token=t"
            .parse::<KeySelector>()
            .is_err());
        assert!("pkcs11:object=a;type=secret-key"
            .parse::<KeySelector>()
            .is_err());
    }

    #[test]
    fn ec_point_accepts_raw_and_der_forms_by_length() {
        let raw = [7u8; 32];
        assert_eq!(ec_point_bytes(&raw, 32).unwrap(), &raw);
        let mut der = vec![0x04, 0x20];
        der.extend_from_slice(&raw);
        assert_eq!(ec_point_bytes(&der, 32).unwrap(), &raw);
        // A raw Ed25519 point that happens to look like the start of a DER OCTET STRING is
        // still taken whole: its length says it is raw.
        let mut tricky = [0u8; 32];
        tricky[0] = 0x04;
        tricky[1] = 0x1e;
        assert_eq!(ec_point_bytes(&tricky, 32).unwrap(), &tricky);
        assert!(ec_point_bytes(&der[..20], 32).is_err());
        assert!(ec_point_bytes(&[0u8; 33], 32).is_err());
    }

    #[test]
    fn curve_params_accept_oid_and_names() {
        use der::Encode;

        let p256 = Curve::P256.oid().to_der().unwrap();
        assert_eq!(
            curve_of_params(&p256).unwrap(),
            ParamsCurve::Weierstrass(Curve::P256)
        );
        let name = PrintableStringRef::new("edwards25519")
            .unwrap()
            .to_der()
            .unwrap();
        assert_eq!(curve_of_params(&name).unwrap(), ParamsCurve::Ed25519);
        assert!(curve_of_params(&[0x05, 0x00]).is_err());
    }
}
