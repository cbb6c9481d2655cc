//! Service levels and per-client limits over real mTLS connections to the in-process
//! gateway: the BaRS time budget (408 `REC_TIMEOUT`), unmatched paths (501), the
//! `Accept` version check (406), per-client rate limits (429 + `Retry-After`) kept across
//! reloads, and the per-client connection cap.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::*;
use fhirgate::config::Config;
use http::StatusCode;

/// `auth:` plus extra top-level sections (the harness appends it verbatim).
fn dev_auth_with(extra: &str) -> String {
    format!("auth:\n  mode: development\n{extra}")
}

/// How late past its budget a refusal may arrive. The integration tests share one
/// process and, in CI, two cores with CPU-heavy neighbours (openssl key generation,
/// property tests), so scheduling adds latency a dedicated binary did not see. Still far
/// below the slow upstream (3 s) and authorisation server (5 s) in these tests, so a
/// refusal inside the window can only come from the budget; the lower bound (the budget
/// is not cut short) keeps its 100 ms timer tolerance.
const SLACK_MS: u64 = 300;

/// BaRS non-functional requirements: a request MUST be answered within 5,000 ms, and one
/// that cannot be is answered `408` `REC_TIMEOUT`. Here the budget is 1 s (the config
/// example uses 5 s) and the upstream takes 3 s: the client must get 408 within
/// 1 s (-100 ms/+[`SLACK_MS`]), measured on an already-open connection.
#[tokio::test]
async fn slow_upstream_gets_408_within_the_budget() {
    let pki = Pki::new();
    let (up, _seen) = upstream(UpstreamMode::Slow(Duration::from_secs(3))).await;
    let mut o = Opts::new(up);
    o.auth = dev_auth_with("service_levels:\n  response_timeout: 1s\n");
    // A route with its own budget and status replaces the default.
    o.routes = "  - name: quick\n    path_prefix: /quick\n    service_levels: {response_timeout: 300ms, timeout_status: 504}\n  - name: all\n    path_prefix: /\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let client = tls_client(&pki, Some("client"), H1);

    let (mut tx, _task) = open_h1(&client, addr).await.expect("connect");
    let t = Instant::now();
    let resp = tx
        .send_request(h1_get("/Patient/1"))
        .await
        .expect("response");
    let took = t.elapsed();
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(1000 + SLACK_MS),
        "answered after {took:?}, budget 1 s -100/+{SLACK_MS} ms"
    );
    eprintln!("budget 1 s, upstream 3 s: 408 after {took:?}");
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(j["issue"][0]["details"]["coding"][0]["code"], "REC_TIMEOUT");
    assert_eq!(j["issue"][0]["code"], "timeout");

    let (mut tx, _task) = open_h1(&client, addr).await.expect("connect");
    let t = Instant::now();
    let resp = tx.send_request(h1_get("/quick/1")).await.expect("response");
    let took = t.elapsed();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        took >= Duration::from_millis(200) && took <= Duration::from_millis(300 + SLACK_MS),
        "answered after {took:?}, route budget 300 ms -100/+{SLACK_MS} ms"
    );
    wait_metric(
        &gw,
        "fhirgate_rejections_total{kind=\"response_budget\"}",
        2.0,
    )
    .await;
    gw.shutdown(Duration::from_secs(1)).await;
}

/// Without a budget the old behaviour stays: 504 after `upstream.response_timeout` (2 s
/// in the harness).
#[tokio::test]
async fn no_budget_keeps_504_after_upstream_timeout() {
    let pki = Pki::new();
    let (up, _seen) = upstream(UpstreamMode::Slow(Duration::from_secs(3))).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let client = tls_client(&pki, Some("client"), H1);
    let got = send(&client, addr, get("/Patient/1"))
        .await
        .expect("response");
    got.assert_outcome(504, "REC_TIMEOUT");
    gw.shutdown(Duration::from_secs(1)).await;
}

