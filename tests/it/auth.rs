//! Bearer-token stage through the running gateway, against an in-process stub
//! authorisation server on 127.0.0.1 that can be made to misbehave.

use std::time::Duration;

use crate::harness::*;
use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

fn basic_auth(stub: &StubAs, pki: &Pki, extra: &str) -> String {
    let secret = pki.path("client-secret");
    std::fs::write(&secret, "s3cret:with+chars\n").unwrap();
    format!(
        "auth:\n  mode: introspection\n  introspection_endpoint: http://{}/introspect\n  \
         client_auth:\n    method: client_secret_basic\n    client_id: fhirgate-gw\n    client_secret_file: {}\n  \
         retries: 1\n  retry_backoff: 50ms\n{extra}",
        stub.addr,
        secret.display()
    )
}

const ROUTES: &str = "  - name: capabilities\n    path_prefix: /metadata\n    token: none\n  - name: all\n    path_prefix: /\n";

fn with_token(method: http::Method, path: &str, token: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn tokens_are_introspected_checked_and_forwarded() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = basic_auth(&stub, &pki, "");
    o.routes = ROUTES.into();
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let get = |t: Option<&'static str>| with_token(http::Method::GET, "/Patient/1", t);

    // Exempt route: no token needed, no introspection.
    let got = send(&c, addr, with_token(http::Method::GET, "/metadata", None))
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);

    // Missing: 401 with a bare Bearer challenge.
    let got = send(&c, addr, get(None)).await.unwrap();
    got.assert_outcome(401, "REC_UNAUTHORIZED");
    assert_eq!(got.headers["www-authenticate"], "Bearer realm=\"fhirgate\"");
    // Another scheme counts as no bearer token.
    let req = Request::get("/Patient/1")
        .header("authorization", "Basic dTpw")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(&c, addr, req)
        .await
        .unwrap()
        .assert_outcome(401, "REC_UNAUTHORIZED");
    assert_eq!(stub.calls(), 0);

    // Valid: forwarded with the verified facts; the gateway authenticated with Basic.
    let got = send(&c, addr, get(Some("good-token"))).await.unwrap();
    assert_eq!(
        got.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&got.body)
    );
    let (_, h, _) = seen.last();
    assert_eq!(h["x-fhirgate-client-id"], "bars-sender-1");
    assert_eq!(h["x-fhirgate-scopes"], "system/*.* openid");
    assert_eq!(h["x-fhirgate-sub"], "bars-sender-1");
    let auth = stub.last_auth().unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.strip_prefix("Basic ").unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(decoded).unwrap(),
        "fhirgate-gw:s3cret%3Awith%2Bchars"
    );
    let form = stub.last_form();
    assert_eq!(form["token"], "good-token");
    assert_eq!(form["token_type_hint"], "access_token");

    // Cached: no second introspection.
    let calls = stub.calls();
    assert_eq!(
        send(&c, addr, get(Some("good-token")))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    assert_eq!(stub.calls(), calls);

    // Inactive / unknown / expired: 403 invalid_token (regional IUA rule).
    for t in ["garbage", "expired-token"] {
        let got = send(&c, addr, get(Some(t))).await.unwrap();
        got.assert_outcome(403, "REC_FORBIDDEN");
        assert_eq!(
            got.headers["www-authenticate"],
            "Bearer realm=\"fhirgate\", error=\"invalid_token\""
        );
    }
    // Malformed bearer syntax is refused without asking the server. RFC 6750 §3.1:
    // "invalid_request ... or is otherwise malformed. The resource server SHOULD respond
    // with the HTTP 400 (Bad Request) status code."
    let calls = stub.calls();
    let req = Request::get("/Patient/1")
        .header("authorization", "Bearer a b")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&c, addr, req).await.unwrap();
    got.assert_outcome(400, "REC_BAD_REQUEST");
    got.assert_challenge("invalid_request");
    assert_eq!(stub.calls(), calls);

    // Scope: read-only token may read, not create.
    assert_eq!(
        send(&c, addr, get(Some("readonly-token")))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    let got = send(
        &c,
        addr,
        with_token(http::Method::POST, "/Patient", Some("readonly-token")),
    )
    .await
    .unwrap();
    got.assert_outcome(403, "REC_FORBIDDEN");
    assert_eq!(
        got.headers["www-authenticate"],
        "Bearer realm=\"fhirgate\", error=\"insufficient_scope\", scope=\"system/Patient.write\""
    );
    // A client cannot smuggle token facts upstream.
    let req = Request::get("/Patient/1")
        .header("authorization", "Bearer readonly-token")
        .header("x-fhirgate-client-id", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, addr, req).await.unwrap().status, StatusCode::OK);
    assert_eq!(seen.last().1["x-fhirgate-client-id"], "reader");

    // A search by POST: FHIR R4 §3.1.1.1.1 "the search parameters are passed in the body
    // of the request, encoded as application/x-www-form-urlencoded"; SMART scopes
    // "correspond directly to FHIR resource types", so the body's `_revinclude` needs
    // read on Observation as it would in the query. The body is read once the token is
    // verified (one introspection for the token, the check of the body a cache hit).
    let search = |body: &'static str, ct: &str| {
        Request::post("/Patient/_search")
            .header("authorization", "Bearer readonly-token")
            .header("content-type", ct)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let form = "application/x-www-form-urlencoded";
    let (calls, forwarded) = (stub.calls(), seen.count());
    let got = send(&c, addr, search("name=smith&birthdate=2000-01-01", form))
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    let (path, _, body) = seen.last();
    assert_eq!(path, "/Patient/_search");
    assert_eq!(
        &body[..],
        b"name=smith&birthdate=2000-01-01",
        "the body goes up as sent"
    );
    let got = send(
        &c,
        addr,
        search("name=smith&_revinclude=Observation%3Asubject", form),
    )
    .await
    .unwrap();
    got.assert_outcome(403, "REC_FORBIDDEN");
    assert_eq!(
        got.headers["www-authenticate"],
        "Bearer realm=\"fhirgate\", error=\"insufficient_scope\", \
         scope=\"system/Patient.read system/Observation.read\""
    );
    // Parameters the gateway cannot read (another media type) need `*` read.
    let got = send(&c, addr, search("{}", "application/json"))
        .await
        .unwrap();
    got.assert_outcome(403, "REC_FORBIDDEN");
    // Only a search is checked as one: `_search` after an instance is no FHIR
    // interaction, not a read of Patient/1.
    let mut on_instance = search("name=smith", form);
    *on_instance.uri_mut() = "/Patient/1/_search".parse().unwrap();
    let got = send(&c, addr, on_instance).await.unwrap();
    got.assert_outcome(403, "REC_FORBIDDEN");
    assert_eq!(stub.calls(), calls, "readonly-token was cached already");
    assert_eq!(
        seen.count(),
        forwarded + 1,
        "only the first search forwarded"
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_introspection_for_200_concurrent_requests() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    stub.set(AsFault::None);
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = basic_auth(&stub, &pki, "");
    o.routes = ROUTES.into();
    // Single-flight introspection, not the upstream's speed, is under test: on a busy
    // machine 2 s is too short for 200 concurrent requests.
    o.upstream_extra = "  response_timeout: 10s\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H2);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            send(
                &c,
                addr,
                with_token(http::Method::GET, "/Patient/1", Some("good-token-2")),
            )
            .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status, StatusCode::OK);
    }
    assert_eq!(seen.count(), 200);
    assert_eq!(
        stub.calls(),
        1,
        "200 concurrent requests with one new token cost one introspection"
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn authorisation_server_faults_fail_closed_but_cached_tokens_work() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    // The stub's slow mode answers after 5 s: well past this timeout.
    o.auth = basic_auth(&stub, &pki, "  timeout: 1s\n");
    o.routes = ROUTES.into();
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let get = |t: &'static str| with_token(http::Method::GET, "/Patient/1", Some(t));

    // Warm the cache with a good token.
    assert_eq!(
        send(&c, addr, get("good-token")).await.unwrap().status,
        StatusCode::OK
    );

    // 500s are retried once (retries: 1); malformed answers and timeouts are not.
    for (mode, calls) in [
        (AsFault::Status500, 2),
        (AsFault::Malformed, 1),
        (AsFault::Slow, 1),
    ] {
        stub.set(mode);
        let before = stub.calls();
        let got = send(&c, addr, get("good-token-3")).await.unwrap();
        got.assert_outcome(503, "REC_SERVICE_UNAVAILABLE");
        assert_eq!(stub.calls() - before, calls, "{mode:?}");
        assert!(got.headers.get("www-authenticate").is_none());
        // Errors are not cached as verdicts, and the cached token still works.
        assert_eq!(
            send(&c, addr, get("good-token")).await.unwrap().status,
            StatusCode::OK,
            "{mode:?}"
        );
    }
    // Down: nothing listening any more.
    stub.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = send(&c, addr, get("good-token-3")).await.unwrap();
    got.assert_outcome(503, "REC_SERVICE_UNAVAILABLE");
    assert_eq!(
        send(&c, addr, get("good-token")).await.unwrap().status,
        StatusCode::OK
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn discovery_audience_and_status_options() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    // Discovery instead of an explicit endpoint; 401 for invalid tokens; audience check.
    o.auth = basic_auth(
        &stub,
        &pki,
        "  invalid_token_status: 401\n  expected_audience: fhirgate\n",
    )
    .replace(
        &format!("introspection_endpoint: http://{}/introspect", stub.addr),
        &format!("issuer: http://{}", stub.addr),
    );
    o.routes = ROUTES.into();
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let get = |t: &'static str| with_token(http::Method::GET, "/Patient/1", Some(t));
    wait_until_ok(
        &c,
        addr,
        50,
        "discovered endpoint never became usable",
        || get("good-token"),
    )
    .await;
    let got = send(&c, addr, get("other-aud-token")).await.unwrap();
    got.assert_outcome(401, "REC_UNAUTHORIZED");
    got.assert_challenge("invalid_token");
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn private_key_jwt_client_assertion_is_signed_and_fresh() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(pki.path("gw-jwt.key"), key.serialize_pem()).unwrap();
    let mut o = Opts::new(up);
    o.auth = format!(
        "auth:\n  mode: introspection\n  introspection_endpoint: http://{}/introspect\n  \
         client_auth:\n    method: private_key_jwt\n    client_id: fhirgate-gw\n    private_key_file: {}\n    key_id: gw-key-1\n",
        stub.addr,
        pki.path("gw-jwt.key").display()
    );
    o.routes = ROUTES.into();
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let mut jtis = Vec::new();
    for t in ["good-token", "good-token-2"] {
        assert_eq!(
            send(
                &c,
                addr,
                with_token(http::Method::GET, "/Patient/1", Some(t))
            )
            .await
            .unwrap()
            .status,
            StatusCode::OK
        );
        assert!(
            stub.last_auth().is_none(),
            "no Basic header with private_key_jwt"
        );
        let form = stub.last_form();
        assert_eq!(
            form["client_assertion_type"],
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        );
        let jwt = &form["client_assertion"];
        let header = jsonwebtoken::decode_header(jwt).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some("gw-key-1"));
        let decoding =
            jsonwebtoken::DecodingKey::from_ec_pem(key.public_key_pem().as_bytes()).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&[format!("http://{}/introspect", stub.addr)]);
        v.set_issuer(&["fhirgate-gw"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(jwt, &decoding, &v)
            .expect("valid signature")
            .claims;
        assert_eq!(claims["sub"], "fhirgate-gw");
        let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        assert!(lifetime <= 60, "short-lived assertion");
        jtis.push(claims["jti"].as_str().unwrap().to_owned());
    }
    assert_ne!(jtis[0], jtis[1], "jti is unique per assertion");
    gw.shutdown(Duration::from_secs(2)).await;
}

#[test]
fn development_mode_is_refused_in_production() {
    let pki = Pki::new();
    let o = Opts::new("127.0.0.1:9".parse().unwrap());
    let yaml = config_yaml(&pki, &o).replace("environment: development", "environment: production");
    let e = fhirgate::config::Config::from_yaml(&yaml, std::path::Path::new("/")).unwrap_err();
    assert_eq!(e.field, "auth.mode");
}

/// An ES256 key and its public JWK.
fn es256_key(kid: &str) -> (rcgen::KeyPair, serde_json::Value) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = key.public_key_raw().to_vec();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]), "kid": kid, "alg": "ES256", "use": "sig"});
    (key, jwk)
}

