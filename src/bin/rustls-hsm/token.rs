//! `rustls-hsm token`: list tokens, initialise one, change or reset its user PIN.

use anyhow::Context;
use clap::Subcommand;
use rustls_hsm::pin::PinSource;
use rustls_hsm::pkcs11::{
    change_user_pin, find_token, init_token, list_slots, unlock_user_pin, Module, Token,
    TokenSelector,
};
use serde::Serialize;

use crate::common::{confirm_by_typing, print_json, read_pin, token_flags, PinSourceParser};

/// The `token` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Change the user PIN, logging in with the current one.
    ChangePin {
        /// The token: its label, `serial:XYZ` or a `pkcs11:token=...` URI.
        #[arg(long, value_name = "SEL")]
        token: TokenSelector,
        /// Where to read the current user PIN (env:NAME, file:PATH, cmd:COMMAND or prompt).
        #[arg(long, value_name = "SOURCE", value_parser = PinSourceParser, allow_hyphen_values = true)]
        pin: PinSource,
        /// Where to read the new user PIN.
        #[arg(long, value_name = "SOURCE", value_parser = PinSourceParser, allow_hyphen_values = true)]
        new_pin: PinSource,
    },
    /// Initialise a token and set its user PIN.
    Init(InitArgs),
    /// List every slot and its token.
    List {
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// As security officer, set a new user PIN; this also unlocks a locked one.
    Unlock {
        /// The token: its label, `serial:XYZ` or a `pkcs11:token=...` URI.
        #[arg(long, value_name = "SEL")]
        token: TokenSelector,
        /// Where to read the SO PIN.
        #[arg(long, value_name = "SOURCE", value_parser = PinSourceParser, allow_hyphen_values = true)]
        so_pin: PinSource,
        /// Where to read the new user PIN.
        #[arg(long, value_name = "SOURCE", value_parser = PinSourceParser, allow_hyphen_values = true)]
        new_pin: PinSource,
    },
}

/// Options of `token init`.
#[derive(Debug, clap::Args)]
pub(crate) struct InitArgs {
    /// The new token's label (1 to 32 bytes, unique among the module's tokens).
    #[arg(long)]
    label: String,
    /// Where to read the SO PIN (env:NAME, file:PATH, cmd:COMMAND or prompt).
    #[arg(long, value_name = "SOURCE", value_parser = PinSourceParser, allow_hyphen_values = true)]
    so_pin: PinSource,
    /// Where to read the new user PIN.
    #[arg(long, value_name = "SOURCE", value_parser = PinSourceParser, allow_hyphen_values = true)]
    pin: PinSource,
    /// The slot to use; by default the first slot whose token is not initialised.
    #[arg(long, value_name = "N", value_parser = parse_slot_id)]
    slot_id: Option<u64>,
    /// Re-initialise an initialised token (destroys every key), after typing its label.
    #[arg(long)]
    reinitialize: bool,
    /// Re-initialise an initialised token without asking (destroys every key).
    #[arg(long)]
    yes_destroy_all_keys: bool,
}

/// Runs a `token` subcommand.
pub(crate) fn run(module: &Module, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::ChangePin {
            token,
            pin,
            new_pin,
        } => {
            let token = find_token(module, &token)?;
            let old = read_pin(&pin, "current user PIN")?;
            let new = read_pin(&new_pin, "new user PIN")?;
            change_user_pin(module, &token, &old, &new)?;
            outln!("changed the user PIN of token {}", token.describe());
            Ok(())
        }
        TokenCommand::Init(args) => init(module, &args),
        TokenCommand::List { json } => list(module, json),
        TokenCommand::Unlock {
            token,
            so_pin,
            new_pin,
        } => {
            let token = find_token(module, &token)?;
            let so = read_pin(&so_pin, "SO PIN")?;
            let new = read_pin(&new_pin, "new user PIN")?;
            unlock_user_pin(module, &token, &so, &new)?;
            outln!("set a new user PIN on token {}", token.describe());
            Ok(())
        }
    }
}

/// The `token list --json` document: `{"slots": [...]}`.
#[derive(Debug, Serialize)]
struct SlotList {
    slots: Vec<SlotEntry>,
}

/// One slot in `token list --json`.
///
/// Fields: `slot_id` (number; not a stable name), `slot_description`, `token_present`, and
/// `token` (null when no token is present).
#[derive(Debug, Serialize)]
struct SlotEntry {
    slot_id: u64,
    slot_description: String,
    token_present: bool,
    token: Option<TokenEntry>,
}

