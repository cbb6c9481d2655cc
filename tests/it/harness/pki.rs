//! The development PKIs tests run on: [`Pki`] (rcgen, through `fhirgate pki`'s own
//! generator) and [`OpensslPki`] (the openssl CLI, the way real CAs and the NHS make
//! theirs).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fhirgate::config::Config;
use fhirgate::server::{self, Running};
use fhirgate::tools::pki::DevPki;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

use super::*;

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = DevPki::generate().expect("generate pki");
        pki.write_to(dir.path()).expect("write pki");
        Pki { dir, pki }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

// Leaves minted on the dev PKI's own CAs (rcgen), with the DN and CA parameters of
// src/tools/pki.rs, so they chain to [`Pki`]'s root like the leaves it writes.

fn dev_dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "GB");
    dn.push(DnType::OrganizationName, "fhirgate development");
    dn.push(DnType::CommonName, cn);
    dn
}

/// CA parameters as src/tools/pki.rs sets them (unconstrained, keyCertSign + cRLSign,
/// SHA-256 key identifier), valid from yesterday for a year.
pub fn dev_ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name = dev_dn(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = KeyIdMethod::Sha256;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(365);
    p
}

/// An issuer for one of the dev PKI's CAs, rebuilt from its name and private key (the
/// key identifier is derived from the key, so issued certificates chain normally).
pub fn dev_issuer(cn: &str, key_pem: &str) -> Issuer<'static, KeyPair> {
    Issuer::new(
        dev_ca_params(cn),
        KeyPair::from_pem(key_pem).expect("CA key"),
    )
}

/// A clientAuth ECDSA P-256 leaf `cn` (SAN `cn` lower-cased) with the given serial and
/// validity, signed by `issuer`: for certificates the dev PKI does not make (not yet
/// valid, far-future, odd serials).
pub fn client_leaf(
    cn: &str,
    serial: u64,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    issuer: &Issuer<'_, KeyPair>,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let mut p = CertificateParams::new(vec![cn.to_ascii_lowercase()]).expect("params");
    p.distinguished_name = dev_dn(cn);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.serial_number = Some(SerialNumber::from(serial));
    p.not_before = not_before;
    p.not_after = not_after;
    p.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = p.signed_by(&key, issuer).expect("sign leaf");
    (
        cert.der().clone(),
        PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
    )
}

// ---------------------------------------------------------------------------------------
// A PKI made with the openssl CLI the way real CAs (and the NHS) make theirs: `openssl
// req`/`openssl ca` certificates with an index database, revocation with `openssl ca
// -revoke`, CRLs with `openssl ca -gencrl`, DER and PEM. Each CA lives in its own
// directory under one temporary directory.
//
// ```ignore
// let pki = OpensslPki::new();
// let root = pki.root("Test Root CA", Alg::Rsa2048);
// let sub = pki.sub_ca(&root, "Test SubCA", Alg::Rsa2048);
// let client = pki.client(&sub, "client1", Alg::Rsa2048);   // client.cert, .key, .chain
// let server = pki.server(&sub, "server", Alg::EcP256);      // SAN localhost, 127.0.0.1
// pki.revoke(&root, &sub.cert);
// let crl = pki.crl(&root, CrlTimes::Hours(24));             // PEM, v2, with CRL number
// let der = pki.der(&crl, Kind::Crl);
// ```
// ---------------------------------------------------------------------------------------

/// Key algorithm of a generated key.
#[derive(Clone, Copy, Debug)]
pub enum Alg {
    Rsa2048,
    Rsa4096,
    EcP256,
}

/// What a PEM file holds, for [`OpensslPki::der`].
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Cert,
    Crl,
    Key,
}

/// lastUpdate / nextUpdate of a generated CRL.
#[derive(Clone, Copy, Debug)]
pub enum CrlTimes {
    /// Now until now + hours (`-crlhours`).
    Hours(u32),
    /// Explicit Unix seconds (`-crl_lastupdate` / `-crl_nextupdate`), e.g. in the past.
    At { last: i64, next: i64 },
}

