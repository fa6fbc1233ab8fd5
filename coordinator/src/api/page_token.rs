//! ListTransactions page tokens: where the next page starts, sealed so that a token
//! tells its holder nothing and works for no one else.
//!
//! A page that ends before it is full ends at the last log record the call examined,
//! and that record may be another principal's: a plain id there would name a
//! transaction the caller may not see (and its outcome would then be one GetOutcome
//! away). So every token is the position encrypted and authenticated
//! (ChaCha20-Poly1305) under a key drawn when the coordinator starts, with the
//! principal's name as associated data.
//!
//! Invariants: a token opens only in the process that issued it and only for the
//! principal it was issued to; anything else is refused as `page_token`, and changes
//! nothing. A restart makes earlier tokens invalid: the caller lists again from the
//! first page.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use treaty_sdk::limits::FieldError;

use crate::model::TxnId;

/// Bytes of a sealed position: the nonce, the id, the tag.
const SEALED_BYTES: usize = NONCE_LEN + 16 + 16;

/// Seals and opens page tokens with this process's key.
pub struct PageTokens {
    key: LessSafeKey,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens(<key>)")
    }
}

impl Default for PageTokens {
    fn default() -> Self {
        Self::new()
    }
}

impl PageTokens {
    /// Tokens under a key drawn now (from the operating system's random source, through
    /// `rand`'s thread generator).
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut key);
        let Ok(unbound) = UnboundKey::new(&CHACHA20_POLY1305, &key) else {
            panic!("invariant: 32 bytes is ChaCha20-Poly1305's key length");
        };
        Self {
            key: LessSafeKey::new(unbound),
        }
    }

    /// The token for a page that starts after `after`, for `principal`.
    pub fn seal(&self, principal: &str, after: TxnId) -> String {
        let mut nonce_bytes = [0u8; NONCE_LEN];
        rand::Rng::fill(&mut rand::rng(), &mut nonce_bytes);
        let mut sealed = after.as_bytes().to_vec();
        let nonce = Nonce::assume_unique_for_key(nonce_bytes);
        let aad = Aad::from(principal.as_bytes());
        if self
            .key
            .seal_in_place_append_tag(nonce, aad, &mut sealed)
            .is_err()
        {
            panic!("invariant: a 16-byte id is far below ChaCha20-Poly1305's message limit");
        }
        let mut bytes = nonce_bytes.to_vec();
        bytes.append(&mut sealed);
        treaty_sdk::hex::encode(&bytes)
    }

    /// Where the page asked for by `token` starts, if this process issued it to
    /// `principal`.
    pub fn open(&self, principal: &str, token: &str) -> Result<TxnId, FieldError> {
        let refused = || {
            FieldError::new(
                "page_token",
                "not a token this coordinator issued to this caller since it started: \
                 list again from the first page",
            )
        };
        // Lowercase hex only, as `seal` writes it: one spelling per token.
        let mut bytes = treaty_sdk::hex::decode::<SEALED_BYTES>(token).ok_or_else(refused)?;
        let (nonce, sealed) = bytes.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let opened = self
            .key
            .open_in_place(nonce, Aad::from(principal.as_bytes()), sealed)
            .map_err(|_| refused())?;
        let id: [u8; 16] = opened.try_into().map_err(|_| refused())?;
        Ok(TxnId::from_bytes(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_for_its_principal_in_its_process_only() {
        let tokens = PageTokens::new();
        let id = TxnId::generate(1_700_000_000_000);
        let token = tokens.seal("alice", id);
        assert_eq!(tokens.open("alice", &token).unwrap(), id);
        // It names no id: neither the id's text nor its bytes are in it.
        let hex: String = id.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert!(!token.contains(&hex) && !token.contains(&id.to_string()));
        // Two tokens for the same place differ (a fresh nonce each).
        assert_ne!(tokens.seal("alice", id), token);
        for (principal, token) in [
            ("bob", token.clone()),
            ("alice", PageTokens::new().seal("alice", id)),
            ("alice", id.to_string()),
            ("alice", "zz".repeat(SEALED_BYTES)),
            ("alice", format!("{}é", &token[2..])),
            ("alice", String::new()),
            ("alice", token.to_uppercase()),
            ("alice", format!("+{}", &token[1..])),
        ] {
            let error = tokens.open(principal, &token).unwrap_err();
            assert_eq!(error.field, "page_token", "{principal} {token}");
        }
        // A flipped bit anywhere is refused.
        let mut flipped = token.into_bytes();
        flipped[SEALED_BYTES] = if flipped[SEALED_BYTES] == b'0' {
            b'1'
        } else {
            b'0'
        };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(tokens.open("alice", &flipped).is_err());
    }
}
