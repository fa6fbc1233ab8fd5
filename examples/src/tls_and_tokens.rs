//! Credentials for running the coordinator and the example services with TLS on every
//! hop and a token on every call (`demo --secure`), made fresh for one run in a
//! directory of its own:
//!
//! - a CA, whose key never leaves memory, and a server certificate per process (names
//!   `localhost` and `127.0.0.1`), which every client verifies;
//! - a token file for `treaty serve --auth-tokens` with one principal, the demo's own
//!   client ([`CLIENT_PRINCIPAL`]);
//! - a token the coordinator presents to the services, and that they alone accept.
//!
//! Secrets stay out of process arguments (other users of the machine can read those):
//! tokens reach child processes through environment variables, and the files holding
//! keys and tokens are readable by their owner only. `Debug` shows no token.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rand::Rng;
use treaty_sdk::client::{ClientOptions, ClientTlsFiles};

use crate::certs::{CertError, CertFiles, LocalCa, write_file};

/// The principal the demo's own client is in the coordinator's token file.
pub const CLIENT_PRINCIPAL: &str = "demo";
/// Random bytes in a token (written as hex, so twice as many characters).
pub const TOKEN_BYTES: usize = 32;
/// Where `treaty serve` reads the token it presents to participants.
pub const PARTICIPANT_TOKEN_ENV: &str = "TREATY_PARTICIPANT_TOKEN";
/// Where the example services read the token their coordinator presents.
pub const COORDINATOR_TOKEN_ENV: &str = "TREATY_COORDINATOR_TOKEN";

/// A new random token: [`TOKEN_BYTES`] from the operating system's generator, as hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill(&mut bytes);
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub struct TlsAndTokens {
    ca: LocalCa,
    coordinator_cert: CertFiles,
    token_file: PathBuf,
    client_token: String,
    coordinator_token: String,
}

impl std::fmt::Debug for TlsAndTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAndTokens")
            .field("ca", &self.ca)
            .field("coordinator_cert", &self.coordinator_cert)
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

fn path(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl TlsAndTokens {
    /// Makes the CA, the coordinator's certificate, the tokens and the token file in
    /// `dir`, which is created readable by its owner only and must not exist yet.
    pub fn create(dir: &Path) -> Result<Self, CertError> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|source| CertError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
        let ca = LocalCa::new(dir, "ca")?;
        let coordinator_cert = ca.server("coordinator")?;
        let client_token = random_token();
        let token_file = dir.join("tokens");
        write_file(
            &token_file,
            format!(
                "# made by the demo for one run: its own client\n{CLIENT_PRINCIPAL} {client_token}\n"
            )
            .as_bytes(),
            0o600,
        )?;
        Ok(Self {
            ca,
            coordinator_cert,
            token_file,
            client_token,
            coordinator_token: random_token(),
        })
    }

    /// The CA's certificate: what every client here trusts.
    pub fn ca_cert(&self) -> &Path {
        &self.ca.cert
    }

    /// The flags that make `treaty serve` serve TLS, authenticate callers with the token
    /// file, and verify `https://` participants against the CA.
    pub fn coordinator_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            path(&self.coordinator_cert.cert),
            "--tls-key".into(),
            path(&self.coordinator_cert.key),
            "--auth-tokens".into(),
            path(&self.token_file),
            "--participant-ca".into(),
            path(self.ca_cert()),
        ]
    }

    /// The coordinator's environment: the token it presents to the services.
    pub fn coordinator_env(&self) -> [(&'static str, &str); 1] {
        [(PARTICIPANT_TOKEN_ENV, &self.coordinator_token)]
    }

    /// The flags that make service `name` serve TLS with a certificate of its own, and
    /// trust only `coordinator_endpoint` (an `https://` one, verified against the CA)
    /// for branches in doubt.
    pub fn service_args(
        &self,
        name: &str,
        coordinator_endpoint: &str,
    ) -> Result<Vec<String>, CertError> {
        let cert = self.ca.server(name)?;
        Ok(vec![
            "--tls-cert".into(),
            path(&cert.cert),
            "--tls-key".into(),
            path(&cert.key),
            "--coordinator-endpoint".into(),
            coordinator_endpoint.into(),
            "--coordinator-ca".into(),
            path(self.ca_cert()),
        ])
    }

    /// A service's environment: the coordinator's token, the only one it accepts.
    pub fn service_env(&self) -> [(&'static str, &str); 1] {
        [(COORDINATOR_TOKEN_ENV, &self.coordinator_token)]
    }

    /// How the demo's client reaches the coordinator: verifying it against the CA, and
    /// presenting the token of [`CLIENT_PRINCIPAL`].
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions {
            token: Some(self.client_token.clone()),
            ..self.stranger_options()
        }
    }

    /// A client that verifies servers against the CA but presents no token: someone who
    /// can reach the ports and nothing more.
    pub fn stranger_options(&self) -> ClientOptions {
        ClientOptions {
            tls: Some(ClientTlsFiles {
                ca: Some(self.ca.cert.clone()),
                cert: None,
                key: None,
            }),
            token: None,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn tokens_are_random_hex_and_never_in_arguments_or_debug() {
        let dir = tempfile::tempdir().unwrap();
        let secure = TlsAndTokens::create(&dir.path().join("credentials")).unwrap();
        assert_eq!(secure.client_token.len(), 2 * TOKEN_BYTES);
        assert!(secure.client_token.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(secure.client_token, secure.coordinator_token);
        let args = [
            secure.coordinator_args(),
            secure
                .service_args("payment", "https://127.0.0.1:1")
                .unwrap(),
        ]
        .concat();
        let debug = format!("{secure:?}");
        for token in [&secure.client_token, &secure.coordinator_token] {
            assert!(!args.iter().any(|arg| arg.contains(token.as_str())));
            assert!(!debug.contains(token.as_str()));
        }
        // The coordinator reads the file as its own: one principal, not an admin.
        let table = treaty_sdk::auth::TokenTable::load(&secure.token_file).unwrap();
        let principal = table.principal(&secure.client_token).unwrap();
        assert_eq!(
            (principal.name.as_str(), principal.admin),
            (CLIENT_PRINCIPAL, false)
        );
        assert!(table.principal(&secure.coordinator_token).is_none());
        for private in [&secure.token_file, &secure.coordinator_cert.key] {
            let mode = std::fs::metadata(private).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "{} is readable by others",
                private.display()
            );
        }
        assert_eq!(
            secure.service_env(),
            [(COORDINATOR_TOKEN_ENV, secure.coordinator_token.as_str())]
        );
        assert_eq!(
            secure.coordinator_env(),
            [(PARTICIPANT_TOKEN_ENV, secure.coordinator_token.as_str())]
        );
    }
}
