//! The CLI's values and the API's scalar fields: sizes, durations,
//! endpoints, migration ids, release modes. Any input gets a value or an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = shepherd::units::parse_size(s);
    let _ = shepherd::units::parse_duration(s);
    let _ = s.parse::<shepherd::endpoint::EndpointAddr>();
    let _ = s.parse::<shepherd::migration::ReleaseMode>();
    let _ = shepherd::migration::validate_id(s);
    let ms = data
        .iter()
        .take(8)
        .fold(0u64, |a, b| a.wrapping_shl(8) | u64::from(*b));
    let _ = shepherd::migration::bounded_ms("deadline_ms", Some(ms), shepherd::migration::MAX_DEADLINE, false);
});
