//! RFC 7512 `pkcs11:` URIs, as far as token and key selection need them.
//!
//! Path attributes are `;`-separated and percent-decoded. Query attributes (after `?`) would
//! choose the module or the PIN, which only the operator's own options do here, so they are
//! refused; `pin-value` above all, since a PIN never travels inside a URI.

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
        let mut seen = std::collections::HashSet::new();

        for attr in path
            .split(';')
            .filter(|a| !a.is_empty())
        {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| bad(format!("path attribute `{attr}` has no `=`")))?;
            if !seen.insert(name) {
                return Err(bad(format!("attribute `{name}` appears twice")));
            }
            check_percent_encoding(value).map_err(|reason| bad(format!("`{name}`: {reason}")))?;
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

        // Query attributes would choose the module or the PIN: both are given by the operator's
        // own options, never by a URI that may come from a key list or a config file.
        if let Some(attr) = query.split('&').find(|a| !a.is_empty()) {
            let (name, _) = attr
                .split_once('=')
                .unwrap_or((attr, ""));
            let reason = match name {
                "pin-value" => "`pin-value` is refused: a PIN must not appear in a URI; use a PIN \
                                source option (env:NAME, file:PATH, cmd:COMMAND or prompt)"
                    .to_owned(),
                "pin-source" => "`pin-source` is not read from URIs; use a PIN source option \
                                 (env:NAME, file:PATH, cmd:COMMAND or prompt)"
                    .to_owned(),
                "module-path" | "module-name" => format!(
                    "`{name}` is not read from URIs; name the module with --module or \
                     RUSTLS_HSM_MODULE"
                ),
                _ => format!("unknown query attribute `{name}`"),
            };
            return Err(bad(reason));
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

/// Checks that every `%` starts a two-digit hexadecimal escape (RFC 3986 section 2.1).
fn check_percent_encoding(value: &str) -> Result<(), String> {
    let bytes = value.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%'
            && !(bytes
                .get(i + 1)
                .is_some_and(u8::is_ascii_hexdigit)
                && bytes
                    .get(i + 2)
                    .is_some_and(u8::is_ascii_hexdigit))
        {
            return Err(format!(
                "`%` at byte {i} is not followed by two hexadecimal digits; write a literal % as %25"
            ));
        }
    }
    Ok(())
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
        let uri: Pkcs11Uri =
            "pkcs11:token=my%20token;serial=0123abcd;object=tls%3Bkey;id=%01%ff;type=private"
                .parse()
                .unwrap();
        assert_eq!(uri.token.as_deref(), Some("my token"));
        assert_eq!(uri.serial.as_deref(), Some("0123abcd"));
        assert_eq!(uri.object.as_deref(), Some("tls;key"));
        assert_eq!(uri.id.as_deref(), Some(&[0x01, 0xff][..]));
        assert_eq!(uri.object_type.as_deref(), Some("private"));
    }

    // URIs that were taken half-read once: the last of two `object=` won, `%zz` was read as
    // text, and a module path or PIN source in the query was silently ignored.
    #[test]
    fn refuses_repeated_attributes_bad_escapes_and_query_attributes() {
        for bad in [
            "pkcs11:object=A;object=B",
            "pkcs11:token=%zz",
            "pkcs11:id=%0",
            "pkcs11:token=a?module-path=/evil.so",
            "pkcs11:token=a?pin-source=file:/x",
            "pkcs11:token=a?x-vendor=1",
        ] {
            assert!(bad.parse::<Pkcs11Uri>().is_err(), "{bad}");
        }
        let uri: Pkcs11Uri = "pkcs11:token=100%25".parse().unwrap();
        assert_eq!(uri.token.as_deref(), Some("100%"));
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
