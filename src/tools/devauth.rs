//! Built-in development authorisation server for `fhirgate demo`: OpenID discovery
//! (ITI-103), an OAuth 2.0 client-credentials token endpoint that authenticates clients
//! with `client_secret_basic` or a signed JWT assertion (`private_key_jwt`, RFC 7523), and
//! RFC 7662 token introspection (ITI-102) for the gateway.
//!
//! Development only: tokens are opaque random strings kept in memory, the clients are
//! fixed (their secrets and keys are generated into the dev PKI directory, never
//! committed), and `fhirgate run` never starts it. It is strict where being lax would
//! hide a sender's bug: duplicate form parameters, a wrong assertion audience, a replayed
//! `jti` or an unknown scope are refused with the RFC 6749 error codes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::pipeline::auth::client_auth::ASSERTION_TYPE;

/// The gateway's own client (introspection only).
pub const GATEWAY_CLIENT_ID: &str = "fhirgate-gateway";
/// A BaRS sender authenticating with a client secret (HTTP Basic).
pub const SENDER_CLIENT_ID: &str = "bars-sender";
/// A BaRS sender authenticating with a signed JWT client assertion (ES256).
pub const SENDER_JWT_CLIENT_ID: &str = "bars-sender-jwt";
/// A sender allowed to read Patients only: shows scope enforcement.
pub const READER_CLIENT_ID: &str = "bars-reader";

/// File names (in the dev PKI directory) of the generated client credentials.
pub const GATEWAY_SECRET_FILE: &str = "auth-gateway.secret";
pub const SENDER_SECRET_FILE: &str = "auth-sender.secret";
pub const READER_SECRET_FILE: &str = "auth-reader.secret";
pub const SENDER_JWT_KEY_FILE: &str = "auth-sender-jwt.key";
pub const SENDER_JWT_PUB_FILE: &str = "auth-sender-jwt.pub";

/// Longest accepted lifetime of a client assertion (NHS APIM allows five minutes).
const MAX_ASSERTION_LIFETIME: u64 = 300;
const MAX_FORM_BYTES: usize = 16 * 1024;

/// The generated secrets and key of the development clients.
pub struct DevCredentials {
    pub gateway_secret: String,
    pub sender_secret: String,
    pub reader_secret: String,
    pub sender_jwt_public_pem: String,
}

fn random_secret() -> String {
    // Two v4 UUIDs: 244 random bits from the OS generator.
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

fn read_or_create(
    path: &Path,
    make: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        _ => {
            let s = make()?;
            crate::tools::pki::write_private(path, &format!("{s}\n"))?;
            Ok(s)
        }
    }
}

/// Reads the development client credentials from `dir`, generating any that are missing
/// (secret files and keys mode 0600).
pub fn ensure_credentials(dir: &Path) -> anyhow::Result<DevCredentials> {
    std::fs::create_dir_all(dir)?;
    let gateway_secret = read_or_create(&dir.join(GATEWAY_SECRET_FILE), || Ok(random_secret()))?;
    let sender_secret = read_or_create(&dir.join(SENDER_SECRET_FILE), || Ok(random_secret()))?;
    let reader_secret = read_or_create(&dir.join(READER_SECRET_FILE), || Ok(random_secret()))?;
    let key_path = dir.join(SENDER_JWT_KEY_FILE);
    let pub_path = dir.join(SENDER_JWT_PUB_FILE);
    let sender_jwt_public_pem = match (
        std::fs::read_to_string(&key_path),
        std::fs::read_to_string(&pub_path),
    ) {
        (Ok(_), Ok(p)) => p,
        _ => {
            let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            crate::tools::pki::write_private(&key_path, &kp.serialize_pem())?;
            let p = kp.public_key_pem();
            std::fs::write(&pub_path, &p)?;
            p
        }
    };
    Ok(DevCredentials {
        gateway_secret,
        sender_secret,
        reader_secret,
        sender_jwt_public_pem,
    })
}

enum Credential {
    Secret([u8; 32]),
    PublicKey(Box<DecodingKey>),
}

struct Client {
    credential: Credential,
    scopes: Vec<String>,
    may_introspect: bool,
}

struct Issued {
    client_id: String,
    scope: String,
    iat: u64,
    exp: u64,
}