/// BaRS OperationOutcome examples: an endpoint the receiver has not implemented is
/// `501` `REC_NOT_IMPLEMENTED`. The default stays 403 `REC_FORBIDDEN`.
#[tokio::test]
async fn unmatched_path_is_501_when_configured_403_by_default() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let client = tls_client(&pki, Some("client"), H1);
    let routes = "  - name: meta\n    path_prefix: /metadata\n";

    let mut o = Opts::new(up);
    o.routes = routes.into();
    o.auth = dev_auth_with("service_levels:\n  unmatched: not_implemented\n");
    let (gw, addr) = gateway(&pki, &o).await;
    let got = send(&client, addr, get("/Patient/1"))
        .await
        .expect("response");
    got.assert_outcome(501, "REC_NOT_IMPLEMENTED");
    assert_eq!(got.json()["issue"][0]["code"], "not-supported");
    // A covered path still works, and a route the client may not use is still 403.
    let ok = send(&client, addr, get("/metadata"))
        .await
        .expect("response");
    assert_eq!(ok.status, StatusCode::OK);
    gw.shutdown(Duration::from_secs(1)).await;

    let mut o = Opts::new(up);
    o.routes = routes.into();
    let (gw, addr) = gateway(&pki, &o).await;
    let got = send(&client, addr, get("/Patient/1"))
        .await
        .expect("response");
    got.assert_outcome(403, "REC_FORBIDDEN");
    assert_eq!(seen.count(), 1, "only /metadata reached the upstream");
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn route_forbidden_stays_403_with_not_implemented() {
    let pki = Pki::new();
    let (up, _seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.routes =
        "  - name: ops\n    path_prefix: /ops\n    allow_subjects: [\"*CN=nobody*\"]\n".into();
    o.auth = dev_auth_with("service_levels:\n  unmatched: not_implemented\n");
    let (gw, addr) = gateway(&pki, &o).await;
    let client = tls_client(&pki, Some("client"), H1);
    let got = send(&client, addr, get("/ops/x")).await.expect("response");
    got.assert_outcome(403, "REC_FORBIDDEN");
    gw.shutdown(Duration::from_secs(1)).await;
}

fn accept(path: &str, value: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut r = get(path);
    r.headers_mut()
        .insert("accept", value.parse().expect("header value"));
    r
}

/// BaRS: senders send `Accept: application/fhir+json; version=1.4.0`; a receiver that
/// does not support the version answers `406` `REC_NOT_ACCEPTABLE`.
#[tokio::test]
async fn accept_version_not_supported_is_406() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = dev_auth_with("service_levels:\n  accept_versions: [\"1.4.0\", \"1.3.0\"]\n");
    o.routes = "  - name: any\n    path_prefix: /any\n    service_levels: {accept_versions: []}\n  - name: all\n    path_prefix: /\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let client = tls_client(&pki, Some("client"), H2);

    let got = send(
        &client,
        addr,
        accept("/Patient", "application/fhir+json; version=1.2.0"),
    )
    .await
    .expect("response");
    got.assert_outcome(406, "REC_NOT_ACCEPTABLE");
    let diag = got.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(diag.contains("1.4.0, 1.3.0"), "{diag}");
    assert_eq!(seen.count(), 0, "refused before the upstream");

    for ok in [
        "application/fhir+json; version=1.4.0",
        "application/fhir+json;version=\"1.3.0\"",
        "application/fhir+json",
    ] {
        let got = send(&client, addr, accept("/Patient", ok))
            .await
            .expect("response");
        assert_eq!(got.status, StatusCode::OK, "Accept: {ok}");
    }
    let got = send(&client, addr, get("/Patient"))
        .await
        .expect("response");
    assert_eq!(got.status, StatusCode::OK, "no Accept");
    let got = send(
        &client,
        addr,
        accept("/any/x", "application/fhir+json; version=1.2.0"),
    )
    .await
    .expect("response");
    assert_eq!(got.status, StatusCode::OK, "route with no version check");
    gw.shutdown(Duration::from_secs(1)).await;
}

const LIMITED: &str = "service_levels:\n  rate_limit: {rate: 1, per: 10s, burst: 3}\n";

