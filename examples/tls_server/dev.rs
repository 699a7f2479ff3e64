//! `--dev`: a SoftHSM token of the example's own, with keys and certificates on it, created on
//! the first run and reused on later ones.
//!
//! The state directory holds `softhsm2.conf` and `tokens/` (SoftHSM's store), the SO and user
//! PINs (random, mode 0600), the PIN guard's file, and the certificates: `ca.pem` (the dev CA,
//! self-signed by a key on the token), `server-ec.pem`, `server-rsa.pem` and `client.pem`
//! (issued by that CA). No private key ever leaves the token.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rustls::pki_types::CertificateDer;
use rustls_hsm::cert::{self, CertProfile, CertUsage, ParsedCertificate, SubjectAltName};
use rustls_hsm::pin::PinSource;
use rustls_hsm::pkcs11::{
    find_key, find_token, generate_key_pair, init_token, BackupPolicy, KeySelector, KeySpec,
    Module, TokenSelector,
};
use rustls_hsm::{HsmKey, HsmToken};
use secrecy::SecretString;
use time::OffsetDateTime;
use tracing::info;

use crate::setup::{self, Served};
use crate::{Args, ClientAuth};

/// The dev token's label.
pub(crate) const TOKEN_LABEL: &str = "rustls-hsm-dev";

/// Where Debian's SoftHSM package puts its module.
const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The keys on the dev token: label and type.
const KEYS: [(&str, &str); 4] = [
    ("dev-ca", "ec:p256"),
    ("dev-server-ec", "ec:p256"),
    ("dev-server-rsa", "rsa:2048"),
    ("dev-client", "ec:p256"),
];

/// Certificates are issued again when they have less than this many days left.
const RENEW_DAYS: i64 = 7;

/// The files of a dev state directory, as absolute paths.
#[derive(Clone, Debug)]
pub(crate) struct DevPaths {
    dir: PathBuf,
    so_pin: PathBuf,
    user_pin: PathBuf,
    guard: PathBuf,
    /// The dev CA's certificate.
    pub(crate) ca: PathBuf,
    server_ec: PathBuf,
    server_rsa: PathBuf,
    client: PathBuf,
}

impl DevPaths {
    fn new(dir: PathBuf) -> Self {
        Self {
            so_pin: dir.join("so.pin"),
            user_pin: dir.join("user.pin"),
            guard: dir.join("pin-guard.json"),
            ca: dir.join("ca.pem"),
            server_ec: dir.join("server-ec.pem"),
            server_rsa: dir.join("server-rsa.pem"),
            client: dir.join("client.pem"),
            dir,
        }
    }
}

/// Creates the state directory and its `softhsm2.conf`, and points `SOFTHSM2_CONF` at it.
///
/// SoftHSM reads `SOFTHSM2_CONF` once, in `C_Initialize`, so it must be in this process's
/// environment before the module loads; a child process would not help, the module is loaded
/// here. And the environment may be changed only while no other thread exists: `setenv` races
/// with `getenv` in any other thread (libc, the module, the runtime's workers) and can crash
/// it. So `main` calls this first, before tracing, the runtime or the module start a thread.
pub(crate) fn claim_environment(state_dir: &Path) -> anyhow::Result<DevPaths> {
    let tokens = state_dir.join("tokens");
    fs::create_dir_all(&tokens)
        .with_context(|| format!("cannot create the dev state directory {}", tokens.display()))?;
    let dir = fs::canonicalize(state_dir)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    let conf = dir.join("softhsm2.conf");
    let text = format!(
        "# Written by the rustls-hsm example server (--dev); the token store is next to it.\n\
         directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
         slots.removable = false\n",
        dir.join("tokens").display()
    );
    if fs::read_to_string(&conf)
        .ok()
        .as_deref()
        != Some(text.as_str())
    {
        fs::write(&conf, text).with_context(|| format!("cannot write {}", conf.display()))?;
    }
    #[allow(clippy::disallowed_methods)] // the one thread-safe moment: see above
    std::env::set_var("SOFTHSM2_CONF", &conf);
    Ok(DevPaths::new(dir))
}

