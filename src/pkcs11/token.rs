//! Finding a token by label, serial or URI, and the token-wide operations an operator needs:
//! initialisation, PIN change and unlock.
//!
//! Slot ids are never a stable name (SoftHSM moves a token to a new slot when it is
//! initialised), so a token is always found again by what it says about itself.

use std::fmt;
use std::str::FromStr;

use cryptoki::session::UserType;
use cryptoki::slot::{Slot, TokenInfo};
use secrecy::SecretString;
use tracing::warn;

use super::{Error, Module, Pkcs11Uri};

/// The most bytes a token label can hold (`CK_TOKEN_INFO.label`).
pub const MAX_LABEL_LEN: usize = 32;

/// How to pick one token among the module's slots.
///
/// Parsed from `pkcs11:...` (a URI), `serial:XYZ`, `label:NAME` or a plain label.
#[derive(Clone, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum TokenSelector {
    /// The token whose label is exactly this (after trimming the padding).
    Label(String),
    /// The token with this serial number.
    Serial(String),
    /// Every token attribute the URI names must match.
    Uri(Box<Pkcs11Uri>),
}

impl TokenSelector {
    fn matches(&self, slot: Slot, info: &TokenInfo) -> bool {
        match self {
            Self::Label(label) => trim_field(info.label()) == trim_field(label),
            Self::Serial(serial) => trim_field(info.serial_number()) == trim_field(serial),
            Self::Uri(uri) => {
                let same = |want: &Option<String>, have: &str| {
                    want.as_deref()
                        .is_none_or(|w| trim_field(w) == trim_field(have))
                };
                same(&uri.token, info.label())
                    && same(&uri.serial, info.serial_number())
                    && same(&uri.model, info.model())
                    && same(&uri.manufacturer, info.manufacturer_id())
                    && uri
                        .slot_id
                        .is_none_or(|id| id == slot.id())
            }
        }
    }
}

impl FromStr for TokenSelector {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| Error::TokenSelector {
            selector: s.to_owned(),
            reason: reason.to_owned(),
        };
        let selector = if s.starts_with("pkcs11:") {
            let uri: Pkcs11Uri = s.parse()?;
            if !uri.has_token_attributes() {
                return Err(bad(
                    "the URI names no token attribute (token=, serial=, model=, manufacturer=)",
                ));
            }
            if uri.token.is_none()
                && uri.serial.is_none()
                && uri.model.is_none()
                && uri.manufacturer.is_none()
            {
                return Err(bad(
                    "slot-id alone does not name a token: slot ids change when tokens are \
                     initialised; add token= or serial=",
                ));
            }
            Self::Uri(Box::new(uri))
        } else if let Some(serial) = s.strip_prefix("serial:") {
            Self::Serial(serial.to_owned())
        } else {
            Self::Label(
                s.strip_prefix("label:")
                    .unwrap_or(s)
                    .to_owned(),
            )
        };
        if let Self::Label(label) | Self::Serial(label) = &selector {
            if label.is_empty() {
                return Err(bad("it is empty"));
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(bad("token labels and serials hold at most 32 bytes"));
            }
        }
        Ok(selector)
    }
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Label(label) => write!(f, "label:{label}"),
            Self::Serial(serial) => write!(f, "serial:{serial}"),
            Self::Uri(uri) => {
                let parts: Vec<String> = [
                    uri.token
                        .as_ref()
                        .map(|v| format!("token={v}")),
                    uri.serial
                        .as_ref()
                        .map(|v| format!("serial={v}")),
                    uri.model
                        .as_ref()
                        .map(|v| format!("model={v}")),
                    uri.manufacturer
                        .as_ref()
                        .map(|v| format!("manufacturer={v}")),
                    uri.slot_id
                        .map(|v| format!("slot-id={v}")),
                ]
                .into_iter()
                .flatten()
                .collect();
                write!(f, "pkcs11:{}", parts.join(";"))
            }
        }
    }
}

