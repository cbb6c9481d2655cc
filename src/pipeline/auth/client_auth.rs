//! How the gateway authenticates itself to the authorisation server.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::HeaderValue;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::{ClientAuthConfig, ClientAuthMethod};
use crate::config::error::{err, ConfigError};

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// An optional `Authorization` header and extra form fields for one request.
pub type Applied = (Option<HeaderValue>, Vec<(&'static str, String)>);

pub enum ClientCredential {
    /// Precomputed `Authorization: Basic …` value (marked sensitive).
    Basic(HeaderValue),
    Jwt {
        client_id: String,
        key: EncodingKey,
        alg: Algorithm,
        kid: Option<String>,
    },
}

fn form(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// RFC 6749 §2.3.1: id and secret are form-encoded before Base64.
pub fn basic_value(client_id: &str, secret: &str) -> HeaderValue {
    let raw = format!("{}:{}", form(client_id), form(secret));
    let mut v = HeaderValue::from_str(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    v.set_sensitive(true);
    v
}

impl ClientCredential {
    pub fn from_config(c: &ClientAuthConfig) -> Result<Self, ConfigError> {
        match c.method {
            ClientAuthMethod::ClientSecretBasic => {
                let secret = if let Some(p) = &c.client_secret_file {
                    let text = std::fs::read_to_string(p).map_err(|e| {
                        err(
                            "auth.client_auth.client_secret_file",
                            format!("{}: {e}", p.display()),
                        )
                    })?;
                    text.lines().next().unwrap_or("").trim().to_owned()
                } else if let Some(var) = &c.client_secret_env {
                    std::env::var(var).map_err(|_| {
                        err(
                            "auth.client_auth.client_secret_env",
                            format!("environment variable {var} is not set"),
                        )
                    })?
                } else {
                    String::new()
                };
                if secret.is_empty() {
                    return Err(err("auth.client_auth", "the client secret is empty"));
                }
                Ok(ClientCredential::Basic(basic_value(&c.client_id, &secret)))
            }
            ClientAuthMethod::PrivateKeyJwt => {
                let field = "auth.client_auth.private_key_file";
                let path = c
                    .private_key_file
                    .as_ref()
                    .ok_or_else(|| err(field, "required"))?;
                let pem = std::fs::read(path)
                    .map_err(|e| err(field, format!("{}: {e}", path.display())))?;
                let (alg, key) = match c.algorithm.as_str() {
                    "ES256" => (Algorithm::ES256, EncodingKey::from_ec_pem(&pem)),
                    "RS256" => (Algorithm::RS256, EncodingKey::from_rsa_pem(&pem)),
                    "PS256" => (Algorithm::PS256, EncodingKey::from_rsa_pem(&pem)),
                    _ => {
                        return Err(err(
                            "auth.client_auth.algorithm",
                            "must be ES256, RS256 or PS256",
                        ))
                    }
                };
                let key =
                    key.map_err(|e| err(field, format!("not a usable {} key: {e}", c.algorithm)))?;
                Ok(ClientCredential::Jwt {
                    client_id: c.client_id.clone(),
                    key,
                    alg,
                    kid: c.key_id.clone(),
                })
            }
        }
    }

    /// The `Authorization` header and extra form fields for one request to `endpoint`.
    pub fn apply(&self, endpoint: &str, issuer: Option<&str>) -> Result<Applied, String> {
        match self {
            ClientCredential::Basic(v) => Ok((Some(v.clone()), Vec::new())),
            ClientCredential::Jwt {
                client_id,
                key,
                alg,
                kid,
            } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                // Audience: the endpoint, and the issuer where known (RFC 7523 allows
                // either; servers differ in which they insist on).
                let mut aud = vec![endpoint.to_owned()];
                if let Some(i) = issuer {
                    aud.push(i.to_owned());
                }
                let claims = serde_json::json!({
                    "iss": client_id,
                    "sub": client_id,
                    "aud": aud,
                    "iat": now,
                    "exp": now + 60,
                    "jti": uuid::Uuid::new_v4().to_string(),
                });
                let mut header = Header::new(*alg);
                header.kid = kid.clone();
                let jwt = jsonwebtoken::encode(&header, &claims, key)
                    .map_err(|e| format!("cannot sign client assertion: {e}"))?;
                Ok((
                    None,
                    vec![
                        ("client_id", client_id.clone()),
                        ("client_assertion_type", ASSERTION_TYPE.to_owned()),
                        ("client_assertion", jwt),
                    ],
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_encoded_first() {
        let v = basic_value("fhirgate gw", "s3cr:t+%");
        assert!(v.is_sensitive());
        let b64 = v.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(
            String::from_utf8(raw).unwrap(),
            "fhirgate+gw:s3cr%3At%2B%25"
        );
    }
}
