//! fhirgate: a mutual-TLS security gateway for NHS FHIR APIs.
//!
//! Crate map (README.md "What the gateway does to a request" gives the stage numbers):
//! - [`server`]: the process side: accept loop, TLS handshake, per-connection serving,
//!   config snapshots, lifecycle (signals, reload, readiness) and the admin listener.
//! - [`pipeline`]: the request pipeline, one module per stage, in README order.
//! - [`config`]: the only reader of YAML (root `Config`, load, cross-section checks);
//!   each section's type lives with its stage and is re-exported there; [`lint`] judges a
//!   loaded config.
//! - [`tls`], [`revocation`], [`watch`]: trust material, CRLs and file watching, shared by
//!   the server and every outbound client.
//! - [`metrics`], [`logging`], `otlp` (feature `otlp`): what the gateway reports.
//! - `tools` (feature `tools`, on by default): development and sender tools (dev PKI,
//!   dev authorisation server, sender client, demo, certificate inspection); not needed
//!   to run the gateway.

pub mod config;
pub mod lint;
pub mod logging;
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod pipeline;
pub mod revocation;
pub mod server;
pub mod tls;
#[cfg(feature = "tools")]
pub mod tools;
pub mod watch;