/// A CA: its directory (openssl `ca` database), PEM certificate and PKCS#8 PEM key, and
/// `chain`: its certificate followed by its issuers' up to the root (PEM).
#[derive(Clone, Debug)]
pub struct Ca {
    pub name: String,
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub chain: PathBuf,
}

/// An end-entity certificate: `cert` (PEM leaf), `key` (PKCS#8 PEM), `chain` (leaf then
/// every CA certificate up to and including the root's issuer chain, root excluded).
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub chain: PathBuf,
}

pub struct OpensslPki {
    pub dir: tempfile::TempDir,
}

/// Runs openssl with `args`; panics with its stderr when it fails.
pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// `YYYYMMDDHHMMSSZ` for openssl.
fn gtime(t: i64) -> String {
    let d = time::OffsetDateTime::from_unix_timestamp(t).expect("time in range");
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}Z",
        d.year(),
        u8::from(d.month()),
        d.day(),
        d.hour(),
        d.minute(),
        d.second()
    )
}

/// `cdp`: the URL that SubCAs and clients issued by this CA name as their CRL
/// Distribution Point (RFC 5280 §4.2.1.13), as NHS certificates do.
fn ca_cnf(dir: &Path, v2: bool, cdp: Option<&str>) -> String {
    let cdp = cdp
        .map(|u| format!("crlDistributionPoints = URI:{u}\n"))
        .unwrap_or_default();
    // A v2 CRL needs a crlnumber file or CRL extensions; without both openssl writes v1.
    let (crlnumber, crl_ext) = if v2 {
        ("crlnumber = $dir/crlnumber\n", "crl_extensions = crl_ext\n")
    } else {
        ("", "")
    };
    format!(
        "[ ca ]\ndefault_ca = CA_default\n\
[ CA_default ]\ndir = {dir}\ndatabase = $dir/index.txt\nnew_certs_dir = $dir/newcerts\n\
serial = $dir/serial\n{crlnumber}certificate = $dir/ca.crt\nprivate_key = $dir/ca.key\n\
default_md = sha256\ndefault_days = 365\ndefault_crl_hours = 24\npolicy = policy_any\n\
unique_subject = no\ncopy_extensions = none\nemail_in_dn = no\n{crl_ext}\
[ policy_any ]\ncommonName = supplied\norganizationName = optional\n\
[ crl_ext ]\nauthorityKeyIdentifier = keyid:always\n\
[ req ]\ndistinguished_name = dn\nprompt = no\n[ dn ]\nCN = unused\n\
[ v3_root ]\nbasicConstraints = critical, CA:true\nkeyUsage = critical, keyCertSign, cRLSign\n\
subjectKeyIdentifier = hash\n\
[ v3_sub_ca ]\nbasicConstraints = critical, CA:true, pathlen:0\n\
keyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n\
authorityKeyIdentifier = keyid:always\n{cdp}\
[ client ]\nbasicConstraints = critical, CA:false\nkeyUsage = critical, digitalSignature\n\
extendedKeyUsage = clientAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n{cdp}\
[ server ]\nbasicConstraints = critical, CA:false\nkeyUsage = critical, digitalSignature\n\
extendedKeyUsage = serverAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n\
subjectAltName = DNS:localhost, IP:127.0.0.1\n",
        dir = dir.display()
    )
}

impl Ca {
    /// The subject as `openssl req -subj` takes it.
    pub fn subject(&self) -> String {
        format!("/O=fhirgate test/CN={}", self.name)
    }
}

impl Default for OpensslPki {
    fn default() -> Self {
        Self::new()
    }
}

