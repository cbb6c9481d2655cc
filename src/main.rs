//! `fhirgate` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use fhirgate::config::{Config, LogFormat};
use fhirgate::{admin, devstack, listener, pki};
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
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print the effective configuration (like `nginx -t`).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Development setup: generate a dev PKI if missing, start the built-in upstream and
    /// run the gateway on the given config (default: the shipped config.yaml).
    Demo {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
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

#[derive(Subcommand)]
enum NhsdCmd {
    /// Base64-encode a FHIR resource (JSON file, or - for stdin) as header NAME, checking
    /// it the way the gateway will.
    Encode {
        #[arg(long)]
        header: String,
        file: PathBuf,
    },
    /// Decode header NAME's VALUE to pretty JSON and say whether the gateway accepts it.
    Decode {
        #[arg(long)]
        header: String,
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
            Cmd::Check { config } => check(&config),
            Cmd::Demo { config } => demo(&config).await,
            Cmd::Nhsd { cmd } => nhsd_cmd(cmd),
            Cmd::Pki {
                cmd: PkiCmd::Dev { out },
            } => {
                pki::DevPki::generate()?.write_to(&out)?;
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
            println!(
                "{}",
                nhsd::decode_header(&header, &value).map_err(anyhow::Error::msg)?
            );
        }
        NhsdCmd::Example => {
            for (name, value) in nhsd::example_headers() {
                println!("{name}: {value}");
            }
        }
    }
    Ok(())
}

fn check(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    // Parse certificates, keys and CRLs too, as `run` would.
    fhirgate::listener::Snapshot::build(&cfg, &Default::default())?;
    print!("{}", cfg.summary());
    println!("configuration {} is valid", path.display());
    Ok(())
}

async fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    serve(&cfg, path).await
}

/// Runs the gateway until SIGTERM/SIGINT; SIGHUP reloads `path`.
async fn serve(cfg: &Config, path: &Path) -> anyhow::Result<()> {
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
        Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
        Err(e) => tracing::error!(
            config = %path.display(),
            error = %e,
            "reload refused; previous configuration still serving"
        ),
    }
    let _ = sd_notify::notify(&[NotifyState::Ready]);
}

async fn demo(path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new(".")).join("certs/dev");
    if pki::ensure_dev_pki(&dir)? {
        tracing::info!(dir = %dir.display(), "generated development PKI (never use it in production)");
    }
    let cfg = Config::load(path)?;
    let up: http::Uri = cfg.upstream.url.parse()?;
    let host = up.host().unwrap_or("127.0.0.1");
    let port = up.port_u16().unwrap_or(80);
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse().map_err(|_| {
        anyhow::anyhow!(
            "upstream.url: demo needs a loopback IP upstream, got {}",
            cfg.upstream.url
        )
    })?;
    if !addr.ip().is_loopback() {
        anyhow::bail!("upstream.url: demo only starts its built-in upstream on loopback");
    }
    devstack::spawn_upstream(addr).await?;
    tracing::warn!(upstream = %addr, "DEVELOPMENT upstream started: sample data only");
    let gw = cfg
        .listeners
        .first()
        .map(|l| l.address.port())
        .unwrap_or(8443);
    let d = dir.display();
    let curl = format!("curl --cacert {d}/root-ca.crt --cert {d}/client.crt --key {d}/client.key");
    let nhsd_args: String = fhirgate::nhsd::example_headers()
        .iter()
        .map(|(k, v)| format!(" \\\n    -H '{k}: {v}'"))
        .collect();
    println!(
        "\nfhirgate demo is up (DEVELOPMENT ONLY). Try:\n\n\
         # capability statement (exempt from NHSD headers)\n\
         {curl} https://localhost:{gw}/metadata\n\n\
         # a BaRS request with NHSD headers: the upstream echoes the identity it was given\n\
         {curl} https://localhost:{gw}/Patient/1{nhsd_args}\n\n\
         # the same without NHSD headers: 400 OperationOutcome\n\
         {curl} https://localhost:{gw}/Patient/1\n\n\
         # a revoked client certificate: refused in the TLS handshake\n\
         curl --cacert {d}/root-ca.crt --cert {d}/revoked-client.crt --key {d}/revoked-client.key https://localhost:{gw}/metadata\n"
    );
    // Give pending log lines a moment so the banner is not interleaved.
    tokio::time::sleep(Duration::from_millis(10)).await;
    serve(&cfg, path).await
}