/// An RFC 9068 access token (`typ: at+jwt`).
fn mint(key: &rcgen::KeyPair, kid: &str, claims: serde_json::Value) -> String {
    mint_typ(key, kid, Some("at+jwt"), claims)
}

fn mint_typ(
    key: &rcgen::KeyPair,
    kid: &str,
    typ: Option<&str>,
    claims: serde_json::Value,
) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(kid.into());
    h.typ = typ.map(str::to_owned);
    let k = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    jsonwebtoken::encode(&h, &claims, &k).unwrap()
}

/// A JWT-mode `auth:` block: keys from `stub`'s JWKS, the issuer and audience of
/// [`at_claims`], then `extra` lines.
fn jwt_auth(stub: &StubAs, extra: &str) -> String {
    format!(
        "auth:\n  mode: jwt\n  jwks_uri: http://{}/jwks\n  expected_issuer: https://as.example\n  expected_audience: fhirgate\n{extra}",
        stub.addr
    )
}

/// Every claim RFC 9068 §2.2 requires, for [`jwt_auth`]'s issuer and audience, valid for
/// ten minutes, with `system/*.*`.
fn at_claims(jti: &str) -> serde_json::Value {
    serde_json::json!({"iss": "https://as.example", "aud": "fhirgate", "exp": now() + 600, "iat": now(), "jti": jti, "client_id": "bars-jwt", "sub": "bars-jwt", "scope": "system/*.*"})
}

