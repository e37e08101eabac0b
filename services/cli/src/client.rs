//! Connections to the authority (Admin) and the edge (Enforcement), the API key on every request,
//! and the time limit on every unary call.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tollgate_proto::pb;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::CliError;

pub type AdminClient = pb::admin_client::AdminClient<Channel>;
pub type EdgeClient = pb::enforcement_client::EnforcementClient<Channel>;

pub struct Connection {
    endpoint: String,
    edge_endpoint: String,
    api_key: Option<MetadataValue<tonic::metadata::Ascii>>,
    pub timeout: Duration,
    /// For https:// endpoints: the CA to trust, and this client's certificate if any.
    tls: Option<ClientTlsConfig>,
}

/// Largest PEM file the CLI reads, in bytes.
const PEM_BYTES_MAX: u64 = 1024 * 1024;

fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, CliError> {
    let problem =
        |e: &dyn std::fmt::Display| CliError::input(flag, format!("{}: {e}", path.display()));
    let size = std::fs::metadata(path).map_err(|e| problem(&e))?.len();
    if size > PEM_BYTES_MAX {
        return Err(problem(&format!("{size} bytes, at most {PEM_BYTES_MAX}")));
    }
    let bytes = std::fs::read(path).map_err(|e| problem(&e))?;
    if !bytes.windows(11).any(|window| window == b"-----BEGIN ") {
        return Err(problem(&"not a PEM file"));
    }
    Ok(bytes)
}

impl Connection {
    pub fn new(
        endpoint: &str,
        edge_endpoint: Option<&str>,
        api_key: Option<&str>,
        timeout: Duration,
    ) -> Result<Connection, CliError> {
        let api_key = match api_key.filter(|key| !key.is_empty()) {
            Some(key) => Some(
                format!("Bearer {key}")
                    .parse()
                    .map_err(|_| CliError::input("--api-key", "must be printable ASCII"))?,
            ),
            None => None,
        };
        Ok(Connection {
            endpoint: endpoint.to_string(),
            edge_endpoint: edge_endpoint.unwrap_or(endpoint).to_string(),
            api_key,
            timeout,
            tls: None,
        })
    }

    /// Trusts `ca` for https:// endpoints and presents `identity` (certificate, key) when set.
    pub fn with_tls(
        mut self,
        ca: Option<&Path>,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Connection, CliError> {
        let Some(ca) = ca else {
            if identity.is_some() {
                return Err(CliError::input("--tls-ca", "needed with --tls-cert"));
            }
            return Ok(self);
        };
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("--tls-ca", ca)?));
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(
                read_pem("--tls-cert", cert)?,
                read_pem("--tls-key", key)?,
            ));
        }
        self.tls = Some(tls);
        Ok(self)
    }

    async fn channel(&self, flag: &str, url: &str) -> Result<Channel, CliError> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| CliError::input(flag, format!("{url:?} is not a URL: {e}")))?
            .connect_timeout(self.timeout);
        if url.starts_with("https://") {
            let tls = self.tls.clone().ok_or_else(|| {
                CliError::input("--tls-ca", format!("needed for the https:// {flag}"))
            })?;
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| CliError::input("--tls-ca", e.to_string()))?;
        }
        match tokio::time::timeout(self.timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(error)) => Err(CliError::Connect {
                endpoint: url.to_string(),
                detail: error_chain(&error),
            }),
            Err(_) => Err(CliError::Connect {
                endpoint: url.to_string(),
                detail: format!("no connection within {:?} (see --timeout)", self.timeout),
            }),
        }
    }

    pub async fn admin(&self) -> Result<AdminClient, CliError> {
        Ok(AdminClient::new(
            self.channel("--endpoint", &self.endpoint).await?,
        ))
    }

    pub async fn edge(&self) -> Result<EdgeClient, CliError> {
        Ok(EdgeClient::new(
            self.channel("--edge-endpoint", &self.edge_endpoint).await?,
        ))
    }

    /// A request carrying the API key.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(key) = &self.api_key {
            request.metadata_mut().insert("authorization", key.clone());
        }
        request
    }

    /// Runs one unary call within the timeout; its gRPC error is named after `call`.
    pub async fn call<T>(
        &self,
        call: &'static str,
        future: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CliError> {
        match tokio::time::timeout(self.timeout, future).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(CliError::Status { call, status }),
            Err(_) => Err(CliError::Status {
                call,
                status: tonic::Status::deadline_exceeded(format!(
                    "no answer within {:?}",
                    self.timeout
                )),
            }),
        }
    }
}

/// An error and its causes on one line ("transport error: tcp connect error: Connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
