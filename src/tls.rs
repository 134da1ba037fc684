//! TLS on the listener (`[server.tls] cert`, `key`: PEM files), with rustls
//! and its ring provider; no OpenSSL.
//!
//! The certificate sits behind a resolver ([`Certificates`]) rather than in
//! the rustls config itself, so that SIGHUP can swap it: handshakes after
//! the swap present the new certificate, and connections already open keep
//! the session they negotiated. A file that does not load leaves the old
//! certificate in place.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::TlsConfig;

/// Why a certificate or key could not be used; names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls.cert {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("server.tls.key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("server.tls: {0}")]
    Config(String),
}

/// Reads the chain and key `tls` names and checks that they belong together.
pub fn load(tls: &TlsConfig) -> Result<CertifiedKey, TlsError> {
    let cert_error = |reason: String| TlsError::Cert {
        path: tls.cert.clone(),
        reason,
    };
    let key_error = |reason: String| TlsError::Key {
        path: tls.key.clone(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| cert_error(pem_reason(&tls.cert, e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(pem_reason(&tls.cert, e)))?;
    if chain.is_empty() {
        return Err(cert_error(
            "no CERTIFICATE block in the file (PEM expected)".into(),
        ));
    }
    let key =
        PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| key_error(pem_reason(&tls.key, e)))?;
    let signing_key = ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_error(format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| {
        key_error(format!(
            "does not match the certificate in {}: {e}",
            tls.cert.display()
        ))
    })?;
    Ok(certified)
}

fn pem_reason(path: &Path, e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read: {io}"),
        Error::NoItemsFound => format!("no matching PEM block in {}", path.display()),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// The certificate handshakes present; swapped in place by [`reload`].
///
/// [`reload`]: Certificates::reload
pub struct Certificates {
    /// The paths, as last loaded: a reload re-reads the files they name.
    paths: RwLock<TlsConfig>,
    /// What the next handshake presents.
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("paths", &*self.paths.read().expect("tls paths lock"))
            .finish_non_exhaustive()
    }
}

impl Certificates {
    pub fn open(tls: &TlsConfig) -> Result<Arc<Certificates>, TlsError> {
        Ok(Arc::new(Certificates {
            current: RwLock::new(Arc::new(load(tls)?)),
            paths: RwLock::new(tls.clone()),
        }))
    }

    /// Loads the files `tls` names and, if they load, presents them from the
    /// next handshake on. On an error nothing changes.
    pub fn reload(&self, tls: &TlsConfig) -> Result<(), TlsError> {
        let fresh = Arc::new(load(tls)?);
        *self.current.write().expect("tls cert lock") = fresh;
        *self.paths.write().expect("tls paths lock") = tls.clone();
        Ok(())
    }

    /// The rustls configuration for the listener: TLS 1.2 and 1.3, no
    /// client certificates, the certificate from `self`.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, TlsError> {
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Config(e.to_string()))?
                .with_no_client_auth()
                .with_cert_resolver(self.clone());
        Ok(config)
    }
}

/// Where a client finds the authorities it trusts when none is named:
/// `SSL_CERT_FILE`, else the system bundle of Debian-like systems.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A client configuration for `wss://` that trusts the PEM certificates in
/// `ca_file` (a private CA, or a self-signed certificate itself), or with
/// `None` the system's bundle.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let env_bundle = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let path = match (ca_file, &env_bundle) {
        (Some(path), _) => path,
        (None, Some(path)) => path.as_path(),
        (None, None) => Path::new(SYSTEM_BUNDLE),
    };
    let ca_error = |reason: String| {
        TlsError::Config(format!("trusted certificates {}: {reason}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_error(pem_reason(path, e)))? {
        let cert = cert.map_err(|e| ca_error(pem_reason(path, e)))?;
        roots
            .add(cert)
            .map_err(|e| ca_error(format!("unusable certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ca_error("no CERTIFICATE block in the file".into()));
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("tls cert lock").clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, written into `dir`.
    fn pair(dir: &Path, name: &str) -> TlsConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let tls = TlsConfig {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&tls.cert, cert.pem()).unwrap();
        std::fs::write(&tls.key, key.serialize_pem()).unwrap();
        tls
    }

    #[test]
    fn a_matching_pair_loads_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a");
        let b = pair(dir.path(), "b");
        assert!(load(&a).is_ok());

        let crossed = TlsConfig {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let err = load(&crossed).unwrap_err().to_string();
        assert!(
            err.starts_with("server.tls.key ") && err.contains("does not match"),
            "{err}"
        );

        let missing = TlsConfig {
            cert: dir.path().join("none.crt"),
            key: a.key.clone(),
        };
        let err = load(&missing).unwrap_err().to_string();
        assert!(
            err.contains("none.crt") && err.contains("cannot read"),
            "{err}"
        );

        std::fs::write(&b.cert, "hello\n").unwrap();
        let err = load(&b).unwrap_err().to_string();
        assert!(
            err.contains("b.crt") && err.contains("CERTIFICATE"),
            "{err}"
        );
    }

    #[test]
    fn a_failed_reload_keeps_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a");
        let certs = Certificates::open(&a).unwrap();
        let before = certs.current.read().unwrap().cert.clone();
        std::fs::write(&a.key, "").unwrap();
        assert!(certs.reload(&a).is_err());
        assert_eq!(certs.current.read().unwrap().cert, before);
        let b = pair(dir.path(), "b");
        certs.reload(&b).unwrap();
        assert_ne!(certs.current.read().unwrap().cert, before);
    }
}
