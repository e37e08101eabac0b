//! The per-account hash chain.
//!
//! `hash = sha256(prev_hash ‖ "tollgate.entry.v1" ‖ field₁ ‖ field₂ ‖ …)` where `prev_hash` is
//! the 32 raw bytes of the previous entry's hash (32 zero bytes for an account's first entry)
//! and every field is written as its UTF-8 text preceded by its length as a 4-byte big-endian
//! integer, so no two different entries share an encoding. Amounts are written as integer
//! micro-credits and times as integer milliseconds, so the hash does not depend on how a
//! database prints numbers. An absent optional field is the empty string (no id is ever empty).
//!
//! A usage debit's entries also carry the quantity, unit and rate it was priced with. These
//! three are appended after `recorded_at` (quantity, unit, rate, in that order, each absent one
//! the empty string) **only when at least one of them is present**. An entry without them —
//! every entry written before they existed, every non-debit entry, a debit whose caller named
//! its cost — is encoded exactly as before, so ledgers already written still verify; because
//! every field is length-prefixed, an encoding with the three appended can never equal one
//! without them. Quantities and rates are written in their canonical decimal text (`2`,
//! `0.0000015`: normalized, no trailing zeros), which is also how they are stored.

use sha2::{Digest, Sha256};

use crate::model::Entry;

/// The hash before an account's first entry, hex.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Version tag mixed into every hash; a new canonical form gets a new tag.
const CANONICAL_TAG: &[u8] = b"tollgate.entry.v1";

fn field(hasher: &mut Sha256, text: &str) {
    // Fields are bounded (ids ≤ 128 bytes, memos ≤ 512, units ≤ 64), so the length always fits.
    let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
    hasher.update(len.to_be_bytes());
    hasher.update(text.as_bytes());
}

fn optional<T: ToString>(value: Option<&T>) -> String {
    value.map(ToString::to_string).unwrap_or_default()
}

