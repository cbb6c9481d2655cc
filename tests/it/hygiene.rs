//! Request hygiene of the real binary and the in-process gateway: request ids made up
//! when none is sent, ids kept out of the access log (`logging.redact_paths`), and
//! SIGTERM honoured from the first moment, even while OAuth discovery is pending.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::harness::*;
use bytes::Bytes;
use fhirgate::pipeline::nhsd;
use http::{Request, StatusCode};
use http_body_util::Full;

/// The access lines of a log.
fn access_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("fhirgate::access"))
        .collect()
}

/// Starts `fhirgate run` on `yaml` (listener at `gw`), logging to `log`; waits until the
/// listener accepts TCP.
fn start_binary(pki: &Pki, yaml: &str, gw: SocketAddr, log: &std::path::Path) -> KillOnDrop {
    start_binary_with(pki, yaml, gw, log, &[])
}

/// [`start_binary`] with environment variables.
fn start_binary_with(
    pki: &Pki,
    yaml: &str,
    gw: SocketAddr,
    log: &std::path::Path,
    env: &[(&str, &str)],
) -> KillOnDrop {
    let cfg_path = pki.path("config.yaml");
    std::fs::write(&cfg_path, yaml).unwrap();
    let child = run_gateway(&cfg_path, log, env);
    for _ in 0..200 {
        if std::net::TcpStream::connect(gw).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!(
        "gateway did not start:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Waits up to `limit` for the process to exit; returns its status and how long it took.
fn wait_exit(
    child: &mut KillOnDrop,
    limit: Duration,
) -> Option<(std::process::ExitStatus, Duration)> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Ok(Some(status)) = child.0.try_wait() {
            return Some((status, started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn is_uuid_v4(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok_and(|u| u.get_version_num() == 4) && s.len() == 36
}

/// `systemctl stop` or a Kubernetes rollout while the authorisation server is down: the
/// gateway waits up to a minute for discovery before it reports ready, but SIGTERM (and
/// SIGINT) must end it at once, with exit status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_works_while_discovery_is_pending() {
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let dead = dead_port().await;
    std::fs::write(pki.path("gw-secret"), "secret\n").unwrap();
    let gw = free_addr();
    let mut o = Opts::new(up);
    o.auth = format!(
        "auth:\n  mode: introspection\n  issuer: http://{dead}\n  client_auth:\n    method: client_secret_basic\n    client_id: gw\n    client_secret_file: {}\n",
        pki.path("gw-secret").display()
    );
    for sig in ["-TERM", "-INT"] {
        let yaml = config_yaml(&pki, &o).replace("127.0.0.1:0", &gw.to_string());
        let log = pki.path("sigterm.log");
        let mut child = start_binary(&pki, &yaml, gw, &log);
        std::thread::sleep(Duration::from_secs(1));
        signal(&child.0, sig);
        let exited = wait_exit(&mut child, Duration::from_secs(3));
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let (status, took) = exited.unwrap_or_else(|| panic!("{sig} ignored for 3 s:\n{log}"));
        assert!(status.success(), "{sig}: exit {status:?}\n{log}");
        assert!(took < Duration::from_secs(3), "{sig}: {took:?}");
        assert!(
            log.contains("discovery failed"),
            "the AS really was down: {log}"
        );
    }
}

/// Without an `nhsd` section nothing requires `X-Request-ID`, so the gateway makes one
/// up (UUID v4): sent upstream, echoed to the client and logged. A sent one is kept.
/// With `logging.redact_paths` (on by default outside development) the access line
/// shows `/Patient/{id}` and no query string, so NHS numbers and search terms stay out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_made_up_and_access_paths_redacted() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let gw = free_addr();
    let o = Opts::new(up);
    let yaml = config_yaml(&pki, &o)
        .replace("127.0.0.1:0", &gw.to_string())
        .replace("environment: development", "environment: integration");
    let log_path = pki.path("access.log");
    let mut child = start_binary(&pki, &yaml, gw, &log_path);
    let c = tls_client(&pki, Some("client"), H1);

    let got = send(&c, gw, get("/Patient/9000000009/_history/7?name=smith"))
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    let made_up = got.headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(is_uuid_v4(&made_up), "{made_up}");
    assert_eq!(seen.last().1["x-request-id"], made_up.as_str());

    let sent = "0b7c4fb1-0f48-4d3b-9a7e-5d3c1c3f7a11";
    let r = Request::get("/Patient/9000000009/$everything")
        .header("x-request-id", sent)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&c, gw, r).await.unwrap();
    assert_eq!(got.headers["x-request-id"], sent);
    assert_eq!(seen.last().1["x-request-id"], sent);

    // A refusal gets an id too.
    let got = send(&c, gw, get("/Patient/%2e%2e/9000000009"))
        .await
        .unwrap();
    got.assert_outcome(400, "REC_BAD_REQUEST");
    let refused_id = got.headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(is_uuid_v4(&refused_id));
    assert_ne!(refused_id, made_up);

    signal(&child.0, "-TERM");
    wait_exit(&mut child, Duration::from_secs(10)).expect("exits");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let access = access_lines(&log);
    assert_eq!(access.len(), 3, "{log}");
    assert!(
        access[0].contains("path=/Patient/{id}/_history/{vid}"),
        "{}",
        access[0]
    );
    assert!(
        access[0].contains(&format!("request_id=\"{made_up}\"")),
        "{}",
        access[0]
    );
    assert!(
        access[1].contains("path=/Patient/{id}/$everything"),
        "{}",
        access[1]
    );
    assert!(
        access[1].contains(&format!("request_id=\"{sent}\"")),
        "{}",
        access[1]
    );
    assert!(
        access[2].contains(&format!("request_id=\"{refused_id}\"")),
        "{}",
        access[2]
    );
    for secret in ["9000000009", "smith"] {
        assert!(!log.contains(secret), "{secret} logged:\n{log}");
    }

    // Development default (and an explicit `redact_paths: false`): the path as sent.
    let yaml = config_yaml(&pki, &o).replace("127.0.0.1:0", &gw.to_string());
    let mut child = start_binary(&pki, &yaml, gw, &log_path);
    assert_eq!(
        send(&c, gw, get("/Patient/9000000009"))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    signal(&child.0, "-TERM");
    wait_exit(&mut child, Duration::from_secs(10)).expect("exits");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("path=/Patient/9000000009"), "{log}");
}

/// The access line is an INFO event of target `fhirgate::access` whichever way it is
/// written: `FHIRGATE_LOG` can turn it off like any other target, and JSON logs carry it
/// as a JSON object with the same fields as the text line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_follow_the_log_filter_and_format() {
    let pki = Pki::new();
    let (up, _seen) = upstream(UpstreamMode::Echo).await;
    let gw = free_addr();
    let o = Opts::new(up);
    let text = config_yaml(&pki, &o).replace("127.0.0.1:0", &gw.to_string());
    let json = format!("{text}logging:\n  format: json\n");
    let c = tls_client(&pki, Some("client"), H1);
    let log_path = pki.path("filtered.log");
    for (yaml, filter) in [
        (&text, "info"),
        (&text, "info,fhirgate::access=off"),
        (&json, "info"),
    ] {
        let mut child = start_binary_with(&pki, yaml, gw, &log_path, &[("FHIRGATE_LOG", filter)]);
        let got = send(&c, gw, get("/Patient/1")).await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        signal(&child.0, "-TERM");
        wait_exit(&mut child, Duration::from_secs(10)).expect("exits");
        let log = std::fs::read_to_string(&log_path).unwrap();
        let access = access_lines(&log);
        assert!(log.contains("listening (TLS-MA)"), "{filter}: {log}");
        if filter.contains("=off") {
            assert!(access.is_empty(), "{filter}: {log}");
        } else if yaml.contains("format: json") {
            assert_eq!(access.len(), 1, "{log}");
            let v: serde_json::Value = serde_json::from_str(access[0]).unwrap();
            assert_eq!(v["target"], "fhirgate::access", "{v}");
            assert_eq!(v["level"], "INFO", "{v}");
            assert_eq!(v["path"], "/Patient/1", "{v}");
            assert_eq!(v["status"], 200, "{v}");
            assert_eq!(v["upstream_status"], 200, "{v}");
            assert!(v["latency_ms"].as_f64().is_some(), "{v}");
        } else {
            assert_eq!(access.len(), 1, "{log}");
            let line = access[0];
            assert!(line.contains("  INFO fhirgate::access: request method=GET path=/Patient/1 status=200 latency_ms="), "{line}");
            assert!(line.contains(" route=\"all\" "), "{line}");
        }
    }
}

/// With BaRS checks on, a missing `X-Request-ID` stays a 400 naming it (BaRS: the sender
/// must send one); nothing is made up or echoed.
#[tokio::test]
async fn with_nhsd_checks_a_missing_request_id_is_still_refused() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.routes.push_str("nhsd: {}\n");
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);
    let mut r = Request::get("/Patient/1");
    for (k, v) in nhsd::example_headers() {
        if k != nhsd::REQUEST_ID {
            r = r.header(k, v);
        }
    }
    let got = send(&c, addr, r.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    got.assert_outcome(400, "REC_BAD_REQUEST");
    let j = got.json();
    assert!(
        j["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("X-Request-ID"),
        "{j}"
    );
    assert!(got.headers.get("x-request-id").is_none());
    assert_eq!(seen.count(), 0);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Writes `name.crt`/`name.key` into the PKI directory: a clientAuth leaf whose subject
/// CN is `cn`, signed by the dev SubCA (`issued`) or by itself.
fn leaf_named(pki: &Pki, name: &str, cn: &str, issued: bool) {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut p =
        CertificateParams::new(vec!["bars-forged.fhirgate-dev.nhs.uk".to_owned()]).expect("params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "GB");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = issued;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(30);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = if issued {
        p.signed_by(&key, &dev_issuer("fhirgate DEV SubCA", &pki.pki.sub_ca.key))
    } else {
        p.self_signed(&key)
    }
    .expect("sign");
    std::fs::write(pki.path(&format!("{name}.crt")), cert.pem()).unwrap();
    std::fs::write(pki.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
}

/// CWE-117 (OWASP Logging Cheat Sheet: encode CR, LF and delimiters in untrusted data): a
/// certificate subject is text its holder chose. Neither a self-signed certificate (its
/// subject and issuer are on the "handshake refused" line, anyone can send one) nor an
/// accepted one (its subject is on every access line) may end a log line and forge the
/// next, or put a terminal escape in the log: CR, LF, ESC, DEL and C1 are escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_subjects_cannot_forge_log_lines() {
    let pki = Pki::new();
    let (up, _seen) = upstream(UpstreamMode::Echo).await;
    let gw = free_addr();
    let yaml = config_yaml(&pki, &Opts::new(up)).replace("127.0.0.1:0", &gw.to_string());
    let forged =
        "2026-12-01T00:00:00.000000Z  INFO fhirgate::access: request method=GET path=/forged";
    let cn = format!("x\r\n{forged}\u{1b}[2J\u{9b}31m");
    leaf_named(&pki, "forger", &cn, true);
    leaf_named(&pki, "self-forger", &cn, false);
    let log_path = pki.path("forged.log");
    let mut child = start_binary(&pki, &yaml, gw, &log_path);

    let got = send(&tls_client(&pki, Some("forger"), H1), gw, get("/Patient/1"))
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert!(send(
        &tls_client(&pki, Some("self-forger"), H1),
        gw,
        get("/Patient/1")
    )
    .await
    .is_err());
    std::thread::sleep(Duration::from_millis(200));
    signal(&child.0, "-TERM");
    wait_exit(&mut child, Duration::from_secs(10)).expect("exits");
    let log = std::fs::read_to_string(&log_path).unwrap();

    let escaped = format!(r"CN=x\r\n{forged}\u{{1b}}[2J\u{{9b}}31m");
    // Lines by the target the gateway wrote them under (the forged text names one too).
    let by = |target: &str| -> Vec<&str> {
        log.lines()
            .filter(|l| {
                l.split_once(' ').is_some_and(|(_, r)| {
                    r.trim_start()
                        .split_once(' ')
                        .is_some_and(|(_, t)| t.starts_with(target))
                })
            })
            .collect()
    };
    let access = by("fhirgate::access:");
    assert_eq!(access.len(), 1, "{log}");
    assert!(access[0].contains(&escaped), "{}", access[0]);
    let refused: Vec<_> = by("fhirgate::tls:")
        .into_iter()
        .filter(|l| l.contains("kind=\"unknown_ca\""))
        .collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(
        refused[0].contains(&format!("subject=C=GB, {escaped}")),
        "{}",
        refused[0]
    );
    assert!(
        refused[0].contains(&format!("issuer=C=GB, {escaped}")),
        "{}",
        refused[0]
    );
    // Every line is one the gateway began: none starts with the forged text.
    for l in log.lines() {
        assert!(
            !l.contains("path=/forged") || l.contains(&escaped),
            "forged line: {l:?}"
        );
    }
    assert!(!log.contains(['\r', '\u{1b}', '\u{9b}']), "{log:?}");
}

/// Starts `fhirgate run` on `yaml` under `sh -c 'ulimit ULIMIT && exec fhirgate …'`
/// (same pid), logging to `log`; waits until the listener at `gw` accepts TCP.
fn start_binary_under_ulimit(
    pki: &Pki,
    yaml: &str,
    gw: SocketAddr,
    log: &std::path::Path,
    ulimit: &str,
) -> KillOnDrop {
    let cfg_path = pki.path("config.yaml");
    std::fs::write(&cfg_path, yaml).unwrap();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit {ulimit} && exec \"$0\" run --config \"$1\""
        ))
        .arg(env!("CARGO_BIN_EXE_fhirgate"))
        .arg(&cfg_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child);
    for _ in 0..200 {
        if std::net::TcpStream::connect(gw).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!(
        "gateway did not start:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Every connection costs an open file (and its upstream connection another), but Linux
/// starts processes with a soft RLIMIT_NOFILE of 1024, and containerd 2.x no longer raises
/// it for containers: unraised, `limits.max_connections: 10000` stops at about 500 open
/// clients, the rest wait in the kernel's backlog while accept fails with EMFILE. So the
/// gateway raises its soft limit (up to the hard one, as getrlimit(2) allows an
/// unprivileged process) to what `max_connections` needs, and says so in the log when
/// even the hard limit is too low. Here the soft limit is 64 and 100 clients hold a
/// connection open at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_soft_open_files_limit_is_raised_for_max_connections() {
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let gw = free_addr();
    let mut o = Opts::new(up);
    o.limits = "  max_connections: 300\n".into();
    let yaml = config_yaml(&pki, &o).replace("127.0.0.1:0", &gw.to_string());
    let log = pki.path("nofile.log");
    let _child = start_binary_under_ulimit(&pki, &yaml, gw, &log, "-Sn 64");
    let c = tls_client(&pki, Some("client"), H1);
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for i in 0..100 {
        let opened = tokio::time::timeout(Duration::from_secs(5), async {
            let (mut tx, task) = open_h1(&c, gw).await?;
            let resp = tx
                .send_request(h1_get("/metadata"))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((resp.status(), tx, task))
        })
        .await;
        match opened {
            Ok(Ok((status, tx, task))) if status == StatusCode::OK => held.push((tx, task)),
            other => {
                refused.push(format!(
                    "connection {i}: {:?}",
                    other.map(|r| r.map(|t| t.0))
                ));
                break;
            }
        }
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(refused.is_empty(), "{refused:?}\n{log_text}");
    assert_eq!(held.len(), 100);
    assert!(
        log_text.contains("raised the soft open-files limit"),
        "{log_text}"
    );
    drop(held);

    // A hard limit below what max_connections needs cannot be raised: said at start.
    let gw = free_addr();
    o.limits = "  max_connections: 10000\n".into();
    let yaml = config_yaml(&pki, &o).replace("127.0.0.1:0", &gw.to_string());
    let log = pki.path("nofile-hard.log");
    let _child = start_binary_under_ulimit(&pki, &yaml, gw, &log, "-n 256");
    still_serves_h1(&pki, gw).await;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let line = log_text
        .lines()
        .find(|l| l.contains("open-files limit"))
        .unwrap_or_else(|| panic!("no warning:\n{log_text}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("limits.max_connections"), "{line}");
    assert!(line.contains("256"), "{line}");
}

/// CPU time (user + system) of process `pid`, from /proc/PID/stat, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name in parentheses; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Out of file descriptors, accept fails with EMFILE at once, again and again, while a
/// connection waits in the backlog. The TLS-MA listener backs off 50 ms; the admin
/// listener must too: a kubelet probe or a Prometheus scrape arriving then would
/// otherwise spin a core at 100% until a descriptor frees, starving the connections
/// that are being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_accept_out_of_files_backs_off() {
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let gw = free_addr();
    let admin = free_addr();
    let mut o = Opts::new(up);
    // Idle connections are kept through the measurement.
    o.limits = "  max_connections: 300\n  idle_timeout: 60s\n".into();
    o.routes.push_str(&format!("admin:\n  address: {admin}\n"));
    let yaml = config_yaml(&pki, &o).replace("127.0.0.1:0", &gw.to_string());
    let log = pki.path("emfile.log");
    let child = start_binary_under_ulimit(&pki, &yaml, gw, &log, "-n 64");
    let pid = child.0.id();
    // Hold connections until the gateway runs out of descriptors (a handshake stalls).
    let c = tls_client(&pki, Some("client"), H1);
    let mut held = Vec::new();
    for _ in 0..64 {
        let opened = tokio::time::timeout(Duration::from_secs(2), async {
            let (mut tx, task) = open_h1(&c, gw).await?;
            tx.send_request(h1_get("/metadata"))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((tx, task))
        })
        .await;
        match opened {
            Ok(Ok(h)) => held.push(h),
            _ => break,
        }
    }
    assert!(held.len() < 64, "the gateway never ran out of descriptors");
    // A probe now waits in the admin listener's backlog.
    let _probe = tokio::net::TcpStream::connect(admin).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = cpu_ticks(pid);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid).saturating_sub(before);
    // Clock ticks are 100 a second on Linux: a spinning loop uses about 200 here.
    let secs = started.elapsed().as_secs_f64();
    let share = used as f64 / 100.0 / secs;
    assert!(
        share < 0.3,
        "{:.0}% of a core while out of descriptors ({} held)",
        share * 100.0,
        held.len()
    );
    drop(held);
}