/// A burst over the limit gets 429 `REC_TOO_MANY_REQUESTS` with `Retry-After`; another
/// client (different certificate) is unaffected.
#[tokio::test]
async fn burst_over_the_limit_is_429_other_client_unaffected() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = dev_auth_with(LIMITED);
    let (gw, addr) = gateway(&pki, &o).await;
    let a = tls_client(&pki, Some("client"), H1);
    let b = tls_client(&pki, Some("second-client"), H2);

    for i in 0..3 {
        let got = send(&a, addr, get("/Patient")).await.expect("response");
        assert_eq!(
            got.status,
            StatusCode::OK,
            "request {i} is inside the burst"
        );
    }
    let got = send(&a, addr, get("/Patient")).await.expect("response");
    got.assert_outcome(429, "REC_TOO_MANY_REQUESTS");
    // RFC 9110 §10.2.3: Retry-After = delay-seconds. One request per 10 s: the next
    // is due in at most 10 s, so 1..=10 whole seconds (rounded up).
    let retry: u64 = got.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("delay-seconds");
    assert!((1..=10).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        seen.count(),
        3,
        "the refused request never reached the upstream"
    );

    let got = send(&b, addr, get("/Patient")).await.expect("response");
    assert_eq!(
        got.status,
        StatusCode::OK,
        "another certificate has its own bucket"
    );
    wait_metric(&gw, "fhirgate_rate_limited_total{route=\"all\"}", 1.0).await;
    assert_eq!(
        metric(&gw, "fhirgate_rate_limited_total{route=\"all\"}"),
        1.0
    );

    // A reload with the same limit keeps the buckets; a changed limit starts afresh.
    let reload = |extra: &str| {
        let mut o2 = Opts::new(up);
        o2.auth = dev_auth_with(extra);
        let yaml = config_yaml(&pki, &o2);
        Config::from_yaml(&yaml, Path::new("/")).expect("config")
    };
    gw.server().reload(&reload(LIMITED)).expect("reload");
    let got = send(&a, addr, get("/Patient")).await.expect("response");
    assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS, "buckets kept");
    gw.server()
        .reload(&reload(
            "service_levels:\n  rate_limit: {rate: 2, per: 10s, burst: 3}\n",
        ))
        .expect("reload");
    let got = send(&a, addr, get("/Patient")).await.expect("response");
    assert_eq!(got.status, StatusCode::OK, "changed limit: fresh buckets");
    gw.shutdown(Duration::from_secs(1)).await;
}

