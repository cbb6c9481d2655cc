//! Config errors name the field; `fhirgate check` behaves like `nginx -t`.

use std::path::Path;
use std::process::Command;

use crate::harness::*;
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

/// `auth.mode: none` is the BaRS receiver model (TLS-MA + NHSD headers, no tokens): it
/// must not turn token checks off silently, so a route still requiring a token is refused.
#[test]
fn auth_mode_none_refuses_token_required_routes() {
    let pki = Pki::new();
    let none = base(&pki).replace("auth:\n  mode: development\n", "auth:\n  mode: none\n");
    assert!(none.contains("mode: none"), "{none}");
    let e = load_err(&none);
    assert!(e.starts_with("routes[0].token: required"), "{e}");
    let ok = none.replace("path_prefix: /\n", "path_prefix: /\n    token: none\n");
    let cfg = Config::from_yaml(&ok, Path::new("/")).expect("every route token: none");
    assert!(cfg.summary().contains("auth: none (no route checks tokens"));
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
    fhirgate::tools::pki::ensure_dev_pki(&dir.path().join("certs/dev")).unwrap();
    fhirgate::tools::devauth::ensure_credentials(&dir.path().join("certs/dev")).unwrap();
    let cfg = Config::from_yaml(&shipped, dir.path()).expect("shipped config.yaml is valid");
    fhirgate::tls::server_tls(&cfg.tls).expect("shipped TLS config builds");
}

#[test]
fn durations_take_humantime_forms_and_errors_name_the_field_with_an_example() {
    let pki = Pki::new();
    let b = base(&pki);
    for (form, secs) in [
        ("2s", 2.0),
        ("500ms", 0.5),
        ("1h 30m", 5400.0),
        ("10 seconds", 10.0),
    ] {
        let cfg = Config::from_yaml(
            &b.replace(
                "handshake_timeout: 2s",
                &format!("handshake_timeout: {form}"),
            ),
            Path::new("/"),
        )
        .unwrap_or_else(|e| panic!("{form}: {e}"));
        assert_eq!(cfg.tls.handshake_timeout.as_secs_f64(), secs, "{form}");
    }
    for (from, to, field) in [
        (
            "handshake_timeout: 2s",
            "handshake_timeout: ten",
            "tls.handshake_timeout",
        ),
        (
            "idle_timeout: 5s",
            "idle_timeout: 5 parsecs",
            "limits.idle_timeout",
        ),
        ("idle_timeout: 5s", "idle_timeout: 5", "limits.idle_timeout"),
        (
            "mode: development\n",
            "mode: development\n  cache: {max_ttl: five}\n",
            "auth.cache.max_ttl",
        ),
    ] {
        let e = load_err(&b.replace(from, to));
        assert!(
            e.starts_with(&format!(
                "{field}: expected a duration like 10s, 500ms or 1h, got "
            )),
            "{to}: {e}"
        );
    }
}

/// README, Configuration: a duration that is not one "is refused as `limits.idle_timeout:
/// expected a duration like 10s, 500ms or 1h, got …`", and every validation error names
/// the field path. That holds for every duration of every section, the CRL, service
/// level, rate-limit and telemetry ones too (they were parsed apart and reported as
/// `(yaml)` with serde's bare "expected a duration").
#[test]
fn every_duration_error_names_its_field() {
    let pki = Pki::new();
    let b = base(&pki);
    let tls = |kv: &str| {
        b.replace(
            "handshake_timeout: 2s\n",
            &format!("handshake_timeout: 2s\n  revocation: {{{kv}}}\n"),
        )
    };
    let top = |section: &str| {
        b.replace(
            "environment: development\n",
            &format!("environment: development\n{section}\n"),
        )
    };
    let route = |kv: &str| {
        b.replace(
            "path_prefix: /\n",
            &format!("path_prefix: /\n    service_levels: {{{kv}}}\n"),
        )
    };
    for (yaml, field) in [
        (tls("warn_before: a day"), "tls.revocation.warn_before"),
        (
            tls("refresh_interval: hourly"),
            "tls.revocation.refresh_interval",
        ),
        (tls("fetch_timeout: 10"), "tls.revocation.fetch_timeout"),
        (
            top("service_levels: {response_timeout: 5 secs please}"),
            "service_levels.response_timeout",
        ),
        (
            route("response_timeout: five"),
            "routes[0].service_levels.response_timeout",
        ),
        (
            route("rate_limit: {rate: 1, per: often}"),
            "routes[0].service_levels.rate_limit.per",
        ),
        (
            top("telemetry: {export_interval: 5x}"),
            "telemetry.export_interval",
        ),
        (
            top("telemetry: {export_timeout: 1}"),
            "telemetry.export_timeout",
        ),
    ] {
        let e = load_err(&yaml);
        assert!(
            e.starts_with(&format!(
                "{field}: expected a duration like 10s, 500ms or 1h, got "
            )),
            "{field}: {e}"
        );
    }
    // The same forms as every other duration; an optional one may be absent or null.
    let ok = |yaml: &str| {
        Config::from_yaml(yaml, Path::new("/")).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    };
    let c = ok(&top(
        "service_levels: {response_timeout: 1m 30s, rate_limit: {rate: 2, per: 500ms}}",
    ));
    assert_eq!(
        c.service_levels.response_timeout,
        Some(std::time::Duration::from_secs(90))
    );
    assert_eq!(
        c.service_levels.rate_limit.as_ref().map(|r| r.per),
        Some(std::time::Duration::from_millis(500))
    );
    assert_eq!(
        ok(&top("service_levels: {response_timeout: ~}"))
            .service_levels
            .response_timeout,
        None
    );
    assert_eq!(ok(&b).service_levels.response_timeout, None);
    let c = ok(&tls(
        "warn_before: 2h, refresh_interval: 30m, fetch_timeout: 3s",
    ));
    assert_eq!(
        c.tls.revocation.warn_before,
        std::time::Duration::from_secs(7200)
    );
}

