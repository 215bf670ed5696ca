//! The hand-over protocol's messages and its state encoding.
//!
//! Control messages are small JSON documents, one per `SOCK_SEQPACKET`
//! packet. The state (every connection's buffered bytes included) is
//! encoded once, with [`encode_state`], into an anonymous memory file
//! whose descriptor is passed like the sockets': client payload never
//! touches a disk. Both decoders take untrusted bytes (a successor may be
//! any binary) and answer malformed input with an error, never a panic;
//! `fuzz/fuzz_targets/handover.rs` holds them to it.
use crate::control::snapshot::ControlState;
use crate::endpoint::EndpointSnapshot;
use crate::relay::snapshot::ConnState;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::SystemTime;

/// The hand-over protocol this build speaks. Any change to a message, to
/// [`State`] or to the kernel maps' layout changes it: a successor and a
/// predecessor must speak the same one, or the hand-over is refused and
/// the running agent keeps serving.
pub const PROTOCOL: u32 = 2;

/// The most descriptors a hand-over may announce: two per connection at
/// the most connections an agent can hold, and a few more.
pub const MAX_DESCRIPTORS: usize = 2 * 1_048_576 + 64;

/// The largest state a successor reads (a hand-over carries at most the
/// hold budget's bytes and a little per connection).
pub const MAX_STATE_BYTES: u64 = 64 << 30;

