//! RFC 7512 `pkcs11:` URIs, as far as token and key selection need them.
//!
//! Path attributes are `;`-separated and percent-decoded; query attributes follow `?` and are
//! `&`-separated. `pin-value` is refused: a PIN never travels inside a URI.

use std::str::FromStr;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

use super::Error;

/// A parsed `pkcs11:` URI.
///
/// Only the attributes that select tokens and objects are kept; unknown path attributes are an
/// error (RFC 7512 section 2.3 lets a consumer refuse what it cannot honour, and silently
/// ignoring a selector could pick the wrong key).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Pkcs11Uri {
    /// `id`: the object's CKA_ID, raw bytes.
    pub id: Option<Vec<u8>>,
    /// `manufacturer`: the token's manufacturer ID.
    pub manufacturer: Option<String>,
    /// `model`: the token's model.
    pub model: Option<String>,
    /// `object`: the object's CKA_LABEL.
    pub object: Option<String>,
    /// `serial`: the token's serial number.
    pub serial: Option<String>,
    /// `slot-id`: a slot number; accepted but discouraged, slot ids are not stable.
    pub slot_id: Option<u64>,
    /// `token`: the token label.
    pub token: Option<String>,
    /// `type`: the object class (`private`, `public`, `cert`, `secret-key`, `data`).
    pub object_type: Option<String>,
    /// `module-path` query attribute.
    pub module_path: Option<String>,
    /// `pin-source` query attribute, as written (a [`crate::pin::PinSource`] or file path).
    pub pin_source: Option<String>,
}

impl Pkcs11Uri {
    /// True when the URI names a token attribute (label, serial, model, manufacturer or slot).
    pub fn has_token_attributes(&self) -> bool {
        self.token.is_some()
            || self.serial.is_some()
            || self.model.is_some()
            || self.manufacturer.is_some()
            || self.slot_id.is_some()
    }

    /// True when the URI names an object attribute (label or id).
    pub fn has_object_attributes(&self) -> bool {
        self.object.is_some() || self.id.is_some()
    }

    /// Formats a URI naming a key on a token, percent-encoding as RFC 7512 requires.
    pub fn for_object(token: &str, serial: &str, label: &str, id: &[u8], class: &str) -> String {
        let id: String = id
            .iter()
            .map(|b| format!("%{b:02X}"))
            .collect();
        format!(
            "pkcs11:token={};serial={};object={};id={id};type={class}",
            encode(token),
            encode(serial),
            encode(label)
        )
    }
}

impl FromStr for Pkcs11Uri {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| Error::Uri {
            uri: redact_pin_value(s),
            reason,
        };
        let rest = s
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad("it does not start with `pkcs11:`".into()))?;
        let (path, query) = rest
            .split_once('?')
            .unwrap_or((rest, ""));
        let mut uri = Self::default();

        for attr in path
            .split(';')
            .filter(|a| !a.is_empty())
        {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| bad(format!("path attribute `{attr}` has no `=`")))?;
            let bytes = percent_decode_str(value).collect::<Vec<u8>>();
            let text = || {
                String::from_utf8(bytes.clone())
                    .map_err(|_| bad(format!("`{name}` is not UTF-8 after percent-decoding")))
            };
            match name {
                "id" => uri.id = Some(bytes.clone()),
                "manufacturer" => uri.manufacturer = Some(text()?),
                "model" => uri.model = Some(text()?),
                "object" => uri.object = Some(text()?),
                "serial" => uri.serial = Some(text()?),
                "token" => uri.token = Some(text()?),
                "type" => uri.object_type = Some(text()?),
                "slot-id" => {
                    let id = text()?
                        .parse()
                        .map_err(|_| bad("`slot-id` is not a decimal number".into()))?;
                    uri.slot_id = Some(id);
                }
                // Library attributes describe the module, which is loaded by path anyway.
                "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer" => {}
                _ => return Err(bad(format!("unknown path attribute `{name}`"))),
            }
        }

        for attr in query
            .split('&')
            .filter(|a| !a.is_empty())
        {
            let (name, value) = attr
                .split_once('=')
                .unwrap_or((attr, ""));
            let value = percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| bad(format!("`{name}` is not UTF-8 after percent-decoding")))?
                .into_owned();
            match name {
                "module-path" => uri.module_path = Some(value),
                "pin-source" => uri.pin_source = Some(value),
                "pin-value" => {
                    return Err(bad(
                        "`pin-value` is refused: a PIN must not appear in a URI; use pin-source \
                         or a PIN source option"
                            .into(),
                    ))
                }
                _ => {}
            }
        }
        Ok(uri)
    }
}

const URI_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'/')
    .add(b';')
    .add(b'<')
    .add(b'=')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

fn encode(value: &str) -> String {
    utf8_percent_encode(value, URI_VALUE).to_string()
}

/// Drops any `pin-value` from a URI before it is shown in an error.
fn redact_pin_value(uri: &str) -> String {
    match uri.find("pin-value") {
        Some(at) => format!("{}pin-value=(redacted)", &uri[..at]),
        None => uri.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_percent_encoded_attributes() {
        let uri: Pkcs11Uri = "pkcs11:token=my%20token;serial=0123abcd;object=tls%3Bkey;id=%01%ff;type=private?module-path=/usr/lib/x.so"
            .parse()
            .unwrap();
        assert_eq!(uri.token.as_deref(), Some("my token"));
        assert_eq!(uri.serial.as_deref(), Some("0123abcd"));
        assert_eq!(uri.object.as_deref(), Some("tls;key"));
        assert_eq!(uri.id.as_deref(), Some(&[0x01, 0xff][..]));
        assert_eq!(uri.object_type.as_deref(), Some("private"));
        assert_eq!(uri.module_path.as_deref(), Some("/usr/lib/x.so"));
    }

    #[test]
    fn refuses_pin_value_without_echoing_it() {
        let err = "pkcs11:token=a?pin-value=98765"
            .parse::<Pkcs11Uri>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("pin-value"), "{err}");
        assert!(!err.contains("98765"), "{err}");
    }

    #[test]
    fn refuses_unknown_attributes_and_bad_slot_ids() {
        assert!("pkcs11:tokn=a"
            .parse::<Pkcs11Uri>()
            .is_err());
        assert!("pkcs11:slot-id=x"
            .parse::<Pkcs11Uri>()
            .is_err());
        assert!("token=a".parse::<Pkcs11Uri>().is_err());
    }

    #[test]
    fn formats_round_trip() {
        let text = Pkcs11Uri::for_object("a b;c", "01", "ké y", &[0, 0xab], "private");
        let uri: Pkcs11Uri = text.parse().unwrap();
        assert_eq!(uri.token.as_deref(), Some("a b;c"));
        assert_eq!(uri.object.as_deref(), Some("ké y"));
        assert_eq!(uri.id.as_deref(), Some(&[0, 0xab][..]));
    }
}