/// A route's own limit is separate from the default one.
#[tokio::test]
async fn route_limit_is_separate_from_default() {
    let pki = Pki::new();
    let (up, _seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = dev_auth_with("service_levels:\n  rate_limit: {rate: 1, per: 1m, burst: 1}\n");
    o.routes = "  - name: meta\n    path_prefix: /metadata\n    service_levels: {rate_limit: {rate: 100, per: 1s}}\n  - name: all\n    path_prefix: /\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let a = tls_client(&pki, Some("client"), H1);
    assert_eq!(
        send(&a, addr, get("/Patient")).await.expect("r").status,
        StatusCode::OK
    );
    assert_eq!(
        send(&a, addr, get("/Patient")).await.expect("r").status,
        StatusCode::TOO_MANY_REQUESTS
    );
    for _ in 0..5 {
        assert_eq!(
            send(&a, addr, get("/metadata")).await.expect("r").status,
            StatusCode::OK
        );
    }
    gw.shutdown(Duration::from_secs(1)).await;
}

/// `limits.max_connections_per_client`: the connection over the cap gets 429 with
/// `Connection: close`; other clients and the first connections are unaffected.
#[tokio::test]
async fn connection_cap_per_client() {
    let pki = Pki::new();
    let (up, _seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.limits = "  max_connections_per_client: 2\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let a = tls_client(&pki, Some("client"), H1);

    let (mut c1, _t1) = open_h1(&a, addr).await.expect("connect");
    let (mut c2, _t2) = open_h1(&a, addr).await.expect("connect");
    for c in [&mut c1, &mut c2] {
        let r = c.send_request(h1_get("/Patient")).await.expect("response");
        assert_eq!(r.status(), StatusCode::OK);
    }
    let got = send(&a, addr, get("/Patient")).await.expect("response");
    got.assert_outcome(429, "REC_TOO_MANY_REQUESTS");
    assert_eq!(got.headers["connection"], "close");
    // The same over HTTP/2 (no Connection header there; the stream still gets 429).
    let a2 = tls_client(&pki, Some("client"), H2);
    let got = send(&a2, addr, get("/Patient")).await.expect("response");
    assert_eq!(got.version, http::Version::HTTP_2);
    got.assert_outcome(429, "REC_TOO_MANY_REQUESTS");
    assert!(got.headers.contains_key("retry-after"));
    wait_metric(&gw, "fhirgate_connections_over_client_cap_total", 1.0).await;

    let b = tls_client(&pki, Some("second-client"), H1);
    let got = send(&b, addr, get("/Patient")).await.expect("response");
    assert_eq!(got.status, StatusCode::OK, "another client is unaffected");
    // The first two still serve.
    let r = c1.send_request(h1_get("/Patient")).await.expect("response");
    assert_eq!(r.status(), StatusCode::OK);

    // Closing one frees a slot.
    drop(c1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = send(&a, addr, get("/Patient")).await.expect("response");
        if got.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn config_errors_name_the_field() {
    let pki = Pki::new();
    let up = "127.0.0.1:9".parse().expect("addr");
    for (extra, routes, want) in [
        (
            "service_levels:\n  timeout_status: 418\n",
            "",
            "service_levels.timeout_status: must be 408, 503 or 504",
        ),
        (
            "service_levels:\n  rate_limit: {rate: 0}\n",
            "",
            "service_levels.rate_limit.rate: must be greater than 0",
        ),
        (
            "",
            "    service_levels: {unmatched: not_implemented}\n",
            "routes[0].service_levels.unmatched: only valid in the top-level",
        ),
        (
            "service_levels:\n  timeout_code: REC_NOPE\n",
            "",
            "service_levels.timeout_code: must be one of REC_TIMEOUT",
        ),
        (
            "service_levels:\n  accept_versions: [\"1.4 .0\"]\n",
            "",
            "service_levels.accept_versions[0]: must be a version",
        ),
        (
            "",
            "  - name: p\n    path_prefix: /Patient\n  - name: q\n    path_prefix: /patient\n",
            "routes[2].path_prefix: another route already has the path prefix \"/patient\"",
        ),
        (
            "telemetry:\n  otlp_endpoint: https://collector.example/v1/traces\n",
            "",
            "telemetry.otlp_endpoint: must be an http:// URL",
        ),
    ] {
        let mut o = Opts::new(up);
        o.auth = dev_auth_with(extra);
        o.routes = format!("  - name: all\n    path_prefix: /\n{routes}");
        let e =
            Config::from_yaml(&config_yaml(&pki, &o), Path::new("/")).expect_err("invalid config");
        assert!(e.to_string().starts_with(want), "{e}");
    }
}

/// Access lines written by the in-process gateway, as JSON, for the whole test binary.
/// The subscriber is process-wide: once a test here installs it, every in-process
/// gateway of the integration binary logs here too, so lookups go by `trace_id`.
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOG.lock().expect("log").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::INFO)
        .with_writer(|| LogWriter)
        .try_init();
}

/// The access line whose `trace_id` is `trace_id`, waiting up to 5 s for it.
async fn access_line(trace_id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&LOG.lock().expect("log")).into_owned();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|j| j["fields"]["trace_id"] == trace_id);
        if let Some(j) = found {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "no access line with trace_id {trace_id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn traceparent_parts(v: &str) -> (String, String, String) {
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!(p.len(), 4, "{v}");
    assert_eq!(p[0], "00", "the gateway sends version 00: {v}");
    (p[1].into(), p[2].into(), p[3].into())
}

/// W3C Trace Context: the gateway continues a valid trace (same trace-id, its own span
/// as the new parent-id, tracestate unchanged), starts a new one for a missing or
/// invalid `traceparent`, and logs the trace id on the access line.
#[tokio::test]
async fn traceparent_is_propagated_upstream_and_logged() {
    capture_logs();
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let client = tls_client(&pki, Some("client"), H2);

    let incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming_parent = "00f067aa0ba902b7";
    let mut r = get("/Patient/1");
    r.headers_mut().insert(
        "traceparent",
        format!("00-{incoming_trace}-{incoming_parent}-01")
            .parse()
            .expect("hv"),
    );
    r.headers_mut().insert(
        "tracestate",
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
            .parse()
            .expect("hv"),
    );
    let got = send(&client, addr, r).await.expect("response");
    assert_eq!(got.status, StatusCode::OK);
    let (_, headers, _) = seen.last();
    let (trace, parent, flags) = traceparent_parts(headers["traceparent"].to_str().expect("ascii"));
    // "the vendor MUST … modify the parent-id" (§3.2.2.4 / §4.2): a hop, same trace.
    assert_eq!(trace, incoming_trace);
    assert_ne!(parent, incoming_parent);
    assert_eq!(parent.len(), 16);
    assert_eq!(flags, "01");
    assert_eq!(
        headers["tracestate"],
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    );
    let line = access_line(incoming_trace).await;
    assert_eq!(line["fields"]["span_id"], parent.as_str(), "{line}");
    assert_eq!(line["fields"]["path"], "/Patient/1");

    // Invalid (uppercase hex): a new trace; the tracestate of the old one is dropped.
    let mut r = get("/Patient/2");
    r.headers_mut().insert(
        "traceparent",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"
            .parse()
            .expect("hv"),
    );
    r.headers_mut()
        .insert("tracestate", "rojo=1".parse().expect("hv"));
    send(&client, addr, r).await.expect("response");
    let (_, headers, _) = seen.last();
    let (trace2, parent2, _) = traceparent_parts(headers["traceparent"].to_str().expect("ascii"));
    assert_ne!(
        trace2.to_ascii_uppercase(),
        "4BF92F3577B34DA6A3CE929D0E0E4736"
    );
    assert!(trace2
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_ne!(trace2, "0".repeat(32));
    assert!(headers.get("tracestate").is_none(), "tracestate dropped");
    let line = access_line(&trace2).await;
    assert_eq!(line["fields"]["span_id"], parent2.as_str());

    // Absent: a new trace too, different from the last.
    send(&client, addr, get("/Patient/3"))
        .await
        .expect("response");
    let (_, headers, _) = seen.last();
    let (trace3, _, _) = traceparent_parts(headers["traceparent"].to_str().expect("ascii"));
    assert_ne!(trace3, trace2);
    access_line(&trace3).await;

    // Refusals are logged with a trace id too.
    let mut r = get("/%2e%2e/x");
    r.headers_mut().insert(
        "traceparent",
        "00-11111111111111111111111111111111-2222222222222222-00"
            .parse()
            .expect("hv"),
    );
    let got = send(&client, addr, r).await.expect("response");
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    let line = access_line("11111111111111111111111111111111").await;
    assert_eq!(line["fields"]["status"], 400);
    gw.shutdown(Duration::from_secs(1)).await;
}

/// The commented-out examples in the shipped config.yaml (service levels, route limits,
/// connection cap) are valid once uncommented, and mean what they say.
#[test]
fn shipped_config_examples_are_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml"))
        .expect("config.yaml");
    fhirgate::tools::pki::ensure_dev_pki(&dir.path().join("certs/dev")).expect("pki");
    fhirgate::tools::devauth::ensure_credentials(&dir.path().join("certs/dev")).expect("creds");
    let mut uncommented = String::new();
    let mut in_example = false;
    for line in shipped.lines() {
        let t = line.trim_start();
        let indent = &line[..line.len() - t.len()];
        let example_start = t.starts_with("# service_levels:")
            || t.starts_with("# max_connections_per_client:")
            || t.starts_with("# telemetry:");
        if example_start {
            in_example = true;
        } else if in_example && !t.starts_with("#   ") {
            in_example = false;
        }
        if in_example {
            uncommented.push_str(indent);
            uncommented.push_str(&t[2..]);
        } else {
            uncommented.push_str(line);
        }
        uncommented.push('\n');
    }
    let cfg = Config::from_yaml(&uncommented, dir.path())
        .unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    let sl = &cfg.service_levels;
    assert_eq!(sl.response_timeout, Some(Duration::from_secs(5)));
    assert_eq!(sl.timeout_status, Some(408));
    assert_eq!(
        sl.unmatched,
        Some(fhirgate::pipeline::service::Unmatched::NotImplemented)
    );
    assert_eq!(
        sl.accept_versions.as_deref(),
        Some(&["1.4.0".to_string()][..])
    );
    assert_eq!(
        sl.rate_limit.as_ref().map(|r| (r.rate, r.burst)),
        Some((10, Some(20)))
    );
    assert_eq!(cfg.limits.max_connections_per_client, 20);
    assert_eq!(
        cfg.telemetry.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4318/v1/traces")
    );
    let fhir = cfg
        .routes
        .iter()
        .find(|r| r.name == "fhir")
        .expect("fhir route");
    assert_eq!(
        fhir.service_levels.rate_limit.as_ref().map(|r| r.rate),
        Some(5)
    );
}

/// What the test's OTLP/HTTP collector received: path, content type, body.
type Export = (String, String, bytes::Bytes);

/// A minimal OTLP/HTTP collector (OTLP spec, "OTLP/HTTP": `POST /v1/traces` with a
/// binary protobuf `ExportTraceServiceRequest`, answered 200 with an
/// `ExportTraceServiceResponse`, here empty).
async fn otlp_collector() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Export>,
) {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let ct = req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let body = http_body_util::BodyExt::collect(req.into_body())
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let _ = tx.send((path, ct, body));
                        let mut r =
                            http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                        r.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/x-protobuf"),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// With `telemetry.otlp_endpoint`, each request's span reaches an OTLP/HTTP collector:
/// the gateway's span id is the parent-id the upstream saw, its parent the caller's
/// span; a trace the caller did not sample is not exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_spans_reach_a_local_collector() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message;

    let (collector, mut exports) = otlp_collector().await;
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = dev_auth_with(&format!(
        "telemetry:\n  otlp_endpoint: http://{collector}/v1/traces\n  service_name: fhirgate-test\n  export_interval: 100ms\n"
    ));
    let (gw, addr) = gateway(&pki, &o).await;
    let client = tls_client(&pki, Some("client"), H1);
    let with_tp = |tp: &str| {
        let mut r = get("/Patient/1");
        r.headers_mut()
            .insert("traceparent", tp.parse().expect("hv"));
        r
    };
    let unsampled = "5bf92f3577b34da6a3ce929d0e0e4736";
    let sampled = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    send(
        &client,
        addr,
        with_tp(&format!("00-{unsampled}-{caller_span}-00")),
    )
    .await
    .expect("response");
    let got = send(
        &client,
        addr,
        with_tp(&format!("00-{sampled}-{caller_span}-01")),
    )
    .await
    .expect("response");
    assert_eq!(got.status, StatusCode::OK);
    let (_, headers, _) = seen.last();
    let (_, gateway_span, _) = traceparent_parts(headers["traceparent"].to_str().expect("ascii"));

    let mut spans = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((path, ct, body))) = tokio::time::timeout(left, exports.recv()).await else {
            panic!("no span of trace {sampled} exported within 10 s; saw {spans:?}");
        };
        assert_eq!(path, "/v1/traces");
        assert_eq!(ct, "application/x-protobuf");
        let req = ExportTraceServiceRequest::decode(body).expect("protobuf");
        let mut hit = None;
        for rs in &req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref())
                .and_then(|v| v.value.clone());
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    spans.push(hex::encode(&s.trace_id));
                    if hex::encode(&s.trace_id) == sampled {
                        hit = Some((s.clone(), service.clone()));
                    }
                }
            }
        }
        if let Some(h) = hit {
            break h;
        }
    };
    let (span, service) = found;
    assert_eq!(service, Some(Value::StringValue("fhirgate-test".into())));
    assert_eq!(
        hex::encode(&span.span_id),
        gateway_span,
        "the parent-id sent upstream"
    );
    assert_eq!(hex::encode(&span.parent_span_id), caller_span);
    assert_eq!(span.kind, 2, "SPAN_KIND_SERVER");
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
    let status = span
        .attributes
        .iter()
        .find(|a| a.key == "http.response.status_code")
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.clone());
    assert_eq!(status, Some(Value::IntValue(200)));
    assert!(
        !spans.contains(&unsampled.to_string()),
        "an unsampled trace was exported: {spans:?}"
    );
    gw.shutdown(Duration::from_secs(1)).await;
}

