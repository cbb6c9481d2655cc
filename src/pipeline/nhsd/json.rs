//! Strict JSON: one object, bounded nesting, no repeated keys.
//!
//! serde_json keeps the last of two equal keys; other parsers keep the first. A header
//! that says two things depending on who reads it must not pass a security gateway, so
//! objects are built here with a visitor that refuses a key it has already seen.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Deepest nesting of arrays and objects accepted (the top-level object is depth 1).
pub(super) const MAX_DEPTH: usize = 32;

const DUPLICATE_KEY: &str = "repeated object key";
const TOO_DEEP: &str = "nested too deeply";
const BAD_NUMBER: &str = "number out of range";

/// Parses `bytes` as exactly one JSON object. The error is a description written by this
/// module (with a position), safe to show to the client.
pub(super) fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Seed { depth: 0 }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| describe(&e))?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(format!("expected a JSON object, found {}", kind(&other))),
    }
}

/// Parses `text` strictly and returns any JSON value (used by the CLI encoder).
pub(super) fn parse_any(text: &str) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    Seed { depth: 0 }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| describe(&e))
}

/// A JSON type name for messages.
pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn describe(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let at = format!("at line {} column {}", e.line(), e.column());
    match e.classify() {
        Category::Eof => "unexpected end of JSON".into(),
        Category::Io => "unreadable JSON".into(),
        Category::Syntax => format!("malformed JSON (or invalid UTF-8) {at}"),
        Category::Data => {
            // Data errors only come from the visitor below; name them without trusting
            // serde's text, which could quote the input.
            let text = e.to_string();
            let what = [DUPLICATE_KEY, TOO_DEEP, BAD_NUMBER]
                .into_iter()
                .find(|m| text.starts_with(m))
                .unwrap_or("unexpected JSON value");
            format!("{what} {at}")
        }
    }
}

/// Deserializes any JSON value, tracking depth and refusing repeated keys.
#[derive(Clone, Copy)]
struct Seed {
    depth: usize,
}

impl Seed {
    fn deeper<E: de::Error>(self) -> Result<Seed, E> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(E::custom(TOO_DEEP));
        }
        Ok(Seed { depth })
    }
}

impl<'de> DeserializeSeed<'de> for Seed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(BAD_NUMBER))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.deeper()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(inner)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.deeper()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(DUPLICATE_KEY));
            }
            let v = map.next_value_seed(inner)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}
