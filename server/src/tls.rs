//! HTTPS: the node's certificate chain and private key from PEM files,
//! offered with ALPN (`h2`, then `http/1.1`), and loaded again on SIGHUP
//! or when the files change (looked at every [`CHECK`]), without dropping a
//! connection: later handshakes get the new certificate, open connections
//! keep theirs. Files that do not load leave the current identity in place.

use crate::error::Error;
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio_rustls::TlsAcceptor;

/// How often the files are looked at for changes.
const CHECK: Duration = Duration::from_secs(2);

/// The node's TLS identity and the acceptor that offers it. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    identity: Arc<Identity>,
}

/// The files, and what was loaded from them.
struct Identity {
    cert: PathBuf,
    key: PathBuf,
    loaded: RwLock<(Arc<CertifiedKey>, Stamp)>,
}

/// When and how big the files were when they were loaded.
type Stamp = [(Option<SystemTime>, u64); 2];

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let of = |p: &Path| std::fs::metadata(p).map_or((None, 0), |m| (m.modified().ok(), m.len()));
    [of(cert), of(key)]
}

/// Reads the chain in `cert` (the server's certificate first) and the key
/// in `key` (PKCS#8, PKCS#1 or SEC1), and checks that they belong together.
fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, Error> {
    let bad = |path: &Path, why: String| Error::Tls(format!("{}: {why}", path.display()));
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(bad(cert, "holds no certificate (-----BEGIN CERTIFICATE-----)".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, format!("not a PEM private key: {e}")))?;
    let signer = provider::sign::any_supported_type(&private).map_err(|e| bad(key, format!("unusable key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| Error::Tls(format!("{} and {} do not belong together: {e}", cert.display(), key.display())))?;
    Ok(certified)
}

impl Tls {
    /// Loads the certificate chain in `cert` and the private key in `key`
    /// (PEM files).
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, Error> {
        let certified = load(cert, key)?;
        let identity = Arc::new(Identity {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            loaded: RwLock::new((Arc::new(certified), stamp(cert, key))),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(identity.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls { acceptor: TlsAcceptor::from(Arc::new(config)), identity })
    }

    /// Loads the files again if they changed since they were last loaded
    /// (or always, with `force`); returns whether a new identity is in
    /// place. On failure the current one stays.
    pub fn reload(&self, force: bool) -> Result<bool, Error> {
        self.identity.reload(force)
    }

    /// Reloads on SIGHUP and when the files change, until the last clone
    /// of this is dropped; logs what happened. Call it within a tokio
    /// runtime.
    pub fn watch(&self) -> std::io::Result<()> {
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        // Weak: the task ends once every clone of this is dropped.
        let identity = Arc::downgrade(&self.identity);
        tokio::spawn(async move {
            loop {
                let force = tokio::select! {
                    _ = hangups.recv() => true,
                    () = tokio::time::sleep(CHECK) => false,
                };
                let Some(identity) = identity.upgrade() else { break };
                match identity.reload(force) {
                    Ok(true) => tracing::info!(cert = %identity.cert.display(), "TLS certificate loaded again"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "TLS certificate not reloaded; the current one stays"),
                }
            }
        });
        Ok(())
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("cert", &self.identity.cert).field("key", &self.identity.key).finish()
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("cert", &self.cert).finish_non_exhaustive()
    }
}

impl Identity {
    fn reload(&self, force: bool) -> Result<bool, Error> {
        let now = stamp(&self.cert, &self.key);
        if !force && self.loaded.read().unwrap().1 == now {
            return Ok(false);
        }
        let certified = load(&self.cert, &self.key);
        // A failed load is not retried until the files change again.
        let mut loaded = self.loaded.write().unwrap();
        loaded.1 = now;
        loaded.0 = Arc::new(certified?);
        Ok(true)
    }
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.loaded.read().unwrap().0.clone())
    }
}