/// The development authorisation server's state.
pub struct DevAuthServer {
    issuer: String,
    clients: HashMap<String, Client>,
    tokens: Mutex<HashMap<String, Issued>>,
    seen_jti: Mutex<HashMap<String, u64>>,
    token_lifetime: Duration,
    introspections: AtomicU64,
    tokens_issued: AtomicU64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// RFC 6749 §5.2 error.
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

fn oauth_err(status: StatusCode, error: &'static str, d: impl Into<String>) -> OAuthError {
    OAuthError {
        status,
        error,
        description: d.into(),
    }
}

fn invalid_client(d: impl Into<String>) -> OAuthError {
    oauth_err(StatusCode::UNAUTHORIZED, "invalid_client", d)
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    // RFC 6749 §5.1: token responses must not be cached.
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

impl OAuthError {
    fn response(&self) -> Response<Full<Bytes>> {
        let mut r = json_response(
            self.status,
            &json!({"error": self.error, "error_description": self.description}),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"fhirgate-dev-auth\""),
            );
        }
        r
    }
}

/// Parses an `application/x-www-form-urlencoded` body, refusing repeated parameters
/// (RFC 6749 §3.2).
fn parse_form(body: &[u8]) -> Result<HashMap<String, String>, OAuthError> {
    let mut out = HashMap::new();
    for (k, v) in form_urlencoded::parse(body) {
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(oauth_err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("parameter {k} given more than once"),
            ));
        }
    }
    Ok(out)
}

