//! OTLP/HTTP (protobuf) export of one span per request, behind the `otlp` cargo feature.
//!
//! The span is the gateway's hop in the W3C trace ([`TraceContext`]): its span id is the
//! parent-id sent upstream, its parent the caller's span. Spans are handed to the SDK's
//! batch processor (its own thread, bounded queue: a slow collector drops spans, never
//! delays requests); the processor's HTTP requests run on the gateway's tokio runtime
//! through hyper, so no second HTTP or TLS stack is linked. Only `http://` collectors
//! (a local agent or sidecar) are supported.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use opentelemetry_sdk::Resource;

use crate::config::error::{err, ConfigError};
use crate::pipeline::tracecontext::{TelemetryConfig, TraceContext};

/// What one request contributes to its span.
pub struct RequestSpan<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub rejection: Option<&'static str>,
    pub start: SystemTime,
    pub end: SystemTime,
}

#[derive(Debug)]
pub struct Exporter {
    processor: Option<BatchSpanProcessor>,
    scope: InstrumentationScope,
}

impl Exporter {
    /// Needs a tokio runtime (the exporter's HTTP requests run on it).
    pub fn new(cfg: &TelemetryConfig, endpoint: &str) -> Result<Self, ConfigError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            err(
                "telemetry.otlp_endpoint",
                "OTLP export needs the gateway's runtime",
            )
        })?;
        let client = TokioHyper {
            handle,
            client: Client::builder(TokioExecutor::new()).build_http(),
            timeout: cfg.export_timeout,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(cfg.export_timeout)
            .build()
            .map_err(|e| err("telemetry.otlp_endpoint", e.to_string()))?;
        let mut processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(cfg.export_interval)
                    .with_max_queue_size(4096)
                    .build(),
            )
            .build();
        processor.set_resource(
            &Resource::builder_empty()
                .with_service_name(cfg.service_name.clone())
                .build(),
        );
        Ok(Exporter {
            processor: Some(processor),
            scope: InstrumentationScope::builder("fhirgate")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        })
    }

    /// Queues the span of one finished request (never blocks).
    pub fn record(&self, tc: &TraceContext, r: &RequestSpan<'_>) {
        let Some(p) = &self.processor else {
            return;
        };
        if !tc.sampled {
            // The caller asked for this trace not to be recorded.
            return;
        }
        let flags = TraceFlags::SAMPLED;
        let mut attributes = vec![
            KeyValue::new("http.request.method", r.method.to_owned()),
            KeyValue::new("url.path", r.path.to_owned()),
            KeyValue::new("http.route", r.route.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(r.status)),
        ];
        if let Some(reason) = r.rejection {
            attributes.push(KeyValue::new("fhirgate.rejection", reason));
        }
        p.on_end(SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(tc.trace_id),
                SpanId::from_bytes(tc.span_id),
                flags,
                false,
                TraceState::default(),
            ),
            parent_span_id: tc.parent_id.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: tc.parent_id.is_some(),
            span_kind: SpanKind::Server,
            name: Cow::Owned(format!("{} {}", r.method, r.route)),
            start_time: r.start,
            end_time: r.end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if r.status >= 500 {
                Status::error("")
            } else {
                Status::Unset
            },
            instrumentation_scope: self.scope.clone(),
        });
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // Shutting down flushes and joins the batch thread, whose last export runs on
        // the tokio runtime: do it on a plain thread so a runtime worker never waits
        // for itself.
        if let Some(p) = self.processor.take() {
            std::thread::spawn(move || {
                let _ = p.shutdown_with_timeout(Duration::from_secs(5));
            });
        }
    }
}

/// The exporter's HTTP client: hyper on the gateway's tokio runtime, called from the SDK's
/// batch thread.
#[derive(Debug)]
struct TokioHyper {
    handle: tokio::runtime::Handle,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

#[async_trait::async_trait]
impl HttpClient for TokioHyper {
    async fn send_bytes(&self, req: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let task = self.handle.spawn(async move {
            let (parts, body) = req.into_parts();
            let req = Request::from_parts(parts, Full::new(body));
            let resp = tokio::time::timeout(timeout, client.request(req))
                .await
                .map_err(|_| HttpError::from("OTLP collector did not answer in time"))??;
            let (parts, body) = resp.into_parts();
            // A collector's answer is small; anything bigger is not read.
            let body = Limited::new(body, 64 * 1024)
                .collect()
                .await
                .map_err(|e| HttpError::from(e.to_string()))?
                .to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        });
        task.await.map_err(|e| HttpError::from(e.to_string()))?
    }
}
