//! Property tests: `check` never panics, every refusal is well-formed, and every
//! acceptance satisfies the documented invariants.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use super::*;

fn examples() -> Vec<(&'static str, String)> {
    example_headers()
}

fn example_value(header: &str) -> HeaderValue {
    let v = examples()
        .into_iter()
        .find(|(k, _)| *k == header)
        .map(|(_, v)| v)
        .unwrap_or_default();
    HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static(""))
}

/// The example set with `header` replaced by `value`.
fn replaced(header: &'static str, value: HeaderValue) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, _) in examples() {
        if k != header {
            m.insert(k, example_value(k));
        }
    }
    m.insert(header, value);
    m
}

/// Bytes a `HeaderValue` can hold (visible ASCII, space, tab, obs-text).
fn header_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        any::<u8>().prop_map(|b| if b < 0x20 || b == 0x7f { b'\t' } else { b }),
        0..max,
    )
}

fn any_header() -> impl Strategy<Value = &'static str> {
    prop::sample::select(ALL_HEADERS.to_vec())
}

fn encoded_header() -> impl Strategy<Value = &'static str> {
    prop::sample::select(ENCODED_HEADERS.to_vec())
}

fn requirement() -> impl Strategy<Value = HeaderRequirement> {
    prop::sample::select(vec![
        HeaderRequirement::Required,
        HeaderRequirement::Optional,
        HeaderRequirement::Ignored,
    ])
}

fn policy() -> impl Strategy<Value = NhsdPolicy> {
    (
        prop::collection::vec(requirement(), 6),
        prop::sample::subsequence(vec!["A1001", "RYG", "a1001", "X26"], 0..3),
        prop::sample::subsequence(
            vec![
                "2000011147",
                "https://fhir.nhs.uk/Id/dos-service-id|2000011147",
                "1",
            ],
            0..2,
        ),
        any::<bool>(),
    )
        .prop_map(|(r, ods, targets, unauthorized)| NhsdPolicy {
            request_id: r[0],
            correlation_id: r[1],
            target_identifier: r[2],
            end_user_organisation: r[3],
            requesting_software: r[4],
            requesting_practitioner: r[5],
            allowed_ods_codes: ods.into_iter().map(String::from).collect(),
            allowed_target_identifiers: targets.into_iter().map(String::from).collect(),
            refusal: if unauthorized {
                Refusal::Unauthorized
            } else {
                Refusal::Forbidden
            },
            ..NhsdPolicy::default()
        })
}

/// JSON built from the vocabulary the parsers look for, so generated objects often get
/// past the first checks.
fn json_value() -> impl Strategy<Value = Value> {
    let words = vec![
        "Organization",
        "Device",
        "PractitionerRole",
        ODS_SYSTEM,
        SDS_ROLE_PROFILE_SYSTEM,
        SDS_USER_SYSTEM,
        SNOMED_SYSTEM,
        "A1001",
        "62247001",
        "100334993514",
        "",
        " ",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(words).prop_map(Value::from),
    ];
    let keys = vec![
        "resourceType",
        "identifier",
        "system",
        "value",
        "name",
        "deviceName",
        "version",
        "code",
        "coding",
        "type",
        "display",
        "x",
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(keys.clone()), inner, 0..6).prop_map(
                |m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            ),
        ]
    })
}

fn clean(s: &str) -> bool {
    !s.is_empty() && s.trim() == s && !s.chars().any(char::is_control)
}

/// What every accepted request must satisfy.
fn accepted(headers: &HeaderMap, p: &NhsdPolicy, f: &NhsdFacts) -> Result<(), TestCaseError> {
    let main = [
        (REQUEST_ID, f.request_id.is_some()),
        (CORRELATION_ID, f.correlation_id.is_some()),
        (TARGET_IDENTIFIER, f.target_value.is_some()),
        (END_USER_ORGANISATION, f.ods_code.is_some()),
        (REQUESTING_SOFTWARE, f.software_name.is_some()),
        (REQUESTING_PRACTITIONER, f.sds_role_profile_id.is_some()),
    ];
    for (h, has) in main {
        match p.effective(h) {
            HeaderRequirement::Ignored => prop_assert!(!has, "{h} ignored but read"),
            HeaderRequirement::Required => prop_assert!(has, "{h} required but absent"),
            HeaderRequirement::Optional => prop_assert_eq!(has, headers.contains_key(h), "{}", h),
        }
        if has {
            prop_assert_eq!(headers.get_all(h).iter().count(), 1, "{}", h);
        }
    }
    prop_assert_eq!(f.ods_code.is_some(), f.organisation_name.is_some());
    prop_assert_eq!(f.target_system.is_some(), f.target_value.is_some());
    prop_assert_eq!(f.software_name.is_some(), f.software_version.is_some());
    prop_assert_eq!(f.software_name.is_some(), f.software_instance.is_some());
    if let Some(ods) = &f.ods_code {
        prop_assert!(is_valid_ods_code(ods));
        prop_assert_eq!(ods, &ods.to_ascii_uppercase());
        prop_assert!(
            p.allowed_ods_codes.is_empty()
                || p.allowed_ods_codes
                    .iter()
                    .any(|c| c.eq_ignore_ascii_case(ods))
        );
    }
    if let Some(v) = &f.target_value {
        prop_assert!(
            p.allowed_target_identifiers.is_empty()
                || p.allowed_target_identifiers
                    .iter()
                    .any(|t| t == v || t.ends_with(&format!("|{v}"))),
            "target {} not in the allow-list",
            v
        );
    }
    for id in [&f.request_id, &f.correlation_id].into_iter().flatten() {
        prop_assert_eq!(id.len(), 36);
        prop_assert!(uuid::Uuid::try_parse(id).is_ok());
    }
    for s in [
        &f.ods_code,
        &f.organisation_name,
        &f.sds_role_profile_id,
        &f.sds_user_id,
        &f.snomed_role_code,
        &f.software_instance,
        &f.software_name,
        &f.software_version,
        &f.target_system,
        &f.target_value,
    ]
    .into_iter()
    .flatten()
    {
        prop_assert!(clean(s), "unclean fact {:?}", s);
    }
    for (name, value) in upstream_fact_headers(f) {
        prop_assert!(FORWARDED_FACT_HEADERS.contains(&name));
        prop_assert!(HeaderValue::from_bytes(value.as_bytes()).is_ok(), "{name}");
        if name != "x-fhirgate-software-name" {
            prop_assert!(HeaderValue::from_str(value).is_ok(), "{name}");
        }
    }
    Ok(())
}