/// Intervals that bound how often the gateway calls the authorisation server cannot be
/// zero: `discovery_refresh: 0s` re-ran discovery in a loop without pause (a busy task
/// and a request stream at the server), `jwks_min_refetch: 0s` let every token naming an
/// unknown `kid` fetch the JWKS (the load the setting exists to bound, jwt.rs), and
/// `jwks_max_age: 0s` made every key set stale as soon as fetched, so no verdict was
/// ever cached and each request waited on a fetch.
#[test]
fn auth_intervals_of_zero_are_refused() {
    let pki = Pki::new();
    let jwt = |kv: &str| {
        base(&pki).replace(
            "auth:\n  mode: development\n",
            &format!(
                "auth:\n  mode: jwt\n  issuer: https://as.example\n  expected_issuer: https://as.example\n  expected_audience: fhirgate\n{kv}"
            ),
        )
    };
    Config::from_yaml(&jwt(""), Path::new("/")).expect("jwt mode with the defaults");
    for field in ["discovery_refresh", "jwks_min_refetch", "jwks_max_age"] {
        let e = load_err(&jwt(&format!("  {field}: 0s\n")));
        assert!(
            e.starts_with(&format!("auth.{field}: must be greater than zero")),
            "{field}: {e}"
        );
        Config::from_yaml(&jwt(&format!("  {field}: 1s\n")), Path::new("/"))
            .unwrap_or_else(|e| panic!("{field}: 1s: {e}"));
    }
}

/// RFC 9110 §4.2.4: a sender MUST NOT generate userinfo in an http(s) target URI, so
/// `user:password@` in a configured URL is never sent (the upstream or authorisation
/// server never sees it) and only puts a secret where `fhirgate check` prints it
/// (`upstream: …`, `auth: … via …`) and logs show it. Each URL field refuses it, naming
/// the field, without repeating the secret.
#[test]
fn urls_with_credentials_are_refused() {
    let pki = Pki::new();
    let b = base(&pki);
    let auth = |kv: &str| {
        b.replace(
            "auth:\n  mode: development\n",
            &format!("auth:\n  mode: jwt\n{kv}"),
        )
    };
    for (yaml, field) in [
        (
            b.replace("url: http://127.0.0.1:9", "url: http://fhir:S3cret@127.0.0.1:9"),
            "upstream.url",
        ),
        (
            auth("  issuer: https://gw:S3cret@as.example\n"),
            "auth.issuer",
        ),
        (
            auth("  jwks_uri: https://gw:S3cret@as.example/jwks\n"),
            "auth.jwks_uri",
        ),
        (
            b.replace(
                "      crl_files:",
                "      crl_urls: [\"http://u:S3cret@crl.example/sub.crl\"]\n      crl_files:",
            ),
            "tls.trust_bundles[0].crl_urls[0]",
        ),
        (
            b.replace(
                "environment: development\n",
                "environment: development\ntelemetry: {otlp_endpoint: \"http://u:S3cret@127.0.0.1:4318/v1/traces\"}\n",
            ),
            "telemetry.otlp_endpoint",
        ),
    ] {
        let e = load_err(&yaml);
        assert!(
            e.starts_with(&format!("{field}: must not contain user:password@")),
            "{field}: {e}"
        );
        assert!(!e.contains("S3cret"), "{e}");
    }
}

