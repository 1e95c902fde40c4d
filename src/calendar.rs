//! Business time: when a wait of N hours that starts now ends, counting
//! only opening hours in the support team's time zone, skipping holidays.
//! Pure. Intervals are turned into UTC instants before they are measured,
//! so a day with a daylight-saving change has its real length.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// An open interval of a day, in local time.
pub type Range = (NaiveTime, NaiveTime);

/// Opening hours; `None` hours means 24/7.
#[derive(Debug, Clone, PartialEq)]
pub struct Calendar {
    pub tz: Tz,
    /// Per weekday (Monday = 0), the open intervals in local time.
    pub hours: Option<[Vec<Range>; 7]>,
    pub holidays: BTreeSet<NaiveDate>,
}

/// How far ahead we look for opening hours before giving up.
const MAX_DAYS: i64 = 3 * 366;

impl Calendar {
    pub fn always(tz: Tz) -> Calendar {
        Calendar {
            tz,
            hours: None,
            holidays: BTreeSet::new(),
        }
    }

    /// The instant a wait of `d` business time starting at `start` ends.
    pub fn add(&self, start: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
        let Some(hours) = &self.hours else {
            return start + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        };
        let mut remaining = chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        let mut day = start.with_timezone(&self.tz).date_naive();
        for _ in 0..MAX_DAYS {
            if !self.holidays.contains(&day) {
                let wd = day.weekday().num_days_from_monday() as usize;
                for (open, close) in &hours[wd] {
                    let a = self.instant(day.and_time(*open));
                    let b = self.instant(day.and_time(*close));
                    let from = a.max(start);
                    if b <= from {
                        continue;
                    }
                    let avail = b - from;
                    if remaining <= avail {
                        return from + remaining;
                    }
                    remaining -= avail;
                }
            }
            match day.succ_opt() {
                Some(d) => day = d,
                None => break,
            }
        }
        // No opening hours within years (validation prevents this): do
        // not pretend, count wall-clock time instead.
        start + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
    }

    /// Business time between two instants (for "how long they waited").
    pub fn between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Duration {
        if to <= from {
            return Duration::ZERO;
        }
        let Some(hours) = &self.hours else {
            return (to - from).to_std().unwrap_or(Duration::ZERO);
        };
        let mut total = chrono::Duration::zero();
        let mut day = from.with_timezone(&self.tz).date_naive();
        let last = to.with_timezone(&self.tz).date_naive();
        while day <= last {
            if !self.holidays.contains(&day) {
                let wd = day.weekday().num_days_from_monday() as usize;
                for (open, close) in &hours[wd] {
                    let a = self.instant(day.and_time(*open)).max(from);
                    let b = self.instant(day.and_time(*close)).min(to);
                    if b > a {
                        total += b - a;
                    }
                }
            }
            match day.succ_opt() {
                Some(d) => day = d,
                None => break,
            }
        }
        total.to_std().unwrap_or(Duration::ZERO)
    }

    /// A local wall-clock time as an instant. A time skipped by a
    /// spring-forward change becomes the first instant after the gap; a
    /// repeated one (fall-back) its first occurrence.
    fn instant(&self, local: NaiveDateTime) -> DateTime<Utc> {
        let mut t = local;
        for _ in 0..4 {
            match self.tz.from_local_datetime(&t) {
                LocalResult::Single(x) => return x.with_timezone(&Utc),
                LocalResult::Ambiguous(a, _) => return a.with_timezone(&Utc),
                LocalResult::None => t += chrono::Duration::minutes(30),
            }
        }
        Utc.from_utc_datetime(&local)
    }
}

