//! NHSD-* header enforcement through the running gateway over real mTLS.

use std::time::Duration;

use crate::harness::*;
use bytes::Bytes;
use fhirgate::pipeline::nhsd::{self, example_headers};
use http::{Request, StatusCode};
use http_body_util::Full;

const NHSD: &str = "nhsd:\n  exempt_paths: [/metadata, /MessageDefinition]\n";

fn routes() -> String {
    [
        "  - name: capabilities",
        "    path_prefix: /metadata",
        "  - name: definitions",
        "    path_prefix: /MessageDefinition",
        "  - name: booking",
        "    path_prefix: /Slot",
        "    nhsd:",
        "      end_user_organisation: required",
        "      requesting_software: optional",
        "      target_identifier: ignored",
        "      allowed_ods_codes: [RYG]",
        "  - name: appointments",
        "    path_prefix: /Appointment",
        "    nhsd:",
        "      target_identifier: ignored",
        "      allowed_ods_codes: [RYG]",
        "      refusal: unauthorized",
        "  - name: fhir",
        "    path_prefix: /",
        "",
    ]
    .join("\n")
}

fn request(path: &str, skip: &[&str], extra: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(path);
    for (k, v) in example_headers() {
        if !skip.contains(&k) {
            b = b.header(k, v);
        }
    }
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn nhsd_headers_are_enforced_forwarded_and_echoed() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.routes = format!("{}{NHSD}", routes());
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H2);

    // Exempt paths need no headers (BaRS guide: the NHSD headers are expected "for each
    // request (excluding /metadata and /MessageDefinition)").
    for p in ["/metadata", "/MessageDefinition/abc"] {
        assert_eq!(
            send(&c, addr, get(p)).await.unwrap().status,
            StatusCode::OK,
            "{p}"
        );
    }
    // But what is sent there is checked all the same: nothing unverified goes upstream.
    let before = seen.count();
    for (k, v) in [
        ("x-request-id", "not-a-uuid"),
        ("x-correlation-id", "42"),
        ("nhsd-end-user-organisation", "bm90IGpzb24="),
    ] {
        let r = Request::get("/metadata")
            .header(k, v)
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(&c, addr, r)
            .await
            .unwrap()
            .assert_outcome(400, "REC_BAD_REQUEST");
    }
    assert_eq!(seen.count(), before, "nothing refused was forwarded");

    // A full valid set is forwarded unchanged, with the verified facts added and any
    // client-sent fact header replaced.
    let got = send(
        &c,
        addr,
        request(
            "/$process-message",
            &[],
            &[("x-fhirgate-ods-code", "SPOOF")],
        ),
    )
    .await
    .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.headers["x-request-id"],
        "c1ab3fba-6bae-4ba4-b257-5a87c44d4a91"
    );
    assert_eq!(
        got.headers["x-correlation-id"],
        "9562466f-c982-4bd5-bb0e-255e9f5e6689"
    );
    let (_, h, _) = seen.last();
    assert_eq!(h["x-fhirgate-ods-code"], "A1001");
    assert_eq!(h["x-fhirgate-software-name"], "Supplier product name");
    assert_eq!(h["x-fhirgate-software-version"], "1.0.0");
    assert_eq!(h["x-fhirgate-target-identifier"], "2000011147");
    let original = example_headers()
        .into_iter()
        .find(|(k, _)| *k == nhsd::END_USER_ORGANISATION)
        .unwrap()
        .1;
    assert_eq!(
        h[nhsd::END_USER_ORGANISATION],
        original.as_str(),
        "original header forwarded"
    );

    // Each missing required header is named in a 400 OperationOutcome; ids are echoed.
    let before = seen.count();
    for missing in [
        nhsd::TARGET_IDENTIFIER,
        nhsd::END_USER_ORGANISATION,
        nhsd::REQUESTING_SOFTWARE,
        nhsd::CORRELATION_ID,
    ] {
        let got = send(&c, addr, request("/Patient/1", &[missing], &[]))
            .await
            .unwrap();
        got.assert_outcome(400, "REC_BAD_REQUEST");
        let j = got.json();
        // The BaRS failure scenarios code a missing X-Request-Id / X-Correlation-Id as
        // "400 | REC_BAD_REQUEST | invalid"; a missing NHSD header is `required`.
        let code = if missing == nhsd::CORRELATION_ID {
            "invalid"
        } else {
            "required"
        };
        assert_eq!(j["issue"][0]["code"], code, "{missing}");
        let diag = j["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(diag.contains(missing), "{diag}");
        assert_eq!(
            got.headers["x-request-id"],
            "c1ab3fba-6bae-4ba4-b257-5a87c44d4a91"
        );
    }

    // Malformed values: named, never echoed.
    let evil = "PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg"; // unpadded Base64 of "<script>alert(1)</script>"
    let got = send(
        &c,
        addr,
        request(
            "/Patient/1",
            &[nhsd::END_USER_ORGANISATION],
            &[(nhsd::END_USER_ORGANISATION, evil)],
        ),
    )
    .await
    .unwrap();
    got.assert_outcome(400, "REC_BAD_REQUEST");
    let body = String::from_utf8_lossy(&got.body).to_string();
    assert!(
        body.contains(nhsd::END_USER_ORGANISATION) && !body.contains(evil),
        "{body}"
    );
    let got = send(
        &c,
        addr,
        request(
            "/Patient/1",
            &[nhsd::REQUEST_ID],
            &[(nhsd::REQUEST_ID, "1234")],
        ),
    )
    .await
    .unwrap();
    got.assert_outcome(400, "REC_BAD_REQUEST");
    assert_eq!(got.json()["issue"][0]["code"], "value");
    assert_eq!(
        seen.count(),
        before,
        "refused requests never reach the upstream"
    );

    // Per-route policy: /Slot ignores the target, requires an allowed ODS code.
    let got = send(&c, addr, request("/Slot", &[nhsd::TARGET_IDENTIFIER], &[]))
        .await
        .unwrap();
    got.assert_outcome(403, "REC_FORBIDDEN");
    assert!(got.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("ODS code"));
    // The BaRS coding of the same refusal, 401 REC_UNAUTHORIZED, with the challenge RFC
    // 9110 §15.5.2 requires: "The server generating a 401 response MUST send a
    // WWW-Authenticate header field containing at least one challenge".
    let got = send(
        &c,
        addr,
        request("/Appointment", &[nhsd::TARGET_IDENTIFIER], &[]),
    )
    .await
    .unwrap();
    got.assert_outcome(401, "REC_UNAUTHORIZED");
    let challenge = got.headers["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Bearer realm=\""), "{challenge}");
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn without_an_nhsd_section_headers_are_not_required() {
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let c = tls_client(&pki, Some("client"), H1);
    assert_eq!(
        send(&c, addr, get("/Patient/1")).await.unwrap().status,
        StatusCode::OK
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Three things a client sends that the upstream must not get unchecked, or get back:
/// a route's own allow-list applies on an exempt path as written; a header the route
/// says is `ignored` is removed, not passed on unread ("nothing unverified is passed
/// on"); and an `X-Request-ID` refused as not a UUID is not mirrored back on the
/// refusal (SECURITY.md: "never the offending header value echoed back"; the BaRS API
/// gives the response's `X-Request-Id` as `format: uuid`).
#[tokio::test]
async fn route_blocks_hold_on_exempt_paths_and_nothing_unread_is_forwarded_or_echoed() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.routes = [
        "  - name: definitions",
        "    path_prefix: /MessageDefinition",
        "    nhsd:",
        "      allowed_ods_codes: [RYG]",
        "  - name: booking",
        "    path_prefix: /Slot",
        "    nhsd:",
        "      target_identifier: ignored",
        "  - name: fhir",
        "    path_prefix: /",
        NHSD,
    ]
    .join("\n");
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let before = seen.count();
    send(&c, addr, get("/MessageDefinition"))
        .await
        .unwrap()
        .assert_outcome(400, "REC_BAD_REQUEST");
    let got = send(&c, addr, request("/MessageDefinition", &[], &[]))
        .await
        .unwrap();
    got.assert_outcome(403, "REC_FORBIDDEN");
    assert_eq!(seen.count(), before, "the route's allow-list held");
    // `nhsd.headers` is still relaxed on exempt paths without a block of their own.
    assert_eq!(
        send(&c, addr, get("/metadata")).await.unwrap().status,
        StatusCode::OK
    );

    let got = send(
        &c,
        addr,
        request(
            "/Slot",
            &[nhsd::TARGET_IDENTIFIER],
            &[(nhsd::TARGET_IDENTIFIER, "!!not-base64{\"value\":\"OTHER\"}")],
        ),
    )
    .await
    .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    let (_, h, _) = seen.last();
    assert!(
        h.get(nhsd::TARGET_IDENTIFIER).is_none(),
        "an ignored header reached the upstream unread"
    );
    assert!(
        h.get(nhsd::END_USER_ORGANISATION).is_some(),
        "checked ones go on"
    );

    let got = send(
        &c,
        addr,
        request(
            "/Patient/1",
            &[nhsd::REQUEST_ID],
            &[(nhsd::REQUEST_ID, "<img/src=x>")],
        ),
    )
    .await
    .unwrap();
    got.assert_outcome(400, "REC_BAD_REQUEST");
    assert!(
        got.headers.get(nhsd::REQUEST_ID).is_none(),
        "refused id echoed"
    );
    gw.shutdown(Duration::from_secs(2)).await;
}
