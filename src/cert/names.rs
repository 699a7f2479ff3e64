//! Subject names and subject alternative names as an operator writes them.
//!
//! A subject is `CN=name,O=org,OU=unit,C=DE,ST=state,L=city` (a `\,` keeps a comma in a value);
//! an alternative name is `DNS:host`, `IP:addr`, `EMAIL:addr` or `URI:uri`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use rcgen::{DistinguishedName, DnType, SanType};

use super::Error;

/// A certificate subject: a list of `TYPE=value` attributes, parsed once.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Subject {
    attributes: Vec<(DnType, String)>,
}

impl Subject {
    /// A subject holding only a common name.
    pub fn common_name(name: &str) -> Self {
        Self {
            attributes: vec![(DnType::CommonName, name.to_owned())],
        }
    }

    /// The common name, when there is one.
    pub fn cn(&self) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(ty, _)| *ty == DnType::CommonName)
            .map(|(_, value)| value.as_str())
    }

    /// The subject as rcgen's distinguished name, attributes in the order given.
    pub fn to_distinguished_name(&self) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        for (ty, value) in &self.attributes {
            dn.push(ty.clone(), value.as_str());
        }
        dn
    }
}

impl FromStr for Subject {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| Error::Subject {
            subject: s.to_owned(),
            reason,
        };
        let mut attributes = Vec::new();
        for part in split_unescaped(s, ',') {
            let part = part.trim();
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{part}` is not TYPE=value")))?;
            let ty = match name
                .trim()
                .to_ascii_uppercase()
                .as_str()
            {
                "C" => DnType::CountryName,
                "CN" => DnType::CommonName,
                "L" => DnType::LocalityName,
                "O" => DnType::OrganizationName,
                "OU" => DnType::OrganizationalUnitName,
                "ST" => DnType::StateOrProvinceName,
                other => {
                    return Err(bad(format!(
                        "unknown attribute type `{other}`; use CN, O, OU, C, ST or L"
                    )))
                }
            };
            let value = value.trim().replace("\\,", ",");
            if value.is_empty() {
                return Err(bad(format!("`{name}` has an empty value")));
            }
            if ty == DnType::CountryName && value.len() != 2 {
                return Err(bad("C= takes a two-letter country code".into()));
            }
            attributes.push((ty, value));
        }
        if attributes.is_empty() {
            return Err(bad("it is empty; write at least CN=name".into()));
        }
        Ok(Self { attributes })
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .attributes
            .iter()
            .map(|(ty, value)| format!("{}={}", dn_type_name(ty), value.replace(',', "\\,")))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// One subject alternative name, e.g. `DNS:localhost` or `IP:127.0.0.1`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum SubjectAltName {
    /// `DNS:name`: a host name, or a wildcard such as `*.example.com`.
    Dns(String),
    /// `EMAIL:address`: an RFC 822 mail address, for client certificates.
    Email(String),
    /// `IP:address`: an IPv4 or IPv6 address.
    Ip(IpAddr),
    /// `URI:uri`: a URI, e.g. a SPIFFE id.
    Uri(String),
}

impl SubjectAltName {
    /// The name as rcgen writes it into a certificate.
    pub fn to_san_type(&self) -> Result<SanType, Error> {
        let ia5 = |value: &str| {
            value
                .to_owned()
                .try_into()
                .map_err(|_| Error::San {
                    san: self.to_string(),
                    reason: "only ASCII is allowed (IA5String)".into(),
                })
        };
        Ok(match self {
            Self::Dns(name) => SanType::DnsName(ia5(name)?),
            Self::Email(address) => SanType::Rfc822Name(ia5(address)?),
            Self::Ip(address) => SanType::IpAddress(*address),
            Self::Uri(uri) => SanType::URI(ia5(uri)?),
        })
    }
}

impl FromStr for SubjectAltName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| Error::San {
            san: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| bad("write DNS:name, IP:address, EMAIL:address or URI:uri"))?;
        if value.is_empty() {
            return Err(bad("the value after the colon is empty"));
        }
        let san = match kind.to_ascii_uppercase().as_str() {
            "DNS" => {
                if !value.is_ascii() || value.contains([' ', '/', ':']) {
                    return Err(bad("a DNS name is ASCII without spaces, slashes or colons"));
                }
                Self::Dns(value.to_ascii_lowercase())
            }
            "EMAIL" => Self::Email(value.to_owned()),
            "IP" => Self::Ip(
                value
                    .parse()
                    .map_err(|_| bad("not an IPv4 or IPv6 address"))?,
            ),
            "URI" => Self::Uri(value.to_owned()),
            _ => return Err(bad("the type must be DNS, IP, EMAIL or URI")),
        };
        san.to_san_type()?;
        Ok(san)
    }
}

impl fmt::Display for SubjectAltName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(name) => write!(f, "DNS:{name}"),
            Self::Email(address) => write!(f, "EMAIL:{address}"),
            Self::Ip(address) => write!(f, "IP:{address}"),
            Self::Uri(uri) => write!(f, "URI:{uri}"),
        }
    }
}

fn dn_type_name(ty: &DnType) -> &'static str {
    match ty {
        DnType::CountryName => "C",
        DnType::LocalityName => "L",
        DnType::OrganizationName => "O",
        DnType::OrganizationalUnitName => "OU",
        DnType::StateOrProvinceName => "ST",
        _ => "CN",
    }
}

/// Splits at `sep` except where it follows a backslash.
fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (at, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(&s[start..at]);
            start = at + c.len_utf8();
        }
    }
    parts.push(&s[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subjects_with_escaped_commas() {
        let subject: Subject = "CN=web, O=Example\\, Inc.,C=DE"
            .parse()
            .unwrap();
        assert_eq!(subject.cn(), Some("web"));
        assert_eq!(subject.to_string(), "CN=web,O=Example\\, Inc.,C=DE");
        assert!("".parse::<Subject>().is_err());
        assert!("CN=".parse::<Subject>().is_err());
        assert!("XX=a".parse::<Subject>().is_err());
        assert!("C=Germany".parse::<Subject>().is_err());
        assert!("web".parse::<Subject>().is_err());
    }

    #[test]
    fn parses_alt_names() {
        assert_eq!(
            "DNS:LocalHost"
                .parse::<SubjectAltName>()
                .unwrap(),
            SubjectAltName::Dns("localhost".into())
        );
        assert_eq!(
            "IP:::1"
                .parse::<SubjectAltName>()
                .unwrap(),
            SubjectAltName::Ip("::1".parse().unwrap())
        );
        assert!("IP:localhost"
            .parse::<SubjectAltName>()
            .is_err());
        assert!("localhost"
            .parse::<SubjectAltName>()
            .is_err());
        assert!("DNS:"
            .parse::<SubjectAltName>()
            .is_err());
        assert!("DNS:exämple.com"
            .parse::<SubjectAltName>()
            .is_err());
        assert!("FOO:x"
            .parse::<SubjectAltName>()
            .is_err());
    }
}
