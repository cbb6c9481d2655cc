//! `fhirgate demo` as a newcomer meets it: started as a subprocess on the shipped
//! config.yaml (ports moved to free ones), then every command its banner prints is run in
//! bash, exactly as printed, and each answer is checked against the banner's own
//! `# [expect …]` line.

use crate::harness::free_port;
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

/// Starts `fhirgate demo --config cfg` and returns it with the pasteable block of its
/// banner (between `# --- begin ---` and `# --- end ---`).
fn start_demo(cfg_path: &std::path::Path) -> (Demo, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["demo", "--config"])
        .arg(cfg_path)
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

    (demo, block)
}

/// Runs the setup lines and then each step exactly as printed in bash (in `dir`), and
/// checks the status line each step prints against its `# [expect …]`.
fn run_steps(dir: &std::path::Path, setup: &[String], steps: &[Step]) {
    // One bash script: the setup lines as printed, then each command exactly as printed,
    // its whole output (stdout and stderr, as a terminal shows them) between markers.
    let mut script = String::from("set -u\n");
    for l in setup {
        script.push_str(l);
        script.push('\n');
    }
    for (i, s) in steps.iter().enumerate() {
        script.push_str(&format!(
            "echo '@@BEGIN {i}'; {} 2>&1; printf '\\n@@END {i}\\n'\n",
            s.command
        ));
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir)
        .output()
        .expect("bash runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut shown: Vec<String> = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        if line.starts_with("@@BEGIN ") {
            cur = Some(String::new());
        } else if line.starts_with("@@END ") {
            shown.extend(cur.take());
        } else if let Some(c) = &mut cur {
            c.push_str(line);
            c.push('\n');
        }
    }
    assert_eq!(
        shown.len(),
        steps.len(),
        "every step ran:\n{text}\n{script}"
    );
    for (i, (s, shown)) in steps.iter().zip(&shown).enumerate() {
        // The status as the newcomer sees it: the first status line printed
        // (`HTTP/2 200` from curl -i, `HTTP/2.0 200 OK` from fhirgate client).
        let status = shown.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            w.next()
                .filter(|v| v.starts_with("HTTP/"))
                .and(w.next())
                .filter(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_digit()))
        });
        if s.expect == "refused" {
            assert_eq!(
                status, None,
                "step {i}: no HTTP answer:\n{}\n{shown}",
                s.command
            );
            // Said in words, not `getpeername() failed … errno 107` or "connection closed".
            assert!(
                shown.contains("certificate revoked"),
                "step {i} shows why it was refused:\n{}\n{shown}",
                s.command
            );
        } else {
            assert_eq!(
                status,
                Some(s.expect.as_str()),
                "step {i} expected {}:\n{}\n{shown}",
                s.expect,
                s.command
            );
        }
    }
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

    let (demo, block) = start_demo(&cfg_path);

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

    run_steps(dir.path(), &setup, &steps);
    let refused = steps.iter().filter(|s| s.expect == "refused").count();
    assert!(refused >= 2, "curl and fhirgate client each show a refusal");
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

#[test]
fn demo_outside_the_repository_refuses_before_writing_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .arg("demo")
        .current_dir(dir.path())
        .output()
        .expect("fhirgate runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.yaml: no such config file")
            && err.contains("repository root")
            && err.contains("--config"),
        "{err}"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing written where it was started"
    );
}

#[test]
fn address_in_use_names_the_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Hold the upstream port: the demo's built-in upstream cannot bind it.
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().unwrap().port();
    let (gw, admin, auth) = (free_port(), free_port(), free_port());
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml")).unwrap();
    let cfg = shipped
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{gw}"))
        .replace("http://127.0.0.1:8081", &format!("http://127.0.0.1:{port}"))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin}"))
        .replace(
            "https://localhost:9443",
            &format!("https://localhost:{auth}"),
        );
    let cfg_path = dir.path().join("config.yaml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let run = |cfg: &std::path::Path, cmd: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
            .args([cmd, "--config"])
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("fhirgate starts");
        // It must fail by itself; a gateway that started anyway is killed after 20 s.
        for _ in 0..200 {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&cfg_path, "demo");
    assert!(!ok);
    let want = format!("cannot bind 127.0.0.1:{port}: Address already in use");
    assert!(err.contains(&want) && err.contains("upstream.url"), "{err}");

    // `run`: the gateway's own listener, then the admin listener.
    // (As integration: `run` logs the same warnings as `check` before it binds.)
    let listen = cfg
        .replace(&format!("127.0.0.1:{gw}"), &format!("127.0.0.1:{port}"))
        .replace("environment: development", "environment: integration");
    std::fs::write(&cfg_path, &listen).unwrap();
    let (ok, err) = run(&cfg_path, "run");
    assert!(!ok);
    assert!(
        err.contains(&format!("listeners[0].address: {want}")),
        "{err}"
    );
    assert!(
        err.contains("risky setting")
            && err.contains("tls.server_cert")
            && err.contains("development file"),
        "{err}"
    );
    let adm = cfg.replace(&format!("127.0.0.1:{admin}"), &format!("127.0.0.1:{port}"));
    std::fs::write(&cfg_path, &adm).unwrap();
    let (ok, err) = run(&cfg_path, "run");
    assert!(!ok);
    assert!(err.contains(&format!("admin.address: {want}")), "{err}");
    drop(held);
}

#[test]
fn banner_without_token_checks_prints_statuses_too() {
    // auth.mode: development: no authorisation server, the banner's other branch.
    let dir = tempfile::tempdir().expect("tempdir");
    let (gw, up, admin) = (free_port(), free_port(), free_port());
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml")).unwrap();
    let a = shipped
        .find("auth:\n  mode: introspection")
        .expect("auth section");
    let b = a + shipped[a..]
        .find("\n# BaRS NHSD")
        .expect("section after auth");
    let cfg = format!(
        "{}auth:\n  mode: development\n{}",
        &shipped[..a],
        &shipped[b..]
    )
    .replace("127.0.0.1:8443", &format!("127.0.0.1:{gw}"))
    .replace("http://127.0.0.1:8081", &format!("http://127.0.0.1:{up}"))
    .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin}"));
    let cfg_path = dir.path().join("config.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let (_demo, block) = start_demo(&cfg_path);
    let (setup, steps) = parse(&block);
    let expects: Vec<&str> = steps.iter().map(|s| s.expect.as_str()).collect();
    assert_eq!(expects, ["200", "400", "refused"]);
    run_steps(dir.path(), &setup, &steps);
}
