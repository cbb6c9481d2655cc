//! Typed, validated configuration. The YAML file is read here and nowhere else.
//!
//! Every struct denies unknown keys, so a misspelt option is an error rather than a silent
//! default. [`Config::load`] parses, then [`Config::validate`] checks what serde cannot
//! (files readable, ranges sane, references between sections resolve) and names the
//! offending field path in its message, the way `nginx -t` does.

pub mod duration;
pub mod error;
#[cfg(test)]
pub(crate) mod test_support;

pub(crate) use error::err;
pub use error::ConfigError;
// Stage config types live with their stage; re-exported so `config::X` keeps working.
pub use crate::pipeline::forward::IdentityHeaders;
pub use crate::pipeline::policy::{RouteConfig, TokenRequirement};
pub use crate::pipeline::upstream::UpstreamConfig;
pub use crate::tls::{
    AnchorMode, RevocationConfig, RevocationScope, TlsConfig, TrustBundleConfig, UnknownRevocation,
};

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::pipeline::auth::AuthConfig;
use crate::pipeline::nhsd::NhsdPolicy;
use crate::pipeline::service::ServiceLevelsConfig;
use crate::pipeline::tracecontext::TelemetryConfig;

/// Which environment this gateway serves; `production` forbids development shortcuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    #[default]
    Development,
    Integration,
    Production,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub environment: Environment,
    /// Whether the file names `environment` itself (not the development default); set by
    /// [`Config::from_yaml`], used by `fhirgate check`'s lints.
    #[serde(skip)]
    pub environment_explicit: bool,
    pub listeners: Vec<ListenerConfig>,
    pub tls: TlsConfig,
    #[serde(default)]
    pub limits: Limits,
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub identity_headers: IdentityHeaders,
    pub routes: Vec<RouteConfig>,
    /// Plain-HTTP listener for /healthz, /readyz and /metrics; off when absent.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Bearer-token checks. Required: `mode: development` must be chosen explicitly.
    pub auth: AuthConfig,
    /// BaRS NHSD-* header checks; off when absent.
    #[serde(default)]
    pub nhsd: Option<NhsdConfig>,
    /// Reload on file change (see [`crate::watch`]).
    #[serde(default)]
    pub reload: ReloadConfig,
    /// Default time budget, unmatched-path answer, Accept versions and rate limit.
    #[serde(default)]
    pub service_levels: ServiceLevelsConfig,
    /// OTLP span export (W3C trace context handling is always on).
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Reload, as SIGHUP does, when the config file or a certificate, key or CRL file it
    /// names changes (directories are watched, so Kubernetes' symlink swaps are seen).
    pub watch_files: bool,
    /// Quiet time after the last change before reloading (editors and `kubectl` write
    /// several files in a burst).
    #[serde(with = "crate::config::duration")]
    pub debounce: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch_files: true,
            debounce: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NhsdConfig {
    /// Paths (and their sub-paths) where no NHSD header (nor either id) is required;
    /// those sent are still checked.
    #[serde(default = "default_nhsd_exempt")]
    pub exempt_paths: Vec<String>,
    /// Set `X-Fhirgate-Ods-Code`, `-Software-Name`, … upstream from verified headers.
    #[serde(default = "default_true")]
    pub forward_facts: bool,
    /// Default header policy; a route may override it with its own `nhsd` block.
    #[serde(default)]
    pub headers: NhsdPolicy,
}

fn default_nhsd_exempt() -> Vec<String> {
    vec!["/metadata".into(), "/MessageDefinition".into()]
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line (audit pipelines, journald with a JSON parser).
    Json,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// Access lines carry the route and resource type with ids replaced
    /// (`/Patient/{id}`) and no query string, so NHS numbers and search terms stay out
    /// of the logs. Default: on, except with `environment: development`.
    pub redact_paths: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    #[serde(with = "crate::config::duration")]
    pub header_read_timeout: Duration,
    #[serde(with = "crate::config::duration")]
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: u64,
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    #[serde(with = "crate::config::duration")]
    pub drain_timeout: Duration,
    /// Connections one client certificate may hold open at once; 0: no cap.
    pub max_connections_per_client: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: 10 * 1024 * 1024,
            max_connections: 10_000,
            max_concurrent_streams: 100,
            drain_timeout: Duration::from_secs(30),
            max_connections_per_client: 0,
        }
    }
}

/// Reads a YAML file into `T` (e.g. the sender profile of `fhirgate client`), so that
/// YAML parsing, with its alias and depth budgets, lives in this module only.
pub fn load_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(path.display().to_string(), format!("cannot read: {e}")))?;
    serde_saphyr::from_str(&text).map_err(|e| err(path.display().to_string(), e.to_string()))
}

