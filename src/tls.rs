//! TLS-MA: the server-side rustls configuration and the client certificate verifier.
//!
//! Each trust bundle (e.g. NHS INT, NHS PROD) gets its own webpki verifier with its own
//! CRLs, so a chain is judged only against the CAs of one environment; a client is
//! accepted when any bundle accepts it. Root *and* SubCA certificates are installed as
//! trust anchors because NHS clients commonly send only their leaf.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

use crate::config::{err, ConfigError};
use crate::config::{RevocationScope, TlsConfig, UnknownRevocation};

/// The crypto provider used for every TLS context of the gateway.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file; an empty file is an error.
pub fn load_certs(field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(field, format!("{}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(field, format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(err(
            field,
            format!("{}: no CERTIFICATE found", path.display()),
        ));
    }
    Ok(certs)
}

pub fn load_key(field: &str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        err(
            field,
            format!("{}: no usable private key: {e}", path.display()),
        )
    })
}

/// Reads CRLs from a PEM file (one or more `X509 CRL` blocks) or a single DER file.
/// Each CRL is parsed here so that a corrupt file is reported with its own field path.
pub fn load_crls(
    field: &str,
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| err(field, format!("{}: {e}", path.display())))?;
    let crls: Vec<CertificateRevocationListDer<'static>> = if bytes.first() == Some(&0x30) {
        vec![CertificateRevocationListDer::from(bytes)]
    } else {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| err(field, format!("{}: bad PEM: {e}", path.display())))?
    };
    if crls.is_empty() {
        return Err(err(field, format!("{}: no X509 CRL found", path.display())));
    }
    for crl in &crls {
        match x509_parser::parse_x509_crl(crl) {
            Ok(([], _)) => {}
            Ok(_) => {
                return Err(err(
                    field,
                    format!("{}: trailing data after CRL", path.display()),
                ))
            }
            Err(e) => {
                return Err(err(
                    field,
                    format!("{}: not a valid CRL: {e}", path.display()),
                ))
            }
        }
    }
    Ok(crls)
}

/// An outbound HTTP(S) connector (to the upstream or the authorisation server) that
/// trusts only the CAs in `ca_file` (no public roots: these are internal services) and
/// optionally presents a client certificate. `field` names the config section in errors.
pub fn client_connector(
    field: &str,
    ca_file: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
    connect_timeout: std::time::Duration,
    http2: bool,
) -> Result<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    ConfigError,
> {
    let mut roots = RootCertStore::empty();
    if let Some(p) = ca_file {
        let f = format!("{field}.ca_file");
        for c in load_certs(&f, p)? {
            roots
                .add(c)
                .map_err(|e| err(&f, format!("not a usable CA: {e}")))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(field, e.to_string()))?
        .with_root_certificates(roots);
    let tls = match client_cert {
        Some((c, k)) => builder
            .with_client_auth_cert(
                load_certs(&format!("{field}.client_cert"), c)?,
                load_key(&format!("{field}.client_key"), k)?,
            )
            .map_err(|e| err(format!("{field}.client_key"), e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    // hyper-rustls sets ALPN itself from the enabled versions.
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    Ok(if http2 {
        https.enable_http2().wrap_connector(http)
    } else {
        https.enable_http1().wrap_connector(http)
    })
}

/// One trust bundle's verifier.
struct Bundle {
    name: String,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// Accepts a client whose chain verifies against any configured bundle, and refuses
/// chains longer than `max_depth` before doing any signature work.
pub struct BundleVerifier {
    bundles: Vec<Bundle>,
    hints: Vec<DistinguishedName>,
    max_depth: usize,
    /// nextUpdate of every loaded CRL: (file, Unix seconds).
    pub crl_next_updates: Vec<(String, i64)>,
    /// Fetched CRLs; shown each presented leaf to learn its CRL URL (revocation.rs).
    fetched: crate::revocation::FetchedCrls,
}

impl fmt::Debug for BundleVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.bundles.iter().map(|b| b.name.as_str()).collect();
        f.debug_struct("BundleVerifier")
            .field("bundles", &names)
            .field("max_depth", &self.max_depth)
            .finish()
    }
}

impl BundleVerifier {
    pub fn from_config(
        cfg: &TlsConfig,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, ConfigError> {
        let mut bundles = Vec::new();
        let mut hints = Vec::new();
        let mut crl_next_updates = Vec::new();
        for (i, b) in cfg.trust_bundles.iter().enumerate() {
            let f = format!("tls.trust_bundles[{i}]");
            let mut roots = RootCertStore::empty();
            for (j, p) in b.ca_files.iter().enumerate() {
                let field = format!("{f}.ca_files[{j}]");
                for c in load_certs(&field, p)? {
                    roots.add(c).map_err(|e| {
                        err(&field, format!("{}: not a usable CA: {e}", p.display()))
                    })?;
                }
            }
            let mut crls = Vec::new();
            for (j, p) in b.crl_files.iter().enumerate() {
                for crl in load_crls(&format!("{f}.crl_files[{j}]"), p)? {
                    if let Ok((_, c)) = x509_parser::parse_x509_crl(&crl) {
                        if let Some(next) = c.next_update() {
                            crl_next_updates.push((p.display().to_string(), next.timestamp()));
                        }
                    }
                    crls.push(crl);
                }
            }
            // Files and the last good fetched CRLs, newest per issuer (see revocation).
            let crls =
                crate::revocation::newest_per_issuer(crls, cfg.fetched_crls.for_bundle(&b.name));
            hints.extend(roots.subjects());
            let mut builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .with_crls(crls);
            if cfg.revocation.scope == RevocationScope::EndEntity {
                builder = builder.only_check_end_entity_revocation();
            }
            if cfg.revocation.unknown_status == UnknownRevocation::Allow {
                builder = builder.allow_unknown_revocation_status();
            }
            if cfg.revocation.enforce_crl_expiry {
                builder = builder.enforce_revocation_expiration();
            }
            let verifier = builder
                .build()
                .map_err(|e| err(format!("{f}.crl_files"), e.to_string()))?;
            bundles.push(Bundle {
                name: b.name.clone(),
                verifier,
            });
        }
        Ok(BundleVerifier {
            bundles,
            hints,
            max_depth: cfg.verify_depth,
            crl_next_updates,
            fetched: cfg.fetched_crls.clone(),
        })
    }

    /// Name of the bundle a (verified) chain belongs to. With one bundle this is free;
    /// with several, the chain is verified again per bundle, once per connection.
    pub fn bundle_of(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Option<&str> {
        if let [only] = self.bundles.as_slice() {
            return Some(&only.name);
        }
        let now = UnixTime::now();
        self.bundles
            .iter()
            .find(|b| {
                b.verifier
                    .verify_client_cert(end_entity, intermediates, now)
                    .is_ok()
            })
            .map(|b| b.name.as_str())
    }

    /// Verifies a client chain against every bundle separately, with each bundle's
    /// result (for `fhirgate inspect-cert`; the handshake uses [`ClientCertVerifier`]).
    pub fn verify_each(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Vec<(&str, Result<(), rustls::Error>)> {
        let now = UnixTime::now();
        self.bundles
            .iter()
            .map(|b| {
                let r = b
                    .verifier
                    .verify_client_cert(end_entity, intermediates, now)
                    .map(|_| ());
                (b.name.as_str(), r)
            })
            .collect()
    }

    fn first(&self) -> &Arc<dyn ClientCertVerifier> {
        // from_config refuses an empty bundle list, so index 0 exists.
        &self.bundles[0].verifier
    }
}

impl ClientCertVerifier for BundleVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.fetched.observe(end_entity);
        if intermediates.len() + 1 > self.max_depth {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(ChainTooDeep(self.max_depth))),
            )));
        }
        let mut best: Option<rustls::Error> = None;
        for b in &self.bundles {
            match b
                .verifier
                .verify_client_cert(end_entity, intermediates, now)
            {
                Ok(v) => return Ok(v),
                // "Unknown issuer" from one bundle says nothing; a revoked or expired
                // verdict from the bundle that knows the issuer is the one to report.
                Err(e) => {
                    let specific = !matches!(
                        e,
                        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
                    );
                    if best.is_none() || specific {
                        best = Some(e);
                    }
                }
            }
        }
        Err(best.unwrap_or(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.first().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.first().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.first().supported_verify_schemes()
    }
}

#[derive(Debug)]
struct ChainTooDeep(usize);

impl fmt::Display for ChainTooDeep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client chain longer than verify_depth {}", self.0)
    }
}

