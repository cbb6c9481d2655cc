//! Durations in the config: humantime's forms (`10s`, `500ms`, `1h 30m`, `2 minutes`),
//! with an error that shows an example instead of serde's bare "expected a duration".

use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

pub(crate) const EXPECTED: &str = "a duration like 10s, 500ms or 1h";

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parse(&String::deserialize(d)?)
}

/// One duration, or the error with [`EXPECTED`] that `yaml_error` names the field with.
fn parse<E: de::Error>(s: &str) -> Result<Duration, E> {
    humantime_serde::re::humantime::parse_duration(s.trim())
        .map_err(|_| E::invalid_value(de::Unexpected::Str(s), &EXPECTED))
}

/// An optional duration (`response_timeout: 5s`; absent or `null`: none), with the same
/// forms and error as [`deserialize`].
pub mod option {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| parse(&s))
            .transpose()
    }
}
