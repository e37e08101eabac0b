//! Certificates made at test time: a certificate authority, a server certificate for
//! `localhost` and `127.0.0.1`, and client certificates, all signed by that authority and
//! written as PEM files into a temporary directory that lives as long as the value.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::TestkitError;

/// A certificate and its private key, as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority in a temporary directory, with one server certificate.
pub struct TestPki {
    dir: tempfile::TempDir,
    ca_key: KeyPair,
    ca_params: CertificateParams,
    /// The authority's certificate (what clients and servers trust).
    pub ca: PathBuf,
    /// A server certificate for `localhost` and `127.0.0.1`.
    pub server: CertFiles,
}

fn failed(what: &str, error: impl std::fmt::Display) -> TestkitError {
    TestkitError::Io(std::io::Error::other(format!("{what}: {error}")))
}

impl TestPki {
    /// A fresh authority named `common_name` and its server certificate.
    pub fn new(common_name: &str) -> Result<TestPki, TestkitError> {
        let dir = tempfile::tempdir()?;
        let ca_key = KeyPair::generate().map_err(|e| failed("ca key", e))?;
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("ca parameters", e))?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(|e| failed("ca certificate", e))?;
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_cert.pem())?;
        let mut pki = TestPki {
            server: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            dir,
            ca_key,
            ca_params,
            ca,
        };
        pki.server = pki.issue(
            "server",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        Ok(pki)
    }

    /// A client certificate named `name`, signed by this authority.
    pub fn client(&self, name: &str) -> Result<CertFiles, TestkitError> {
        self.issue(name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn issue(
        &self,
        name: &str,
        subject_alt_names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<CertFiles, TestkitError> {
        let names: Vec<String> = subject_alt_names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).map_err(|e| failed("parameters", e))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(|e| failed("key", e))?;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| failed("certificate", e))?;
        let files = CertFiles {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}
