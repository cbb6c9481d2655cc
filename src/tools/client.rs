//! `fhirgate client`: a BaRS sender in a command. It obtains an access token by OAuth 2.0
//! client credentials (client secret over HTTP Basic, or a signed JWT assertion as NHS
//! API Management expects), caches it until shortly before it expires, builds the
//! `NHSD-*` headers from a small YAML profile and/or flags, and sends one request with a
//! client certificate. It works against any receiver, not only fhirgate.
//!
//! The token itself is never printed; only where it came from and when it expires.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::pipeline::auth::client_auth::ClientCredential;
use crate::pipeline::auth::{ClientAuthConfig, ClientAuthMethod};
use crate::pipeline::nhsd;

/// Tokens are renewed this long before they expire, so a request never leaves with a
/// token that dies in flight.
const EXPIRY_MARGIN: u64 = 30;

/// A sender profile: how to reach the receiver and its authorisation server, and what
/// the `NHSD-*` headers say. Every field can also be given (or overridden) by a flag.
/// Relative paths are resolved against the profile's directory.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Profile {
    pub tls: TlsProfile,
    pub auth: Option<AuthProfile>,
    pub nhsd: NhsdProfile,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsProfile {
    /// CA bundle for the receiver's (and authorisation server's) certificate; the
    /// system roots when absent.
    pub cacert: Option<PathBuf>,
    /// Client certificate chain (PEM) and key for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthProfile {
    /// Issuer: the token endpoint is discovered from its openid-configuration.
    pub issuer: Option<String>,
    /// Token endpoint, instead of discovery.
    pub token_url: Option<String>,
    pub client_id: String,
    /// Client secret (first line of the file): HTTP Basic.
    pub client_secret_file: Option<PathBuf>,
    /// PEM private key: a signed JWT client assertion (private_key_jwt).
    pub private_key_file: Option<PathBuf>,
    pub key_id: Option<String>,
    /// ES256 (default), RS256 or PS256.
    pub algorithm: Option<String>,
    pub scope: Option<String>,
}

/// The facts the `NHSD-*` headers carry. Only headers with their facts present are sent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NhsdProfile {
    /// Requesting organisation's ODS code (NHSD-End-User-Organisation).
    pub ods_code: Option<String>,
    pub organisation_name: Option<String>,
    /// Target service (NHSD-Target-Identifier); system defaults to the DoS service id.
    pub target_identifier: Option<String>,
    pub target_system: Option<String>,
    /// Requesting software (NHSD-Requesting-Software).
    pub software_id: Option<String>,
    pub software_id_system: Option<String>,
    pub software_name: Option<String>,
    pub software_version: Option<String>,
    /// SDS role profile id of the practitioner (NHSD-Requesting-Practitioner).
    pub practitioner_role_id: Option<String>,
    /// SNOMED CT role code and display.
    pub practitioner_role_code: Option<String>,
    pub practitioner_role_display: Option<String>,
    /// X-Correlation-ID for the whole transaction (a new UUID when absent).
    pub correlation_id: Option<String>,
}

impl Profile {
    pub fn load(path: &Path) -> anyhow::Result<Profile> {
        let mut p: Profile = crate::config::load_yaml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut Option<PathBuf>| {
            if let Some(x) = p {
                if x.is_relative() {
                    *x = base.join(&*x);
                }
            }
        };
        fix(&mut p.tls.cacert);
        fix(&mut p.tls.cert);
        fix(&mut p.tls.key);
        if let Some(a) = &mut p.auth {
            fix(&mut a.client_secret_file);
            fix(&mut a.private_key_file);
        }
        Ok(p)
    }
}

fn merge<T: Clone>(flag: &Option<T>, profile: &mut Option<T>) {
    if flag.is_some() {
        profile.clone_from(flag);
    }
}

