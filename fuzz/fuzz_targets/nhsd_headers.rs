//! NHSD-* headers as a client sends them: arbitrary bytes split into the six header
//! values, checked with the default BaRS policy. Must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = http::HeaderMap::new();
    for (name, chunk) in fhirgate::pipeline::nhsd::ALL_HEADERS.iter().zip(data.split(|b| *b == 0)) {
        if let Ok(v) = http::HeaderValue::from_bytes(chunk) {
            headers.insert(*name, v);
        }
    }
    let _ = fhirgate::pipeline::nhsd::check(&headers, &fhirgate::pipeline::nhsd::NhsdPolicy::default());
    if let Ok(s) = std::str::from_utf8(data) {
        for name in fhirgate::pipeline::nhsd::ENCODED_HEADERS {
            let _ = fhirgate::pipeline::nhsd::decode_header(name, s);
        }
    }
});
