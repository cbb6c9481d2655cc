//! Helpers for `fhirgate nhsd encode|decode|example`.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use http::{HeaderMap, HeaderValue};
use serde_json::{json, Value};

use super::check::{check, NhsdFacts};
use super::error::NhsdError;
use super::json;
use super::policy::{HeaderRequirement, NhsdPolicy};
use super::{
    ALL_HEADERS, CORRELATION_ID, DOS_SERVICE_SYSTEM, ENCODED_HEADERS, END_USER_ORGANISATION,
    ODS_SYSTEM, REQUESTING_PRACTITIONER, REQUESTING_SOFTWARE, REQUEST_ID, SDS_ROLE_PROFILE_SYSTEM,
    SNOMED_SYSTEM, TARGET_IDENTIFIER,
};

/// The specification's example `X-Request-Id` (`specification/booking-and-referral.yaml`).
pub const EXAMPLE_REQUEST_ID: &str = "c1ab3fba-6bae-4ba4-b257-5a87c44d4a91";
/// The specification's example `X-Correlation-Id`.
pub const EXAMPLE_CORRELATION_ID: &str = "9562466f-c982-4bd5-bb0e-255e9f5e6689";

/// The decoded example object for one of [`ENCODED_HEADERS`] (matched ignoring case),
/// as given in `specification/booking-and-referral-1.2.0.yaml`.
pub fn example_resource(header: &str) -> Option<Value> {
    let header = ENCODED_HEADERS
        .into_iter()
        .find(|h| h.eq_ignore_ascii_case(header))?;
    Some(match header {
        TARGET_IDENTIFIER => json!({"value": "2000011147", "system": DOS_SERVICE_SYSTEM}),
        END_USER_ORGANISATION => json!({
            "resourceType": "Organization",
            "identifier": [{"value": "A1001", "system": ODS_SYSTEM}],
            "name": "My service provider name"
        }),
        REQUESTING_SOFTWARE => json!({
            "resourceType": "Device",
            "identifier": [{
                "system": "https://consumersupplier.com/Id/device-identifier",
                "value": "SUPP-APP-1"
            }],
            "deviceName": {"name": "Supplier product name", "type": "manufacturer-name"},
            "version": {"value": "1.0.0"}
        }),
        REQUESTING_PRACTITIONER => json!({
            "resourceType": "PractitionerRole",
            "identifier": [{"system": SDS_ROLE_PROFILE_SYSTEM, "value": "100334993514"}],
            "code": [{"coding": [{
                "system": SNOMED_SYSTEM,
                "code": "62247001",
                "display": "General practitioner"
            }]}]
        }),
        _ => return None,
    })
}

/// A complete, valid set of BaRS headers built from the specification's examples, in
/// [`ALL_HEADERS`] order, each JSON object compacted and standard-Base64 encoded.
pub fn example_headers() -> Vec<(&'static str, String)> {
    ALL_HEADERS
        .into_iter()
        .map(|h| {
            let value = match h {
                REQUEST_ID => EXAMPLE_REQUEST_ID.to_owned(),
                CORRELATION_ID => EXAMPLE_CORRELATION_ID.to_owned(),
                _ => STANDARD.encode(example_resource(h).unwrap_or_default().to_string()),
            };
            (h, value)
        })
        .collect()
}