/// `GET /Patient/1` with bearer token `t`.
fn read_with(t: &str) -> Request<Full<Bytes>> {
    with_token(http::Method::GET, "/Patient/1", Some(t))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_validates_locally_with_jwks_rotation() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (k1, jwk1) = es256_key("k1");
    let (k2, jwk2) = es256_key("k2");
    let (evil, _) = es256_key("k1");
    stub.set_jwks(serde_json::json!({"keys": [jwk1.clone()]}));
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = format!(
        "auth:\n  mode: jwt\n  issuer: http://{}\n  expected_issuer: https://as.example\n  expected_audience: fhirgate\n  jwks_min_refetch: 1s\n  jwks_max_age: 1s\n",
        stub.addr
    );
    o.routes = ROUTES.into();
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let exp = now() + 600;
    let claims = |iss: &str, aud: &str, exp: u64, scope: &str| serde_json::json!({"iss": iss, "aud": aud, "exp": exp, "iat": now(), "jti": format!("{scope} {exp}"), "client_id": "bars-jwt", "sub": "bars-jwt", "scope": scope});
    let good = mint(
        &k1,
        "k1",
        claims("https://as.example", "fhirgate", exp, "system/*.*"),
    );
    let get = |t: String| with_token(http::Method::GET, "/Patient/1", Some(t.as_str()));
    wait_until_ok(&c, addr, 50, "valid JWT never accepted", || {
        get(good.clone())
    })
    .await;
    assert_eq!(seen.last().1["x-fhirgate-client-id"], "bars-jwt");
    assert_eq!(stub.calls(), 0, "jwt mode never calls introspection");
    // RFC 7519 §4.1.3: `aud` may be an array; one of its values naming us is enough.
    let several = mint(
        &k1,
        "k1",
        serde_json::json!({"iss": "https://as.example", "aud": ["billing", "fhirgate"], "exp": exp, "iat": now(), "jti": "several", "client_id": "bars-jwt", "sub": "bars-jwt", "scope": "system/*.*"}),
    );
    assert_eq!(
        send(&c, addr, get(several)).await.unwrap().status,
        StatusCode::OK
    );

    let bad = [
        mint(
            &k1,
            "k1",
            claims("https://as.example", "fhirgate", now() - 120, "system/*.*"),
        ),
        mint(
            &k1,
            "k1",
            claims("https://evil.example", "fhirgate", exp, "system/*.*"),
        ),
        mint(
            &k1,
            "k1",
            claims("https://as.example", "someone-else", exp, "system/*.*"),
        ),
        mint(
            &evil,
            "k1",
            claims("https://as.example", "fhirgate", exp, "system/*.*"),
        ),
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims("https://as.example", "fhirgate", exp, "system/*.*"),
            &jsonwebtoken::EncodingKey::from_secret(b"guessable"),
        )
        .unwrap(),
        "aaa.bbb.ccc".to_string(),
        // RFC 9068 §4: "The resource server MUST validate that the aud claim contains a
        // resource indicator value corresponding to an identifier the resource server
        // expects for itself. The JWT access token MUST be rejected if aud does not
        // contain a resource indicator of the current resource server as a valid
        // audience." A token with no `aud` names no audience, so it is refused too.
        mint(
            &k1,
            "k1",
            serde_json::json!({"iss": "https://as.example", "exp": exp, "iat": now(), "jti": "no-aud", "client_id": "other-api", "sub": "other-api", "scope": "system/*.*"}),
        ),
        // "... MUST validate that the iss claim exactly matches": none is no match.
        mint(
            &k1,
            "k1",
            serde_json::json!({"aud": "fhirgate", "exp": exp, "iat": now(), "jti": "no-iss", "client_id": "other-api", "sub": "other-api", "scope": "system/*.*"}),
        ),
        mint(
            &k1,
            "k1",
            serde_json::json!({"iss": "https://as.example", "aud": ["other-api", "billing"], "exp": exp, "iat": now(), "jti": "other-aud", "client_id": "other-api", "sub": "other-api", "scope": "system/*.*"}),
        ),
    ];
    for t in bad {
        send(&c, addr, get(t))
            .await
            .unwrap()
            .assert_outcome(403, "REC_FORBIDDEN");
    }
    let reader = mint(
        &k1,
        "k1",
        claims("https://as.example", "fhirgate", exp, "system/Patient.read"),
    );
    let got = send(
        &c,
        addr,
        with_token(http::Method::POST, "/Patient", Some(reader.as_str())),
    )
    .await
    .unwrap();
    got.assert_outcome(403, "REC_FORBIDDEN");
    got.assert_challenge("insufficient_scope");

    // Key rotation: a token from a new key makes the gateway fetch the JWKS again (once
    // the 1 s minimum between fetches has passed).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fetches = stub.jwks_fetches();
    stub.set_jwks(serde_json::json!({"keys": [jwk1, jwk2]}));
    let rotated = mint(
        &k2,
        "k2",
        claims("https://as.example", "fhirgate", exp, "system/*.*"),
    );
    assert_eq!(
        send(&c, addr, get(rotated)).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(stub.jwks_fetches(), fetches + 1);
    // Unknown kids right after a fetch do not trigger more fetches (rate limit).
    for i in 0..5 {
        let t = mint(
            &k2,
            &format!("unknown-{i}"),
            claims("https://as.example", "fhirgate", exp, "system/*.*"),
        );
        send(&c, addr, get(t))
            .await
            .unwrap()
            .assert_outcome(403, "REC_FORBIDDEN");
    }
    assert_eq!(stub.jwks_fetches(), fetches + 1);

    // RFC 9068 §4: "The resource server MUST use the keys provided by the authorization
    // server". k1 withdrawn from the set: once the keys held are `jwks_max_age` old, a
    // token signed with it (a new one, so no cached verdict answers) is refused, and k2
    // still verifies.
    stub.set_jwks(serde_json::json!({"keys": [jwk2]}));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let withdrawn = mint(
        &k1,
        "k1",
        claims("https://as.example", "fhirgate", exp + 1, "system/*.*"),
    );
    send(&c, addr, get(withdrawn))
        .await
        .unwrap()
        .assert_outcome(403, "REC_FORBIDDEN");
    assert_eq!(stub.jwks_fetches(), fetches + 2);
    let current = mint(
        &k2,
        "k2",
        claims("https://as.example", "fhirgate", exp + 1, "system/*.*"),
    );
    assert_eq!(
        send(&c, addr, get(current)).await.unwrap().status,
        StatusCode::OK
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

/// OpenID Connect Core 1.0 §10.1: "The verifier knows to go back to the jwks_uri
/// location to re-retrieve the keys when it sees an unfamiliar kid value." Junk kids
/// that keep the `jwks_min_refetch` window busy must not lock a newly rotated key's
/// tokens out beyond that window: an unfamiliar kid refused within it is remembered only
/// until the key set may be fetched again, not for `negative_ttl` (30 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_junk_kids_cannot_lock_out_a_rotated_key() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (k1, jwk1) = es256_key("k1");
    let (k2, jwk2) = es256_key("k2");
    stub.set_jwks(serde_json::json!({"keys": [jwk1.clone()]}));
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = jwt_auth(&stub, "  jwks_min_refetch: 1s\n");
    o.routes = ROUTES.into();
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let claims = at_claims("t-1");
    let get = read_with;
    let good = mint(&k1, "k1", claims.clone());
    assert_eq!(
        send(&c, addr, get(&good)).await.unwrap().status,
        StatusCode::OK
    );

    // A junk kid once the window has passed: the set is fetched, the kid is not in it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fetches = stub.jwks_fetches();
    send(&c, addr, get(&mint(&k1, "junk", claims.clone())))
        .await
        .unwrap()
        .assert_outcome(403, "REC_FORBIDDEN");
    assert_eq!(stub.jwks_fetches(), fetches + 1);

    // The server rotates to k2 just after that fetch: its first token, within the
    // window, is refused on the set just fetched (no fetch: the throttle holds)...
    stub.set_jwks(serde_json::json!({"keys": [jwk1, jwk2]}));
    let rotated = mint(&k2, "k2", claims);
    send(&c, addr, get(&rotated))
        .await
        .unwrap()
        .assert_outcome(403, "REC_FORBIDDEN");
    assert_eq!(stub.jwks_fetches(), fetches + 1);
    // ... and the same token verifies once the window has passed, not 30 s later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        send(&c, addr, get(&rotated)).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(stub.jwks_fetches(), fetches + 2);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// RFC 9068 §4: "The resource server MUST use the keys provided by the authorization
/// server". A key withdrawn from the set stops verifying once the set is fetched again
/// (`jwks_max_age`), for a token already verified and cached with it too; a refresh that
/// fails keeps the last good set in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_a_withdrawn_key_stops_verifying_cached_tokens() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (k1, jwk1) = es256_key("k1");
    let (k2, jwk2) = es256_key("k2");
    stub.set_jwks(serde_json::json!({"keys": [jwk1.clone(), jwk2.clone()]}));
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = jwt_auth(&stub, "  jwks_min_refetch: 1s\n  jwks_max_age: 1s\n");
    o.routes = ROUTES.into();
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let get = read_with;
    let t1 = mint(&k1, "k1", at_claims("t1"));
    let t2 = mint(&k2, "k2", at_claims("t2"));
    for t in [&t1, &t2] {
        assert_eq!(send(&c, addr, get(t)).await.unwrap().status, StatusCode::OK);
    }

    // A refresh that fails (a key set that is not one) keeps the keys held: both still
    // verify.
    stub.set_jwks(serde_json::json!({"keys": "not a key set"}));
    let fetches = stub.jwks_fetches();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for t in [&t1, &t2] {
        assert_eq!(send(&c, addr, get(t)).await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(
        stub.jwks_fetches(),
        fetches + 1,
        "the aged set fetched again"
    );

    // k1 withdrawn: the same t1, verified and cached before, is refused once the set
    // is fetched again; t2 still verifies.
    stub.set_jwks(serde_json::json!({"keys": [jwk2]}));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fetches = stub.jwks_fetches();
    assert_eq!(
        send(&c, addr, get(&t2)).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        stub.jwks_fetches(),
        fetches + 1,
        "the aged set fetched again"
    );
    send(&c, addr, get(&t1))
        .await
        .unwrap()
        .assert_outcome(403, "REC_FORBIDDEN");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// RFC 8705 certificate-bound tokens work only over a connection with that certificate;
/// proof-of-possession tokens the gateway cannot verify (DPoP) are refused.
#[tokio::test]
async fn certificate_bound_tokens_need_their_certificate() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = basic_auth(&stub, &pki, "");
    o.routes = ROUTES.into();
    let (gw, addr) = gateway(&pki, &o).await;
    let der: rustls::pki_types::CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_file(pki.path("client.crt")).unwrap();
    use sha2::Digest;
    let thumb = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&der));
    let token = format!("bound-{thumb}");
    let get = |t: &str| with_token(http::Method::GET, "/Patient/1", Some(t));

    let owner = tls_client(&pki, Some("client"), H1);
    let got = send(&owner, addr, get(&token)).await.unwrap();
    assert_eq!(
        got.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&got.body)
    );
    assert_eq!(seen.last().1["x-fhirgate-client-id"], "bound-sender");

    // The same token from another valid client certificate: refused, nothing forwarded.
    let n = seen.count();
    let thief = tls_client(&pki, Some("second-client"), H1);
    let got = send(&thief, addr, get(&token)).await.unwrap();
    got.assert_outcome(403, "REC_FORBIDDEN");
    got.assert_challenge("invalid_token");
    assert_eq!(seen.count(), n);
    // The verdict is cached per token, the binding checked per request: one call.
    assert_eq!(stub.calls(), 1);

    let got = send(&owner, addr, get("dpop-token")).await.unwrap();
    got.assert_outcome(403, "REC_FORBIDDEN");
    assert_eq!(seen.count(), n);
    drop(gw);
}

