//! How old a transaction is, read from its id.
//!
//! The coordinator names every transaction with a UUIDv7 in canonical form (lowercase,
//! hyphenated): its first 48 bits are the millisecond it was created, by the
//! coordinator's clock. The barrier's retention and the example journals' retention
//! measure age from there, so that a participant and its coordinator speak of the same
//! instant (shared/DESIGN.md's delivery horizon counts from it too).
//!
//! Two facts the retention code relies on:
//! - canonical UUIDv7 ids sort bytewise in the order of their creation millisecond (the
//!   timestamp is the first twelve hex digits, big-endian, and lowercase hex digits sort
//!   as their values), so every id created before `t` sorts below
//!   [`first_transaction_id_at`]`(t)` and every id created at or after `t` does not;
//! - any other id (tests, direct calls, another coordinator) has no known age:
//!   [`transaction_created_unix_ms`] says `None`, and such records are never collected
//!   and such calls never refused for age.

/// The creation time of a transaction named by a canonical UUIDv7, in milliseconds since
/// the Unix epoch; `None` for any other id.
pub fn transaction_created_unix_ms(transaction_id: &str) -> Option<u64> {
    let bytes = transaction_id.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    for (index, &byte) in bytes.iter().enumerate() {
        let hyphen = matches!(index, 8 | 13 | 18 | 23);
        let fits = if hyphen {
            byte == b'-'
        } else {
            byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)
        };
        if !fits {
            return None;
        }
    }
    // Version 7, RFC 4122 variant.
    if bytes[14] != b'7' || !matches!(bytes[19], b'8' | b'9' | b'a' | b'b') {
        return None;
    }
    let timestamp = [&transaction_id[0..8], &transaction_id[9..13]].concat();
    u64::from_str_radix(&timestamp, 16).ok()
}

/// The smallest canonical UUIDv7 created at `unix_ms`: every canonical UUIDv7 created
/// earlier sorts bytewise below it, every one created then or later does not.
pub fn first_transaction_id_at(unix_ms: u64) -> String {
    // 48 bits of milliseconds reach the year 10889; later instants are all "the end".
    let unix_ms = unix_ms.min((1 << 48) - 1);
    let hex = format!("{unix_ms:012x}");
    format!("{}-{}-7000-8000-000000000000", &hex[..8], &hex[8..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_millisecond_of_a_canonical_uuid_v7() {
        // 0x0190_0000_0000 ms.
        let id = "01900000-0000-7abc-9def-0123456789ab";
        assert_eq!(transaction_created_unix_ms(id), Some(0x0190_0000_0000));
        assert_eq!(
            transaction_created_unix_ms(&first_transaction_id_at(1_700_000_000_123)),
            Some(1_700_000_000_123)
        );
    }

    #[test]
    fn any_other_id_has_no_age() {
        for id in [
            "t1",
            "conformance-1",
            // Upper case, version 4, wrong variant, no hyphens, too long.
            "01900000-0000-7ABC-9DEF-0123456789AB",
            "01900000-0000-4abc-9def-0123456789ab",
            "01900000-0000-7abc-1def-0123456789ab",
            "0190000000007abc9def0123456789ab",
            "01900000-0000-7abc-9def-0123456789abc",
        ] {
            assert_eq!(transaction_created_unix_ms(id), None, "{id}");
        }
    }

    #[test]
    fn ids_sort_by_their_millisecond_around_the_first_id_of_an_instant() {
        let at = 1_700_000_000_000;
        let first = first_transaction_id_at(at);
        let before = "018bcfe5-67ff-7fff-bfff-ffffffffffff";
        assert_eq!(transaction_created_unix_ms(before), Some(at - 1));
        assert!(before < first.as_str());
        let same = "018bcfe5-6800-7000-8000-000000000001";
        assert_eq!(transaction_created_unix_ms(same), Some(at));
        assert!(same > first.as_str());
        assert!(first_transaction_id_at(u64::MAX) > first);
    }
}
