//! RFC 6750 §2.1: `Authorization: Bearer <token68>`.

use http::HeaderMap;

use super::AuthError;

/// Longest token accepted; larger values are refused before any work is done.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// The bearer token of a request. Exactly one `Authorization` header is allowed: with two,
/// which one a downstream would read is anyone's guess.
///
/// RFC 6750 §3.1: `invalid_request` is for a request that "repeats the same parameter,
/// uses more than one method for including an access token, or is otherwise
/// malformed", so a header that is not one `Bearer <b64token>` (§2.1) is that, 400, not
/// a verdict on a token; `invalid_token` is left for tokens of the right shape.
pub fn extract(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut all = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = all.next() else {
        return Err(AuthError::Missing);
    };
    if all.next().is_some() {
        return Err(AuthError::InvalidRequest(
            "more than one Authorization header",
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::InvalidRequest("Authorization header is not ASCII"))?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::InvalidRequest(
        "Authorization header is not 'Bearer <token>'",
    ))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        // Another scheme (Basic, Digest, …) is not a bearer token at all.
        return Err(AuthError::Missing);
    }
    let token = token.trim_start_matches(' ');
    if token.is_empty() {
        return Err(AuthError::InvalidRequest("empty bearer token"));
    }
    // A well-formed token the gateway will not look at: refused as a token.
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::InvalidToken("bearer token too long"));
    }
    if !is_token68(token) {
        return Err(AuthError::InvalidRequest(
            "bearer token has characters outside token68",
        ));
    }
    Ok(token)
}

/// RFC 7235 token68: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_token68(t: &str) -> bool {
    let body = t.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(values: &[&[u8]]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in values {
            m.append(
                http::header::AUTHORIZATION,
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        m
    }

    /// RFC 6750 §2.1: `credentials = "Bearer" 1*SP b64token`; §3.1: `invalid_request`
    /// when the request "repeats the same parameter, uses more than one method for
    /// including an access token, or is otherwise malformed. The resource server SHOULD
    /// respond with the HTTP 400 (Bad Request) status code."
    #[test]
    fn bearer_edge_cases() {
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        type Case<'a> = (&'a [&'a [u8]], Result<&'a str, AuthError>);
        let cases: &[Case] = &[
            (&[b"Bearer abc.def-ghi_~+/=="], Ok("abc.def-ghi_~+/==")),
            (&[b"bearer abc"], Ok("abc")),
            (&[b"BEARER abc"], Ok("abc")),
            (&[b"Bearer  abc"], Ok("abc")),
            (&[], Err(AuthError::Missing)),
            (&[b"Basic dXNlcjpwYXNz"], Err(AuthError::Missing)),
            (
                &[b"Bearer"],
                Err(AuthError::InvalidRequest(
                    "Authorization header is not 'Bearer <token>'",
                )),
            ),
            (
                &[b"Bearer "],
                Err(AuthError::InvalidRequest("empty bearer token")),
            ),
            (
                &[b"Bearer a b"],
                Err(AuthError::InvalidRequest(
                    "bearer token has characters outside token68",
                )),
            ),
            (
                &[b"Bearer ===="],
                Err(AuthError::InvalidRequest(
                    "bearer token has characters outside token68",
                )),
            ),
            (
                &[b"Bearer \xc3\xa9t\xc3\xa9"],
                Err(AuthError::InvalidRequest(
                    "Authorization header is not ASCII",
                )),
            ),
            (
                &[b"Bearer a", b"Bearer b"],
                Err(AuthError::InvalidRequest(
                    "more than one Authorization header",
                )),
            ),
            (
                &[long.as_bytes()],
                Err(AuthError::InvalidToken("bearer token too long")),
            ),
        ];
        for (values, want) in cases {
            let m = h(values);
            assert_eq!(&extract(&m), want, "{values:?}");
        }
    }
}
