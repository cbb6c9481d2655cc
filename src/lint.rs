//! `fhirgate check` lints: settings that are valid but risky once real partners connect
//! (`environment: integration` or `production`). Each [`Lint`] names the field and the
//! fix on one line; `check --strict` turns any of them into a failure.
//!
//! [`lint`] looks at the parsed configuration only (testable without files);
//! [`file_modes`] looks at the permissions of the secret files it names.

use std::fmt;
use std::path::Path;

use crate::config::{
    Config, Environment, RevocationConfig, TokenRequirement, TrustBundleConfig, UnknownRevocation,
};
use crate::pipeline::auth::AuthMode;
use crate::pipeline::nhsd::HeaderRequirement;

/// One risky setting: the dotted field path, what is risky, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lint {
    pub field: String,
    pub risk: String,
    pub fix: String,
}

impl fmt::Display for Lint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "warning: {}: {}; fix: {}",
            self.field, self.risk, self.fix
        )
    }
}

fn warn(field: impl Into<String>, risk: impl Into<String>, fix: impl Into<String>) -> Lint {
    Lint {
        field: field.into(),
        risk: risk.into(),
        fix: fix.into(),
    }
}

/// Where a bundle gets revocation information from: `crl_files`, `crl_urls`, or the
/// distribution points of its CAs and client certificates (with those, a bundle holding
/// no CRL yet refuses its clients rather than skipping revocation; see revocation.rs).
fn has_revocation_source(b: &TrustBundleConfig, r: &RevocationConfig) -> bool {
    !b.crl_files.is_empty() || !b.crl_urls.is_empty() || r.fetch_distribution_points
}

/// Risky settings in `cfg`, in field order. Development configurations only get the
/// lints that catch an accidental exposure (a network listener while `environment` is
/// left at its development default).
pub fn lint(cfg: &Config) -> Vec<Lint> {
    let mut out = Vec::new();
    let real = matches!(
        cfg.environment,
        Environment::Integration | Environment::Production
    );
    if !real {
        if !cfg.environment_explicit {
            for (i, l) in cfg.listeners.iter().enumerate() {
                if !l.address.ip().is_loopback() {
                    out.push(warn(
                        format!("listeners[{i}].address"),
                        format!(
                            "{} is reachable from the network but `environment` is not set, so \
                             development shortcuts are allowed",
                            l.address
                        ),
                        "set `environment: integration` or `production` (or `development` \
                         deliberately), or listen on 127.0.0.1",
                    ));
                }
            }
        }
        return out;
    }
    let env = match cfg.environment {
        Environment::Production => "production",
        _ => "integration",
    };

    for (i, b) in cfg.tls.trust_bundles.iter().enumerate() {
        if !has_revocation_source(b, &cfg.tls.revocation) {
            out.push(warn(
                format!("tls.trust_bundles[{i}].crl_files"),
                format!(
                    "bundle {:?} has no CRLs, so its revoked client certificates are accepted",
                    b.name
                ),
                "let the gateway fetch them (crl_urls, or tls.revocation.\
                 fetch_distribution_points: true), or list them in crl_files",
            ));
        }
    }
    let r = &cfg.tls.revocation;
    if r.unknown_status == UnknownRevocation::Allow {
        out.push(warn(
            "tls.revocation.unknown_status",
            "allow accepts a certificate whose issuer has no CRL, unchecked",
            "set `unknown_status: deny` and configure a CRL for every issuing CA",
        ));
    }
    if !r.enforce_crl_expiry() {
        out.push(warn(
            "tls.revocation.enforce_crl_expiry",
            "false keeps trusting a CRL past its nextUpdate, so certificates revoked since \
             are accepted",
            "set `enforce_crl_expiry: true` and refresh CRLs before nextUpdate",
        ));
    }

    if cfg.auth.mode == AuthMode::Development {
        // Production refuses this in validation; integration gets a warning.
        out.push(warn(
            "auth.mode",
            format!("development checks no bearer tokens in {env}"),
            "set `mode: introspection` (or jwt) with the environment's authorisation server",
        ));
    } else if cfg
        .routes
        .iter()
        .all(|r| r.token == TokenRequirement::None && !nhsd_checks(cfg, &r.path_prefix))
    {
        out.push(warn(
            "routes",
            "every route has `token: none` and no NHSD header checks: any holder of a trusted \
             certificate may use every route",
            "set `token: required` on the data routes, or add an `nhsd` section (BaRS) so \
             requests carry checked NHSD-* headers",
        ));
    }

    if let Some(a) = &cfg.admin {
        if !a.address.ip().is_loopback() {
            out.push(warn(
                "admin.address",
                format!(
                    "{} serves /metrics and /readyz over plain HTTP to {}",
                    a.address,
                    if a.address.ip().is_unspecified() {
                        "every network"
                    } else {
                        "a non-loopback address"
                    }
                ),
                "bind 127.0.0.1 (in Kubernetes, restrict the admin port with a NetworkPolicy \
                 and accept this with `check --allow admin.address`)",
            ));
        }
    }

    // The development default, chosen outside development: SECURITY.md ("What the access
    // log holds") promises NHS numbers in paths stay out of the logs there.
    if cfg.logging.redact_paths == Some(false) {
        out.push(warn(
            "logging.redact_paths",
            format!(
                "false logs request paths as sent in {env}, with the patient identifiers \
                 (NHS numbers) they carry"
            ),
            "remove it (paths are then logged as /Patient/{id}, ids replaced)",
        ));
    }

    for (field, path) in config_paths(cfg) {
        if looks_like_development(&path) {
            out.push(warn(
                field,
                format!("{} looks like a development file", path.display()),
                format!("point it at the {env} certificate, key or secret"),
            ));
        }
    }
    out
}

