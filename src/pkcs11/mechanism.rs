//! The mechanisms a token offers, read once and kept for scheme planning and reports.

use std::collections::BTreeMap;

use cryptoki::mechanism::{MechanismInfo, MechanismType};
use cryptoki::slot::Slot;
use tracing::debug;

use super::{Error, Module};

/// Mechanisms that some tokens serve without listing them (tpm2-pkcs11's PSS, depending on how
/// the token was made); asked about one by one with `C_GetMechanismInfo`.
const PROBED_UNLISTED: [MechanismType; 4] = [
    MechanismType::RSA_PKCS_PSS,
    MechanismType::SHA256_RSA_PKCS_PSS,
    MechanismType::SHA384_RSA_PKCS_PSS,
    MechanismType::SHA512_RSA_PKCS_PSS,
];

/// A token's mechanisms with their `C_GetMechanismInfo`, keyed by mechanism number.
#[derive(Clone, Debug, Default)]
pub struct MechanismList {
    infos: BTreeMap<u64, (MechanismType, MechanismInfo)>,
    /// Mechanisms that answered `C_GetMechanismInfo` although `C_GetMechanismList` omitted them.
    unlisted: Vec<MechanismType>,
}

impl MechanismList {
    /// Reads the token's mechanism list and each mechanism's info.
    pub fn read(module: &Module, slot: Slot) -> Result<Self, Error> {
        let ctx = module.context();
        let listed = ctx
            .get_mechanism_list(slot)
            .map_err(Error::pkcs11("list mechanisms"))?;
        let mut list = Self::default();
        for mechanism in &listed {
            match ctx.get_mechanism_info(slot, *mechanism) {
                Ok(info) => {
                    list.infos
                        .insert(mech_number(*mechanism), (*mechanism, info));
                }
                Err(e) => debug!(%mechanism, error = %e, "mechanism listed but no info"),
            }
        }
        for mechanism in PROBED_UNLISTED {
            if list
                .infos
                .contains_key(&mech_number(mechanism))
            {
                continue;
            }
            if let Ok(info) = ctx.get_mechanism_info(slot, mechanism) {
                list.infos
                    .insert(mech_number(mechanism), (mechanism, info));
                list.unlisted.push(mechanism);
            }
        }
        Ok(list)
    }

    /// The info of a mechanism, if the token has it.
    pub fn get(&self, mechanism: MechanismType) -> Option<&MechanismInfo> {
        self.infos
            .get(&mech_number(mechanism))
            .map(|(_, info)| info)
    }

    /// True when the token can sign with `mechanism` using a key of `key_bits` bits.
    ///
    /// Tokens report key sizes in bits for RSA and EC alike (PKCS#11 2.40 and later); a token
    /// that reports 0 as the maximum puts no limit there.
    pub fn can_sign(&self, mechanism: MechanismType, key_bits: usize) -> bool {
        self.get(mechanism).is_some_and(|info| {
            info.sign()
                && (info.min_key_size() == 0 || key_bits >= info.min_key_size())
                && (info.max_key_size() == 0 || key_bits <= info.max_key_size())
        })
    }

    /// True when the mechanism was found only by asking for it.
    pub fn is_unlisted(&self, mechanism: MechanismType) -> bool {
        self.unlisted.contains(&mechanism)
    }

    /// Every mechanism with its info, in numeric order.
    pub fn iter(&self) -> impl Iterator<Item = (MechanismType, &MechanismInfo)> {
        self.infos
            .values()
            .map(|(m, info)| (*m, info))
    }

    /// How many mechanisms the token offers.
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    /// True when the token offers none.
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }
}

/// The mechanism's flags in words, e.g. `["sign", "verify"]`.
pub fn mechanism_flags(info: &MechanismInfo) -> Vec<&'static str> {
    [
        (info.hardware(), "hw"),
        (info.encrypt(), "encrypt"),
        (info.decrypt(), "decrypt"),
        (info.digest(), "digest"),
        (info.sign(), "sign"),
        (info.sign_recover(), "sign_recover"),
        (info.verify(), "verify"),
        (info.verify_recover(), "verify_recover"),
        (info.generate(), "generate"),
        (info.generate_key_pair(), "generate_key_pair"),
        (info.wrap(), "wrap"),
        (info.unwrap(), "unwrap"),
        (info.derive(), "derive"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect()
}

#[allow(clippy::useless_conversion)]
fn mech_number(mechanism: MechanismType) -> u64 {
    u64::from(*mechanism)
}
