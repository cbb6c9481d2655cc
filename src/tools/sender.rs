//! `fhirgate client`: the command-line flags and their overlay on a sender profile
//! ([`crate::tools::client`] does the work).

use std::path::PathBuf;
use std::time::Duration;

use crate::tools::client;

#[derive(clap::Args)]
pub struct ClientArgs {
    /// Receiver URL, e.g. https://localhost:8443/Patient/1
    url: String,
    /// YAML sender profile (tls, auth, nhsd sections); flags override it.
    #[arg(long, short)]
    profile: Option<PathBuf>,
    /// HTTP method.
    #[arg(short = 'X', long, default_value = "GET")]
    method: String,
    /// Request body: literal JSON, @FILE, or @- for stdin.
    #[arg(short = 'd', long)]
    data: Option<String>,
    /// Extra header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// CA bundle for the receiver and the authorisation server (default: system roots).
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM chain) and key for mutual TLS.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Authorisation server issuer (token endpoint by discovery).
    #[arg(long)]
    issuer: Option<String>,
    /// Token endpoint (instead of discovery).
    #[arg(long)]
    token_url: Option<String>,
    /// OAuth client id registered at the authorisation server.
    #[arg(long)]
    client_id: Option<String>,
    /// Client secret file: client_secret_basic.
    #[arg(long)]
    client_secret_file: Option<PathBuf>,
    /// Private key (PEM): private_key_jwt client assertion.
    #[arg(long)]
    private_key_file: Option<PathBuf>,
    /// `kid` header of the private_key_jwt client assertion.
    #[arg(long)]
    key_id: Option<String>,
    /// ES256 (default), RS256 or PS256.
    #[arg(long)]
    algorithm: Option<String>,
    /// Scopes to request, space-separated (e.g. "system/Patient.read").
    #[arg(long)]
    scope: Option<String>,
    /// Send no Authorization header even if the profile configures a token.
    #[arg(long)]
    no_token: bool,
    /// Keep the token in this file (mode 0600) and reuse it until shortly before expiry.
    #[arg(long)]
    token_cache: Option<PathBuf>,
    /// Start from the specification's example sender headers.
    #[arg(long)]
    nhsd_example: bool,
    /// Send no NHSD-* / X-Request-ID / X-Correlation-ID headers.
    #[arg(long)]
    no_nhsd: bool,
    /// ODS code of the sending organisation (NHSD-End-User-Organisation).
    #[arg(long)]
    ods: Option<String>,
    /// Name of the sending organisation (NHSD-End-User-Organisation).
    #[arg(long)]
    org_name: Option<String>,
    /// Receiving service identifier, e.g. a DoS id (NHSD-Target-Identifier).
    #[arg(long)]
    target: Option<String>,
    /// System of --target (default: the DoS service system).
    #[arg(long)]
    target_system: Option<String>,
    /// Sending software's device identifier (NHSD-Requesting-Software).
    #[arg(long)]
    software_id: Option<String>,
    /// Sending software's product name (NHSD-Requesting-Software).
    #[arg(long)]
    software_name: Option<String>,
    /// Sending software's version (NHSD-Requesting-Software).
    #[arg(long)]
    software_version: Option<String>,
    /// SDS role profile id of the requesting practitioner.
    #[arg(long)]
    practitioner_role: Option<String>,
    /// SNOMED CT code of the practitioner's role.
    #[arg(long)]
    practitioner_role_code: Option<String>,
    /// X-Correlation-ID to send (default: a new UUID).
    #[arg(long)]
    correlation_id: Option<String>,
    /// Send the request this many times (one token, a new X-Request-ID each time).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Seconds allowed for each exchange.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Exit with status 22 (like curl --fail) when the last answer is 400 or above.
    #[arg(long)]
    fail: bool,
    /// Also print the request headers sent (NHSD-* decoded) to stderr.
    #[arg(short, long)]
    verbose: bool,
}