/// Whether requests under `prefix` get NHSD header checks (a `nhsd` section, at least one
/// header not ignored, and the route's own block, or the default on a path not exempt),
/// decided as the gateway decides it (`Gateway::check_nhsd`, `prefix_covers`): an exempt
/// path `/` exempts every route, and a route's own block applies on exempt paths too.
fn nhsd_checks(cfg: &Config, prefix: &str) -> bool {
    let Some(n) = &cfg.nhsd else {
        return false;
    };
    let own = cfg
        .routes
        .iter()
        .find(|r| r.path_prefix == prefix)
        .and_then(|r| r.nhsd.as_ref());
    let exempt = n
        .exempt_paths
        .iter()
        .any(|e| crate::pipeline::policy::prefix_covers(e, prefix));
    let p = match own {
        Some(own) => own,
        None if exempt => return false,
        None => &n.headers,
    };
    [
        p.request_id,
        p.correlation_id,
        p.target_identifier,
        p.end_user_organisation,
        p.requesting_software,
        p.requesting_practitioner,
    ]
    .iter()
    .any(|h| *h != HeaderRequirement::Ignored)
}

/// Every file path the configuration names, with its field path.
fn config_paths(cfg: &Config) -> Vec<(String, std::path::PathBuf)> {
    // The server key comes with the secrets below.
    let mut v = vec![("tls.server_cert".to_owned(), cfg.tls.server_cert.clone())];
    for (i, b) in cfg.tls.trust_bundles.iter().enumerate() {
        for (j, p) in b.ca_files.iter().enumerate() {
            v.push((format!("tls.trust_bundles[{i}].ca_files[{j}]"), p.clone()));
        }
        for (j, p) in b.crl_files.iter().enumerate() {
            v.push((format!("tls.trust_bundles[{i}].crl_files[{j}]"), p.clone()));
        }
    }
    for (f, p) in [
        ("upstream.ca_file", &cfg.upstream.ca_file),
        ("upstream.client_cert", &cfg.upstream.client_cert),
        ("auth.ca_file", &cfg.auth.ca_file),
    ] {
        if let Some(p) = p {
            v.push((f.to_owned(), p.clone()));
        }
    }
    v.extend(secret_paths(cfg));
    v
}

