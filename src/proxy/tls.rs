//! TLS on the proxy listener (rustls, TLS 1.2 and 1.3): the certificate chain and key from
//! `[server.tls]`, held behind a resolver that SIGHUP reloads, so a renewed certificate is
//! served to the next handshake while connections already open carry on. The handshake itself
//! runs inside [`super::guard`], under the connection's deadline and count.

use std::path::Path;
use std::sync::{Arc, RwLock};

use pingora::listeners::tls::Acceptor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::TlsConfig;

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cert_file {0}: {1}")]
    Cert(String, String),
    #[error("key_file {0}: {1}")]
    Key(String, String),
    #[error("client_ca_file {0}: {1}")]
    ClientCa(String, String),
}

/// Verifies client certificates against `client_ca_file` when one is configured. A client
/// without a certificate is still let in: only keys bound to a certificate need one, and they
/// are refused with `client_cert_required` (a handshake failure would say nothing).
pub fn client_verifier(
    cfg: &TlsConfig,
) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>, TlsError> {
    let Some(path) = &cfg.client_ca_file else {
        return Ok(None);
    };
    let shown = || path.display().to_string();
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::ClientCa(shown(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::ClientCa(
            shown(),
            "no PEM certificate in it".into(),
        ));
    }
    for c in certs {
        roots
            .add(c)
            .map_err(|e| TlsError::ClientCa(shown(), e.to_string()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| TlsError::ClientCa(shown(), e.to_string()))?;
    Ok(Some(verifier))
}

/// Reads and checks the chain (leaf first) and its private key.
pub fn load(cfg: &TlsConfig) -> Result<CertifiedKey, TlsError> {
    let shown = |p: &Path| p.display().to_string();
    let certs = CertificateDer::pem_file_iter(&cfg.cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert(shown(&cfg.cert_file), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Cert(
            shown(&cfg.cert_file),
            "no PEM certificate in it".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| TlsError::Key(shown(&cfg.key_file), e.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| TlsError::Key(shown(&cfg.key_file), e.to_string()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| {
        TlsError::Key(
            shown(&cfg.key_file),
            format!("does not match the certificate: {e}"),
        )
    })?;
    client_verifier(cfg)?;
    Ok(certified)
}

/// The certificate every handshake gets; replaced whole on reload.
#[derive(Debug)]
pub struct Certificate {
    /// The files: a reloaded config may name others.
    cfg: RwLock<TlsConfig>,
    /// Read on every handshake, written on reload: a read lock is uncontended in practice.
    current: RwLock<Arc<CertifiedKey>>,
    /// `keygate_tls_certificate_expiry_timestamp_seconds` of this listener, once given.
    expiry: std::sync::OnceLock<prometheus::IntGauge>,
}

impl Certificate {
    pub fn new(cfg: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(load(cfg)?)),
            cfg: RwLock::new(cfg.clone()),
            expiry: std::sync::OnceLock::new(),
        }))
    }

    /// Keeps `gauge` at the served certificate's `notAfter` (Unix seconds), now and after
    /// every reload.
    pub fn report_expiry(&self, gauge: prometheus::IntGauge) {
        self.expiry.get_or_init(|| gauge);
        self.refresh_expiry();
    }

    fn refresh_expiry(&self) {
        if let (Some(gauge), Some(at)) = (self.expiry.get(), self.not_after()) {
            gauge.set(at);
        }
    }

    /// The leaf certificate's `notAfter`, Unix seconds.
    fn not_after(&self) -> Option<i64> {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let leaf = current.cert.first()?;
        x509_parser::parse_x509_certificate(leaf)
            .ok()
            .map(|(_, cert)| cert.validity().not_after.timestamp())
    }

    /// Reads `cfg`'s files (the same or others); on any problem the certificate in use
    /// stays. Client CAs are read at start only.
    pub fn reload(&self, cfg: &TlsConfig) -> Result<(), TlsError> {
        let fresh = Arc::new(load(cfg)?);
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        *self
            .cfg
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = cfg.clone();
        self.refresh_expiry();
        Ok(())
    }

    fn cfg(&self) -> TlsConfig {
        self.cfg
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The proxy listener's acceptor: this certificate (reloadable), TLS 1.3 and 1.2, client
    /// certificates checked against `client_ca_file` when set; ALPN offers `h2`, `http/1.1`.
    pub fn acceptor(self: &Arc<Self>) -> Result<Acceptor, TlsError> {
        let cfg = self.cfg();
        let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Cert(cfg.cert_file.display().to_string(), e.to_string()))?;
        let builder = match client_verifier(&cfg)? {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config =
            builder.with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Acceptor::from_server_config(Arc::new(config)))
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ))
    }
}
