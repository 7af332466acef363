//! Wire timestamps: RFC 3339 in UTC with millisecond precision, the shape
//! JavaScript's `Date.toISOString()` produces (`2026-11-25T16:54:19.123Z`).

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset, macros::format_description};

/// A point in time as carried on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

/// Why a string is not a timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timestamp must be RFC 3339, for example 2026-11-25T16:54:19.123Z")]
pub struct TimestampError;

impl Timestamp {
    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }

    /// Truncates to whole milliseconds, the wire's precision, so that a value
    /// survives a round trip through text unchanged.
    pub fn from_system_time(t: SystemTime) -> Self {
        let dt = OffsetDateTime::from(t);
        let millis = dt.millisecond();
        Self(
            dt.replace_nanosecond(u32::from(millis) * 1_000_000)
                .unwrap_or(dt),
        )
    }

    pub fn from_unix_millis(millis: i64) -> Option<Self> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
            .ok()
            .map(Self)
    }

    pub fn unix_millis(&self) -> i64 {
        // Wire timestamps are years 0..9999: milliseconds fit in i64.
        i64::try_from(self.0.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
    }

    pub fn to_system_time(&self) -> SystemTime {
        SystemTime::from(self.0)
    }

    pub fn parse(text: &str) -> Result<Self, TimestampError> {
        OffsetDateTime::parse(text, &Rfc3339)
            .map(|t| Self(t.to_offset(UtcOffset::UTC)))
            .map_err(|_| TimestampError)
    }

    #[must_use]
    pub fn saturating_add(&self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(time::Duration::try_from(d).unwrap_or(time::Duration::MAX)),
        )
    }

    /// `self - earlier`, or zero if `earlier` is later.
    pub fn duration_since(&self, earlier: &Self) -> Duration {
        Duration::try_from(self.0 - earlier.0).unwrap_or(Duration::ZERO)
    }

    /// Signed difference `self - other` in milliseconds.
    pub fn millis_since(&self, other: &Self) -> i64 {
        self.unix_millis() - other.unix_millis()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let format = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        let text = self
            .0
            .to_offset(UtcOffset::UTC)
            .format(&format)
            .map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({self})")
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_javascript_to_iso_string() {
        let t = Timestamp::from_unix_millis(1_764_089_659_123).unwrap();
        assert_eq!(t.to_string(), "2025-11-25T16:54:19.123Z");
        assert_eq!(Timestamp::parse(&t.to_string()).unwrap(), t);
    }

    #[test]
    fn parses_offsets_into_utc() {
        let t = Timestamp::parse("2025-11-25T17:54:19.123+01:00").unwrap();
        assert_eq!(t.to_string(), "2025-11-25T16:54:19.123Z");
        assert!(Timestamp::parse("yesterday").is_err());
    }
}
