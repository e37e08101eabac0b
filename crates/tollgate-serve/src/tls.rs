//! TLS for gRPC listeners and clients (rustls with the ring provider, through tonic): files
//! named in configuration are read once at start, and an error names the configuration key.
//!
//! A listener with a client CA requires every client to present a certificate signed by it
//! (mutual TLS); without one, any client that trusts the server's certificate may connect and
//! is then authenticated by its API key as usual.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Largest PEM file read (a certificate chain or a key), in bytes.
pub const PEM_BYTES_MAX: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct TlsError {
    /// The configuration key or flag that named the file (`tls.cert`, `--tls-ca`).
    pub key: String,
    pub problem: String,
}

fn tls_error(key: &str, problem: impl std::fmt::Display) -> TlsError {
    TlsError {
        key: key.to_owned(),
        problem: problem.to_string(),
    }
}

/// Reads a PEM file named by configuration key `key`, bounded and checked for a PEM block.
pub fn read_pem(key: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let metadata =
        std::fs::metadata(path).map_err(|e| tls_error(key, format!("{}: {e}", path.display())))?;
    if metadata.len() > PEM_BYTES_MAX {
        return Err(tls_error(
            key,
            format!(
                "{}: {} bytes, at most {PEM_BYTES_MAX}",
                path.display(),
                metadata.len()
            ),
        ));
    }
    let bytes =
        std::fs::read(path).map_err(|e| tls_error(key, format!("{}: {e}", path.display())))?;
    if !bytes.windows(11).any(|window| window == b"-----BEGIN ") {
        return Err(tls_error(
            key,
            format!("{}: not a PEM file", path.display()),
        ));
    }
    Ok(bytes)
}

/// A listener's TLS files: its certificate chain and key, and optionally the CA whose
/// certificates clients must present.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// The tonic server configuration; `prefix` is where the files were configured (`tls`
    /// names `tls.cert`, `--tls` names `--tls-cert`).
    pub fn load(&self, prefix: &str) -> Result<ServerTlsConfig, TlsError> {
        let name = |field: &str| join(prefix, field);
        let cert = read_pem(&name("cert"), &self.cert)?;
        let key = read_pem(&name("key"), &self.key)?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(client_ca) = &self.client_ca {
            let ca = read_pem(&name("client_ca"), client_ca)?;
            // Without a certificate from this CA the handshake fails.
            config = config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(false);
        }
        // Parse the certificate and key now, so a bad file stops the node at start with the
        // key named, not at its first connection.
        tonic::transport::Server::builder()
            .tls_config(config.clone())
            .map_err(|e| {
                tls_error(
                    &name("cert"),
                    format!("{} with its key: {e}", self.cert.display()),
                )
            })?;
        Ok(config)
    }
}

/// A client's TLS files: the CA it trusts for the server, and its own certificate and key
/// when the server asks for one.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// The tonic client configuration. A client needs the CA to trust (no system roots are
    /// built in), and its certificate and key come together or not at all.
    pub fn load(&self, prefix: &str) -> Result<ClientTlsConfig, TlsError> {
        let name = |field: &str| join(prefix, field);
        let ca = self.ca.as_ref().ok_or_else(|| {
            tls_error(
                &name("ca"),
                "an https:// endpoint needs the CA certificate to trust",
            )
        })?;
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_pem(&name("ca"), ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let cert = read_pem(&name("cert"), cert)?;
                let key = read_pem(&name("key"), key)?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            (Some(_), None) => return Err(tls_error(&name("key"), "needed with a certificate")),
            (None, Some(_)) => return Err(tls_error(&name("cert"), "needed with a key")),
        }
        Ok(config)
    }
}

/// `tls` + `cert` is `tls.cert`; a flag prefix (`--tls`) joins with a dash: `--tls-cert`.
fn join(prefix: &str, field: &str) -> String {
    if prefix.starts_with("--") {
        format!("{prefix}-{}", field.replace('_', "-"))
    } else if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ServerTlsFiles {
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope.key"),
            client_ca: None,
        };
        let error = missing.load("tls").unwrap_err().to_string();
        assert!(error.starts_with("tls.cert: "), "{error}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem").unwrap();
        let error = read_pem("--tls-ca", &garbage).unwrap_err().to_string();
        assert!(error.contains("not a PEM file"), "{error}");
        let no_ca = ClientTlsFiles::default().load("--tls").unwrap_err();
        assert_eq!(no_ca.key, "--tls-ca");
        let pki = tollgate_testkit::tls::TestPki::new("test").unwrap();
        let half = ClientTlsFiles {
            ca: Some(pki.ca.clone()),
            cert: Some(pki.server.cert.clone()),
            key: None,
        };
        assert_eq!(
            half.load("authority_tls").unwrap_err().key,
            "authority_tls.key"
        );
        let server = ServerTlsFiles {
            cert: pki.server.cert.clone(),
            key: pki.server.key.clone(),
            client_ca: Some(pki.ca.clone()),
        };
        assert!(server.load("tls").is_ok());
    }
}
