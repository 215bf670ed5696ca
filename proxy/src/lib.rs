//! Shepherd: a node agent that keeps clients' TCP connections alive while the
//! pod behind them is live-migrated.
//!
//! Data flows interception → relay → hold buffer → replay:
//! - [`intercept`] loads the eBPF programs and installs the local-delivery
//!   policy route, so SYNs to managed endpoints reach [`transport::listener`];
//! - [`relay`] moves bytes between each client and its backend connection,
//!   queueing client bytes in a [`relay::hold_buffer`] while the endpoint is
//!   held and replaying them on release;
//! - [`control`] owns endpoints and migrations (the one implementation of every
//!   operation), which [`api`] exposes over HTTP; the `shepherd` binary holds
//!   the CLI and the agent's wiring.
pub mod api;
pub mod config;
pub mod control;
pub mod endpoint;
pub mod error;
pub mod flow_translation;
pub mod handover;
pub mod intercept;
pub mod memory;
pub mod migration;
pub mod private_dir;
pub mod relay;
pub mod single_instance;
pub mod transport;
pub mod units;