impl Config {
    /// Reads, parses and validates a config file. Relative paths inside it are resolved
    /// against the file's directory, so the gateway can be started from anywhere.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(path.display().to_string(), format!("cannot read: {e}")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_yaml(&text, base)
    }

    /// Parses and validates YAML text; relative paths are resolved against `base`.
    pub fn from_yaml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut path = None;
        let parsed = serde_saphyr::with_deserializer_from_str(text, |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                path = Some(e.path().to_string());
                e.into_inner()
            })
        });
        let mut cfg: Config = parsed.map_err(|e| yaml_error(&e, path.as_deref()))?;
        cfg.environment_explicit = serde_saphyr::from_str::<EnvironmentProbe>(text)
            .map(|p| p.environment.is_some())
            .unwrap_or(false);
        cfg.resolve_paths(base);
        // Secure by default: a stale CRL refuses clients everywhere but development.
        cfg.tls
            .revocation
            .enforce_crl_expiry
            .get_or_insert(cfg.environment != Environment::Development);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.server_cert);
        fix(&mut self.tls.server_key);
        for b in &mut self.tls.trust_bundles {
            b.ca_files.iter_mut().for_each(fix);
            b.crl_files.iter_mut().for_each(fix);
        }
        if let Some(p) = &mut self.tls.revocation.cache_dir {
            fix(p);
        }
        for p in [
            &mut self.upstream.ca_file,
            &mut self.upstream.client_cert,
            &mut self.upstream.client_key,
            &mut self.auth.ca_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        if let Some(c) = &mut self.auth.client_auth {
            for p in [&mut c.client_secret_file, &mut c.private_key_file]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
    }

    /// Checks everything serde cannot. File contents are parsed later by `tls`, which
    /// reports failures with the same field paths.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(err("listeners", "at least one listener is required"));
        }
        let tls = &self.tls;
        readable("tls.server_cert", &tls.server_cert)?;
        readable("tls.server_key", &tls.server_key)?;
        if tls.trust_bundles.is_empty() {
            return Err(err(
                "tls.trust_bundles",
                "at least one trust bundle is required: clients must chain to a configured CA",
            ));
        }
        let mut names = HashSet::new();
        for (i, b) in tls.trust_bundles.iter().enumerate() {
            let f = format!("tls.trust_bundles[{i}]");
            if b.name.trim().is_empty() {
                return Err(err(format!("{f}.name"), "must not be empty"));
            }
            if !names.insert(b.name.as_str()) {
                return Err(err(
                    format!("{f}.name"),
                    format!("duplicate bundle name {:?}", b.name),
                ));
            }
            if b.ca_files.is_empty() {
                return Err(err(
                    format!("{f}.ca_files"),
                    "at least one CA file is required",
                ));
            }
            for (j, p) in b.ca_files.iter().enumerate() {
                readable(&format!("{f}.ca_files[{j}]"), p)?;
            }
            for (j, p) in b.crl_files.iter().enumerate() {
                readable(&format!("{f}.crl_files[{j}]"), p)?;
            }
            for (j, u) in b.crl_urls.iter().enumerate() {
                crate::revocation::check_url(u)
                    .map_err(|r| err(format!("{f}.crl_urls[{j}]"), r))?;
            }
        }
        let r = &tls.revocation;
        nonzero("tls.revocation.refresh_interval", r.refresh_interval())?;
        nonzero("tls.revocation.fetch_timeout", r.fetch_timeout())?;
        if r.max_crl_bytes() == 0 {
            return Err(err(
                "tls.revocation.max_crl_bytes",
                "must be greater than 0",
            ));
        }
        nonzero("reload.debounce", self.reload.debounce)?;
        if !(1..=10).contains(&tls.verify_depth) {
            return Err(err("tls.verify_depth", "must be between 1 and 10"));
        }
        nonzero("tls.handshake_timeout", tls.handshake_timeout)?;

        let l = &self.limits;
        nonzero("limits.header_read_timeout", l.header_read_timeout)?;
        nonzero("limits.idle_timeout", l.idle_timeout)?;
        // hyper refuses a read buffer below 8 KiB.
        if !(8192..=1024 * 1024).contains(&l.max_header_bytes) {
            return Err(err(
                "limits.max_header_bytes",
                "must be between 8192 and 1048576",
            ));
        }
        if !(8..=1000).contains(&l.max_headers) {
            return Err(err("limits.max_headers", "must be between 8 and 1000"));
        }
        if l.max_body_bytes == 0 {
            return Err(err("limits.max_body_bytes", "must be greater than 0"));
        }
        if l.max_connections == 0 {
            return Err(err("limits.max_connections", "must be greater than 0"));
        }
        if l.max_concurrent_streams == 0 {
            return Err(err(
                "limits.max_concurrent_streams",
                "must be greater than 0",
            ));
        }

        let u = &self.upstream;
        let uri: http::Uri = u
            .url
            .parse()
            .map_err(|e| err("upstream.url", format!("not a valid URL: {e}")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(err("upstream.url", "scheme must be http or https")),
        }
        if uri.authority().is_none() {
            return Err(err("upstream.url", "must include a host"));
        }
        error::no_userinfo(&uri).map_err(|r| err("upstream.url", r))?;
        if uri.query().is_some() {
            return Err(err("upstream.url", "must not include a query"));
        }
        match &u.ca_file {
            Some(p) => readable("upstream.ca_file", p)?,
            None if uri.scheme_str() == Some("https") => {
                return Err(err(
                    "upstream.ca_file",
                    "required for an https upstream (no public CAs are trusted by default)",
                ))
            }
            None => {}
        }
        match (&u.client_cert, &u.client_key) {
            (Some(c), Some(k)) => {
                readable("upstream.client_cert", c)?;
                readable("upstream.client_key", k)?;
            }
            (None, None) => {}
            (Some(_), None) => return Err(err("upstream.client_key", "required with client_cert")),
            (None, Some(_)) => return Err(err("upstream.client_cert", "required with client_key")),
        }
        if uri.scheme_str() == Some("http") && (u.ca_file.is_some() || u.client_cert.is_some()) {
            return Err(err(
                "upstream.url",
                "ca_file/client_cert are set but the upstream is plain http",
            ));
        }
        nonzero("upstream.connect_timeout", u.connect_timeout)?;
        nonzero("upstream.response_timeout", u.response_timeout)?;

        let mut seen = HashSet::new();
        for (i, n) in self.identity_headers.names().iter().enumerate() {
            let f = format!("identity_headers.{}", IDENTITY_FIELDS[i]);
            let Ok(name) = http::HeaderName::from_bytes(n.as_bytes()) else {
                return Err(err(f, format!("{n:?} is not a valid header name")));
            };
            if crate::pipeline::forward::is_taken_name(&name) {
                return Err(err(
                    f,
                    format!(
                        "{n:?} already has a meaning (HTTP framing, routing or credentials, or \
                         a header the gateway sets or checks itself); use a name of its own, \
                         such as X-Client-Cert-*"
                    ),
                ));
            }
            if !seen.insert(n.to_ascii_lowercase()) {
                return Err(err(f, format!("{n:?} is used twice")));
            }
        }

        self.auth
            .validate(self.environment == Environment::Production)?;
        if self.auth.mode == crate::pipeline::auth::AuthMode::None {
            if let Some(i) = self
                .routes
                .iter()
                .position(|r| r.token == TokenRequirement::Required)
            {
                return Err(err(
                    format!("routes[{i}].token"),
                    "required (the default), but auth.mode is none: set `token: none` on the \
                     route, or configure auth.mode introspection or jwt",
                ));
            }
        }
        let development = self.environment == Environment::Development;
        self.auth.validate_jwt_claims(development)?;
        self.auth.validate_contexts(development)?;
        if let Some(n) = &self.nhsd {
            for (i, p) in n.exempt_paths.iter().enumerate() {
                if !p.starts_with('/') || (p.len() > 1 && p.ends_with('/')) {
                    return Err(err(
                        format!("nhsd.exempt_paths[{i}]"),
                        "must start with '/' and not end with '/'",
                    ));
                }
            }
            n.headers
                .validate("nhsd.headers")
                .map_err(|(f, r)| err(f, r))?;
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(p) = &r.nhsd {
                if self.nhsd.is_none() {
                    return Err(err(
                        format!("routes[{i}].nhsd"),
                        "set, but NHSD checks are off (no top-level nhsd section)",
                    ));
                }
                p.validate(&format!("routes[{i}].nhsd"))
                    .map_err(|(f, r)| err(f, r))?;
            }
        }

        if self.routes.is_empty() {
            return Err(err(
                "routes",
                "at least one route is required (no route means no access)",
            ));
        }
        let mut route_names = HashSet::new();
        let mut prefixes = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let f = format!("routes[{i}]");
            if !route_names.insert(r.name.as_str()) {
                return Err(err(
                    format!("{f}.name"),
                    format!("duplicate route name {:?}", r.name),
                ));
            }
            // One prefix, one route: the second would never be chosen, and two that
            // differ only in case name the same path to a case-insensitive upstream.
            if !prefixes.insert(r.path_prefix.to_ascii_lowercase()) {
                return Err(err(
                    format!("{f}.path_prefix"),
                    format!(
                        "another route already has the path prefix {:?} (letter case aside); \
                         merge the two routes",
                        r.path_prefix
                    ),
                ));
            }
            if !r.path_prefix.starts_with('/') {
                return Err(err(format!("{f}.path_prefix"), "must start with '/'"));
            }
            if r.path_prefix.len() > 1 && r.path_prefix.ends_with('/') {
                return Err(err(format!("{f}.path_prefix"), "must not end with '/'"));
            }
            // Dot segments are exactly "." and ".." (RFC 3986 5.2.4); "/.well-known" is a
            // plain path (RFC 8615) that SMART discovery needs a route for.
            let dot_segment = r.path_prefix.split('/').any(|s| s == "." || s == "..");
            if r.path_prefix.contains(['?', '#', '%', '*']) || dot_segment {
                return Err(err(
                    format!("{f}.path_prefix"),
                    "must be a plain path (no '?', '#', '%', '*' or dot segments)",
                ));
            }
            for (j, b) in r.bundles.iter().enumerate() {
                if !names.contains(b.as_str()) {
                    return Err(err(
                        format!("{f}.bundles[{j}]"),
                        format!("unknown trust bundle {b:?}"),
                    ));
                }
            }
            for (j, p) in r.allow_subjects.iter().enumerate() {
                if p.is_empty() {
                    return Err(err(format!("{f}.allow_subjects[{j}]"), "must not be empty"));
                }
            }
            for (j, p) in r.allow_sans.iter().enumerate() {
                if p.is_empty() {
                    return Err(err(format!("{f}.allow_sans[{j}]"), "must not be empty"));
                }
            }
            r.service_levels
                .validate(&format!("{f}.service_levels"), true)?;
        }
        self.service_levels.validate("service_levels", false)?;
        self.telemetry.validate()?;
        Ok(())
    }

    /// A short human summary of the effective configuration (for `fhirgate check`), in
    /// the words the YAML uses (`scope=chain`, `token=required`).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        use fmt::Write;
        let env = match self.environment {
            Environment::Development => "development",
            Environment::Integration => "integration",
            Environment::Production => "production",
        };
        let _ = writeln!(
            s,
            "environment: {env}{}",
            if self.environment_explicit {
                ""
            } else {
                " (default: not set in the file)"
            }
        );
        for l in &self.listeners {
            let _ = writeln!(s, "listener: https://{}", l.address);
        }
        let _ = writeln!(s, "server certificate: {}", self.tls.server_cert.display());
        for b in &self.tls.trust_bundles {
            let _ = writeln!(
                s,
                "trust bundle {:?}: {} CA file(s), {} CRL file(s)",
                b.name,
                b.ca_files.len(),
                b.crl_files.len()
            );
        }
        let r = &self.tls.revocation;
        let _ = writeln!(
            s,
            "revocation: scope={} unknown_status={} enforce_crl_expiry={}",
            match r.scope {
                RevocationScope::Chain => "chain",
                RevocationScope::EndEntity => "end_entity",
            },
            match r.unknown_status {
                UnknownRevocation::Deny => "deny",
                UnknownRevocation::Allow => "allow",
            },
            r.enforce_crl_expiry()
        );
        let _ = writeln!(s, "upstream: {}", self.upstream.url);
        let no_tokens = self.auth.mode == crate::pipeline::auth::AuthMode::Development;
        let mode = match self.auth.mode {
            crate::pipeline::auth::AuthMode::Introspection => "introspection",
            crate::pipeline::auth::AuthMode::Jwt => "jwt",
            crate::pipeline::auth::AuthMode::Development => "development",
            crate::pipeline::auth::AuthMode::None => "none",
        };
        let _ = writeln!(
            s,
            "auth: {mode}{}",
            match (&self.auth.issuer, &self.auth.introspection_endpoint) {
                _ if no_tokens => " (NO TOKEN CHECKS: bearer tokens are not checked)".into(),
                _ if self.auth.mode == crate::pipeline::auth::AuthMode::None => {
                    " (no route checks tokens: TLS-MA and NHSD headers only)".into()
                }
                (_, Some(e)) => format!(" via {e}"),
                (Some(i), None) => format!(" via discovery from {i}"),
                _ => String::new(),
            }
        );
        let list = |v: &[String]| -> String {
            if v.is_empty() {
                "any".into()
            } else {
                v.join(",")
            }
        };
        for r in &self.routes {
            let token = match (no_tokens, r.token) {
                (true, _) => "not checked (auth.mode: development)",
                (false, TokenRequirement::Required) => "required",
                (false, TokenRequirement::None) => "none",
            };
            let _ = writeln!(
                s,
                "route {:?}: {} bundles={} subjects={} sans={} token={token}",
                r.name,
                r.path_prefix,
                list(&r.bundles),
                list(&r.allow_subjects),
                list(&r.allow_sans),
            );
        }
        s
    }
}

