//! Command-line tools an integration team uses: `fhirgate inspect-cert` and
//! `fhirgate pki dev`.

mod common;

use std::process::Command;

use common::*;

fn fhirgate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(args)
        .output()
        .expect("fhirgate runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspect_cert_reports_facts_and_per_bundle_verdicts() {
    let pki = Pki::new();
    let mut o = Opts::new("127.0.0.1:9".parse().unwrap());
    o.extra_bundle = true; // nhs-int + foreign
    let cfg = pki.path("config.yaml");
    std::fs::write(&cfg, config_yaml(&pki, &o)).unwrap();
    let cfg = cfg.display().to_string();
    let p = |n: &str| pki.path(n).display().to_string();

    let (ok, out, err) = fhirgate(&["inspect-cert", &p("client.crt"), "--config", &cfg]);
    assert!(ok, "{err}");
    assert!(out.contains("CN=BaRS-X26.fhirgate-dev.nhs.uk"), "{out}");
    assert!(out.contains("DNS:bars-x26.fhirgate-dev.nhs.uk"), "{out}");
    assert!(out.contains("ext. usage:  clientAuth"), "{out}");
    assert!(out.contains("days left"), "{out}");
    assert!(out.contains("bundle nhs-int: ACCEPTED"), "{out}");
    assert!(out.contains("bundle foreign: refused (unknown_ca"), "{out}");
    // The fingerprint is the SHA-256 of the DER, as the gateway forwards it upstream.
    let der = rustls::pki_types::pem::PemObject::from_pem_file(pki.path("client.crt"))
        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .unwrap();
    use sha2::Digest;
    let fp = hex::encode(sha2::Sha256::digest(&der));
    assert!(out.contains(&fp), "{out}");

    for (file, verdict) in [
        ("revoked-client.crt", "bundle nhs-int: refused (revoked"),
        ("expired-client.crt", "bundle nhs-int: refused (expired"),
        (
            "server-only-client.crt",
            "bundle nhs-int: refused (bad_purpose",
        ),
        ("foreign-client.crt", "bundle foreign: ACCEPTED"),
    ] {
        let (ok, out, err) = fhirgate(&["inspect-cert", &p(file), "--config", &cfg]);
        assert!(ok, "{err}");
        assert!(out.contains(verdict), "{file}: {out}");
    }
    let (_, out, _) = fhirgate(&["inspect-cert", &p("expired-client.crt")]);
    assert!(out.contains("EXPIRED"), "{out}");

    // DER input, and a server chain (leaf + SubCA) lists both certificates.
    std::fs::write(pki.path("client.der"), &der).unwrap();
    let (ok, out, _) = fhirgate(&["inspect-cert", &p("client.der")]);
    assert!(ok && out.contains("CN=BaRS-X26"), "{out}");
    let (_, out, _) = fhirgate(&["inspect-cert", &p("server.crt")]);
    assert!(
        out.contains("certificate 1:") && out.contains("CA:          true"),
        "{out}"
    );

    // Garbage: a clear error, no panic.
    std::fs::write(pki.path("junk.pem"), "not a certificate").unwrap();
    let (ok, _, err) = fhirgate(&["inspect-cert", &p("junk.pem")]);
    assert!(!ok);
    assert!(err.contains("no CERTIFICATE found"), "{err}");
}

#[test]
fn pki_dev_writes_the_pki_and_the_auth_credentials_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dev");
    let (ok, _, err) = fhirgate(&["pki", "dev", "--out", &out.display().to_string()]);
    assert!(ok, "{err}");
    use std::os::unix::fs::PermissionsExt;
    for f in [
        "client.key",
        "server.key",
        "auth-gateway.secret",
        "auth-sender.secret",
        "auth-sender-jwt.key",
    ] {
        let mode = std::fs::metadata(out.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{f} is owner-only");
    }
    for f in [
        "root-ca.crt",
        "sub-ca.crt",
        "sub-ca.crl",
        "revoked-client.crt",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
}
