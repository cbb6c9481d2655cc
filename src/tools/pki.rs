//! Development PKI: a throw-away copy of the NHS TLS-MA shape (Root CA → SubCA → leaves).
//!
//! Used by `fhirgate pki dev`, by the built-in development stack and by the tests, so that
//! no private key is ever committed: every key here is generated on the fly. Nothing in
//! this module is used when the gateway runs on a real configuration.

use std::fs;
use std::io::Write;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SerialNumber, SignatureAlgorithm,
};
use time::{Duration, OffsetDateTime};

/// A certificate with its private key, both PEM.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// Every artefact of the development PKI, as PEM text.
pub struct DevPki {
    pub root: Pem,
    pub sub_ca: Pem,
    /// CRL signed by the SubCA; revokes [`DevPki::revoked_client`].
    pub sub_ca_crl: String,
    /// A later CRL from the SubCA that also revokes [`DevPki::second_client`]: lets tests
    /// and operators rehearse a CRL update followed by a reload.
    pub sub_ca_crl_update: String,
    /// CRL signed by the root (empty), so a whole-chain revocation check can succeed.
    pub root_crl: String,
    /// Server leaf for `localhost`, `127.0.0.1` and `::1`; `cert` holds leaf + SubCA.
    pub server: Pem,
    pub client: Pem,
    pub second_client: Pem,
    pub revoked_client: Pem,
    pub expired_client: Pem,
    /// A leaf that only has the serverAuth EKU: must not be accepted as a client.
    pub server_only_client: Pem,
    /// A client whose validity starts tomorrow.
    pub future_client: Pem,
    pub foreign_root: Pem,
    pub foreign_client: Pem,
}

/// Subject CN of the default development client, following the BaRS naming convention
/// `BaRS-<ODS>.<organisation>.nhs.uk`.
pub const DEV_CLIENT_CN: &str = "BaRS-X26.fhirgate-dev.nhs.uk";
pub const DEV_SECOND_CLIENT_CN: &str = "BaRS-RX1.other-trust-dev.nhs.uk";

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "GB");
    dn.push(DnType::OrganizationName, "fhirgate development");
    dn.push(DnType::CommonName, cn);
    dn
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: Pem,
}

impl Ca {
    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }
}

fn ca_params(cn: &str, path_len: Option<u8>) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = dn(cn);
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = KeyIdMethod::Sha256;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(1);
    p.not_after = now + Duration::days(3650);
    Ok(p)
}

fn new_root(cn: &str, alg: &'static SignatureAlgorithm) -> Result<Ca, rcgen::Error> {
    let params = ca_params(cn, None)?;
    let key = KeyPair::generate_for(alg)?;
    let cert = params.self_signed(&key)?;
    let pem = Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    };
    Ok(Ca { params, key, pem })
}

fn new_sub_ca(cn: &str, parent: &Ca, alg: &'static SignatureAlgorithm) -> Result<Ca, rcgen::Error> {
    let params = ca_params(cn, Some(0))?;
    let key = KeyPair::generate_for(alg)?;
    let cert = params.signed_by(&key, &parent.issuer())?;
    let pem = Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    };
    Ok(Ca { params, key, pem })
}

struct LeafSpec<'a> {
    cn: &'a str,
    sans: Vec<String>,
    eku: Vec<ExtendedKeyUsagePurpose>,
    serial: u64,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