/// RFC 9068 §4: the resource server "MUST verify that the typ header value is at+jwt or
/// application/at+jwt and reject tokens carrying any other value" (RFC 7515 §4.1.9:
/// case-insensitive, `application/` optional). `auth.accept_legacy_jwt_typ` admits
/// `JWT` or no `typ` for issuers that predate RFC 9068, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_checks_the_rfc9068_typ() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (k1, jwk1) = es256_key("k1");
    stub.set_jwks(serde_json::json!({"keys": [jwk1]}));
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let claims = at_claims("typ-1");
    let token = |typ: Option<&str>| mint_typ(&k1, "k1", typ, claims.clone());
    let get = |t: String| read_with(&t);
    let c = tls_client(&pki, Some("client"), H1);

    let mut o = Opts::new(up);
    o.routes = ROUTES.into();
    o.auth = jwt_auth(&stub, "");
    let (gw, addr) = gateway(&pki, &o).await;
    for typ in [
        "at+jwt",
        "application/at+jwt",
        "AT+JWT",
        "Application/AT+JWT",
    ] {
        let got = send(&c, addr, get(token(Some(typ)))).await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "typ {typ}");
    }
    for typ in [Some("JWT"), None, Some("dpop+jwt"), Some("secevent+jwt")] {
        let got = send(&c, addr, get(token(typ))).await.unwrap();
        got.assert_outcome(403, "REC_FORBIDDEN");
        got.assert_challenge("invalid_token");
    }
    gw.shutdown(Duration::from_secs(2)).await;

    o.auth = jwt_auth(&stub, "  accept_legacy_jwt_typ: true\n");
    let (gw, addr) = gateway(&pki, &o).await;
    for typ in [Some("at+jwt"), Some("JWT"), None] {
        let got = send(&c, addr, get(token(typ))).await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "legacy typ {typ:?}");
    }
    // An ID token's or a logout token's explicit type stays refused.
    send(&c, addr, get(token(Some("logout+jwt"))))
        .await
        .unwrap()
        .assert_outcome(403, "REC_FORBIDDEN");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// RFC 9068 §2.2 lists the JWT access token's claims: "sub REQUIRED", "client_id