/// The hash of `entry` given its `prev_hash` (hex). `None` if `prev_hash` is not 32 bytes of hex.
pub fn entry_hash(entry: &Entry) -> Option<String> {
    let prev = hex::decode(&entry.prev_hash).ok()?;
    if prev.len() != 32 {
        return None;
    }
    let mut hasher = Sha256::new();
    hasher.update(&prev);
    hasher.update(CANONICAL_TAG);
    field(&mut hasher, entry.account.as_str());
    field(&mut hasher, &entry.seq.to_string());
    field(&mut hasher, entry.kind.as_str());
    field(&mut hasher, &entry.amount.micros().to_string());
    field(&mut hasher, &optional(entry.grant_id.as_ref()));
    field(&mut hasher, &optional(entry.debit_id.as_ref()));
    field(&mut hasher, &entry.operation);
    field(&mut hasher, &optional(entry.feature.as_ref()));
    field(&mut hasher, &optional(entry.actor.as_ref()));
    field(&mut hasher, &optional(entry.region.as_ref()));
    field(&mut hasher, &optional(entry.price_version.as_ref()));
    field(
        &mut hasher,
        entry.price_rule.map(|rule| rule.as_str()).unwrap_or(""),
    );
    field(&mut hasher, &entry.memo);
    field(&mut hasher, &entry.event_at.millis().to_string());
    field(&mut hasher, &entry.recorded_at.millis().to_string());
    // Appended only when present, so entries without them keep the hash they always had.
    if entry.quantity.is_some() || entry.unit.is_some() || entry.rate.is_some() {
        field(&mut hasher, &optional(entry.quantity.as_ref()));
        field(&mut hasher, entry.unit.as_deref().unwrap_or(""));
        field(&mut hasher, &optional(entry.rate.as_ref()));
    }
    Some(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::{
        AccountId, Credits, DebitId, EntryKind, FeatureKey, GrantId, PriceRule, Quantity, Rate,
        Timestamp,
    };

    fn entry() -> Entry {
        Entry {
            account: AccountId::new("acme").unwrap(),
            seq: 1,
            kind: EntryKind::Grant,
            amount: Credits::from_whole(10).unwrap(),
            grant_id: Some(GrantId::new("g").unwrap()),
            debit_id: None,
            operation: "key:k1".into(),
            feature: None,
            actor: None,
            region: None,
            price_version: None,
            price_rule: None,
            quantity: None,
            unit: None,
            rate: None,
            memo: String::new(),
            event_at: Timestamp::from_millis(5).unwrap(),
            recorded_at: Timestamp::from_millis(6).unwrap(),
            prev_hash: GENESIS_HASH.into(),
            hash: String::new(),
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = entry_hash(&entry()).unwrap();
        assert_eq!(base.len(), 64);
        let mut changed = entry();
        changed.amount = Credits::from_micros(10_000_001);
        assert_ne!(entry_hash(&changed).unwrap(), base);
        let mut changed = entry();
        changed.seq = 2;
        assert_ne!(entry_hash(&changed).unwrap(), base);
        let mut changed = entry();
        changed.memo = "x".into();
        assert_ne!(entry_hash(&changed).unwrap(), base);
        let mut changed = entry();
        changed.prev_hash = "11".repeat(32);
        assert_ne!(entry_hash(&changed).unwrap(), base);
        let priced = debit_entry(Some("2"), Some("image"), Some("3"));
        let priced_hash = entry_hash(&priced).unwrap();
        let mut changed = priced.clone();
        changed.quantity = Some(Quantity::parse("3").unwrap());
        assert_ne!(entry_hash(&changed).unwrap(), priced_hash);
        let mut changed = priced.clone();
        changed.unit = Some("token".into());
        assert_ne!(entry_hash(&changed).unwrap(), priced_hash);
        let mut changed = priced.clone();
        changed.rate = Some(Rate::parse("3.5").unwrap());
        assert_ne!(entry_hash(&changed).unwrap(), priced_hash);
        // Each one alone, or absent where the others are present, is a different entry too.
        let variants = [
            debit_entry(None, None, None),
            debit_entry(Some("2"), None, None),
            debit_entry(None, Some("image"), None),
            debit_entry(None, None, Some("3")),
            debit_entry(Some("2"), Some("image"), None),
            debit_entry(None, Some("image"), Some("3")),
            debit_entry(Some("2"), None, Some("3")),
            priced,
        ];
        let hashes: std::collections::BTreeSet<_> =
            variants.iter().map(|e| entry_hash(e).unwrap()).collect();
        assert_eq!(hashes.len(), variants.len());
    }

    /// A usage debit's entry as written before quantity, unit and rate were kept, with them
    /// set as given.
    fn debit_entry(quantity: Option<&str>, unit: Option<&str>, rate: Option<&str>) -> Entry {
        let mut e = entry();
        e.kind = EntryKind::Debit;
        e.amount = Credits::from_whole(6).unwrap();
        e.debit_id = Some(DebitId::new("d1").unwrap());
        e.operation = "debit:d1".into();
        e.feature = Some(FeatureKey::new("image").unwrap());
        e.price_version = Some(2);
        e.price_rule = Some(PriceRule::Plan);
        e.quantity = quantity.map(|q| Quantity::parse(q).unwrap());
        e.unit = unit.map(str::to_owned);
        e.rate = rate.map(|r| Rate::parse(r).unwrap());
        e
    }

    #[test]
    fn entries_without_quantity_unit_or_rate_hash_as_before_they_existed() {
        // Computed by the hash function before the three fields were added: ledgers written
        // then must still verify.
        assert_eq!(
            entry_hash(&entry()).unwrap(),
            "6b0171c2894d7d2b669e60b1359706c3eb7237de266cf12e92f1483c2f553ad1"
        );
        assert_eq!(
            entry_hash(&debit_entry(None, None, None)).unwrap(),
            "6efba8dd9f1cd83becea89c925e848de36aa91d65134b0f765015fefe27cc9fe"
        );
    }

    #[test]
    fn fields_cannot_bleed_into_each_other() {
        // "ab" + "" and "a" + "b" must not collide: lengths are part of the encoding.
        let mut one = entry();
        one.operation = "key:ab".into();
        one.memo = String::new();
        let mut two = entry();
        two.operation = "key:a".into();
        two.memo = "b".into();
        assert_ne!(entry_hash(&one), entry_hash(&two));
    }

    #[test]
    fn a_malformed_previous_hash_is_refused() {
        let mut bad = entry();
        bad.prev_hash = "zz".into();
        assert_eq!(entry_hash(&bad), None);
    }
}