/// `fhirgate client`: profile + flags, then token, headers and the request.
pub async fn run(a: ClientArgs) -> anyhow::Result<()> {
    let mut profile = match &a.profile {
        Some(p) => client::Profile::load(p)?,
        None => client::Profile::default(),
    };
    let t = &mut profile.tls;
    for (flag, field) in [
        (&a.cacert, &mut t.cacert),
        (&a.cert, &mut t.cert),
        (&a.key, &mut t.key),
    ] {
        if flag.is_some() {
            field.clone_from(flag);
        }
    }
    let flags_auth = a.client_id.is_some()
        || a.issuer.is_some()
        || a.token_url.is_some()
        || a.client_secret_file.is_some()
        || a.private_key_file.is_some();
    if flags_auth {
        let auth = profile.auth.get_or_insert_with(Default::default);
        if let Some(id) = &a.client_id {
            auth.client_id.clone_from(id);
        }
        for (flag, field) in [
            (&a.issuer, &mut auth.issuer),
            (&a.token_url, &mut auth.token_url),
            (&a.key_id, &mut auth.key_id),
            (&a.algorithm, &mut auth.algorithm),
            (&a.scope, &mut auth.scope),
        ] {
            if flag.is_some() {
                field.clone_from(flag);
            }
        }
        // One client authentication method: a flag for one replaces the other.
        if a.client_secret_file.is_some() {
            auth.client_secret_file.clone_from(&a.client_secret_file);
            auth.private_key_file = None;
        }
        if a.private_key_file.is_some() {
            auth.private_key_file.clone_from(&a.private_key_file);
            auth.client_secret_file = None;
        }
    }
    let mut nhsd = if a.nhsd_example {
        client::NhsdProfile::example()
    } else {
        profile.nhsd.clone()
    };
    if a.nhsd_example {
        nhsd.overlay(&profile.nhsd);
    }
    nhsd.overlay(&client::NhsdProfile {
        ods_code: a.ods.clone(),
        organisation_name: a.org_name.clone(),
        target_identifier: a.target.clone(),
        target_system: a.target_system.clone(),
        software_id: a.software_id.clone(),
        software_id_system: None,
        software_name: a.software_name.clone(),
        software_version: a.software_version.clone(),
        practitioner_role_id: a.practitioner_role.clone(),
        practitioner_role_code: a.practitioner_role_code.clone(),
        practitioner_role_display: None,
        correlation_id: a.correlation_id.clone(),
    });

    let timeout = Duration::from_secs(a.timeout.max(1));
    let cert = match (&profile.tls.cert, &profile.tls.key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => anyhow::bail!("--cert and --key go together"),
    };
    let http = client::http_client(profile.tls.cacert.as_deref(), cert, timeout)?;
    let mut tokens = match (&profile.auth, a.no_token) {
        (Some(auth), false) => Some(client::TokenSource::new(
            http.clone(),
            auth.clone(),
            a.token_cache.clone(),
            timeout,
        )?),
        _ => None,
    };
    let method: http::Method = a
        .method
        .to_ascii_uppercase()
        .parse()
        .map_err(|_| anyhow::anyhow!("-X {}: not an HTTP method", a.method))?;
    let body = match a.data.as_deref() {
        None => None,
        Some("@-") => Some(bytes::Bytes::from(std::io::read_to_string(
            std::io::stdin(),
        )?)),
        Some(d) => match d.strip_prefix('@') {
            Some(f) => Some(bytes::Bytes::from(
                std::fs::read(f).map_err(|e| anyhow::anyhow!("-d @{f}: {e}"))?,
            )),
            None => Some(bytes::Bytes::from(d.to_owned())),
        },
    };
    let mut extra = Vec::new();
    for h in &a.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("-H {h:?}: expected `Name: value`"))?;
        extra.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let mut last = None;
    for i in 0..a.repeat.max(1) {
        let token = match &mut tokens {
            Some(src) => {
                let (tok, origin, exp) = src.token().await?;
                let left = exp.saturating_sub(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                );
                match origin {
                    client::TokenOrigin::Fetched { endpoint } => {
                        eprintln!("* token: obtained from {endpoint} (expires in {left} s)")
                    }
                    client::TokenOrigin::Cached => {
                        eprintln!("* token: cached (expires in {left} s)")
                    }
                }
                Some(tok)
            }
            None => None,
        };
        let mut headers: Vec<(String, String)> = if a.no_nhsd {
            Vec::new()
        } else {
            nhsd.headers()?
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect()
        };
        // Explicit -H headers replace generated ones of the same name.
        headers.retain(|(k, _)| !extra.iter().any(|(e, _)| e.eq_ignore_ascii_case(k)));
        headers.extend(extra.iter().cloned());
        if a.verbose {
            for (k, v) in &headers {
                eprintln!("> {}", client::describe_header(k, v));
            }
        }
        let out = client::Outgoing {
            method: method.clone(),
            url: a.url.clone(),
            headers,
            body: body.clone(),
        };
        let answer = match client::send(&http, &out, token.as_deref(), timeout).await {
            Ok(answer) => answer,
            Err(e) => {
                // "connection closed" may hide a refused certificate: ask the server why.
                let why =
                    client::diagnose_tls(&a.url, profile.tls.cacert.as_deref(), cert, timeout)
                        .await;
                return Err(match why {
                    Some(w) => anyhow::anyhow!("{}: {w}", a.url),
                    None => e,
                });
            }
        };
        if a.repeat > 1 {
            println!("# request {}", i + 1);
        }
        print!("{}", answer.render());
        last = Some(answer.status);
    }
    if a.fail && last.is_some_and(|s| s.as_u16() >= 400) {
        std::process::exit(22);
    }
    Ok(())
}
