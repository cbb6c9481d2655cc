//! Command-line tools an integration team uses: `fhirgate inspect-cert` and
//! `fhirgate pki dev`.

use std::process::Command;

use crate::harness::*;

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

/// Runs openssl with `args` in `dir`, failing the test with its stderr.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An NHS-shaped PKI made by the openssl CLI as a CA operator would: RSA keys, Root CA →
/// SubCA via `openssl ca`, a server, a client and a revoked client, and DER CRLs from
/// `openssl ca -gencrl` + `openssl crl -outform DER`.
fn openssl_pki(dir: &std::path::Path) {
    let exts = "\
[v3_sub]\nbasicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n\
subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n\
[server]\nbasicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost\nauthorityKeyIdentifier=keyid\n\
[client]\nbasicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
extendedKeyUsage=clientAuth\nsubjectAltName=DNS:bars-x99.example.nhs.uk\nauthorityKeyIdentifier=keyid\n\
[crl_ext]\nauthorityKeyIdentifier=keyid:always\n";
    for ca in ["root", "sub"] {
        let d = dir.join(ca);
        std::fs::create_dir_all(d.join("new")).unwrap();
        std::fs::write(d.join("index.txt"), "").unwrap();
        std::fs::write(
            d.join("serial"),
            if ca == "root" { "1000\n" } else { "2000\n" },
        )
        .unwrap();
        std::fs::write(d.join("crlnumber"), "01\n").unwrap();
        std::fs::write(
            d.join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca=CA_default\n[CA_default]\ndir={}\ndatabase=$dir/index.txt\n\
                 new_certs_dir=$dir/new\nserial=$dir/serial\ncrlnumber=$dir/crlnumber\n\
                 certificate=$dir/ca.pem\nprivate_key=$dir/key.pem\ndefault_md=sha256\n\
                 default_days=365\ndefault_crl_days=7\npolicy=any\nunique_subject=no\n\
                 crl_extensions=crl_ext\n[any]\ncommonName=supplied\norganizationName=optional\n\
                 countryName=optional\n{exts}",
                d.display()
            ),
        )
        .unwrap();
    }
    let subj = |cn: &str| format!("/C=GB/O=Test NHS/CN={cn}");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "root/key.pem",
            "-out",
            "root/ca.pem",
            "-days",
            "3650",
            "-subj",
            &subj("Test Root Authority G2"),
            "-addext",
            "basicConstraints=critical,CA:true",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "sub/key.pem",
            "-out",
            "sub/csr.pem",
            "-subj",
            &subj("Test Authentication G2"),
        ],
    );
    openssl(
        dir,
        &[
            "ca",
            "-batch",
            "-notext",
            "-config",
            "root/ca.cnf",
            "-extensions",
            "v3_sub",
            "-in",
            "sub/csr.pem",
            "-out",
            "sub/ca.pem",
        ],
    );
    for (name, ext) in [
        ("server", "server"),
        ("client", "client"),
        ("revoked", "client"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &subj(&format!("{name}.example.nhs.uk")),
            ],
        );
        openssl(
            dir,
            &[
                "ca",
                "-batch",
                "-notext",
                "-config",
                "sub/ca.cnf",
                "-extensions",
                ext,
                "-in",
                &format!("{name}.csr"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "ca",
            "-config",
            "sub/ca.cnf",
            "-revoke",
            "revoked.pem",
            "-crl_reason",
            "keyCompromise",
        ],
    );
    for ca in ["root", "sub"] {
        openssl(
            dir,
            &[
                "ca",
                "-config",
                &format!("{ca}/ca.cnf"),
                "-gencrl",
                "-out",
                &format!("{ca}.crl.pem"),
            ],
        );
        openssl(
            dir,
            &[
                "crl",
                "-in",
                &format!("{ca}.crl.pem"),
                "-outform",
                "DER",
                "-out",
                &format!("{ca}.crl"),
            ],
        );
    }
    let chain = std::fs::read_to_string(dir.join("server.pem")).unwrap()
        + &std::fs::read_to_string(dir.join("sub/ca.pem")).unwrap();
    std::fs::write(dir.join("server-chain.pem"), chain).unwrap();
}

/// A careful production config over the openssl PKI: `check --strict` has nothing to
/// say; `inspect-cert` and `fhirgate client` judge the revoked certificate by its CRL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_pki_production_config_checks_clean_and_refusals_are_explained() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    openssl_pki(dir);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let yaml = format!(
        "environment: production
listeners: [{{address: '127.0.0.1:{port}'}}]
tls:
  server_cert: server-chain.pem
  server_key: server.key
  trust_bundles:
    - name: test-nhs
      ca_files: [root/ca.pem, sub/ca.pem]
      crl_files: [sub.crl, root.crl]
  revocation: {{scope: chain, unknown_status: deny, enforce_crl_expiry: true}}
upstream: {{url: 'http://127.0.0.1:9'}}
auth: {{mode: jwt, jwks_uri: 'https://auth.example.nhs.uk/jwks', expected_issuer: 'https://auth.example.nhs.uk', expected_audience: 'https://fhir.example.nhs.uk'}}
routes:
  - {{name: meta, path_prefix: /metadata, token: none}}
  - {{name: all, path_prefix: /}}
"
    );
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, &yaml).unwrap();
    let c = cfg.display().to_string();
    let p = |n: &str| dir.join(n).display().to_string();
    let (ok, out, err) = fhirgate(&["check", "--strict", "--config", &c]);
    assert!(ok, "{out}{err}");
    assert!(!err.contains("warning:"), "{err}");
    assert!(
        out.contains("revocation: scope=chain unknown_status=deny enforce_crl_expiry=true"),
        "{out}"
    );

    let (ok, out, _) = fhirgate(&["inspect-cert", &p("client.pem"), "--config", &c]);
    assert!(ok && out.contains("bundle test-nhs: ACCEPTED"), "{out}");
    let (ok, out, err) = fhirgate(&["inspect-cert", &p("revoked.pem"), "--config", &c]);
    assert!(!ok, "every bundle refuses it: exit 1\n{out}");
    assert!(out.contains("bundle test-nhs: refused (revoked"), "{out}");
    assert!(err.contains("no trust bundle"), "{err}");

    // The gateway itself on this config, and fhirgate client against it.
    let config = fhirgate::config::Config::load(&cfg).unwrap();
    let _gw = fhirgate::server::start(&config)
        .await
        .expect("gateway starts");
    let url = format!("https://localhost:{port}/metadata");
    let client = |who: &'static str| {
        let args: Vec<String> = [
            "client",
            "--no-nhsd",
            "--timeout",
            "10",
            "--cacert",
            &p("root/ca.pem"),
            "--cert",
            &p(&format!("{who}.pem")),
            "--key",
            &p(&format!("{who}.key")),
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
    let (ok, out, err) = client("client").await.unwrap();
    assert!(ok && out.starts_with("HTTP/"), "{out}{err}");
    let (ok, _, err) = client("revoked").await.unwrap();
    assert!(!ok);
    assert!(err.contains("alert certificate revoked"), "{err}");
}
