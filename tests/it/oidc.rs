//! The token stage against a real OpenID provider: panva's `oidc-provider` from npm
//! (tests/oidc/provider.mjs), with tokens obtained by client credentials exactly as a
//! BaRS sender would, introspected by the gateway with Basic or private_key_jwt.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::*;
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const OIDC_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oidc");

struct Provider {
    child: Child,
    base: String,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type PlainClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn plain_client() -> PlainClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn post_form(
    c: &PlainClient,
    url: &str,
    basic: (&str, &str),
    form: &str,
) -> (StatusCode, serde_json::Value) {
    let creds =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", basic.0, basic.1));
    let req = Request::post(url)
        .header("authorization", format!("Basic {creds}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(form.to_owned())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

impl Provider {
    /// Installs the npm package if needed, then starts the provider and waits for it.
    async fn start(jwks_path: &std::path::Path) -> Provider {
        Provider::start_with(jwks_path, None).await
    }

    /// As [`Provider::start`], also registering `bars-sender-jwt` with this public JWKS.
    async fn start_with(
        jwks_path: &std::path::Path,
        sender_jwks: Option<&std::path::Path>,
    ) -> Provider {
        if !std::path::Path::new(OIDC_DIR)
            .join("node_modules/oidc-provider")
            .exists()
        {
            let ok = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(OIDC_DIR)
                .status()
                .expect("npm is required for the oidc-provider tests");
            assert!(ok.success(), "npm ci failed in tests/oidc");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("node")
            .arg("provider.mjs")
            .current_dir(OIDC_DIR)
            .env("PORT", port.to_string())
            .env("GW_JWKS", jwks_path)
            .env("SENDER_JWKS", sender_jwks.unwrap_or(jwks_path))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node is required for the oidc-provider tests");
        let p = Provider {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let c = plain_client();
        for _ in 0..100 {
            let url = format!("{}/.well-known/openid-configuration", p.base);
            if let Ok(r) = c.get(url.parse().unwrap()).await {
                if r.status() == StatusCode::OK {
                    return p;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("oidc-provider did not start");
    }

    async fn token(&self, client: &str, secret: &str, scope: &str) -> String {
        let form = format!(
            "grant_type=client_credentials&scope={}",
            form_urlencoded::byte_serialize(scope.as_bytes()).collect::<String>()
        );
        let (status, j) = post_form(
            &plain_client(),
            &format!("{}/token", self.base),
            (client, secret),
            &form,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{j}");
        j["access_token"].as_str().expect("access_token").to_owned()
    }

    /// An RFC 9068 JWT access token (`typ: at+jwt`) for `resource`, by client credentials.
    async fn jwt_token(&self, client: &str, secret: &str, scope: &str, resource: &str) -> String {
        let enc = |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
        let form = format!(
            "grant_type=client_credentials&scope={}&resource={}",
            enc(scope),
            enc(resource)
        );
        let (status, j) = post_form(
            &plain_client(),
            &format!("{}/token", self.base),
            (client, secret),
            &form,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{j}");
        let t = j["access_token"].as_str().expect("access_token").to_owned();
        let h = jsonwebtoken::decode_header(&t).expect("a JWT access token");
        assert_eq!(h.typ.as_deref(), Some("at+jwt"));
        // The claims RFC 9068 §2.2 marks REQUIRED, which `mode: jwt` insists on.
        let payload = t.split('.').nth(1).expect("a payload");
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .expect("base64url"),
        )
        .expect("JSON claims");
        for c in ["iss", "exp", "aud", "sub", "client_id", "iat", "jti"] {
            assert!(claims.get(c).is_some(), "{c} missing from {claims}");
        }
        t
    }

    async fn revoke(&self, client: &str, secret: &str, token: &str) {
        let (status, _) = post_form(
            &plain_client(),
            &format!("{}/token/revocation", self.base),
            (client, secret),
            &format!("token={token}"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }

    async fn introspections(&self) -> u64 {
        let r = plain_client()
            .get(
                format!("{}/test/introspections", self.base)
                    .parse()
                    .unwrap(),
            )
            .await
            .unwrap();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        j["count"].as_u64().unwrap()
    }
}

/// The gateway's signing key and its public JWKS (P-256, uncompressed point).
fn gateway_key(pki: &Pki) -> std::path::PathBuf {
    signing_key(pki, "gw")
}

/// A P-256 key written to `{name}-jwt.key` and its public JWKS to `{name}-jwks.json`.
fn signing_key(pki: &Pki, name: &str) -> std::path::PathBuf {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(pki.path(&format!("{name}-jwt.key")), key.serialize_pem()).unwrap();
    let raw = key.public_key_raw();
    assert_eq!((raw.len(), raw[0]), (65, 4));
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        "kid": format!("{name}-key-1"), "use": "sig", "alg": "ES256"
    }]});
    let path = pki.path(&format!("{name}-jwks.json"));
    std::fs::write(&path, jwks.to_string()).unwrap();
    path
}

fn auth_basic(p: &Provider, pki: &Pki) -> String {
    std::fs::write(pki.path("gw-secret"), "gw-secret\n").unwrap();
    format!(
        "auth:\n  mode: introspection\n  issuer: {}\n  client_auth:\n    method: client_secret_basic\n    client_id: fhirgate-gw\n    client_secret_file: {}\n  expected_issuer: {}\n",
        p.base,
        pki.path("gw-secret").display(),
        p.base
    )
}

fn req(method: Method, path: &str, token: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn wait_ready(c: &tokio_rustls::TlsConnector, addr: SocketAddr, token: &str) {
    // Discovery runs in the background right after start.
    wait_until_ok(c, addr, 100, "gateway never accepted a valid token", || {
        req(Method::GET, "/Patient/1", token)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_openid_provider_tokens_through_the_gateway() {
    let pki = Pki::new();
    let provider = Provider::start(&gateway_key(&pki)).await;
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = auth_basic(&provider, &pki);
    // The 200 concurrent requests below test single-flight introspection, not the
    // upstream's speed: on a busy machine 2 s is too short for all of them.
    o.upstream_extra = "  response_timeout: 10s\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H2);

    let good = provider
        .token("bars-sender", "sender-secret", "system/*.*")
        .await;
    wait_ready(&c, addr, &good).await;
    let (_, h, _) = seen.last();
    assert_eq!(h["x-fhirgate-client-id"], "bars-sender");
    assert_eq!(h["x-fhirgate-scopes"], "system/*.*");
    let got = send(&c, addr, req(Method::POST, "/$process-message", &good))
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);

    // Garbage and revoked tokens: 403 invalid_token.
    send(&c, addr, req(Method::GET, "/Patient/1", "not-a-real-token"))
        .await
        .unwrap()
        .assert_outcome(403, "REC_FORBIDDEN");
    let revoked = provider
        .token("bars-sender", "sender-secret", "system/*.*")
        .await;
    provider
        .revoke("bars-sender", "sender-secret", &revoked)
        .await;
    let got = send(&c, addr, req(Method::GET, "/Patient/1", &revoked))
        .await
        .unwrap();
    got.assert_outcome(403, "REC_FORBIDDEN");
    got.assert_challenge("invalid_token");

    // Wrong scope: a read-only sender may read but not post a message.
    let reader = provider
        .token("bars-reader", "reader-secret", "system/Patient.read")
        .await;
    assert_eq!(
        send(&c, addr, req(Method::GET, "/Patient/1", &reader))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    let got = send(&c, addr, req(Method::POST, "/$process-message", &reader))
        .await
        .unwrap();
    got.assert_outcome(403, "REC_FORBIDDEN");
    got.assert_challenge("insufficient_scope");

    // Expired: a 2-second token works, then is refused once its exp passes, even though
    // it was cached (the cache never outlives exp).
    let short = provider
        .token("bars-short", "short-secret", "system/*.*")
        .await;
    assert_eq!(
        send(&c, addr, req(Method::GET, "/Patient/1", &short))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(3200)).await;
    send(&c, addr, req(Method::GET, "/Patient/1", &short))
        .await
        .unwrap()
        .assert_outcome(403, "REC_FORBIDDEN");

    // 200 concurrent requests with one new token: exactly one introspection.
    let fresh = provider
        .token("bars-sender", "sender-secret", "system/*.*")
        .await;
    let before = provider.introspections().await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (c, t) = (c.clone(), fresh.clone());
        tasks.push(tokio::spawn(async move {
            send(&c, addr, req(Method::GET, "/Patient/1", &t)).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status, StatusCode::OK);
    }
    assert_eq!(
        provider.introspections().await - before,
        1,
        "one introspection for 200 concurrent requests"
    );
    gw.shutdown(Duration::from_secs(2)).await;

    // The same provider, the gateway authenticating with a signed client assertion.
    let mut o = Opts::new(up);
    o.auth = format!(
        "auth:\n  mode: introspection\n  issuer: {}\n  client_auth:\n    method: private_key_jwt\n    client_id: fhirgate-gw-jwt\n    private_key_file: {}\n    key_id: gw-key-1\n",
        provider.base,
        pki.path("gw-jwt.key").display()
    );
    let (gw, addr) = gateway(&pki, &o).await;
    let token = provider
        .token("bars-sender", "sender-secret", "system/*.*")
        .await;
    wait_ready(&c, addr, &token).await;
    send(&c, addr, req(Method::GET, "/Patient/1", "unknown-token"))
        .await
        .unwrap()
        .assert_outcome(403, "REC_FORBIDDEN");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Runs `fhirgate client` with `args`; returns (exit ok, stdout, stderr).
fn fhirgate_client(args: &[&str]) -> (bool, String, String) {
    fhirgate(&[&["client"], args].concat())
}

/// `fhirgate client` as a BaRS sender against the real provider: a token by client
/// credentials (Basic, then private_key_jwt), reused from its cache, through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhirgate_client_gets_tokens_from_the_real_provider() {
    let pki = Pki::new();
    let sender_jwks = signing_key(&pki, "sender");
    let provider = Provider::start_with(&gateway_key(&pki), Some(&sender_jwks)).await;
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = auth_basic(&provider, &pki);
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H2);
    let warm = provider
        .token("bars-sender", "sender-secret", "system/*.*")
        .await;
    wait_ready(&c, addr, &warm).await;
    let before = provider.introspections().await;

    std::fs::write(pki.path("sender-secret"), "sender-secret\n").unwrap();
    let p = |n: &str| pki.path(n).display().to_string();
    let url = format!("https://localhost:{}/Patient/1", addr.port());
    let cache = p("token-cache.json");
    let tls = [
        "--cacert",
        &p("root-ca.crt"),
        "--cert",
        &p("client.crt"),
        "--key",
        &p("client.key"),
    ];
    let mut args: Vec<&str> = tls.to_vec();
    let secret = p("sender-secret");
    args.extend([
        "--issuer",
        &provider.base,
        "--client-id",
        "bars-sender",
        "--client-secret-file",
        &secret,
        "--scope",
        "system/*.*",
        "--token-cache",
        &cache,
        "--nhsd-example",
        "--repeat",
        "3",
        "--fail",
        &url,
    ]);
    let (ok, stdout, stderr) = fhirgate_client(&args);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(stdout.matches(" 200 OK").count(), 3, "{stdout}");
    assert_eq!(
        stderr.matches("token: obtained from").count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.matches("token: cached").count(), 2, "{stderr}");
    assert!(
        stdout.contains("\"resourceType\": \"Parameters\""),
        "{stdout}"
    );
    let (path, headers, _) = seen.last();
    assert_eq!(path, "/Patient/1");
    assert_eq!(headers["x-fhirgate-client-id"], "bars-sender");
    assert!(headers.contains_key("nhsd-end-user-organisation"));
    // One new token through the gateway costs one introspection, however often it is used.
    assert_eq!(provider.introspections().await - before, 1);

    // The cache file is owner-only and a second run reuses its token.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o077,
        0,
        "token cache must not be group/world readable"
    );
    let (ok, _, stderr) = fhirgate_client(&args);
    assert!(ok);
    assert!(!stderr.contains("obtained"), "{stderr}");

    // private_key_jwt: the provider verifies our signed assertion against the JWKS.
    let mut args: Vec<&str> = tls.to_vec();
    let key = p("sender-jwt.key");
    args.extend([
        "--issuer",
        &provider.base,
        "--client-id",
        "bars-sender-jwt",
        "--private-key-file",
        &key,
        "--key-id",
        "sender-key-1",
        "--scope",
        "system/*.*",
        "--fail",
        &url,
    ]);
    let (ok, stdout, stderr) = fhirgate_client(&args);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains(" 200 OK"), "{stdout}");
    assert_eq!(seen.last().1["x-fhirgate-client-id"], "bars-sender-jwt");

    // A wrong secret: the provider's refusal is reported, nothing is sent.
    std::fs::write(pki.path("wrong-secret"), "nope\n").unwrap();
    let n = seen.count();
    let wrong = p("wrong-secret");
    let mut args: Vec<&str> = tls.to_vec();
    args.extend([
        "--issuer",
        &provider.base,
        "--client-id",
        "bars-sender",
        "--client-secret-file",
        &wrong,
        &url,
    ]);
    let (ok, _, stderr) = fhirgate_client(&args);
    assert!(!ok);
    assert!(stderr.contains("invalid_client"), "{stderr}");
    assert_eq!(seen.count(), n);
    drop(gw);
}

const FHIR_AUDIENCE: &str = "https://fhir.example/R4";

/// oidc-provider will not introspect a JWT access token: it answers 400
/// `unsupported_token_type`. That is a verdict on the token (403, remembered for
/// `negative_ttl`), not an outage: a 503 would tell the client to retry and every retry
/// would cost another introspection call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_provider_will_not_introspect_is_refused_and_cached() {
    let pki = Pki::new();
    let provider = Provider::start(&gateway_key(&pki)).await;
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = auth_basic(&provider, &pki);
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let good = provider
        .token("bars-sender", "sender-secret", "system/*.*")
        .await;
    wait_ready(&c, addr, &good).await;

    let jwt = provider
        .jwt_token("bars-sender", "sender-secret", "system/*.*", FHIR_AUDIENCE)
        .await;
    let before = provider.introspections().await;
    let forwarded = seen.count();
    for _ in 0..3 {
        let got = send(&c, addr, req(Method::GET, "/Patient/1", &jwt))
            .await
            .unwrap();
        got.assert_outcome(403, "REC_FORBIDDEN");
        got.assert_challenge("invalid_token");
    }
    assert_eq!(
        provider.introspections().await - before,
        1,
        "the refusal is cached: one introspection for three requests"
    );
    assert_eq!(
        metric(&gw, "fhirgate_introspections_total{result=\"refused\"}"),
        1.0
    );
    assert_eq!(seen.count(), forwarded, "nothing forwarded");
    gw.shutdown(Duration::from_secs(2)).await;

    // The gateway's own credentials are wrong: the provider answers 401 invalid_client
    // (RFC 7662 §2.3). Not the client's fault and not its token's: 503, never cached,
    // counted as a misconfiguration (and logged at ERROR).
    std::fs::write(pki.path("wrong-gw-secret"), "not-the-secret\n").unwrap();
    let mut o = Opts::new(up);
    o.auth = auth_basic(&provider, &pki).replace(
        &pki.path("gw-secret").display().to_string(),
        &pki.path("wrong-gw-secret").display().to_string(),
    );
    let (gw, addr) = gateway(&pki, &o).await;
    let fresh = provider
        .token("bars-sender", "sender-secret", "system/*.*")
        .await;
    let mut got = None;
    for _ in 0..50 {
        let g = send(&c, addr, req(Method::GET, "/Patient/1", &fresh))
            .await
            .unwrap();
        // Until discovery has run, the answer is 503 for another reason.
        if metric(
            &gw,
            "fhirgate_introspections_total{result=\"misconfigured\"}",
        ) >= 1.0
        {
            got = Some(g);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = got.expect("the provider was asked and refused the gateway's credentials");
    got.assert_outcome(503, "REC_SERVICE_UNAVAILABLE");
    let before = provider.introspections().await;
    send(&c, addr, req(Method::GET, "/Patient/1", &fresh))
        .await
        .unwrap()
        .assert_outcome(503, "REC_SERVICE_UNAVAILABLE");
    assert_eq!(provider.introspections().await - before, 1, "not cached");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// RFC 9068 JWT access tokens from the real provider, validated locally (`mode: jwt`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9068_jwt_access_tokens_from_the_real_provider() {
    let pki = Pki::new();
    let provider = Provider::start(&gateway_key(&pki)).await;
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    // RFC 9068 §4: "The issuer identifier for the authorization server ... MUST exactly
    // match the value of the iss claim" and the resource server "MUST validate that the
    // aud claim contains a resource indicator value corresponding to an identifier the
    // resource server expects for itself".
    o.auth = format!(
        "auth:\n  mode: jwt\n  issuer: {b}\n  expected_issuer: {b}\n  expected_audience: {FHIR_AUDIENCE}\n",
        b = provider.base
    );
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let good = provider
        .jwt_token("bars-sender", "sender-secret", "system/*.*", FHIR_AUDIENCE)
        .await;
    wait_ready(&c, addr, &good).await;
    assert_eq!(seen.last().1["x-fhirgate-client-id"], "bars-sender");
    assert!(seen.last().1.get("authorization").is_none());

    let other = provider
        .jwt_token(
            "bars-sender",
            "sender-secret",
            "system/*.*",
            "https://other.example/api",
        )
        .await;
    let opaque = provider
        .token("bars-sender", "sender-secret", "system/*.*")
        .await;
    for t in [other, opaque] {
        let got = send(&c, addr, req(Method::GET, "/Patient/1", &t))
            .await
            .unwrap();
        got.assert_outcome(403, "REC_FORBIDDEN");
        got.assert_challenge("invalid_token");
    }
    assert_eq!(
        provider.introspections().await,
        0,
        "jwt mode never introspects"
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

/// The upstream never receives the client's token unless the route opts in with
/// `forward_token: true`; RFC 6750 §3.1: a token sent by two methods is
/// `invalid_request` (400), and the query string holding it goes nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stay_at_the_gateway_unless_a_route_forwards_them() {
    let pki = Pki::new();
    let provider = Provider::start(&gateway_key(&pki)).await;
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = auth_basic(&provider, &pki);
    o.routes = "  - name: capabilities\n    path_prefix: /metadata\n    token: none\n  - name: legacy\n    path_prefix: /Binary\n    forward_token: true\n  - name: all\n    path_prefix: /\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H2);
    let good = provider
        .token("bars-sender", "sender-secret", "system/*.*")
        .await;
    wait_ready(&c, addr, &good).await;

    // A checked route: the facts go up, the token does not.
    assert_eq!(
        send(&c, addr, req(Method::GET, "/Patient/1?name=x", &good))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    let (path, h, _) = seen.last();
    assert_eq!(path, "/Patient/1?name=x");
    assert!(h.get("authorization").is_none(), "{h:?}");
    assert!(h.get("proxy-authorization").is_none());
    assert_eq!(h["x-fhirgate-client-id"], "bars-sender");

    // A route that opts in gets the header as sent.
    assert_eq!(
        send(&c, addr, req(Method::GET, "/Binary/1", &good))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    assert_eq!(
        seen.last().1["authorization"],
        format!("Bearer {good}").as_str()
    );

    // `token: none`: nothing checked it, nothing forwards it, nor a query token.
    let r = Request::get("/metadata?_format=json&access_token=secret-in-query")
        .header("authorization", "Bearer unchecked")
        .header("proxy-authorization", "Basic dXNlcjpwYXNz")
        .body(Full::new(Bytes::new()))
        .unwrap();
    // Two methods at once is refused even where no token is needed.
    let got = send(&c, addr, r).await.unwrap();
    got.assert_outcome(400, "REC_BAD_REQUEST");
    got.assert_challenge("invalid_request");
    let r = Request::get("/metadata?_format=json&access_token=secret-in-query")
        .header("proxy-authorization", "Basic dXNlcjpwYXNz")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, addr, r).await.unwrap().status, StatusCode::OK);
    let (path, h, _) = seen.last();
    assert_eq!(path, "/metadata?_format=json");
    assert!(h.get("proxy-authorization").is_none());
    let r = Request::get("/metadata")
        .header("authorization", "Bearer unchecked")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, addr, r).await.unwrap().status, StatusCode::OK);
    assert!(seen.last().1.get("authorization").is_none());

    // RFC 6750 §3.1: invalid_request "uses more than one method for including an access
    // token" → 400, before any introspection and without forwarding anything.
    let fresh = provider
        .token("bars-sender", "sender-secret", "system/*.*")
        .await;
    let before = (provider.introspections().await, seen.count());
    let got = send(
        &c,
        addr,
        req(
            Method::GET,
            &format!("/Patient/1?access_token={fresh}"),
            &fresh,
        ),
    )
    .await
    .unwrap();
    got.assert_outcome(400, "REC_BAD_REQUEST");
    got.assert_challenge("invalid_request");
    // The query method alone is not supported: no token, 401.
    let r = Request::get(format!("/Patient/1?access_token={fresh}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(&c, addr, r)
        .await
        .unwrap()
        .assert_outcome(401, "REC_UNAUTHORIZED");
    // RFC 6750 §2.2: the form-encoded body parameter is the third method; with the
    // header too it is invalid_request.
    let form = |path: &str, body: String, token: Option<&str>| {
        let mut r = Request::post(path).header("content-type", "application/x-www-form-urlencoded");
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        r.body(Full::new(Bytes::from(body))).unwrap()
    };
    let got = send(
        &c,
        addr,
        form(
            "/Patient/_search",
            format!("name=x&access_token={fresh}"),
            Some(&fresh),
        ),
    )
    .await
    .unwrap();
    got.assert_outcome(400, "REC_BAD_REQUEST");
    got.assert_challenge("invalid_request");
    // The body is read only once the header's token has been verified (a refused client
    // cannot make the gateway buffer bodies): one introspection, nothing forwarded.
    assert_eq!(provider.introspections().await, before.0 + 1);
    assert_eq!(seen.count(), before.1, "nothing forwarded");
    // A FHIR search by POST with the token in the header only goes up byte for byte.
    let got = send(
        &c,
        addr,
        form(
            "/Patient/_search",
            "name=x&birthdate=2000-01-01".into(),
            Some(&fresh),
        ),
    )
    .await
    .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    let (path, h, body) = seen.last();
    assert_eq!(path, "/Patient/_search");
    assert_eq!(&body[..], b"name=x&birthdate=2000-01-01");
    assert!(h.get("authorization").is_none());
    // Where no token is checked, a body token is removed, not forwarded.
    let got = send(
        &c,
        addr,
        form("/metadata", format!("a=1&access_token={fresh}&b=2"), None),
    )
    .await
    .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    let (_, h, body) = seen.last();
    assert_eq!(&body[..], b"a=1&b=2");
    assert_eq!(h["content-length"], "7");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// The gateway's own credentials rejected by the real provider (401 invalid_client):
/// every uncached token gets 503, and the operator gets one loud ERROR line naming the
/// problem and the config section to fix, not one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_gateway_credentials_are_logged_loudly_once() {
    let pki = Pki::new();
    let provider = Provider::start(&gateway_key(&pki)).await;
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    std::fs::write(pki.path("wrong-gw-secret"), "not-the-secret\n").unwrap();
    let mut o = Opts::new(up);
    o.auth = auth_basic(&provider, &pki).replace(
        &pki.path("gw-secret").display().to_string(),
        &pki.path("wrong-gw-secret").display().to_string(),
    );
    let gw = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg_path = pki.path("config.yaml");
    std::fs::write(
        &cfg_path,
        config_yaml(&pki, &o).replace("127.0.0.1:0", &gw.to_string()),
    )
    .unwrap();
    let log_path = pki.path("gateway.log");
    let mut child = run_gateway(&cfg_path, &log_path, &[]);
    let c = tls_client(&pki, Some("client"), H1);
    let token = provider
        .token("bars-sender", "sender-secret", "system/*.*")
        .await;
    let before = provider.introspections().await;
    let mut answered = 0;
    for _ in 0..100 {
        if let Ok(g) = send(&c, gw, req(Method::GET, "/Patient/1", &token)).await {
            g.assert_outcome(503, "REC_SERVICE_UNAVAILABLE");
            if provider.introspections().await > before {
                answered += 1;
                if answered == 5 {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answered, 5, "the provider was asked");
    assert_eq!(seen.count(), 0);
    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let _ = child.0.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let loud: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("MISCONFIGURATION"))
        .collect();
    assert_eq!(loud.len(), 1, "rate-limited to one line:\n{log}");
    for want in ["ERROR", "invalid_client", "HTTP 401", "auth.client_auth"] {
        assert!(loud[0].contains(want), "{want}: {}", loud[0]);
    }
}
