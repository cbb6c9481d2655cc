//! The verified client identity, read from the certificate rustls has already validated.
//!
//! Parsing happens once per connection, after the handshake; the result is shared by
//! every request on that connection. [`ClientChain`] checks the certificate again before
//! each request, so one that expires or is revoked while its connection is open stops
//! there.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use arc_swap::ArcSwap;
use rustls::server::danger::ClientCertVerifier as _;
use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::tls::{rustls_error_kind, BundleVerifier, HandshakeKind};

/// Facts about a client taken from its (already verified) leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Subject DN in RFC 4514-like string form.
    pub subject: String,
    /// First CN of the subject, if any.
    pub common_name: Option<String>,
    pub issuer: String,
    /// DNS subject alternative names, lower-cased.
    pub dns_sans: Vec<String>,
    /// Serial as colon-separated hex.
    pub serial: String,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub fingerprint_sha256: String,
    /// notAfter as Unix seconds.
    pub not_after: i64,
    /// Name of the trust bundle the chain verified against.
    pub bundle: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("client certificate could not be parsed: {0}")]
    Parse(String),
}

impl ClientIdentity {
    /// Parses a DER leaf certificate. `bundle` is the trust bundle that verified it.
    pub fn from_der(der: &[u8], bundle: &str) -> Result<Self, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let mut dns_sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(d) = name {
                    dns_sans.push(d.to_ascii_lowercase());
                }
            }
        }
        Ok(ClientIdentity {
            subject: cert.subject().to_string(),
            common_name,
            issuer: cert.issuer().to_string(),
            dns_sans,
            serial: cert.raw_serial_as_string(),
            fingerprint_sha256: hex::encode(Sha256::digest(der)),
            not_after: cert.validity().not_after.timestamp(),
            bundle: bundle.to_owned(),
        })
    }
}

/// The trust material new handshakes are verified against, shared with the connections
/// already open. When it changes (a CRL fetched or read on reload, a reload), each open
/// connection checks its client certificate again at its next request, so a revocation
/// reaches clients that never reconnect: a CRL that only new connections see is the
/// mistake of radsecproxy#5 and EMQX#10992, which istio/ztunnel#1986 fixed the same way.
pub struct TrustInForce {
    generation: AtomicU64,
    verifier: ArcSwap<BundleVerifier>,
    /// The next time what the verifier accepts changes by itself (Unix seconds): a CRL's
    /// nextUpdate or a configured CA's notAfter. Passing it counts as a change of the
    /// trust in force (a new generation), so each open connection checks its chain once
    /// more: a stale CRL refuses open connections as it refuses handshakes (`expired_crl`,
    /// where enforced), and so does a configured SubCA that expired, which a client that
    /// sends only its leaf never showed the connection's own notAfter check.
    next_stale: AtomicI64,
    /// One copy of each client chain for all the open connections that present it.
    chains: Mutex<SharedChains>,
}

