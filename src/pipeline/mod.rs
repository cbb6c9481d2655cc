//! The request pipeline: one module per stage, run in the order README.md numbers them
//! ("What the gateway does to a request"). Stages 1-3 run once per connection in
//! [`crate::server`] (accept, TLS handshake with [`crate::tls`], [`identity`]); every
//! request on that connection then goes through [`Gateway::run`] below, which first
//! checks that the connection's certificate has not lapsed since.
//!
//! The route is decided first because it says which later checks apply; a client whose
//! certificate may not use the route is refused before it can cost an introspection
//! call. A refusal at any stage is a [`outcome::Rejection`], turned into an
//! `OperationOutcome` (stage 8) by [`Gateway::handle`] (in [`gateway`]), which also
//! writes the access line and the metrics of every request.

pub mod auth;
pub mod forward;
pub mod gateway;
pub mod identity;
pub mod nhsd;
pub mod outcome;
pub mod policy;
pub mod service;
pub mod tracecontext;
pub mod upstream;

pub use gateway::{ConnInfo, Gateway};

use http::{Request, Response};

use gateway::Trace;
use outcome::{Body, Rejection};
use service::LimitKey;

impl Gateway {
    /// Stages 4 to 7 for one request (the connection's client identity in `conn`, whose
    /// certificate is checked again first).
    async fn run<'g>(
        &'g self,
        mut req: Request<Body>,
        conn: &ConnInfo,
        trace: &mut Trace<'g>,
    ) -> Result<Response<Body>, Rejection> {
        conn.certificate_still_valid()?; // 3. identity, again: not expired, not revoked since
        self.hygiene(&req)?; // CONNECT, Host, header count and size
        let route = self.route(&req, conn, trace)?; // 4. policy
        let levels = self.levels.of(Some(&route.name));
        // Certificate-keyed rate limits before the token, so a flood costs no introspection.
        self.rate_limit(levels, &route.name, conn, None, LimitKey::Fingerprint)?;
        let token = self.token(route, &mut req, conn, trace).await?; // 5. token
        let client_id = token.as_ref().and_then(|t| t.client_id.as_deref());
        self.rate_limit(levels, &route.name, conn, client_id, LimitKey::ClientId)?;
        let facts = self.check_nhsd(route, &req)?; // 6. NHSD headers
        trace.ods_code = facts.as_ref().and_then(|f| f.ods_code.clone());
        service::check_accept(req.headers(), &levels.accept_versions)?; // Accept version
        let req = self.body(req, route).await?; // body limit, RFC 6750 §2.2 form token
        let (out, body_done) =
            self.upstream_request(req, route, conn, trace, token.as_deref(), facts.as_ref())?; // 7. forward
        self.send(out, body_done, conn.upstream.as_ref(), trace)
            .await // 7. upstream
    }
}