/// The claims of a JWT, read without verifying it (to find which client's key to use).
fn unverified_claims(jwt: &str) -> Option<Value> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl DevAuthServer {
    /// A server for `issuer` (e.g. `https://localhost:9443`) with the demo's clients.
    pub fn new(issuer: &str, creds: &DevCredentials) -> anyhow::Result<Self> {
        let issuer = issuer.trim_end_matches('/').to_owned();
        let mut clients = HashMap::new();
        let all = vec!["system/*.*".to_owned(), "system/Patient.read".to_owned()];
        clients.insert(
            GATEWAY_CLIENT_ID.to_owned(),
            Client {
                credential: Credential::Secret(digest(&creds.gateway_secret)),
                scopes: Vec::new(),
                may_introspect: true,
            },
        );
        clients.insert(
            SENDER_CLIENT_ID.to_owned(),
            Client {
                credential: Credential::Secret(digest(&creds.sender_secret)),
                scopes: all.clone(),
                may_introspect: false,
            },
        );
        clients.insert(
            READER_CLIENT_ID.to_owned(),
            Client {
                credential: Credential::Secret(digest(&creds.reader_secret)),
                scopes: vec!["system/Patient.read".to_owned()],
                may_introspect: false,
            },
        );
        let key = DecodingKey::from_ec_pem(creds.sender_jwt_public_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("{SENDER_JWT_PUB_FILE}: {e}"))?;
        clients.insert(
            SENDER_JWT_CLIENT_ID.to_owned(),
            Client {
                credential: Credential::PublicKey(Box::new(key)),
                scopes: all,
                may_introspect: false,
            },
        );
        Ok(DevAuthServer {
            issuer,
            clients,
            tokens: Mutex::new(HashMap::new()),
            seen_jti: Mutex::new(HashMap::new()),
            token_lifetime: Duration::from_secs(300),
            introspections: AtomicU64::new(0),
            tokens_issued: AtomicU64::new(0),
        })
    }

    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.issuer)
    }
    pub fn introspection_endpoint(&self) -> String {
        format!("{}/introspect", self.issuer)
    }
    /// Introspection requests answered so far.
    pub fn introspections(&self) -> u64 {
        self.introspections.load(Ordering::Relaxed)
    }

    fn discovery(&self) -> Value {
        json!({
            "issuer": self.issuer,
            "token_endpoint": self.token_endpoint(),
            "introspection_endpoint": self.introspection_endpoint(),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["ES256"],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
            "scopes_supported": ["system/*.*", "system/Patient.read"],
        })
    }

    /// Authenticates the calling client by exactly one method (RFC 6749 §2.3).
    fn authenticate(
        &self,
        headers: &HeaderMap,
        form: &HashMap<String, String>,
        endpoint: &str,
    ) -> Result<(&str, &Client), OAuthError> {
        let basic = headers.get(header::AUTHORIZATION);
        let assertion = form.get("client_assertion");
        match (basic, assertion) {
            (Some(_), Some(_)) => Err(oauth_err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "more than one client authentication method",
            )),
            (None, None) => Err(invalid_client("client authentication required")),
            (Some(h), None) => self.basic(h),
            (None, Some(jwt)) => {
                if form.get("client_assertion_type").map(String::as_str) != Some(ASSERTION_TYPE) {
                    return Err(oauth_err(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        format!("client_assertion_type must be {ASSERTION_TYPE}"),
                    ));
                }
                self.assertion(jwt, form.get("client_id"), endpoint)
            }
        }
    }

    fn basic(&self, h: &header::HeaderValue) -> Result<(&str, &Client), OAuthError> {
        let bad = || invalid_client("malformed Basic credentials");
        let v = h.to_str().map_err(|_| bad())?;
        let b64 = v
            .strip_prefix("Basic ")
            .or_else(|| v.strip_prefix("basic "))
            .ok_or_else(bad)?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| bad())?;
        let raw = String::from_utf8(raw).map_err(|_| bad())?;
        let (id, secret) = raw.split_once(':').ok_or_else(bad)?;
        // RFC 6749 §2.3.1: both parts are form-encoded before Base64.
        let decode = |s: &str| -> String {
            form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let (id, secret) = (decode(id), decode(secret));
        let (id, client) = self
            .clients
            .get_key_value(&id)
            .ok_or_else(|| invalid_client("unknown client or wrong secret"))?;
        match &client.credential {
            // Digests compared, so the comparison time says nothing about the secret.
            Credential::Secret(d) if *d == digest(&secret) => Ok((id.as_str(), client)),
            _ => Err(invalid_client("unknown client or wrong secret")),
        }
    }

    fn assertion(
        &self,
        jwt: &str,
        form_client_id: Option<&String>,
        endpoint: &str,
    ) -> Result<(&str, &Client), OAuthError> {
        let claims = unverified_claims(jwt).ok_or_else(|| invalid_client("malformed assertion"))?;
        let iss = claims["iss"].as_str().unwrap_or_default();
        if form_client_id.is_some_and(|c| c != iss) {
            return Err(invalid_client(
                "client_id does not match the assertion's iss",
            ));
        }
        let (id, client) = self
            .clients
            .get_key_value(iss)
            .ok_or_else(|| invalid_client("unknown client"))?;
        let Credential::PublicKey(key) = &client.credential else {
            return Err(invalid_client(
                "client is not registered for private_key_jwt",
            ));
        };
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[endpoint, self.issuer.as_str()]);
        v.set_issuer(&[id.as_str()]);
        v.sub = Some(id.clone());
        v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        v.leeway = 5;
        let data = jsonwebtoken::decode::<Value>(jwt, key, &v)
            .map_err(|e| invalid_client(format!("assertion refused: {e}")))?;
        let c = data.claims;
        let exp = c["exp"].as_u64().unwrap_or(0);
        let t = now();
        if exp > t + MAX_ASSERTION_LIFETIME {
            return Err(invalid_client("assertion lives longer than five minutes"));
        }
        let jti = c["jti"]
            .as_str()
            .ok_or_else(|| invalid_client("assertion has no jti"))?;
        let mut seen = self
            .seen_jti
            .lock()
            .map_err(|_| oauth_err(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "lock"))?;
        seen.retain(|_, e| *e + 5 >= t);
        if seen.insert(format!("{id}\n{jti}"), exp).is_some() {
            return Err(invalid_client("assertion jti already used"));
        }
        Ok((id.as_str(), client))
    }

    fn token(&self, headers: &HeaderMap, body: &[u8]) -> Result<Value, OAuthError> {
        let form = parse_form(body)?;
        let (id, client) = self.authenticate(headers, &form, &self.token_endpoint())?;
        match form.get("grant_type").map(String::as_str) {
            Some("client_credentials") => {}
            Some(_) => {
                return Err(oauth_err(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    "only client_credentials",
                ))
            }
            None => {
                return Err(oauth_err(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "grant_type is required",
                ))
            }
        }
        if client.scopes.is_empty() {
            return Err(oauth_err(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                "this client may not obtain tokens",
            ));
        }
        let scope = match form.get("scope") {
            None => client.scopes.join(" "),
            Some(s) => {
                let asked: Vec<&str> = s.split(' ').filter(|x| !x.is_empty()).collect();
                if let Some(bad) = asked
                    .iter()
                    .find(|a| !client.scopes.iter().any(|c| c == *a))
                {
                    return Err(oauth_err(
                        StatusCode::BAD_REQUEST,
                        "invalid_scope",
                        format!("{bad} is not granted to {id}"),
                    ));
                }
                asked.join(" ")
            }
        };
        let token = random_secret();
        let t = now();
        let life = self.token_lifetime.as_secs();
        let mut tokens = self
            .tokens
            .lock()
            .map_err(|_| oauth_err(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "lock"))?;
        tokens.retain(|_, i| i.exp > t);
        tokens.insert(
            token.clone(),
            Issued {
                client_id: id.to_owned(),
                scope: scope.clone(),
                iat: t,
                exp: t + life,
            },
        );
        self.tokens_issued.fetch_add(1, Ordering::Relaxed);
        tracing::info!(client_id = id, %scope, "dev auth: token issued");
        Ok(json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": life,
            "scope": scope,
        }))
    }

    fn introspect(&self, headers: &HeaderMap, body: &[u8]) -> Result<Value, OAuthError> {
        let form = parse_form(body)?;
        let (_, client) = self.authenticate(headers, &form, &self.introspection_endpoint())?;
        if !client.may_introspect {
            return Err(oauth_err(
                StatusCode::FORBIDDEN,
                "unauthorized_client",
                "this client may not introspect",
            ));
        }
        let token = form.get("token").ok_or_else(|| {
            oauth_err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "token is required",
            )
        })?;
        self.introspections.fetch_add(1, Ordering::Relaxed);
        let tokens = self
            .tokens
            .lock()
            .map_err(|_| oauth_err(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "lock"))?;
        Ok(match tokens.get(token) {
            Some(i) if i.exp > now() => json!({
                "active": true,
                "scope": i.scope,
                "client_id": i.client_id,
                "sub": i.client_id,
                "token_type": "Bearer",
                "iss": self.issuer,
                "iat": i.iat,
                "exp": i.exp,
            }),
            // RFC 7662 §2.2: unknown, expired and revoked tokens all look the same.
            _ => json!({"active": false}),
        })
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let method = &parts.method;
        if path == "/.well-known/openid-configuration" && *method == Method::GET {
            return json_response(StatusCode::OK, &self.discovery());
        }
        let post_endpoint = matches!(path, "/token" | "/introspect");
        if !post_endpoint {
            return json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"}));
        }
        if *method != Method::POST {
            return oauth_err(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "use POST",
            )
            .response();
        }
        let form_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if !form_type {
            return oauth_err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "content-type must be application/x-www-form-urlencoded",
            )
            .response();
        }
        let body = match Limited::new(body, MAX_FORM_BYTES).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return oauth_err(StatusCode::BAD_REQUEST, "invalid_request", "body too large")
                    .response()
            }
        };
        let result = if path == "/token" {
            self.token(&parts.headers, &body)
        } else {
            self.introspect(&parts.headers, &body)
        };
        match result {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) => {
                tracing::info!(error = e.error, detail = %e.description, path, "dev auth: refused");
                e.response()
            }
        }
    }

    /// Serves HTTPS on `listener` until the runtime stops.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: TlsAcceptor) {
        let http = auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (http, tls, me) = (http.clone(), tls.clone(), self.clone());
            tokio::spawn(async move {
                let Ok(Ok(stream)) =
                    tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
                else {
                    return;
                };
                let svc = service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.handle(req).await) }
                });
                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    }
}