/// Files holding private keys or secrets: only their owner should read them.
fn secret_paths(cfg: &Config) -> Vec<(String, std::path::PathBuf)> {
    let mut v = vec![("tls.server_key".to_owned(), cfg.tls.server_key.clone())];
    if let Some(k) = &cfg.upstream.client_key {
        v.push(("upstream.client_key".to_owned(), k.clone()));
    }
    if let Some(c) = &cfg.auth.client_auth {
        for (f, p) in [
            ("auth.client_auth.client_secret_file", &c.client_secret_file),
            ("auth.client_auth.private_key_file", &c.private_key_file),
        ] {
            if let Some(p) = p {
                v.push((f.to_owned(), p.clone()));
            }
        }
    }
    v
}

/// `certs/dev/…`, `dev-server.key`, `/srv/development/ca.pem`: a path component with a
/// word `dev` or `development` (split on `-`, `_`, `.`), which `fhirgate demo` and
/// `pki dev` use. `device.pem` or `/dev/...` device nodes aside, real deployments do not.
pub fn looks_like_development(p: &Path) -> bool {
    p.components().any(|c| {
        let c = c.as_os_str().to_string_lossy().to_ascii_lowercase();
        c.split(['-', '_', '.'])
            .any(|w| w == "dev" || w == "development")
    }) && !p.starts_with("/dev/")
}

/// Whether a secret file with `mode` owned by `owner`/`group` is readable by anyone but
/// the gateway's user. Group read is accepted only in the `root:fhirgate 0640` pattern:
/// another user owns the file and the group is one of the gateway's, so the group bit is
/// what lets the gateway read it. `me` is the process's (uid, groups).
pub fn secret_mode_risk(mode: u32, owner: u32, group: u32, me: (u32, &[u32])) -> Option<String> {
    let mode = mode & 0o777;
    if mode & 0o007 != 0 {
        return Some(format!(
            "is readable or writable by other users (mode {mode:04o})"
        ));
    }
    if mode & 0o020 != 0 {
        return Some(format!("is writable by its group (mode {mode:04o})"));
    }
    if mode & 0o040 != 0 && (owner == me.0 || !me.1.contains(&group)) {
        return Some(format!("is readable by its group (mode {mode:04o})"));
    }
    None
}

/// Whether a file the gateway trusts without it being secret (the config, CA and CRL
/// files, certificates) with `mode` and group `group` may be rewritten by a user other
/// than the gateway's and root: writable by all, or by a group the gateway is not in.
/// sshd's StrictModes refuses such files for the same reason: whoever can write a trust
/// anchor or the config decides who is let in, and `reload.watch_files` applies the change
/// at once. A group of the gateway's own (Kubernetes `fsGroup`) is its own access.
pub fn writable_mode_risk(mode: u32, group: u32, groups: &[u32]) -> Option<String> {
    let mode = mode & 0o777;
    if mode & 0o002 != 0 {
        return Some(format!("is writable by every user (mode {mode:04o})"));
    }
    if mode & 0o020 != 0 && !groups.contains(&group) {
        return Some(format!(
            "is writable by group {group}, which the gateway is not in (mode {mode:04o})"
        ));
    }
    None
}

/// This process's user and groups (real, effective and supplementary), from
/// /proc/self/status; `None` elsewhere.
fn my_ids() -> Option<(u32, Vec<u32>)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|r| {
                r.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let uid = *field("Uid:").get(1)?;
    let mut groups = field("Gid:");
    groups.extend(field("Groups:"));
    Some((uid, groups))
}

