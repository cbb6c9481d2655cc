//! `fhirgate` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use fhirgate::config::{Config, LogFormat};
use fhirgate::pipeline::nhsd::{self, NhsdCmd};
use fhirgate::server::{lifecycle, Shards};
#[cfg(feature = "tools")]
use fhirgate::tools::{demo, devauth, inspect, pki, sender};

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
    #[cfg(feature = "tools")]
    Demo {
        /// Configuration file; the development PKI is written to certs/dev next to it.
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Send one request as a BaRS sender would: token by client credentials (cached until
    /// expiry), NHSD-* headers from a profile and/or flags, mutual TLS. Prints the status
    /// line, headers and body (pretty JSON).
    #[cfg(feature = "tools")]
    Client(Box<sender::ClientArgs>),
    /// Print a certificate's subject, SANs, issuer, validity and fingerprint and, with
    /// --config, whether each trust bundle accepts it as a client certificate.
    #[cfg(feature = "tools")]
    InspectCert {
        /// PEM (leaf first, then any intermediates) or DER certificate.
        file: PathBuf,
        /// Gateway configuration whose trust bundles (CAs, CRLs) judge the certificate.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// PKI helpers.
    #[cfg(feature = "tools")]
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

#[cfg(feature = "tools")]
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

/// Whether the config at `path` asks for JSON logs; read before logging starts.
fn json_logs(path: &std::path::Path) -> bool {
    Config::load(path)
        .map(|c| c.logging.format == LogFormat::Json)
        .unwrap_or(false)
}

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The process's runtime and, for a gateway on more than one CPU, the runtimes that
/// serve its connections. One CPU: tokio's current-thread scheduler runs everything (it
/// served the same requests with up to 10% less CPU than the multi-thread one with one
/// worker; bench/README.md, eighteenth pass). More: one current-thread runtime per CPU
/// serves connections (`Shards`: 16–22% less CPU per HTTP/2 request than the multi-thread
/// scheduler on two CPUs; twentieth pass) and a current-thread one runs the rest. Other
/// commands get the multi-thread scheduler with `workers` threads.
fn runtimes(
    workers: usize,
    serving: bool,
) -> std::io::Result<(tokio::runtime::Runtime, Option<Arc<Shards>>)> {
    if workers == 1 || serving {
        let shards = (workers > 1).then(|| Shards::start(workers)).transpose()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return Ok((rt, shards));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    Ok((rt, None))
}

/// The runtime's thread count: `TOKIO_WORKER_THREADS` (its value `env`) when set, else
/// one per CPU this process may run on (`available_parallelism` counts CPU affinity and a
/// cgroup CPU quota, so a sidecar or pod limited to one CPU gets one). A value that is
/// not a positive whole number is refused, as tokio refuses it (with a panic), so an
/// operator's typo is seen at start rather than ignored.
fn worker_count(env: Option<std::ffi::OsString>) -> Result<usize, String> {
    let Some(v) = env else {
        return Ok(std::thread::available_parallelism().map_or(1, |n| n.get()));
    };
    v.to_str()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            format!(
                "TOKIO_WORKER_THREADS={:?} is not a positive whole number: set it to the \
                 number of runtime threads (for example 2), or unset it for one per CPU",
                v.to_string_lossy()
            )
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The config may ask for JSON logs; read it (cheaply) before logging starts.
    let json = cli.log_json
        || match &cli.cmd {
            Cmd::Run { config } => json_logs(config),
            #[cfg(feature = "tools")]
            Cmd::Demo { config } => json_logs(config),
            _ => false,
        };
    // Flushed when dropped: after the runtime, before the final error line.
    let log = fhirgate::logging::init(json);
    let workers = match worker_count(std::env::var_os("TOKIO_WORKER_THREADS")) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("fhirgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let serving = match &cli.cmd {
        Cmd::Run { .. } => true,
        #[cfg(feature = "tools")]
        Cmd::Demo { .. } => true,
        _ => false,
    };
    let (rt, shards) = match runtimes(workers, serving) {
        Ok(rts) => rts,
        Err(e) => {
            eprintln!("fhirgate: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Run { config } => lifecycle::run(&config, shards.clone()).await,
            Cmd::Check {
                config,
                strict,
                allow,
            } => lifecycle::check(&config, strict, &allow),
            Cmd::Nhsd { cmd } => nhsd::command(cmd),
            #[cfg(feature = "tools")]
            Cmd::Demo { config } => demo::run(&config, shards.clone()).await,
            #[cfg(feature = "tools")]
            Cmd::Client(args) => sender::run(*args).await,
            #[cfg(feature = "tools")]
            Cmd::InspectCert { file, config } => {
                let report = inspect::inspect(&file, config.as_deref())?;
                print!("{report}");
                match config {
                    // Scripts and CI can test the verdict: no bundle accepts it, exit 1.
                    Some(c) if !inspect::any_bundle_accepts(&report) => Err(anyhow::anyhow!(
                        "no trust bundle of {} accepts {} as a client certificate",
                        c.display(),
                        file.display()
                    )),
                    _ => Ok(()),
                }
            }
            #[cfg(feature = "tools")]
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
    drop(rt);
    // After the drain: stops the connection runtimes (and whatever they still serve).
    if let Some(s) = shards {
        s.stop();
    }
    drop(log);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fhirgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worker_count;

    #[test]
    fn worker_count_takes_a_positive_number_and_refuses_anything_else() {
        assert_eq!(worker_count(Some("3".into())), Ok(3));
        assert_eq!(worker_count(Some(" 1 ".into())), Ok(1));
        assert!(worker_count(None).is_ok_and(|n| n >= 1));
        for bad in ["0", "two", "", "-1", "1.5"] {
            let e = worker_count(Some(bad.into())).expect_err(bad);
            assert!(
                e.starts_with(&format!("TOKIO_WORKER_THREADS={bad:?} is not a positive")),
                "{e}"
            );
            assert!(e.contains("unset it for one per CPU"), "{e}");
        }
    }
}