/// REQUIRED", "iat REQUIRED", "jti REQUIRED" (with iss, exp and aud). A token missing
/// one is refused as invalid_token; `accept_legacy_jwt_typ`, for issuers that predate
/// RFC 9068, admits such tokens as it admits their `typ`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_requires_the_rfc9068_claims() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (k1, jwk1) = es256_key("k1");
    stub.set_jwks(serde_json::json!({"keys": [jwk1]}));
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let full = at_claims("c-1");
    let without = |claim: &str| {
        let mut c = full.clone();
        if let Some(o) = c.as_object_mut() {
            o.remove(claim);
        }
        mint(&k1, "k1", c)
    };
    let get = |t: String| read_with(&t);
    let c = tls_client(&pki, Some("client"), H1);
    let missing = ["sub", "client_id", "iat", "jti"];

    let mut o = Opts::new(up);
    o.routes = ROUTES.into();
    o.auth = jwt_auth(&stub, "");
    let (gw, addr) = gateway(&pki, &o).await;
    let got = send(&c, addr, get(mint(&k1, "k1", full.clone())))
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    for claim in missing {
        let got = send(&c, addr, get(without(claim))).await.unwrap();
        got.assert_outcome(403, "REC_FORBIDDEN");
        got.assert_challenge("invalid_token");
    }
    gw.shutdown(Duration::from_secs(2)).await;

    // An older issuer names the client in `azp` and mints no `jti`.
    o.auth = jwt_auth(&stub, "  accept_legacy_jwt_typ: true\n");
    let (gw, addr) = gateway(&pki, &o).await;
    for claim in missing {
        let got = send(&c, addr, get(without(claim))).await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "legacy, without {claim}");
    }
    let mut legacy = full.clone();
    if let Some(m) = legacy.as_object_mut() {
        m.remove("client_id");
        m.remove("jti");
        m.insert("azp".into(), "older-client".into());
    }
    let got = send(&c, addr, get(mint_typ(&k1, "k1", Some("JWT"), legacy)))
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(seen.last().1["x-fhirgate-client-id"], "older-client");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// `o`'s config in environment `env`, parsed and validated.
fn config_in(
    pki: &Pki,
    o: &Opts,
    env: &str,
) -> Result<fhirgate::config::Config, fhirgate::config::ConfigError> {
    let yaml =
        config_yaml(pki, o).replace("environment: development", &format!("environment: {env}"));
    fhirgate::config::Config::from_yaml(&yaml, std::path::Path::new("/"))
}

