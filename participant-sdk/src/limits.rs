//! Limits on what crosses Treaty's wire, and the checks that enforce them.
//!
//! They bound the size of every log and barrier record and the memory one request can
//! pin. (They do not keep sled from writing blob files: sled writes whole tree nodes over
//! ~128 KiB to blobs, so values from ~7.5 KiB on make them; the durable store syncs
//! them.) A failed check names the field, so callers can turn it into INVALID_ARGUMENT
//! as is, and quotes what the client sent with [`quote_input`]. The checks take the
//! field's name as anything `Display`, and format it only when they fail: a caller on
//! the hot path passes `format_args!("branches[{index}].payload")` or a small type of
//! its own, and allocates nothing for a valid request. Files an operator names (a token
//! file, a config file) are read with [`read_text_file`], bounded too.

use std::fmt;

use crate::endpoint::{Endpoint, EndpointError};

/// Reads the text file at `path`, refusing one larger than `max_bytes` without reading
/// more than that: a path to something endless (`/dev/zero`, a pipe) or huge is an
/// error that says so, not all of the process's memory.
pub fn read_text_file(path: &std::path::Path, max_bytes: u64) -> std::io::Result<String> {
    use std::io::Read;

    let mut text = String::new();
    std::fs::File::open(path)?
        .take(max_bytes.saturating_add(1))
        .read_to_string(&mut text)?;
    if text.len() as u64 > max_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max_bytes} bytes, the most read"),
        ));
    }
    Ok(text)
}

/// Largest branch payload (and saga compensation payload), in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024;
/// Longest transaction or branch id, in bytes.
pub const MAX_ID_BYTES: usize = 64;
/// Longest participant or coordinator endpoint, in bytes.
pub const MAX_ENDPOINT_BYTES: usize = 256;
/// Most branches in one transaction.
pub const MAX_BRANCHES: usize = 32;
/// Longest saga idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;
/// Most bytes of payloads and compensation payloads in one saga, all steps together: the
/// definition is one log record, kept below the log's 96 KiB record bound.
pub const MAX_SAGA_PAYLOAD_BYTES: usize = 48 * 1024;
/// Longest free-text reason (abort reasons, NO-vote reasons), in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// A request field that breaks a rule. `Display` starts with the field's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl fmt::Display, message: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// An id: 1..=64 bytes of `[A-Za-z0-9._:-]`.
pub fn check_id(field: impl fmt::Display, value: &str) -> Result<(), FieldError> {
    check_name(field, value, MAX_ID_BYTES)
}

/// A saga idempotency key: 1..=128 bytes of `[A-Za-z0-9._:-]`.
pub fn check_idempotency_key(field: impl fmt::Display, value: &str) -> Result<(), FieldError> {
    check_name(field, value, MAX_IDEMPOTENCY_KEY_BYTES)
}

fn check_name(field: impl fmt::Display, value: &str, max_bytes: usize) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > max_bytes {
        return Err(FieldError::new(
            field,
            format!("is {} bytes long; the limit is {max_bytes}", value.len()),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(FieldError::new(
            field,
            format!("contains {bad:?}; only letters, digits and . _ : - are allowed"),
        ));
    }
    Ok(())
}

pub fn check_payload(field: impl fmt::Display, payload: &[u8]) -> Result<(), FieldError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(FieldError::new(
            field,
            format!(
                "is {} bytes; the limit is {MAX_PAYLOAD_BYTES}",
                payload.len()
            ),
        ));
    }
    Ok(())
}

pub fn check_reason(field: impl fmt::Display, reason: &str) -> Result<(), FieldError> {
    if reason.len() > MAX_REASON_BYTES {
        return Err(FieldError::new(
            field,
            format!("is {} bytes; the limit is {MAX_REASON_BYTES}", reason.len()),
        ));
    }
    Ok(())
}

/// Cuts free text from elsewhere (a participant's reason, an error message) to at most
/// [`MAX_REASON_BYTES`], on a character boundary, marking the cut with `…`.
pub fn truncate_reason(mut text: String) -> String {
    if text.len() <= MAX_REASON_BYTES {
        return text;
    }
    let mut end = MAX_REASON_BYTES - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    text
}

/// Most bytes of a client's input quoted back in an error message.
pub const MAX_QUOTED_INPUT_BYTES: usize = 200;

/// Quotes `input` for an error message: at most [`MAX_QUOTED_INPUT_BYTES`] of it (cut on
/// a character boundary and marked, with the full length), with quotes, backslashes,
/// control and other invisible characters escaped, so that what a client sent can neither
/// inflate the message nor reach a terminal raw.
pub fn quote_input(input: &str) -> String {
    if input.len() <= MAX_QUOTED_INPUT_BYTES {
        return format!("\"{}\"", input.escape_debug());
    }
    let mut end = MAX_QUOTED_INPUT_BYTES;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "\"{}\"… ({} bytes)",
        input[..end].escape_debug(),
        input.len()
    )
}