impl OpensslPki {
    pub fn new() -> Self {
        OpensslPki {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new private key (PKCS#8 PEM) at `name`.
    pub fn key(&self, name: &str, alg: Alg) -> PathBuf {
        let out = self.path(name);
        let mut args = vec!["genpkey", "-out", s(&out)];
        match alg {
            Alg::Rsa2048 => args.extend(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
            Alg::Rsa4096 => args.extend(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:4096"]),
            Alg::EcP256 => args.extend(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        }
        openssl(&args);
        out
    }

    fn new_ca_dir(&self, name: &str) -> PathBuf {
        let dir = self.path(&name.replace(' ', "_"));
        std::fs::create_dir_all(dir.join("newcerts")).expect("ca dir");
        std::fs::write(dir.join("index.txt"), "").expect("index");
        std::fs::write(dir.join("index.txt.attr"), "unique_subject = no\n").expect("attr");
        // Distinct serial ranges per CA make serials in logs easy to tell apart.
        let serial = format!("{:016X}\n", 0x1000 + (name.len() as u64) * 0x100);
        std::fs::write(dir.join("serial"), serial).expect("serial");
        std::fs::write(dir.join("crlnumber"), "01\n").expect("crlnumber");
        std::fs::write(dir.join("ca.cnf"), ca_cnf(&dir, true, None)).expect("cnf");
        std::fs::write(dir.join("ca-v1.cnf"), ca_cnf(&dir, false, None)).expect("cnf");
        dir
    }

    /// A self-signed Root CA (`openssl req -x509`), valid ten years.
    pub fn root(&self, name: &str, alg: Alg) -> Ca {
        let dir = self.new_ca_dir(name);
        let key = dir.join("ca.key");
        let cert = dir.join("ca.crt");
        let k = self.key(&format!("{}.key", name.replace(' ', "_")), alg);
        std::fs::rename(&k, &key).expect("move key");
        let subj = format!("/O=fhirgate test/CN={name}");
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-config",
            s(&dir.join("ca.cnf")),
            "-extensions",
            "v3_root",
            "-key",
            s(&key),
            "-subj",
            &subj,
            "-days",
            "3650",
            "-sha256",
            "-out",
            s(&cert),
        ]);
        let chain = dir.join("chain.pem");
        std::fs::copy(&cert, &chain).expect("chain");
        Ca {
            name: name.into(),
            dir,
            cert,
            key,
            chain,
        }
    }

    /// Signs a CSR for `subj` with `ca` using the `ext` section; returns the PEM path.
    fn sign(&self, ca: &Ca, key: &Path, subj: &str, ext: &str, out: &Path) {
        self.sign_with(ca, key, subj, ext, out, &[]);
    }

    fn sign_with(&self, ca: &Ca, key: &Path, subj: &str, ext: &str, out: &Path, extra: &[&str]) {
        let csr = out.with_extension("csr");
        openssl(&[
            "req",
            "-new",
            "-key",
            s(key),
            "-subj",
            subj,
            "-out",
            s(&csr),
        ]);
        openssl(
            &[
                "ca",
                "-batch",
                "-notext",
                "-config",
                s(&ca.dir.join("ca.cnf")),
                "-extensions",
                ext,
                "-in",
                s(&csr),
                "-out",
                s(out),
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
        );
    }

    /// A SubCA issued by `parent` with `openssl ca` (pathlen 0, keyCertSign + cRLSign).
    pub fn sub_ca(&self, parent: &Ca, name: &str, alg: Alg) -> Ca {
        self.sub_ca_with(parent, name, alg, &[])
    }

    /// As [`OpensslPki::sub_ca`], expiring at `not_after` (Unix seconds).
    pub fn sub_ca_until(&self, parent: &Ca, name: &str, alg: Alg, not_after: i64) -> Ca {
        self.sub_ca_with(parent, name, alg, &["-enddate", &gtime(not_after)])
    }

    fn sub_ca_with(&self, parent: &Ca, name: &str, alg: Alg, extra: &[&str]) -> Ca {
        let dir = self.new_ca_dir(name);
        let key = dir.join("ca.key");
        let cert = dir.join("ca.crt");
        let k = self.key(&format!("{}.key", name.replace(' ', "_")), alg);
        std::fs::rename(&k, &key).expect("move key");
        self.sign_with(
            parent,
            &key,
            &format!("/O=fhirgate test/CN={name}"),
            "v3_sub_ca",
            &cert,
            extra,
        );
        let chain = dir.join("chain.pem");
        let mut pem = std::fs::read(&cert).expect("cert");
        pem.extend(std::fs::read(&parent.chain).expect("parent chain"));
        std::fs::write(&chain, pem).expect("chain");
        Ca {
            name: name.into(),
            dir,
            cert,
            key,
            chain,
        }
    }

    fn leaf(&self, ca: &Ca, name: &str, alg: Alg, ext: &str) -> Issued {
        self.leaf_with(ca, name, alg, ext, &[])
    }

    /// A clientAuth leaf `CN=name` issued by `ca` that expires at `not_after` (Unix
    /// seconds; `openssl ca -enddate`).
    pub fn client_until(&self, ca: &Ca, name: &str, alg: Alg, not_after: i64) -> Issued {
        self.leaf_with(ca, name, alg, "client", &["-enddate", &gtime(not_after)])
    }

    fn leaf_with(&self, ca: &Ca, name: &str, alg: Alg, ext: &str, extra: &[&str]) -> Issued {
        let key = self.key(&format!("{name}.key"), alg);
        let cert = self.path(&format!("{name}.crt"));
        let subj = format!("/O=fhirgate test/CN={name}");
        self.sign_with(ca, &key, &subj, ext, &cert, extra);
        // Leaf + issuing CAs, root excluded (what a TLS peer sends).
        let chain = self.path(&format!("{name}.chain.pem"));
        let mut pem = std::fs::read(&cert).expect("cert");
        let ca_chain = std::fs::read_to_string(&ca.chain).expect("ca chain");
        let blocks: Vec<&str> = ca_chain
            .split_inclusive("-----END CERTIFICATE-----\n")
            .collect();
        for b in &blocks[..blocks.len().saturating_sub(1)] {
            pem.extend(b.as_bytes());
        }
        std::fs::write(&chain, pem).expect("chain");
        Issued { cert, key, chain }
    }

    /// A clientAuth leaf `CN=name` issued by `ca`.
    pub fn client(&self, ca: &Ca, name: &str, alg: Alg) -> Issued {
        self.leaf(ca, name, alg, "client")
    }

    /// A serverAuth leaf for `localhost` / 127.0.0.1 issued by `ca`.
    pub fn server(&self, ca: &Ca, name: &str, alg: Alg) -> Issued {
        self.leaf(ca, name, alg, "server")
    }

    /// From now on, the SubCAs and clients `ca` issues name `url` as their CRL
    /// Distribution Point.
    pub fn publish_crls_at(&self, ca: &Ca, url: &str) {
        std::fs::write(ca.dir.join("ca.cnf"), ca_cnf(&ca.dir, true, Some(url))).expect("cnf");
        std::fs::write(ca.dir.join("ca-v1.cnf"), ca_cnf(&ca.dir, false, Some(url))).expect("cnf");
    }

    /// A CA with exactly `of`'s subject (the same name bytes) but its own RSA key: what a
    /// forger would make (`openssl x509 -signkey` keeps the subject, puts the new public
    /// key in and self-signs). It can sign CRLs like any other CA here.
    pub fn impostor(&self, of: &Ca) -> Ca {
        let name = format!("{} impostor", of.name);
        let dir = self.new_ca_dir(&name);
        let key = dir.join("ca.key");
        let cert = dir.join("ca.crt");
        let k = self.key(&format!("{}.key", name.replace(' ', "_")), Alg::Rsa2048);
        std::fs::rename(&k, &key).expect("move key");
        openssl(&[
            "x509",
            "-in",
            s(&of.cert),
            "-signkey",
            s(&key),
            "-out",
            s(&cert),
        ]);
        let chain = dir.join("chain.pem");
        std::fs::copy(&cert, &chain).expect("chain");
        Ca {
            name,
            dir,
            cert,
            key,
            chain,
        }
    }

    /// A CRL of `ca` valid for `hours`, in DER as CAs publish it.
    pub fn crl_der(&self, ca: &Ca, hours: u32) -> Vec<u8> {
        let pem = self.crl(ca, CrlTimes::Hours(hours));
        std::fs::read(self.der(&pem, Kind::Crl)).expect("DER CRL")
    }

    /// Marks `cert` (issued by `ca`) revoked in `ca`'s database (keyCompromise).
    pub fn revoke(&self, ca: &Ca, cert: &Path) {
        openssl(&[
            "ca",
            "-config",
            s(&ca.dir.join("ca.cnf")),
            "-revoke",
            s(cert),
            "-crl_reason",
            "keyCompromise",
        ]);
    }

    /// A v2 CRL (with CRL number and AKI) of `ca`, PEM, at `<ca dir>/<n>.crl.pem`.
    pub fn crl(&self, ca: &Ca, times: CrlTimes) -> PathBuf {
        self.gencrl(ca, times, "ca.cnf")
    }

    /// A v2 CRL of `ca` whose critical Issuing Distribution Point limits it to end-entity
    /// certificates (onlyContainsUserCerts, RFC 5280 §5.2.5), PEM, as a CA that splits
    /// its CRL by scope publishes it.
    pub fn crl_only_user(&self, ca: &Ca, times: CrlTimes) -> PathBuf {
        let url = format!("http://crl.invalid/{}-users.crl", ca.name.replace(' ', "_"));
        self.crl_with(
            ca,
            times,
            "issuingDistributionPoint = critical, @idp",
            &format!("[ idp ]\nfullname = URI:{url}\nonlyuser = TRUE\n"),
        )
    }

    /// A v2 CRL of `ca` with one more CRL extension (`ext`, an openssl config line, whose
    /// sections are `sections`), PEM: the kinds of CRL a CA may publish.
    pub fn crl_with(&self, ca: &Ca, times: CrlTimes, ext: &str, sections: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cnf = std::fs::read_to_string(ca.dir.join("ca.cnf")).expect("ca.cnf");
        let aki = "[ crl_ext ]\nauthorityKeyIdentifier = keyid:always\n";
        assert!(cnf.contains(aki), "ca.cnf has a crl_ext section");
        let cnf = cnf.replace(aki, &format!("{aki}{ext}\n")) + sections;
        let name = format!("ca-ext-{n}.cnf");
        std::fs::write(ca.dir.join(&name), cnf).expect("cnf");
        self.gencrl(ca, times, &name)
    }

    /// A version 1 CRL (no extensions, no CRL number), PEM.
    pub fn crl_v1(&self, ca: &Ca) -> PathBuf {
        self.gencrl(ca, CrlTimes::Hours(24), "ca-v1.cnf")
    }

    fn gencrl(&self, ca: &Ca, times: CrlTimes, cnf: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = ca.dir.join(format!("{n}.crl.pem"));
        let cnf = ca.dir.join(cnf);
        let mut args: Vec<String> = ["ca", "-gencrl", "-config", s(&cnf), "-out", s(&out)]
            .iter()
            .map(|a| a.to_string())
            .collect();
        match times {
            CrlTimes::Hours(h) => args.extend(["-crlhours".into(), h.to_string()]),
            CrlTimes::At { last, next } => args.extend([
                "-crl_lastupdate".into(),
                gtime(last),
                "-crl_nextupdate".into(),
                gtime(next),
            ]),
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        openssl(&refs);
        out
    }

    /// The DER form of a PEM certificate, CRL or key, next to it with `.der`.
    pub fn der(&self, pem: &Path, kind: Kind) -> PathBuf {
        let out = pem.with_extension("der");
        let cmd = match kind {
            Kind::Cert => "x509",
            Kind::Crl => "crl",
            Kind::Key => "pkey",
        };
        openssl(&[cmd, "-in", s(pem), "-outform", "DER", "-out", s(&out)]);
        out
    }

    /// The key in its traditional form: PKCS#1 `RSA PRIVATE KEY` or SEC1 `EC PRIVATE KEY`.
    pub fn traditional_key(&self, key: &Path) -> PathBuf {
        let out = key.with_extension("trad.key");
        openssl(&["pkey", "-in", s(key), "-traditional", "-out", s(&out)]);
        out
    }

    /// The key encrypted with a passphrase (`ENCRYPTED PRIVATE KEY`, AES-256).
    pub fn encrypted_key(&self, key: &Path) -> PathBuf {
        let out = key.with_extension("enc.key");
        openssl(&[
            "pkey",
            "-in",
            s(key),
            "-aes256",
            "-passout",
            "pass:secret",
            "-out",
            s(&out),
        ]);
        out
    }
}
