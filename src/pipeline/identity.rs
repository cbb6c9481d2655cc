//! The verified client identity, read from the certificate rustls has already validated.
//!
//! Parsing happens once per connection, after the handshake; the result is shared by
//! every request on that connection.

use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

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

    #[test]
    fn garbage_is_a_parse_error() {
        assert!(matches!(
            ClientIdentity::from_der(b"\x30\x03\x02\x01", "b"),
            Err(IdentityError::Parse(_))
        ));
    }
}
