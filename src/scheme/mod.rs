//! Scheme selection and signing: which TLS signature schemes a token can serve for a key, and
//! how one signature is made, encoded and checked.

mod plan;
mod sign;
mod verify;

pub use plan::{
    all_schemes, is_pkcs1, scheme_name, HashAlg, Method, SchemeEntry, SchemePlan, MIN_RSA_BITS,
};
pub use sign::{mechanism_for, sign_message, token_input, SignError};
pub use verify::{verify_signature, PublicKeyVerifier, VerifyError};