/// A token found in a slot, with what it said about itself when found.
#[derive(Clone, Debug)]
pub struct Token {
    /// The slot it sits in now (not a stable name).
    pub slot: Slot,
    /// The token's label, padding removed.
    pub label: String,
    /// The token's serial number, padding removed.
    pub serial: String,
    /// `CK_TOKEN_INFO` as read.
    pub info: TokenInfo,
}

impl Token {
    fn new(slot: Slot, info: TokenInfo) -> Self {
        Self {
            slot,
            label: trim_field(info.label()).to_owned(),
            serial: trim_field(info.serial_number()).to_owned(),
            info,
        }
    }

    /// Reads the token's flags again (PIN counters change with every login attempt).
    pub fn refresh(&self, module: &Module) -> Result<TokenInfo, Error> {
        module
            .context()
            .get_token_info(self.slot)
            .map_err(Error::pkcs11("read token info"))
    }

    /// One line naming the token for messages: label, serial, slot.
    pub fn describe(&self) -> String {
        format!(
            "`{}` (serial {}, slot {:#x})",
            self.label,
            self.serial,
            self.slot.id()
        )
    }
}

/// The user PIN's state as the token reports it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum PinState {
    /// At least one wrong PIN was entered since the last good login.
    CountLow,
    /// The next wrong PIN locks the token.
    FinalTry,
    /// The PIN is locked; the security officer must reset it.
    Locked,
    /// No failure reported.
    Ok,
}

impl PinState {
    /// The user PIN state from token flags.
    pub fn user(info: &TokenInfo) -> Self {
        if info.user_pin_locked() {
            Self::Locked
        } else if info.user_pin_final_try() {
            Self::FinalTry
        } else if info.user_pin_count_low() {
            Self::CountLow
        } else {
            Self::Ok
        }
    }

    /// The SO PIN state from token flags.
    pub fn so(info: &TokenInfo) -> Self {
        if info.so_pin_locked() {
            Self::Locked
        } else if info.so_pin_final_try() {
            Self::FinalTry
        } else if info.so_pin_count_low() {
            Self::CountLow
        } else {
            Self::Ok
        }
    }

    /// Words for reports: `ok`, `count low`, `final try`, `locked`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CountLow => "count low",
            Self::FinalTry => "final try",
            Self::Locked => "locked",
            Self::Ok => "ok",
        }
    }
}

/// Every slot with its token, if any: `(slot, Some(token info))`.
pub fn list_slots(module: &Module) -> Result<Vec<(Slot, Option<Token>)>, Error> {
    let ctx = module.context();
    let slots = ctx
        .get_all_slots()
        .map_err(Error::pkcs11("list slots"))?;
    let mut out = Vec::with_capacity(slots.len());
    for slot in slots {
        let info = ctx
            .get_slot_info(slot)
            .map_err(Error::pkcs11("read slot info"))?;
        let token = if info.token_present() {
            Some(Token::new(
                slot,
                ctx.get_token_info(slot)
                    .map_err(Error::pkcs11("read token info"))?,
            ))
        } else {
            None
        };
        out.push((slot, token));
    }
    Ok(out)
}

/// Finds the one initialised token that matches `selector`.
///
/// # Errors
///
/// [`Error::TokenNotFound`] listing the tokens present, or [`Error::TokenAmbiguous`] listing
/// every match when more than one token fits.
pub fn find_token(module: &Module, selector: &TokenSelector) -> Result<Token, Error> {
    let tokens: Vec<Token> = list_slots(module)?
        .into_iter()
        .filter_map(|(_, token)| token)
        .filter(|t| t.info.token_initialized())
        .collect();
    if let TokenSelector::Uri(uri) = selector {
        if uri.slot_id.is_some() {
            warn!(
                selector = %selector,
                "selecting a token by slot-id: slot ids change when tokens are initialised; \
                 prefer token= or serial="
            );
        }
    }
    let mut matches: Vec<&Token> = tokens
        .iter()
        .filter(|t| selector.matches(t.slot, &t.info))
        .collect();
    match matches.len() {
        1 => Ok(matches.remove(0).clone()),
        0 => Err(Error::TokenNotFound {
            selector: selector.to_string(),
            available: describe_all(tokens.iter()),
        }),
        count => Err(Error::TokenAmbiguous {
            selector: selector.to_string(),
            count,
            matches: describe_all(matches.into_iter()),
        }),
    }
}