impl NhsdProfile {
    /// Overlays the fields set in `o` (flags) onto `self` (profile).
    pub fn overlay(&mut self, o: &NhsdProfile) {
        merge(&o.ods_code, &mut self.ods_code);
        merge(&o.organisation_name, &mut self.organisation_name);
        merge(&o.target_identifier, &mut self.target_identifier);
        merge(&o.target_system, &mut self.target_system);
        merge(&o.software_id, &mut self.software_id);
        merge(&o.software_id_system, &mut self.software_id_system);
        merge(&o.software_name, &mut self.software_name);
        merge(&o.software_version, &mut self.software_version);
        merge(&o.practitioner_role_id, &mut self.practitioner_role_id);
        merge(&o.practitioner_role_code, &mut self.practitioner_role_code);
        merge(
            &o.practitioner_role_display,
            &mut self.practitioner_role_display,
        );
        merge(&o.correlation_id, &mut self.correlation_id);
    }

    /// The specification's example sender (`fhirgate nhsd example`), as a profile.
    pub fn example() -> NhsdProfile {
        NhsdProfile {
            ods_code: Some("A1001".into()),
            organisation_name: Some("My service provider name".into()),
            target_identifier: Some("2000011147".into()),
            target_system: None,
            software_id: Some("SUPP-APP-1".into()),
            software_id_system: Some("https://consumersupplier.com/Id/device-identifier".into()),
            software_name: Some("Supplier product name".into()),
            software_version: Some("1.0.0".into()),
            practitioner_role_id: Some("100334993514".into()),
            practitioner_role_code: Some("62247001".into()),
            practitioner_role_display: Some("General practitioner".into()),
            correlation_id: None,
        }
    }

    /// Builds the headers: each `NHSD-*` resource whose facts are present, checked by the
    /// gateway's own parser so a sender learns of a mistake before the receiver does;
    /// plus a fresh `X-Request-ID` and the `X-Correlation-ID`.
    pub fn headers(&self) -> anyhow::Result<Vec<(&'static str, String)>> {
        let mut out = Vec::new();
        let need = |v: &Option<String>, what: &str, header: &str| -> anyhow::Result<String> {
            v.clone()
                .ok_or_else(|| anyhow::anyhow!("{header} needs {what}"))
        };
        if let Some(value) = &self.target_identifier {
            let system = self
                .target_system
                .clone()
                .unwrap_or_else(|| nhsd::DOS_SERVICE_SYSTEM.into());
            out.push((
                nhsd::TARGET_IDENTIFIER,
                json!({"system": system, "value": value}),
            ));
        }
        if let Some(ods) = &self.ods_code {
            let mut org = json!({
                "resourceType": "Organization",
                "identifier": [{"system": nhsd::ODS_SYSTEM, "value": ods}],
            });
            if let Some(n) = &self.organisation_name {
                org["name"] = n.clone().into();
            }
            out.push((nhsd::END_USER_ORGANISATION, org));
        }
        let software = [
            &self.software_id,
            &self.software_name,
            &self.software_version,
        ];
        if software.iter().any(|f| f.is_some()) {
            let h = nhsd::REQUESTING_SOFTWARE;
            let system = self
                .software_id_system
                .clone()
                .unwrap_or_else(|| "https://fhir.nhs.uk/Id/Accredited-System".into());
            out.push((
                h,
                json!({
                    "resourceType": "Device",
                    "identifier": [{"system": system, "value": need(&self.software_id, "software_id", h)?}],
                    "deviceName": {"name": need(&self.software_name, "software_name", h)?, "type": "manufacturer-name"},
                    "version": {"value": need(&self.software_version, "software_version", h)?},
                }),
            ));
        }
        if let Some(role) = &self.practitioner_role_id {
            let h = nhsd::REQUESTING_PRACTITIONER;
            let mut pr = json!({
                "resourceType": "PractitionerRole",
                "identifier": [{"system": nhsd::SDS_ROLE_PROFILE_SYSTEM, "value": role}],
            });
            if let Some(code) = &self.practitioner_role_code {
                let mut coding = json!({"system": nhsd::SNOMED_SYSTEM, "code": code});
                if let Some(d) = &self.practitioner_role_display {
                    coding["display"] = d.clone().into();
                }
                pr["code"] = json!([{"coding": [coding]}]);
            }
            out.push((h, pr));
        }
        let mut headers = vec![
            (nhsd::REQUEST_ID, uuid::Uuid::new_v4().to_string()),
            (
                nhsd::CORRELATION_ID,
                self.correlation_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            ),
        ];
        for (name, resource) in out {
            let v = nhsd::encode_header(name, &resource.to_string())
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            headers.push((name, v));
        }
        Ok(headers)
    }
}

