//! The pooled client to the internal FHIR endpoint.
//!
//! One hyper-util client per gateway: keep-alive pooling, a connect timeout in the
//! connector, and a response-header timeout around each request. TLS to the upstream uses
//! only the CA bundle named in the config (internal services rarely chain to public CAs).

use std::time::Duration;

use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::error::{err, ConfigError};
use crate::pipeline::outcome::{ErrorSource, Refuse, Rejection};
use crate::tls::client_connector;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of a request sent upstream: the client's body, streamed through a size limit.
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    scheme: Scheme,
    authority: http::uri::Authority,
    /// Path of the configured base URL without trailing '/', e.g. `/fhir` or ``.
    base_path: String,
    response_timeout: Duration,
}

impl Upstream {
    pub fn from_config(cfg: &UpstreamConfig) -> Result<Self, ConfigError> {
        let uri: Uri = cfg
            .url
            .parse()
            .map_err(|e| err("upstream.url", format!("not a valid URL: {e}")))?;
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| err("upstream.url", "must include a host"))?;
        let base_path = uri.path().trim_end_matches('/').to_owned();

        let client_cert = match (&cfg.client_cert, &cfg.client_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let https = client_connector(
            "upstream",
            cfg.ca_file.as_deref(),
            client_cert,
            cfg.connect_timeout,
            cfg.http2,
        )?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(cfg.http2)
            .build(https);
        Ok(Upstream {
            client,
            scheme,
            authority,
            base_path,
            response_timeout: cfg.response_timeout,
        })
    }

    /// The upstream URI for a request path (+ query) as the client sent it.
    pub fn target(&self, pq: Option<&PathAndQuery>) -> Result<Uri, Rejection> {
        let refused = || Rejection::bad_path("The request target cannot be forwarded");
        let pq = match pq {
            // Most upstreams have no base path: the client's path goes as it is, uncopied.
            Some(p) if self.base_path.is_empty() => p.clone(),
            None if self.base_path.is_empty() => PathAndQuery::from_static("/"),
            _ => {
                let pq = pq.map(PathAndQuery::as_str).unwrap_or("/");
                PathAndQuery::try_from(format!("{}{}", self.base_path, pq))
                    .map_err(|_| refused())?
            }
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(pq);
        Uri::from_parts(parts).map_err(|_| refused())
    }

    /// Sends a request and waits for the response headers, mapping failures to the
    /// refusal a client should see: timeouts are 504, a body over the limit is 413, any
    /// other failure to reach the upstream is 502.
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
        body_limit: u64,
    ) -> Result<Response<Incoming>, (UpstreamError, String)> {
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Err(_) => Err((UpstreamError::Timeout, "response timeout".into())),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                let detail = error_chain(&e);
                let error = if chain_has::<http_body_util::LengthLimitError>(&e) {
                    UpstreamError::BodyTooLarge { limit: body_limit }
                } else if chain_any(&e, |c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
                }) {
                    UpstreamError::Timeout
                } else if chain_has::<hyper::Error>(&e) && !e.is_connect() && client_body_failed(&e)
                {
                    UpstreamError::ClientBody
                } else {
                    UpstreamError::Unavailable
                };
                Err((error, detail))
            }
        }
    }
}

/// Why forwarding a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// Connect or response-header timeout (504).
    Timeout,
    /// The client's body grew past `limits.max_body_bytes` while streaming (413).
    BodyTooLarge { limit: u64 },
    /// Reading the client's body failed (client reset or malformed framing).
    ClientBody,
    /// Unreachable, refused or reset (502).
    Unavailable,
}

impl Refuse for UpstreamError {
    fn rejection(&self) -> Rejection {
        match self {
            UpstreamError::Timeout => Rejection::upstream_timeout(),
            UpstreamError::BodyTooLarge { limit } => Rejection::body_too_large(*limit),
            UpstreamError::ClientBody => Rejection::bad_request_body(),
            UpstreamError::Unavailable => Rejection::upstream_unavailable(),
        }
    }

    fn source(&self) -> ErrorSource {
        match self {
            UpstreamError::Timeout | UpstreamError::Unavailable => ErrorSource::Upstream,
            UpstreamError::BodyTooLarge { .. } | UpstreamError::ClientBody => ErrorSource::Client,
        }
    }
}

/// Whether the failure came from reading the client's request body.
fn client_body_failed(e: &hyper_util::client::legacy::Error) -> bool {
    chain_any(e, |c| {
        c.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_user() || h.is_body_write_aborted())
    })
}

fn chain_any(
    e: &(dyn std::error::Error + 'static),
    mut f: impl FnMut(&(dyn std::error::Error + 'static)) -> bool,
) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if f(c) {
            return true;
        }
        cur = c.source();
    }
    false
}

fn chain_has<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    chain_any(e, |c| c.is::<T>())
}

/// The error and its causes on one line, for logs.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `upstream:` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the internal FHIR endpoint; its path is prefixed to every request path.
    pub url: String,
    /// PEM CA bundle to verify an `https` upstream.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) the gateway presents to an `https` upstream.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    #[serde(default = "default_connect_timeout", with = "crate::config::duration")]
    pub connect_timeout: Duration,
    /// Time allowed until the upstream's response headers arrive.
    #[serde(default = "default_response_timeout", with = "crate::config::duration")]
    pub response_timeout: Duration,
    #[serde(default = "default_pool_idle", with = "crate::config::duration")]
    pub pool_idle_timeout: Duration,
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_host: usize,
    /// Speak HTTP/2 (prior knowledge for http, ALPN for https) to the upstream.
    #[serde(default)]
    pub http2: bool,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_pool_idle() -> Duration {
    Duration::from_secs(90)
}
fn default_pool_max_idle() -> usize {
    64
}