/// Secret and key files that other users can read, and trusted files (CAs, CRLs,
/// certificates) they can write, in integration and production (the development PKI is
/// throwaway). Missing files are left to validation.
pub fn file_modes(cfg: &Config) -> Vec<Lint> {
    use std::os::unix::fs::MetadataExt;
    if cfg.environment == Environment::Development {
        return Vec::new();
    }
    let (uid, groups) = my_ids().unwrap_or((u32::MAX, Vec::new()));
    let mut out = Vec::new();
    let secrets = secret_paths(cfg);
    let trusted = config_paths(cfg)
        .into_iter()
        .filter(|(f, _)| !secrets.iter().any(|(s, _)| s == f));
    for (field, path) in trusted {
        out.extend(writable_lint(
            field,
            &path.display().to_string(),
            &path,
            &groups,
        ));
    }
    for (field, path) in secrets {
        let Ok(m) = std::fs::metadata(&path) else {
            continue;
        };
        if let Some(risk) = secret_mode_risk(m.mode(), m.uid(), m.gid(), (uid, &groups)) {
            out.push(warn(
                field,
                format!("{} {risk}", path.display()),
                format!(
                    "chmod 600 {} (or 640 owned by root with the gateway's group)",
                    path.display()
                ),
            ));
        }
    }
    out
}

/// The config file itself, as [`file_modes`] checks the files it names: whoever can
/// write it chooses the trust bundles. Named by its path (also what `--allow` takes).
pub fn config_file_mode(cfg: &Config, path: &Path) -> Option<Lint> {
    if cfg.environment == Environment::Development {
        return None;
    }
    let groups = my_ids().map(|(_, g)| g).unwrap_or_default();
    writable_lint(path.display().to_string(), "the config file", path, &groups)
}

