//! Command-line tools an integration team uses: `fhirgate inspect-cert` and
//! `fhirgate pki dev`.

use crate::harness::*;

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
        assert!(out.contains(verdict), "{file}: {out}");
        // Exit status: 0 when some bundle accepts it, 1 when every bundle refuses it.
        let accepted = file == "foreign-client.crt";
        assert_eq!(ok, accepted, "{file}: {err}");
        if !accepted {
            assert!(
                err.contains("no trust bundle of") && err.contains(file),
                "{file}: {err}"
            );
        }
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

/// Items of the `Options:` / `Arguments:` sections of one `--help` text whose description
/// is empty (defaults such as `[default: 1]` do not count as a description).
fn undescribed(help: &str) -> Vec<String> {
    let strip = |s: &str| -> String {
        let mut s = s.trim().to_owned();
        while let (Some(a), true) = (s.rfind(" ["), s.ends_with(']')) {
            s.truncate(a);
        }
        if s.starts_with('[') && s.ends_with(']') {
            s.clear();
        }
        s.trim().to_owned()
    };
    let mut missing = Vec::new();
    let mut in_items = false;
    let lines: Vec<&str> = help.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') {
            in_items = line == &"Options:" || line == &"Arguments:";
            continue;
        }
        let t = line.trim_start();
        let indent = line.len() - t.len();
        // An item starts at a small indent with its flag or <VALUE>/[VALUE] name.
        if !in_items
            || indent > 6
            || !(t.starts_with('-') || t.starts_with('<') || t.starts_with('['))
        {
            continue;
        }
        // Same-line layout: the spec, two or more spaces, the description.
        let same_line = t
            .split_once("  ")
            .map(|(_, d)| strip(d))
            .unwrap_or_default();
        // Next-line layout: the description is indented further on the following line.
        let next_line = lines
            .get(i + 1)
            .filter(|n| n.len() - n.trim_start().len() > indent + 2)
            .map(|n| strip(n))
            .unwrap_or_default();
        if same_line.is_empty() && next_line.is_empty() {
            missing.push(t.trim().to_owned());
        }
    }
    missing
}

#[test]
fn undescribed_finds_an_empty_help_line() {
    // The check itself must be able to fail: both clap layouts, with and without defaults.
    let short =
        "Usage: x\n\nOptions:\n  -c, --config <CONFIG>  \n  -d <D>  [default: a]\n  -v  Verbose\n";
    assert_eq!(
        undescribed(short),
        ["-c, --config <CONFIG>", "-d <D>  [default: a]"]
    );
    let long = "Options:\n      --key <KEY>\n          \n      --cert <CERT>\n          Client certificate\n";
    assert_eq!(undescribed(long), ["--key <KEY>"]);
}

#[test]
fn every_option_of_every_subcommand_has_a_description() {
    // Walk the command tree as a user would, by the `Commands:` list of each help text.
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let (ok, out, err) = fhirgate(&args);
        assert!(ok, "{args:?}: {err}");
        seen += 1;
        let missing = undescribed(&out);
        assert!(
            missing.is_empty(),
            "`fhirgate {}` has options without a description: {missing:?}\n{out}",
            path.join(" ")
        );
        let mut in_cmds = false;
        for line in out.lines() {
            if !line.starts_with(' ') {
                in_cmds = line == "Commands:";
                continue;
            }
            if in_cmds {
                let name = line.split_whitespace().next().unwrap_or_default();
                if !name.is_empty() && name != "help" {
                    let mut p = path.clone();
                    p.push(name.to_owned());
                    todo.push(p);
                }
            }
        }
    }
    // run, check, demo, client, inspect-cert, pki (+dev), nhsd (+encode, decode, example).
    assert!(seen >= 12, "walked {seen} help texts");
}

