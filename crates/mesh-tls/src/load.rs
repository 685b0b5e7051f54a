//! Reading PEM files into rustls configurations, with errors that name the file and say
//! what is wrong with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A certificate or key that could not be used, naming the file and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {path}: {reason}")]
pub struct TlsError {
    what: &'static str,
    path: String,
    reason: String,
}

impl TlsError {
    fn new(what: &'static str, path: &Path, reason: impl Into<String>) -> Self {
        TlsError { what, path: path.display().to_string(), reason: reason.into() }
    }

    pub(crate) fn invalid_name(name: &str, reason: String) -> Self {
        TlsError { what: "server name", path: format!("{name:?}"), reason }
    }

    /// The file at fault (for a bad server name, the name).
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// rustls on ring, whatever other provider the process also links.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, as a server (or a client under mTLS) presents
/// them: two PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The private key of the leaf (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Identity {
    /// The certificate in `cert` with the key in `key`.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Identity { cert: cert.into(), key: key.into() }
    }

    pub(crate) fn load(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let certs = certs("certificate", &self.cert)?;
        let bytes = read("key", &self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&bytes)
            .map_err(|e| TlsError::new("key", &self.key, format!("no private key in it ({e})")))?;
        Ok((certs, key))
    }

    pub(crate) fn files(&self) -> [&Path; 2] {
        [&self.cert, &self.key]
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::new(what, path, format!("cannot be read: {e}")))
}

/// Every certificate in a PEM file; at least one.
fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(what, path, format!("is not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(TlsError::new(what, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The trust anchors in a CA file.
fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs("CA file", path)? {
        roots.add(cert).map_err(|e| TlsError::new("CA file", path, format!("holds an unusable certificate: {e}")))?;
    }
    Ok(roots)
}

/// A server's configuration: `identity`, and when `client_ca` is given, mTLS: clients
/// must present a certificate it signed. Speaks HTTP/2 only (ALPN `h2`).
pub(crate) fn server_config(identity: &Identity, client_ca: Option<&Path>) -> Result<ServerConfig, TlsError> {
    let (certs, key) = identity.load()?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("certificate", &identity.cert, e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .build()
                .map_err(|e| TlsError::new("CA file", ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::new("certificate", &identity.cert, format!("does not go with key {}: {e}", identity.key.display()))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client's configuration: servers must present a certificate `ca` signed; with
/// `identity`, the client presents it (mTLS).
pub(crate) fn client_config(ca: &Path, identity: Option<&Identity>) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("CA file", ca, e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        Some(identity) => {
            let (certs, key) = identity.load()?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                TlsError::new(
                    "certificate",
                    &identity.cert,
                    format!("does not go with key {}: {e}", identity.key.display()),
                )
            })?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
