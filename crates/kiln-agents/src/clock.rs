//! The `current_time` tool: the current UTC time (RFC 3339 and unix
//! seconds), and optionally the local time at a fixed UTC offset.
//!
//! Calendar conversion is done here on `std::time::SystemTime` (proleptic
//! Gregorian, Howard Hinnant's `civil_from_days`), so no date crate is needed.
//! Offsets are fixed (`+05:30`), not time-zone names: the tool knows no
//! daylight-saving rules.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::tool::{parse_args, truncate_for_message, Tool, ToolError, ToolFuture, ToolOutput};

/// Largest offset accepted either side of UTC (real offsets span -12:00 to +14:00).
const MAX_OFFSET_MINUTES: i32 = 14 * 60;

/// A fixed offset from UTC, in minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcOffset {
    minutes: i32,
}

impl UtcOffset {
    pub const UTC: UtcOffset = UtcOffset { minutes: 0 };

    /// Minutes east of UTC.
    pub fn minutes(self) -> i32 {
        self.minutes
    }

    /// Parses `Z`, `+HH:MM`, `-HH:MM`, `+HHMM` or `+HH`, within ±14:00.
    pub fn parse(s: &str) -> Option<UtcOffset> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("z") {
            return Some(Self::UTC);
        }
        let (sign, rest) = match s.as_bytes().first()? {
            b'+' => (1, &s[1..]),
            b'-' => (-1, &s[1..]),
            _ => return None,
        };
        let (hh, mm) = match rest.len() {
            2 => (rest, "00"),
            4 => rest.split_at_checked(2)?,
            5 if rest.as_bytes().get(2) == Some(&b':') => (rest.get(..2)?, rest.get(3..)?),
            _ => return None,
        };
        let two_digits = |t: &str| -> Option<i32> {
            if t.len() == 2 && t.bytes().all(|b| b.is_ascii_digit()) {
                t.parse().ok()
            } else {
                None
            }
        };
        let (h, m) = (two_digits(hh)?, two_digits(mm)?);
        if m >= 60 {
            return None;
        }
        let minutes = sign * (h * 60 + m);
        (minutes.abs() <= MAX_OFFSET_MINUTES).then_some(UtcOffset { minutes })
    }
}

impl fmt::Display for UtcOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.minutes < 0 { '-' } else { '+' };
        let abs = self.minutes.unsigned_abs();
        write!(f, "{sign}{:02}:{:02}", abs / 60, abs % 60)
    }
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are in small ranges shown above.
    (year, month as u32, day as u32)
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Formats unix seconds shifted by `offset` as RFC 3339, with the weekday.
fn rfc3339(unix_seconds: i64, offset: UtcOffset) -> (String, &'static str) {
    let local = unix_seconds + i64::from(offset.minutes) * 60;
    let days = local.div_euclid(86_400);
    let secs = local.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let zone = if offset == UtcOffset::UTC {
        "Z".to_owned()
    } else {
        offset.to_string()
    };
    // 1970-01-01 was a Thursday.
    let weekday = WEEKDAYS[(days + 4).rem_euclid(7) as usize];
    (
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{zone}"),
        weekday,
    )
}

type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The `current_time` tool.
#[derive(Clone)]
pub struct CurrentTime {
    clock: Clock,
}

impl fmt::Debug for CurrentTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CurrentTime").finish_non_exhaustive()
    }
}

impl Default for CurrentTime {
    fn default() -> Self {
        Self::new()
    }
}

impl CurrentTime {
    /// Reads the system clock.
    pub fn new() -> Self {
        Self::with_clock(SystemTime::now)
    }

    /// Reads `clock` instead of the system clock (for tests).
    pub fn with_clock(clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Self {
            clock: Arc::new(clock),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CurrentTimeArgs {
    #[serde(default)]
    utc_offset: Option<String>,
}

impl Tool for CurrentTime {
    fn name(&self) -> &str {
        "current_time"
    }

    fn description(&self) -> &str {
        "Returns the current date and time in UTC (RFC 3339) and as unix seconds. \
         Pass utc_offset (like +05:30 or -08:00) to also get the local time at that offset."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "utc_offset": {
                    "type": "string",
                    "description": "Optional fixed offset from UTC, like +05:30 or -08:00.",
                    "pattern": "^(Z|[+-][0-9]{2}(:?[0-9]{2})?)$",
                }
            },
            "additionalProperties": false,
        })
    }