/// What every refusal must satisfy; `at` is the header that was tampered with, if any.
fn refused(e: &NhsdError, at: Option<&str>) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(ALL_HEADERS.contains(&e.header()));
    prop_assert!(text.contains(e.header()), "{text}");
    prop_assert!(
        text.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "unprintable diagnostics {text:?}"
    );
    prop_assert!(text.len() < 300, "{text}");
    prop_assert!(matches!(e.status(), 400 | 401 | 403));
    prop_assert_eq!(e.status() != 400, e.is_refusal());
    if let Some(h) = at {
        prop_assert_eq!(e.header(), h, "{}", text);
    }
    Ok(())
}

fn run(headers: &HeaderMap, p: &NhsdPolicy, at: Option<&str>) -> Result<(), TestCaseError> {
    let first = check(headers, p);
    prop_assert_eq!(&first, &check(headers, p), "check is deterministic");
    match &first {
        Ok(f) => accepted(headers, p, f),
        Err(e) => refused(e, at),
    }
}

proptest! {
    #[test]
    fn arbitrary_header_bytes(header in any_header(), bytes in header_bytes(300)) {
        let value = HeaderValue::from_bytes(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        run(&replaced(header, value), &NhsdPolicy::default(), Some(header))?;
    }

    #[test]
    fn arbitrary_text_behind_valid_base64(header in encoded_header(), text in any::<String>()) {
        let value = HeaderValue::from_str(&STANDARD.encode(text.as_bytes()))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let m = replaced(header, value);
        run(&m, &NhsdPolicy::default(), Some(header))?;
        let object_like = text.trim_start().starts_with('{');
        prop_assert!(
            check(&m, &NhsdPolicy::default()).is_err() || object_like,
            "accepted non-object text {:?}",
            text
        );
    }

    #[test]
    fn arbitrary_json_objects(header in encoded_header(), v in json_value()) {
        let value = HeaderValue::from_str(&STANDARD.encode(v.to_string()))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        run(&replaced(header, value), &NhsdPolicy::default(), Some(header))?;
    }

    #[test]
    fn examples_with_one_member_replaced(
        header in encoded_header(),
        key in prop::sample::select(vec![
            "resourceType", "identifier", "name", "deviceName", "version", "code", "system", "value",
        ]),
        v in json_value(),
    ) {
        let mut obj = example_resource(header).unwrap_or_default();
        obj[key] = v;
        let value = HeaderValue::from_str(&STANDARD.encode(obj.to_string()))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        run(&replaced(header, value), &NhsdPolicy::default(), Some(header))?;
    }

    #[test]
    fn organisation_strings(ods in ".{0,14}", name in any::<String>()) {
        let mut obj = example_resource(END_USER_ORGANISATION).unwrap_or_default();
        obj["identifier"][0]["value"] = Value::from(ods.clone());
        obj["name"] = Value::from(name.clone());
        let value = HeaderValue::from_str(&STANDARD.encode(obj.to_string()))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let m = replaced(END_USER_ORGANISATION, value);
        run(&m, &NhsdPolicy::default(), Some(END_USER_ORGANISATION))?;
        if let Ok(f) = check(&m, &NhsdPolicy::default()) {
            prop_assert_eq!(f.ods_code, Some(ods.to_ascii_uppercase()));
            prop_assert_eq!(f.organisation_name, Some(name));
        }
    }

    #[test]
    fn transaction_ids(header in prop::sample::select(vec![REQUEST_ID, CORRELATION_ID]),
                       id in prop_oneof![
                           "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
                           "[ -~]{0,40}",
                       ]) {
        let value = HeaderValue::from_str(&id).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let m = replaced(header, value);
        run(&m, &NhsdPolicy::default(), Some(header))?;
        let hyphenated = id.len() == 36 && uuid::Uuid::try_parse(&id).is_ok();
        prop_assert_eq!(check(&m, &NhsdPolicy::default()).is_ok(), hyphenated);
    }

    #[test]
    fn arbitrary_header_sets_and_policies(
        p in policy(),
        plan in prop::collection::vec((0u8..4, header_bytes(40)), 6),
    ) {
        let mut m = HeaderMap::new();
        for (h, (how, junk)) in ALL_HEADERS.into_iter().zip(plan) {
            match how {
                0 => {}
                1 => { m.insert(h, example_value(h)); }
                2 => {
                    m.append(h, example_value(h));
                    m.append(h, example_value(h));
                }
                _ => {
                    let v = HeaderValue::from_bytes(&junk).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    m.insert(h, v);
                }
            }
        }
        run(&m, &p, None)?;
    }
}