#[test]
fn nhsd_decode_exit_status_follows_the_verdict() {
    let (ok, out, _) = fhirgate(&["nhsd", "example"]);
    assert!(ok);
    let org = out
        .lines()
        .find_map(|l| l.strip_prefix("NHSD-End-User-Organisation: "))
        .expect("example has the organisation header")
        .to_owned();
    let (ok, out, err) = fhirgate(&[
        "nhsd",
        "decode",
        "--header",
        "NHSD-End-User-Organisation",
        &org,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains(": valid ("), "{out}");

    // Decodable, but the gateway refuses it (no ODS identifier): shown, and exit 1.
    use base64::Engine;
    let bad = base64::engine::general_purpose::STANDARD
        .encode(r#"{"resourceType":"Organization","name":"x"}"#);
    let (ok, out, err) = fhirgate(&[
        "nhsd",
        "decode",
        "--header",
        "NHSD-End-User-Organisation",
        &bad,
    ]);
    assert!(!ok, "an INVALID verdict exits non-zero: {out}");
    assert!(
        out.contains("\"resourceType\": \"Organization\""),
        "the JSON is still shown: {out}"
    );
    assert!(out.contains(": INVALID: "), "{out}");
    assert!(err.contains("would refuse"), "{err}");
    // A plain header: an INVALID X-Request-ID is an error too.
    let (ok, out, _) = fhirgate(&["nhsd", "decode", "--header", "X-Request-ID", "not-a-uuid"]);
    assert!(!ok && out.contains("INVALID"), "{out}");
}

/// `fhirgate client` against a real gateway: a refused client certificate is reported as
/// the TLS alert the server sent (RFC 8446 §6.2: "certificate_revoked",
/// "certificate_expired", "unknown_ca", "unsupported_certificate"), not as the "broken
/// pipe" / "connection closed" that the HTTP layer sees when the alert arrives while the
/// request is being written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reports_a_refused_certificate_as_the_tls_alert() {
    let pki = Pki::new();
    let up = dead_port().await;
    let (_gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let url = format!("https://localhost:{}/metadata", addr.port());
    let p = |n: &str| pki.path(n).display().to_string();
    for (who, want) in [
        ("revoked-client", "alert certificate revoked"),
        ("expired-client", "alert certificate expired"),
        ("future-client", "alert certificate expired"),
        ("foreign-client", "alert unknown CA"),
        ("server-only-client", "alert unsupported certificate"),
        ("client", ""),
    ] {
        let args: Vec<String> = [
            "client",
            "--no-nhsd",
            "--timeout",
            "10",
            "--cacert",
            &p("root-ca.crt"),
            "--cert",
            &p(&format!("{who}.crt")),
            "--key",
            &p(&format!("{who}.key")),
            &url,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (ok, out, err) = tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            fhirgate(&a)
        })
        .await
        .unwrap();
        if want.is_empty() {
            // The good certificate gets through TLS (the upstream is down: 502).
            assert!(
                ok && out.starts_with("HTTP/") && out.contains(" 502 "),
                "{who}: {out}{err}"
            );
            continue;
        }
        assert!(!ok, "{who}: {out}");
        assert!(err.contains(want), "{who}: expected {want:?} in: {err}");
        assert!(
            err.contains("TLS handshake refused by the server"),
            "{who}: {err}"
        );
        for vague in [
            "broken pipe",
            "connection closed",
            "channel closed",
            "canceled",
        ] {
            assert!(!err.to_lowercase().contains(vague), "{who}: {err}");
        }
    }
}

/// A careful production config over the openssl PKI: `check --strict` has nothing to
/// say; `inspect-cert` and `fhirgate client` judge the revoked certificate by its CRL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_pki_production_config_checks_clean_and_refusals_are_explained() {
    // An NHS-shaped PKI made by the openssl CLI as a CA operator would: RSA keys, Root CA
    // -> SubCA via `openssl ca`, a server, a client and a revoked client, and DER CRLs
    // from `openssl ca -gencrl` + `openssl crl -outform DER`.
    let pki = OpensslPki::new();
    let root = pki.root("Test Root Authority G2", Alg::Rsa2048);
    let sub = pki.sub_ca(&root, "Test Authentication G2", Alg::Rsa2048);
    let server = pki.server(&sub, "server", Alg::Rsa2048);
    let client = pki.client(&sub, "client", Alg::Rsa2048);
    let revoked = pki.client(&sub, "revoked", Alg::Rsa2048);
    pki.revoke(&sub, &revoked.cert);
    let crls = [&sub, &root].map(|ca| {
        let der = pki.path(&format!("{}.crl", ca.name.replace(' ', "_")));
        std::fs::write(&der, pki.crl_der(ca, 24 * 7)).unwrap();
        der
    });
    let dir = pki.dir.path();
    let d = |p: &std::path::Path| p.display().to_string();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let yaml = format!(
        "environment: production
listeners: [{{address: '127.0.0.1:{port}'}}]
tls:
  server_cert: {server_chain}
  server_key: {server_key}
  trust_bundles:
    - name: test-nhs
      ca_files: [{root_ca}, {sub_ca}]
      crl_files: [{sub_crl}, {root_crl}]
  revocation: {{scope: chain, unknown_status: deny, enforce_crl_expiry: true}}
upstream: {{url: 'http://127.0.0.1:9'}}
auth: {{mode: jwt, jwks_uri: 'https://auth.example.nhs.uk/jwks', expected_issuer: 'https://auth.example.nhs.uk', expected_audience: 'https://fhir.example.nhs.uk'}}
routes:
  - {{name: meta, path_prefix: /metadata, token: none}}
  - {{name: all, path_prefix: /}}
",
        server_chain = d(&server.chain),
        server_key = d(&server.key),
        root_ca = d(&root.cert),
        sub_ca = d(&sub.cert),
        sub_crl = d(&crls[0]),
        root_crl = d(&crls[1]),
    );
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, &yaml).unwrap();
    let c = cfg.display().to_string();
    let (ok, out, err) = fhirgate(&["check", "--strict", "--config", &c]);
    assert!(ok, "{out}{err}");
    assert!(!err.contains("warning:"), "{err}");
    assert!(
        out.contains("revocation: scope=chain unknown_status=deny enforce_crl_expiry=true"),
        "{out}"
    );

    let (ok, out, _) = fhirgate(&["inspect-cert", &d(&client.cert), "--config", &c]);
    assert!(ok && out.contains("bundle test-nhs: ACCEPTED"), "{out}");
    let (ok, out, err) = fhirgate(&["inspect-cert", &d(&revoked.cert), "--config", &c]);
    assert!(!ok, "every bundle refuses it: exit 1\n{out}");
    assert!(out.contains("bundle test-nhs: refused (revoked"), "{out}");
    assert!(err.contains("no trust bundle"), "{err}");

    // The gateway itself on this config, and fhirgate client against it.
    let config = fhirgate::config::Config::load(&cfg).unwrap();
    let _gw = fhirgate::server::start(&config)
        .await
        .expect("gateway starts");
    let url = format!("https://localhost:{port}/metadata");
    let run_client = |who: &Issued| {
        let args: Vec<String> = [
            "client",
            "--no-nhsd",
            "--timeout",
            "10",
            "--cacert",
            &d(&root.cert),
            "--cert",
            &d(&who.cert),
            "--key",
            &d(&who.key),
            &url,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            fhirgate(&a)
        })
    };
    let (ok, out, err) = run_client(&client).await.unwrap();
    assert!(ok && out.starts_with("HTTP/"), "{out}{err}");
    let (ok, _, err) = run_client(&revoked).await.unwrap();
    assert!(!ok);
    assert!(err.contains("alert certificate revoked"), "{err}");
}

/// `TOKIO_WORKER_THREADS` sets the runtime's thread count (README, Operations, "CPUs").
/// tokio itself panics on a value that is not a number; the gateway refuses it at start
/// with a line naming the variable and the fix, instead of running on a default the
/// operator did not ask for.
#[test]
fn a_worker_count_that_is_not_a_positive_number_stops_the_start_with_the_fix() {
    let run = |v: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhirgate"))
            .args(["nhsd", "example"])
            .env("TOKIO_WORKER_THREADS", v)
            .output()
            .expect("fhirgate runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for bad in ["two", "0", ""] {
        let (ok, err) = run(bad);
        assert!(!ok, "TOKIO_WORKER_THREADS={bad:?} must stop the start");
        assert!(
            err.contains(&format!(
                "TOKIO_WORKER_THREADS={bad:?} is not a positive whole number"
            )) && err.contains("unset it for one per CPU"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "a line, not a panic: {err}");
    }
    for good in ["1", "2"] {
        let (ok, err) = run(good);
        assert!(ok, "TOKIO_WORKER_THREADS={good}: {err}");
    }
}