/// The chains [`ClientChain`]s hold, by a keyed hash of their bytes. A sender's
/// connections present the same chain, and rustls already keeps a copy per connection;
/// a second copy each was 1.8 KB of every idle connection's heap with an RSA leaf and
/// SubCA (bench/README.md, twenty-sixth pass).
#[derive(Default)]
struct SharedChains {
    by_hash: HashMap<u64, Weak<[CertificateDer<'static>]>>,
    hasher: RandomState,
    /// Entries left after the last sweep of closed connections' chains.
    live_at_sweep: usize,
}

impl SharedChains {
    fn share(&mut self, chain: &[CertificateDer<'static>]) -> Arc<[CertificateDer<'static>]> {
        let key = self.hasher.hash_one(chain);
        if let Some(held) = self.by_hash.get(&key).and_then(Weak::upgrade) {
            // Equal bytes, not only an equal hash: a collision gets a copy of its own.
            if *held == *chain {
                return held;
            }
        }
        let shared: Arc<[CertificateDer<'static>]> = chain.into();
        self.by_hash.insert(key, Arc::downgrade(&shared));
        // Entries of chains no connection holds any more go once the map has doubled
        // since the last sweep: amortised O(1) per handshake, bounded by the chains in use.
        if self.by_hash.len() > 2 * self.live_at_sweep + 64 {
            self.by_hash.retain(|_, held| held.strong_count() > 0);
            self.live_at_sweep = self.by_hash.len();
        }
        shared
    }
}

impl TrustInForce {
    pub fn new(verifier: Arc<BundleVerifier>) -> Self {
        TrustInForce {
            generation: AtomicU64::new(0),
            next_stale: AtomicI64::new(verifier.next_change_from(i64::MIN)),
            verifier: ArcSwap::new(verifier),
            chains: Mutex::default(),
        }
    }

    /// The one copy of `chain` the open connections share.
    fn share_chain(&self, chain: &[CertificateDer<'static>]) -> Arc<[CertificateDer<'static>]> {
        match self.chains.lock() {
            Ok(mut chains) => chains.share(chain),
            // A panic while the map was held: it may be inconsistent, so no sharing.
            Err(_) => chain.into(),
        }
    }

    /// Puts `verifier` in force for open connections too. Called after the new TLS
    /// context is serving, so a connection that read the old generation re-checks.
    pub fn publish(&self, verifier: Arc<BundleVerifier>) {
        self.next_stale
            .store(verifier.next_change_from(i64::MIN), Ordering::Release);
        self.verifier.store(verifier);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Read before the TLS context a handshake will use, for [`ClientChain::new`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The generation at `now` (Unix seconds): a new one once a CRL has gone stale or a
    /// configured CA has expired.
    fn generation_at(&self, now: i64) -> u64 {
        let due = self.next_stale.load(Ordering::Acquire);
        if now > due {
            let next = self.verifier.load().next_change_from(now);
            // One caller moves the deadline on and bumps the generation; the others see
            // the new generation.
            if self
                .next_stale
                .compare_exchange(due, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.generation()
    }
}

/// A connection's client certificate chain as its handshake verified it, checked again
/// by [`ClientChain::check`] before each request: against the time (notAfter), and
/// against the trust in force whenever that has changed since the last check.
pub struct ClientChain {
    chain: Arc<[CertificateDer<'static>]>,
    /// The earliest notAfter of the certificates the client sent (Unix seconds).
    not_after: i64,
    trust: Arc<TrustInForce>,
    /// The bundle the handshake admitted it under ([`ClientChain::admit`]), which the
    /// identity headers and route policies name: it must still be the bundle the chain
    /// verifies against, or those would describe a trust no longer in force.
    bundle: Option<Box<str>>,
    /// The generation of `trust` the chain last verified against.
    checked: AtomicU64,
    /// The first refusal; the certificate does not come back on this connection.
    refused: OnceLock<HandshakeKind>,
}

/// The connection's client certificate no longer verifies: expired, or refused by the
/// trust in force (revoked by a newer CRL, its CA no longer in the bundle it was
/// admitted under, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the client certificate of this connection no longer verifies ({0})")]
pub struct CertificateLapsed(pub HandshakeKind);

impl std::fmt::Debug for ClientChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientChain")
            .field("certificates", &self.chain.len())
            .field("not_after", &self.not_after)
            .field("refused", &self.refused.get())
            .finish_non_exhaustive()
    }
}

impl ClientChain {
    /// `chain`: leaf first, as presented; `leaf_not_after`: the leaf's, already parsed
    /// into the connection's [`ClientIdentity`] (one parse of the leaf per handshake).
    /// `verified_at`: the [`TrustInForce::generation`] read before the handshake that
    /// verified it began; `None` when no handshake did (a resumed TLS session), so the
    /// first [`ClientChain::check`] verifies it in full.
    pub fn new(
        chain: &[CertificateDer<'static>],
        leaf_not_after: i64,
        trust: Arc<TrustInForce>,
        verified_at: Option<u64>,
    ) -> Self {
        let not_after = chain
            .iter()
            .skip(1)
            .filter_map(|c| X509Certificate::from_der(c).ok())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .fold(leaf_not_after, i64::min);
        ClientChain {
            chain: trust.share_chain(chain),
            not_after,
            trust,
            bundle: None,
            // No generation reaches u64::MAX.
            checked: AtomicU64::new(verified_at.unwrap_or(u64::MAX)),
            refused: OnceLock::new(),
        }
    }

    /// Records the bundle the connection's identity was given. From then on a check
    /// against changed trust also requires the chain to verify against that bundle: a
    /// reload that moves its CA to another bundle (INT to PROD, say) refuses the
    /// connection, whose next handshake gets the new bundle's name and routes.
    pub fn admit(&mut self, bundle: &str) {
        self.bundle = Some(bundle.into());
    }

    /// The bundle the trust in force places the chain in. For a resumed session, whose
    /// handshake verified nothing: the connection's snapshot may predate a reload that
    /// moved its SubCA to another bundle.
    pub fn bundle_in_force(&self) -> Option<Box<str>> {
        let (leaf, intermediates) = self.chain.split_first()?;
        self.trust
            .verifier
            .load()
            .bundle_of(leaf, intermediates)
            .map(Into::into)
    }

    /// Whether [`ClientChain::check`] has refused the chain.
    pub fn has_lapsed(&self) -> bool {
        self.refused.get().is_some()
    }

    /// Ok while the chain still verifies. A clock read and a few atomic loads while
    /// nothing changed; a full verification once per change of the trust in force (and
    /// once when a CRL goes stale or a configured CA expires). `Err` with `true` the first time it fails (to log
    /// it once).
    pub fn check(&self) -> Result<(), (CertificateLapsed, bool)> {
        if let Some(kind) = self.refused.get() {
            return Err((CertificateLapsed(*kind), false));
        }
        let now = UnixTime::now();
        let secs = crate::tls::unix_secs(now);
        let state = self.trust.generation_at(secs);
        let verdict = if secs > self.not_after {
            Err(HandshakeKind::Expired)
        } else if state == self.checked.load(Ordering::Relaxed) {
            Ok(())
        } else {
            let verifier = self.trust.verifier.load();
            match self.chain.split_first() {
                None => Err(HandshakeKind::NoCert),
                Some((leaf, intermediates)) => {
                    match verifier.verify_client_cert(leaf, intermediates, now) {
                        Ok(_) => match &self.bundle {
                            Some(b) if verifier.bundle_of(leaf, intermediates) != Some(&**b) => {
                                Err(HandshakeKind::UnknownCa)
                            }
                            _ => {
                                self.checked.store(state, Ordering::Relaxed);
                                Ok(())
                            }
                        },
                        Err(e) => Err(rustls_error_kind(&e)),
                    }
                }
            }
        };
        verdict.map_err(|kind| {
            let first = self.refused.set(kind).is_ok();
            (
                CertificateLapsed(*self.refused.get().unwrap_or(&kind)),
                first,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::pki::{DevPki, DEV_CLIENT_CN};
    use rustls_pki_types::{pem::PemObject, CertificateDer};

    #[test]
    fn reads_subject_cn_sans_and_fingerprint() {
        let pki = DevPki::generate().expect("pki");
        let der = CertificateDer::from_pem_slice(pki.client.cert.as_bytes()).expect("pem");
        let id = ClientIdentity::from_der(&der, "nhs-int").expect("parse");
        assert_eq!(id.common_name.as_deref(), Some(DEV_CLIENT_CN));
        assert!(
            id.subject.contains(&format!("CN={DEV_CLIENT_CN}")),
            "{}",
            id.subject
        );
        assert!(id.issuer.contains("CN=fhirgate DEV SubCA"), "{}", id.issuer);
        assert_eq!(id.dns_sans, vec![DEV_CLIENT_CN.to_ascii_lowercase()]);
        assert_eq!(id.serial, "20:01");
        assert_eq!(id.fingerprint_sha256.len(), 64);
        assert_eq!(id.bundle, "nhs-int");
        assert!(id.not_after > 0);
    }

    /// The dev PKI's trust bundle with `crl` as the SubCA's CRL.
    fn verifier(dir: &std::path::Path, crl: &str) -> Arc<BundleVerifier> {
        verifier_named(dir, crl, "nhs-int")
    }

    fn verifier_named(dir: &std::path::Path, crl: &str, bundle: &str) -> Arc<BundleVerifier> {
        Arc::new(crate::tls::dev::verifier(dir, crl, bundle))
    }

    fn chain_of(pem: &str, trust: &Arc<TrustInForce>) -> ClientChain {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
        let not_after = ClientIdentity::from_der(&der, "b").expect("leaf").not_after;
        ClientChain::new(&[der], not_after, trust.clone(), Some(trust.generation()))
    }

    #[test]
    fn an_open_connections_chain_lapses_with_a_newer_crl_or_its_not_after() {
        let (pki, dir) = crate::tls::dev::pki_dir();
        let trust = Arc::new(TrustInForce::new(verifier(dir.path(), "sub-ca.crl")));
        let first = chain_of(&pki.client.cert, &trust);
        let second = chain_of(&pki.second_client.cert, &trust);
        assert_eq!(first.check(), Ok(()));
        assert_eq!(second.check(), Ok(()));

        // The SubCA's next CRL also revokes the second client.
        trust.publish(verifier(dir.path(), "sub-ca-update.crl"));
        assert_eq!(first.check(), Ok(()));
        let lapsed = CertificateLapsed(HandshakeKind::Revoked);
        assert_eq!(second.check(), Err((lapsed, true)), "logged the first time");
        assert_eq!(second.check(), Err((lapsed, false)));
        // Once refused, always: a later generation does not bring it back.
        trust.publish(verifier(dir.path(), "sub-ca.crl"));
        assert_eq!(second.check(), Err((lapsed, false)));

        // Past notAfter, whatever the CRLs say.
        let expired = chain_of(&pki.expired_client.cert, &trust);
        let lapsed = CertificateLapsed(HandshakeKind::Expired);
        assert_eq!(expired.check(), Err((lapsed, true)));
    }

    #[test]
    fn an_open_connections_chain_lapses_when_its_ca_leaves_the_bundle_it_was_admitted_under() {
        let (pki, dir) = crate::tls::dev::pki_dir();
        let trust = Arc::new(TrustInForce::new(verifier(dir.path(), "sub-ca.crl")));
        let mut admitted = chain_of(&pki.client.cert, &trust);
        admitted.admit("nhs-int");
        // Never admitted (a resumed session's first check): only the chain counts.
        let unadmitted = chain_of(&pki.second_client.cert, &trust);

        // Changed trust, same bundle: still fine.
        trust.publish(verifier(dir.path(), "sub-ca.crl"));
        assert_eq!(admitted.check(), Ok(()));
        // The same CAs now under another name: the identity's bundle no longer exists.
        trust.publish(verifier_named(dir.path(), "sub-ca.crl", "nhs-prod"));
        let lapsed = CertificateLapsed(HandshakeKind::UnknownCa);
        assert_eq!(admitted.check(), Err((lapsed, true)));
        assert_eq!(unadmitted.check(), Ok(()));
        // A resumed session takes its bundle from the trust in force, not from the
        // snapshot its connection was accepted under (which still says nhs-int).
        assert_eq!(unadmitted.bundle_in_force().as_deref(), Some("nhs-prod"));
    }

    #[test]
    fn connections_presenting_one_chain_share_one_copy_of_it() {
        let (pki, dir) = crate::tls::dev::pki_dir();
        let trust = Arc::new(TrustInForce::new(verifier(dir.path(), "sub-ca.crl")));
        let first = chain_of(&pki.client.cert, &trust);
        let again = chain_of(&pki.client.cert, &trust);
        let other = chain_of(&pki.second_client.cert, &trust);
        assert!(Arc::ptr_eq(&first.chain, &again.chain));
        assert!(!Arc::ptr_eq(&first.chain, &other.chain));
        let leaf = CertificateDer::from_pem_slice(pki.client.cert.as_bytes()).expect("pem");
        let sub_ca = CertificateDer::from_pem_slice(pki.sub_ca.cert.as_bytes()).expect("pem");
        // The same leaf sent with its SubCA is another chain, kept as sent.
        let longer = ClientChain::new(
            &[leaf.clone(), sub_ca.clone()],
            i64::MAX,
            trust.clone(),
            None,
        );
        assert!(!Arc::ptr_eq(&first.chain, &longer.chain));
        assert_eq!(&*longer.chain, &[leaf.clone(), sub_ca][..]);
        assert_eq!(&*first.chain, &[leaf][..]);
        // Shared bytes, separate verdicts: one connection's refusal is its own.
        let mut admitted = chain_of(&pki.client.cert, &trust);
        admitted.admit("nhs-int");
        trust.publish(verifier_named(dir.path(), "sub-ca.crl", "nhs-prod"));
        assert!(admitted.check().is_err());
        assert_eq!(first.check(), Ok(()));

        // Chains no open connection holds leave the map: it stays the size of what is in
        // use, not of every chain ever seen.
        drop((first, again, other, longer, admitted));
        for i in 0..1000u32 {
            let der = CertificateDer::from(i.to_be_bytes().to_vec());
            drop(ClientChain::new(&[der], i64::MAX, trust.clone(), None));
        }
        let held = trust.chains.lock().expect("lock").by_hash.len();
        assert!(held <= 65, "{held} entries for no open connection");
    }

    #[test]
    fn garbage_is_a_parse_error() {
        assert!(matches!(
            ClientIdentity::from_der(b"\x30\x03\x02\x01", "b"),
            Err(IdentityError::Parse(_))
        ));
    }
}
