//! Limits on what crosses Treaty's wire, and the checks that enforce them.
//!
//! They bound the size of every log and barrier record and the memory one request can
//! pin. (They do not keep sled from writing blob files: sled writes whole tree nodes over
//! ~128 KiB to blobs, so values from ~7.5 KiB on make them; the durable store syncs
//! them.) A failed check names the field, so callers can turn it into INVALID_ARGUMENT
//! as is.

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
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An id: 1..=64 bytes of `[A-Za-z0-9._:-]`.
pub fn check_id(field: &str, value: &str) -> Result<(), FieldError> {
    check_name(field, value, MAX_ID_BYTES)
}

/// A saga idempotency key: 1..=128 bytes of `[A-Za-z0-9._:-]`.
pub fn check_idempotency_key(field: &str, value: &str) -> Result<(), FieldError> {
    check_name(field, value, MAX_IDEMPOTENCY_KEY_BYTES)
}

fn check_name(field: &str, value: &str, max_bytes: usize) -> Result<(), FieldError> {
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

pub fn check_payload(field: &str, payload: &[u8]) -> Result<(), FieldError> {
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

pub fn check_reason(field: &str, reason: &str) -> Result<(), FieldError> {
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

/// A gRPC endpoint: `http://host:port` or `https://host:port`, with nothing after the
/// port but an optional `/`.
pub fn check_endpoint(field: &str, endpoint: &str) -> Result<(), FieldError> {
    if endpoint.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if endpoint.len() > MAX_ENDPOINT_BYTES {
        return Err(FieldError::new(
            field,
            format!(
                "is {} bytes long; the limit is {MAX_ENDPOINT_BYTES}",
                endpoint.len()
            ),
        ));
    }
    let malformed = |why: &str| {
        FieldError::new(
            field,
            format!("{endpoint:?} is not of the form http://host:port ({why})"),
        )
    };
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| malformed("scheme must be http or https"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@', ' ']) {
        return Err(malformed("only a host and a port may follow the scheme"));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| malformed("the port is missing"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(malformed("the host is missing"));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(()),
        _ => Err(malformed("the port must be a number from 1 to 65535")),
    }
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
}