/// Initialises a token and sets its user PIN, returning it as found afterwards.
///
/// The token goes into `slot`, or else into the first slot whose token is not initialised. A
/// label already used by another token is refused. Re-initialising a token that is already
/// initialised destroys every object on it, so it needs `reinitialize`.
pub fn init_token(
    module: &Module,
    slot: Option<u64>,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
    reinitialize: bool,
) -> Result<Token, Error> {
    let refuse = |msg: String| Err(Error::TokenRefused(msg));
    if label.is_empty() || label.len() > MAX_LABEL_LEN {
        return refuse(format!(
            "token label must be 1 to {MAX_LABEL_LEN} bytes, `{label}` has {}",
            label.len()
        ));
    }
    if trim_field(label) != label {
        return refuse(format!(
            "token label `{label}` ends in blanks, which the token's blank padding would drop; \
             use `{}`",
            trim_field(label)
        ));
    }
    let slots = list_slots(module)?;
    let target = match slot {
        Some(id) => slots
            .iter()
            .find(|(s, _)| s.id() == id)
            .ok_or_else(|| {
                Error::TokenRefused(format!("there is no slot with id {id:#x} ({id})"))
            })?,
        None => slots
            .iter()
            .find(|(_, t)| {
                t.as_ref()
                    .is_some_and(|t| !t.info.token_initialized())
            })
            .ok_or_else(|| {
                Error::TokenRefused(
                    "no slot holds an uninitialised token; pass --slot-id to re-initialise one"
                        .into(),
                )
            })?,
    };
    let (target_slot, target_token) = (target.0, target.1.as_ref());
    let Some(existing) = target_token else {
        return refuse(format!("slot {:#x} holds no token", target_slot.id()));
    };
    if existing.info.token_initialized() && !reinitialize {
        return refuse(format!(
            "token {} is already initialised; re-initialising destroys every key on it, so it \
             needs --reinitialize (and typing the label) or --yes-destroy-all-keys",
            existing.describe()
        ));
    }
    if let Some((_, Some(other))) = slots.iter().find(|(s, t)| {
        *s != target_slot
            && t.as_ref()
                .is_some_and(|t| t.info.token_initialized() && t.label == label)
    }) {
        return refuse(format!(
            "label `{label}` is already used by token {}; token labels must be unique",
            other.describe()
        ));
    }

    let ctx = module.context();
    ctx.init_token(target_slot, so_pin, label)
        .map_err(Error::pkcs11("initialise token (C_InitToken)"))?;
    // SoftHSM moves the token to a new slot: find it again by label.
    let token = find_token(module, &TokenSelector::Label(label.to_owned()))?;
    set_user_pin_as_so(module, &token, so_pin, user_pin)?;
    find_token(module, &TokenSelector::Label(label.to_owned()))
}

/// Changes the user PIN (`C_SetPIN` in a user session).
///
/// Logs in with [`super::login_user`], so a PIN on its final try is not tried; a new PIN equal
/// to the current one is refused.
pub fn change_user_pin(
    module: &Module,
    token: &Token,
    old_pin: &SecretString,
    new_pin: &SecretString,
) -> Result<(), Error> {
    if crate::pin::same_pin(old_pin, new_pin) {
        return Err(Error::TokenRefused(
            "the new user PIN is the same as the current one; nothing was changed".into(),
        ));
    }
    let session = super::login_user(module, token, old_pin)?;
    session
        .set_pin(old_pin, new_pin)
        .map_err(Error::pkcs11("change the user PIN (C_SetPIN)"))?;
    session
        .logout()
        .map_err(Error::pkcs11("log out"))
}

