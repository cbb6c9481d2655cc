//! One test harness, by role. Every test module imports it whole (`use crate::harness::*`).
//!
//! - [`pki`]: development PKIs, rcgen ([`Pki`]) and the openssl CLI ([`OpensslPki`]);
//! - [`gateway`]: the gateway under test, its config, and its metrics;
//! - [`clients`]: rustls/hyper clients, raw HTTP/1.1 exchanges, hand-made HTTP/2 frames;
//! - [`upstreams`]: recording, raw and dead upstreams;
//! - [`authserver`]: the one stub authorisation server (RFC 7662, discovery, JWKS);
//! - [`process`]: the real binary as a process (`fhirgate ARGS`, `fhirgate run`), free ports;
//! - [`panics`]: panics anywhere in the process, counted.
#![allow(dead_code, unused_imports)]

pub mod authserver;
pub mod clients;
pub mod gateway;
pub mod panics;
pub mod percent;
pub mod pki;
pub mod process;
pub mod upstreams;

pub use authserver::*;
pub use clients::*;
pub use gateway::*;
pub use panics::*;
pub use pki::*;
pub use process::*;
pub use upstreams::*;