/// RFC 9068 §4: iss and aud MUST be validated, so `mode: jwt` without
/// `expected_issuer`/`expected_audience` is a config error outside development.
#[test]
fn jwt_mode_needs_issuer_and_audience_outside_development() {
    let pki = Pki::new();
    let mut o = Opts::new("127.0.0.1:9".parse().unwrap());
    o.auth = "auth:\n  mode: jwt\n  jwks_uri: http://127.0.0.1:9/jwks\n".into();
    for env in ["integration", "production"] {
        let e = config_in(&pki, &o, env).unwrap_err();
        assert_eq!(e.field, "auth.expected_issuer", "{env}");
        assert!(e.to_string().contains("RFC 9068"), "{e}");
    }
    config_in(&pki, &o, "development").expect("development may omit them");
    o.auth.push_str("  expected_issuer: https://as.example\n");
    let e = config_in(&pki, &o, "production").unwrap_err();
    assert_eq!(e.field, "auth.expected_audience");
    o.auth.push_str("  expected_audience: fhirgate\n");
    config_in(&pki, &o, "production").expect("both set");
}

/// SMART "Scopes and Launch Context": "If the app has any patient-level scopes, they will
/// be scoped to Patient 123." The gateway cannot confine a `patient/` scope to one
/// patient's compartment, so counting them outside development is a config error.
#[test]
fn patient_scopes_count_only_in_development() {
    let pki = Pki::new();
    let mut o = Opts::new("127.0.0.1:9".parse().unwrap());
    o.auth = "auth:\n  mode: jwt\n  jwks_uri: http://127.0.0.1:9/jwks\n  expected_issuer: https://as.example\n  expected_audience: fhirgate\n  contexts: [system, patient]\n".into();
    for env in ["integration", "production"] {
        let e = config_in(&pki, &o, env).unwrap_err();
        assert_eq!(e.field, "auth.contexts[1]", "{env}: {e}");
        assert!(e.to_string().contains("compartment"), "{e}");
    }
    config_in(&pki, &o, "development").expect("development may count patient scopes");
    o.auth = o.auth.replace("[system, patient]", "[system, user]");
    config_in(&pki, &o, "production").expect("system and user contexts are allowed");
}

