//! Certificates kept on the token next to their key: `CKO_CERTIFICATE` objects of type
//! `CKC_X_509` with the key's `CKA_ID` and label, and chains read back from them.

use cryptoki::object::{Attribute, AttributeType, CertificateType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use rustls::pki_types::CertificateDer;
use tracing::debug;

use super::{parse_certificate, Error, ParsedCertificate};
use crate::pkcs11;

/// The most issuers [`load_chain`] follows above the leaf.
const MAX_CHAIN_DEPTH: usize = 8;

/// Stores `cert` on the token as a public `CKO_CERTIFICATE` with the key's label and `CKA_ID`.
///
/// `CKA_SUBJECT`, `CKA_ISSUER`, `CKA_SERIAL_NUMBER` and `CKA_VALUE` come from the certificate.
/// Storing the same certificate again returns the existing object. Another certificate under
/// the same `CKA_ID` is refused unless `replace` is set, which destroys the old ones first.
/// The session must be read-write and logged in (`C_CreateObject`, `C_DestroyObject`).
pub fn store_certificate(
    session: &Session,
    label: &str,
    id: &[u8],
    cert: &CertificateDer<'_>,
    replace: bool,
) -> Result<ObjectHandle, Error> {
    let parsed = parse_certificate(cert)?;
    let existing = certificates_with(session, &[Attribute::Id(id.to_vec())])?;
    let mut stale = Vec::new();
    for (handle, value) in existing {
        if value == cert.as_ref() {
            debug!(key_id = %hex::encode(id), "certificate already on the token");
            return Ok(handle);
        }
        stale.push(handle);
    }
    if !stale.is_empty() && !replace {
        return Err(Error::CertificateExists {
            id: hex::encode(id),
            count: stale.len(),
        });
    }
    for handle in stale {
        session
            .destroy_object(handle)
            .map_err(pkcs11::Error::pkcs11(
                "destroy the old certificate (C_DestroyObject)",
            ))?;
    }

    let template = vec![
        Attribute::Class(ObjectClass::CERTIFICATE),
        Attribute::CertificateType(CertificateType::X_509),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
        Attribute::Subject(parsed.subject_der),
        Attribute::Issuer(parsed.issuer_der),
        Attribute::SerialNumber(parsed.serial_der),
        Attribute::Value(cert.to_vec()),
    ];
    session
        .create_object(&template)
        .map_err(pkcs11::Error::pkcs11(
            "store the certificate (C_CreateObject)",
        ))
        .map_err(Error::from)
}

/// Reads the certificate chain of a key from the token: its leaf first, then the issuers.
///
/// The leaf is the `CKC_X_509` certificate with the key's `CKA_ID` whose public key is `spki`;
/// when several are, the one valid longest wins. Issuers are found by `CKA_SUBJECT` equal to the
/// certificate's issuer name and added up to, but not including, a self-issued root (a client
/// must already trust the root; sending it only costs bytes). A self-signed leaf is returned
/// alone.
///
/// # Errors
///
/// [`Error::NoCertificate`] when no certificate with that id holds the key's public key.
pub fn load_chain(
    session: &Session,
    id: &[u8],
    spki: &[u8],
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let mut leaves = Vec::new();
    for (_, value) in certificates_with(session, &[Attribute::Id(id.to_vec())])? {
        let der = CertificateDer::from(value);
        match parse_certificate(&der) {
            Ok(parsed) if parsed.spki_der == spki => leaves.push((parsed, der)),
            Ok(_) => {
                debug!(key_id = %hex::encode(id), "certificate with the key's id holds another public key")
            }
            Err(e) => {
                debug!(key_id = %hex::encode(id), error = %e, "unreadable certificate on the token")
            }
        }
    }
    leaves.sort_by_key(|(parsed, _)| parsed.not_after);
    let Some((mut current, leaf)) = leaves.pop() else {
        return Err(Error::NoCertificate {
            id: hex::encode(id),
        });
    };
    let mut chain = vec![leaf];
    for _ in 0..MAX_CHAIN_DEPTH {
        if current.is_self_issued() {
            break;
        }
        let Some((parsed, der)) = find_issuer(session, &current)? else {
            break;
        };
        if parsed.is_self_issued() {
            break;
        }
        chain.push(der);
        current = parsed;
    }
    Ok(chain)
}

/// The certificate on the token whose subject is `cert`'s issuer, if any.
fn find_issuer(
    session: &Session,
    cert: &ParsedCertificate,
) -> Result<Option<(ParsedCertificate, CertificateDer<'static>)>, Error> {
    let candidates = certificates_with(session, &[Attribute::Subject(cert.issuer_der.clone())])?;
    for (_, value) in candidates {
        let der = CertificateDer::from(value);
        if let Ok(parsed) = parse_certificate(&der) {
            return Ok(Some((parsed, der)));
        }
    }
    Ok(None)
}

/// X.509 certificate objects matching `extra`, with their `CKA_VALUE`.
fn certificates_with(
    session: &Session,
    extra: &[Attribute],
) -> Result<Vec<(ObjectHandle, Vec<u8>)>, Error> {
    let mut template = vec![
        Attribute::Class(ObjectClass::CERTIFICATE),
        Attribute::CertificateType(CertificateType::X_509),
    ];
    template.extend_from_slice(extra);
    let handles = session
        .find_objects(&template)
        .map_err(pkcs11::Error::pkcs11("find certificates (C_FindObjects)"))?;
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        let attrs = session
            .get_attributes(handle, &[AttributeType::Value])
            .map_err(pkcs11::Error::pkcs11(
                "read a certificate (C_GetAttributeValue)",
            ))?;
        if let Some(Attribute::Value(value)) = attrs.into_iter().next() {
            out.push((handle, value));
        }
    }
    Ok(out)
}
