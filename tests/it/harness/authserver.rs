//! The one stub authorisation server: RFC 7662 introspection with a fixed token table,
//! OpenID Connect discovery and a JWKS endpoint, which can be made to misbehave
//! ([`AsFault`]). It frames HTTP/1.1 itself, so it can also half-answer and reset.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::upstreams::read_request;
use super::Pki;

/// How the stub answers introspection calls (discovery and JWKS always answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsFault {
    /// Answers from the token table ([`answer`]).
    None,
    /// 500 `oops`.
    Status500,
    /// `{"active":` and nothing more.
    Malformed,
    /// `{"active":"true"}`: JSON, but not RFC 7662.
    ActiveAsString,
    /// A 200 HTML page.
    Html,
    /// 200 with a 1 MiB JSON body (the gateway reads at most 64 KiB).
    Huge,
    /// Answers after 5 s.
    Slow,
    /// Half a status line, then a TCP reset.
    Reset,
    /// Reads the request and never answers.
    Hang,
    /// 400 with an RFC 6749 error code about the token.
    Refuse400,
    /// 400 without an OAuth error body.
    Bare400,
    /// 401 invalid_client: the gateway's credentials are refused.
    Unauthorized401,
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The stub's token table: token → introspection response.
pub fn answer(token: &str) -> serde_json::Value {
    let exp = now() + 3600;
    match token {
        "good-token" | "good-token-2" | "good-token-3" => serde_json::json!({
            "active": true, "scope": "system/*.* openid", "client_id": "bars-sender-1",
            "sub": "bars-sender-1", "exp": exp, "iss": "https://as.example", "aud": "fhirgate"
        }),
        // Any other `good*` token: active, every system scope, client `sender-1`.
        t if t.starts_with("good") => serde_json::json!({
            "active": true, "scope": "system/*.*", "client_id": "sender-1",
            "sub": "sender-1", "exp": exp
        }),
        "writeonly-token" => serde_json::json!({
            "active": true, "scope": "system/*.write", "client_id": "writer", "exp": exp
        }),
        "patient-r-token" => serde_json::json!({
            "active": true, "scope": "system/Patient.r", "client_id": "r-only", "exp": exp
        }),
        "create-only-token" => serde_json::json!({
            "active": true, "scope": "system/Patient.c", "client_id": "c-only", "exp": exp
        }),
        "create-search-token" => serde_json::json!({
            "active": true, "scope": "system/Patient.crs system/Observation.s",
            "client_id": "c-search", "exp": exp
        }),
        "readonly-token" => serde_json::json!({
            "active": true, "scope": "system/Patient.read", "client_id": "reader", "exp": exp
        }),
        "expired-token" => {
            serde_json::json!({"active": true, "scope": "system/*.*", "exp": now() - 10})
        }
        "other-aud-token" => serde_json::json!({
            "active": true, "scope": "system/*.*", "exp": exp, "aud": ["someone-else"]
        }),
        "dpop-token" => serde_json::json!({
            "active": true, "scope": "system/*.*", "exp": exp, "token_type": "DPoP",
            "cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}
        }),
        // RFC 8705: bound to the certificate whose SHA-256 (base64url) follows the prefix.
        t if t.starts_with("bound-") => serde_json::json!({
            "active": true, "scope": "system/*.*", "exp": exp, "client_id": "bound-sender",
            "token_type": "Bearer", "cnf": {"x5t#S256": &t["bound-".len()..]}
        }),
        _ => serde_json::json!({"active": false}),
    }
}

/// What the stub has seen and serves; shared with its connection tasks.
#[derive(Default)]
struct State {
    /// Introspection calls (discovery and JWKS fetches not counted).
    calls: AtomicUsize,
    fault: Mutex<Option<AsFault>>,
    last_auth: Mutex<Option<String>>,
    last_form: Mutex<HashMap<String, String>>,
    jwks: Mutex<Option<serde_json::Value>>,
    jwks_fetches: AtomicUsize,
}

