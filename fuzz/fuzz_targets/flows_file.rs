//! `migrate incoming --flows-from FILE`: the origin's status, as a
//! controller copies it between nodes. Any file gets the flows or an error
//! that says what to pass, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = shepherd::api::types::flows_from_status(s, "FILE");
});
