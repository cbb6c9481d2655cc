//! Runs tests/shell/e2e.sh: real curl and openssl s_client against the fhirgate binary.

use crate::harness::free_port;
use std::process::Command;

#[test]
fn curl_and_openssl_against_the_binary() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/shell/e2e.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("FHIRGATE", env!("CARGO_BIN_EXE_fhirgate"))
        .env("GW_PORT", free_port().to_string())
        .env("UP_PORT", free_port().to_string())
        .env("ADMIN_PORT", free_port().to_string())
        .env("AUTH_PORT", free_port().to_string())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "shell e2e failed:\n{stdout}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    assert!(!stdout.contains("shell: 0 passed"), "{stdout}");
}