/// Only transport failures, 5xx and malformed answers are outages (503). A 400 with an
/// RFC 6749 §5.2 error code is the server's verdict on the token: refused (403) and
/// remembered for `negative_ttl`. RFC 7662 §2.3: "If the protected resource uses OAuth
/// 2.0 client credentials to authenticate to the introspection endpoint and its
/// credentials are invalid, the authorization server responds with an HTTP 401
/// (Unauthorized)": the gateway's own misconfiguration, so 503, never cached, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_refusals_are_verdicts_and_credential_errors_are_outages() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = basic_auth(&stub, &pki, "");
    o.routes = ROUTES.into();
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let get = |t: &'static str| with_token(http::Method::GET, "/Patient/1", Some(t));
    let metric = |sample: &str| -> f64 {
        gw.server()
            .metrics()
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    };

    stub.set(AsFault::Refuse400);
    let before = stub.calls();
    for _ in 0..3 {
        let got = send(&c, addr, get("good-token")).await.unwrap();
        got.assert_outcome(403, "REC_FORBIDDEN");
        got.assert_challenge("invalid_token");
    }
    assert_eq!(stub.calls() - before, 1, "refusal cached, no retries");
    assert_eq!(
        metric("fhirgate_introspections_total{result=\"refused\"}"),
        1.0
    );

    stub.set(AsFault::Bare400);
    let before = stub.calls();
    for _ in 0..2 {
        send(&c, addr, get("good-token-2"))
            .await
            .unwrap()
            .assert_outcome(503, "REC_SERVICE_UNAVAILABLE");
    }
    assert_eq!(stub.calls() - before, 2, "an outage is not cached");

    stub.set(AsFault::Unauthorized401);
    let before = stub.calls();
    for _ in 0..2 {
        send(&c, addr, get("good-token-3"))
            .await
            .unwrap()
            .assert_outcome(503, "REC_SERVICE_UNAVAILABLE");
    }
    assert_eq!(stub.calls() - before, 2, "not retried, not cached");
    assert_eq!(
        metric("fhirgate_introspections_total{result=\"misconfigured\"}"),
        2.0
    );

    // Once the server answers again, the same tokens work (the outage was not cached).
    stub.set(AsFault::None);
    assert_eq!(
        send(&c, addr, get("good-token-3")).await.unwrap().status,
        StatusCode::OK
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A reload that changes nothing the pipeline is built from (a CRL or certificate file
/// rewritten, which the file watcher turns into a reload) keeps the token cache: no burst
/// of introspections after each CRL update. Rotating the gateway's client secret does
/// build a new pipeline, which authenticates with the new secret.
#[tokio::test]
async fn a_reload_keeps_the_token_cache_unless_the_pipeline_changed() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = basic_auth(&stub, &pki, "");
    o.routes = ROUTES.into();
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let get = || with_token(http::Method::GET, "/Patient/1", Some("good-token"));
    let ok = |got: Result<Got, String>| assert_eq!(got.unwrap().status, StatusCode::OK);
    let reload = || {
        let yaml = config_yaml(&pki, &o);
        let cfg = fhirgate::config::Config::from_yaml(&yaml, std::path::Path::new("/")).unwrap();
        gw.server().reload(&cfg).expect("reload");
    };
    ok(send(&c, addr, get()).await);
    assert_eq!(stub.calls(), 1);

    // The SubCA's CRL file rewritten (same content here; a new CRL is the same case for
    // the pipeline) and the config reloaded: the cached answer still serves.
    let crl = pki.path("sub-ca.crl");
    std::fs::write(&crl, std::fs::read(&crl).unwrap()).unwrap();
    reload();
    ok(send(&c, addr, get()).await);
    assert_eq!(stub.calls(), 1, "token cache kept");

    // The client secret rotated: a new pipeline (empty cache), the new secret used.
    std::fs::write(pki.path("client-secret"), "rotated\n").unwrap();
    reload();
    ok(send(&c, addr, get()).await);
    assert_eq!(stub.calls(), 2, "a new pipeline introspects again");
    let auth = stub.last_auth().unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.strip_prefix("Basic ").unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), "fhirgate-gw:rotated");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A gateway with the stub authorisation server and an echoing upstream, for the scope
