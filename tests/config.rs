//! Config errors name the field; `fhirgate check` behaves like `nginx -t`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use fhirgate::config::Config;

fn base(pki: &Pki) -> String {
    config_yaml(pki, &Opts::new("127.0.0.1:9".parse().unwrap()))
}

fn load_err(yaml: &str) -> String {
    match Config::from_yaml(yaml, Path::new("/")) {
        Ok(_) => panic!("config should be refused:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn valid_base_config_loads() {
    let pki = Pki::new();
    let cfg = Config::from_yaml(&base(&pki), Path::new("/")).expect("valid");
    assert_eq!(cfg.tls.trust_bundles[0].name, "nhs-int");
    assert!(cfg.summary().contains("trust bundle \"nhs-int\""));
}

/// RFC 3986 5.2.4: dot segments are exactly "." and ".."; RFC 8615 well-known URIs start
/// with a "." but are plain paths, and SMART discovery (`/.well-known/smart-configuration`)
/// needs a route of its own (public, before the token-protected `/`).
#[test]
fn well_known_route_prefix_is_a_plain_path() {
    let pki = Pki::new();
    let yaml = base(&pki).replace(
        "path_prefix: /",
        "path_prefix: /.well-known/smart-configuration",
    );
    Config::from_yaml(&yaml, Path::new("/")).expect("/.well-known is not a dot segment");
    let yaml = base(&pki).replace("path_prefix: /", "path_prefix: /a/./b");
    assert!(load_err(&yaml).contains("routes[0].path_prefix"));
}

#[test]
fn each_bad_config_names_its_field() {
    let pki = Pki::new();
    let b = base(&pki);
    let cases: Vec<(String, &str)> = vec![
        (
            b.replace(
                "environment: development",
                "environment: development\nbogus_key: 1",
            ),
            "bogus_key",
        ),
        (
            b.replace("idle_timeout: 5s", "idle_timeout: 5s\n  idel_timeout: 5s"),
            "idel_timeout",
        ),
        (
            b.replace("environment: development", "environment: staging"),
            "staging",
        ),
        (
            b.replace(
                &pki.path("server.key").display().to_string(),
                "/nonexistent/server.key",
            ),
            "tls.server_key",
        ),
        (
            b.replace(
                &pki.path("sub-ca.crl").display().to_string(),
                "/nonexistent.crl",
            ),
            "tls.trust_bundles[0].crl_files[0]",
        ),
        (
            b.replace("- name: nhs-int", "- name: \"\""),
            "tls.trust_bundles[0].name",
        ),
        (
            b.replace("url: http://127.0.0.1:9", "url: ftp://127.0.0.1:9"),
            "upstream.url",
        ),
        (
            b.replace("url: http://127.0.0.1:9", "url: https://127.0.0.1:9"),
            "upstream.ca_file",
        ),
        (
            b.replace("response_timeout: 2s", "response_timeout: 0s"),
            "upstream.response_timeout",
        ),
        (
            b.replace(
                "idle_timeout: 5s",
                "idle_timeout: 5s\n  max_header_bytes: 100",
            ),
            "limits.max_header_bytes",
        ),
        (
            b.replace(
                "handshake_timeout: 2s",
                "handshake_timeout: 2s\n  verify_depth: 0",
            ),
            "tls.verify_depth",
        ),
        (
            b.replace("path_prefix: /", "path_prefix: /x/../y"),
            "routes[0].path_prefix",
        ),
        (
            b.replace("path_prefix: /", "path_prefix: /x/."),
            "routes[0].path_prefix",
        ),
        (
            b.replace("path_prefix: /", "path_prefix: /\n    bundles: [nhs-prod]"),
            "routes[0].bundles[0]",
        ),
        (
            b.replace("handshake_timeout: 2s", "handshake_timeout: soon"),
            "soon",
        ),
    ];
    for (yaml, needle) in cases {
        let e = load_err(&yaml);
        assert!(e.contains(needle), "expected {needle:?} in error: {e}");
    }
}

#[test]
fn unreadable_pem_contents_are_reported_with_the_field() {
    let pki = Pki::new();
    std::fs::write(
        pki.path("sub-ca.crl"),
        "-----BEGIN X509 CRL-----\nnot base64!\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let cfg = Config::from_yaml(&base(&pki), Path::new("/")).expect("files exist");
    let e = fhirgate::tls::server_tls(&cfg.tls)
        .err()
        .expect("garbage CRL refused")
        .to_string();
    assert!(e.starts_with("tls.trust_bundles[0].crl_files"), "{e}");

    let pki = Pki::new();
    std::fs::copy(pki.path("client.key"), pki.path("server.key")).unwrap();
    let cfg = Config::from_yaml(&base(&pki), Path::new("/")).expect("files exist");
    let e = fhirgate::tls::server_tls(&cfg.tls)
        .err()
        .expect("mismatched key refused")
        .to_string();
    assert!(e.starts_with("tls.server_key"), "{e}");

    let pki = Pki::new();
    std::fs::write(pki.path("root-ca.crt"), "hello").unwrap();
    let cfg = Config::from_yaml(&base(&pki), Path::new("/")).expect("files exist");
    let e = fhirgate::tls::server_tls(&cfg.tls)
        .err()
        .expect("empty CA refused")
        .to_string();
    assert!(e.starts_with("tls.trust_bundles[0].ca_files[0]"), "{e}");
}

#[test]
fn check_command_prints_summary_or_field_error() {
    let pki = Pki::new();
    let good = pki.path("good.yaml");
    std::fs::write(&good, base(&pki)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(stdout.contains("route \"all\""), "{stdout}");

    let bad = pki.path("bad.yaml");
    std::fs::write(
        &bad,
        base(&pki)
            .replace("max_body", "x")
            .replace("idle_timeout: 5s", "idle_timeout: 0s"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("limits.idle_timeout: must be greater than zero"),
        "{stderr}"
    );
}

#[test]
fn shipped_config_is_valid_with_a_dev_pki() {
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml")).unwrap();
    fhirgate::pki::ensure_dev_pki(&dir.path().join("certs/dev")).unwrap();
    fhirgate::devauth::ensure_credentials(&dir.path().join("certs/dev")).unwrap();
    let cfg = Config::from_yaml(&shipped, dir.path()).expect("shipped config.yaml is valid");
    fhirgate::tls::server_tls(&cfg.tls).expect("shipped TLS config builds");
}