/// The budget covers the token check too: an authorisation server that takes 5 s still
/// gets the client its 408 within the 1 s budget (-100 ms/+[`SLACK_MS`]).
#[tokio::test]
async fn budget_covers_a_slow_token_check() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    stub.set(AsFault::Slow);
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = stub.auth_yaml(
        &pki,
        "  timeout: 10s\nservice_levels:\n  response_timeout: 1s\n",
    );
    // The stub's own `timeout: 1s` line comes first; make the AS timeout longer than the
    // budget so the budget is what fires.
    o.auth = o.auth.replacen("  timeout: 1s\n", "", 1);
    let (gw, addr) = gateway(&pki, &o).await;
    let client = tls_client(&pki, Some("client"), H1);
    let (mut tx, _task) = open_h1(&client, addr).await.expect("connect");
    let mut req = h1_get("/Patient/1");
    req.headers_mut()
        .insert("authorization", "Bearer good-slow".parse().expect("hv"));
    let t = Instant::now();
    let resp = tx.send_request(req).await.expect("response");
    let took = t.elapsed();
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(1000 + SLACK_MS),
        "answered after {took:?}, budget 1 s -100/+{SLACK_MS} ms"
    );
    eprintln!("budget 1 s, token check 5 s: 408 after {took:?}");
    assert_eq!(seen.count(), 0, "nothing was forwarded");
    gw.shutdown(Duration::from_secs(1)).await;
}

