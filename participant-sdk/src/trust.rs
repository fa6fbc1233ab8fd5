//! Which coordinators a participant serves, and which it asks about branches in doubt.
//!
//! A coordinator proves itself with a bearer token the participant was given, or with a
//! client certificate (mutual TLS) whose name the participant was given. Invariants: with
//! any token or identity configured, Prepare/Commit/Abort/Compensate from anyone else
//! are refused before the barrier or user code sees them (UNAUTHENTICATED without
//! credentials or with a wrong token, PERMISSION_DENIED for a certificate of another
//! name); with coordinator endpoints configured, a request naming another
//! `coordinator_endpoint` is refused, and in-doubt resolution asks only those endpoints —
//! never an address a request merely names.

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::auth::{MAX_TOKEN_BYTES, MIN_TOKEN_BYTES, bearer_token};
use crate::connections::ConnectionInfo;
use crate::limits::{canonical_endpoint, quote_input};

/// `endpoint` in canonical form, or as it is if it does not parse (then it matches only
/// itself).
fn canonical(endpoint: String) -> String {
    canonical_endpoint("coordinator_endpoint", &endpoint).unwrap_or(endpoint)
}

/// The coordinators a participant trusts. The default trusts every caller.
#[derive(Clone, Default)]
pub struct CoordinatorTrust {
    tokens: Vec<Vec<u8>>,
    identities: Vec<String>,
    endpoints: Vec<String>,
}