/// The lint for `path` (config field `field`, said as `what`) when users other than the
/// gateway's may write it ([`writable_mode_risk`]); none for a missing file.
fn writable_lint(field: String, what: &str, path: &Path, groups: &[u32]) -> Option<Lint> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let risk = writable_mode_risk(m.mode(), m.gid(), groups)?;
    Some(warn(
        field,
        format!("{what} {risk}"),
        format!("chmod go-w {}", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{config_dir, config_in};
    use std::path::PathBuf;

    /// A valid configuration over real (placeholder) files, as `Config::from_yaml` demands.
    fn cfg(extra: &str, edit: impl Fn(String) -> String) -> (tempfile::TempDir, Config) {
        let dir = config_dir();
        let c = config_in(dir.path(), extra, edit);
        (dir, c)
    }

    fn fields(c: &Config) -> Vec<String> {
        lint(c).into_iter().map(|l| l.field).collect()
    }

    #[test]
    fn a_careful_production_config_has_no_warnings() {
        let (_d, c) = cfg("environment: production", |y| y);
        assert_eq!(lint(&c), vec![]);
    }

    #[test]
    fn development_configs_are_not_linted() {
        let (_d, c) = cfg("environment: development", |y| {
            y.replace("crl_files: [ca.crl]", "crl_files: []")
                .replace("127.0.0.1:8443", "0.0.0.0:8443")
                .replace("127.0.0.1:9901", "0.0.0.0:9901")
        });
        assert_eq!(
            lint(&c),
            vec![],
            "environment: development chosen explicitly"
        );
    }

    #[test]
    fn a_network_listener_without_environment_is_flagged() {
        let (_d, c) = cfg("", |y| y.replace("127.0.0.1:8443", "0.0.0.0:8443"));
        let l = lint(&c);
        assert_eq!(l.len(), 1, "{l:?}");
        assert_eq!(l[0].field, "listeners[0].address");
        assert!(l[0].fix.contains("environment: integration"), "{}", l[0]);
        let (_d, c) = cfg("", |y| y.replace("127.0.0.1:8443", "'[::]:8443'"));
        assert_eq!(fields(&c), ["listeners[0].address"]);
        let (_d, c) = cfg("", |y| y);
        assert_eq!(lint(&c), vec![], "loopback without environment is fine");
    }

    #[test]
    fn a_bundle_without_crls_is_flagged() {
        let (_d, c) = cfg("environment: integration", |y| {
            y.replace("crl_files: [ca.crl]", "crl_files: []")
        });
        assert_eq!(fields(&c), ["tls.trust_bundles[0].crl_files"]);
        let l = &lint(&c)[0];
        assert!(
            l.risk.contains("\"nhs-int\"") && l.risk.contains("revoked"),
            "{l}"
        );
        // CRLs the gateway fetches itself count as a source.
        let (_d, c) = cfg("environment: integration", |y| {
            y.replace(
                "crl_files: [ca.crl]",
                "crl_files: []\n      crl_urls: [\"http://crl.example/ca.crl\"]",
            )
        });
        assert_eq!(lint(&c), vec![], "crl_urls");
        let (_d, c) = cfg("environment: integration", |y| {
            y.replace("crl_files: [ca.crl]", "crl_files: []").replace(
                "{enforce_crl_expiry: true}",
                "{enforce_crl_expiry: true, fetch_distribution_points: true}",
            )
        });
        assert_eq!(lint(&c), vec![], "distribution points");
    }

    /// SECURITY.md, "What the access log holds": outside development the access log keeps
    /// NHS numbers in paths out (`redact_paths`, default on there). Turning that off in
    /// integration or production is a development relaxation, flagged like the others.
    #[test]
    fn unredacted_paths_outside_development_are_flagged() {
        for env in ["integration", "production"] {
            let (_d, c) = cfg(
                &format!("environment: {env}\nlogging: {{redact_paths: false}}"),
                |y| y,
            );
            assert_eq!(fields(&c), ["logging.redact_paths"], "{env}");
            let l = &lint(&c)[0];
            assert!(
                l.risk.contains("NHS numbers") && l.risk.contains(env),
                "{l}"
            );
            let (_d, c) = cfg(
                &format!("environment: {env}\nlogging: {{redact_paths: true}}"),
                |y| y,
            );
            assert_eq!(lint(&c), vec![], "{env}: explicit true");
        }
        let (_d, c) = cfg(
            "environment: development\nlogging: {redact_paths: false}",
            |y| y,
        );
        assert_eq!(lint(&c), vec![], "development");
    }

    #[test]
    fn unknown_status_allow_is_flagged() {
        let (_d, c) = cfg("environment: production", |y| {
            y.replace(
                "{enforce_crl_expiry: true}",
                "{enforce_crl_expiry: true, unknown_status: allow}",
            )
        });
        assert_eq!(fields(&c), ["tls.revocation.unknown_status"]);
    }

    #[test]
    fn crl_expiry_not_enforced_is_flagged_but_the_default_is_safe() {
        let (_d, c) = cfg("environment: production", |y| {
            y.replace("{enforce_crl_expiry: true}", "{enforce_crl_expiry: false}")
        });
        assert_eq!(fields(&c), ["tls.revocation.enforce_crl_expiry"]);
        // Outside development the default is `true`, so leaving it out is not risky.
        let (_d, c) = cfg("environment: production", |y| {
            y.replace("{enforce_crl_expiry: true}", "{}")
        });
        assert_eq!(fields(&c), Vec::<String>::new());
    }

    #[test]
    fn no_token_on_every_route_without_nhsd_is_flagged() {
        let none = |y: String| y.replace("path_prefix: /\n", "path_prefix: /\n    token: none\n");
        let (_d, c) = cfg("environment: production", none);
        assert_eq!(fields(&c), ["routes"]);
        assert!(lint(&c)[0].fix.contains("token: required"));
        // BaRS style: token: none everywhere, but NHSD headers are checked: no warning.
        let (_d, c) = cfg("environment: production\nnhsd: {}", none);
        assert_eq!(lint(&c), vec![]);
        // ... unless every header is ignored.
        let (_d, c) = cfg(
            "environment: production\nnhsd:\n  headers: {request_id: ignored, correlation_id: ignored, \
             target_identifier: ignored, end_user_organisation: ignored, requesting_software: ignored, \
             requesting_practitioner: ignored}",
            none,
        );
        assert_eq!(fields(&c), ["routes"]);
        // An exempt path `/` covers every path, as the gateway matches it: no header is
        // required anywhere, so this is flagged too (it used to pass as checked).
        let (_d, c) = cfg("environment: production\nnhsd: {exempt_paths: [/]}", none);
        assert_eq!(fields(&c), ["routes"]);
        // A route's own block applies on an exempt path too, as the gateway applies it.
        let (_d, c) = cfg("environment: production\nnhsd: {exempt_paths: [/]}", |y| {
            none(y).replace("token: none\n", "token: none\n    nhsd: {}\n")
        });
        assert_eq!(lint(&c), vec![]);
    }

    #[test]
    fn development_auth_in_integration_is_flagged() {
        let (_d, c) = cfg("environment: integration", |y| {
            y.replace("mode: introspection", "mode: development")
        });
        assert_eq!(fields(&c), ["auth.mode"]);
    }

    #[test]
    fn a_network_admin_listener_is_flagged() {
        for a in ["0.0.0.0:9901", "'[::]:9901'", "10.1.2.3:9901"] {
            let (_d, c) = cfg("environment: production", |y| {
                y.replace("127.0.0.1:9901", a)
            });
            assert_eq!(fields(&c), ["admin.address"], "{a}");
        }
        let (_d, c) = cfg("environment: production", |y| {
            y.replace("127.0.0.1:9901", "'[::1]:9901'")
        });
        assert_eq!(lint(&c), vec![]);
    }

    #[test]
    fn development_looking_paths_are_flagged() {
        for (p, dev) in [
            ("certs/dev/server.key", true),
            ("/etc/fhirgate/dev-server.key", true),
            ("/srv/Development/x.pem", true),
            ("server.dev.key", true),
            ("/etc/fhirgate/device.pem", false),
            ("/etc/fhirgate/developer-portal.pem", false),
            ("/etc/fhirgate/certs/server.key", false),
        ] {
            assert_eq!(looks_like_development(&PathBuf::from(p)), dev, "{p}");
        }
        let (_d, c) = cfg("environment: production", |y| {
            y.replace("ca_files: [ca.crt]", "ca_files: [certs/dev/ca.crt]")
        });
        assert_eq!(fields(&c), ["tls.trust_bundles[0].ca_files[0]"]);
        assert!(lint(&c)[0].risk.contains("certs/dev/ca.crt"));
    }

    #[test]
    fn secret_modes() {
        let me = (1000, &[1000u32, 27][..]);
        assert_eq!(secret_mode_risk(0o100600, 1000, 1000, me), None);
        assert_eq!(secret_mode_risk(0o100400, 1000, 1000, me), None);
        // root:fhirgate 0640 is the systemd unit's layout: group read is how we read it.
        assert_eq!(secret_mode_risk(0o100640, 0, 27, me), None);
        assert_eq!(secret_mode_risk(0o100440, 0, 27, me), None);
        for (mode, owner, group) in [
            (0o100644, 1000, 1000),
            (0o100604, 1000, 1000),
            (0o100640, 1000, 1000), // our own file: group read is not needed
            (0o100640, 0, 0),       // root's group is not ours
            (0o100660, 0, 27),      // group may rewrite it
        ] {
            let r = secret_mode_risk(mode, owner, group, me);
            assert!(r.is_some(), "{mode:o} {owner}:{group}");
        }
        assert!(secret_mode_risk(0o100644, 1000, 1000, me)
            .unwrap()
            .contains("0644"));
    }

    #[test]
    fn secret_files_readable_by_others_are_flagged() {
        use std::os::unix::fs::PermissionsExt;
        let (d, c) = cfg("environment: production", |y| y);
        let set = |f: &str, m: u32| {
            std::fs::set_permissions(d.path().join(f), std::fs::Permissions::from_mode(m)).unwrap()
        };
        set("server.key", 0o600);
        set("secret", 0o600);
        assert_eq!(file_modes(&c), vec![]);
        set("server.key", 0o644);
        set("secret", 0o604);
        let l = file_modes(&c);
        let f: Vec<&str> = l.iter().map(|l| l.field.as_str()).collect();
        assert_eq!(f, ["tls.server_key", "auth.client_auth.client_secret_file"]);
        assert!(
            l[0].to_string().starts_with("warning: tls.server_key: "),
            "{}",
            l[0]
        );
        assert!(l[0].to_string().contains("; fix: chmod 600 "), "{}", l[0]);
        let (d, c) = cfg("", |y| y);
        std::fs::set_permissions(
            d.path().join("server.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert_eq!(file_modes(&c), vec![], "development keys are throwaway");
    }

    #[test]
    fn writable_modes() {
        let groups = [1000u32, 27];
        assert_eq!(writable_mode_risk(0o100644, 1000, &groups), None);
        assert_eq!(writable_mode_risk(0o100444, 0, &groups), None);
        // Kubernetes fsGroup / root:fhirgate: the group is the gateway's own.
        assert_eq!(writable_mode_risk(0o100664, 27, &groups), None);
        for (mode, group) in [(0o100666, 1000), (0o100646, 27), (0o100664, 0)] {
            assert!(
                writable_mode_risk(mode, group, &groups).is_some(),
                "{mode:o} group {group}"
            );
        }
        assert!(writable_mode_risk(0o100666, 0, &groups)
            .unwrap()
            .contains("0666"));
    }

    /// sshd's StrictModes refuses key files others may write. Whoever can write a CA file,
    /// a CRL or the config decides which clients are let in (and `reload.watch_files`
    /// applies the change at once), so outside development those are flagged too.
    #[test]
    fn trusted_files_writable_by_others_are_flagged() {
        use std::os::unix::fs::PermissionsExt;
        let (d, c) = cfg("environment: production", |y| y);
        let set = |f: &str, m: u32| {
            std::fs::set_permissions(d.path().join(f), std::fs::Permissions::from_mode(m)).unwrap()
        };
        for f in ["server.key", "secret"] {
            set(f, 0o600);
        }
        let yaml = d.path().join("config.yaml");
        std::fs::write(&yaml, "x").unwrap();
        set("config.yaml", 0o644);
        assert_eq!(file_modes(&c), vec![]);
        assert_eq!(config_file_mode(&c, &yaml), None);
        set("ca.crt", 0o666);
        set("ca.crl", 0o646);
        set("config.yaml", 0o666);
        let l = file_modes(&c);
        let f: Vec<&str> = l.iter().map(|l| l.field.as_str()).collect();
        assert_eq!(
            f,
            [
                "tls.trust_bundles[0].ca_files[0]",
                "tls.trust_bundles[0].crl_files[0]"
            ]
        );
        assert!(l[0].risk.contains("writable by every user"), "{}", l[0]);
        assert!(l[0].fix.starts_with("chmod go-w "), "{}", l[0]);
        let w = config_file_mode(&c, &yaml).expect("config file flagged");
        assert_eq!(w.field, yaml.display().to_string());
        assert!(w.risk.starts_with("the config file is writable"), "{w}");
        let (d, c) = cfg("", |y| y);
        std::fs::set_permissions(
            d.path().join("ca.crt"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        assert_eq!(file_modes(&c), vec![], "development");
    }

    #[test]
    fn every_warning_is_one_line_naming_field_and_fix() {
        let (_d, c) = cfg("environment: production", |y| {
            y.replace("crl_files: [ca.crl]", "crl_files: []")
                .replace(
                    "{enforce_crl_expiry: true}",
                    "{unknown_status: allow, enforce_crl_expiry: false}",
                )
                .replace("127.0.0.1:9901", "0.0.0.0:9901")
                .replace("path_prefix: /\n", "path_prefix: /\n    token: none\n")
        });
        let l = lint(&c);
        assert_eq!(l.len(), 5, "{l:?}");
        for w in &l {
            let s = w.to_string();
            assert!(!s.contains('\n'), "{s}");
            assert!(s.starts_with(&format!("warning: {}: ", w.field)), "{s}");
            assert!(s.contains("; fix: "), "{s}");
        }
    }
}
