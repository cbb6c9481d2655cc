//! BaRS `NHSD-*` request headers: decode, validate, and extract the facts a receiver may
//! act on. Pure functions over an [`http::HeaderMap`]; no sockets, no I/O, no clock.
//!
//! # Sources
//!
//! * NHS Booking and Referral Standard, "Security and Authorisation" (user-supplied seed
//!   `004_a55ebf0b25ae53fe.txt`, guide v1.7.0): the headers "are objects and will
//!   therefore need to be added in the form of a standard Base64 encoded string";
//!   receivers can expect them on every request except `/metadata` and
//!   `/MessageDefinition`, "in addition to the X-Request-ID and the X-Correlation-ID".
//! * BaRS OpenAPI specification, repo `NHSDigital/booking-and-referral-fhir-api`:
//!   `specification/booking-and-referral.yaml` (`components.parameters.*_HParam`: which
//!   headers are `required`) and `specification/booking-and-referral-1.2.0.yaml` (the
//!   decoded example objects); `specification/schemas/RequestingOrganisation.yaml`,
//!   `RequestingSoftware.yaml`, `RequestingPractitioner.yaml`, `TargetIdentifier.yaml`
//!   (the Base64 examples).
//! * BaRS failure scenarios, repo `NHSDigital/IOPS-FHIR-Simplifier-Backup`:
//!   `NHSBookingandReferrals/backup/guides/CopyofFHIRImplementationGuideTemplateTest/
//!   Home/Core/1.0.4/Error-Handling/Failure-Scenarios-1.0.x/Message-Routing.page.md`
//!   (status / error code / issue code per scenario; see [`NhsdError`]).
//!
//! # Public API
//!
//! * [`check()`]`(&HeaderMap, &NhsdPolicy) -> Result<NhsdFacts, NhsdError>`: the one entry
//!   point the gateway calls per request.
//! * [`NhsdPolicy`] (serde, `deny_unknown_fields`, every field defaulted) with
//!   [`NhsdPolicy::validate`]; [`HeaderRequirement`]; [`Refusal`].
//! * [`NhsdFacts`]: what the headers established; [`upstream_fact_headers`] and
//!   [`FORWARDED_FACT_HEADERS`]: the `x-fhirgate-*` headers set upstream from them.
//! * [`NhsdError`]: `Display` is client-safe diagnostics; `header`, `status`, `nhs_code`,
//!   `fhir_issue_code`, `reason` map it to an `OperationOutcome`.
//! * [`resources`]: the typed header objects ([`resources::Organization`],
//!   [`resources::PractitionerRole`], [`resources::Device`],
//!   [`resources::TargetIdentifier`]) and their parsers.
//! * CLI helpers: [`encode_header`], [`decode_header`], [`example_headers`].
//!
//! # Decoding rules (decided from the sources above)
//!
//! * Base64 is the standard alphabet with canonical `=` padding (RFC 4648 section 4),
//!   nothing else: the standard says "standard Base64", the specification marks each
//!   header `format: byte`, and the BaRS proxy itself decodes with Python's
//!   `base64.b64decode`, which refuses unpadded input
//!   (`proxies/live/apiproxy/resources/py/DecodeBase64String.py`). URL-safe or unpadded
//!   values are refused rather than guessed at, so the gateway and the upstream can
//!   never disagree about what a header says.
//! * Sizes are checked on the encoded value before any decoding, and the decoded size is
//!   bounded before any JSON parsing ([`NhsdPolicy::max_encoded_bytes`],
//!   [`NhsdPolicy::max_decoded_bytes`]).
//! * JSON must be a single UTF-8 object, nested at most 32 levels, with no repeated key
//!   at any level (a repeated key is a classic parser-differential: two parsers may pick
//!   different values). Unknown members are ignored, as FHIR resources carry many.
//! * A header that occurs more than once is refused, whichever header it is.
//! * `X-Request-ID` and `X-Correlation-ID` must be hyphenated UUIDs (`format: uuid`).

mod check;
mod cli;
mod error;
mod json;
mod policy;
pub mod resources;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use check::{check, upstream_fact_headers, NhsdFacts, FORWARDED_FACT_HEADERS};
pub use cli::{
    command, decode_header, decode_header_verdict, encode_header, example_headers,
    example_resource, NhsdCmd, EXAMPLE_CORRELATION_ID, EXAMPLE_REQUEST_ID,
};
pub use error::{NhsdError, HTTP_ERROR_CODES_SYSTEM};
pub use policy::{HeaderRequirement, NhsdPolicy, Refusal};
pub use resources::is_valid_ods_code;

/// The requesting organisation, a Base64 FHIR `Organization`.
pub const END_USER_ORGANISATION: &str = "NHSD-End-User-Organisation";
/// The requesting practitioner role, a Base64 FHIR `PractitionerRole`.
pub const REQUESTING_PRACTITIONER: &str = "NHSD-Requesting-Practitioner";
/// The requesting software, a Base64 FHIR `Device`.
pub const REQUESTING_SOFTWARE: &str = "NHSD-Requesting-Software";
/// The target service, a Base64 `{"system", "value"}` identifier.
pub const TARGET_IDENTIFIER: &str = "NHSD-Target-Identifier";
/// Per-request UUID, mirrored back by the receiver.
pub const REQUEST_ID: &str = "X-Request-ID";
/// Per-transaction UUID, mirrored back by the receiver.
pub const CORRELATION_ID: &str = "X-Correlation-ID";

/// The four Base64-encoded JSON headers, in the order [`check()`] examines them.
pub const ENCODED_HEADERS: [&str; 4] = [
    TARGET_IDENTIFIER,
    END_USER_ORGANISATION,
    REQUESTING_SOFTWARE,
    REQUESTING_PRACTITIONER,
];
/// Every header this module reads, in the order [`check()`] examines them.
pub const ALL_HEADERS: [&str; 6] = [
    REQUEST_ID,
    CORRELATION_ID,
    TARGET_IDENTIFIER,
    END_USER_ORGANISATION,
    REQUESTING_SOFTWARE,
    REQUESTING_PRACTITIONER,
];

/// ODS organisation code identifier system.
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// SDS role profile identifier system.
pub const SDS_ROLE_PROFILE_SYSTEM: &str = "https://fhir.nhs.uk/Id/sds-role-profile-id";
/// SDS user identifier system.
pub const SDS_USER_SYSTEM: &str = "https://fhir.nhs.uk/Id/sds-user-id";
/// SNOMED CT code system (practitioner role codes).
pub const SNOMED_SYSTEM: &str = "http://snomed.info/sct";
/// Directory of Services service identifier system (the usual target identifier).
pub const DOS_SERVICE_SYSTEM: &str = "https://fhir.nhs.uk/Id/dos-service-id";