/// The security officer sets a new user PIN, which also unlocks a locked one (`C_InitPIN`).
pub fn unlock_user_pin(
    module: &Module,
    token: &Token,
    so_pin: &SecretString,
    new_user_pin: &SecretString,
) -> Result<(), Error> {
    refuse_if_locked(module, token, UserType::So)?;
    set_user_pin_as_so(module, token, so_pin, new_user_pin)
}

/// Sets the user PIN in a security-officer session (`C_InitPIN`).
fn set_user_pin_as_so(
    module: &Module,
    token: &Token,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<(), Error> {
    let session = module
        .context()
        .open_rw_session(token.slot)
        .map_err(Error::pkcs11("open session"))?;
    super::login::login_so_on(&session, token, so_pin)?;
    session
        .init_pin(user_pin)
        .map_err(Error::pkcs11("set the user PIN (C_InitPIN)"))?;
    session
        .logout()
        .map_err(Error::pkcs11("log out"))
}

/// Refuses an interactive login that would spend the PIN's last try or hit a locked PIN.
fn refuse_if_locked(module: &Module, token: &Token, user: UserType) -> Result<(), Error> {
    let info = token.refresh(module)?;
    let (state, who) = match user {
        UserType::So => (PinState::so(&info), "SO PIN"),
        _ => (PinState::user(&info), "user PIN"),
    };
    match state {
        PinState::Locked => Err(Error::TokenRefused(format!(
            "the {who} of token {} is locked{}",
            token.describe(),
            if matches!(user, UserType::So) {
                "; only re-initialising the token helps"
            } else {
                "; the security officer resets it with `rustls-hsm token unlock`"
            }
        ))),
        PinState::FinalTry => Err(Error::TokenRefused(format!(
            "the {who} of token {} is on its final try; not attempting login (a wrong PIN \
             would lock it); check the PIN, then use pkcs11-tool or the vendor tool by hand",
            token.describe()
        ))),
        _ => Ok(()),
    }
}

/// Strips the blank padding of a `CK_TOKEN_INFO` text field, and NULs some tokens use instead.
pub(crate) fn trim_field(field: &str) -> &str {
    field.trim_end_matches([' ', '\0'])
}

fn describe_all<'a>(tokens: impl Iterator<Item = &'a Token>) -> String {
    let all: Vec<String> = tokens.map(Token::describe).collect();
    if all.is_empty() {
        "none".into()
    } else {
        all.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_selectors() {
        assert_eq!(
            "signer"
                .parse::<TokenSelector>()
                .unwrap(),
            TokenSelector::Label("signer".into())
        );
        assert_eq!(
            "serial:abc"
                .parse::<TokenSelector>()
                .unwrap(),
            TokenSelector::Serial("abc".into())
        );
        assert!(matches!(
            "pkcs11:token=a%20b".parse::<TokenSelector>().unwrap(),
            TokenSelector::Uri(uri) if uri.token.as_deref() == Some("a b")
        ));
        assert!("pkcs11:object=x"
            .parse::<TokenSelector>()
            .is_err());
        // A slot number alone is no name for a token; with a label it narrows the match.
        assert!("pkcs11:slot-id=3"
            .parse::<TokenSelector>()
            .is_err());
        assert!("pkcs11:token=a;slot-id=3"
            .parse::<TokenSelector>()
            .is_ok());
        assert!("".parse::<TokenSelector>().is_err());
        assert!("x"
            .repeat(33)
            .parse::<TokenSelector>()
            .is_err());
    }

    #[test]
    fn trims_blanks_and_nuls_only_at_the_end() {
        assert_eq!(trim_field("SW   TPM\0\0\0"), "SW   TPM");
        assert_eq!(trim_field("signer                "), "signer");
    }
}
