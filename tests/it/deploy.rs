//! The deployment files: every example config and every config embedded in a Kubernetes
//! manifest passes the real `fhirgate check` once its files exist (a test PKI stands in
//! for the mounted certificates, keys and CRLs); the manifests run the image that
//! `deploy/container/build` makes, as its non-root user, with Secrets readable through
//! `fsGroup`, everything mounted as directories, probes on the admin port, a `preStop`
//! delay that fits the grace period, resource requests and a PodDisruptionBudget.
//! Schema validation is `kubernetes-validate` in `.ci/run`; the image itself is tested
//! by `deploy/container/test`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use fhirgate::tools::pki::DevPki;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The `fhirgate` arguments that validate a config (`--config FILE` follows): a newcomer
/// runs `check --strict` (the systemd unit does too), so every example must pass it.
const CHECK: &[&str] = &["check", "--strict"];
/// The image `deploy/container/build` tags by default.
fn image() -> String {
    format!("fhirgate:{}", env!("CARGO_PKG_VERSION"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Where the configs expect their files (as mounted in a pod, or laid out on a host).
const MOUNT: &str = "/etc/fhirgate/";

/// The test-PKI file (or content) standing in for a file the config names, by its file
/// name; `None` for names no example should use.
fn stand_in(name: &str) -> Option<Source> {
    Some(match name {
        "server.crt" | "tls.crt" => Source::Pki("server.crt"),
        "server.key" | "tls.key" => Source::Pki("server.key"),
        "root-ca.crt" | "auth-server-ca.crt" => Source::Pki("root-ca.crt"),
        "sub-ca.crt" => Source::Pki("sub-ca.crt"),
        "root-ca.crl" => Source::Pki("root-ca.crl"),
        "sub-ca.crl" => Source::Pki("sub-ca.crl"),
        // An EC P-256 PKCS#8 key, as private_key_jwt with ES256 wants.
        "introspection-client.key" => Source::Pki("client.key"),
        "client-secret" => Source::Text("test-client-secret\n"),
        _ => return None,
    })
}

enum Source {
    Pki(&'static str),
    Text(&'static str),
}

/// A config with its files in place: `yaml` is written to `dir/config.yaml` with every
/// `/etc/fhirgate/...` path moved under `dir`, and each file it names is created there
/// from the test PKI. Returns the config path and the relative paths created.
struct Laid {
    config: PathBuf,
    files: Vec<String>,
    _dir: tempfile::TempDir,
}

/// The files under [`MOUNT`] that a config's settings name (comments aside), relative.
fn named_files(yaml: &str) -> BTreeSet<String> {
    let mut files = BTreeSet::new();
    for line in yaml.lines() {
        // A comment starts a line or follows a blank; URLs contain no " #".
        let setting = match line.find(" #") {
            Some(i) => &line[..i],
            None if line.trim_start().starts_with('#') => "",
            None => line,
        };
        let mut rest = setting;
        while let Some(i) = rest.find(MOUNT) {
            let tail = &rest[i + MOUNT.len()..];
            let end = tail
                .find(|c: char| c.is_whitespace() || matches!(c, ',' | ']' | '"' | '\''))
                .unwrap_or(tail.len());
            files.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    files
}

fn lay_out(what: &str, yaml: &str, pki: &Path) -> Laid {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = named_files(yaml);
    assert!(!files.is_empty(), "{what}: names no file under {MOUNT}");
    for rel in &files {
        let name = rel.rsplit('/').next().unwrap_or(rel);
        let to = dir.path().join(rel);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        match stand_in(name) {
            Some(Source::Pki(f)) => {
                std::fs::copy(pki.join(f), &to).unwrap_or_else(|e| panic!("{f}: {e}"));
            }
            Some(Source::Text(t)) => std::fs::write(&to, t).expect("write"),
            None => panic!("{what}: no test stand-in for {MOUNT}{rel}; add one to stand_in()"),
        }
        // Owner-only: the test runs as the files' owner, so group-read would be a lint
        // warning here (deploy/container/test checks the 0440 + fsGroup layout as 65532).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let base = format!("{}/", dir.path().display());
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml.replace(MOUNT, &base)).expect("write config");
    Laid {
        config,
        files: files.into_iter().collect(),
        _dir: dir,
    }
}

fn fhirgate_check(config: &Path, allow: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(CHECK)
        .args(allow.iter().flat_map(|a| ["--allow", a]))
        .arg("--config")
        .arg(config)
        .output()
        .expect("fhirgate runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `fhirgate check` passes on the config with its files in place, and fails naming the
/// file once one of them is gone (so the check really reads what the test laid out).
/// Kubernetes configs bind the admin port on the pod IP for kubelet's probes (a
/// NetworkPolicy restricts it), the one warning they accept knowingly.
fn assert_checks(what: &str, yaml: &str) {
    let allow: &[&str] = if what.contains("k8s") || what.contains("ConfigMap") {
        &["admin.address"]
    } else {
        &[]
    };
    let pki_dir = tempfile::tempdir().expect("tempdir");
    DevPki::generate()
        .expect("pki")
        .write_to(pki_dir.path())
        .expect("write pki");
    let laid = lay_out(what, yaml, pki_dir.path());
    let (ok, out) = fhirgate_check(&laid.config, allow);
    assert!(ok, "{what}: `fhirgate check` failed:\n{out}");

    let key = laid
        .files
        .iter()
        .find(|f| f.ends_with(".key"))
        .unwrap_or_else(|| panic!("{what}: no key file"));
    let dir = laid.config.parent().expect("dir");
    std::fs::remove_file(dir.join(key)).expect("remove key");
    let (ok, out) = fhirgate_check(&laid.config, allow);
    assert!(!ok, "{what}: check passed with {key} missing:\n{out}");
    assert!(
        out.contains(key.as_str()),
        "{what}: error does not name {key}:\n{out}"
    );
}

#[test]
fn every_example_passes_fhirgate_check() {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(Path::new(ROOT).join("examples")).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert_checks(
            &name,
            &std::fs::read_to_string(&path).expect("read example"),
        );
        seen.push(name);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "bars-receiver-int.yaml",
            "bars-receiver-prod.yaml",
            "iua-fhir-api.yaml",
            "k8s-sidecar.yaml"
        ]
    );
}

#[test]
fn bars_examples_are_token_none_with_nhsd_checks_and_fail_closed_revocation() {
    for (file, env, bundle) in [
        ("examples/bars-receiver-int.yaml", "integration", "nhs-int"),
        ("examples/bars-receiver-prod.yaml", "production", "nhs-prod"),
    ] {
        let v: Value = serde_saphyr::from_str(&read(file)).expect("yaml");
        assert_eq!(v["environment"], env, "{file}");
        let rev = &v["tls"]["revocation"];
        assert_eq!(rev["unknown_status"], "deny", "{file}");
        assert_eq!(rev["enforce_crl_expiry"], true, "{file}");
        assert_eq!(rev["scope"], "chain", "{file}");
        let bundles = v["tls"]["trust_bundles"].as_array().expect("bundles");
        assert_eq!(bundles.len(), 1, "{file}: one environment per gateway");
        assert_eq!(bundles[0]["name"], bundle, "{file}");
        // Root and SubCA, each with its CRL.
        assert_eq!(bundles[0]["ca_files"].as_array().map(Vec::len), Some(2));
        assert_eq!(bundles[0]["crl_files"].as_array().map(Vec::len), Some(2));
        let nhsd = &v["nhsd"];
        assert_eq!(
            nhsd["exempt_paths"],
            serde_json::json!(["/metadata", "/MessageDefinition"])
        );
        for h in [
            "request_id",
            "correlation_id",
            "target_identifier",
            "end_user_organisation",
            "requesting_software",
        ] {
            assert_eq!(nhsd["headers"][h], "required", "{file}: {h}");
        }
        let routes = v["routes"].as_array().expect("routes");
        assert!(routes.iter().all(|r| r["token"] == "none"), "{file}");
        assert!(
            routes
                .iter()
                .all(|r| r["bundles"] == serde_json::json!([bundle])),
            "{file}"
        );
        let catch_all = routes
            .iter()
            .find(|r| r["path_prefix"] == "/")
            .expect("route /");
        assert!(
            catch_all["allow_sans"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "{file}: the BaRS route must name the allowed client"
        );
        assert!(v["admin"]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")));
    }
    // PROD names the live G2 chain as NHS England publishes it.
    let prod = read("examples/bars-receiver-prod.yaml");
    for name in ["CN=NHS Root Authority G2", "CN=NHS Authentication G2"] {
        assert!(prod.contains(name), "{name}");
    }
}

#[test]
fn iua_example_introspects_with_discovery_and_smart_scopes() {
    let v: Value = serde_saphyr::from_str(&read("examples/iua-fhir-api.yaml")).expect("yaml");
    assert_eq!(v["environment"], "production");
    assert_eq!(v["auth"]["mode"], "introspection");
    assert!(v["auth"]["issuer"]
        .as_str()
        .is_some_and(|i| i.starts_with("https://")));
    assert!(
        v["auth"].get("introspection_endpoint").is_none(),
        "discovery, not a fixed endpoint"
    );
    assert_eq!(v["auth"]["contexts"], serde_json::json!(["system"]));
    let routes = v["routes"].as_array().expect("routes");
    let fhir = routes
        .iter()
        .find(|r| r["path_prefix"] == "/")
        .expect("route /");
    assert!(fhir.get("token").is_none() || fhir["token"] == "required");
    assert!(routes.iter().any(|r| r["required_scopes"]
        .as_array()
        .is_some_and(|s| !s.is_empty())));
}

/// Every document of every manifest in deploy/kubernetes/, with its file name.
fn manifests() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(Path::new(ROOT).join("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("yaml"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read manifest");
        let name = f.file_name().expect("name").to_string_lossy().into_owned();
        let parsed: Vec<Value> = serde_saphyr::from_multiple(&text).expect("valid YAML");
        docs.extend(parsed.into_iter().map(|d| (name.clone(), d)));
    }
    docs
}

fn kind<'a>(docs: &'a [(String, Value)], file: &str, k: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|(f, d)| f == file && d["kind"] == k)
        .map(|(_, d)| d)
        .collect()
}

#[test]
fn embedded_configs_pass_fhirgate_check() {
    let docs = manifests();
    let mut checked = 0;
    for (file, d) in &docs {
        if d["kind"] != "ConfigMap" {
            continue;
        }
        if let Some(cfg) = d["data"]["config.yaml"].as_str() {
            assert_checks(&format!("{file} ConfigMap {}", d["metadata"]["name"]), cfg);
            checked += 1;
        }
    }
    assert_eq!(
        checked, 2,
        "the sidecar and the gateway each embed a config"
    );
    // The sidecar's config is examples/k8s-sidecar.yaml, byte for byte.
    let side = kind(&docs, "fhirgate-sidecar.yaml", "ConfigMap");
    assert_eq!(
        side[0]["data"]["config.yaml"].as_str(),
        Some(read("examples/k8s-sidecar.yaml").as_str())
    );
}

#[test]
fn manifests_run_the_built_image_as_its_user_with_directory_mounts() {
    let docs = manifests();
    let expected_kinds = [
        (
            "fhirgate-sidecar.yaml",
            vec!["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"],
        ),
        (
            "fhirgate-gateway.yaml",
            vec![
                "Namespace",
                "ConfigMap",
                "Deployment",
                "Service",
                "PodDisruptionBudget",
                "NetworkPolicy",
            ],
        ),
    ];
    for (file, kinds) in &expected_kinds {
        let got: Vec<_> = docs
            .iter()
            .filter(|(f, _)| f == file)
            .map(|(_, d)| d["kind"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(&got, kinds, "{file}");
    }
    // The image name and the build script's default tag agree with Cargo.toml.
    assert!(read("deploy/container/build").contains("TAG=fhirgate:$VERSION"));

    for (file, _) in &expected_kinds {
        let deploy = kind(&docs, file, "Deployment")[0];
        let pod = &deploy["spec"]["template"]["spec"];
        let labels = &deploy["spec"]["template"]["metadata"]["labels"];
        assert_eq!(&deploy["spec"]["selector"]["matchLabels"], labels, "{file}");

        // The image's user; fsGroup so the gateway can read Secrets mounted 0440.
        let sc = &pod["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{file}");
        assert_eq!(sc["runAsUser"], 65532, "{file}");
        assert_eq!(sc["runAsGroup"], 65532, "{file}");
        assert_eq!(sc["fsGroup"], 65532, "{file}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{file}");

        let gw = pod["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .find(|c| c["name"] == "fhirgate")
            .expect("fhirgate container");
        assert_eq!(
            gw["image"],
            image(),
            "{file}: the tag deploy/container/build makes"
        );
        let csc = &gw["securityContext"];
        assert_eq!(csc["readOnlyRootFilesystem"], true, "{file}");
        assert_eq!(csc["allowPrivilegeEscalation"], false, "{file}");
        assert_eq!(
            csc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{file}"
        );

        // Probes on the admin port, on the paths src/server/admin.rs serves.
        let admin = gw["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == "admin")
            .expect("admin port");
        assert_eq!(admin["containerPort"], 9901);
        assert_eq!(gw["readinessProbe"]["httpGet"]["path"], "/readyz", "{file}");
        assert_eq!(gw["readinessProbe"]["httpGet"]["port"], "admin", "{file}");
        assert_eq!(gw["livenessProbe"]["httpGet"]["path"], "/healthz", "{file}");
        assert_eq!(gw["livenessProbe"]["httpGet"]["port"], "admin", "{file}");

        // preStop delay, then the drain, within the grace period.
        let sleep = gw["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .expect("preStop sleep");
        assert!(sleep >= 5, "{file}: preStop sleep {sleep}");
        let grace = pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("grace period");
        let cm = kind(&docs, file, "ConfigMap")[0];
        let cfg: Value =
            serde_saphyr::from_str(cm["data"]["config.yaml"].as_str().expect("config"))
                .expect("embedded yaml");
        let drain = cfg["limits"]["drain_timeout"]
            .as_str()
            .expect("drain_timeout");
        let drain: u64 = drain
            .strip_suffix('s')
            .and_then(|s| s.parse().ok())
            .expect("seconds");
        assert!(
            sleep + drain < grace,
            "{file}: {sleep} s + {drain} s must fit in {grace} s"
        );
        // The admin listener serves the probes on the pod IP.
        assert_eq!(cfg["admin"]["address"], "0.0.0.0:9901", "{file}");

        // Resource requests (sized from BENCHMARKS.md) and a memory limit.
        let res = &gw["resources"];
        assert!(
            res["requests"]["cpu"].is_string() && res["requests"]["memory"].is_string(),
            "{file}"
        );
        assert!(res["limits"]["memory"].is_string(), "{file}");

        // Every mount a directory (no subPath: updates reach the pod); everything
        // read-only but the CRL cache.
        let args: Vec<_> = gw["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            args,
            ["run", "--config", "/etc/fhirgate/config/config.yaml"],
            "{file}"
        );
        let volumes = pod["volumes"].as_array().expect("volumes");
        for m in gw["volumeMounts"].as_array().expect("mounts") {
            assert!(
                m.get("subPath").is_none() && m.get("subPathExpr").is_none(),
                "{file}: {m}"
            );
            let v = volumes
                .iter()
                .find(|v| v["name"] == m["name"])
                .expect("volume of mount");
            if m["mountPath"] == "/var/cache/fhirgate" {
                assert!(
                    v["emptyDir"].is_object(),
                    "{file}: the CRL cache is an emptyDir"
                );
                assert_ne!(m["readOnly"], true);
            } else {
                assert_eq!(m["readOnly"], true, "{file}: {m}");
            }
            if let Some(s) = v.get("secret") {
                assert_eq!(s["defaultMode"], 0o440, "{file}: {v}");
            }
        }
        // The config's files are under the mounts.
        let mounts: Vec<_> = gw["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .filter_map(|m| m["mountPath"].as_str())
            .collect();
        let config_text = cm["data"]["config.yaml"].as_str().expect("config");
        for rel in named_files(config_text) {
            let path = format!("{MOUNT}{rel}");
            assert!(
                mounts.iter().any(|m| path.starts_with(&format!("{m}/"))),
                "{file}: {path} is under no mount"
            );
        }

        // Only the TLS-MA port is published.
        let svc = kind(&docs, file, "Service")[0];
        assert_eq!(&svc["spec"]["selector"], labels, "{file}");
        let ports = svc["spec"]["ports"].as_array().expect("ports");
        assert_eq!(ports.len(), 1, "{file}");
        assert_eq!(ports[0]["targetPort"], "https", "{file}");

        // A network policy, where there is one, admits partners to the TLS-MA port only
        // and keeps the admin port for a named source.
        for np in kind(&docs, file, "NetworkPolicy") {
            assert_eq!(&np["spec"]["podSelector"]["matchLabels"], labels, "{file}");
            for rule in np["spec"]["ingress"].as_array().expect("ingress") {
                let ports: Vec<_> = rule["ports"]
                    .as_array()
                    .expect("ports")
                    .iter()
                    .map(|p| &p["port"])
                    .collect();
                if ports.iter().any(|p| *p == "admin") {
                    assert!(
                        rule["from"].is_array(),
                        "{file}: admin port open to all: {rule}"
                    );
                } else {
                    assert_eq!(ports, [&Value::from("https")], "{file}: {rule}");
                }
            }
        }

        // The disruption budget covers these pods and leaves one to go.
        let pdb = kind(&docs, file, "PodDisruptionBudget")[0];
        assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels, "{file}");
        let replicas = deploy["spec"]["replicas"].as_u64().expect("replicas");
        assert!(replicas >= 2, "{file}");
        match (
            pdb["spec"]["minAvailable"].as_u64(),
            pdb["spec"]["maxUnavailable"].as_u64(),
        ) {
            (Some(min), None) => assert!(min < replicas, "{file}"),
            (None, Some(max)) => assert!(max >= 1 && max < replicas, "{file}"),
            other => panic!("{file}: PDB needs one of minAvailable/maxUnavailable: {other:?}"),
        }
    }
}

/// Kubernetes runs each container's preStop hook, then sends SIGTERM to every container
/// of the pod "at different times and in an arbitrary order" (Pod Lifecycle, "Termination
/// of Pods"). In the sidecar pod the FHIR server is fhirgate's upstream: stopped at once,
/// it would fail every request fhirgate still takes during its preStop delay and drains
/// afterwards (502s). So every other container waits out fhirgate's preStop delay and
/// drain before its own SIGTERM, and still has time to stop within the grace period.
#[test]
fn sidecar_upstream_outlives_the_gateway_drain() {
    let docs = manifests();
    let file = "fhirgate-sidecar.yaml";
    let pod = &kind(&docs, file, "Deployment")[0]["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    let containers = pod["containers"].as_array().expect("containers");
    let pre_stop = |c: &Value| c["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64();
    let gw = containers
        .iter()
        .find(|c| c["name"] == "fhirgate")
        .expect("fhirgate container");
    let cm = kind(&docs, file, "ConfigMap")[0];
    let cfg: Value = serde_saphyr::from_str(cm["data"]["config.yaml"].as_str().expect("config"))
        .expect("embedded yaml");
    let drain: u64 = cfg["limits"]["drain_timeout"]
        .as_str()
        .and_then(|d| d.strip_suffix('s'))
        .and_then(|s| s.parse().ok())
        .expect("drain_timeout in seconds");
    let gateway_done = pre_stop(gw).expect("fhirgate preStop sleep") + drain;
    let others: Vec<_> = containers
        .iter()
        .filter(|c| c["name"] != "fhirgate")
        .collect();
    assert!(!others.is_empty(), "the sidecar pod has the FHIR server");
    for c in others {
        let name = &c["name"];
        let sleep = pre_stop(c).unwrap_or(0);
        assert!(
            sleep >= gateway_done,
            "{file}: {name} gets SIGTERM after {sleep} s, while fhirgate forwards to it for {gateway_done} s"
        );
        assert!(
            sleep + 5 <= grace,
            "{file}: {name} has {} s to stop after its {sleep} s preStop",
            grace.saturating_sub(sleep)
        );
    }
}

/// `docker stop` and `podman stop` send SIGTERM, then SIGKILL after 10 s unless the
/// container was run with `--stop-timeout` (docker container run / podman-run(1)), which
/// an image cannot set: the documented run lines give the drain its time.
#[test]
fn container_run_lines_give_the_drain_its_time() {
    let drain = fhirgate::config::Limits::default().drain_timeout.as_secs();
    let mut seen = 0;
    for file in ["README.md", "Dockerfile"] {
        for line in read(file).lines() {
            if !(line.contains("docker run") || line.contains("podman run")) {
                continue;
            }
            seen += 1;
            let stop: Option<u64> = line
                .split_whitespace()
                .skip_while(|w| *w != "--stop-timeout")
                .nth(1)
                .and_then(|n| n.parse().ok());
            assert!(
                stop.is_some_and(|s| s > drain),
                "{file}: `{line}` needs --stop-timeout above the {drain} s drain_timeout"
            );
        }
    }
    assert!(
        seen >= 2,
        "the README and the Dockerfile show how to run the image"
    );
}

#[test]
fn dockerfile_builds_the_same_layout_as_the_buildah_script() {
    let docker = read("Dockerfile");
    for want in [
        "USER 65532:65532",
        "EXPOSE 8443 9901",
        r#"ENTRYPOINT ["/usr/local/bin/fhirgate"]"#,
        r#"CMD ["run", "--config", "/etc/fhirgate/config.yaml"]"#,
        "/var/cache/fhirgate",
        "org.opencontainers.image.licenses",
    ] {
        assert!(docker.contains(want), "Dockerfile lacks {want}");
    }
    let version = format!(
        "org.opencontainers.image.version=\"{}\"",
        env!("CARGO_PKG_VERSION")
    );
    assert!(docker.contains(&version), "Dockerfile lacks {version}");
    let build = read("deploy/container/build");
    for want in [
        "--user 65532:65532",
        "--port 8443/tcp --port 9901/tcp",
        r#"--entrypoint '["/usr/local/bin/fhirgate"]'"#,
        r#"--cmd '["run", "--config", "/etc/fhirgate/config.yaml"]'"#,
        "/var/cache/fhirgate",
        "org.opencontainers.image.licenses",
    ] {
        assert!(build.contains(want), "deploy/container/build lacks {want}");
    }
}

/// Under the shipped unit (`ProtectSystem=strict`) the only directory the service may write
/// is its `CacheDirectory=` under /var/cache, so every `cache_dir` the shipped systemd
/// configuration and the operator's guide suggest must be that directory: another path
/// would make every CRL cache write fail at run time.
#[test]
fn suggested_crl_cache_dirs_are_writable_under_the_systemd_unit() {
    let unit = read("systemd/fhirgate.service");
    assert!(unit.contains("ProtectSystem=strict"), "{unit}");
    let dir = unit
        .lines()
        .find_map(|l| l.strip_prefix("CacheDirectory="))
        .expect("the unit sets CacheDirectory=");
    let writable = format!("/var/cache/{}", dir.trim());
    for file in [
        "config.yaml",
        "certs/README.md",
        "examples/bars-receiver-prod.yaml",
    ] {
        let text = read(file);
        let suggested: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split("cache_dir:").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .collect();
        assert!(!suggested.is_empty(), "{file} suggests no cache_dir");
        for path in suggested {
            assert_eq!(
                path, writable,
                "{file}: cache_dir {path} is read-only under the unit"
            );
        }
    }
}
