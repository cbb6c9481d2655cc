//! Built-in development upstream: a tiny FHIR-ish server on loopback so that
//! `fhirgate demo` works with nothing else installed. Development only: it has no
//! security of its own and is never started by `fhirgate run`.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const FHIR_JSON: &str = "application/fhir+json";

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(FHIR_JSON),
    );
    r
}

/// Headers the gateway sets, echoed back so a developer can see what the upstream got.
fn seen_headers(req: &Request<Incoming>) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in req.headers() {
        let k = k.as_str();
        if k.starts_with("x-client-cert-")
            || k.starts_with("x-fhirgate-")
            || k.starts_with("x-forwarded-")
        {
            m.insert(k.to_owned(), v.to_str().unwrap_or("(binary)").into());
        }
    }
    serde_json::Value::Object(m)
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let seen = seen_headers(&req);
    let resp = match (req.method().clone(), path.as_str()) {
        (Method::GET, "/metadata") => json(
            StatusCode::OK,
            serde_json::json!({
                "resourceType": "CapabilityStatement",
                "status": "active",
                "kind": "instance",
                "fhirVersion": "4.0.1",
                "format": ["application/fhir+json"],
                "software": {"name": "fhirgate development upstream"},
                "rest": [{"mode": "server", "resource": [{"type": "Patient", "interaction": [{"code": "read"}]}],
                          "operation": [{"name": "process-message", "definition": "http://hl7.org/fhir/OperationDefinition/MessageHeader-process-message"}]}]
            }),
        ),
        (Method::GET, p) if p.starts_with("/Patient/") => json(
            StatusCode::OK,
            serde_json::json!({
                "resourceType": "Patient",
                "id": p.trim_start_matches("/Patient/"),
                "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9000000009"}],
                "name": [{"family": "Smith", "given": ["Jane"]}],
                "meta": {"tag": [{"display": "fhirgate development sample"}]},
                "extension": [{"url": "urn:fhirgate:seen-headers", "valueString": seen.to_string()}]
            }),
        ),
        (Method::POST, "/$process-message") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => Bytes::new(),
            };
            let mut r = Response::new(Full::new(body));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(FHIR_JSON),
            );
            r
        }
        _ => json(
            StatusCode::OK,
            serde_json::json!({"resourceType": "Parameters", "parameter": [
                {"name": "path", "valueString": path},
                {"name": "seen-headers", "valueString": seen.to_string()}
            ]}),
        ),
    };
    Ok(resp)
}

/// Serves the development upstream on `listener` forever.
pub async fn serve_upstream(listener: TcpListener) {
    let http = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let http = http.clone();
        tokio::spawn(async move {
            let _ = http
                .serve_connection(TokioIo::new(tcp), service_fn(handle))
                .await;
        });
    }
}

/// Binds and spawns the development upstream; returns its address.
pub async fn spawn_upstream(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    // Name the address: "Address already in use" alone does not say which port.
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("upstream.url (demo upstream): cannot bind {addr}: {e}"),
        )
    })?;
    let local = listener.local_addr()?;
    tokio::spawn(serve_upstream(listener));
    Ok(local)
}
