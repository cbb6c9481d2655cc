//! `fhirgate` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fhirgate::config::Config;
use fhirgate::{devstack, listener, pki};

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
    init_logging(cli.log_json);
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

fn check(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    // Parse certificates, keys and CRLs too, as `run` would.
    fhirgate::listener::Server::from_config(&cfg)?;
    print!("{}", cfg.summary());
    println!("configuration {} is valid", path.display());
    Ok(())
}

async fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    serve(&cfg).await
}

async fn serve(cfg: &Config) -> anyhow::Result<()> {
    let running = listener::start(cfg).await?;
    for a in &running.addrs {
        tracing::info!(address = %a, "listening (TLS-MA)");
    }
    wait_for_signal().await;
    tracing::info!("shutting down: no new connections, draining");
    let left = running.shutdown(cfg.limits.drain_timeout).await;
    if left > 0 {
        tracing::warn!(
            open = left,
            "drain timeout reached with connections still open"
        );
    }
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
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
    println!(
        "\nfhirgate demo is up. Try:\n  \
         curl --cacert {d}/root-ca.crt --cert {d}/client.crt --key {d}/client.key https://localhost:{gw}/metadata\n  \
         curl --cacert {d}/root-ca.crt --cert {d}/revoked-client.crt --key {d}/revoked-client.key https://localhost:{gw}/metadata   # refused in the handshake\n"
    );
    // Give pending log lines a moment so the banner is not interleaved.
    tokio::time::sleep(Duration::from_millis(10)).await;
    serve(&cfg).await
}
