//! The one duration syntax of unwedge: what the CRD's duration fields accept
//! (`^([0-9]+(ms|s|m|h))+$`: `90s`, `10m`, `1h30m`, `250ms`), also used by the agent's flags.

use std::time::Duration;

/// Parses `1h30m`, `90s`, `250ms` (the CRD's pattern); `None` for anything else or an overflow.
pub fn parse(s: &str) -> Option<Duration> {
    let b = s.as_bytes();
    if b.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return None;
        }
        let n: u64 = s[start..i].parse().ok()?;
        let unit = if s[i..].starts_with("ms") {
            i += 2;
            Duration::from_millis(n)
        } else if s[i..].starts_with('s') {
            i += 1;
            Duration::from_secs(n)
        } else if s[i..].starts_with('m') {
            i += 1;
            Duration::from_secs(n.checked_mul(60)?)
        } else if s[i..].starts_with('h') {
            i += 1;
            Duration::from_secs(n.checked_mul(3600)?)
        } else {
            return None;
        };
        total = total.checked_add(unit)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_the_crd_pattern() {
        assert_eq!(parse("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse("1m30s500ms"), Some(Duration::from_millis(90_500)));
        for bad in [
            "",
            "10",
            "m",
            "1d",
            "1h 2m",
            "-1s",
            "1.5s",
            "99999999999999999999h",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
