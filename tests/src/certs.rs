//! Test certificates, generated at test time by `treaty_examples::certs`: a CA, and leaf
//! certificates it signs for servers (names `localhost` and `127.0.0.1`) and for clients
//! (mutual TLS), written as PEM files into a test's temporary directory. Failures fail
//! the test.

use std::path::{Path, PathBuf};

pub use treaty_examples::certs::CertFiles;
use treaty_examples::certs::LocalCa;

#[derive(Debug)]
pub struct TestCa {
    ca: LocalCa,
    /// The CA's certificate (PEM): what clients and servers trust.
    pub cert: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `dir/<name>.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let ca = LocalCa::new(dir, name).unwrap();
        let cert = ca.cert.clone();
        Self { ca, cert }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses; the first is also the
    /// common name), good for servers and clients, written to `dir/<stem>.{pem,key}`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> CertFiles {
        self.ca.issue(stem, names).unwrap()
    }

    /// A certificate for a server on this machine.
    pub fn server(&self, stem: &str) -> CertFiles {
        self.ca.server(stem).unwrap()
    }
}
