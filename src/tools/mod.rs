//! Development and sender tools, behind the default-on cargo feature `tools`:
//! `cargo build --release --no-default-features` builds the gateway without them.

pub mod client;
pub mod demo;
pub mod devauth;
pub mod devstack;
pub mod inspect;
pub mod pki;
pub mod sender;