/// Creates or reuses the dev token, its keys and certificates, and returns what to serve.
pub(crate) fn prepare(paths: &DevPaths, args: &Args) -> anyhow::Result<Served> {
    let module_path = args
        .module
        .clone()
        .unwrap_or_else(|| PathBuf::from(SOFTHSM_MODULE));
    let module = Module::load(&module_path)?;
    let so_pin = read_or_create_pin(&paths.so_pin)?;
    let user_pin = read_or_create_pin(&paths.user_pin)?;
    let selector = TokenSelector::Label(TOKEN_LABEL.into());
    match find_token(&module, &selector) {
        Ok(_) => {}
        Err(rustls_hsm::pkcs11::Error::TokenNotFound { .. }) => {
            let token = init_token(&module, None, TOKEN_LABEL, &so_pin, &user_pin, false)?;
            info!(token = %token.describe(), "created the dev token");
        }
        Err(e) => return Err(e.into()),
    }

    let mut builder = HsmToken::builder()
        .module(module)
        .token(selector)
        .pin(PinSource::File(paths.user_pin.clone()))
        .pin_guard_file(&paths.guard);
    if let Some(size) = args.pool_size {
        builder = builder.pool_size(size);
    }
    let token = builder.build()?;
    token.with_session(ensure_keys)??;
    let [ca_key, ec_key, rsa_key, client_key] =
        KEYS.map(|(label, _)| token.key(&KeySelector::label(label)));
    let (ca_key, ec_key, rsa_key, client_key) = (ca_key?, ec_key?, rsa_key?, client_key?);

    let certs = DevCerts::ensure(paths, &ca_key, &ec_key, &rsa_key, &client_key)?;
    let certified = [
        (ec_key.clone(), ec_key.certified_key(vec![certs.server_ec])?),
        (
            rsa_key.clone(),
            rsa_key.certified_key(vec![certs.server_rsa])?,
        ),
    ];
    let client_roots = match (&args.client_ca, args.client_auth) {
        (Some(path), _) => Some(setup::read_roots(path)?),
        (None, Some(_)) => Some(setup::read_roots(&paths.ca)?),
        (None, None) => None,
    };
    let client_auth = client_roots.as_ref().map(|_| {
        args.client_auth
            .unwrap_or(ClientAuth::Required)
    });
    setup::served(token, &certified, client_roots, client_auth)
}

/// Prints commands to try the server with, for a terminal.
pub(crate) fn print_try_commands(paths: &DevPaths, addr: SocketAddr, client_auth: bool) {
    let ca = paths.ca.display();
    let port = addr.port();
    println!("dev token `{TOKEN_LABEL}` in {}", paths.dir.display());
    println!("try:");
    println!("  curl --cacert {ca} https://localhost:{port}/");
    println!("  openssl s_client -connect localhost:{port} -CAfile {ca} -servername localhost");
    if client_auth {
        println!(
            "  cargo run --example tls_client -- --dev --state-dir {} --url https://localhost:{port}/",
            paths.dir.display()
        );
    }
}

