//! `fhirgate inspect-cert FILE`: what a certificate says and whether the gateway would
//! accept it as a client, bundle by bundle, with the same verifier the handshake uses
//! (chain, validity, key usage, CRLs). Meant for the question integration teams ask most:
//! "why is this sender's certificate refused?".

use std::fmt::Write as _;
use std::path::Path;

use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::Config;
use crate::tls::{load_certs, provider, rustls_error_kind, BundleVerifier};

/// Reads certificates from PEM (one or more blocks) or a single DER file.
fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    Ok(load_certs("FILE", path)?)
}

fn describe(out: &mut String, der: &[u8], now: i64) -> anyhow::Result<()> {
    let (_, c) = X509Certificate::from_der(der)
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
    let v = c.validity();
    let (nb, na) = (v.not_before.timestamp(), v.not_after.timestamp());
    let state = if now < nb {
        "NOT YET VALID".to_owned()
    } else if now > na {
        format!("EXPIRED {} days ago", (now - na) / 86_400)
    } else {
        format!("valid, {} days left", (na - now) / 86_400)
    };
    let _ = writeln!(out, "  subject:     {}", c.subject());
    let _ = writeln!(out, "  issuer:      {}", c.issuer());
    let _ = writeln!(out, "  serial:      {}", c.raw_serial_as_string());
    let _ = writeln!(out, "  not before:  {}", v.not_before);
    let _ = writeln!(out, "  not after:   {}  ({state})", v.not_after);
    let _ = writeln!(out, "  sha-256:     {}", hex::encode(Sha256::digest(der)));
    let key = c.public_key().algorithm.algorithm.to_id_string();
    let key = match key.as_str() {
        "1.2.840.10045.2.1" => "EC".to_owned(),
        "1.2.840.113549.1.1.1" => format!(
            "RSA ({} bits)",
            c.public_key()
                .parsed()
                .map(|k| k.key_size())
                .unwrap_or_default()
        ),
        "1.3.101.112" => "Ed25519".to_owned(),
        other => other.to_owned(),
    };
    let _ = writeln!(out, "  public key:  {key}");
    for ext in c.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                let names: Vec<String> = san
                    .general_names
                    .iter()
                    .map(|n| match n {
                        GeneralName::DNSName(d) => format!("DNS:{d}"),
                        GeneralName::IPAddress(ip) => match ip.len() {
                            4 => format!(
                                "IP:{}",
                                std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])
                            ),
                            16 => {
                                let mut a = [0u8; 16];
                                a.copy_from_slice(ip);
                                format!("IP:{}", std::net::Ipv6Addr::from(a))
                            }
                            _ => "IP:(malformed)".to_owned(),
                        },
                        GeneralName::RFC822Name(e) => format!("email:{e}"),
                        GeneralName::URI(u) => format!("URI:{u}"),
                        other => format!("{other:?}"),
                    })
                    .collect();
                let _ = writeln!(out, "  SANs:        {}", names.join(", "));
            }
            ParsedExtension::BasicConstraints(bc) => {
                let _ = writeln!(
                    out,
                    "  CA:          {}{}",
                    bc.ca,
                    bc.path_len_constraint
                        .map(|l| format!(" (path length {l})"))
                        .unwrap_or_default()
                );
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                let mut u = Vec::new();
                if eku.server_auth {
                    u.push("serverAuth");
                }
                if eku.client_auth {
                    u.push("clientAuth");
                }
                if eku.any {
                    u.push("any");
                }
                let _ = writeln!(out, "  ext. usage:  {}", u.join(", "));
            }
            _ => {}
        }
    }
    // Where its issuer's CRL is published: what to put in a bundle's crl_urls.
    let cdp = crate::revocation::distribution_points(&c);
    if !cdp.is_empty() {
        let _ = writeln!(out, "  CRL at:      {}", cdp.join(", "));
    }
    Ok(())
}

/// The report for `path`; with `config`, also whether each trust bundle accepts it as a
/// client certificate (extra certificates in the file are sent as intermediates).
pub fn inspect(path: &Path, config: Option<&Path>) -> anyhow::Result<String> {
    let chain = read_chain(path)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut out = String::new();
    for (i, der) in chain.iter().enumerate() {
        let _ = writeln!(
            out,
            "certificate {i}{}:",
            if i == 0 { " (leaf)" } else { "" }
        );
        describe(&mut out, der, now)?;
    }
    if let Some(cfg_path) = config {
        let mut cfg = Config::load(cfg_path)?;
        // CRLs fetched by a running gateway, as kept in tls.revocation.cache_dir.
        cfg.tls.fetched_crls = crate::revocation::cached(&cfg.tls);
        let verifier = BundleVerifier::from_config(&cfg.tls, &provider())?;
        let _ = writeln!(out, "as a client of {}:", cfg_path.display());
        for (bundle, r) in verifier.verify_each(&chain[0], &chain[1..]) {
            match r {
                Ok(()) => {
                    let _ = writeln!(out, "  bundle {bundle}: ACCEPTED");
                }
                Err(e) => {
                    let _ = writeln!(
                        out,
                        "  bundle {bundle}: refused ({}: {e})",
                        rustls_error_kind(&e)
                    );
                }
            }
        }
        // What the verdicts above cannot see (e.g. `anchor: subca`, no CRLs).
        for w in &verifier.inventory.warnings {
            let _ = writeln!(out, "  note: {w}");
        }
    }
    Ok(out)
}

/// Whether an `inspect-cert --config` report has a `bundle NAME: ACCEPTED` line.
pub fn any_bundle_accepts(report: &str) -> bool {
    report.lines().any(|l| {
        l.trim_start()
            .strip_prefix("bundle ")
            .is_some_and(|r| r.ends_with(": ACCEPTED") || r.contains(": ACCEPTED "))
    })
}
