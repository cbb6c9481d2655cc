//! The request pipeline, one module per stage, in the order README.md numbers them.
//!
//! The driver is [`Gateway::handle`] (in [`gateway`]); the stages it runs are below.

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