/// A gRPC endpoint parsed strictly: `http://host:port` or `https://host:port` with nothing
/// after the port but an optional `/` (see [`crate::endpoint`] for the rules).
pub fn parse_endpoint(field: impl fmt::Display, endpoint: &str) -> Result<Endpoint, FieldError> {
    endpoint.parse().map_err(|error| match error {
        // Quoting these would say nothing more.
        EndpointError::Empty | EndpointError::TooLong { .. } => {
            FieldError::new(field, error.to_string())
        }
        error => FieldError::new(
            field,
            format!(
                "{} is not an endpoint of the form http(s)://host:port: {error}",
                quote_input(endpoint)
            ),
        ),
    })
}

/// The canonical form of an endpoint: the key that two spellings of one target share.
pub fn canonical_endpoint(field: impl fmt::Display, endpoint: &str) -> Result<String, FieldError> {
    parse_endpoint(field, endpoint).map(|endpoint| endpoint.to_string())
}

/// Whether an endpoint parses (see [`canonical_endpoint`]).
pub fn check_endpoint(field: impl fmt::Display, endpoint: &str) -> Result<(), FieldError> {
    parse_endpoint(field, endpoint).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_documented_alphabet_only() {
        assert!(check_id("branch_id", "payment-1.a_b:c").is_ok());
        assert_eq!(
            check_id("branch_id", "").unwrap_err().to_string(),
            "branch_id: must not be empty"
        );
        assert!(check_id("branch_id", "a/b").is_err());
        assert!(check_id("branch_id", &"x".repeat(65)).is_err());
        assert!(check_id("branch_id", &"x".repeat(64)).is_ok());
    }

    #[test]
    fn endpoints_must_be_http_host_port() {
        for good in [
            "http://127.0.0.1:50051",
            "https://payments.internal:443/",
            "http://[::1]:7000",
        ] {
            assert!(check_endpoint("endpoint", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "127.0.0.1:50051",
            "ftp://host:1",
            "http://host",
            "http://:80",
            "http://host:0",
            "http://host:99999",
            "http://host:80/path",
            "http://user@host:80",
        ] {
            let err = check_endpoint("branch.endpoint", bad).unwrap_err();
            assert_eq!(err.field, "branch.endpoint", "{bad}");
        }
        assert_eq!(
            canonical_endpoint("e", "HTTP://Bank.Example.:7001/").as_deref(),
            Ok("http://bank.example:7001")
        );
    }

    #[test]
    fn endpoint_errors_quote_the_input_escaped() {
        let err = check_endpoint("branches[1].endpoint", "http://a\u{1b}[2J:1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "branches[1].endpoint: \"http://a\\u{1b}[2J:1\" is not an endpoint of the form \
             http(s)://host:port: contains '\\u{1b}'; only ASCII letters, digits and . - : / [ ] \
             are allowed (no whitespace, control characters or percent-encoding)"
        );
        assert!(!err.to_string().contains('\u{1b}'));
        let err = check_endpoint("e", &"x".repeat(MAX_ENDPOINT_BYTES + 1)).unwrap_err();
        assert_eq!(err.to_string(), "e: is 257 bytes long; the limit is 256");
    }

    #[test]
    fn quoted_input_is_bounded_and_escaped() {
        assert_eq!(quote_input("plain"), "\"plain\"");
        assert_eq!(quote_input("a\"b\\c\n\u{202e}"), r#""a\"b\\c\n\u{202e}""#);
        let huge = "é".repeat(2 * 1024 * 1024);
        let quoted = quote_input(&huge);
        assert!(
            quoted.len() < MAX_QUOTED_INPUT_BYTES + 40,
            "{}",
            quoted.len()
        );
        assert!(quoted.ends_with("\"… (4194304 bytes)"), "{quoted}");
        // The cut falls on a character boundary (é is two bytes; 200 is even).
        assert!(quoted.starts_with(&format!("\"{}", "é".repeat(100))));
    }

    #[test]
    fn long_reasons_are_cut_on_a_character_boundary() {
        assert_eq!(truncate_reason("short".into()), "short");
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = truncate_reason(long);
        assert!(cut.len() <= MAX_REASON_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn payload_limit_is_inclusive() {
        assert!(check_payload("p", &vec![0; MAX_PAYLOAD_BYTES]).is_ok());
        assert!(check_payload("p", &vec![0; MAX_PAYLOAD_BYTES + 1]).is_err());
    }

    #[test]
    fn a_text_file_is_read_up_to_its_bound_and_refused_beyond() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "0123456789").unwrap();
        assert_eq!(read_text_file(&path, 10).unwrap(), "0123456789");
        let refused = read_text_file(&path, 9).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidData);
        assert!(
            refused.to_string().contains("larger than 9 bytes"),
            "{refused}"
        );
        // Something endless is refused after the bound, not read to the end.
        let endless = read_text_file(std::path::Path::new("/dev/zero"), 1024).unwrap_err();
        assert!(
            endless.to_string().contains("larger than 1024 bytes"),
            "{endless}"
        );
    }
}