/// A token and its expiry (Unix seconds).
#[derive(Clone, Serialize, Deserialize)]
pub struct CachedToken {
    pub key: String,
    pub access_token: String,
    pub expires_at: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

type Http = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Root store: the given PEM bundle, or the operating system's roots.
fn roots(cacert: Option<&Path>) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    match cacert {
        Some(p) => {
            for c in crate::tls::load_certs("--cacert", p)? {
                roots.add(c)?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                anyhow::bail!("no system CA certificates found; pass --cacert");
            }
        }
    }
    Ok(roots)
}

/// The TLS client configuration: `cacert` (or the system roots), presenting `cert`.
fn tls_config(
    cacert: Option<&Path>,
    cert: Option<(&Path, &Path)>,
) -> anyhow::Result<rustls::ClientConfig> {
    let b = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(cacert)?);
    Ok(match cert {
        Some((c, k)) => b.with_client_auth_cert(
            crate::tls::load_certs("--cert", c)?,
            crate::tls::load_key("--key", k)?,
        )?,
        None => b.with_no_client_auth(),
    })
}

/// An HTTPS client (http:// allowed, for loopback test servers) presenting `cert`.
pub fn http_client(
    cacert: Option<&Path>,
    cert: Option<(&Path, &Path)>,
    timeout: Duration,
) -> anyhow::Result<Http> {
    let tls = tls_config(cacert, cert)?;
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(timeout));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build(https))
}

