//! Who may call the service: TLS on the gRPC port (mutual when a client CA is given) and an
//! optional API key checked on every RPC except health, so that probes need no secret.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The server's TLS files (PEM). With `client_ca`, clients must present a certificate it signed.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// Reads the files into tonic's (rustls) server configuration.
    pub fn server_config(&self) -> anyhow::Result<ServerTlsConfig> {
        let identity = Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(config)
    }

    /// The same files as a rustls configuration, for the HTTP/REST port (HTTP/1.1 only).
    pub fn rustls_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
            CertificateDer::pem_slice_iter(&read(path)?)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("reading certificates from {}", path.display()))
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .with_context(|| format!("reading a private key from {}", self.key.display()))?;
        let builder = rustls::ServerConfig::builder();
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add_parsable_certificates(certs(ca)?);
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs(&self.cert)?, key)
            .context("the TLS certificate and key")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Paths relative to `dir` (the config file's folder) made usable from anywhere.
    pub fn relative_to(mut self, dir: &Path) -> Self {
        self.cert = dir.join(&self.cert);
        self.key = dir.join(&self.key);
        self.client_ca = self.client_ca.map(|ca| dir.join(ca));
        self
    }
}

/// A client's TLS settings: the CA that signed the server's certificate and, for mutual TLS,
/// the client's own certificate and key.
pub fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> anyhow::Result<ClientTlsConfig> {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(config)
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// A shared secret that clients send as `authorization: Bearer <key>` (or `x-api-key: <key>`).
/// Its `Debug` never shows the key, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    key: Arc<str>,
    /// SHA-256 of the key, what presented keys are compared with.
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl std::str::FromStr for ApiKey {
    type Err = String;

    fn from_str(key: &str) -> Result<Self, Self::Err> {
        let valid = !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic());
        if !valid {
            return Err("an API key is printable ASCII without spaces".into());
        }
        Ok(Self {
            key: key.into(),
            digest: sha256(key.as_bytes()),
        })
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest
        .as_ref()
        .try_into()
        .expect("a SHA-256 digest is 32 bytes")
}

impl ApiKey {
    /// Adds the key to an outgoing request.
    pub fn authorise<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let value = format!("Bearer {}", self.key)
            .parse()
            .expect("validated ASCII");
        request.metadata_mut().insert("authorization", value);
        request
    }

    /// Whether `headers` (gRPC metadata or HTTP headers) carry this key. The SHA-256 digests of
    /// the presented and the expected key are compared, in constant time: response timing tells
    /// an attacker neither how much of a guess was right nor how long the key is.
    pub fn admits(&self, headers: &http::HeaderMap) -> bool {
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
        presented.is_some_and(|p| bool::from(sha256(p.as_bytes()).ct_eq(&self.digest)))
    }
}

/// The interceptor in front of every service but health: passes everything when no key is set.
#[derive(Clone, Debug, Default)]
pub struct RequireApiKey(pub Option<ApiKey>);

impl tonic::service::Interceptor for RequireApiKey {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match &self.0 {
            Some(key) if !key.admits(request.metadata().as_ref()) => Err(Status::unauthenticated(
                "missing or wrong API key: send 'authorization: Bearer <key>'",
            )),
            _ => Ok(request),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn request(header: &'static str, value: &str) -> Request<()> {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert(header, value.parse().unwrap());
        request
    }

    #[test]
    fn only_the_right_key_passes_and_debug_hides_it() {
        let key: ApiKey = "s3cret-key".parse().unwrap();
        let mut check = RequireApiKey(Some(key.clone()));
        assert!(check
            .call(request("authorization", "Bearer s3cret-key"))
            .is_ok());
        assert!(check.call(request("x-api-key", "s3cret-key")).is_ok());
        for (header, value) in [
            ("authorization", "Bearer s3cret-kez"),
            ("authorization", "Bearer s3cret-key2"),
            ("authorization", "Bearer s3cret-ke"),
            ("authorization", "Bearer s"),
            ("x-api-key", "s3cret-keys3cret-key"),
            ("authorization", "s3cret-key"),
            ("x-api-key", ""),
        ] {
            let status = check.call(request(header, value)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
        assert!(check.call(Request::new(())).is_err());
        assert!(RequireApiKey(None).call(Request::new(())).is_ok());
        assert!(!format!("{key:?}").contains("s3cret"));
        assert!("has space".parse::<ApiKey>().is_err());
    }
}
