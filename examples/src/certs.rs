//! Certificates made on the spot with rcgen, for demos and tests: a CA, and leaf
//! certificates it signs for servers (names `localhost` and `127.0.0.1`) and for clients
//! (mutual TLS), written as PEM files into a directory.
//!
//! They are throwaway credentials for one machine, not a way to run a real deployment.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The names a certificate for a server on this machine carries.
pub const LOCAL_SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("a certificate needs at least one name")]
    NoName,
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority whose key lives only in memory: what it signs can be
/// trusted through its certificate file, and nothing else can be signed once it is
/// dropped.
pub struct LocalCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA's certificate (PEM): what clients and servers trust.
    pub cert: PathBuf,
    dir: PathBuf,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").field("cert", &self.cert).finish()
    }
}

impl LocalCa {
    /// A new CA named `name`, its certificate written to `dir/<name>.pem`.
    pub fn new(dir: &Path, name: &str) -> Result<Self, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let cert = dir.join(format!("{name}.pem"));
        write_file(&cert, issuer.pem().as_bytes(), 0o644)?;
        Ok(Self {
            issuer,
            cert,
            dir: dir.to_path_buf(),
        })
    }

    /// A leaf certificate for `names` (DNS names or IP addresses; the first is also the
    /// common name), good for servers and clients, written to `dir/<stem>.{pem,key}`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> Result<CertFiles, CertError> {
        let first = names.first().ok_or(CertError::NoName)?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, *first);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let certificate = params.signed_by(&key, &self.issuer)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        };
        write_file(&files.cert, certificate.pem().as_bytes(), 0o644)?;
        write_file(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
        Ok(files)
    }

    /// A certificate for a server on this machine ([`LOCAL_SERVER_NAMES`]).
    pub fn server(&self, stem: &str) -> Result<CertFiles, CertError> {
        self.issue(stem, &LOCAL_SERVER_NAMES)
    }
}

/// Writes `contents` to `path` (replacing it), created with Unix permissions `mode`.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let failed = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(failed)?;
    file.write_all(contents).map_err(failed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_server_certificate_chains_to_its_ca_and_its_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::new(dir.path(), "ca").unwrap();
        let server = ca.server("server").unwrap();
        let chain = treaty_sdk::tls::load_certificates(&server.cert).unwrap();
        assert_eq!(chain.len(), 1);
        treaty_sdk::tls::load_private_key(&server.key).unwrap();
        treaty_sdk::tls::load_certificates(&ca.cert).unwrap();
        let mode = std::fs::metadata(&server.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is readable by others: {mode:o}");
        assert!(matches!(ca.issue("none", &[]), Err(CertError::NoName)));
    }
}