/// `auth.realm` goes into every 401's `WWW-Authenticate: Bearer realm="…"`, a
/// quoted-string (RFC 9110 §11.2, §5.6.4), and RFC 9110 §15.5.2 says a 401 MUST carry
/// that challenge. A realm with a quote, backslash or control character is refused in
/// every auth mode: with `auth.mode: none` (BaRS) the NHSD allow-list's
/// `refusal: unauthorized` sends it too, and a control character used to drop the
/// header from every 401 silently.
#[test]
fn realm_must_fit_its_quoted_string_in_every_mode() {
    let pki = Pki::new();
    let with = |mode: &str, realm: &str| {
        base(&pki)
            .replace(
                "auth:\n  mode: development\n",
                &format!("auth:\n  mode: {mode}\n  realm: {realm}\n"),
            )
            .replace("path_prefix: /\n", "path_prefix: /\n    token: none\n")
    };
    for mode in ["none", "development"] {
        for realm in [r#""a\"b""#, r#""a\\b""#, r#""a\nb""#, r#""a\u0007b""#] {
            let e = load_err(&with(mode, realm));
            assert!(
                e.starts_with("auth.realm: must not contain quotes, backslashes or control"),
                "{mode} {realm}: {e}"
            );
        }
        for realm in ["fhirgate", r#""NHS Trust \u00e9""#, r#""a\tb""#] {
            Config::from_yaml(&with(mode, realm), Path::new("/"))
                .unwrap_or_else(|e| panic!("{mode} {realm}: {e}"));
        }
    }
}

/// README, Configuration: "every validation error names the field path". A value of the
/// wrong type was reported as `(yaml): … invalid u64` or `invalid socket address
/// syntax`: no field, and Rust's type names instead of the config's words.
#[test]
fn type_errors_name_the_field_in_the_configs_words() {
    let pki = Pki::new();
    let b = base(&pki);
    for (from, to, field, words) in [
        (
            "handshake_timeout: 2s\n",
            "handshake_timeout: 2s\n  verify_depth: four\n",
            "tls.verify_depth",
            "expected a whole number",
        ),
        (
            "limits:\n",
            "limits:\n  max_headers: -1\n",
            "limits.max_headers",
            "expected a whole number",
        ),
        (
            "  - address: 127.0.0.1:0",
            "  - address: localhost:8443",
            "listeners[0].address",
            "expected an IP address and port such as 127.0.0.1:8443",
        ),
        (
            "      ca_files: [",
            "      ca_files: x\n      x: [",
            "tls.trust_bundles[0].ca_files",
            "expected a list such as [a, b]",
        ),
        (
            "connect_timeout: 1s\n",
            "connect_timeout: 1s\n  http2: maybe\n",
            "upstream.http2",
            "expected true or false",
        ),
    ] {
        let yaml = b.replacen(from, to, 1);
        assert_ne!(yaml, b, "{from}");
        let e = load_err(&yaml);
        assert!(e.starts_with(&format!("{field}: ")), "{field}: {e}");
        assert!(e.contains(words), "{field}: {e}");
        for rust in [
            "u64",
            "u32",
            "u16",
            "usize",
            "socket address syntax",
            "sequence start",
        ] {
            assert!(!e.contains(rust), "{field}: {e}");
        }
    }
    // An unknown key is named with its path too.
    let e = load_err(&b.replace("connect_timeout: 1s\n", "connect_timeout: 1s\n  bogus: 1\n"));
    assert!(
        e.starts_with("upstream.bogus: ") && e.contains("unknown field `bogus`"),
        "{e}"
    );
}

/// An identity header is set upstream after the client's copies are removed, so its name
/// must not be one HTTP or the gateway already gives a meaning to: under `Content-Length`,
/// `Transfer-Encoding` or `Host` a certificate field would reframe or reroute the request
/// to the upstream (RFC 9110 §7.6.1, §8.6, §7.2), under `Authorization` it would pose as a
/// credential, and under `X-Forwarded-For`, `X-Fhirgate-*`, `NHSD-*` or `X-Request-ID` it
/// would clash with a value the gateway sets or checks.
#[test]
fn identity_header_names_must_be_their_own() {
    let pki = Pki::new();
    for taken in [
        "Content-Length",
        "Transfer-Encoding",
        "Host",
        "Connection",
        "Authorization",
        "Cookie",
        "X-Forwarded-For",
        "Forwarded",
        "X-Fhirgate-Ods-Code",
        "NHSD-Target-Identifier",
        "X-Request-ID",
        "traceparent",
    ] {
        let yaml = format!("{}identity_headers: {{serial: {taken}}}\n", base(&pki));
        let e = load_err(&yaml);
        assert!(
            e.starts_with(&format!(
                "identity_headers.serial: \"{taken}\" already has a meaning"
            )),
            "{taken}: {e}"
        );
    }
    let yaml = format!(
        "{}identity_headers: {{serial: X-SSL-Client-Serial}}\n",
        base(&pki)
    );
    Config::from_yaml(&yaml, Path::new("/")).expect("a name of its own");
}

