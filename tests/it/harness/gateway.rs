//! The gateway under test: its configuration ([`Opts`], [`config_yaml`]), starting it
//! in-process on 127.0.0.1:0 ([`gateway`]), and reading its metrics ([`metric`],
//! [`wait_metric`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fhirgate::config::Config;
use fhirgate::server::{self, Running};
use fhirgate::tools::pki::DevPki;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use super::*;

pub struct Opts {
    pub upstream: SocketAddr,
    /// The `auth:` section (default: development mode, no token checks).
    pub auth: String,
    pub extra_bundle: bool,
    pub routes: String,
    pub limits: String,
    pub tls_extra: String,
    pub upstream_extra: String,
}

impl Opts {
    pub fn new(upstream: SocketAddr) -> Self {
        Opts {
            upstream,
            auth: "auth:\n  mode: development\n".into(),
            extra_bundle: false,
            routes: "  - name: all\n    path_prefix: /\n".into(),
            limits: String::new(),
            tls_extra: String::new(),
            upstream_extra: String::new(),
        }
    }
}

pub fn config_yaml(pki: &Pki, o: &Opts) -> String {
    let p = |n: &str| pki.path(n).display().to_string();
    let extra = if o.extra_bundle {
        format!(
            "    - name: foreign\n      ca_files: [{}]\n",
            p("foreign-root-ca.crt")
        )
    } else {
        String::new()
    };
    format!(
        "environment: development\n\
listeners:\n  - address: 127.0.0.1:0\n\
tls:\n  server_cert: {sc}\n  server_key: {sk}\n  handshake_timeout: 2s\n{tls_extra}  trust_bundles:\n    - name: nhs-int\n      ca_files: [{root}, {sub}]\n      crl_files: [{crl}, {rcrl}]\n{extra}\
limits:\n{idle}{limits}\
upstream:\n  url: http://{up}\n  connect_timeout: 1s\n{up_timeout}{up_extra}\
{auth}\
routes:\n{routes}",
        sc = p("server.crt"),
        sk = p("server.key"),
        root = p("root-ca.crt"),
        sub = p("sub-ca.crt"),
        crl = p("sub-ca.crl"),
        rcrl = p("root-ca.crl"),
        tls_extra = o.tls_extra,
        // 5 s unless the test sets its own.
        idle = if o.limits.contains("idle_timeout:") {
            ""
        } else {
            "  idle_timeout: 5s\n"
        },
        limits = o.limits,
        up = o.upstream,
        // 2 s unless the test sets its own.
        up_timeout = if o.upstream_extra.contains("response_timeout:") {
            ""
        } else {
            "  response_timeout: 2s\n"
        },
        up_extra = o.upstream_extra,
        auth = o.auth,
        routes = o.routes,
    )
}

pub async fn gateway(pki: &Pki, o: &Opts) -> (Running, SocketAddr) {
    gateway_on(pki, o, None).await
}

/// [`gateway`] with its connections served on `shards` (as `fhirgate run` does on more
/// than one CPU) if given.
pub async fn gateway_on(
    pki: &Pki,
    o: &Opts,
    shards: Option<std::sync::Arc<server::Shards>>,
) -> (Running, SocketAddr) {
    let yaml = config_yaml(pki, o);
    let cfg =
        Config::from_yaml(&yaml, Path::new("/")).unwrap_or_else(|e| panic!("config: {e}\n{yaml}"));
    let running = server::start_on(&cfg, shards).await.expect("start gateway");
    let addr = running.addrs[0];
    (running, addr)
}

/// Value of one sample in the gateway's Prometheus text, e.g.
/// `fhirgate_tls_handshakes_total{result="revoked"}`; 0 when absent.
pub fn metric(gw: &Running, sample: &str) -> f64 {
    metric_in(&gw.server().metrics().encode(), sample)
}

/// Value of one sample in Prometheus text (e.g. scraped from a gateway process's
/// `/metrics`); 0 when absent.
pub fn metric_in(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(sample)?;
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
        .unwrap_or(0.0)
}

/// `fhirgate_tls_handshakes_total{result="…"}`.
pub fn handshakes(gw: &Running, result: &str) -> f64 {
    metric(
        gw,
        &format!("fhirgate_tls_handshakes_total{{result=\"{result}\"}}"),
    )
}

/// Waits (up to 5 s) until `sample` reaches at least `want`: the server records a
/// refusal a moment after the client has seen it.
pub async fn wait_metric(gw: &Running, sample: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(gw, sample);
        if v >= want {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{sample} is {v}, expected at least {want}\n{}",
                gw.server().metrics().encode()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
