//! fhirgate: a mutual-TLS security gateway for NHS FHIR APIs.
//!
//! A request flows through one module per stage:
//! [`listener`] (TCP + TLS handshake) → [`identity`] (verified client certificate) →
//! [`policy`] (route policy) → [`forward`] (upstream) → response; every refusal becomes
//! a FHIR `OperationOutcome` in [`outcome`]. [`config`] is the only reader of YAML.

pub mod admin;
pub mod auth;
pub mod client;
pub mod config;
pub mod devauth;
pub mod devstack;
pub mod forward;
pub mod gateway;
pub mod identity;
pub mod inspect;
pub mod lint;
pub mod listener;
pub mod metrics;
pub mod nhsd;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod outcome;
pub mod pki;
pub mod policy;
pub mod revocation;
pub mod service;
pub mod tls;
pub mod tracecontext;
pub mod upstream;
pub mod watch;