/// A token in `token list --json`.
///
/// Fields: `label`, `serial`, `model`, `manufacturer` (padding removed), `initialized`, and
/// `flags` (token flags in words, e.g. `login_required`).
#[derive(Debug, Serialize)]
struct TokenEntry {
    label: String,
    serial: String,
    model: String,
    manufacturer: String,
    initialized: bool,
    flags: Vec<&'static str>,
}

impl TokenEntry {
    fn new(token: &Token) -> Self {
        Self {
            label: token.label.clone(),
            serial: token.serial.clone(),
            model: trim(token.info.model()),
            manufacturer: trim(token.info.manufacturer_id()),
            initialized: token.info.token_initialized(),
            flags: token_flags(&token.info),
        }
    }
}

fn list(module: &Module, json: bool) -> anyhow::Result<()> {
    let mut entries = Vec::new();
    for (slot, token) in list_slots(module)? {
        let description = module
            .context()
            .get_slot_info(slot)
            .map(|info| trim(info.slot_description()))
            .unwrap_or_default();
        entries.push(SlotEntry {
            slot_id: slot.id(),
            slot_description: description,
            token_present: token.is_some(),
            token: token.as_ref().map(TokenEntry::new),
        });
    }
    if json {
        return print_json(&SlotList { slots: entries });
    }
    for slot in &entries {
        outln!("slot {:#x} ({})", slot.slot_id, slot.slot_description);
        let Some(token) = &slot.token else {
            outln!("  no token");
            continue;
        };
        if token.initialized {
            outln!("  label:        {}", token.label);
            outln!("  serial:       {}", token.serial);
        } else {
            outln!("  token not initialised (free for `rustls-hsm token init`)");
        }
        outln!("  model:        {}", token.model);
        outln!("  manufacturer: {}", token.manufacturer);
        outln!("  flags:        {}", token.flags.join(", "));
    }
    Ok(())
}

fn init(module: &Module, args: &InitArgs) -> anyhow::Result<()> {
    let reinitialize = if args.yes_destroy_all_keys {
        true
    } else if args.reinitialize {
        confirm_reinitialize(module, args.slot_id)?;
        true
    } else {
        false
    };
    // LIMITATION: both PINs are read before `init_token` checks the label and the slot, so a
    // refused init may already have prompted for them; checking first would need those checks
    // split out of `init_token` as a separate library function.
    let so_pin = read_pin(&args.so_pin, "SO PIN")?;
    let user_pin = read_pin(&args.pin, "user PIN")?;
    let token = init_token(
        module,
        args.slot_id,
        &args.label,
        &so_pin,
        &user_pin,
        reinitialize,
    )
    .context("token init")?;
    let token = find_again(module, &token)?;
    outln!("initialised token {}", token.describe());
    Ok(())
}

/// Finds a token just initialised as every later run will see it.
///
/// SoftHSM gives an initialised token its lasting slot id only at the next `C_Initialize`; until
/// then it stays in the slot it was initialised in, so the module is initialised afresh first.
fn find_again(module: &Module, token: &Token) -> anyhow::Result<Token> {
    module
        .reinitialize(module.generation())
        .context("re-initialising the module to read the new slot list")?;
    let selector = if token.serial.is_empty() {
        TokenSelector::Label(token.label.clone())
    } else {
        TokenSelector::Serial(token.serial.clone())
    };
    Ok(find_token(module, &selector)?)
}

/// Asks for the label of the token that `--reinitialize` would wipe, if it holds one.
fn confirm_reinitialize(module: &Module, slot_id: Option<u64>) -> anyhow::Result<()> {
    // Without --slot-id only an uninitialised token is chosen, so nothing can be destroyed.
    let Some(id) = slot_id else {
        return Ok(());
    };
    let existing = list_slots(module)?
        .into_iter()
        .find(|(slot, _)| slot.id() == id)
        .and_then(|(_, token)| token)
        .filter(|token| token.info.token_initialized());
    match existing {
        Some(token) => confirm_by_typing(
            &token.label,
            &format!(
                "re-initialising token {} destroys every key on it",
                token.describe()
            ),
            "--yes-destroy-all-keys",
        ),
        None => Ok(()),
    }
}

fn parse_slot_id(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| "a slot id is a decimal or 0x-prefixed hexadecimal number".to_owned())
}

fn trim(field: &str) -> String {
    field
        .trim_end_matches([' ', '\0'])
        .to_owned()
}
