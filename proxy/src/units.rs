//! Parsing of human-written durations ("30s", "500ms", "2m") and sizes
//! ("16MiB", "4096", "1G"), used by the CLI and the config.
use std::time::Duration;

/// Parses "500ms", "2s", "1.5s", "3m", or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use e.g. 500ms, 30s or 2m"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("invalid duration {s:?}: must be a positive number"));
    }
    // Not `from_secs_f64`, which panics past u64::MAX seconds (found by
    // fuzzing: " 5555…5" as a duration).
    Duration::try_from_secs_f64(v * scale).map_err(|_| format!("invalid duration {s:?}: too long"))
}

/// Parses "4096", "64KiB", "16MiB", "1GiB" (also K/M/G, KB/MB/GB as binary).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("invalid size {s:?}: use e.g. 4096, 64KiB, 16MiB")),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: use e.g. 4096, 64KiB, 16MiB"))?;
    let bytes = v * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > usize::MAX as f64 {
        return Err(format!("invalid size {s:?}: out of range"));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        // Found by fuzzing: this used to panic (overflow in from_secs_f64).
        assert!(parse_duration(" 555555555555555555555555555").is_err());
        assert!(parse_duration("1e300m").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }
}