impl Config {
    /// Whether access lines redact ids from paths (`logging.redact_paths`, default on
    /// outside development).
    pub fn redact_paths(&self) -> bool {
        self.logging
            .redact_paths
            .unwrap_or(self.environment != Environment::Development)
    }

    /// Settings that differ between `self` (running) and `new` but are fixed at start,
    /// as field paths, for the reload warning.
    pub fn restart_required_changes(&self, new: &Config) -> Vec<String> {
        let mut out = Vec::new();
        let old_addrs: Vec<_> = self.listeners.iter().map(|l| l.address).collect();
        let new_addrs: Vec<_> = new.listeners.iter().map(|l| l.address).collect();
        if old_addrs != new_addrs {
            out.push("listeners".to_owned());
        }
        if self.admin.as_ref().map(|a| a.address) != new.admin.as_ref().map(|a| a.address) {
            out.push("admin.address".to_owned());
        }
        if self.logging.format != new.logging.format {
            out.push("logging.format".to_owned());
        }
        if self.limits.max_connections != new.limits.max_connections {
            out.push("limits.max_connections".to_owned());
        }
        // The file watch is started once, at start, with its debounce.
        if self.reload.watch_files != new.reload.watch_files {
            out.push("reload.watch_files".to_owned());
        }
        if self.reload.debounce != new.reload.debounce {
            out.push("reload.debounce".to_owned());
        }
        out
    }
}

