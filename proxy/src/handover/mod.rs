//! Handing a running agent's state over to its successor (restart and
//! upgrade without losing a connection): [`server`] is the running agent's
//! side, [`client`] the successor's, [`wire`] their messages and the state
//! encoding, [`scm`] the descriptor channel. LIFECYCLE.md tells the
//! sequence, its commit point and what happens when a step fails.
pub mod client;
pub mod scm;
pub mod server;
pub mod wire;