fn canonical(name: &str, among: &[&'static str]) -> Result<&'static str, String> {
    among
        .iter()
        .find(|h| h.eq_ignore_ascii_case(name.trim()))
        .copied()
        .ok_or_else(|| {
            format!(
                "unknown header {:?}; expected one of {}",
                name,
                among.join(", ")
            )
        })
}

/// Runs the gateway's own [`check()`] on one header, the others ignored, with default sizes
/// and no allow-lists.
fn verdict(header: &'static str, value: &str) -> Result<NhsdFacts, NhsdError> {
    let mut policy = NhsdPolicy::default();
    for field in [
        &mut policy.request_id,
        &mut policy.correlation_id,
        &mut policy.target_identifier,
        &mut policy.end_user_organisation,
        &mut policy.requesting_software,
        &mut policy.requesting_practitioner,
    ] {
        *field = HeaderRequirement::Ignored;
    }
    *match header {
        REQUEST_ID => &mut policy.request_id,
        CORRELATION_ID => &mut policy.correlation_id,
        TARGET_IDENTIFIER => &mut policy.target_identifier,
        END_USER_ORGANISATION => &mut policy.end_user_organisation,
        REQUESTING_SOFTWARE => &mut policy.requesting_software,
        _ => &mut policy.requesting_practitioner,
    } = HeaderRequirement::Required;
    let v =
        HeaderValue::from_bytes(value.as_bytes()).map_err(|_| NhsdError::NotAscii { header })?;
    let mut map = HeaderMap::new();
    map.insert(header, v);
    check(&map, &policy)
}

fn summary(header: &str, f: &NhsdFacts) -> String {
    let show = |o: &Option<String>| o.as_deref().unwrap_or("-").to_owned();
    match header {
        REQUEST_ID => format!("request id {}", show(&f.request_id)),
        CORRELATION_ID => format!("correlation id {}", show(&f.correlation_id)),
        TARGET_IDENTIFIER => format!(
            "target {}|{}",
            show(&f.target_system),
            show(&f.target_value)
        ),
        END_USER_ORGANISATION => format!(
            "ODS code {}, name {:?}",
            show(&f.ods_code),
            show(&f.organisation_name)
        ),
        REQUESTING_SOFTWARE => format!(
            "software {:?} version {}, instance {}",
            show(&f.software_name),
            show(&f.software_version),
            show(&f.software_instance)
        ),
        _ => format!(
            "SDS role profile {}, SDS user {}, SNOMED role {}",
            show(&f.sds_role_profile_id),
            show(&f.sds_user_id),
            show(&f.snomed_role_code)
        ),
    }
}

/// Compacts `json`, checks it the way the gateway will check header `name` (one of
/// [`ENCODED_HEADERS`], any case) with the default policy, and returns the standard
/// Base64 header value. Refuses input that is not one strict JSON object, that fails the
/// header's rules, or whose encoding exceeds the default size limit.
pub fn encode_header(name: &str, json: &str) -> Result<String, String> {
    let header = canonical(name, &ENCODED_HEADERS)?;
    let value = json::parse_any(json).map_err(|d| format!("input is not valid JSON: {d}"))?;
    if !value.is_object() {
        return Err(format!(
            "{header} must be a JSON object, not {}",
            json::kind(&value)
        ));
    }
    let encoded = STANDARD.encode(value.to_string());
    verdict(header, &encoded).map_err(|e| format!("the gateway would refuse this: {e}"))?;
    Ok(encoded)
}

/// Decodes header `name`'s `value` (one of [`ALL_HEADERS`], any case) to pretty JSON,
/// followed by a line saying whether the gateway accepts it under the default policy
/// (`valid (...)` or `INVALID: ...`). Fails only when there is nothing to show: an
/// unknown header, or a value that is not Base64 of a JSON object.
pub fn decode_header(name: &str, value: &str) -> Result<String, String> {
    decode_header_verdict(name, value).map(|(text, _)| text)
}

/// [`decode_header`], plus whether the gateway accepts the value (for the exit status of
/// `fhirgate nhsd decode`).
pub fn decode_header_verdict(name: &str, value: &str) -> Result<(String, bool), String> {
    let header = canonical(name, &ALL_HEADERS)?;
    let value = value.trim();
    let checked = verdict(header, value);
    let valid = checked.is_ok();
    let verdict = match checked {
        Ok(f) => format!("valid ({})", summary(header, &f)),
        Err(e) => format!("INVALID: {e}"),
    };
    if !ENCODED_HEADERS.contains(&header) {
        return Ok((format!("{header}: {verdict}"), valid));
    }
    let bytes = STANDARD.decode(value).map_err(|_| {
        let lenient = [URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
            .iter()
            .any(|e| e.decode(value).is_ok());
        let hint = if lenient {
            " (it is URL-safe or unpadded Base64, which BaRS does not allow)"
        } else {
            ""
        };
        format!("{}{hint}", NhsdError::Base64 { header })
    })?;
    let obj = json::parse_object(&bytes)
        .map_err(|d| format!("{header}: decoded value is not a JSON object: {d}"))?;
    let pretty = serde_json::to_string_pretty(&Value::Object(obj)).map_err(|e| e.to_string())?;
    Ok((format!("{pretty}\n{header}: {verdict}"), valid))
}

/// `fhirgate nhsd ...`: build and inspect BaRS NHSD-* headers.
#[derive(clap::Subcommand)]
pub enum NhsdCmd {
    /// Base64-encode a FHIR resource (JSON file, or - for stdin) as header NAME, checking
    /// it the way the gateway will.
    Encode {
        /// Header name, e.g. NHSD-End-User-Organisation (any case).
        #[arg(long)]
        header: String,
        /// JSON file with the resource, or - for stdin.
        file: std::path::PathBuf,
    },
    /// Decode header NAME's VALUE to pretty JSON and say whether the gateway accepts it.
    Decode {
        /// Header name, e.g. NHSD-End-User-Organisation (any case).
        #[arg(long)]
        header: String,
        /// The header's value as sent on the wire.
        value: String,
    },
    /// Print a complete valid set of BaRS headers, one `Name: value` per line.
    Example,
}

pub fn command(cmd: NhsdCmd) -> anyhow::Result<()> {
    use crate::pipeline::nhsd;
    match cmd {
        NhsdCmd::Encode { header, file } => {
            let json = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)?
            };
            println!(
                "{}",
                nhsd::encode_header(&header, &json).map_err(anyhow::Error::msg)?
            );
        }
        NhsdCmd::Decode { header, value } => {
            let (text, valid) =
                nhsd::decode_header_verdict(&header, &value).map_err(anyhow::Error::msg)?;
            println!("{text}");
            if !valid {
                // The verdict is on stdout already; the status lets scripts act on it.
                anyhow::bail!("{header}: the gateway would refuse this value");
            }
        }
        NhsdCmd::Example => {
            for (name, value) in nhsd::example_headers() {
                println!("{name}: {value}");
            }
        }
    }
    Ok(())
}