async fn get_json(
    http: &Http,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> anyhow::Result<(u16, Value)> {
    let uri = req.uri().to_string();
    let resp = tokio::time::timeout(timeout, http.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("{uri}: timed out"))?
        .map_err(|e| match tls_failure(&e) {
            Some(t) => anyhow::anyhow!("{uri}: {t}"),
            None => anyhow::anyhow!("{uri}: {}", crate::pipeline::upstream::error_chain(&e)),
        })?;
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(timeout, resp.into_body().collect())
        .await
        .map_err(|_| anyhow::anyhow!("{uri}: body timed out"))?
        .map_err(|e| anyhow::anyhow!("{uri}: {e}"))?
        .to_bytes();
    let v = serde_json::from_slice(&body)
        .map_err(|_| anyhow::anyhow!("{uri}: answered {status} with a body that is not JSON"))?;
    Ok((status, v))
}

/// Client-credentials token source with an in-memory and optional on-disk cache.
pub struct TokenSource {
    http: Http,
    auth: AuthProfile,
    credential: ClientCredential,
    cache_file: Option<PathBuf>,
    cached: Option<CachedToken>,
    timeout: Duration,
}

/// Where a token came from, for the log line.
pub enum TokenOrigin {
    Fetched { endpoint: String },
    Cached,
}

impl TokenSource {
    pub fn new(
        http: Http,
        auth: AuthProfile,
        cache_file: Option<PathBuf>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        if auth.client_id.is_empty() {
            anyhow::bail!("auth.client_id (--client-id) is required to obtain a token");
        }
        let method = match (&auth.client_secret_file, &auth.private_key_file) {
            (Some(_), None) => ClientAuthMethod::ClientSecretBasic,
            (None, Some(_)) => ClientAuthMethod::PrivateKeyJwt,
            _ => anyhow::bail!(
                "give exactly one of --client-secret-file (Basic) or --private-key-file (private_key_jwt)"
            ),
        };
        let credential = ClientCredential::from_config(&ClientAuthConfig {
            method,
            client_id: auth.client_id.clone(),
            client_secret_file: auth.client_secret_file.clone(),
            client_secret_env: None,
            private_key_file: auth.private_key_file.clone(),
            key_id: auth.key_id.clone(),
            algorithm: auth.algorithm.clone().unwrap_or_else(|| "ES256".into()),
        })?;
        Ok(TokenSource {
            http,
            auth,
            credential,
            cache_file,
            cached: None,
            timeout,
        })
    }

    /// Identifies a token request: same endpoint, client and scope share a token.
    fn cache_key(&self) -> String {
        let k = format!(
            "{}\n{}\n{}\n{}",
            self.auth.issuer.as_deref().unwrap_or(""),
            self.auth.token_url.as_deref().unwrap_or(""),
            self.auth.client_id,
            self.auth.scope.as_deref().unwrap_or("")
        );
        hex::encode(Sha256::digest(k.as_bytes()))
    }

    fn usable(&self, t: &CachedToken) -> bool {
        t.key == self.cache_key() && t.expires_at > now() + EXPIRY_MARGIN
    }

    /// A valid token: the cached one while it has life left, else a new one.
    pub async fn token(&mut self) -> anyhow::Result<(String, TokenOrigin, u64)> {
        if let Some(t) = &self.cached {
            if self.usable(t) {
                return Ok((t.access_token.clone(), TokenOrigin::Cached, t.expires_at));
            }
        }
        if let Some(f) = &self.cache_file {
            if let Some(t) = std::fs::read(f)
                .ok()
                .and_then(|b| serde_json::from_slice::<CachedToken>(&b).ok())
            {
                if self.usable(&t) {
                    let r = (t.access_token.clone(), TokenOrigin::Cached, t.expires_at);
                    self.cached = Some(t);
                    return Ok(r);
                }
            }
        }
        let endpoint = self.token_endpoint().await?;
        let (auth, extra) = self
            .credential
            .apply(&endpoint, self.auth.issuer.as_deref())
            .map_err(anyhow::Error::msg)?;
        let form = {
            let mut f = form_urlencoded::Serializer::new(String::new());
            f.append_pair("grant_type", "client_credentials");
            if let Some(s) = &self.auth.scope {
                f.append_pair("scope", s);
            }
            for (k, v) in &extra {
                f.append_pair(k, v);
            }
            f.finish()
        };
        let mut req = Request::post(&endpoint)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let req = req.body(Full::new(Bytes::from(form)))?;
        let (status, v) = get_json(&self.http, req, self.timeout).await?;
        if status != 200 {
            anyhow::bail!(
                "token endpoint {endpoint} answered {status}: {} {}",
                v["error"].as_str().unwrap_or("(no error code)"),
                v["error_description"].as_str().unwrap_or("")
            );
        }
        let access_token = v["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| anyhow::anyhow!("token endpoint {endpoint}: no access_token"))?
            .to_owned();
        // Without expires_in, assume the short lifetime NHS APIM uses (10 minutes).
        let expires_at = now() + v["expires_in"].as_u64().unwrap_or(600);
        let t = CachedToken {
            key: self.cache_key(),
            access_token: access_token.clone(),
            expires_at,
        };
        if let Some(f) = &self.cache_file {
            // The cache holds a bearer credential: owner-only, like a private key.
            let text = serde_json::to_string(&t)?;
            crate::tools::pki::write_private(f, &text)
                .map_err(|e| anyhow::anyhow!("--token-cache {}: {e}", f.display()))?;
        }
        self.cached = Some(t);
        Ok((access_token, TokenOrigin::Fetched { endpoint }, expires_at))
    }

    async fn token_endpoint(&self) -> anyhow::Result<String> {
        if let Some(u) = &self.auth.token_url {
            return Ok(u.clone());
        }
        let issuer = self
            .auth
            .issuer
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("give --issuer (discovery) or --token-url"))?;
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let req = Request::get(&url)
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))?;
        let (status, v) = get_json(&self.http, req, self.timeout).await?;
        if status != 200 {
            anyhow::bail!("discovery {url} answered {status}");
        }
        v["token_endpoint"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("discovery {url}: no token_endpoint"))
    }
}

