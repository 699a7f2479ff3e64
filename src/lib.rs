//! rustls signing keys whose private half never leaves a PKCS#11 HSM.
//!
//! The modules follow the path of a handshake signature, from the rustls-facing side down:
//!
//! - [`scheme`]: which TLS signature schemes a key on a token can serve, and how each is signed;
//! - [`pkcs11`]: modules, tokens and key objects;
//! - [`pin`]: where PINs come from.

pub mod pin;
pub mod pkcs11;
pub mod scheme;
