//! The integration tests: one binary, one module per concern, one harness by role
//! (`harness/`). The catalogue, with what each module covers and the spec clauses it
//! quotes, is docs/security-testing.md.
//!
//! The modules share one process: a test that changes process-wide state (environment,
//! current directory, the panic hook) or needs tight timing takes a lock from
//! [`harness`] rather than assuming it runs alone.

mod harness;

mod auth;
mod cli;
mod config;
mod crl_fetch;
mod demo;
mod deploy;
mod faults;
mod fuzz_props;
mod gateway;
mod hostile_http;
mod hostile_tls;
mod hygiene;
mod idle;
mod nhsd;
mod oidc;
mod path_props;
mod pinned;
mod reload;
mod service;
mod shell;
mod trust;
