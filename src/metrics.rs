//! Prometheus metrics. One registry per process; stages record through [`Metrics`].
//!
//! Label values are always from small fixed sets (route names from config, status codes,
//! refusal kinds), never from client input, so cardinality stays bounded.

use std::sync::atomic::{AtomicI64, AtomicUsize};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Arc<str>,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeaderLabel {
    pub header: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// One of the runtimes serving connections (`server::Shards`, one per CPU).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuntimeLabel {
    pub runtime: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabel {
    pub file: String,
}

/// One fetched CRL: its bundle and URL (both from config, so the set is bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CrlLabel {
    pub bundle: String,
    pub url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CrlFailureLabel {
    pub bundle: String,
    pub url: String,
    /// One of [`crate::revocation::Failure::label`].
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub bundle: String,
    pub subject: String,
}

fn latency() -> Histogram {
    // 0.1 ms .. ~26 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// One route's request series, resolved on its first request and then used without a
/// lookup (a family hashes the label and takes a lock for every lookup). Kept with the
/// route ([`crate::pipeline::policy::Route`]); each series is created when first used,
/// as a lookup would create it.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    /// `fhirgate_requests_total{status="200"}`, the status nearly every request has.
    ok: OnceLock<Counter>,
    total: OnceLock<Histogram>,
    gateway: OnceLock<Histogram>,
    upstream: OnceLock<Histogram>,
}

pub struct Metrics {
    registry: Registry,
    /// The route label of requests no route matched, and their series.
    no_route: Arc<str>,
    no_route_metrics: RouteMetrics,
    pub requests: Family<RequestLabels, Counter>,
    pub rejections: Family<KindLabel, Counter>,
    pub request_seconds: Family<RouteLabel, Histogram, fn() -> Histogram>,
    pub gateway_seconds: Family<RouteLabel, Histogram, fn() -> Histogram>,
    pub upstream_seconds: Family<RouteLabel, Histogram, fn() -> Histogram>,
    pub upstream_errors: Family<KindLabel, Counter>,
    pub nhsd_rejections: Family<HeaderLabel, Counter>,
    pub token_cache: Family<ResultLabel, Counter>,
    pub introspections: Family<ResultLabel, Counter>,
    pub introspection_seconds: Histogram,
    pub handshakes: Family<ResultLabel, Counter>,
    pub connection_errors: Family<KindLabel, Counter>,
    pub open_connections: Gauge,
    /// Idle HTTP/1.1 connections whose HTTP buffers are released (server/connection.rs).
    pub parked_connections: Gauge,
    /// Upstream connections held by busy HTTP/1.1 client connections (pipeline/upstream.rs).
    pub pinned_upstream_connections: Gauge,
    pub reloads: Family<ResultLabel, Counter>,
    pub server_cert_not_after: Gauge<i64, AtomicI64>,
    pub crl_next_update: Family<FileLabel, Gauge<i64, AtomicI64>>,
    pub crl_fetch_success: Family<CrlLabel, Gauge<i64, AtomicI64>>,
    pub crl_fetch_failures: Family<CrlFailureLabel, Counter>,
    pub crl_fetched_next_update: Family<CrlLabel, Gauge<i64, AtomicI64>>,
    pub crl_revoked_entries: Family<CrlLabel, Gauge<i64, AtomicI64>>,
    pub rate_limited: Family<RouteLabel, Counter>,
    pub connections_over_client_cap: Counter,
    /// notAfter of each configured CA certificate, by bundle and subject.
    pub cert_not_after: Family<CertLabels, Gauge<i64, AtomicI64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fhirgate");
        let m = Metrics {
            requests: Family::default(),
            rejections: Family::default(),
            request_seconds: Family::new_with_constructor(latency),
            gateway_seconds: Family::new_with_constructor(latency),
            upstream_seconds: Family::new_with_constructor(latency),
            upstream_errors: Family::default(),
            nhsd_rejections: Family::default(),
            token_cache: Family::default(),
            introspections: Family::default(),
            introspection_seconds: latency(),
            handshakes: Family::default(),
            connection_errors: Family::default(),
            open_connections: Gauge::default(),
            parked_connections: Gauge::default(),
            pinned_upstream_connections: Gauge::default(),
            reloads: Family::default(),
            server_cert_not_after: Gauge::default(),
            crl_next_update: Family::default(),
            crl_fetch_success: Family::default(),
            crl_fetch_failures: Family::default(),
            crl_fetched_next_update: Family::default(),
            crl_revoked_entries: Family::default(),
            rate_limited: Family::default(),
            connections_over_client_cap: Counter::default(),
            cert_not_after: Family::default(),
            registry: Registry::default(),
            no_route: Arc::from("-"),
            no_route_metrics: RouteMetrics::default(),
        };
        registry.register(
            "requests",
            "HTTP requests by route and status",
            m.requests.clone(),
        );
        registry.register(
            "rejections",
            "Requests refused by the gateway, by reason",
            m.rejections.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Total time to response headers, by route",
            m.request_seconds.clone(),
        );
        registry.register(
            "gateway_duration_seconds",
            "Time spent in the gateway itself (total minus upstream), by route",
            m.gateway_seconds.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Upstream time to response headers, by route",
            m.upstream_seconds.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed upstream requests by kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "nhsd_rejections",
            "Requests refused for an NHSD-* / X-Request-ID / X-Correlation-ID header, by header",
            m.nhsd_rejections.clone(),
        );
        registry.register(
            "token_cache",
            "Token cache lookups by result",
            m.token_cache.clone(),
        );
        registry.register(
            "introspections",
            "Calls to the authorisation server (introspection or JWKS verification) by result",
            m.introspections.clone(),
        );
        registry.register(
            "introspection_duration_seconds",
            "Time per call to the authorisation server",
            m.introspection_seconds.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes by result",
            m.handshakes.clone(),
        );
        registry.register(
            "connection_errors",
            "Client connections ended by an HTTP protocol error or timeout, by kind",
            m.connection_errors.clone(),
        );
        registry.register(
            "open_connections",
            "Client connections currently open",
            m.open_connections.clone(),
        );
        registry.register(
            "parked_connections",
            "Idle HTTP/1.1 client connections holding only their TLS session (HTTP buffers released until the next request)",
            m.parked_connections.clone(),
        );
        registry.register(
            "upstream_pinned_connections",
            "Upstream connections a busy HTTP/1.1 client connection holds for its own requests (at most upstream.max_pinned_connections)",
            m.pinned_upstream_connections.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads by result",
            m.reloads.clone(),
        );
        registry.register(
            "server_cert_not_after_seconds",
            "notAfter of the server certificate, Unix seconds",
            m.server_cert_not_after.clone(),
        );
        registry.register(
            "crl_next_update_seconds",
            "nextUpdate of each configured CRL, Unix seconds",
            m.crl_next_update.clone(),
        );
        registry.register(
            "crl_fetch_success_timestamp_seconds",
            "Last time each CRL URL answered with a valid CRL, Unix seconds",
            m.crl_fetch_success.clone(),
        );
        registry.register(
            "crl_fetch_failures",
            "CRL fetches refused, by bundle, URL and reason",
            m.crl_fetch_failures.clone(),
        );
        registry.register(
            "crl_fetched_next_update_seconds",
            "nextUpdate of the CRL held for each CRL URL, Unix seconds",
            m.crl_fetched_next_update.clone(),
        );
        registry.register(
            "crl_revoked_certificates",
            "Entries in the CRL held for each CRL URL",
            m.crl_revoked_entries.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused with 429 by a per-client rate limit, by route ('-': no route)",
            m.rate_limited.clone(),
        );
        registry.register(
            "connections_over_client_cap",
            "Connections refused because their client already had limits.max_connections_per_client open",
            m.connections_over_client_cap.clone(),
        );
        registry.register(
            "cert_not_after_seconds",
            "notAfter of each trust-bundle CA certificate (Root CA, SubCA), Unix seconds",
            m.cert_not_after.clone(),
        );
        registry.register_collector(Box::new(LogLinesDropped));
        Metrics { registry, ..m }
    }

    /// Replaces the CA notAfter gauges with `(bundle, subject, notAfter)` of the current
    /// configuration, so removed CAs do not linger after a reload.
    pub fn set_cert_not_after<'a>(&self, certs: impl Iterator<Item = (&'a str, &'a str, i64)>) {
        self.cert_not_after.clear();
        for (bundle, subject, t) in certs {
            self.cert_not_after
                .get_or_create(&CertLabels {
                    bundle: bundle.to_owned(),
                    subject: subject.to_owned(),
                })
                .set(t);
        }
    }

    pub fn handshake(&self, result: &str) {
        self.handshakes
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// One answered request; `route` is `None` when no route matched (label `-`).
    pub fn request(
        &self,
        route: Option<&Arc<str>>,
        status: u16,
        total: Duration,
        upstream: Option<Duration>,
    ) {
        match route {
            Some(r) => self.request_on(r, &RouteMetrics::default(), status, total, upstream),
            None => self.request_on(
                &self.no_route,
                &self.no_route_metrics,
                status,
                total,
                upstream,
            ),
        }
    }

    /// [`Metrics::request`] for a matched route, through the route's own handles.
    pub fn request_on(
        &self,
        route: &Arc<str>,
        handles: &RouteMetrics,
        status: u16,
        total: Duration,
        upstream: Option<Duration>,
    ) {
        let requests = |status| {
            self.requests.get_or_create(&RequestLabels {
                route: route.clone(),
                status,
            })
        };
        if status == 200 {
            handles.ok.get_or_init(|| requests(200).clone()).inc();
        } else {
            requests(status).inc();
        }
        let label = || RouteLabel {
            route: route.clone(),
        };
        handles
            .total
            .get_or_init(|| self.request_seconds.get_or_create(&label()).clone())
            .observe(total.as_secs_f64());
        let own = total.saturating_sub(upstream.unwrap_or_default());
        handles
            .gateway
            .get_or_init(|| self.gateway_seconds.get_or_create(&label()).clone())
            .observe(own.as_secs_f64());
        if let Some(u) = upstream {
            handles
                .upstream
                .get_or_init(|| self.upstream_seconds.get_or_create(&label()).clone())
                .observe(u.as_secs_f64());
        }
    }

    pub fn rejection(&self, kind: &str) {
        self.rejections
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn connection_error(&self, kind: &str) {
        self.connection_errors
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn upstream_error(&self, kind: &str) {
        self.upstream_errors
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// Classic Prometheus text format 0.0.4 (`text/plain; version=0.0.4`), converted
    /// from the OpenMetrics encoding: counters' `# HELP`/`# TYPE` lines name the
    /// `_total` series (Prometheus text has no family/sample split), `unknown` becomes
    /// `untyped`, and `# UNIT` / `# EOF` (OpenMetrics only) are dropped. Samples are
    /// unchanged: both formats write them the same way.
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode())
    }

    /// Reports `fhirgate_runtime_connections{runtime}` from the connection runtimes' own
    /// counts (`server::Shards`, one per CPU), read at each scrape.
    pub fn count_runtimes(&mut self, open: Vec<Arc<AtomicUsize>>) {
        self.registry
            .register_collector(Box::new(RuntimeConnections(open)));
    }

    /// OpenMetrics 1.0 text (`application/openmetrics-text; version=1.0.0`).
    pub fn encode(&self) -> String {
        let mut s = String::new();
        if prometheus_client::encoding::text::encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        s
    }
}

/// `fhirgate_log_lines_dropped_total`: read from the log writer at each scrape.
#[derive(Debug)]
struct LogLinesDropped;

impl prometheus_client::collector::Collector for LogLinesDropped {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let counter =
            prometheus_client::metrics::counter::ConstCounter::new(crate::logging::dropped_lines());
        let metric = encoder.encode_descriptor(
            "log_lines_dropped",
            "Log lines (access lines included) dropped because stderr could not keep up",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

/// `fhirgate_runtime_connections{runtime}`: see [`Metrics::count_runtimes`]. A runtime
/// serving far more than the others shows an uneven spread of busy connections.
#[derive(Debug)]
struct RuntimeConnections(Vec<Arc<AtomicUsize>>);

impl prometheus_client::collector::Collector for RuntimeConnections {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let mut metric = encoder.encode_descriptor(
            "runtime_connections",
            "Client connections each runtime serves now (one runtime per CPU; absent on one CPU)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (i, open) in self.0.iter().enumerate() {
            let n =
                i64::try_from(open.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(i64::MAX);
            let label = RuntimeLabel {
                runtime: u32::try_from(i).unwrap_or(u32::MAX),
            };
            prometheus_client::metrics::gauge::ConstGauge::new(n)
                .encode(metric.encode_family(&label)?)?;
        }
        Ok(())
    }
}

/// See [`Metrics::encode_prometheus`].
pub fn openmetrics_to_prometheus(om: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name.to_owned());
            }
        }
    }
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_owned()
                };
                let tail = if p == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                };
                // OpenMetrics escapes `"` in HELP text; Prometheus text does not.
                let tail = if p == "# HELP " {
                    tail.replace("\\\"", "\"")
                } else {
                    tail.to_owned()
                };
                out.push_str(p);
                out.push_str(&name);
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(&tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counter_series_and_has_no_eof() {
        let m = Metrics::new();
        m.request(
            Some(&Arc::from("fhir")),
            200,
            Duration::from_millis(3),
            None,
        );
        m.reload(false);
        let om = m.encode();
        assert!(om.contains("# TYPE fhirgate_requests counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = m.encode_prometheus();
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains("# TYPE fhirgate_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP fhirgate_requests_total HTTP requests by route and status.\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE fhirgate_reloads_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE fhirgate_open_connections gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE fhirgate_request_duration_seconds histogram\n"),
            "{text}"
        );
        // Samples are byte-identical in both formats.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&om), samples(&text));
        assert!(
            text.contains("fhirgate_reloads_total{result=\"error\"} 1\n"),
            "{text}"
        );

        let converted = openmetrics_to_prometheus(
            r#"# HELP a Say \"hi\" \\ there.
# TYPE a unknown
a 1
# EOF
"#,
        );
        assert_eq!(
            converted,
            r#"# HELP a Say "hi" \\ there.
# TYPE a untyped
a 1
"#
        );
    }

    /// A route's own handles count into the same series a lookup finds, and create a
    /// series only when it is first used, as a lookup would.
    #[test]
    fn route_handles_share_the_series_and_create_them_when_used() {
        let m = Metrics::new();
        let fhir: Arc<str> = Arc::from("fhir");
        let handles = RouteMetrics::default();
        let ms = Duration::from_millis;
        m.request_on(&fhir, &handles, 404, ms(1), None);
        let text = m.encode();
        assert!(!text.contains("status=\"200\""), "{text}");
        assert!(
            !text.contains("fhirgate_upstream_duration_seconds_count"),
            "{text}"
        );
        m.request_on(&fhir, &handles, 200, ms(3), Some(ms(2)));
        m.request_on(&fhir, &handles, 200, ms(3), Some(ms(2)));
        m.request(Some(&fhir), 200, ms(3), Some(ms(2)));
        m.request(None, 200, ms(1), None);
        let text = m.encode();
        for line in [
            "fhirgate_requests_total{route=\"fhir\",status=\"200\"} 3",
            "fhirgate_requests_total{route=\"fhir\",status=\"404\"} 1",
            "fhirgate_requests_total{route=\"-\",status=\"200\"} 1",
            "fhirgate_request_duration_seconds_count{route=\"fhir\"} 4",
            "fhirgate_gateway_duration_seconds_count{route=\"fhir\"} 4",
            "fhirgate_upstream_duration_seconds_count{route=\"fhir\"} 3",
            "fhirgate_request_duration_seconds_count{route=\"-\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn encodes_counters_histograms_and_gauges() {
        let m = Metrics::new();
        m.request(
            Some(&Arc::from("fhir")),
            200,
            Duration::from_millis(3),
            Some(Duration::from_millis(2)),
        );
        m.handshake("revoked");
        m.rejection("no_route");
        m.reload(false);
        m.server_cert_not_after.set(1_900_000_000);
        let text = m.encode();
        // Read from the log writer at each scrape; present (0) before any drop.
        assert!(
            text.contains(
                "# TYPE fhirgate_log_lines_dropped counter\nfhirgate_log_lines_dropped_total "
            ),
            "{text}"
        );
        assert!(
            text.contains("fhirgate_requests_total{route=\"fhir\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fhirgate_tls_handshakes_total{result=\"revoked\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fhirgate_rejections_total{kind=\"no_route\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fhirgate_reloads_total{result=\"error\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fhirgate_upstream_duration_seconds_count{route=\"fhir\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fhirgate_server_cert_not_after_seconds 1900000000"),
            "{text}"
        );
    }

    #[test]
    fn every_family_is_exported() {
        let m = Metrics::new();
        let r = |s: &str| ResultLabel { result: s.into() };
        m.token_cache.get_or_create(&r("hit")).inc();
        m.introspections.get_or_create(&r("ok")).inc();
        m.introspection_seconds.observe(0.01);
        m.nhsd_rejections
            .get_or_create(&HeaderLabel {
                header: "x-request-id".into(),
            })
            .inc();
        let text = m.encode();
        for want in [
            "fhirgate_token_cache_total{result=\"hit\"} 1",
            "fhirgate_introspections_total{result=\"ok\"} 1",
            "fhirgate_introspection_duration_seconds_count 1",
            "fhirgate_nhsd_rejections_total{header=\"x-request-id\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
