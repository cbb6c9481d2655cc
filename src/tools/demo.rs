//! `fhirgate demo`: development PKI, built-in upstream and authorisation server, a sender
//! profile, and the gateway on the given config, with a banner of commands to try.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::server::Shards;
use crate::tools::{client, devauth, devstack, pki};

/// `host:port` of a loopback URL, for the built-in development services.
fn loopback_addr(field: &str, url: &str) -> anyhow::Result<std::net::SocketAddr> {
    let u: http::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("{field}: {url}: {e}"))?;
    let host = match u.host() {
        Some("localhost") => "127.0.0.1",
        Some(h) => h.trim_start_matches('[').trim_end_matches(']'),
        None => anyhow::bail!("{field}: {url} has no host"),
    };
    let port = u.port_u16().unwrap_or(if u.scheme_str() == Some("https") {
        443
    } else {
        80
    });
    let ip: std::net::IpAddr = host.parse().map_err(|_| {
        anyhow::anyhow!("{field}: demo starts its built-in service on loopback only, got {url}")
    })?;
    if !ip.is_loopback() {
        anyhow::bail!("{field}: demo starts its built-in service on loopback only, got {url}");
    }
    Ok(std::net::SocketAddr::new(ip, port))
}

/// Writes a `fhirgate client` profile for one development sender into `dir`.
fn write_profile(
    dir: &Path,
    name: &str,
    issuer: &str,
    client_id: &str,
    credential: &str,
) -> anyhow::Result<PathBuf> {
    let e = client::NhsdProfile::example();
    let q = |o: &Option<String>| format!("{:?}", o.as_deref().unwrap_or_default());
    let text = format!(
        "# fhirgate client profile written by `fhirgate demo` (DEVELOPMENT ONLY).\n\
         # Paths are relative to this file. Use: fhirgate client --profile {name} URL\n\
         tls:\n  cacert: root-ca.crt\n  cert: client.crt\n  key: client.key\n\
         auth:\n  issuer: {issuer}\n  client_id: {client_id}\n  {credential}\n\
         nhsd:\n  ods_code: {ods}\n  organisation_name: {org}\n  target_identifier: {target}\n\
         \x20 software_id: {sid}\n  software_id_system: {sys}\n  software_name: {sname}\n  software_version: {sver}\n\
         \x20 practitioner_role_id: {role}\n  practitioner_role_code: {code}\n",
        ods = q(&e.ods_code),
        org = q(&e.organisation_name),
        target = q(&e.target_identifier),
        sid = q(&e.software_id),
        sys = q(&e.software_id_system),
        sname = q(&e.software_name),
        sver = q(&e.software_version),
        role = q(&e.practitioner_role_id),
        code = q(&e.practitioner_role_code),
    );
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Shell-quotes `s` for the pasteable banner.
fn sq(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-:=@".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Runs the demo; connections are served on `shards` if given (see `fhirgate run`).
pub async fn run(path: &Path, shards: Option<Arc<Shards>>) -> anyhow::Result<()> {
    // Check before writing anything: run elsewhere, demo would leave certs/dev behind.
    if !path.is_file() {
        let here = std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|_| ".".into());
        anyhow::bail!(
            "{}: no such config file (looked in {here}); run `fhirgate demo` from the fhirgate \
             repository root, where the shipped config.yaml is, or pass --config PATH/config.yaml \
             (certs/dev is generated next to it)",
            path.display()
        );
    }
    let dir = path.parent().unwrap_or(Path::new(".")).join("certs/dev");
    if pki::ensure_dev_pki(&dir)? {
        tracing::info!(dir = %dir.display(), "generated development PKI (never use it in production)");
    }
    let creds = devauth::ensure_credentials(&dir)?;
    let cfg = Config::load(path)?;

    let up_addr = loopback_addr("upstream.url", &cfg.upstream.url)?;
    devstack::spawn_upstream(up_addr).await?;
    tracing::warn!(upstream = %up_addr, "DEVELOPMENT upstream started: sample data only");

    let issuer = match (&cfg.auth.mode, &cfg.auth.issuer) {
        (crate::pipeline::auth::AuthMode::Introspection, Some(issuer)) => {
            let addr = loopback_addr("auth.issuer", issuer)?;
            let server = Arc::new(devauth::DevAuthServer::new(issuer, &creds)?);
            devauth::spawn(server, addr, &cfg.tls.server_cert, &cfg.tls.server_key).await?;
            tracing::warn!(issuer = %issuer, "DEVELOPMENT authorisation server started: fixed clients, tokens in memory");
            Some(issuer.trim_end_matches('/').to_owned())
        }
        _ => None,
    };

    let gw = cfg
        .listeners
        .first()
        .map(|l| l.address.port())
        .unwrap_or(8443);
    let url = format!("https://localhost:{gw}");
    let d = dir.display().to_string();
    let ca = sq(&format!("{d}/root-ca.crt"));
    let curl = |who: &str| {
        format!(
            "curl -sS -i --cacert {ca} --cert {} --key {}",
            sq(&format!("{d}/{who}.crt")),
            sq(&format!("{d}/{who}.key"))
        )
    };
    let me = std::env::current_exe()
        .map(|p| sq(&p.display().to_string()))
        .unwrap_or_else(|_| "fhirgate".into());
    let nhsd_example = crate::pipeline::nhsd::example_headers();
    let h = |list: &[(&str, String)]| -> String {
        list.iter()
            .map(|(k, v)| format!("-H {}", sq(&format!("{k}: {v}"))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let bad_nhsd: Vec<(&str, String)> = nhsd_example
        .iter()
        .map(|(k, v)| {
            if *k == crate::pipeline::nhsd::END_USER_ORGANISATION {
                (*k, "not-base64!".to_owned())
            } else {
                (*k, v.clone())
            }
        })
        .collect();
    let mut b = String::new();
    b.push_str("\nfhirgate demo is up (DEVELOPMENT ONLY: generated PKI, sample upstream");
    b.push_str(if issuer.is_some() {
        ", dev authorisation server)."
    } else {
        ")."
    });
    b.push_str(
        "\nPaste these into bash; each `# [expect ...]` line says what the next command shows\n\
         (curl -i and fhirgate client print the status line first).\n",
    );
    b.push_str("# --- begin ---\n");
    b.push_str(&format!("NHSD=({})\n", h(&nhsd_example)));
    if let Some(iss) = &issuer {
        let profiles = [
            (
                "sender-basic.yaml",
                devauth::SENDER_CLIENT_ID,
                format!("client_secret_file: {}", devauth::SENDER_SECRET_FILE),
            ),
            (
                "sender-jwt.yaml",
                devauth::SENDER_JWT_CLIENT_ID,
                format!("private_key_file: {}", devauth::SENDER_JWT_KEY_FILE),
            ),
            (
                "reader.yaml",
                devauth::READER_CLIENT_ID,
                format!("client_secret_file: {}", devauth::READER_SECRET_FILE),
            ),
        ];
        for (name, id, cred) in &profiles {
            write_profile(&dir, name, iss, id, cred)?;
        }
        let p = |n: &str| sq(&format!("{d}/{n}"));
        b.push_str(&format!(
            "# a BaRS sender's token: client credentials with HTTP Basic at the dev authorisation server\n\
             TOKEN=$(curl -sS --cacert {ca} -u \"{id}:$(cat {secret})\" -d grant_type=client_credentials {iss}/token | sed -E 's/.*\"access_token\":\"([^\"]+)\".*/\\1/')\n\
             # [expect 200] allowed: client certificate + token + NHSD headers; the upstream echoes the verified identity\n\
             {c} -H \"Authorization: Bearer $TOKEN\" \"${{NHSD[@]}}\" {url}/Patient/1\n\
             # [expect 401] no token: 401 with WWW-Authenticate: Bearer\n\
             {c} \"${{NHSD[@]}}\" {url}/Patient/1\n\
             # [expect 403] a token the authorisation server never issued\n\
             {c} -H 'Authorization: Bearer not-a-real-token' \"${{NHSD[@]}}\" {url}/Patient/1\n\
             # [expect 400] a bad NHSD header (End-User-Organisation is not Base64)\n\
             {c} -H \"Authorization: Bearer $TOKEN\" {bad} {url}/Patient/1\n",
            id = devauth::SENDER_CLIENT_ID,
            secret = p(devauth::SENDER_SECRET_FILE),
            c = curl("client"),
            bad = h(&bad_nhsd),
        ));
        b.push_str(&format!(
            "# [expect 200] the capability statement needs neither a token nor NHSD headers\n\
             {c} {url}/metadata\n\
             # [expect refused] a revoked client certificate: refused in the TLS handshake (alert certificate revoked)\n\
             {r} --http1.1 {url}/metadata\n\
             # [expect refused] fhirgate client names the alert too\n\
             {me} client --cacert {ca} --cert {rc} --key {rk} --no-nhsd --no-token {url}/metadata\n\
             # [expect 200] fhirgate client: token by client credentials (Basic), NHSD headers from the profile\n\
             {me} client --profile {pb} {url}/Patient/1\n\
             # [expect 200] fhirgate client as a private_key_jwt sender (signed JWT client assertion)\n\
             {me} client --profile {pj} {url}/Patient/1\n\
             # [expect 403] scope: bars-reader holds system/Patient.read only, so $process-message is refused\n\
             {me} client --profile {pr} -X POST -d '{{\"resourceType\":\"Bundle\",\"type\":\"message\"}}' '{url}/$process-message'\n\
             # [expect 401] fhirgate client without a token\n\
             {me} client --profile {pb} --no-token {url}/Patient/1\n",
            c = curl("client"),
            r = curl("revoked-client"),
            rc = sq(&format!("{d}/revoked-client.crt")),
            rk = sq(&format!("{d}/revoked-client.key")),
            pb = p("sender-basic.yaml"),
            pj = p("sender-jwt.yaml"),
            pr = p("reader.yaml"),
        ));
    } else {
        b.push_str(&format!(
            "# [expect 200] a BaRS request with NHSD headers (auth.mode is not introspection: no token)\n\
             {c} \"${{NHSD[@]}}\" {url}/Patient/1\n\
             # [expect 400] the same without NHSD headers\n\
             {c} {url}/Patient/1\n\
             # [expect refused] a revoked client certificate: refused in the TLS handshake (alert certificate revoked)\n\
             {r} --http1.1 {url}/metadata\n",
            c = curl("client"),
            r = curl("revoked-client"),
        ));
    }
    b.push_str("# --- end ---\nCtrl-C stops the gateway and the development services.\n");
    crate::server::lifecycle::serve(&cfg, path, Some(b), shards).await
}
