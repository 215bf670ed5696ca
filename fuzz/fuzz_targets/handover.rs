//! The hand-over's decoders: the control messages a successor (any
//! binary) sends the running agent, and the state a running agent sends its
//! successor. Any input is a message or state, or an error; never a panic,
//! and never an allocation the input's size does not bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shepherd::handover::wire;

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode_msg(data);
    let _ = wire::decode_state(data);
    // Behind a valid header too, so that the state's body is reached.
    let mut framed = wire::MAGIC.to_vec();
    framed.extend_from_slice(&wire::PROTOCOL.to_le_bytes());
    framed.extend_from_slice(data);
    let _ = wire::decode_state(&framed);
});
