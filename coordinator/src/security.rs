//! The daemon's trust settings: TLS on its server, who may call it, and how it proves
//! itself to participants. Validated at start; see docs/SECURITY.md.
//!
//! Invariants: listening beyond loopback with no authentication refuses to start unless
//! `--allow-unauthenticated` is given; `https://` participant endpoints are refused at
//! the API unless a participant TLS configuration (`--participant-ca`) exists, and are
//! then always verified (chain and host name); secrets (tokens, [`SECRET_KEYS`]) are never
//! serialized, printed or logged, nor read from a config file.
//!
//! Settings that come in pairs (a certificate and its key) are checked by `validate`,
//! not by clap: one of a pair may come from the config file and the other from a flag.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tonic::transport::ClientTlsConfig;
use treaty_sdk::auth::{BearerToken, Credentials};
use treaty_sdk::connections::ConnectionLimits;
use treaty_sdk::tls::{ClientTlsFiles, ReloadableServerTls, ServerTlsFiles, TlsError};

use crate::api::auth::Authenticator;
use crate::config::ConfigError;

/// `--participant-ca` value that means the system's roots.
pub const SYSTEM_ROOTS: &str = "system";

/// Settings that are secrets: `#[serde(skip)]`, so never printed by `--print-config`, and
/// refused in a config file (other users may read it; use the environment).
pub const SECRET_KEYS: &[&str] = &["participant_token"];

#[derive(Clone, Default, clap::Args, Serialize, Deserialize)]
pub struct SecurityConfig {
    /// The server's certificate chain (PEM): serve TLS only. Reloaded on SIGHUP.
    #[arg(long, env = "TREATY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// The server certificate's private key (PEM).
    #[arg(long, env = "TREATY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) whose client certificates authenticate callers (mutual TLS); the
    /// certificate's first DNS/URI name (else its common name) is the principal.
    #[arg(long, env = "TREATY_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Principals and their bearer tokens, one `PRINCIPAL TOKEN [admin]` a line.
    /// Reloaded on SIGHUP.
    #[arg(long, env = "TREATY_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,

    /// A client-certificate identity with the admin role, taken whole (a common name
    /// may hold a comma). Repeat the flag for several; the variable gives one.
    // Named as the flag, so that its config key and variable follow the rule that
    // docs/CONFIG.md gives (`admin_identity`, `TREATY_ADMIN_IDENTITY`). No
    // `value_delimiter`, unlike `--allow-endpoint` (whose patterns never hold a comma):
    // split, "Ops, Team" made a certificate named "Ops" an admin.
    #[arg(
        id = "admin_identity",
        long = "admin-identity",
        env = "TREATY_ADMIN_IDENTITY"
    )]
    #[serde(rename = "admin_identity")]
    pub admin_identities: Vec<String>,

    /// Serve callers without credentials even on a non-loopback address.
    #[arg(long, env = "TREATY_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// CA (PEM) to verify `https://` participants with, or `system` for the system's
    /// roots. Without it, `https://` endpoints are refused.
    #[arg(long, env = "TREATY_PARTICIPANT_CA")]
    pub participant_ca: Option<String>,

    /// Client certificate (PEM) presented to `https://` participants that require mutual
    /// TLS; reloaded on SIGHUP.
    #[arg(long, env = "TREATY_PARTICIPANT_CERT")]
    pub participant_cert: Option<PathBuf>,

    /// Its private key (PEM).
    #[arg(long, env = "TREATY_PARTICIPANT_KEY")]
    pub participant_key: Option<PathBuf>,

    /// Bearer token presented to participants (prefer the environment variable: flags are
    /// visible to other users of the machine).
    #[arg(long, env = "TREATY_PARTICIPANT_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub participant_token: Option<String>,

    /// Connections open at once; more are closed as they arrive.
    #[arg(long, env = "TREATY_MAX_CONNECTIONS", default_value_t = ConnectionLimits::default().max_connections)]
    pub max_connections: usize,

    /// A connection with no call in flight for this long is closed (clients reconnect);
    /// HTTP/2 pings do not count as calls.
    #[arg(long, env = "TREATY_IDLE_CONNECTION_TIMEOUT_MS", default_value_t = ConnectionLimits::default().idle_timeout_ms)]
    pub idle_connection_timeout_ms: u64,
}

