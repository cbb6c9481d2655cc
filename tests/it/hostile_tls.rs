//! Hostile TLS: every way a client can fail to be a valid NHS TLS-MA client is refused
//! during the handshake, counted in `fhirgate_tls_handshakes_total{result}`, reaches
//! nothing upstream, and leaves the gateway serving good clients.
//!
//! (tests/it/gateway.rs checks the alerts of the stock bad certificates; this file is the
//! full matrix with metrics, both protocol versions, generated certificates, pre-TLS
//! garbage, stalls and legacy protocol versions.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;
use fhirgate::server;
use rcgen::{Issuer, KeyPair};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Presents a fixed chain and key without rustls checking that they belong together (so
/// a test can send an unparsable certificate).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Clone, Copy, Debug)]
enum Version {
    Tls12,
    Tls13,
}

fn versions(v: Version) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS12: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
    static TLS13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match v {
        Version::Tls12 => &TLS12,
        Version::Tls13 => &TLS13,
    }
}

fn roots(pki: &Pki) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.pki.root.cert.as_bytes()).expect("root pem"))
        .expect("root");
    roots
}

/// A client pinned to one TLS version presenting `chain` (or nothing).
fn client_with(
    pki: &Pki,
    v: Version,
    chain: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[&[u8]],
) -> tokio_rustls::TlsConnector {
    let provider = fhirgate::tls::provider();
    let b = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(v))
        .expect("versions")
        .with_root_certificates(roots(pki));
    let mut cfg = match chain {
        Some((chain, key)) => {
            let signer = provider
                .key_provider
                .load_private_key(key)
                .expect("signing key");
            b.with_client_cert_resolver(Arc::new(Fixed(Arc::new(CertifiedKey::new(chain, signer)))))
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

fn stock(pki: &Pki, name: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_file_iter(pki.path(&format!("{name}.crt")))
        .expect("cert file")
        .collect::<Result<_, _>>()
        .expect("cert pem");
    let key = PrivateKeyDer::from_pem_file(pki.path(&format!("{name}.key"))).expect("key");
    (chain, key)
}

const HANDSHAKES: &str = "fhirgate_tls_handshakes_total";

/// Sum of every refused handshake (any result but `ok`).
fn refused_total(gw: &server::Running) -> f64 {
    gw.server()
        .metrics()
        .encode()
        .lines()
        .filter(|l| l.starts_with(HANDSHAKES) && !l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (up to 5 s) until [`refused_total`] reaches `want`: the server counts a refusal a
/// moment after the client has seen it.
async fn wait_refused(gw: &server::Running, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused_total(gw) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_bad_client_certificate_is_refused_counted_and_harmless() {
    watch_panics();
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;

    let now = OffsetDateTime::now_utc();
    let sub = dev_issuer("fhirgate DEV SubCA", &pki.pki.sub_ca.key);
    let root = dev_issuer("fhirgate DEV Root CA", &pki.pki.root.key);

    // Valid from next month: correctly signed, not yet valid.
    let (nyv, nyv_key) = client_leaf(
        "BaRS-NYV.future-dev.nhs.uk",
        0x4001,
        now + time::Duration::days(30),
        now + time::Duration::days(400),
        &sub,
    );
    // Root → four intermediates → leaf: five certificates, over the default depth of 4.
    let mut chain = Vec::new();
    let mut parent = root;
    let mut intermediates = Vec::new();
    for i in 1..=4 {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let params = dev_ca_params(&format!("Deep Intermediate {i}"));
        let cert = params.signed_by(&key, &parent).expect("intermediate");
        intermediates.push(cert.der().clone());
        parent = Issuer::new(params, key);
    }
    let (deep_leaf, deep_key) = client_leaf(
        "BaRS-DEEP.deep-dev.nhs.uk",
        0x4002,
        now - time::Duration::days(1),
        now + time::Duration::days(30),
        &parent,
    );
    chain.push(deep_leaf);
    chain.extend(intermediates.into_iter().rev());
    // A CA that copies the SubCA's name but has its own key: the leaf names the right
    // issuer and carries a signature the real SubCA never made.
    let forged = Issuer::new(
        dev_ca_params("fhirgate DEV SubCA"),
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key"),
    );
    let (forged_leaf, forged_key) = client_leaf(
        "BaRS-X26.fhirgate-dev.nhs.uk",
        0x2001,
        now - time::Duration::days(1),
        now + time::Duration::days(30),
        &forged,
    );
    // Bytes that are not a certificate at all, with a real key.
    let (_, garbage_key) = stock(&pki, "client");
    let garbage = CertificateDer::from(b"\x30\x03\x02\x01\x01not a certificate".to_vec());

    type Chain = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);
    let cases: Vec<(&str, Option<Chain>, &str, &str)> = vec![
        ("no certificate", None, "CertificateRequired", "no_cert"),
        (
            "foreign CA",
            Some(stock(&pki, "foreign-client")),
            "UnknownCA",
            "unknown_ca",
        ),
        (
            "expired",
            Some(stock(&pki, "expired-client")),
            "CertificateExpired",
            "expired",
        ),
        (
            "not yet valid",
            Some((vec![nyv], nyv_key)),
            "CertificateExpired",
            "not_yet_valid",
        ),
        (
            "revoked (CRL)",
            Some(stock(&pki, "revoked-client")),
            "CertificateRevoked",
            "revoked",
        ),
        (
            "serverAuth-only EKU",
            Some(stock(&pki, "server-only-client")),
            "UnsupportedCertificate",
            "bad_purpose",
        ),
        (
            "chain deeper than verify_depth",
            Some((chain, deep_key)),
            "CertificateUnknown",
            "chain_too_deep",
        ),
        (
            "forged issuer name",
            Some((vec![forged_leaf], forged_key)),
            "",
            "",
        ),
        (
            "unparsable certificate",
            Some((vec![garbage], garbage_key)),
            "BadCertificate",
            "bad_certificate",
        ),
    ];
    let mut refused = 0.0;
    for (what, chain, alert, result) in cases {
        for v in [Version::Tls12, Version::Tls13] {
            let before = handshakes(&gw, result);
            let total_before = refused_total(&gw);
            let c = client_with(
                &pki,
                v,
                chain.as_ref().map(|(c, k)| (c.clone(), k.clone_key())),
                H1,
            );
            let err = send(&c, addr, get("/metadata"))
                .await
                .expect_err(&format!("{what} ({v:?}) must be refused"));
            // TLS 1.2 fails inside the handshake, so the alert always reaches the
            // client; in TLS 1.3 the client may already be writing its request when
            // the alert comes, and see only the closed connection. The metric below
            // says which refusal it was in both cases.
            assert!(
                err.contains(alert) || matches!(v, Version::Tls13),
                "{what} ({v:?}): expected alert {alert}, got {err}"
            );
            refused += 1.0;
            wait_refused(&gw, total_before + 1.0).await;
            assert_eq!(
                refused_total(&gw),
                total_before + 1.0,
                "{what} ({v:?}) counted once"
            );
            if !result.is_empty() {
                assert_eq!(
                    handshakes(&gw, result),
                    before + 1.0,
                    "{what} ({v:?}) counted as {result}:\n{}",
                    gw.server().metrics().encode()
                );
            }
        }
    }
    // The forged-issuer case is refused as an unknown CA or a bad signature, never ok.
    assert!(handshakes(&gw, "unknown_ca") + handshakes(&gw, "bad_signature") >= 4.0);
    assert_eq!(refused_total(&gw), refused);
    assert_eq!(
        handshakes(&gw, "ok"),
        0.0,
        "no refused client completed a handshake"
    );
    assert_eq!(seen.count(), 0, "no refused client reached the upstream");
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

// RFC 8446 §4.4.3: "The receiver of a CertificateVerify message MUST verify the
// signature field." (RFC 5246 §7.4.8 likewise for TLS 1.2.) fhirgate remembers chains it
// has accepted, so a client reconnecting with the same certificate skips the chain's
// verification; the proof that the client holds the certificate's key is not part of
// that: certificates are public, and one accepted a moment ago, presented with another
// key, is refused.
#[tokio::test]
async fn an_accepted_certificate_presented_with_another_key_is_refused() {
    watch_panics();
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let (cert, key) = stock(&pki, "client");
    let (_, other_key) = stock(&pki, "second-client");
    for v in [Version::Tls12, Version::Tls13] {
        let genuine = client_with(&pki, v, Some((cert.clone(), key.clone_key())), H1);
        let got = send(&genuine, addr, get("/metadata")).await;
        assert_eq!(got.expect("genuine client").status, http::StatusCode::OK);
        let impostor = client_with(&pki, v, Some((cert.clone(), other_key.clone_key())), H1);
        let before = refused_total(&gw);
        send(&impostor, addr, get("/metadata"))
            .await
            .expect_err(&format!(
                "the certificate with another key ({v:?}) must be refused"
            ));
        wait_refused(&gw, before + 1.0).await;
        assert_eq!(
            refused_total(&gw),
            before + 1.0,
            "{v:?}: counted as refused"
        );
    }
    assert_eq!(
        handshakes(&gw, "ok"),
        2.0,
        "only the genuine handshakes succeeded"
    );
    assert_eq!(seen.count(), 2, "only the genuine requests were forwarded");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A TLS record carrying a ClientHello with the given legacy versions and cipher suites,
/// and no extensions (so no `supported_versions`: what a TLS 1.0/1.1 client sends).
fn client_hello(record_version: [u8; 2], hello_version: [u8; 2], suites: &[u16]) -> Vec<u8> {
    let mut body = hello_version.to_vec();
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
                                     // What a real legacy client sends, so the version or the suites are the only
                                     // problem: supported_groups (x25519, P-256), ec_point_formats (uncompressed) and
                                     // signature_algorithms (ECDSA-P256-SHA256, RSA-PSS-SHA256, RSA-PKCS1-SHA256).
    let ext: &[u8] = &[
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, //
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, //
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01,
    ];
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(ext);
    let mut hs = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend(body);
    let mut rec = vec![0x16, record_version[0], record_version[1]];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// The alert description in a plaintext alert record, if the bytes start with one.
fn alert(bytes: &[u8]) -> Option<u8> {
    (bytes.len() >= 7 && bytes[0] == 0x15).then(|| bytes[6])
}

const LEGACY_SUITES: &[u16] = &[0xc014, 0xc013, 0x0035, 0x002f, 0x000a];

#[tokio::test]
async fn legacy_protocol_versions_and_weak_suites_are_refused_with_an_alert() {
    watch_panics();
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    // (what, record, alert description): 70 protocol_version, 40 handshake_failure.
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        ("SSL 3.0", client_hello([3, 0], [3, 0], LEGACY_SUITES), 70),
        ("TLS 1.0", client_hello([3, 1], [3, 1], LEGACY_SUITES), 70),
        ("TLS 1.1", client_hello([3, 1], [3, 2], LEGACY_SUITES), 70),
        (
            "TLS 1.2 with only RSA-CBC-SHA suites",
            client_hello([3, 1], [3, 3], &[0x002f, 0x0035]),
            40,
        ),
    ];
    let before = handshakes(&gw, "incompatible");
    for (what, hello, want) in &cases {
        let mut s = tcp(addr).await;
        s.write_all(hello).await.expect("write hello");
        let got = read_for(&mut s, Duration::from_secs(3)).await;
        assert_eq!(alert(&got.bytes), Some(*want), "{what}: {:02x?}", got.bytes);
        assert!(got.closed, "{what}: connection closed after the alert");
    }
    wait_metric(
        &gw,
        &format!("{HANDSHAKES}{{result=\"incompatible\"}}"),
        before + cases.len() as f64,
    )
    .await;

    // A real TLS 1.0 / 1.1 client, where the system OpenSSL still offers them (seclevel 0
    // re-enables the SHA-1 suites they need).
    for flag in ["-tls1", "-tls1_1"] {
        let before = refused_total(&gw);
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("openssl")
                .args([
                    "s_client",
                    flag,
                    "-cipher",
                    "DEFAULT:@SECLEVEL=0",
                    "-connect",
                ])
                .arg(addr.to_string())
                .stdin(std::process::Stdio::null())
                .output()
        })
        .await
        .expect("task");
        let Ok(out) = out else {
            eprintln!("openssl not available; hand-built hellos above cover {flag}");
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if !text.contains("CONNECTED") {
            eprintln!("openssl {flag} did not connect; hand-built hellos above cover it");
            continue;
        }
        assert!(!out.status.success(), "{flag}: {text}");
        assert!(text.contains("Cipher is (NONE)"), "{flag}: {text}");
        assert!(
            text.contains("alert"),
            "{flag}: refused with an alert: {text}"
        );
        wait_refused(&gw, before + 1.0).await;
        assert_eq!(refused_total(&gw), before + 1.0, "{flag}: counted");
    }

    // ALPN offered but nothing the gateway speaks: no_application_protocol.
    let c = client_with(
        &pki,
        Version::Tls13,
        Some(stock(&pki, "client")),
        &[b"spdy/3"],
    );
    let err = send(&c, addr, get("/metadata"))
        .await
        .expect_err("no ALPN match");
    assert!(err.contains("NoApplicationProtocol"), "{err}");
    wait_metric(&gw, &format!("{HANDSHAKES}{{result=\"no_alpn\"}}"), 1.0).await;

    assert_eq!(seen.count(), 0);
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

/// RFC 9113 §3.3: "HTTP/2 connections over TLS MUST use protocol negotiation in TLS
/// [TLS-ALPN]"; §3.2: a client without ALPN speaks HTTP/1.1 (RFC 9110 §4.2.2 https).
/// The gateway picks the protocol from ALPN alone: without it a connection is HTTP/1.1
/// and an HTTP/2 preface sent anyway ("prior knowledge") is not served as HTTP/2.
#[tokio::test]
async fn the_http_version_comes_from_alpn_alone() {
    watch_panics();
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let no_alpn = client_with(&pki, Version::Tls13, Some(stock(&pki, "client")), &[]);

    // No ALPN, HTTP/1.1: served.
    let mut tls = connect(&no_alpn, addr).await.expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    write_quietly(
        &mut tls,
        b"GET /metadata HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await;
    let got = read_for(&mut tls, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&got.bytes);
    assert_eq!(status_of(&text), 200, "{text}");
    assert_eq!(seen.count(), 1);

    // No ALPN, an HTTP/2 preface and a request: no HTTP/2 frame comes back (the first
    // frame of a real HTTP/2 server is SETTINGS) and nothing reaches the upstream.
    let mut tls = connect(&no_alpn, addr).await.expect("handshake");
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello.extend(frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &hpack_get("/metadata"),
    ));
    write_quietly(&mut tls, &hello).await;
    let got = read_for(&mut tls, Duration::from_secs(3)).await;
    assert!(
        parse_frames(&got.bytes).iter().all(|f| f.kind != SETTINGS),
        "answered as HTTP/2 without ALPN: {:02x?}",
        got.bytes
    );
    assert!(
        got.bytes.is_empty() || got.bytes.starts_with(b"HTTP/1.1 "),
        "{:?}",
        String::from_utf8_lossy(&got.bytes)
    );
    assert_eq!(
        seen.count(),
        1,
        "the preface request never reached the upstream"
    );

    // With ALPN h2 the same bytes are HTTP/2.
    let mut tls = raw_h2(&pki, addr).await;
    write_quietly(
        &mut tls,
        &frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            1,
            &hpack_get("/metadata"),
        ),
    )
    .await;
    let got = read_for(&mut tls, Duration::from_secs(2)).await;
    assert!(
        parse_frames(&got.bytes).iter().any(|f| f.kind == SETTINGS),
        "{:02x?}",
        got.bytes
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn garbage_instead_of_a_client_hello_is_dropped_and_counted() {
    watch_panics();
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let mut huge = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    huge.extend_from_slice(&[0u8; 64]);
    let mut hello_then_junk = client_hello([3, 1], [3, 3], &[0x1301]);
    hello_then_junk.truncate(20);
    hello_then_junk.extend_from_slice(&[0xff; 40]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "plain HTTP",
            b"GET /metadata HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        ),
        ("HTTP/2 preface in clear", PREFACE.to_vec()),
        (
            "random bytes",
            (0..512u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ),
        (
            "SSLv2-style hello",
            vec![
                0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
            ],
        ),
        ("record longer than TLS allows", huge),
        ("handshake record cut short", hello_then_junk),
        (
            "alert instead of a hello",
            vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28],
        ),
        ("NUL bytes", vec![0u8; 300]),
    ];
    let before = refused_total(&gw);
    for (what, bytes) in &cases {
        let started = Instant::now();
        let mut s = tcp(addr).await;
        let _ = s.write_all(bytes).await;
        // Half-close: the gateway sees the end of what this client will ever send.
        let _ = s.shutdown().await;
        let got = read_for(&mut s, Duration::from_secs(5)).await;
        assert!(got.closed, "{what}: connection must be closed");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{what}: closed promptly, not by the 2 s handshake timeout ({:?})",
            started.elapsed()
        );
        assert!(
            !got.text().contains("HTTP/1.1 200"),
            "{what}: nothing served in clear"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused_total(&gw) < before + cases.len() as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        refused_total(&gw),
        before + cases.len() as f64,
        "each garbage connection counted once:\n{}",
        gw.server().metrics().encode()
    );
    assert_eq!(handshakes(&gw, "timeout"), 0.0);
    assert_eq!(seen.count(), 0);
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn stalled_and_dribbled_handshakes_time_out_without_blocking_others() {
    watch_panics();
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await; // handshake_timeout: 2s
    let hello = client_hello([3, 1], [3, 3], &[0x1301, 0xc02b]);

    let silent = tokio::spawn(async move {
        let mut s = tcp(addr).await;
        read_for(&mut s, Duration::from_secs(8)).await
    });
    let partial = tokio::spawn({
        let hello = hello.clone();
        async move {
            let mut s = tcp(addr).await;
            s.write_all(&hello[..hello.len() / 2]).await.expect("write");
            read_for(&mut s, Duration::from_secs(8)).await
        }
    });
    // One byte every 250 ms: each byte is progress, but the timeout covers the whole
    // handshake, so dribbling does not extend it.
    let dribble = tokio::spawn(async move {
        let mut s = tcp(addr).await;
        let started = Instant::now();
        for b in hello {
            if s.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            if started.elapsed() > Duration::from_secs(8) {
                break;
            }
        }
        let r = read_for(&mut s, Duration::from_secs(1)).await;
        (r, started.elapsed())
    });

    // Meanwhile good clients are served at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    still_serves(&pki, addr).await;
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    for (what, r) in [
        ("silent", silent.await.expect("task")),
        ("partial hello", partial.await.expect("task")),
    ] {
        assert!(r.closed, "{what}: closed by the gateway");
        assert!(
            r.elapsed >= Duration::from_millis(1800) && r.elapsed < Duration::from_secs(4),
            "{what}: closed at the 2 s handshake timeout, took {:?}",
            r.elapsed
        );
    }
    let (r, took) = dribble.await.expect("task");
    assert!(
        took < Duration::from_secs(4),
        "dribbling client cut off at the handshake timeout, took {took:?} ({r:?})"
    );
    wait_metric(&gw, &format!("{HANDSHAKES}{{result=\"timeout\"}}"), 3.0).await;
    assert_eq!(
        seen.count(),
        2,
        "only the good clients' requests reached the upstream"
    );
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

/// With every connection slot held by stalled handshakes, a good client waits in the
/// kernel backlog and is served once the handshake timeout frees a slot: the wait is
/// bounded by `tls.handshake_timeout`.
#[tokio::test]
async fn connection_slots_held_by_stalled_handshakes_are_freed_by_the_timeout() {
    watch_panics();
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.limits = "  max_connections: 4\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(tcp(addr).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let got = send(
        &tls_client(&pki, Some("client"), H1),
        addr,
        get("/metadata"),
    )
    .await
    .expect("served once a slot frees");
    assert_eq!(got.status, http::StatusCode::OK);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "waited {:?}, more than the handshake timeout allows",
        t.elapsed()
    );
    wait_metric(&gw, &format!("{HANDSHAKES}{{result=\"timeout\"}}"), 4.0).await;
    drop(stalled);
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

// The first hostile suite (issue 8), folded in: a not-yet-valid certificate and the
// handshake refusal metrics.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yet_valid_certificate_is_refused_and_every_refusal_is_counted() {
    let pki = Pki::new();
    // future-client: from the right SubCA, but valid only from tomorrow.
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    // (TLS 1.3 verifies the client after the client's Finished, so the alert may only
    // show on the first read; the metrics below say why it was refused.)
    send(
        &tls_client(&pki, Some("future-client"), H1),
        addr,
        get("/metadata"),
    )
    .await
    .expect_err("not-yet-valid certificate refused");
    for who in [
        Some("revoked-client"),
        Some("expired-client"),
        Some("foreign-client"),
        Some("server-only-client"),
        None,
    ] {
        assert!(send(&tls_client(&pki, who, H1), addr, get("/metadata"))
            .await
            .is_err());
    }
    // Garbage instead of a ClientHello.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0xde, 0xad, 0xbe, 0xef])
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), raw.read_to_end(&mut sink)).await;
    // A TLS 1.0 ClientHello (record and hello version 0x0301): refused.
    let mut old = tokio::net::TcpStream::connect(addr).await.unwrap();
    old.write_all(&tls10_client_hello()).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), old.read_to_end(&mut reply)).await;
    assert!(
        reply.is_empty() || reply[0] == 0x15,
        "TLS 1.0 must get an alert or a close, got {reply:02x?}"
    );
    still_serves_h1(&pki, addr).await;
    assert_eq!(seen.count(), 1);

    let metrics = gw.server().metrics().encode();
    for kind in [
        "not_yet_valid",
        "revoked",
        "expired",
        "unknown_ca",
        "bad_purpose",
        "no_cert",
    ] {
        assert!(
            metrics.contains(&format!(
                "fhirgate_tls_handshakes_total{{result=\"{kind}\"}} "
            )),
            "{kind} not counted:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("fhirgate_tls_handshakes_total{result=\"ok\"}"),
        "{metrics}"
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A minimal TLS 1.0 ClientHello with one cipher suite (TLS_RSA_WITH_AES_128_CBC_SHA).
fn tls10_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x01]; // client_version TLS 1.0
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // cipher suites
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    let mut hs = vec![0x01, 0x00];
    hs.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    hs.extend_from_slice(&hello);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}