impl std::error::Error for ChainTooDeep {}

/// The gateway's server TLS context and the verifier inside it (kept for
/// [`BundleVerifier::bundle_of`]).
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub verifier: Arc<BundleVerifier>,
    /// notAfter of the server leaf (Unix seconds), for expiry alerts.
    pub server_not_after: Option<i64>,
    /// nextUpdate of every CRL (file path, Unix seconds), for expiry alerts.
    pub crl_next_updates: Vec<(String, i64)>,
}

/// Builds the server configuration: TLS 1.2 + 1.3, mandatory client certificates, ALPN
/// `h2` and `http/1.1`, stateful resumption and stateless tickets.
pub fn server_tls(cfg: &TlsConfig) -> Result<ServerTls, ConfigError> {
    let provider = provider();
    let verifier = Arc::new(BundleVerifier::from_config(cfg, &provider)?);
    let chain = load_certs("tls.server_cert", &cfg.server_cert)?;
    let server_not_after = chain.first().and_then(|c| {
        x509_parser::parse_x509_certificate(c)
            .ok()
            .map(|(_, x)| x.validity().not_after.timestamp())
    });
    let crl_next_updates = verifier.crl_next_updates.clone();
    let key = load_key("tls.server_key", &cfg.server_key)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err("tls", e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|e| {
            err(
                "tls.server_key",
                format!("does not match tls.server_cert: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| err("tls", format!("cannot create session ticketer: {e}")))?;
    Ok(ServerTls {
        config: Arc::new(config),
        verifier,
        server_not_after,
        crl_next_updates,
    })
}

/// Short, stable label for a failed handshake, for logs and metrics.
pub fn handshake_failure_kind(err: &std::io::Error) -> &'static str {
    let Some(inner) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::InvalidData => "bad_record",
            _ => "io",
        };
    };
    rustls_error_kind(inner)
}

/// The label of [`handshake_failure_kind`] for a rustls error itself.
pub fn rustls_error_kind(inner: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match inner {
        E::NoCertificatesPresented => "no_cert",
        E::InvalidCertificate(c) => match c {
            CertificateError::Revoked => "revoked",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "bad_purpose"
            }
            CertificateError::UnknownRevocationStatus => "unknown_revocation",
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => "expired_crl",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::Other(o) if o.0.is::<ChainTooDeep>() => "chain_too_deep",
            _ => "bad_certificate",
        },
        E::PeerIncompatible(_) => "incompatible",
        E::InvalidMessage(_) => "bad_message",
        E::NoApplicationProtocol => "no_alpn",
        _ => "tls_error",
    }
}