impl std::fmt::Debug for SecurityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityConfig")
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_client_ca", &self.tls_client_ca)
            .field("auth_tokens", &self.auth_tokens)
            .field("admin_identities", &self.admin_identities)
            .field("allow_unauthenticated", &self.allow_unauthenticated)
            .field("participant_ca", &self.participant_ca)
            .field("participant_cert", &self.participant_cert)
            .field("participant_key", &self.participant_key)
            .field(
                "participant_token",
                &self.participant_token.as_ref().map(|_| "<redacted>"),
            )
            .field("max_connections", &self.max_connections)
            .field(
                "idle_connection_timeout_ms",
                &self.idle_connection_timeout_ms,
            )
            .finish()
    }
}

fn bad(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        message: message.into(),
    }
}

impl SecurityConfig {
    /// The defaults: no TLS, no authentication (loopback only), 1024 connections.
    pub fn new() -> Self {
        Self {
            max_connections: ConnectionLimits::default().max_connections,
            idle_connection_timeout_ms: ConnectionLimits::default().idle_timeout_ms,
            ..Self::default()
        }
    }

    /// Checks what can be checked without reading files.
    pub fn validate(&self, listen: SocketAddr) -> Result<(), ConfigError> {
        ServerTlsFiles::from_options(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_client_ca.clone(),
        )
        .map_err(|e| bad("tls_cert", e.to_string()))?;
        if !self.admin_identities.is_empty() && self.tls_client_ca.is_none() {
            return Err(bad(
                "admin_identity",
                "client-certificate identities need --tls-client-ca",
            ));
        }
        if self.participant_cert.is_some() != self.participant_key.is_some() {
            return Err(bad(
                "participant_cert",
                "the participant client certificate and its key come together",
            ));
        }
        if self.participant_cert.is_some() && self.participant_ca.is_none() {
            return Err(bad(
                "participant_cert",
                "a client certificate is only presented to https:// participants, which \
                 need --participant-ca (a CA file, or `system`)",
            ));
        }
        if let Some(token) = &self.participant_token {
            BearerToken::new(token).map_err(|e| bad("participant_token", e))?;
        }
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return Err(bad("max_connections", "must be 1 to 1,000,000"));
        }
        if !(100..=86_400_000).contains(&self.idle_connection_timeout_ms) {
            return Err(bad("idle_connection_timeout_ms", "must be 100 ms to 1 day"));
        }
        if !listen.ip().is_loopback() && !self.authenticates() && !self.allow_unauthenticated {
            return Err(bad(
                "listen",
                format!(
                    "{listen} is not a loopback address and no authentication is configured \
                     (--auth-tokens or --tls-client-ca); pass --allow-unauthenticated to \
                     serve anyone who can reach it"
                ),
            ));
        }
        Ok(())
    }

    /// Whether callers must prove who they are.
    pub fn authenticates(&self) -> bool {
        self.auth_tokens.is_some() || self.tls_client_ca.is_some()
    }

    pub fn server_tls(&self) -> Result<Option<ReloadableServerTls>, TlsError> {
        ServerTlsFiles::from_options(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_client_ca.clone(),
        )?
        .map(ReloadableServerTls::load)
        .transpose()
    }

    pub fn authenticator(&self) -> Result<Authenticator, treaty_sdk::auth::TokenFileError> {
        if !self.authenticates() {
            return Ok(Authenticator::open());
        }
        Authenticator::new(
            self.auth_tokens.clone(),
            self.tls_client_ca.is_some(),
            self.admin_identities.clone(),
        )
    }

    /// The TLS configuration for `https://` participants, if they are allowed at all.
    pub fn participant_tls(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        let Some(ca) = &self.participant_ca else {
            return Ok(None);
        };
        let files = ClientTlsFiles {
            ca: (ca != SYSTEM_ROOTS).then(|| PathBuf::from(ca)),
            cert: self.participant_cert.clone(),
            key: self.participant_key.clone(),
        };
        files.load().map(Some)
    }

    /// What the coordinator presents to participants.
    pub fn participant_credentials(&self) -> Credentials {
        match self
            .participant_token
            .as_deref()
            .and_then(|token| BearerToken::new(token).ok())
        {
            Some(token) => Credentials::bearer(token),
            None => Credentials::none(),
        }
    }

    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            idle_timeout_ms: self.idle_connection_timeout_ms,
            ..ConnectionLimits::default()
        }
    }
}
