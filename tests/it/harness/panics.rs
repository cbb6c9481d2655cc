//! Panics anywhere in the process (the gateway runs in-process: a panic in one of its
//! tasks would otherwise go unnoticed).

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

static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts panics outside test code, on any thread, from now on (the gateway runs in-process; a panic in
/// one of its tasks would otherwise go unnoticed). Call at the start of a test.
pub fn watch_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // A failing assertion in a test is the test's business; anything else (the
            // gateway, hyper, h2, rustls) is a panic the hostile input caused.
            let in_test = info
                .location()
                .is_some_and(|l| l.file().starts_with("tests/"));
            if !in_test {
                PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// Panics outside test code seen since [`watch_panics`].
pub fn panics() -> usize {
    PANICS.load(std::sync::atomic::Ordering::SeqCst)
}