/// `key: client_id`: the limit follows the token's client, whichever certificate
/// carries it; a fingerprint-keyed limit is checked before the token, so refused
/// requests cost no introspection.
#[tokio::test]
async fn rate_limit_keys_client_id_and_fingerprint() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (up, _seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.auth = stub.auth_yaml(
        &pki,
        "service_levels:\n  rate_limit: {rate: 1, per: 1m, burst: 2, key: client_id}\n",
    );
    o.routes = "  - name: meta\n    path_prefix: /metadata\n    token: none\n    service_levels: {rate_limit: {rate: 1, per: 1m, burst: 1}}\n  - name: all\n    path_prefix: /\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let a = tls_client(&pki, Some("client"), H1);
    let b = tls_client(&pki, Some("second-client"), H1);
    // The stub gives every `good*` token client_id "sender-1".
    let got = send(&a, addr, bearer("/Patient", "good-1"))
        .await
        .expect("r");
    assert_eq!(got.status, StatusCode::OK);
    let got = send(&b, addr, bearer("/Patient", "good-2"))
        .await
        .expect("r");
    assert_eq!(got.status, StatusCode::OK);
    let got = send(&b, addr, bearer("/Patient", "good-3"))
        .await
        .expect("r");
    got.assert_outcome(429, "REC_TOO_MANY_REQUESTS");
    assert!(got.headers.contains_key("retry-after"));

    // Fingerprint-keyed route: the second request is refused before any token check.
    assert_eq!(
        send(&a, addr, get("/metadata")).await.expect("r").status,
        StatusCode::OK
    );
    let calls = stub.calls();
    let got = send(&a, addr, bearer("/metadata", "bad-token"))
        .await
        .expect("r");
    got.assert_outcome(429, "REC_TOO_MANY_REQUESTS");
    assert_eq!(
        stub.calls(),
        calls,
        "no introspection for a rate-limited request"
    );
    wait_metric(&gw, "fhirgate_rate_limited_total{route=\"meta\"}", 1.0).await;
    wait_metric(&gw, "fhirgate_rate_limited_total{route=\"all\"}", 1.0).await;
    gw.shutdown(Duration::from_secs(1)).await;
}
