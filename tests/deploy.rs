//! The deployment files: the sidecar manifest parses, its embedded gateway config is a
//! valid fhirgate config (apart from files that exist only in the pod), and the probes
//! point at the admin listener.

use std::path::Path;

use fhirgate::config::Config;

#[test]
fn kubernetes_sidecar_manifest_is_consistent() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/fhirgate-sidecar.yaml"
    ))
    .unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).expect("valid YAML");
    let kinds: Vec<_> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["ConfigMap", "Deployment", "Service"]);

    let embedded = docs[0]["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml in ConfigMap");
    match Config::from_yaml(embedded, Path::new("/")) {
        // Only file checks may fail outside the pod: the structure itself must be valid.
        Err(e) => assert!(e.reason.contains("cannot read /etc/fhirgate/"), "{e}"),
        Ok(_) => panic!("pod-only files unexpectedly readable"),
    }

    let containers = docs[1]["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    let gw = containers
        .iter()
        .find(|c| c["name"] == "fhirgate")
        .expect("fhirgate container");
    assert_eq!(gw["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(gw["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(gw["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(gw["securityContext"]["readOnlyRootFilesystem"], true);
    for m in gw["volumeMounts"].as_array().unwrap() {
        assert_eq!(m["readOnly"], true, "{m}");
    }
    // Only the TLS-MA port is published.
    let ports = docs[2]["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["targetPort"], "https");
}