/// tests below.
async fn scope_gateway() -> (
    Pki,
    StubAs,
    Seen,
    fhirgate::server::Running,
    std::net::SocketAddr,
) {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = basic_auth(&stub, &pki, "");
    o.routes = ROUTES.into();
    let (gw, addr) = gateway(&pki, &o).await;
    (pki, stub, seen, gw, addr)
}

/// FHIR R4 operations: "When an operation has affectsState = false, and the parameters
/// are all primitive datatypes with no extensions (as is the case with the example
/// above), it may be invoked using GET as well", the example being
/// `POST …/Patient/1/$everything`: a write-only token reads nothing by POST either.
#[tokio::test]
async fn operations_by_post_need_read_when_they_read() {
    let (pki, _stub, seen, gw, addr) = scope_gateway().await;
    let c = tls_client(&pki, Some("client"), H1);
    for m in [http::Method::GET, http::Method::POST] {
        let got = send(
            &c,
            addr,
            with_token(m.clone(), "/Patient/1/$everything", Some("writeonly-token")),
        )
        .await
        .unwrap();
        got.assert_outcome(403, "REC_FORBIDDEN");
        assert_eq!(
            got.headers["www-authenticate"],
            "Bearer realm=\"fhirgate\", error=\"insufficient_scope\", scope=\"system/*.read\"",
            "{m}"
        );
    }
    assert_eq!(seen.count(), 0);
    // A BaRS sender's write scopes still post messages.
    let got = send(
        &c,
        addr,
        with_token(
            http::Method::POST,
            "/$process-message",
            Some("writeonly-token"),
        ),
    )
    .await
    .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(seen.last().0, "/$process-message");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// FHIR R4 datatypes: an id is "Any combination of upper- or lower-case ASCII letters
/// ('A'..'Z', and 'a'..'z', numerals ('0'..'9'), '-' and '.'", so `GET /Patient/_search`
/// is no read of a resource: it is a search, and needs `s`.
#[tokio::test]
async fn get_type_search_needs_search() {
    let (pki, _stub, seen, gw, addr) = scope_gateway().await;
    let c = tls_client(&pki, Some("client"), H1);
    for path in ["/Patient?name=smith", "/Patient/_search?name=smith"] {
        let got = send(
            &c,
            addr,
            with_token(http::Method::GET, path, Some("patient-r-token")),
        )
        .await
        .unwrap();
        got.assert_outcome(403, "REC_FORBIDDEN");
        got.assert_challenge("insufficient_scope");
    }
    assert_eq!(seen.count(), 0);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// FHIR R4 §3.1.0.8.1 conditional create: "the server performs a search as specified
/// using its standard search facilities for the resource type" with the `If-None-Exist`
/// parameters, and on "One Match: The server ignores the post and returns 200 OK".
#[tokio::test]
async fn conditional_create_needs_search_for_its_criteria() {
    let (pki, _stub, seen, gw, addr) = scope_gateway().await;
    let c = tls_client(&pki, Some("client"), H1);
    let has = "_has:Observation:patient:code=http://loinc.org|1234-5";
    let create = |token: &str, criteria: Option<&str>| {
        let mut b = Request::post("/Patient")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/fhir+json");
        if let Some(c) = criteria {
            b = b.header("if-none-exist", c);
        }
        b.body(Full::new(Bytes::from_static(
            b"{\"resourceType\":\"Patient\"}",
        )))
        .unwrap()
    };
    // Create alone needs only `c`.
    let got = send(&c, addr, create("create-only-token", None))
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    let forwarded = seen.count();
    for criteria in ["identifier=x", has] {
        let got = send(&c, addr, create("create-only-token", Some(criteria)))
            .await
            .unwrap();
        got.assert_outcome(403, "REC_FORBIDDEN");
        got.assert_challenge("insufficient_scope");
    }
    assert_eq!(seen.count(), forwarded);
    // With search and read on Patient and search on Observation, it goes on as sent.
    let got = send(&c, addr, create("create-search-token", Some(has)))
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(seen.last().1["if-none-exist"], has);
    gw.shutdown(Duration::from_secs(2)).await;
}