fn check_cmd(cfg: &Path, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["check", "--config"])
        .arg(cfg)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_speaks_the_yaml_words_not_rust_names() {
    let pki = Pki::new();
    let good = pki.path("good.yaml");
    std::fs::write(&good, base(&pki)).unwrap();
    let (ok, out, err) = check_cmd(&good, &["--strict"]);
    assert!(
        ok,
        "a development config on loopback has nothing to warn about: {err}"
    );
    assert!(out.contains("environment: development\n"), "{out}");
    assert!(
        out.contains("revocation: scope=chain unknown_status=deny enforce_crl_expiry=false"),
        "{out}"
    );
    assert!(out.contains("auth: development (NO TOKEN CHECKS"), "{out}");
    // auth.mode: development checks no tokens, whatever the route says.
    assert!(
        out.contains("token=not checked (auth.mode: development)"),
        "{out}"
    );
    for debug in [
        "Chain",
        "Deny",
        "Required",
        "Development",
        "Introspection",
        "[\"",
    ] {
        assert!(!out.contains(debug), "Rust debug text {debug:?} in:\n{out}");
    }
    let intro = pki.path("intro.yaml");
    std::fs::write(
        &intro,
        base(&pki)
            .replace(
                "auth:\n  mode: development\n",
                "auth:\n  mode: jwt\n  jwks_uri: https://auth.example.nhs.uk/jwks\n",
            )
            .replace(
                "  - name: all\n",
                "  - name: meta\n    path_prefix: /metadata\n    token: none\n  - name: all\n",
            ),
    )
    .unwrap();
    let (ok, out, err) = check_cmd(&intro, &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("/metadata bundles=any subjects=any sans=any token=none"),
        "{out}"
    );
    assert!(
        out.contains("route \"all\": / bundles=any subjects=any sans=any token=required"),
        "{out}"
    );
}

#[test]
fn check_warns_on_risky_settings_and_strict_fails() {
    let pki = Pki::new();
    let risky = pki.path("risky.yaml");
    let crls = format!(
        "      crl_files: [{}, {}]\n",
        pki.path("sub-ca.crl").display(),
        pki.path("root-ca.crl").display()
    );
    // Integration, no CRLs, expiry not enforced, no token checks.
    std::fs::write(
        &risky,
        base(&pki)
            .replace("environment: development", "environment: integration")
            .replace(&crls, "")
            .replace(
                "limits:\n",
                "  revocation: {enforce_crl_expiry: false}\nlimits:\n",
            ),
    )
    .unwrap();
    let (ok, out, err) = check_cmd(&risky, &[]);
    assert!(ok, "warnings alone do not fail: {err}");
    assert!(out.contains("is valid, with 3 warning(s)"), "{out}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(lines.len(), 3, "{err}");
    for (line, field) in lines.iter().zip([
        "tls.trust_bundles[0].crl_files",
        "tls.revocation.enforce_crl_expiry",
        "auth.mode",
    ]) {
        assert!(line.starts_with(&format!("warning: {field}: ")), "{line}");
        assert!(line.contains("; fix: "), "{line}");
    }

    let (ok, _, err) = check_cmd(&risky, &["--strict"]);
    assert!(!ok, "--strict fails on warnings");
    assert!(err.contains("3 warning(s) and --strict"), "{err}");

    let (ok, out, err) = check_cmd(
        &risky,
        &[
            "--strict",
            "--allow",
            "tls.trust_bundles[0]",
            "--allow",
            "tls.revocation.enforce_crl_expiry",
            "--allow",
            "auth.mode",
        ],
    );
    assert!(ok, "every warning accepted knowingly: {err}");
    assert!(out.contains("is valid\n"), "{out}");

    // A private key other users can read.
    use std::os::unix::fs::PermissionsExt;
    let good = pki.path("good.yaml");
    std::fs::write(
        &good,
        base(&pki)
            .replace("environment: development\n", "environment: production\n")
            .replace(
                "auth:\n  mode: development\n",
                "auth:\n  mode: jwt\n  jwks_uri: https://auth.example.nhs.uk/jwks\n  \
                 expected_issuer: https://auth.example.nhs.uk\n  \
                 expected_audience: https://fhir.example.nhs.uk\n",
            )
            .replace(
                "limits:\n",
                "  revocation: {enforce_crl_expiry: true}\nlimits:\n",
            ),
    )
    .unwrap();
    std::fs::set_permissions(
        pki.path("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let (ok, _, err) = check_cmd(&good, &["--strict"]);
    assert!(ok, "{err}");
    std::fs::set_permissions(
        pki.path("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (ok, _, err) = check_cmd(&good, &["--strict"]);
    assert!(!ok);
    assert!(
        err.contains("warning: tls.server_key: ")
            && err.contains("mode 0644")
            && err.contains("fix: chmod 600"),
        "{err}"
    );
}
