//! Who may call the Coordinator service: each request is mapped to a [`Principal`] by
//! its bearer token (`--auth-tokens`) or its verified client certificate (mutual TLS),
//! before anything else looks at it.
//!
//! Invariants: with authentication configured, a request without valid credentials is
//! UNAUTHENTICATED and changes nothing; a token that is present but wrong is refused even
//! when the connection also has a client certificate; tokens are never logged. Without
//! authentication configured every caller is the anonymous admin (the daemon refuses to
//! listen beyond loopback that way unless told `--allow-unauthenticated`).

use std::path::PathBuf;
use std::sync::RwLock;

use tonic::{Request, Status};
use treaty_sdk::auth::{Principal, TokenFileError, TokenTable, bearer_token};
use treaty_sdk::connections::ConnectionInfo;

/// The principal of callers when authentication is off.
pub const ANONYMOUS: &str = "";

#[derive(Debug)]
pub struct Authenticator {
    token_file: Option<PathBuf>,
    tokens: RwLock<TokenTable>,
    /// Client certificates are verified by the TLS layer: their first name is the
    /// principal.
    client_certificates: bool,
    /// Certificate identities with the admin role.
    admin_identities: Vec<String>,
}

impl Authenticator {
    /// No authentication: everyone is the anonymous admin.
    pub fn open() -> Self {
        Self {
            token_file: None,
            tokens: RwLock::new(TokenTable::default()),
            client_certificates: false,
            admin_identities: Vec::new(),
        }
    }

    /// Tokens from `token_file` and/or principals from verified client certificates.
    pub fn new(
        token_file: Option<PathBuf>,
        client_certificates: bool,
        admin_identities: Vec<String>,
    ) -> Result<Self, TokenFileError> {
        let tokens = match &token_file {
            Some(path) => TokenTable::load(path)?,
            None => TokenTable::default(),
        };
        Ok(Self {
            token_file,
            tokens: RwLock::new(tokens),
            client_certificates,
            admin_identities,
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.token_file.is_some() || self.client_certificates
    }

    /// Reads the token file again; on failure the old tokens stay.
    pub fn reload(&self) -> Result<(), TokenFileError> {
        if let Some(path) = &self.token_file {
            let tokens = TokenTable::load(path)?;
            *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = tokens;
        }
        Ok(())
    }

    /// The caller of `request`, or UNAUTHENTICATED.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        if !self.is_enabled() {
            return Ok(Principal {
                name: ANONYMOUS.to_string(),
                admin: true,
            });
        }
        let token = bearer_token(request.metadata()).map_err(Status::unauthenticated)?;
        if let Some(token) = token {
            let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
            return tokens
                .principal(token)
                .ok_or_else(|| Status::unauthenticated("the bearer token is not valid"));
        }
        if self.client_certificates {
            let identity = request
                .extensions()
                .get::<ConnectionInfo>()
                .and_then(|info| info.peer_names.first().cloned());
            if let Some(name) = identity {
                let admin = self.admin_identities.contains(&name);
                return Ok(Principal { name, admin });
            }
        }
        Err(Status::unauthenticated(
            "credentials required: `authorization: Bearer TOKEN` or a client certificate",
        ))
    }
}
