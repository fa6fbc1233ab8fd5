//! TLS for Treaty's servers and clients, with rustls (no OpenSSL).
//!
//! - [`ServerTlsFiles`] names a server's certificate chain and key (PEM) and, for mutual
//!   TLS, the CA that client certificates must chain to. [`ReloadableServerTls`] holds
//!   the loaded configuration and swaps in a new one on [`ReloadableServerTls::reload`]
//!   (the daemons call it on SIGHUP); a reload that fails keeps the old one, so a bad file
//!   never takes a serving daemon down.
//! - [`ClientTlsFiles`] is a client's view: the CA to verify servers with (the system's
//!   roots when none is given) and an optional client certificate for mutual TLS. The
//!   server's host name is always verified against its certificate.
//! - [`peer_names`] reads the names a client certificate carries (DNS and URI subject
//!   alternative names, then the subject's common name): its identity.
//!
//! Invariant: a server with TLS configured never serves a connection in cleartext, and
//! with a client CA configured accepts no client certificate that does not chain to it
//! (rustls's verifier checks the chain, validity dates and key usage). A client without
//! a certificate completes the handshake and is then refused by the layer that decides
//! who may call what (the coordinator's authenticator, a participant's trust), so calls
//! open to anyone — `GetOutcome`, health checks — stay reachable under mutual TLS.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{what} is set but {missing} is not: both are needed")]
    Incomplete {
        what: &'static str,
        missing: &'static str,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read_error(path: &Path, error: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        message: error.to_string(),
    }
}

/// Every certificate in a PEM file (at least one).
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(path, e))?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certificates)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| read_error(path, e))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server's certificate files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// With it, a certificate a client presents must chain to this CA, and its names
    /// identify the client (mutual TLS); clients without one are anonymous.
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// `cert` and `key` must come together; `client_ca` needs them. `None` for no TLS.
    pub fn from_options(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert,
                key,
                client_ca,
            })),
            (Some(_), None) => Err(TlsError::Incomplete {
                what: "the TLS certificate",
                missing: "its key",
            }),
            (None, Some(_)) => Err(TlsError::Incomplete {
                what: "the TLS key",
                missing: "its certificate",
            }),
            (None, None) if client_ca.is_some() => Err(TlsError::Incomplete {
                what: "the client CA",
                missing: "the server's certificate and key",
            }),
            (None, None) => Ok(None),
        }
    }

    /// Reads the files into a rustls configuration that speaks HTTP/2 only.
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let chain = load_certificates(&self.cert)?;
        let key = load_private_key(&self.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for certificate in load_certificates(ca)? {
                    roots
                        .add(certificate)
                        .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("{}: {e}", self.key.display())))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A server's TLS configuration, replaced whole by [`reload`](Self::reload).
#[derive(Debug)]
pub struct ReloadableServerTls {
    files: ServerTlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl ReloadableServerTls {
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let config = files.load()?;
        Ok(Self {
            files,
            current: RwLock::new(config),
        })
    }

    /// The configuration new connections get.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reads the files again; on success new connections get the new certificates
    /// (open ones keep theirs), on failure nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = self.files.load()?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = config;
        Ok(())
    }

    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

/// A client's TLS files: how it verifies servers, and what it presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CA certificates (PEM) servers must chain to; the system's roots if `None`.
    pub ca: Option<PathBuf>,
    /// A client certificate chain and key (PEM), for servers that require mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// Reads the files into a tonic client configuration (used for `https://` endpoints;
    /// `http://` ones stay cleartext).
    pub fn load(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| read_error(ca, e))?;
                load_certificates(ca)?;
                config.ca_certificate(Certificate::from_pem(pem))
            }
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                load_certificates(cert)?;
                load_private_key(key)?;
                let cert_pem = std::fs::read(cert).map_err(|e| read_error(cert, e))?;
                let key_pem = std::fs::read(key).map_err(|e| read_error(key, e))?;
                config = config.identity(Identity::from_pem(cert_pem, key_pem));
            }
            (Some(_), None) => {
                return Err(TlsError::Incomplete {
                    what: "the client certificate",
                    missing: "its key",
                });
            }
            (None, Some(_)) => {
                return Err(TlsError::Incomplete {
                    what: "the client key",
                    missing: "its certificate",
                });
            }
            (None, None) => {}
        }
        Ok(config)
    }
}

/// The names a certificate (DER) gives its subject, most specific first: DNS names and
/// URIs of the subject alternative name extension, then the common name. Empty if it
/// cannot be parsed.
pub fn peer_names(certificate: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(certificate) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(alternative)) = parsed.subject_alternative_name() {
        for name in &alternative.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push(dns.to_string()),
                GeneralName::URI(uri) => names.push(uri.to_string()),
                _ => {}
            }
        }
    }
    names.extend(
        parsed
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string)),
    );
    names
}
