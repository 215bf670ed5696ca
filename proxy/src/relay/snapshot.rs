//! What one relayed connection is, apart from its two sockets: the state a
//! hand-over carries to the next agent, which rebuilds the connection from
//! it ([`super::connection::resume`]). Plain data; the hand-over encodes it.
use crate::endpoint::FlowTranslation;
use serde::{Deserialize, Serialize};
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;
use std::time::SystemTime;

/// One direction's bytes read and not yet written (a splice pipe's
/// included: a freeze takes them back into user space first), and how its
/// two ends stand.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionState {
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    pub eof: bool,
    pub shut: bool,
    pub bulk: bool,
}

/// How the pod's end of the backend connection ended during a hold, if it
/// did (the release decides what the client sees).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndedInHold {
    Fin,
    /// A reset or an error, with what failed.
    Failed(String),
}

/// A relayed connection's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnState {
    pub id: u64,
    pub client: SocketAddr,
    pub orig_dst: SocketAddrV4,
    pub opened: SystemTime,
    /// The backend socket's local address and the pod address it reaches.
    pub backend: Option<(SocketAddr, SocketAddrV4)>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub bytes_spliced: u64,
    pub quiesced_epoch: u64,
    pub translation: FlowTranslation,
    /// Client → pod: the hold buffer.
    pub up: DirectionState,
    /// Pod → client.
    pub down: DirectionState,
    /// Of `up`, the bytes held (charged to the node's budget): its front.
    pub held: usize,
    /// The hold whose replay is in progress (its epoch) and how many of its
    /// bytes are still at the front of `up`.
    pub replay: Option<(u64, usize)>,
    pub reconnects_seen: u64,
    pub ended_in_hold: Option<EndedInHold>,
    /// Forwards with splice when it can.
    pub splice: bool,
}

/// A frozen connection: its state and its sockets' descriptors, which stay
/// open (the connection's task keeps them) until the hand-over is decided.
#[derive(Debug)]
pub struct ConnSnapshot {
    pub state: ConnState,
    /// Its endpoint (a removed one still draining included).
    pub endpoint: std::sync::Arc<crate::endpoint::EndpointState>,
    pub client: RawFd,
    pub backend: Option<RawFd>,
}
