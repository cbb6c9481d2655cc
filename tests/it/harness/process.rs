//! The real binary as a process: `fhirgate ARGS` run to completion ([`fhirgate`]), a
//! gateway started with `fhirgate run` and killed when the test ends ([`run_gateway`],
//! [`KillOnDrop`]), and free loopback ports to give it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Runs `fhirgate ARGS`; returns (exit status success, stdout, stderr).
pub fn fhirgate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(args)
        .output()
        .expect("fhirgate runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Kills the process if the test fails half-way, so no process outlives the test.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `fhirgate run --config CFG` with `env` added. Logs go to the file `log`: a pipe nobody
/// reads would fill up and block the gateway.
pub fn run_gateway(cfg: &Path, log: &Path, env: &[(&str, &str)]) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["run", "--config"])
        .arg(cfg)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn fhirgate run");
    KillOnDrop(child)
}

/// The log at `path` once it contains `needle`, waiting up to `within` (then as it is):
/// a change is applied before the line reporting it is written, so a test that has just
/// seen the change can read the log a moment too early.
pub async fn log_once_it_has(path: &Path, needle: &str, within: Duration) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) || std::time::Instant::now() >= deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `sig` (`-HUP`, `-TERM`, …) to `child` with kill(1).
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(ok.success(), "kill {sig} {}", child.id());
}

/// A loopback address nothing listens on just now (for a process that binds it itself).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// The port of [`free_addr`].
pub fn free_port() -> u16 {
    free_addr().port()
}