const IDENTITY_FIELDS: [&str; 6] = [
    "subject",
    "issuer",
    "fingerprint",
    "serial",
    "common_name",
    "bundle",
];

fn readable(field: &str, p: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(p)
        .map(|_| ())
        .map_err(|e| err(field, format!("cannot read {}: {e}", p.display())))
}

fn nonzero(field: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(err(field, "must be greater than zero"))
    } else {
        Ok(())
    }
}

/// Only the top-level `environment` key, to tell an explicit value from the default.
#[derive(Deserialize)]
struct EnvironmentProbe {
    #[serde(default)]
    environment: Option<serde::de::IgnoredAny>,
}

/// A YAML/serde error as a [`ConfigError`], named by the field's dotted path (from
/// `serde_path_to_error`) like every other config error, in the YAML's words rather than
/// Rust's (`u64`, socket address syntax). Errors outside any field stay `(yaml)`.
fn yaml_error(e: &serde_saphyr::Error, path: Option<&str>) -> ConfigError {
    let msg = e.to_string();
    let path = path.filter(|p| !p.is_empty() && *p != ".");
    match path {
        Some(path) if msg.contains(duration::EXPECTED) => {
            let got = msg
                .split("invalid value: string ")
                .nth(1)
                .and_then(|r| r.split(", expected").next())
                .unwrap_or_default();
            err(path, format!("expected {}, got {got}", duration::EXPECTED))
        }
        Some(path) => err(path, yaml_words(&msg)),
        None => err("(yaml)", yaml_words(&msg)),
    }
}

/// serde's and the YAML parser's names for Rust types, in the words the config uses.
fn yaml_words(msg: &str) -> String {
    const WORDS: [(&str, &str); 10] = [
        ("invalid boolean", "expected true or false"),
        ("invalid u64", "expected a whole number (0 or more)"),
        ("invalid u32", "expected a whole number (0 or more)"),
        ("invalid u16", "expected a whole number (0 or more)"),
        ("invalid usize", "expected a whole number (0 or more)"),
        ("expected u64", "expected a whole number (0 or more)"),
        ("expected u32", "expected a whole number (0 or more)"),
        ("expected u16", "expected a whole number (0 or more)"),
        ("expected usize", "expected a whole number (0 or more)"),
        (
            "invalid socket address syntax",
            "expected an IP address and port such as 127.0.0.1:8443 or '[::1]:8443' \
             (not a host name)",
        ),
    ];
    let mut out = msg.replace("expected sequence start", "expected a list such as [a, b]");
    for (rust, words) in WORDS {
        out = out.replace(rust, words);
    }
    out
}