pub struct StubAs {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl StubAs {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (s, k) = (state.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let t = tokio::spawn(serve_as(tcp, addr, s.clone()));
                k.lock().expect("lock").push(t.abort_handle());
            }
        });
        StubAs {
            addr,
            state,
            task,
            conns,
        }
    }
    pub fn set(&self, f: AsFault) {
        *self.state.fault.lock().expect("lock") = Some(f);
    }
    /// Introspection calls so far.
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }
    /// The `Authorization` header of the last introspection call.
    pub fn last_auth(&self) -> Option<String> {
        self.state.last_auth.lock().expect("lock").clone()
    }
    /// The form fields of the last introspection call.
    pub fn last_form(&self) -> HashMap<String, String> {
        self.state.last_form.lock().expect("lock").clone()
    }
    /// Replaces the JWKS served at `/jwks`.
    pub fn set_jwks(&self, jwks: serde_json::Value) {
        *self.state.jwks.lock().expect("lock") = Some(jwks);
    }
    pub fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }
    /// Stops listening and drops every open connection: the server is down.
    pub fn stop(&self) {
        self.task.abort();
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }
    /// The `auth:` section for a gateway using this stub.
    pub fn auth_yaml(&self, pki: &Pki, extra: &str) -> String {
        let secret = pki.path("as-client-secret");
        std::fs::write(&secret, "s3cret\n").expect("secret");
        format!(
            "auth:\n  mode: introspection\n  introspection_endpoint: http://{}/introspect\n  \
             client_auth:\n    method: client_secret_basic\n    client_id: fhirgate-gw\n    \
             client_secret_file: {}\n  timeout: 1s\n  retries: 1\n  retry_backoff: 50ms\n{extra}",
            self.addr,
            secret.display()
        )
    }
}

impl Drop for StubAs {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_as(mut tcp: TcpStream, addr: SocketAddr, state: Arc<State>) {
    let mut buf = Vec::new();
    while let Ok(Some(req)) = read_request(&mut tcp, &mut buf).await {
        let path = req
            .request_line()
            .split(' ')
            .nth(1)
            .unwrap_or("")
            .to_owned();
        let (status, ctype, body): (&str, &str, Vec<u8>) = if path == "/jwks" {
            state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            let jwks = state.jwks.lock().expect("lock").clone();
            let jwks = jwks.unwrap_or_else(|| serde_json::json!({"keys": []}));
            ("200 OK", "application/json", jwks.to_string().into_bytes())
        } else if path == "/.well-known/openid-configuration" {
            let base = format!("http://{addr}");
            let meta = serde_json::json!({
                "issuer": base,
                "token_endpoint": format!("{base}/token"),
                "introspection_endpoint": format!("{base}/introspect"),
                "jwks_uri": format!("{base}/jwks"),
            });
            ("200 OK", "application/json", meta.to_string().into_bytes())
        } else {
            state.calls.fetch_add(1, Ordering::SeqCst);
            *state.last_auth.lock().expect("lock") = req.header("authorization").first().cloned();
            let form: HashMap<String, String> =
                form_urlencoded::parse(&req.body).into_owned().collect();
            let token = form.get("token").cloned().unwrap_or_default();
            *state.last_form.lock().expect("lock") = form;
            let good = answer(&token).to_string();
            let fault = state.fault.lock().expect("lock").unwrap_or(AsFault::None);
            match fault {
                AsFault::None => ("200 OK", "application/json", good.into_bytes()),
                AsFault::Status500 => ("500 Internal Server Error", "text/plain", b"oops".to_vec()),
                AsFault::Malformed => ("200 OK", "application/json", b"{\"active\":".to_vec()),
                AsFault::ActiveAsString => (
                    "200 OK",
                    "application/json",
                    b"{\"active\":\"true\",\"scope\":\"system/*.*\"}".to_vec(),
                ),
                AsFault::Html => (
                    "200 OK",
                    "text/html",
                    b"<html><body>Sign in</body></html>".to_vec(),
                ),
                AsFault::Huge => {
                    let mut b = vec![b' '; 1024 * 1024];
                    b.extend_from_slice(good.as_bytes());
                    ("200 OK", "application/json", b)
                }
                AsFault::Slow => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    ("200 OK", "application/json", good.into_bytes())
                }
                AsFault::Reset => {
                    let _ = tcp.write_all(b"HTTP/1.1 20").await;
                    let _ = tcp.flush().await;
                    let _ = tcp.set_zero_linger();
                    return;
                }
                AsFault::Hang => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return;
                }
                AsFault::Refuse400 => (
                    "400 Bad Request",
                    "application/json",
                    br#"{"error":"invalid_request","error_description":"token too odd"}"#.to_vec(),
                ),
                AsFault::Bare400 => (
                    "400 Bad Request",
                    "application/json",
                    b"<html>bad request</html>".to_vec(),
                ),
                AsFault::Unauthorized401 => (
                    "401 Unauthorized",
                    "application/json",
                    br#"{"error":"invalid_client"}"#.to_vec(),
                ),
            }
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if tcp.write_all(head.as_bytes()).await.is_err() || tcp.write_all(&body).await.is_err() {
            return;
        }
    }
}
