//! UTC calendar periods (Day, Monday-week, Month) as used by quotas: the number of the period containing an instant
//! and when it ends. Shared by the proxy's local counters and by the keys of the shared store (the controller reads
//! them for `status.usage`), so both sides agree on where a period starts.

use crate::Period;

/// Nominal length of a period in seconds, for the `w=` of `RateLimit-Policy`.
pub fn period_secs(p: Period) -> u64 {
    match p {
        Period::Day => 86_400,
        Period::Week => 7 * 86_400,
        Period::Month => 30 * 86_400,
    }
}

fn days(now: i64) -> i64 {
    now.div_euclid(86_400)
}

/// Sequential number of the UTC period containing `now` (days / Monday-weeks / months since 1970).
pub fn period_number(p: Period, now: i64) -> u64 {
    let d = days(now).max(0);
    match p {
        Period::Day => d as u64,
        // 1970-01-01 was a Thursday: day 4 (1970-01-05) is the first Monday.
        Period::Week => ((d + 3) / 7) as u64,
        Period::Month => {
            let (y, m, _) = civil_from_days(d);
            ((y - 1970) * 12 + (m as i64 - 1)) as u64
        }
    }
}

/// Unix seconds at which the period containing `now` ends.
pub fn period_end(p: Period, now: i64) -> i64 {
    let d = days(now).max(0);
    match p {
        Period::Day => (d + 1) * 86_400,
        Period::Week => {
            let w = (d + 3) / 7;
            ((w + 1) * 7 - 3) * 86_400
        }
        Period::Month => {
            let (y, m, _) = civil_from_days(d);
            let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            days_from_civil(y, m, 1) * 86_400
        }
    }
}

// Howard Hinnant's civil-date algorithms (proleptic Gregorian), days relative to 1970-01-01.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    fn ts(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_second()
    }

    #[test]
    fn periods_are_utc_calendar_periods() {
        let now = ts("2026-02-18T13:00:00Z"); // a Wednesday
        assert_eq!(period_end(Period::Day, now), ts("2026-02-19T00:00:00Z"));
        assert_eq!(period_end(Period::Week, now), ts("2026-02-23T00:00:00Z"));
        assert_eq!(period_end(Period::Month, now), ts("2026-03-01T00:00:00Z"));
        assert_eq!(period_end(Period::Month, ts("2026-12-31T23:59:59Z")), ts("2027-01-01T00:00:00Z"));
        assert_eq!(period_end(Period::Week, ts("2026-02-23T00:00:00Z")), ts("2026-03-02T00:00:00Z"));
        assert_eq!(period_end(Period::Week, ts("2026-02-22T23:59:59Z")), ts("2026-02-23T00:00:00Z"));
        assert_ne!(
            period_number(Period::Month, ts("2026-01-31T23:59:59Z")),
            period_number(Period::Month, ts("2026-02-01T00:00:00Z"))
        );
        assert_eq!(
            period_number(Period::Month, ts("2024-02-01T00:00:00Z")),
            period_number(Period::Month, ts("2024-02-29T23:59:59Z"))
        );
    }

    #[test]
    fn civil_round_trip() {
        for d in (0..200_000).step_by(7) {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }
}