/// One request to send.
pub struct Outgoing {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Bytes>,
}

/// What came back.
pub struct Answer {
    pub status: http::StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// Status line, headers, blank line, then the body (pretty-printed when JSON).
    pub fn render(&self) -> String {
        let mut s = format!("{:?} {}\n", self.version, self.status);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("(binary)")));
        }
        s.push('\n');
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(v) => s.push_str(&serde_json::to_string_pretty(&v).unwrap_or_default()),
            Err(_) => s.push_str(&String::from_utf8_lossy(&self.body)),
        }
        s.push('\n');
        s
    }
}

/// Sends `o` with `token` (if any) and returns the whole answer.
pub async fn send(
    http: &Http,
    o: &Outgoing,
    token: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    let mut req = Request::builder().method(o.method.clone()).uri(&o.url);
    let h = req
        .headers_mut()
        .ok_or_else(|| anyhow::anyhow!("invalid request: {}", o.url))?;
    for (k, v) in &o.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| anyhow::anyhow!("-H {k}: not a header name"))?;
        let value =
            HeaderValue::from_str(v).map_err(|_| anyhow::anyhow!("-H {k}: not a header value"))?;
        h.append(name, value);
    }
    if let Some(t) = token {
        let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?;
        v.set_sensitive(true);
        h.insert(header::AUTHORIZATION, v);
    }
    if o.body.is_some() && !h.contains_key(header::CONTENT_TYPE) {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        );
    }
    if !h.contains_key(header::ACCEPT) {
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/fhir+json"),
        );
    }
    let req = req.body(Full::new(o.body.clone().unwrap_or_default()))?;
    let resp = tokio::time::timeout(timeout, http.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("{}: timed out", o.url))?
        .map_err(|e| match tls_failure(&e) {
            Some(t) => anyhow::anyhow!("{}: {t}", o.url),
            None => anyhow::anyhow!("{}: {}", o.url, crate::pipeline::upstream::error_chain(&e)),
        })?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(timeout, body.collect())
        .await
        .map_err(|_| anyhow::anyhow!("{}: body timed out", o.url))?
        .map_err(|e| anyhow::anyhow!("{}: {e}", o.url))?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

/// The rustls error somewhere in `e`'s source chain, described for a person. `io::Error`
/// hides its inner error from `source()`, so each one is opened with `get_ref`.
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>());
        if let Some(t) = err.downcast_ref::<rustls::Error>().or(inner) {
            return Some(describe_tls_error(t));
        }
        cur = err.source();
    }
    None
}

fn describe_tls_error(e: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::AlertReceived(a) => {
            let (name, hint) = match a {
                A::CertificateRevoked => (
                    "certificate revoked",
                    "the server's CRL lists our client certificate",
                ),
                A::CertificateExpired => (
                    "certificate expired",
                    "our client certificate, or a CA in its chain, is expired or not yet valid",
                ),
                A::UnknownCA => (
                    "unknown CA",
                    "the server does not trust our certificate's issuer; another environment's PKI?",
                ),
                A::UnsupportedCertificate | A::BadCertificate => (
                    if *a == A::BadCertificate {
                        "bad certificate"
                    } else {
                        "unsupported certificate"
                    },
                    "the server does not accept our certificate for client authentication; it \
                     needs extended key usage clientAuth",
                ),
                A::CertificateRequired => (
                    "certificate required",
                    "the server wants a client certificate: pass --cert and --key",
                ),
                A::CertificateUnknown => (
                    "certificate unknown",
                    "the server could not verify our certificate",
                ),
                A::AccessDenied => ("access denied", "the server refuses this client"),
                A::HandshakeFailure => (
                    "handshake failure",
                    "no common TLS version, cipher or signature scheme",
                ),
                _ => ("", ""),
            };
            if name.is_empty() {
                format!("TLS handshake refused by the server: alert {a:?}")
            } else {
                format!("TLS handshake refused by the server: alert {name}: {hint}")
            }
        }
        rustls::Error::InvalidCertificate(_) => {
            format!("the server's certificate is not trusted: {e} (check --cacert)")
        }
        other => format!("TLS error: {other}"),
    }
}

