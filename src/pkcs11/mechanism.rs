//! The mechanisms a token offers, read once and kept for scheme planning and reports.

use std::collections::BTreeMap;

use cryptoki::mechanism::{MechanismInfo, MechanismType};
use cryptoki::slot::Slot;
use tracing::debug;

use super::{Error, Module};

/// Mechanisms some tokens answer `C_GetMechanismInfo` for without listing them (tpm2-pkcs11's
/// PSS, depending on how the token was made). They are asked about for reports only: a
/// mechanism the token does not list is never planned, since tokens also answer for mechanisms
/// an administrator disabled (SoftHSM's `slots.mechanisms`).
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
    unlisted: BTreeMap<u64, (MechanismType, MechanismInfo)>,
    /// The module is tpm2-pkcs11, whose known gaps [`MechanismList::known_gap`] reports.
    tpm2_pkcs11: bool,
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
                list.unlisted
                    .insert(mech_number(mechanism), (mechanism, info));
            }
        }
        list.tpm2_pkcs11 = ctx
            .get_library_info()
            .is_ok_and(|info| info.manufacturer_id().trim() == TPM2_PKCS11_MANUFACTURER);
        Ok(list)
    }

    /// The info of a mechanism, if the token lists it.
    pub fn get(&self, mechanism: MechanismType) -> Option<&MechanismInfo> {
        self.infos
            .get(&mech_number(mechanism))
            .map(|(_, info)| info)
    }

    /// True when the token can sign with `mechanism` using a key of `key_bits` bits.
    ///
    /// Tokens report key sizes in bits for RSA and EC alike (PKCS#11 2.40 and later); a token
    /// that reports 0 as the maximum puts no limit there. A mechanism with a
    /// [known gap](MechanismList::known_gap) for this key size cannot sign.
    pub fn can_sign(&self, mechanism: MechanismType, key_bits: usize) -> bool {
        self.get(mechanism).is_some_and(|info| {
            info.sign()
                && (info.min_key_size() == 0 || key_bits >= info.min_key_size())
                && (info.max_key_size() == 0 || key_bits <= info.max_key_size())
        }) && self
            .known_gap(mechanism, key_bits)
            .is_none()
    }

    /// Why the token cannot use `mechanism` with keys of `key_bits` bits although it offers it,
    /// when that is known of its module (a module bug, not something the token reports).
    pub fn known_gap(&self, mechanism: MechanismType, key_bits: usize) -> Option<&'static str> {
        if !self.tpm2_pkcs11 {
            return None;
        }
        tpm2_pkcs11_gap(mechanism, key_bits)
    }

    /// True when the mechanism answered `C_GetMechanismInfo` but is not listed (and so is never
    /// used).
    pub fn is_unlisted(&self, mechanism: MechanismType) -> bool {
        self.unlisted
            .contains_key(&mech_number(mechanism))
    }

    /// Every mechanism with its info in numeric order, the listed ones and then those that
    /// only answered when asked ([`MechanismList::is_unlisted`]).
    pub fn iter(&self) -> impl Iterator<Item = (MechanismType, &MechanismInfo)> {
        self.infos
            .values()
            .chain(self.unlisted.values())
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

/// `CK_INFO.manufacturerID` of tpm2-pkcs11.
const TPM2_PKCS11_MANUFACTURER: &str = "tpm2-software.github.io";

/// What tpm2-pkcs11 offers but cannot do, as seen with version 1.9 on swtpm.
///
/// LIMITATION: the list is keyed by the module, not its version, because no fixed version is
/// known; a release that fixes a gap stays limited here until the entry is removed. Raw RSA
/// (and the PSS it emulates without listing it) would work for keys with `CKA_DECRYPT=true`,
/// which rustls-hsm never creates (a signing key must not decrypt), so it is refused for every
/// key.
fn tpm2_pkcs11_gap(mechanism: MechanismType, key_bits: usize) -> Option<&'static str> {
    const P521_SIGN: [MechanismType; 6] = [
        MechanismType::ECC_KEY_PAIR_GEN,
        MechanismType::ECDSA,
        MechanismType::ECDSA_SHA1,
        MechanismType::ECDSA_SHA256,
        MechanismType::ECDSA_SHA384,
        MechanismType::ECDSA_SHA512,
    ];
    if P521_SIGN.contains(&mechanism) && key_bits > 384 {
        return Some(
            "tpm2-pkcs11 makes P-521 keys with a malformed CKA_EC_POINT; C_SignInit fails with \
             CKR_HOST_MEMORY",
        );
    }
    if mechanism == MechanismType::RSA_PKCS {
        return Some(
            "tpm2-pkcs11 signs it with TPM2_RSA_Decrypt, refused for sign-only keys \
             (CKR_GENERAL_ERROR)",
        );
    }
    None
}

#[allow(clippy::useless_conversion)]
fn mech_number(mechanism: MechanismType) -> u64 {
    u64::from(*mechanism)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Regression: on tpm2-pkcs11 1.9 every handshake with these mechanisms failed at C_Sign or
    // C_SignInit although the token offered them.
    #[test]
    fn tpm2_pkcs11_gaps_cover_what_it_cannot_sign() {
        for mechanism in [MechanismType::ECDSA, MechanismType::ECDSA_SHA512] {
            assert!(tpm2_pkcs11_gap(mechanism, 521).is_some());
            assert!(tpm2_pkcs11_gap(mechanism, 384).is_none());
        }
        assert!(tpm2_pkcs11_gap(MechanismType::ECC_KEY_PAIR_GEN, 521).is_some());
        assert!(tpm2_pkcs11_gap(MechanismType::RSA_PKCS, 2048).is_some());
        // Listed PSS (a token made with tpm2_ptool) and hash-and-sign PKCS#1 are left alone.
        assert!(tpm2_pkcs11_gap(MechanismType::SHA256_RSA_PKCS_PSS, 2048).is_none());
        assert!(tpm2_pkcs11_gap(MechanismType::SHA256_RSA_PKCS, 3072).is_none());
    }

    #[test]
    fn other_modules_have_no_known_gaps() {
        let list = MechanismList::default();
        assert!(list
            .known_gap(MechanismType::ECDSA, 521)
            .is_none());
    }
}