impl std::fmt::Debug for CoordinatorTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorTrust")
            .field("tokens", &format_args!("<{} redacted>", self.tokens.len()))
            .field("identities", &self.identities)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl CoordinatorTrust {
    /// Accepts a coordinator presenting `token` as `authorization: Bearer TOKEN`.
    pub fn token(mut self, token: &str) -> Self {
        self.tokens.push(token.as_bytes().to_vec());
        self
    }

    /// Accepts a coordinator whose verified client certificate carries `name` (needs the
    /// server's TLS with a client CA).
    pub fn identity(mut self, name: impl Into<String>) -> Self {
        self.identities.push(name.into());
        self
    }

    /// Asks only this coordinator endpoint about branches in doubt, and refuses requests
    /// that name another. Compared in canonical form (see [`canonical_endpoint`]), so
    /// other spellings of the same endpoint match.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoints.push(canonical(endpoint.into()));
        self
    }

    /// Checks the tokens given: each [`MIN_TOKEN_BYTES`] to [`MAX_TOKEN_BYTES`] bytes of
    /// visible ASCII (what an `authorization` header carries), as in a token file. A
    /// token turns on authentication (and allows listening beyond loopback), so a short
    /// one would be guessed, and an empty one would refuse every caller.
    pub fn validate(&self) -> Result<(), String> {
        for token in &self.tokens {
            if !(MIN_TOKEN_BYTES..=MAX_TOKEN_BYTES).contains(&token.len()) {
                return Err(format!(
                    "trust: a coordinator token must be {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} \
                     bytes, not {}",
                    token.len()
                ));
            }
            if !token.iter().all(|b| b.is_ascii_graphic()) {
                return Err(
                    "trust: a coordinator token must be visible ASCII (no spaces or control \
                     characters)"
                        .to_string(),
                );
            }
        }
        Ok(())
    }

    /// Whether callers must prove who they are.
    pub fn authenticates(&self) -> bool {
        !self.tokens.is_empty() || !self.identities.is_empty()
    }

    /// Whether in-doubt resolution may ask `endpoint` (and a request may name it).
    pub fn may_ask(&self, endpoint: &str) -> bool {
        if self.endpoints.is_empty() {
            return true;
        }
        let endpoint = canonical(endpoint.to_string());
        self.endpoints.contains(&endpoint)
    }

    /// The endpoints configured (empty: whatever a trusted caller names).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Refuses `request` unless it comes from a trusted coordinator.
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if !self.authenticates() {
            return Ok(());
        }
        let token = bearer_token(request.metadata()).map_err(Status::unauthenticated)?;
        if let Some(token) = token {
            let mut matched = false;
            for known in &self.tokens {
                matched |= bool::from(known.ct_eq(token.as_bytes()));
            }
            return if matched {
                Ok(())
            } else {
                Err(Status::unauthenticated("the bearer token is not valid"))
            };
        }
        let names = request
            .extensions()
            .get::<ConnectionInfo>()
            .map(|info| info.peer_names.clone())
            .unwrap_or_default();
        if names.is_empty() {
            return Err(Status::unauthenticated(
                "only the coordinator may call: present its token or its client certificate",
            ));
        }
        if names.iter().any(|name| self.identities.contains(name)) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "the client certificate of {} is not a trusted coordinator's",
            quote_input(&names[0])
        )))
    }

    /// Refuses a request that names a coordinator this participant does not trust.
    pub fn check_endpoint(&self, endpoint: &str) -> Result<(), Status> {
        if endpoint.is_empty() || self.may_ask(endpoint) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "coordinator_endpoint: {} is not a coordinator this participant trusts",
            quote_input(endpoint)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::BearerToken;

    fn request_with_token(token: &str) -> Request<()> {
        let mut request = Request::new(());
        BearerToken::new(token)
            .unwrap()
            .apply(request.metadata_mut());
        request
    }

    #[test]
    fn tokens_too_short_too_long_or_not_visible_ascii_are_refused() {
        assert!(CoordinatorTrust::default().validate().is_ok());
        assert!(
            CoordinatorTrust::default()
                .token("coordinator-secret-123")
                .validate()
                .is_ok()
        );
        for token in ["", "x", "fifteen-bytes-x", &"t".repeat(MAX_TOKEN_BYTES + 1)] {
            let error = CoordinatorTrust::default()
                .token(token)
                .validate()
                .unwrap_err();
            assert!(error.contains("16 to 512 bytes"), "{error}");
        }
        let error = CoordinatorTrust::default()
            .token("coordinator secret 123")
            .validate()
            .unwrap_err();
        assert!(error.contains("visible ASCII"), "{error}");
    }

    #[test]
    fn the_default_trusts_everyone() {
        let trust = CoordinatorTrust::default();
        assert!(trust.check(&Request::new(())).is_ok());
        assert!(trust.check_endpoint("http://anywhere:1").is_ok());
    }

    #[test]
    fn tokens_and_identities_are_required_once_configured() {
        let trust = CoordinatorTrust::default()
            .token("coordinator-secret-123")
            .identity("coordinator.test");
        assert!(
            trust
                .check(&request_with_token("coordinator-secret-123"))
                .is_ok()
        );
        assert_eq!(
            trust
                .check(&request_with_token("coordinator-secret-124"))
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            trust.check(&Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut stranger = Request::new(());
        stranger.extensions_mut().insert(ConnectionInfo {
            remote_addr: None,
            peer_names: vec!["stranger.test".to_string()].into(),
            ..ConnectionInfo::default()
        });
        assert_eq!(
            trust.check(&stranger).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let mut coordinator = Request::new(());
        coordinator.extensions_mut().insert(ConnectionInfo {
            remote_addr: None,
            peer_names: vec!["coordinator.test".to_string()].into(),
            ..ConnectionInfo::default()
        });
        assert!(trust.check(&coordinator).is_ok());
    }

    #[test]
    fn only_configured_endpoints_may_be_asked() {
        let trust = CoordinatorTrust::default().endpoint("https://Treaty.Test:7420/");
        assert!(trust.may_ask("https://treaty.test:7420"));
        assert!(!trust.may_ask("http://attacker.test:7420"));
        assert_eq!(
            trust
                .check_endpoint("http://attacker.test:7420")
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        assert!(trust.check_endpoint("").is_ok());
    }
}
