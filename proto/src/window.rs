//! Mining windows (`spec.limits.windows`): on which days, between which times, in which
//! time zone a device may mine. The controller checks them when it reads a MicroMiner;
//! the agent evaluates them against its own clock, also while disconnected, so both parse
//! them here.
//!
//! A window that ends before it starts crosses midnight and belongs to the day it starts
//! on: `days: [Mon-Fri], from: "22:00", to: "06:00"` runs from Monday 22:00 to Tuesday
//! 06:00, ..., Friday 22:00 to Saturday 06:00. `from == to` is the whole day. Times are the
//! local wall clock of `timeZone` (an IANA name, default UTC), so a window keeps its hours
//! across daylight-saving changes. The time-zone database is built in: a device without
//! `/usr/share/zoneinfo` evaluates windows the same way.

use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

const WEEK: [(&str, Weekday); 7] = [
    ("Mon", Weekday::Monday),
    ("Tue", Weekday::Tuesday),
    ("Wed", Weekday::Wednesday),
    ("Thu", Weekday::Thursday),
    ("Fri", Weekday::Friday),
    ("Sat", Weekday::Saturday),
    ("Sun", Weekday::Sunday),
];

/// A checked window.
#[derive(Debug, Clone)]
pub struct Window {
    /// Days a window may start on, Monday first.
    days: [bool; 7],
    from: Time,
    to: Time,
    zone: TimeZone,
}

/// What is wrong with a window, naming the part (`days`, `from`, `to`, `timeZone`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowError {
    /// The field: `days`, `from`, `to` or `timeZone`.
    pub field: &'static str,
    /// The problem.
    pub problem: String,
}

fn day_index(name: &str) -> Option<usize> {
    WEEK.iter()
        .position(|(short, _)| short.eq_ignore_ascii_case(name.trim()))
}

fn parse_days(days: &[String]) -> Result<[bool; 7], WindowError> {
    let bad = |problem: String| WindowError {
        field: "days",
        problem,
    };
    if days.is_empty() {
        return Err(bad(
            "must name at least one day (Mon..Sun or a range like Mon-Fri)".into(),
        ));
    }
    let mut set = [false; 7];
    for entry in days {
        let (first, last) = match entry.split_once('-') {
            Some((a, b)) => (a, b),
            None => (entry.as_str(), entry.as_str()),
        };
        let (Some(first), Some(last)) = (day_index(first), day_index(last)) else {
            return Err(bad(format!(
                "`{entry}` is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun) or a range of them like Mon-Fri"
            )));
        };
        // A range may wrap the week end: Fri-Mon is Fri, Sat, Sun, Mon.
        let mut day = first;
        loop {
            set[day] = true;
            if day == last {
                break;
            }
            day = (day + 1) % 7;
        }
    }
    Ok(set)
}

fn parse_time(field: &'static str, text: &str) -> Result<Time, WindowError> {
    let bad = || WindowError {
        field,
        problem: format!("`{text}` is not a time of day as HH:MM (00:00 to 23:59)"),
    };
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let hour: i8 = h.parse().map_err(|_| bad())?;
    let minute: i8 = m.parse().map_err(|_| bad())?;
    Time::new(hour, minute, 0, 0).map_err(|_| bad())
}

impl Window {
    /// Checks a window as written in a MicroMiner; an empty `time_zone` is UTC.
    pub fn parse(
        days: &[String],
        from: &str,
        to: &str,
        time_zone: &str,
    ) -> Result<Window, WindowError> {
        let zone = if time_zone.trim().is_empty() {
            TimeZone::UTC
        } else {
            TimeZone::get(time_zone.trim()).map_err(|_| WindowError {
                field: "timeZone",
                problem: format!("`{time_zone}` is not an IANA time zone (e.g. Europe/Istanbul, America/Chicago, UTC)"),
            })?
        };
        Ok(Window {
            days: parse_days(days)?,
            from: parse_time("from", from)?,
            to: parse_time("to", to)?,
            zone,
        })
    }

    fn starts_on(&self, day: Weekday) -> bool {
        self.days[day.to_monday_zero_offset() as usize]
    }

    /// Whether `at` falls inside the window.
    pub fn contains(&self, at: Timestamp) -> bool {
        let local: Zoned = at.to_zoned(self.zone.clone());
        let (day, time) = (local.weekday(), local.time());
        if self.from == self.to {
            return self.starts_on(day);
        }
        if self.from < self.to {
            return self.starts_on(day) && self.from <= time && time < self.to;
        }
        (self.starts_on(day) && time >= self.from)
            || (self.starts_on(day.previous()) && time < self.to)
    }
}

