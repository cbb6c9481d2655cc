//! `fhirgate` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use fhirgate::config::{Config, LogFormat};
use fhirgate::{admin, client, devauth, devstack, listener, pki};
use sd_notify::NotifyState;

#[derive(Parser)]
#[command(
    name = "fhirgate",
    version,
    about = "Mutual-TLS security gateway for NHS FHIR APIs"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Run {
        /// Configuration file (YAML); relative paths in it are resolved against its directory.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print the effective configuration (like `nginx -t`),
    /// then warnings for risky settings in integration/production.
    Check {
        /// Configuration file (YAML) to validate.
        #[arg(long, short)]
        config: PathBuf,
        /// Fail (exit 1) on any warning, not only on errors (for ExecStartPre and CI).
        #[arg(long)]
        strict: bool,
        /// Accept the warning for this field path (e.g. admin.address) knowingly; repeatable.
        #[arg(long, value_name = "FIELD")]
        allow: Vec<String>,
    },
    /// Development setup: generate a dev PKI if missing, start the built-in upstream and
    /// run the gateway on the given config (default: the shipped config.yaml).
    Demo {
        /// Configuration file; the development PKI is written to certs/dev next to it.
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Send one request as a BaRS sender would: token by client credentials (cached until
    /// expiry), NHSD-* headers from a profile and/or flags, mutual TLS. Prints the status
    /// line, headers and body (pretty JSON).
    Client(Box<ClientArgs>),
    /// Print a certificate's subject, SANs, issuer, validity and fingerprint and, with
    /// --config, whether each trust bundle accepts it as a client certificate.
    InspectCert {
        /// PEM (leaf first, then any intermediates) or DER certificate.
        file: PathBuf,
        /// Gateway configuration whose trust bundles (CAs, CRLs) judge the certificate.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// PKI helpers.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
    /// Build and inspect BaRS NHSD-* headers.
    Nhsd {
        #[command(subcommand)]
        cmd: NhsdCmd,
    },
}

#[derive(clap::Args)]
struct ClientArgs {
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

#[derive(Subcommand)]
enum NhsdCmd {
    /// Base64-encode a FHIR resource (JSON file, or - for stdin) as header NAME, checking
    /// it the way the gateway will.
    Encode {
        /// Header name, e.g. NHSD-End-User-Organisation (any case).
        #[arg(long)]
        header: String,
        /// JSON file with the resource, or - for stdin.
        file: PathBuf,
    },
    /// Decode header NAME's VALUE to pretty JSON and say whether the gateway accepts it.
    Decode {
        /// Header name, e.g. NHSD-End-User-Organisation (any case).
        #[arg(long)]
        header: String,
        /// The header's value as sent on the wire.
        value: String,
    },
    /// Print a complete valid set of BaRS headers, one `Name: value` per line.
    Example,
}

#[derive(Subcommand)]
enum PkiCmd {
    /// (Re)generate the development PKI (root, SubCA, server, client, revoked, expired,
    /// foreign certificates and CRLs). Development only.
    Dev {
        /// Directory to write the certificates, keys, CRLs and secrets to.
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
    },
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FHIRGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr; colour only on a terminal, so files and journald stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The config may ask for JSON logs; read it (cheaply) before logging starts.
    let json = cli.log_json
        || match &cli.cmd {
            Cmd::Run { config } | Cmd::Demo { config } => Config::load(config)
                .map(|c| c.logging.format == LogFormat::Json)
                .unwrap_or(false),
            _ => false,
        };
    init_logging(json);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fhirgate: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Run { config } => run(&config).await,
            Cmd::Check {
                config,
                strict,
                allow,
            } => check(&config, strict, &allow),
            Cmd::Demo { config } => demo(&config).await,
            Cmd::Nhsd { cmd } => nhsd_cmd(cmd),
            Cmd::Client(args) => client_cmd(*args).await,
            Cmd::InspectCert { file, config } => {
                let report = fhirgate::inspect::inspect(&file, config.as_deref())?;
                print!("{report}");
                match config {
                    // Scripts and CI can test the verdict: no bundle accepts it, exit 1.
                    Some(c) if !any_bundle_accepts(&report) => Err(anyhow::anyhow!(
                        "no trust bundle of {} accepts {} as a client certificate",
                        c.display(),
                        file.display()
                    )),
                    _ => Ok(()),
                }
            }
            Cmd::Pki {
                cmd: PkiCmd::Dev { out },
            } => {
                pki::DevPki::generate()?.write_to(&out)?;
                devauth::ensure_credentials(&out)?;
                println!("development PKI written to {}", out.display());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fhirgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether an `inspect-cert --config` report has a `bundle NAME: ACCEPTED` line.
fn any_bundle_accepts(report: &str) -> bool {
    report.lines().any(|l| {
        l.trim_start()
            .strip_prefix("bundle ")
            .is_some_and(|r| r.ends_with(": ACCEPTED") || r.contains(": ACCEPTED "))
    })
}

fn nhsd_cmd(cmd: NhsdCmd) -> anyhow::Result<()> {
    use fhirgate::nhsd;
    match cmd {
        NhsdCmd::Encode { header, file } => {
            let json = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)?
            };
            println!(
                "{}",
                nhsd::encode_header(&header, &json).map_err(anyhow::Error::msg)?
            );
        }
        NhsdCmd::Decode { header, value } => {
            let (text, valid) =
                nhsd::decode_header_verdict(&header, &value).map_err(anyhow::Error::msg)?;
            println!("{text}");
            if !valid {
                // The verdict is on stdout already; the status lets scripts act on it.
                anyhow::bail!("{header}: the gateway would refuse this value");
            }
        }
        NhsdCmd::Example => {
            for (name, value) in nhsd::example_headers() {
                println!("{name}: {value}");
            }
        }
    }
    Ok(())
}

fn check(path: &Path, strict: bool, allow: &[String]) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    // Parse certificates, keys and CRLs too, as `run` would.
    let snapshot = fhirgate::listener::Snapshot::build(&cfg, &Default::default())?;
    print!("{}", cfg.summary());
    let inv = snapshot.inventory();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    print!("{}", inv.render(now, snapshot.warn_before()));
    // Stale CRLs and expiring certificates are reported but do not fail --strict: the
    // systemd unit runs `check --strict` before every start, and a CRL the gateway will
    // fetch itself must not keep it from starting. Weak trust set-ups do count.
    for line in inv.stale(now, snapshot.warn_before()) {
        println!("WARNING: {line}");
    }
    let allowed = |field: &str| {
        allow.iter().any(|a| {
            field == a
                || field
                    .strip_prefix(a.as_str())
                    .is_some_and(|r| r.starts_with(['.', '[', ':']))
        })
    };
    let mut warnings = fhirgate::lint::lint(&cfg);
    warnings.extend(fhirgate::lint::file_modes(&cfg));
    warnings.retain(|w| !allowed(&w.field));
    // A finding the linter also made (with its fix) is said once.
    let trust: Vec<&String> = inv
        .warnings
        .iter()
        .filter(|w| !allowed(w))
        .filter(|w| {
            !warnings
                .iter()
                .any(|l| w.starts_with(&format!("{}:", l.field)))
        })
        .collect();
    for w in &trust {
        println!("WARNING: {w}");
    }
    for w in &warnings {
        eprintln!("{w}");
    }
    let total = warnings.len() + trust.len();
    if strict && total > 0 {
        anyhow::bail!(
            "{}: {total} warning(s) and --strict: fix them or accept one with --allow FIELD",
            path.display(),
        );
    }
    match total {
        0 => println!("configuration {} is valid", path.display()),
        n => println!(
            "configuration {} is valid, with {n} warning(s)",
            path.display()
        ),
    }
    Ok(())
}

async fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    // The same warnings as `fhirgate check`, in the log of every start.
    for w in fhirgate::lint::lint(&cfg)
        .into_iter()
        .chain(fhirgate::lint::file_modes(&cfg))
    {
        tracing::warn!(field = %w.field, fix = %w.fix, "risky setting: {}", w.risk);
    }
    serve(&cfg, path, None).await
}

/// Runs the gateway until SIGTERM/SIGINT; SIGHUP reloads `path`. `banner` is printed to
/// stdout once the gateway is ready.
async fn serve(cfg: &Config, path: &Path, banner: Option<String>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;

    let running = listener::start(cfg).await?;
    for a in &running.addrs {
        tracing::info!(address = %a, "listening (TLS-MA)");
    }
    let ready = Arc::new(admin::Readiness::default());
    let (admin_stop, admin_rx) = tokio::sync::watch::channel(false);
    if let Some(a) = &cfg.admin {
        let metrics = running.server().metrics().clone();
        let addr = admin::start(a.address, ready.clone(), metrics, admin_rx).await?;
        tracing::info!(address = %addr, "admin listener (healthz, readyz, metrics)");
    }
    let server = running.server().clone();
    ready.add_check("token_verification", Box::new(move || server.auth_status()));
    // Stale CRLs and expiring certificates are reported, not failed: the gateway still
    // serves (what a stale CRL does is `enforce_crl_expiry`'s business).
    let server = running.server().clone();
    ready.add_check(
        "certificates_and_crls",
        Box::new(move || {
            let stale = server.trust_stale();
            if stale.is_empty() {
                (true, "all current".into())
            } else {
                (true, format!("STALE: {}", stale.join("; ")))
            }
        }),
    );
    // At start and hourly: WARN for CRLs near or past nextUpdate and certificates near
    // or past notAfter.
    let server = running.server().clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            server.log_trust_warnings();
        }
    });
    ready.serving.store(true, Ordering::Relaxed);
    // READY=1 only once listeners are bound, TLS is loaded and discovery has run. If the
    // authorisation server stays unreachable, report ready after a minute anyway (below
    // systemd's default start timeout, as a restart would not help): requests with
    // unknown tokens are refused with 503 until discovery succeeds.
    let waited = std::time::Instant::now();
    while !running.server().auth_status().0 && waited.elapsed() < Duration::from_secs(60) {
        let _ = sd_notify::notify(&[NotifyState::Status("waiting for OAuth discovery")]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (auth_ok, detail) = running.server().auth_status();
    if !auth_ok {
        tracing::warn!(%detail, "starting without a discovered introspection endpoint");
    }
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    if let Some(b) = banner {
        println!("{b}");
    }
    if let Some(interval) = sd_notify::watchdog_enabled() {
        // Pinged from the runtime: a wedged runtime stops the pings and systemd restarts us.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    }

    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => reload(&running, path),
        }
    }
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    ready.draining.store(true, Ordering::Relaxed);
    tracing::info!("shutting down: no new connections, draining");
    let left = running.shutdown(cfg.limits.drain_timeout).await;
    let _ = admin_stop.send(true);
    if left > 0 {
        tracing::warn!(
            open = left,
            "drain timeout reached with connections still open"
        );
    }
    Ok(())
}