fn leaf(
    spec: LeafSpec<'_>,
    issuer: &Ca,
    alg: &'static SignatureAlgorithm,
) -> Result<Pem, rcgen::Error> {
    let mut p = CertificateParams::new(spec.sans)?;
    p.distinguished_name = dn(spec.cn);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = spec.eku;
    p.serial_number = Some(SerialNumber::from(spec.serial));
    p.not_before = spec.not_before;
    p.not_after = spec.not_after;
    p.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(alg)?;
    let cert = p.signed_by(&key, &issuer.issuer())?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

fn crl(issuer: &Ca, revoked: &[u64]) -> Result<String, rcgen::Error> {
    let now = OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now - Duration::hours(1),
        next_update: now + Duration::days(30),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from(*s),
                revocation_time: now - Duration::minutes(30),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    params.signed_by(&issuer.issuer())?.pem()
}

impl DevPki {
    /// Generates a fresh PKI with ECDSA P-256 keys (small and fast; RSA PKIs for tests come from openssl).
    pub fn generate() -> Result<Self, rcgen::Error> {
        let a: &'static SignatureAlgorithm = &rcgen::PKCS_ECDSA_P256_SHA256;
        let now = OffsetDateTime::now_utc();
        let valid = (now - Duration::days(1), now + Duration::days(365));
        let client_eku = vec![ExtendedKeyUsagePurpose::ClientAuth];

        let root = new_root("fhirgate DEV Root CA", a)?;
        let sub = new_sub_ca("fhirgate DEV SubCA", &root, a)?;
        let server = leaf(
            LeafSpec {
                cn: "localhost",
                sans: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
                eku: vec![ExtendedKeyUsagePurpose::ServerAuth],
                serial: 0x1001,
                not_before: valid.0,
                not_after: valid.1,
            },
            &sub,
            a,
        )?;
        let client_leaf = |cn: &str, serial: u64, eku: Vec<ExtendedKeyUsagePurpose>, nb, na| {
            leaf(
                LeafSpec {
                    cn,
                    sans: vec![cn.to_ascii_lowercase()],
                    eku,
                    serial,
                    not_before: nb,
                    not_after: na,
                },
                &sub,
                a,
            )
        };
        let client = client_leaf(DEV_CLIENT_CN, 0x2001, client_eku.clone(), valid.0, valid.1)?;
        let second_client = client_leaf(
            DEV_SECOND_CLIENT_CN,
            0x2002,
            client_eku.clone(),
            valid.0,
            valid.1,
        )?;
        let revoked_client = client_leaf(
            "BaRS-REV.revoked-dev.nhs.uk",
            0x2003,
            client_eku.clone(),
            valid.0,
            valid.1,
        )?;
        let expired_client = client_leaf(
            "BaRS-EXP.expired-dev.nhs.uk",
            0x2004,
            client_eku.clone(),
            now - Duration::days(60),
            now - Duration::days(30),
        )?;
        let server_only_client = client_leaf(
            "BaRS-SRV.server-only-dev.nhs.uk",
            0x2005,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            valid.0,
            valid.1,
        )?;
        let future_client = client_leaf(
            "BaRS-FUT.future-dev.nhs.uk",
            0x2006,
            client_eku.clone(),
            now + Duration::days(1),
            now + Duration::days(30),
        )?;
        let sub_ca_crl = crl(&sub, &[0x2003])?;
        let sub_ca_crl_update = crl(&sub, &[0x2003, 0x2002])?;
        let root_crl = crl(&root, &[])?;

        let foreign = new_root("Foreign Root CA", a)?;
        let foreign_client = leaf(
            LeafSpec {
                cn: DEV_CLIENT_CN,
                sans: vec![DEV_CLIENT_CN.to_ascii_lowercase()],
                eku: client_eku,
                serial: 0x3001,
                not_before: valid.0,
                not_after: valid.1,
            },
            &foreign,
            a,
        )?;

        Ok(DevPki {
            server: Pem {
                cert: format!("{}{}", server.cert, sub.pem.cert),
                key: server.key,
            },
            root: root.pem,
            sub_ca: sub.pem,
            sub_ca_crl,
            sub_ca_crl_update,
            root_crl,
            client,
            second_client,
            revoked_client,
            expired_client,
            server_only_client,
            future_client,
            foreign_root: foreign.pem,
            foreign_client,
        })
    }

    /// Writes the PKI into `dir` with the file names the shipped `config.yaml` expects.
    /// Private keys are written with mode 0600.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        fs::create_dir_all(dir)?;
        let certs: [(&str, &str); 13] = [
            ("future-client.crt", &self.future_client.cert),
            ("sub-ca-update.crl", &self.sub_ca_crl_update),
            ("root-ca.crt", &self.root.cert),
            ("sub-ca.crt", &self.sub_ca.cert),
            ("sub-ca.crl", &self.sub_ca_crl),
            ("root-ca.crl", &self.root_crl),
            ("server.crt", &self.server.cert),
            ("client.crt", &self.client.cert),
            ("second-client.crt", &self.second_client.cert),
            ("revoked-client.crt", &self.revoked_client.cert),
            ("expired-client.crt", &self.expired_client.cert),
            ("foreign-root-ca.crt", &self.foreign_root.cert),
            ("foreign-client.crt", &self.foreign_client.cert),
        ];
        for (name, pem) in certs {
            fs::write(dir.join(name), pem)?;
        }
        let keys: [(&str, &str); 8] = [
            ("future-client.key", &self.future_client.key),
            ("server.key", &self.server.key),
            ("client.key", &self.client.key),
            ("second-client.key", &self.second_client.key),
            ("revoked-client.key", &self.revoked_client.key),
            ("expired-client.key", &self.expired_client.key),
            ("foreign-client.key", &self.foreign_client.key),
            ("server-only-client.key", &self.server_only_client.key),
        ];
        fs::write(
            dir.join("server-only-client.crt"),
            &self.server_only_client.cert,
        )?;
        for (name, pem) in keys {
            write_private(&dir.join(name), pem)?;
        }
        Ok(())
    }
}

pub fn write_private(path: &Path, pem: &str) -> std::io::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(pem.as_bytes())
}

/// Generates the development PKI into `dir` unless it already holds one.
/// Returns `true` when new files were written.
pub fn ensure_dev_pki(dir: &Path) -> anyhow::Result<bool> {
    if dir.join("server.crt").exists() && dir.join("server.key").exists() {
        return Ok(false);
    }
    let pki = DevPki::generate()?;
    pki.write_to(dir)?;
    Ok(true)
}
