//! Times as they travel on the wire: Unix milliseconds (SQLite columns, SQS attributes) and
//! RFC 3339 text (headers). Every conversion from a number a producer could have written is
//! checked: `SystemTime + Duration` panics on overflow, so nothing here adds unchecked.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The latest time accepted from the wire: 9999-12-31, the end of RFC 3339's range.
const MAX_UNIX_SECS: u64 = 253_402_300_799;

/// Milliseconds since the Unix epoch; 0 for a time before it.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the epoch, if it is a plausible time (not negative, not
/// after year 9999).
pub fn checked_from_unix_ms(ms: i64) -> Option<SystemTime> {
    let ms = u64::try_from(ms).ok()?;
    (ms / 1000 <= MAX_UNIX_SECS).then(|| UNIX_EPOCH + Duration::from_millis(ms))
}

/// [`checked_from_unix_ms`], with the epoch for an implausible value (columns we wrote).
pub fn from_unix_ms(ms: i64) -> SystemTime {
    checked_from_unix_ms(ms).unwrap_or(UNIX_EPOCH)
}

/// The time `secs` seconds after the epoch (AMQP timestamps), if plausible.
pub fn checked_from_unix_secs(secs: u64) -> Option<SystemTime> {
    (secs <= MAX_UNIX_SECS).then(|| UNIX_EPOCH + Duration::from_secs(secs))
}

/// Whole seconds since the epoch; 0 for a time before it.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses RFC 3339 text.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(text).ok()
}

/// `t + d`, or `None` where that is past what a `SystemTime` holds.
pub fn checked_add(t: SystemTime, d: Duration) -> Option<SystemTime> {
    t.checked_add(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implausible_numbers_are_refused_not_panicked_on() {
        assert_eq!(checked_from_unix_secs(u64::MAX), None);
        assert_eq!(checked_from_unix_ms(-1), None);
        assert_eq!(checked_from_unix_ms(i64::MAX), None);
        assert_eq!(from_unix_ms(i64::MIN), UNIX_EPOCH);
        let t = checked_from_unix_ms(1_700_000_000_123).unwrap();
        assert_eq!(unix_ms(t), 1_700_000_000_123);
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