/// Parses `mon-fri 09:00-17:30` (also `sat 10:00-14:00`, `mon,wed ...`,
/// several time ranges separated by commas: `mon-fri 09:00-12:00,13:00-17:00`).
pub fn parse_hours(spec: &str) -> Result<(Vec<usize>, Vec<Range>), String> {
    let (days, times) = spec
        .trim()
        .split_once(char::is_whitespace)
        .ok_or_else(|| format!("{spec:?}: write days and times, like \"mon-fri 09:00-17:30\""))?;
    let names = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let day = |s: &str| {
        names
            .iter()
            .position(|n| s.trim().eq_ignore_ascii_case(n))
            .ok_or_else(|| format!("{s:?} is not a day; use mon, tue, wed, thu, fri, sat, sun"))
    };
    let mut out_days = Vec::new();
    for part in days.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                if a > b {
                    return Err(format!("{part:?}: the first day must come first"));
                }
                out_days.extend(a..=b);
            }
            None => out_days.push(day(part)?),
        }
    }
    let time = |s: &str| {
        NaiveTime::parse_from_str(s.trim(), "%H:%M")
            .map_err(|_| format!("{s:?} is not a time; write HH:MM"))
    };
    let mut ranges = Vec::new();
    for part in times.split(',') {
        let (a, b) = part
            .split_once('-')
            .ok_or_else(|| format!("{part:?}: write a range like 09:00-17:30"))?;
        let (a, b) = (
            time(a)?,
            if b.trim() == "24:00" {
                NaiveTime::MIN
            } else {
                time(b)?
            },
        );
        if b != NaiveTime::MIN && b <= a {
            return Err(format!("{part:?}: the range must end after it starts"));
        }
        // 24:00 is the end of the day: the last representable instant.
        let b = if b == NaiveTime::MIN {
            NaiveTime::from_hms_opt(23, 59, 59).unwrap_or(a)
        } else {
            b
        };
        ranges.push((a, b));
    }
    Ok((out_days, ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn berlin(hours: &[&str], holidays: &[&str]) -> Calendar {
        cal("Europe/Berlin", hours, holidays)
    }

    fn cal(tz: &str, hours: &[&str], holidays: &[&str]) -> Calendar {
        let mut week: [Vec<(NaiveTime, NaiveTime)>; 7] = Default::default();
        for h in hours {
            let (days, ranges) = parse_hours(h).unwrap();
            for d in days {
                week[d].extend(ranges.iter().copied());
            }
        }
        Calendar {
            tz: tz.parse().unwrap(),
            hours: Some(week),
            holidays: holidays.iter().map(|d| d.parse().unwrap()).collect(),
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn h(n: u64) -> Duration {
        Duration::from_secs(n * 3600)
    }

    #[test]
    fn without_hours_it_is_wall_clock() {
        let c = Calendar::always(chrono_tz::UTC);
        assert_eq!(
            c.add(at("2026-11-21T22:00:00Z"), h(4)),
            at("2026-11-22T02:00:00Z")
        );
    }

    #[test]
    fn within_a_day_and_over_the_night() {
        let c = berlin(&["mon-fri 09:00-17:30"], &[]);
        // Monday 10:00 CET + 4h = 14:00 CET.
        assert_eq!(
            c.add(at("2026-11-23T09:00:00Z"), h(4)),
            at("2026-11-23T13:00:00Z")
        );
        // Monday 16:00 CET + 4h: 1.5h today, 2.5h Tuesday from 09:00 → 11:30.
        assert_eq!(
            c.add(at("2026-11-23T15:00:00Z"), h(4)),
            at("2026-11-24T10:30:00Z")
        );
        // Mail at night starts counting at opening time.
        assert_eq!(
            c.add(at("2026-11-23T23:00:00Z"), h(1)),
            at("2026-11-24T09:00:00Z")
        );
    }

    #[test]
    fn weekends_are_skipped() {
        let c = berlin(&["mon-fri 09:00-17:30"], &[]);
        // Friday 17:00 CET + 1h: 30 min Friday, 30 min Monday.
        assert_eq!(
            c.add(at("2026-11-27T16:00:00Z"), h(1)),
            at("2026-11-30T08:30:00Z")
        );
        // Saturday mail: Monday 09:00 + 2h.
        assert_eq!(
            c.add(at("2026-11-28T12:00:00Z"), h(2)),
            at("2026-11-30T10:00:00Z")
        );
    }

    #[test]
    fn holidays_are_skipped() {
        let c = berlin(&["mon-fri 09:00-17:30"], &["2026-12-24", "2026-12-25"]);
        // Wednesday 23 Dec 17:00 CET + 1h → Monday 28 Dec 09:30 CET.
        assert_eq!(
            c.add(at("2026-12-23T16:00:00Z"), h(1)),
            at("2026-12-28T08:30:00Z")
        );
    }

    #[test]
    fn several_ranges_a_day() {
        let c = berlin(&["mon-fri 09:00-12:00,13:00-17:00"], &[]);
        // Monday 11:00 CET + 2h: 1h before lunch, 1h after → 14:00.
        assert_eq!(
            c.add(at("2026-11-23T10:00:00Z"), h(2)),
            at("2026-11-23T13:00:00Z")
        );
    }

    #[test]
    fn europe_spring_forward() {
        // 29 March 2026: 02:00 CET → 03:00 CEST. Weekend hours 00:00-06:00.
        let c = berlin(&["sun 00:00-06:00"], &[]);
        // From 00:00 CET (23:00Z) six local hours are only five real ones.
        assert_eq!(
            c.add(at("2026-03-28T23:00:00Z"), h(5)),
            at("2026-03-29T04:00:00Z")
        );
        assert_eq!(
            c.between(at("2026-03-28T23:00:00Z"), at("2026-03-29T05:00:00Z")),
            h(5)
        );
        // Office hours on the Monday after are in CEST (UTC+2).
        let c = berlin(&["mon-fri 09:00-17:30"], &[]);
        assert_eq!(
            c.add(at("2026-03-28T12:00:00Z"), h(1)),
            at("2026-03-30T08:00:00Z")
        );
    }

    #[test]
    fn europe_fall_back() {
        // 25 October 2026: 03:00 CEST → 02:00 CET; 00:00-06:00 lasts 7h.
        let c = berlin(&["sun 00:00-06:00"], &[]);
        assert_eq!(
            c.add(at("2026-10-24T22:00:00Z"), h(7)),
            at("2026-10-25T05:00:00Z")
        );
        // Friday 17:00 CEST + 1h → Monday 09:30 CET = 08:30Z.
        let c = berlin(&["mon-fri 09:00-17:30"], &[]);
        assert_eq!(
            c.add(at("2026-10-23T15:00:00Z"), h(1)),
            at("2026-10-26T08:30:00Z")
        );
    }

    #[test]
    fn america_dst_changes() {
        let c = cal("America/New_York", &["mon-fri 09:00-17:00"], &[]);
        // Spring forward Sunday 8 March 2026: Friday 16:00 EST (21:00Z)
        // + 2h → Monday 10:00 EDT (14:00Z).
        assert_eq!(
            c.add(at("2026-03-06T21:00:00Z"), h(2)),
            at("2026-03-09T14:00:00Z")
        );
        // Fall back Sunday 1 November 2026: Friday 16:00 EDT (20:00Z)
        // + 2h → Monday 10:00 EST (15:00Z).
        assert_eq!(
            c.add(at("2026-10-30T20:00:00Z"), h(2)),
            at("2026-11-02T15:00:00Z")
        );
    }

    #[test]
    fn business_time_between() {
        let c = berlin(&["mon-fri 09:00-17:30"], &[]);
        // Friday 17:00 CET → Monday 10:00 CET: 30 min + 1h.
        assert_eq!(
            c.between(at("2026-11-27T16:00:00Z"), at("2026-11-30T09:00:00Z")),
            Duration::from_secs(5400)
        );
    }

    #[test]
    fn hour_specs() {
        let (d, r) = parse_hours("mon-fri 09:00-17:30").unwrap();
        assert_eq!(d, vec![0, 1, 2, 3, 4]);
        assert_eq!(r.len(), 1);
        assert_eq!(parse_hours("sat,sun 10:00-14:00").unwrap().0, vec![5, 6]);
        assert!(parse_hours("mon-fri").is_err());
        assert!(parse_hours("fri-mon 09:00-10:00").is_err());
        assert!(parse_hours("mon 17:00-09:00").is_err());
        assert!(parse_hours("mun 09:00-10:00").is_err());
    }
}
