//! `fhirgate demo` as a newcomer meets it: started as a subprocess on the shipped
//! config.yaml (ports moved to free ones), then every command its banner prints is run in
//! bash, exactly as printed, and each answer is checked against the banner's own
//! `# [expect …]` line.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One expectation from the banner and the command it applies to.
struct Step {
    expect: String,
    command: String,
}

/// Splits the pasteable block into setup lines (run as they are) and expectations.
fn parse(block: &[String]) -> (Vec<String>, Vec<Step>) {
    let mut script = Vec::new();
    let mut steps = Vec::new();
    let mut pending: Option<String> = None;
    for line in block {
        if let Some(rest) = line.strip_prefix("# [expect ") {
            let expect = rest.split(']').next().unwrap_or_default().to_owned();
            pending = Some(expect);
        } else if line.starts_with('#') || line.trim().is_empty() {
            continue;
        } else if let Some(expect) = pending.take() {
            steps.push(Step {
                expect,
                command: line.clone(),
            });
        } else {
            script.push(line.clone());
        }
    }
    (script, steps)
}

#[test]
fn every_printed_command_does_what_the_banner_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (gw, up, admin, auth) = (free_port(), free_port(), free_port(), free_port());
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml")).unwrap();
    let cfg = shipped
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{gw}"))
        .replace("http://127.0.0.1:8081", &format!("http://127.0.0.1:{up}"))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin}"))
        .replace(
            "https://localhost:9443",
            &format!("https://localhost:{auth}"),
        );
    assert_ne!(cfg, shipped, "the shipped config's ports moved");
    let cfg_path = dir.path().join("config.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["demo", "--config"])
        .arg(&cfg_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("fhirgate demo starts");
    let stdout = child.stdout.take().expect("stdout");
    let demo = Demo(child);

    // The banner is printed once the gateway is ready (discovery done).
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut block = Vec::new();
    let mut inside = false;
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("demo printed its banner within a minute");
        if line == "# --- begin ---" {
            inside = true;
        } else if line == "# --- end ---" {
            break;
        } else if inside {
            block.push(line);
        }
    }

    let (setup, steps) = parse(&block);
    let expects: Vec<&str> = steps.iter().map(|s| s.expect.as_str()).collect();
    for want in ["200", "401", "403", "400", "refused"] {
        assert!(
            expects.contains(&want),
            "banner shows a {want}: {expects:?}"
        );
    }
    assert!(
        steps
            .iter()
            .any(|s| s.command.contains(" client --profile ")),
        "banner shows fhirgate client equivalents"
    );

    // One bash script: the setup lines as printed, then each command with its outcome
    // captured (curl's status code; fhirgate client's status line).
    let mut script = String::from("set -u\n");
    for l in &setup {
        script.push_str(l);
        script.push('\n');
    }
    for (i, s) in steps.iter().enumerate() {
        if s.command.starts_with("curl ") {
            script.push_str(&format!(
                "code=$({} -o /dev/null -w '%{{http_code}}' 2>/dev/null); echo \"STEP {i} ${{code:-000}}\"\n",
                s.command
            ));
        } else {
            script.push_str(&format!(
                "code=$({} 2>/dev/null | head -1 | cut -d' ' -f2); echo \"STEP {i} ${{code:-000}}\"\n",
                s.command
            ));
        }
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .output()
        .expect("bash runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let got: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("STEP "))
        .collect();
    assert_eq!(got.len(), steps.len(), "every step ran:\n{text}\n{script}");
    for (i, s) in steps.iter().enumerate() {
        let code = got[i].split_once(' ').map(|x| x.1).unwrap_or_default();
        let want = if s.expect == "refused" {
            "000"
        } else {
            &s.expect
        };
        assert_eq!(
            code, want,
            "step {i} expected {} but got {code}:\n{}",
            s.expect, s.command
        );
    }
    // Ctrl-C (SIGINT) stops the gateway and the development services cleanly.
    let mut demo = demo;
    let pid = demo.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill runs")
        .success());
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = demo.0.try_wait().expect("wait") {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = status.expect("demo exits within 10 s of Ctrl-C");
    assert!(status.success(), "{status}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", auth)).is_err(),
        "the development authorisation server stopped too"
    );
}
