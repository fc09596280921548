//! Optional TLS below the framing: PEM files -> rustls configurations, on the `ring` provider.
//!
//! The server gets an `Arc<rustls::ServerConfig>` (`server_config`), the client a
//! `TlsClientConfig` (trusted CA certificates + the name the server's certificate must carry).
//! Both offer one ALPN protocol, `ALPN_PROTOCOL`, so a TLS peer of another protocol is refused
//! in the handshake. Everything above the TLS stream (frames, Hello, token) is unchanged.
//!
//! What must never happen here: a configuration that skips certificate verification, or an error
//! that does not name the file it is about.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The ALPN protocol id both sides offer (TLS application-layer protocol negotiation).
pub const ALPN_PROTOCOL: &[u8] = b"stormledger/1";

/// Why a TLS configuration could not be built. Each message names the file.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read.
    Read { what: &'static str, path: PathBuf, error: io::Error },
    /// The file is not PEM of the expected kind (or holds none of it).
    Pem { what: &'static str, path: PathBuf, reason: String },
    /// rustls refused the contents (a certificate it cannot parse, a key that does not match).
    Invalid { what: &'static str, path: PathBuf, reason: String },
    /// Not a DNS name or IP address a certificate can be checked against.
    ServerName(String),
}

impl core::fmt::Display for TlsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TlsError::Read { what, path, error } => write!(f, "cannot read the TLS {what} {}: {error}", path.display()),
            TlsError::Pem { what, path, reason } => write!(f, "TLS {what} {}: {reason}", path.display()),
            TlsError::Invalid { what, path, reason } => {
                write!(f, "TLS {what} {} is not usable: {reason}", path.display())
            }
            TlsError::ServerName(name) => {
                write!(f, "TLS server name {name:?} is neither a DNS name nor an IP address")
            }
        }
    }
}

impl std::error::Error for TlsError {}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read { what, path: path.to_path_buf(), error })
}

/// Every `CERTIFICATE` section of a PEM file, in order; at least one.
fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let pem_error = |reason: String| TlsError::Pem { what, path: path.to_path_buf(), reason };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(format!("not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(pem_error("no PEM CERTIFICATE section found".into()));
    }
    Ok(certs)
}

/// The server side: the certificate chain (leaf first) and its private key, both PEM. The key may
/// be PKCS#8, PKCS#1 (RSA) or SEC1 (EC). TLS 1.2 and 1.3; no client certificates.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certificates("certificate", cert)?;
    let key_pem = read("key", key)?;
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        what: "key",
        path: key.to_path_buf(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM PRIVATE KEY section found".into(),
            e => format!("not valid PEM ({e})"),
        },
    })?;
    let invalid = |reason: String| TlsError::Invalid { what: "certificate", path: cert.to_path_buf(), reason };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| invalid(format!("{e} (does {} hold the key of this certificate?)", key.display())))?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    Ok(Arc::new(config))
}

/// The client side of TLS: whom to trust and which name the server's certificate must carry.
#[derive(Clone)]
pub struct TlsClientConfig {
    pub config: Arc<rustls::ClientConfig>,
    /// Checked against the certificate's subject alternative names (DNS name or IP address).
    pub server_name: ServerName<'static>,
}

impl core::fmt::Debug for TlsClientConfig {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TlsClientConfig").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl TlsClientConfig {
    /// Trusts the CA certificate(s) in the PEM file `ca` (and nothing else: not the system's
    /// roots) and expects a certificate for `server_name`.
    pub fn from_ca_file(ca: &Path, server_name: &str) -> Result<TlsClientConfig, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates("CA certificate", ca)? {
            roots.add(cert).map_err(|e| TlsError::Invalid {
                what: "CA certificate",
                path: ca.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid { what: "CA certificate", path: ca.to_path_buf(), reason: e.to_string() })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        TlsClientConfig::new(Arc::new(config), server_name)
    }

    /// A caller-built rustls configuration (e.g. other roots, client certificates).
    pub fn new(config: Arc<rustls::ClientConfig>, server_name: &str) -> Result<TlsClientConfig, TlsError> {
        let server_name =
            ServerName::try_from(server_name.to_string()).map_err(|_| TlsError::ServerName(server_name.to_string()))?;
        Ok(TlsClientConfig { config, server_name })
    }
}

/// The name to check the server's certificate against when none is given: the host part of a
/// `HOST:PORT` address (`ledger.example:7878` -> `ledger.example`, `127.0.0.1:7878` ->
/// `127.0.0.1`, `[::1]:7878` -> `::1`). An IP address is checked against the certificate's IP
/// address entries.
pub fn default_server_name(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        // A bare IPv6 address without brackets and port ("::1") is all host.
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() && addr.parse::<IpAddr>().is_err() => {
            host
        }
        _ => addr,
    };
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// A few words on the likely cause of a failed client handshake, for error messages ("" if none).
pub fn handshake_hint(error: &io::Error) -> &'static str {
    use rustls::CertificateError as Cert;
    let Some(error) = error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return "";
    };
    match error {
        rustls::Error::InvalidMessage(_) => " (the server does not seem to speak TLS)",
        rustls::Error::InvalidCertificate(Cert::UnknownIssuer) => {
            " (the server's certificate is not signed by a trusted CA certificate)"
        }
        rustls::Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            " (the server's certificate is not for this server name)"
        }
        rustls::Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            " (the server's certificate has expired)"
        }
        _ => "",
    }
}

/// True if `error` is a TLS failure (the peer's certificate, the handshake, a non-TLS peer)
/// rather than a plain socket error. tokio-rustls reports both as `io::Error`.
pub fn is_tls_error(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_server_names() {
        assert_eq!(default_server_name("ledger.example:7878"), "ledger.example");
        assert_eq!(default_server_name("127.0.0.1:7878"), "127.0.0.1");
        assert_eq!(default_server_name("[::1]:7878"), "::1");
        assert_eq!(default_server_name("::1"), "::1");
        assert_eq!(default_server_name("localhost"), "localhost");
    }

    #[test]
    fn server_names_must_be_names_or_addresses() {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let config = Arc::new(config);
        assert!(TlsClientConfig::new(config.clone(), "localhost").is_ok());
        assert!(TlsClientConfig::new(config.clone(), "10.1.2.3").is_ok());
        assert!(matches!(TlsClientConfig::new(config, "not a name"), Err(TlsError::ServerName(_))));
    }
}
