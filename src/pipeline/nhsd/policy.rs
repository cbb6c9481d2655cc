//! Which headers a route needs and which values it accepts.

use serde::Deserialize;

use super::resources::is_valid_ods_code;

/// Whether a route needs a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderRequirement {
    /// Absent is refused; present must be valid.
    Required,
    /// Absent is fine; present must be valid.
    #[default]
    Optional,
    /// Not looked at, and removed before the upstream: an upstream (or a BaRS library
    /// in it) must not take an unchecked header for one the gateway checked.
    Ignored,
}

/// How an allow-list refusal is reported.
///
/// The BaRS failure scenarios (`Failure-Scenarios-1.0.x/Message-Routing.page.md`, "REC
/// at the receiver", and the GET /Slot scenarios) give an access-control refusal based on
/// the NHSD headers as **401 `REC_UNAUTHORIZED`** and reserve 403 `REC_FORBIDDEN` for a
/// TLS-MA failure. HTTP (RFC 9110 section 15.5.2) requires a `WWW-Authenticate` challenge
/// on every 401, which has little meaning for a header allow-list, so the default is 403;
/// with `unauthorized` the gateway sends its Bearer challenge (`auth.realm`) with the 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Refusal {
    /// 403, `REC_FORBIDDEN`, issue `forbidden`.
    #[default]
    Forbidden,
    /// 401, `REC_UNAUTHORIZED`, issue `forbidden`: the BaRS failure-scenario coding.
    Unauthorized,
}

/// Which headers a route needs and what values it accepts.
///
/// Defaults follow the BaRS OpenAPI specification
/// (`NHSDigital/booking-and-referral-fhir-api`, `specification/booking-and-referral.yaml`,
/// `components.parameters`): `X-Request-Id`, `X-Correlation-Id`, `NHSD-Target-Identifier`,
/// `NHSD-End-User-Organisation` and `NHSD-Requesting-Software` are `required: true`;
/// `NHSD-Requesting-Practitioner` is `required: false` ("This item is not mandatory,
/// however if the information is available it must be included"). The API change log
/// for v1.0.0 made the organisation and software headers mandatory. `/metadata` and
/// `/MessageDefinition` are exempt: see [`NhsdPolicy::exempt`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NhsdPolicy {
    pub request_id: HeaderRequirement,
    pub correlation_id: HeaderRequirement,
    pub target_identifier: HeaderRequirement,
    pub end_user_organisation: HeaderRequirement,
    pub requesting_software: HeaderRequirement,
    pub requesting_practitioner: HeaderRequirement,
    /// ODS codes allowed in `NHSD-End-User-Organisation` (compared ignoring case);
    /// empty allows any. A non-empty list makes the header required in effect.
    pub allowed_ods_codes: Vec<String>,
    /// Target identifiers allowed, as `value` or `system|value` (system compared ignoring
    /// ASCII case, value exactly); empty allows any. A non-empty list makes the header
    /// required in effect.
    pub allowed_target_identifiers: Vec<String>,
    /// Longest encoded header value accepted, checked before anything else. The
    /// specification's own examples are under 300 bytes.
    pub max_encoded_bytes: usize,
    /// Longest decoded JSON accepted, checked (from the encoded length) before decoding.
    pub max_decoded_bytes: usize,
    /// How an allow-list refusal is reported.
    pub refusal: Refusal,
}

impl Default for NhsdPolicy {
    fn default() -> Self {
        NhsdPolicy {
            request_id: HeaderRequirement::Required,
            correlation_id: HeaderRequirement::Required,
            target_identifier: HeaderRequirement::Required,
            end_user_organisation: HeaderRequirement::Required,
            requesting_software: HeaderRequirement::Required,
            requesting_practitioner: HeaderRequirement::Optional,
            allowed_ods_codes: Vec::new(),
            allowed_target_identifiers: Vec::new(),
            max_encoded_bytes: 8192,
            max_decoded_bytes: 6144,
            refusal: Refusal::default(),
        }
    }
}

/// Bounds accepted by [`NhsdPolicy::validate`] for both size limits.
const SIZE_RANGE: std::ops::RangeInclusive<usize> = 128..=65536;