/// Re-reads the config; on any error the running configuration stays in force.
fn reload(running: &listener::Running, path: &Path) {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    let _ = sd_notify::notify(&states);
    let result = Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|cfg| running.server().reload(&cfg).map_err(|e| e.to_string()));
    match result {
        Ok(()) => {
            tracing::info!(config = %path.display(), "configuration reloaded");
            running.server().log_trust_warnings();
        }
        Err(e) => tracing::error!(
            config = %path.display(),
            error = %e,
            "reload refused; previous configuration still serving"
        ),
    }
    let _ = sd_notify::notify(&[NotifyState::Ready]);
}

/// `fhirgate client`: profile + flags, then token, headers and the request.
async fn client_cmd(a: ClientArgs) -> anyhow::Result<()> {
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

async fn demo(path: &Path) -> anyhow::Result<()> {
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
        (fhirgate::auth::AuthMode::Introspection, Some(issuer)) => {
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
    let nhsd_example = fhirgate::nhsd::example_headers();
    let h = |list: &[(&str, String)]| -> String {
        list.iter()
            .map(|(k, v)| format!("-H {}", sq(&format!("{k}: {v}"))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let bad_nhsd: Vec<(&str, String)> = nhsd_example
        .iter()
        .map(|(k, v)| {
            if *k == fhirgate::nhsd::END_USER_ORGANISATION {
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
    serve(&cfg, path, Some(b)).await
}
