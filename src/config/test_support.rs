//! A valid configuration over real (placeholder) files, for unit tests of what reads a
//! [`Config`] (`fhirgate check`'s lints, the reload's pipeline key).

use std::path::Path;

use super::Config;

/// A directory with the files [`config_in`]'s YAML names, each holding `x`.
pub fn config_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("certs/dev")).unwrap();
    for f in [
        "server.crt",
        "server.key",
        "ca.crt",
        "ca.crl",
        "secret",
        "certs/dev/ca.crt",
    ] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    dir
}

/// A configuration over the files in `dir` ([`config_dir`]): `extra` lines first, then
/// `edit` applied to the whole YAML. Its last route is `all`, so lines appended at the
/// end belong to it.
pub fn config_in(dir: &Path, extra: &str, edit: impl Fn(String) -> String) -> Config {
    let yaml = format!(
        "{extra}
listeners: [{{address: 127.0.0.1:8443}}]
tls:
  server_cert: server.crt
  server_key: server.key
  trust_bundles:
    - name: nhs-int
      ca_files: [ca.crt]
      crl_files: [ca.crl]
  revocation: {{enforce_crl_expiry: true}}
upstream: {{url: 'http://127.0.0.1:9'}}
admin: {{address: 127.0.0.1:9901}}
auth:
  mode: introspection
  issuer: https://auth.example.nhs.uk
  client_auth: {{method: client_secret_basic, client_id: gw, client_secret_file: secret}}
routes:
  - name: meta
    path_prefix: /metadata
    token: none
  - name: all
    path_prefix: /
"
    );
    Config::from_yaml(&edit(yaml), dir).expect("valid test config")
}