impl NhsdPolicy {
    /// Checks what serde cannot. The error is `(field, reason)`, the field named under
    /// `prefix` (e.g. `nhsd.headers.allowed_ods_codes[2]`).
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        let field = |name: &str| format!("{prefix}.{name}");
        for (name, v) in [
            ("max_encoded_bytes", self.max_encoded_bytes),
            ("max_decoded_bytes", self.max_decoded_bytes),
        ] {
            if !SIZE_RANGE.contains(&v) {
                return Err((
                    field(name),
                    format!(
                        "must be between {} and {}",
                        SIZE_RANGE.start(),
                        SIZE_RANGE.end()
                    ),
                ));
            }
        }
        for (i, c) in self.allowed_ods_codes.iter().enumerate() {
            if !is_valid_ods_code(c) {
                return Err((
                    field(&format!("allowed_ods_codes[{i}]")),
                    format!("{c:?} is not an ODS code (3 to 10 letters or digits)"),
                ));
            }
        }
        for (i, t) in self.allowed_target_identifiers.iter().enumerate() {
            let (system, value) = match t.split_once('|') {
                Some((s, v)) => (Some(s), v),
                None => (None, t.as_str()),
            };
            let bad = |s: &str| {
                s.is_empty()
                    || s.trim() != s
                    || !s.bytes().all(|b| (0x20..0x7f).contains(&b))
                    || s.len() > 256
            };
            if system.is_some_and(bad) || bad(value) {
                return Err((
                    field(&format!("allowed_target_identifiers[{i}]")),
                    "must be `value` or `system|value`: printable ASCII, non-empty, \
                     no surrounding spaces, at most 256 bytes each"
                        .into(),
                ));
            }
        }
        for (list, len, header, need) in [
            (
                "allowed_ods_codes",
                self.allowed_ods_codes.len(),
                "end_user_organisation",
                self.end_user_organisation,
            ),
            (
                "allowed_target_identifiers",
                self.allowed_target_identifiers.len(),
                "target_identifier",
                self.target_identifier,
            ),
        ] {
            if len > 0 && need != HeaderRequirement::Required {
                return Err((
                    field(list),
                    format!(
                        "needs {header}: required (otherwise a request without the header \
                         would bypass the allow-list)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The policy on a path exempt from the NHSD headers (`nhsd.exempt_paths`:
    /// `/metadata`, `/MessageDefinition`, which the BaRS guide excludes from them).
    /// Nothing is required there and no allow-list applies, but every header that is
    /// sent, the two ids included, is still checked: nothing unverified is passed on.
    /// So capability discovery and probes work without the BaRS headers (a missing
    /// `X-Request-ID` stays missing). Only `nhsd.headers` is relaxed this way: a route's
    /// own `nhsd` block applies as written there too.
    pub fn exempt(&self) -> NhsdPolicy {
        let relax = |h| match h {
            HeaderRequirement::Required => HeaderRequirement::Optional,
            other => other,
        };
        NhsdPolicy {
            request_id: relax(self.request_id),
            correlation_id: relax(self.correlation_id),
            target_identifier: relax(self.target_identifier),
            end_user_organisation: relax(self.end_user_organisation),
            requesting_software: relax(self.requesting_software),
            requesting_practitioner: relax(self.requesting_practitioner),
            allowed_ods_codes: Vec::new(),
            allowed_target_identifiers: Vec::new(),
            max_encoded_bytes: self.max_encoded_bytes,
            max_decoded_bytes: self.max_decoded_bytes,
            refusal: self.refusal,
        }
    }

    /// The headers this policy does not look at, which are therefore not forwarded.
    pub fn ignored_headers(&self) -> impl Iterator<Item = &'static str> + '_ {
        super::ALL_HEADERS
            .into_iter()
            .filter(|h| self.effective(h) == HeaderRequirement::Ignored)
    }

    /// The requirement `check` applies: a non-empty allow-list makes its header required,
    /// so a policy that skipped [`NhsdPolicy::validate`] still fails closed.
    pub(super) fn effective(&self, header: &str) -> HeaderRequirement {
        use super::*;
        match header {
            REQUEST_ID => self.request_id,
            CORRELATION_ID => self.correlation_id,
            TARGET_IDENTIFIER if !self.allowed_target_identifiers.is_empty() => {
                HeaderRequirement::Required
            }
            TARGET_IDENTIFIER => self.target_identifier,
            END_USER_ORGANISATION if !self.allowed_ods_codes.is_empty() => {
                HeaderRequirement::Required
            }
            END_USER_ORGANISATION => self.end_user_organisation,
            REQUESTING_SOFTWARE => self.requesting_software,
            REQUESTING_PRACTITIONER => self.requesting_practitioner,
            _ => HeaderRequirement::Ignored,
        }
    }

    /// The encoded length above which a Base64 header is refused unread: the smaller of
    /// `max_encoded_bytes` and the longest encoding of `max_decoded_bytes` bytes.
    pub(super) fn encoded_limit(&self) -> usize {
        let from_decoded = self.max_decoded_bytes.div_ceil(3).saturating_mul(4);
        self.max_encoded_bytes.min(from_decoded)
    }
}