    fn call<'a>(&'a self, args: &'a Value) -> ToolFuture<'a> {
        Box::pin(async move {
            let args: CurrentTimeArgs = parse_args(args)?;
            let offset = match &args.utc_offset {
                None => None,
                Some(s) => Some(UtcOffset::parse(s).ok_or_else(|| {
                    ToolError::InvalidArguments(format!(
                        "invalid utc_offset `{}`: expected a sign, hours and minutes like \
                         +05:30 or -08:00, between -14:00 and +14:00",
                        truncate_for_message(s, 32)
                    ))
                })?),
            };
            let now = (self.clock)();
            let unix_seconds = match now.duration_since(UNIX_EPOCH) {
                Ok(d) => i64::try_from(d.as_secs()).ok(),
                Err(e) => i64::try_from(e.duration().as_secs()).ok().map(|s| -s),
            }
            .ok_or_else(|| {
                ToolError::RequestFailed("the system clock is out of range".to_owned())
            })?;
            let (utc, utc_weekday) = rfc3339(unix_seconds, UtcOffset::UTC);
            let mut out = json!({
                "utc": utc,
                "unix_seconds": unix_seconds,
                "weekday_utc": utc_weekday,
            });
            if let (Some(offset), Some(map)) = (offset, out.as_object_mut()) {
                let (local, weekday) = rfc3339(unix_seconds, offset);
                map.insert("local".to_owned(), json!(local));
                map.insert("utc_offset".to_owned(), json!(offset.to_string()));
                map.insert("weekday_local".to_owned(), json!(weekday));
            }
            Ok(ToolOutput::text(out.to_string()))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(
            rfc3339(1_714_566_896, UtcOffset::UTC),
            ("2024-05-01T12:34:56Z".to_owned(), "Wednesday")
        );
        let ist = UtcOffset::parse("+05:30").unwrap();
        assert_eq!(rfc3339(1_714_566_896, ist).0, "2024-05-01T18:04:56+05:30");
        let pst = UtcOffset::parse("-08:00").unwrap();
        assert_eq!(
            rfc3339(1_714_520_000, pst),
            ("2024-04-30T15:33:20-08:00".to_owned(), "Tuesday")
        );
        assert_eq!(rfc3339(-1, UtcOffset::UTC).0, "1969-12-31T23:59:59Z");
    }

    #[test]
    fn parses_offsets() {
        let p = |s: &str| UtcOffset::parse(s).map(UtcOffset::minutes);
        assert_eq!(p("+05:30"), Some(330));
        assert_eq!(p("-08:00"), Some(-480));
        assert_eq!(p("+0545"), Some(345));
        assert_eq!(p("-03"), Some(-180));
        assert_eq!(p("Z"), Some(0));
        assert_eq!(p("+14:00"), Some(840));
        for bad in [
            "",
            "+",
            "05:30",
            "+5:30",
            "+05:60",
            "+15:00",
            "+05:3",
            "+05-30",
            "+0a:00",
            "+05:30:00",
            "UTC+1",
            "+٠٥:٣٠",
            "-+5:00",
        ] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn tool_output() {
        let tool = CurrentTime::with_clock(|| UNIX_EPOCH + Duration::from_secs(1_714_566_896));
        let out = tool.call(&json!({})).await.unwrap();
        let v: Value = serde_json::from_str(&out.text).unwrap();
        assert_eq!(v["utc"], "2024-05-01T12:34:56Z");
        assert_eq!(v["unix_seconds"], 1_714_566_896);
        assert!(v.get("local").is_none());

        let out = tool.call(&json!({"utc_offset": "+05:30"})).await.unwrap();
        let v: Value = serde_json::from_str(&out.text).unwrap();
        assert_eq!(v["local"], "2024-05-01T18:04:56+05:30");
        assert_eq!(v["utc_offset"], "+05:30");

        let err = tool
            .call(&json!({"utc_offset": "+25:00"}))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("invalid utc_offset `+25:00`"));
        let err = tool.call(&json!({"utc_offset": 5})).await.unwrap_err();
        assert_eq!(err.code(), "invalid_arguments");
    }

    #[tokio::test]
    async fn real_clock_is_plausible() {
        let out = CurrentTime::new().call(&json!({})).await.unwrap();
        let v: Value = serde_json::from_str(&out.text).unwrap();
        assert!(v["unix_seconds"].as_i64().unwrap() > 1_700_000_000);
    }
}
