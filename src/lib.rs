//! rustls signing keys whose private half never leaves a PKCS#11 HSM.
//!
//! The modules follow the path of a handshake signature, from the rustls-facing side down:
//!
//! - [`HsmKey`] and [`resolver`]: what rustls sees, a `SigningKey` and certificate resolvers;
//! - [`scheme`]: which TLS signature schemes a key on a token can serve, and how each is signed;
//! - [`pool`]: sessions, login and the PIN lockout guard, and recovery from token faults;
//! - [`pkcs11`]: modules, tokens and key objects;
//! - [`pin`]: where PINs come from;
//! - [`backup`]: key backup and restore by wrapping under a key-encryption key on the token.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use rustls::pki_types::pem::PemObject;
//! use rustls_hsm::resolver::ServerCertResolver;
//! use rustls_hsm::HsmToken;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let token = HsmToken::builder()
//!     .module_path("/usr/lib/softhsm/libsofthsm2.so")
//!     .token("signer".parse()?)
//!     .pin("file:/run/secrets/hsm-pin".parse()?)
//!     .build()?;
//! let key = token.key(&"tls-ec".parse()?)?;
//! let chain = rustls::pki_types::CertificateDer::pem_file_iter("chain.pem")?
//!     .collect::<Result<Vec<_>, _>>()?;
//! let mut resolver = ServerCertResolver::new();
//! resolver.add(None, key.certified_key(chain)?);
//! let config = rustls::ServerConfig::builder()
//!     .with_no_client_auth()
//!     .with_cert_resolver(Arc::new(resolver));
//! # Ok(()) }
//! ```

pub mod backup;
pub mod cert;
mod error;
mod key;
pub mod pin;
pub mod pkcs11;
pub mod pool;
pub mod resolver;
pub mod scheme;
mod stats;

pub use error::Error;
pub use key::{HsmKey, HsmToken, HsmTokenBuilder};
pub use stats::{LatencySnapshot, PoolSnapshot, SchemeCounts, StatsSnapshot};