/// Generates each dev key that is not on the token yet.
fn ensure_keys(session: &cryptoki::session::Session) -> anyhow::Result<()> {
    for (label, spec) in KEYS {
        match find_key(session, &KeySelector::label(label), TOKEN_LABEL, true) {
            Ok(_) => {}
            Err(rustls_hsm::pkcs11::Error::KeyNotFound { .. }) => {
                let spec: KeySpec = spec.parse()?;
                generate_key_pair(session, TOKEN_LABEL, label, spec, None, BackupPolicy::None)?;
                info!(key = label, kind = %spec, "generated a dev key");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The dev certificates, as served.
struct DevCerts {
    server_ec: CertificateDer<'static>,
    server_rsa: CertificateDer<'static>,
}

impl DevCerts {
    /// Reuses each certificate file that still fits its key and CA; issues the others.
    fn ensure(
        paths: &DevPaths,
        ca_key: &HsmKey,
        ec_key: &HsmKey,
        rsa_key: &HsmKey,
        client_key: &HsmKey,
    ) -> anyhow::Result<Self> {
        let (ca_cert, ca_new) = match reusable(&paths.ca, ca_key, None)? {
            Some(cert) => (cert, false),
            None => {
                let profile =
                    CertProfile::new(CertUsage::Ca, "CN=rustls-hsm dev CA,O=rustls-hsm".parse()?)
                        .days(3650)?;
                let cert = cert::self_signed(ca_key, &profile)?;
                write_pem(&paths.ca, &cert)?;
                info!(path = %paths.ca.display(), "issued the dev CA certificate");
                (cert, true)
            }
        };
        let ca = cert::parse_certificate(&ca_cert)?;
        let server = |key: &HsmKey, path: &Path| -> anyhow::Result<CertificateDer<'static>> {
            let profile = CertProfile::new(CertUsage::Server, "CN=localhost".parse()?)
                .sans(localhost_names())
                .days(90)?;
            leaf(path, key, &ca_cert, &ca, ca_key, ca_new, &profile)
        };
        let server_ec = server(ec_key, &paths.server_ec)?;
        let server_rsa = server(rsa_key, &paths.server_rsa)?;
        let client_profile = CertProfile::new(
            CertUsage::Client,
            "CN=rustls-hsm dev client,O=rustls-hsm".parse()?,
        )
        .days(90)?;
        leaf(
            &paths.client,
            client_key,
            &ca_cert,
            &ca,
            ca_key,
            ca_new,
            &client_profile,
        )?;
        Ok(Self {
            server_ec,
            server_rsa,
        })
    }
}

/// The leaf at `path` if it still fits, else a new one issued by the dev CA.
fn leaf(
    path: &Path,
    key: &HsmKey,
    ca_cert: &CertificateDer<'_>,
    ca: &ParsedCertificate,
    ca_key: &HsmKey,
    ca_new: bool,
    profile: &CertProfile,
) -> anyhow::Result<CertificateDer<'static>> {
    if !ca_new {
        if let Some(cert) = reusable(path, key, Some(ca))? {
            return Ok(cert);
        }
    }
    let cert = cert::issue(ca_key, ca_cert, key.spki(), profile)?;
    write_pem(path, &cert)?;
    info!(path = %path.display(), key = key.label(), "issued a dev certificate");
    Ok(cert)
}

fn localhost_names() -> Vec<SubjectAltName> {
    vec![
        SubjectAltName::Dns("localhost".into()),
        SubjectAltName::Ip([127, 0, 0, 1].into()),
        SubjectAltName::Ip(std::net::Ipv6Addr::LOCALHOST.into()),
    ]
}

/// The certificate in `path` if it holds `key`'s public key, was issued by `issuer` (or is
/// self-issued when `issuer` is `None`) and is valid for a while yet.
fn reusable(
    path: &Path,
    key: &HsmKey,
    issuer: Option<&ParsedCertificate>,
) -> anyhow::Result<Option<CertificateDer<'static>>> {
    let Ok(pem) = fs::read(path) else {
        return Ok(None);
    };
    let Some(cert) = cert::chain_from_pem(&pem)
        .ok()
        .and_then(|chain| chain.into_iter().next())
    else {
        return Ok(None);
    };
    let Ok(parsed) = cert::parse_certificate(&cert) else {
        return Ok(None);
    };
    let issued_right = match issuer {
        Some(issuer) => parsed.issuer_der == issuer.subject_der,
        None => parsed.is_self_issued(),
    };
    let fresh = parsed.not_after > OffsetDateTime::now_utc() + time::Duration::days(RENEW_DAYS);
    Ok((parsed.spki_der == key.spki() && issued_right && fresh).then_some(cert))
}

fn write_pem(path: &Path, cert: &CertificateDer<'_>) -> anyhow::Result<()> {
    fs::write(path, cert::chain_to_pem(std::slice::from_ref(cert)))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a PIN file, or creates it with 12 random digits, readable only by this user.
fn read_or_create_pin(path: &Path) -> anyhow::Result<SecretString> {
    if !path.exists() {
        let mut bytes = [0u8; 12];
        getrandom::getrandom(&mut bytes).context("no randomness for a PIN")?;
        let pin: String = bytes
            .iter()
            .map(|b| char::from(b'0' + b % 10))
            .collect();
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.write_all(pin.as_bytes())?;
    }
    Ok(PinSource::File(path.to_owned()).read("dev PIN")?)
}