/// The largest control message.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What starts a state encoding.
pub const MAGIC: &[u8; 8] = b"SHPHRDHO";

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Msg {
    /// Successor → running agent: who it is.
    Hello {
        protocol: u32,
        version: String,
        pid: u32,
    },
    /// Running agent → successor: it will hand over. The descriptors of
    /// its maps and links follow (see [`Kernel`]), for the successor to
    /// load its programs with.
    Welcome {
        protocol: u32,
        version: String,
        kernel: Kernel,
    },
    /// Successor → running agent: its programs are loaded; freeze and send
    /// the state.
    Ready,
    /// Running agent → successor: it will not hand over, and why. It keeps
    /// serving.
    Refused { reason: String },
    /// Running agent → successor: the state follows, in a memory file
    /// sent with the `descriptors` that [`State`] lists (first, then them).
    State { descriptors: usize },
    /// Successor → running agent: everything arrived and is ready; the
    /// running agent may let go. Its receipt is the commit point.
    Commit,
    /// Running agent → successor: it let go, and exits.
    Done,
    /// Either way: the hand-over failed before the commit point, and why.
    Failed { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the peer closed the hand-over channel")]
    Closed,
    #[error("hand-over channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed hand-over message: {0}")]
    Malformed(String),
}

/// Sends one control message.
pub fn send(chan: BorrowedFd<'_>, msg: &Msg) -> Result<(), WireError> {
    let bytes = serde_json::to_vec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    // SAFETY: writes `bytes.len()` bytes from a live buffer to a descriptor
    // we borrow for the call.
    let n = unsafe { libc::send(chan.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Receives one control message (waiting at most the socket's receive
/// timeout).
pub fn recv(chan: BorrowedFd<'_>) -> Result<Msg, WireError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    // SAFETY: reads at most `buf.len()` bytes into a live buffer.
    let n = unsafe {
        libc::recv(
            chan.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let n = n as usize;
    if n == 0 {
        return Err(WireError::Closed);
    }
    if n > buf.len() {
        return Err(WireError::Malformed(format!(
            "a {n}-byte message (at most {MAX_MESSAGE})"
        )));
    }
    decode_msg(&buf[..n])
}

/// Decodes one control message.
pub fn decode_msg(bytes: &[u8]) -> Result<Msg, WireError> {
    serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

/// A tcx link handed over: which program on which interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkPin {
    pub program: String,
    pub iface: String,
    pub ingress: bool,
}

/// The eBPF maps and links handed over. Their descriptors follow the
/// `Welcome`: the maps', then the links', in these lists' order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kernel {
    pub maps: Vec<String>,
    pub links: Vec<LinkPin>,
    /// The maps' sizes (they keep them: the successor's flags do not
    /// resize a map that exists).
    pub max_endpoints: u32,
    pub max_translations: u32,
    pub max_proxied_flows: u32,
    /// A hash of the running agent's eBPF object: a successor with the
    /// same object keeps the programs already in the links (see
    /// `EbpfInterception::adopt`).
    pub object: u64,
}

/// One connection, and whether a backend descriptor follows its client's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conn {
    pub state: ConnState,
    pub backend_fd: bool,
    /// Its endpoint was removed and drains (one registered again at the
    /// same address is another endpoint).
    pub draining: bool,
}

/// Everything a hand-over carries besides descriptors. Descriptors follow
/// in this order: the lock file, the lock's abstract socket (if
/// `lock_listener`), the API socket, the `listeners`, then each
/// connection's client and (if `backend_fd`) backend socket.
#[derive(Serialize, Deserialize)]
pub struct State {
    pub version: String,
    /// When the agent that serves now started, and how many hand-overs
    /// came before this one.
    pub started: SystemTime,
    pub handovers: u64,
    pub control: ControlState,
    /// Removed endpoints whose connections still drain.
    pub draining: Vec<EndpointSnapshot>,
    pub conns: Vec<Conn>,
    pub listeners: usize,
    pub lock_listener: bool,
}

impl State {
    /// How many descriptors follow the state.
    pub fn descriptors(&self) -> usize {
        2 + usize::from(self.lock_listener)
            + self.listeners
            + self
                .conns
                .iter()
                .map(|c| 1 + usize::from(c.backend_fd))
                .sum::<usize>()
    }
}

/// Encodes the state: a magic, the protocol, then the state (postcard).
pub fn encode_state(state: &State) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(64 * 1024);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&PROTOCOL.to_le_bytes());
    let body = postcard::to_stdvec(state).map_err(|e| WireError::Malformed(e.to_string()))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes what [`encode_state`] made, refusing anything else: another
/// protocol, a truncated or padded body, values out of range.
pub fn decode_state(bytes: &[u8]) -> Result<State, WireError> {
    let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
        return Err(WireError::Malformed("not a hand-over state".into()));
    };
    let (version, body) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| WireError::Malformed("truncated header".into()))?;
    let protocol = u32::from_le_bytes(*version);
    if protocol != PROTOCOL {
        return Err(WireError::Malformed(format!(
            "state of protocol {protocol}, this agent reads {PROTOCOL}"
        )));
    }
    let (state, left): (State, &[u8]) =
        postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !left.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} bytes after the state",
            left.len()
        )));
    }
    for c in &state.conns {
        let s = &c.state;
        if s.held > s.up.bytes.len() {
            return Err(WireError::Malformed(format!(
                "connection {}: {} bytes held of {} queued",
                s.id,
                s.held,
                s.up.bytes.len()
            )));
        }
    }
    if state.listeners == 0 || state.listeners > shepherd_common::MAX_LISTENERS as usize {
        return Err(WireError::Malformed(format!(
            "{} listeners",
            state.listeners
        )));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::snapshot::DirectionState;

    fn state(conns: usize) -> State {
        State {
            version: "0.0.0".into(),
            started: SystemTime::UNIX_EPOCH,
            handovers: 2,
            control: ControlState::default(),
            draining: Vec::new(),
            conns: (0..conns)
                .map(|i| Conn {
                    backend_fd: i % 2 == 0,
                    draining: false,
                    state: ConnState {
                        id: i as u64,
                        client: "10.0.0.1:40000".parse().expect("addr"),
                        orig_dst: "10.0.0.2:80".parse().expect("addr"),
                        opened: SystemTime::UNIX_EPOCH,
                        backend: None,
                        bytes_up: 5,
                        bytes_down: 3,
                        bytes_spliced: 0,
                        quiesced_epoch: 1,
                        translation: Default::default(),
                        up: DirectionState {
                            bytes: vec![i as u8; 5],
                            ..Default::default()
                        },
                        down: DirectionState {
                            bytes: b"abc".to_vec(),
                            eof: true,
                            ..Default::default()
                        },
                        held: 5,
                        replay: Some((1, 5)),
                        reconnects_seen: 0,
                        ended_in_hold: None,
                        splice: true,
                    },
                })
                .collect(),
            listeners: 2,
            lock_listener: true,
        }
    }

    #[test]
    fn a_state_round_trips_and_counts_its_descriptors() {
        let s = state(3);
        assert_eq!(s.descriptors(), 2 + 1 + 2 + 3 + 2);
        let bytes = encode_state(&s).expect("encode");
        let back = decode_state(&bytes).expect("decode");
        assert_eq!(back.conns, s.conns);
        assert_eq!(back.handovers, 2);
    }

    #[test]
    fn malformed_states_are_refused() {
        let bytes = encode_state(&state(2)).expect("encode");
        // Truncated anywhere, padded, another protocol, not a state.
        for cut in [0, 4, 8, 12, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode_state(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(decode_state(&padded).is_err());
        let mut other = bytes.clone();
        other[8] = other[8].wrapping_add(1);
        let e = decode_state(&other).err().expect("refused").to_string();
        assert!(e.contains("protocol"), "{e}");
        // More bytes held than queued.
        let mut s = state(1);
        s.conns[0].state.held = 99;
        let bad = encode_state(&s).expect("encode");
        assert!(decode_state(&bad).is_err());
    }

    #[test]
    fn messages_decode_or_are_refused() {
        let m = Msg::Hello {
            protocol: PROTOCOL,
            version: "1".into(),
            pid: 7,
        };
        let j = serde_json::to_vec(&m).expect("json");
        assert_eq!(decode_msg(&j).expect("decode"), m);
        for bad in [&b""[..], b"{", b"{\"msg\":\"hello\"}", b"\xff\xfe", b"[]"] {
            assert!(decode_msg(bad).is_err(), "{bad:?}");
        }
    }

    /// Writes the fuzz target's seeds (`cargo test -p shepherd --lib
    /// write_fuzz_seeds -- --ignored`).
    #[test]
    #[ignore]
    fn write_fuzz_seeds() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/handover");
        std::fs::create_dir_all(dir).expect("corpus dir");
        let bytes = encode_state(&state(3)).expect("encode");
        std::fs::write(format!("{dir}/state-3-conns"), &bytes[12..]).expect("write");
        for (name, m) in [
            (
                "hello",
                Msg::Hello {
                    protocol: PROTOCOL,
                    version: "0.1.0".into(),
                    pid: 1,
                },
            ),
            ("ready", Msg::Ready),
            ("commit", Msg::Commit),
            ("state", Msg::State { descriptors: 12 }),
            ("failed", Msg::Failed { reason: "x".into() }),
        ] {
            std::fs::write(
                format!("{dir}/msg-{name}"),
                serde_json::to_vec(&m).expect("json"),
            )
            .expect("write");
        }
    }
}
