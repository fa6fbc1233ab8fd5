//! Who is calling: bearer tokens and mutual-TLS identities mapped to principals.
//!
//! A token file has one principal per line, `PRINCIPAL TOKEN [admin]`; `#` starts a
//! comment. Tokens are compared in constant time against every entry (no early exit on
//! a match), are never logged, and are redacted from `Debug`. Clients send them as
//! `authorization: Bearer TOKEN` metadata.

use std::path::Path;

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

use crate::limits::{check_id, read_text_file};

/// Shortest token accepted in a token file: guessing must not be practical.
pub const MIN_TOKEN_BYTES: usize = 16;
/// Longest token accepted, in a file or in a request.
pub const MAX_TOKEN_BYTES: usize = 512;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    /// Sees and acts on every principal's transactions.
    pub admin: bool,
}

/// The largest token file read: 16 MiB, some 150,000 principals.
pub const MAX_TOKEN_FILE_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} line {line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
}

#[derive(Clone)]
struct Entry {
    principal: Principal,
    token: Vec<u8>,
}

/// The principals of a token file.
#[derive(Clone, Default)]
pub struct TokenTable {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenTable")
            .field(
                "principals",
                &self
                    .entries
                    .iter()
                    .map(|e| &e.principal.name)
                    .collect::<Vec<_>>(),
            )
            .field("tokens", &"<redacted>")
            .finish()
    }
}

impl TokenTable {
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text =
            read_text_file(path, MAX_TOKEN_FILE_BYTES).map_err(|e| TokenFileError::Read {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses a token file's text; `source` names it in errors. Lines never echo tokens.
    pub fn parse(source: &str, text: &str) -> Result<Self, TokenFileError> {
        let mut entries: Vec<Entry> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let bad = |message: String| TokenFileError::Line {
                path: source.to_string(),
                line: index + 1,
                message,
            };
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (name, token, admin) = match fields.as_slice() {
                [name, token] => (*name, *token, false),
                [name, token, "admin"] => (*name, *token, true),
                [_, _, other] => {
                    return Err(bad(format!(
                        "the third field may only be `admin`, not {:?}",
                        other.chars().take(32).collect::<String>()
                    )));
                }
                _ => return Err(bad("expected `PRINCIPAL TOKEN [admin]`".to_string())),
            };
            check_id("principal", name).map_err(|e| bad(e.to_string()))?;
            if !(MIN_TOKEN_BYTES..=MAX_TOKEN_BYTES).contains(&token.len()) {
                return Err(bad(format!(
                    "the token of {name} must be {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} bytes"
                )));
            }
            if entries.iter().any(|e| e.principal.name == name) {
                return Err(bad(format!("principal {name} appears twice")));
            }
            if entries
                .iter()
                .any(|e| bool::from(e.token.ct_eq(token.as_bytes())))
            {
                return Err(bad(format!(
                    "the token of {name} is also another principal's"
                )));
            }
            entries.push(Entry {
                principal: Principal {
                    name: name.to_string(),
                    admin,
                },
                token: token.as_bytes().to_vec(),
            });
        }
        Ok(Self { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The principal whose token this is. Looks at every entry whatever matches.
    pub fn principal(&self, token: &str) -> Option<Principal> {
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.token.ct_eq(token.as_bytes())) {
                found = Some(entry.principal.clone());
            }
        }
        found
    }
}

/// The token of an `authorization: Bearer TOKEN` header, if there is one. `Err` if the
/// header is there but malformed.
pub fn bearer_token(metadata: &MetadataMap) -> Result<Option<&str>, &'static str> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| "the authorization header is not text")?;
    let token = value
        .strip_prefix("Bearer ")
        .ok_or("the authorization header is not `Bearer TOKEN`")?
        .trim();
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err("the bearer token is empty or too long");
    }
    Ok(Some(token))
}

/// A token to send, checked once so that every request can carry it.
#[derive(Clone)]
pub struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    pub fn new(token: &str) -> Result<Self, String> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(format!("a token must be 1 to {MAX_TOKEN_BYTES} bytes"));
        }
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| "a token must be printable ASCII".to_string())?;
        value.set_sensitive(true);
        Ok(Self(value))
    }

    /// Adds the header to a request's metadata.
    pub fn apply(&self, metadata: &mut MetadataMap) {
        metadata.insert("authorization", self.0.clone());
    }
}

/// What a client sends with every call: a bearer token, or nothing. A tonic interceptor.
#[derive(Debug, Clone, Default)]
pub struct Credentials(Option<BearerToken>);

impl Credentials {
    pub fn none() -> Self {
        Self(None)
    }

    pub fn bearer(token: BearerToken) -> Self {
        Self(Some(token))
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            token.apply(request.metadata_mut());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "alice-token-0123456789";
    const ROOT: &str = "root-token-0123456789ab";

    #[test]
    fn token_files_map_tokens_to_principals() {
        let table = TokenTable::parse(
            "tokens",
            &format!("# who may call\nalice {ALICE}\n\n  root {ROOT} admin # the operator\n"),
        )
        .unwrap();
        assert_eq!(
            table.principal(ALICE),
            Some(Principal {
                name: "alice".into(),
                admin: false
            })
        );
        assert!(table.principal(ROOT).unwrap().admin);
        assert_eq!(table.principal("alice-token-012345678"), None);
        assert_eq!(table.principal(""), None);
        assert!(!format!("{table:?}").contains(ALICE));
    }

    #[test]
    fn bad_token_files_name_the_line_and_never_echo_tokens() {
        for (text, expected) in [
            ("alice short", "line 1"),
            (&format!("alice {ALICE} root") as &str, "only be `admin`"),
            (
                &format!("alice {ALICE}\nalice {ROOT}"),
                "line 2: principal alice appears twice",
            ),
            (
                &format!("alice {ALICE}\nbob {ALICE}"),
                "also another principal's",
            ),
            (&format!("al/ice {ALICE}"), "principal: contains"),
            ("alice", "expected `PRINCIPAL TOKEN [admin]`"),
        ] {
            let error = TokenTable::parse("tokens", text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(!error.contains(ALICE), "{error}");
        }
    }

    #[test]
    fn bearer_headers_are_read_strictly() {
        let mut metadata = MetadataMap::new();
        assert_eq!(bearer_token(&metadata), Ok(None));
        BearerToken::new(ALICE).unwrap().apply(&mut metadata);
        assert_eq!(bearer_token(&metadata), Ok(Some(ALICE)));
        metadata.insert("authorization", "Basic abc".parse().unwrap());
        assert!(bearer_token(&metadata).is_err());
        assert!(BearerToken::new("bad\ntoken").is_err());
        assert!(!format!("{:?}", BearerToken::new(ALICE).unwrap()).contains(ALICE));
    }
}