/// Why a TLS connection to `url` fails, found by a bare handshake: hyper reports a refused
/// client certificate as "connection closed" or "broken pipe", because in TLS 1.3 the
/// server judges the certificate after the client has finished and its alert arrives while
/// the request is being written. `None` when the handshake and a first exchange succeed,
/// or the host cannot be reached at all.
pub async fn diagnose_tls(
    url: &str,
    cacert: Option<&Path>,
    cert: Option<(&Path, &Path)>,
    timeout: Duration,
) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: http::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("https") {
        return None;
    }
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let mut cfg = tls_config(cacert, cert).ok()?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).ok()?;
    let wait = timeout.min(Duration::from_secs(10));
    let tcp = tokio::time::timeout(wait, tokio::net::TcpStream::connect((host, port)))
        .await
        .ok()?
        .ok()?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let mut tls = match tokio::time::timeout(wait, connector.connect(name, tcp))
        .await
        .ok()?
    {
        Ok(s) => s,
        Err(e) => return tls_failure(&e),
    };
    // The verdict on our certificate is the first thing a refusing server sends: read
    // before writing, so a reset caused by our own write cannot swallow the alert.
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(2).min(wait), tls.read(&mut buf)).await {
        Ok(Err(e)) => return tls_failure(&e),
        Ok(Ok(_)) => return None,
        Err(_) => {}
    }
    let req = format!("HEAD / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let _ = tls.write_all(req.as_bytes()).await;
    match tokio::time::timeout(wait, tls.read(&mut buf)).await {
        Ok(Err(e)) => tls_failure(&e),
        _ => None,
    }
}

/// Decodes one `NHSD-*` value back to its JSON, for `--verbose` output.
pub fn describe_header(name: &str, value: &str) -> String {
    match base64::engine::general_purpose::STANDARD.decode(value) {
        Ok(b) if name.to_ascii_lowercase().starts_with("nhsd-") => {
            format!("{name}: {}", String::from_utf8_lossy(&b))
        }
        _ => format!("{name}: {value}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_profile_builds_headers_the_gateway_accepts() {
        let h = NhsdProfile::example().headers().expect("headers");
        let mut map = HeaderMap::new();
        for (k, v) in &h {
            map.insert(*k, HeaderValue::from_str(v).expect("value"));
        }
        let facts = nhsd::check(&map, &nhsd::NhsdPolicy::default()).expect("accepted");
        assert_eq!(facts.ods_code.as_deref(), Some("A1001"));
        assert_eq!(h.len(), 6);
    }

    #[test]
    fn partial_software_facts_are_an_error_naming_the_field() {
        let p = NhsdProfile {
            software_name: Some("x".into()),
            ..Default::default()
        };
        let e = p.headers().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("software_id"), "{e}");
    }

    #[test]
    fn flags_override_the_profile() {
        let mut p = NhsdProfile::example();
        p.overlay(&NhsdProfile {
            ods_code: Some("B2002".into()),
            ..Default::default()
        });
        assert_eq!(p.ods_code.as_deref(), Some("B2002"));
        assert_eq!(p.software_name.as_deref(), Some("Supplier product name"));
    }

    #[test]
    fn a_bad_ods_code_is_caught_before_sending() {
        let mut p = NhsdProfile::example();
        p.ods_code = Some("not an ods code!".into());
        assert!(p.headers().is_err());
    }

    #[test]
    fn tls_failure_opens_io_errors_in_the_chain() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (SendRequest)")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked);
        let e = Outer(std::io::Error::new(std::io::ErrorKind::InvalidData, alert));
        let t = tls_failure(&e).expect("found inside the io::Error");
        assert!(t.contains("alert certificate revoked"), "{t}");
        let plain = Outer(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(tls_failure(&plain), None);
    }
}