/// Binds `addr` and serves the development authorisation server over TLS with the
/// given server certificate chain and key (PEM files). Returns the bound address.
pub async fn spawn(
    server: Arc<DevAuthServer>,
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<SocketAddr> {
    let certs = crate::tls::load_certs("tls.server_cert", cert)?;
    let key = crate::tls::load_key("tls.server_key", key)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Name the address: "Address already in use" alone does not say which port.
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("auth.issuer (demo authorisation server): cannot bind {addr}: {e}"),
        )
    })?;
    let local = listener.local_addr()?;
    tokio::spawn(server.serve(listener, TlsAcceptor::from(Arc::new(cfg))));
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds_with_key() -> (DevCredentials, rcgen::KeyPair) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let c = DevCredentials {
            gateway_secret: "gw".into(),
            sender_secret: "s3cret".into(),
            reader_secret: "r".into(),
            sender_jwt_public_pem: kp.public_key_pem(),
        };
        (c, kp)
    }

    fn creds() -> DevCredentials {
        creds_with_key().0
    }

    /// The form a sender posts with a client assertion signed by `kp`, built by the
    /// gateway's own private_key_jwt code.
    fn assertion_form(kp: &rcgen::KeyPair, client_id: &str, aud: &str) -> String {
        let cred = crate::pipeline::auth::client_auth::ClientCredential::Jwt {
            client_id: client_id.into(),
            key: jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes())
                .expect("key"),
            alg: Algorithm::ES256,
            kid: None,
        };
        let (auth, extra) = cred.apply(aud, None).expect("assertion");
        assert!(auth.is_none());
        let mut f = form_urlencoded::Serializer::new(String::new());
        f.append_pair("grant_type", "client_credentials");
        for (k, v) in extra {
            f.append_pair(k, &v);
        }
        f.finish()
    }

    #[test]
    fn private_key_jwt_is_verified_and_not_replayable() {
        let (c, kp) = creds_with_key();
        let s = DevAuthServer::new("https://localhost:9443", &c).expect("server");
        let form = assertion_form(&kp, SENDER_JWT_CLIENT_ID, &s.token_endpoint());
        let t = s
            .token(&HeaderMap::new(), form.as_bytes())
            .unwrap_or_else(|e| panic!("{}", e.description));
        assert_eq!(t["token_type"], "Bearer");
        // The same assertion twice: its jti is spent.
        let again = s.token(&HeaderMap::new(), form.as_bytes());
        assert_eq!(again.err().map(|e| e.error), Some("invalid_client"));
        // Wrong audience, and a key the server does not know.
        let wrong_aud = assertion_form(&kp, SENDER_JWT_CLIENT_ID, "https://elsewhere/token");
        assert!(s.token(&HeaderMap::new(), wrong_aud.as_bytes()).is_err());
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let forged = assertion_form(&other, SENDER_JWT_CLIENT_ID, &s.token_endpoint());
        assert!(s.token(&HeaderMap::new(), forged.as_bytes()).is_err());
        // A Basic client cannot authenticate by assertion.
        let wrong_client = assertion_form(&kp, SENDER_CLIENT_ID, &s.token_endpoint());
        assert!(s.token(&HeaderMap::new(), wrong_client.as_bytes()).is_err());
    }

    fn basic(id: &str, secret: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            crate::pipeline::auth::client_auth::basic_value(id, secret),
        );
        h
    }

    #[test]
    fn client_credentials_then_introspection() {
        let s = DevAuthServer::new("https://localhost:9443/", &creds()).expect("server");
        let t = s
            .token(
                &basic(SENDER_CLIENT_ID, "s3cret"),
                b"grant_type=client_credentials",
            )
            .unwrap_or_else(|e| panic!("{}", e.description));
        assert_eq!(t["scope"], "system/*.* system/Patient.read");
        let tok = t["access_token"].as_str().expect("token");
        let body = format!("token={tok}");
        let i = s
            .introspect(&basic(GATEWAY_CLIENT_ID, "gw"), body.as_bytes())
            .unwrap_or_else(|e| panic!("{}", e.description));
        assert_eq!(i["active"], true);
        assert_eq!(i["client_id"], SENDER_CLIENT_ID);
        assert_eq!(i["iss"], "https://localhost:9443");
        let i = s
            .introspect(&basic(GATEWAY_CLIENT_ID, "gw"), b"token=nope")
            .unwrap_or_else(|e| panic!("{}", e.description));
        assert_eq!(i, json!({"active": false}));
        assert_eq!(s.introspections(), 2);
    }

    #[test]
    fn refusals_use_rfc6749_codes() {
        let s = DevAuthServer::new("https://localhost:9443", &creds()).expect("server");
        let code = |r: Result<Value, OAuthError>| r.err().map(|e| (e.status.as_u16(), e.error));
        assert_eq!(
            code(s.token(
                &basic(SENDER_CLIENT_ID, "wrong"),
                b"grant_type=client_credentials"
            )),
            Some((401, "invalid_client"))
        );
        assert_eq!(
            code(s.token(&HeaderMap::new(), b"grant_type=client_credentials")),
            Some((401, "invalid_client"))
        );
        assert_eq!(
            code(s.token(&basic(SENDER_CLIENT_ID, "s3cret"), b"grant_type=password")),
            Some((400, "unsupported_grant_type"))
        );
        assert_eq!(
            code(s.token(
                &basic(READER_CLIENT_ID, "r"),
                b"grant_type=client_credentials&scope=system/*.*"
            )),
            Some((400, "invalid_scope"))
        );
        assert_eq!(
            code(s.token(
                &basic(SENDER_CLIENT_ID, "s3cret"),
                b"grant_type=client_credentials&grant_type=client_credentials"
            )),
            Some((400, "invalid_request"))
        );
        // Senders cannot introspect; the gateway cannot get tokens.
        assert_eq!(
            code(s.introspect(&basic(SENDER_CLIENT_ID, "s3cret"), b"token=x")),
            Some((403, "unauthorized_client"))
        );
        assert_eq!(
            code(s.token(
                &basic(GATEWAY_CLIENT_ID, "gw"),
                b"grant_type=client_credentials"
            )),
            Some((400, "unauthorized_client"))
        );
    }
}