/// Whether `at` falls in any of `windows`; no windows means always.
pub fn allowed(windows: &[Window], at: Timestamp) -> bool {
    windows.is_empty() || windows.iter().any(|w| w.contains(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(days: &[&str], from: &str, to: &str, zone: &str) -> Window {
        let days: Vec<String> = days.iter().map(|d| d.to_string()).collect();
        Window::parse(&days, from, to, zone).expect("valid")
    }

    fn at(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    #[test]
    fn a_night_window_crosses_midnight_and_belongs_to_its_start_day() {
        // 2026-11-23 is a Monday; Istanbul is UTC+3 all year.
        let nights = window(&["Mon-Fri"], "22:00", "06:00", "Europe/Istanbul");
        for (utc, inside) in [
            ("2026-11-23T18:59:00Z", false), // Mon 21:59
            ("2026-11-23T19:00:00Z", true),  // Mon 22:00
            ("2026-11-23T23:30:00Z", true),  // Tue 02:30, Monday's night
            ("2026-11-24T02:59:00Z", true),  // Tue 05:59
            ("2026-11-24T03:00:00Z", false), // Tue 06:00: over
            ("2026-11-28T02:00:00Z", true),  // Sat 05:00, Friday's night
            ("2026-11-28T20:00:00Z", false), // Sat 23:00: no window starts Saturday
            ("2026-11-29T23:00:00Z", false), // Mon 02:00, Sunday's night: none
        ] {
            assert_eq!(nights.contains(at(utc)), inside, "{utc}");
        }
    }

    #[test]
    fn a_day_window_and_a_whole_day_window() {
        let office = window(&["Sat", "Sun"], "09:00", "17:00", "UTC");
        assert!(office.contains(at("2026-11-28T09:00:00Z")));
        assert!(!office.contains(at("2026-11-28T17:00:00Z")));
        assert!(!office.contains(at("2026-11-27T12:00:00Z")), "Friday");
        let sundays = window(&["Sun"], "00:00", "00:00", "");
        assert!(sundays.contains(at("2026-11-29T23:59:59Z")));
        assert!(!sundays.contains(at("2026-11-30T00:00:00Z")));
    }

    #[test]
    fn local_hours_hold_across_daylight_saving() {
        // Chicago: UTC-5 in summer (CDT), UTC-6 in winter (CST).
        let evenings = window(&["Mon-Sun"], "18:00", "20:00", "America/Chicago");
        assert!(evenings.contains(at("2026-07-01T23:30:00Z")), "18:30 CDT");
        assert!(!evenings.contains(at("2026-12-01T23:30:00Z")), "17:30 CST");
        assert!(evenings.contains(at("2026-12-02T00:30:00Z")), "18:30 CST");
    }

    #[test]
    fn ranges_wrap_the_week_end() {
        let long_weekend = window(&["Fri-Mon"], "00:00", "00:00", "UTC");
        assert!(long_weekend.contains(at("2026-11-30T12:00:00Z")), "Monday");
        assert!(
            !long_weekend.contains(at("2026-12-01T12:00:00Z")),
            "Tuesday"
        );
    }

    #[test]
    fn no_windows_means_always_and_any_window_allows() {
        assert!(allowed(&[], at("2026-11-25T12:00:00Z")));
        let windows = [
            window(&["Mon"], "01:00", "02:00", "UTC"),
            window(&["Wed"], "11:00", "13:00", "UTC"),
        ];
        assert!(allowed(&windows, at("2026-11-25T12:00:00Z")));
        assert!(!allowed(&windows, at("2026-11-25T14:00:00Z")));
    }

    #[test]
    fn bad_windows_name_the_field() {
        let parse = |days: &[&str], from: &str, to: &str, zone: &str| {
            let days: Vec<String> = days.iter().map(|d| d.to_string()).collect();
            Window::parse(&days, from, to, zone)
                .expect_err("invalid")
                .field
        };
        assert_eq!(parse(&[], "22:00", "06:00", "UTC"), "days");
        assert_eq!(parse(&["Someday"], "22:00", "06:00", "UTC"), "days");
        assert_eq!(parse(&["Mon-Funday"], "22:00", "06:00", "UTC"), "days");
        assert_eq!(parse(&["Mon"], "24:00", "06:00", "UTC"), "from");
        assert_eq!(parse(&["Mon"], "7:00", "06:00", "UTC"), "from");
        assert_eq!(parse(&["Mon"], "22:00", "06:60", "UTC"), "to");
        assert_eq!(
            parse(&["Mon"], "22:00", "06:00", "Mars/Olympus"),
            "timeZone"
        );
    }
}
