use std::time::SystemTime;

use jiff::tz::TimeZone;

use crate::ConfigError;
use crate::policy::{Decision, PolicyInput, ScalingPolicy};

/// A recurring window of the week, in a time zone, during which at least `min_workers` run:
/// e.g. Monday to Friday, 08:00 to 18:00 in `Europe/Paris`.
///
/// The window starts at `from` on each of its days and ends at `to`; a window whose `to` is at
/// or before its `from` ends the next day (`22:00` to `06:00` on `fri` runs from Friday 22:00 to
/// Saturday 06:00). `24:00` as `to` means the end of the day. Times are local to the zone, so a
/// daylight-saving change moves the window with the local clock.
///
/// ```
/// use celery_scale_core::layer::ScheduleWindow;
/// let w = ScheduleWindow::parse("mon-fri", "08:00", "18:00", "UTC", 4).unwrap();
/// assert_eq!(w.min_workers(), 4);
/// let e = ScheduleWindow::parse("mon-fry", "08:00", "18:00", "UTC", 4).unwrap_err();
/// assert_eq!(e.field, "days");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleWindow {
    /// Monday first.
    days: [bool; 7],
    /// Minutes after local midnight.
    from: u16,
    /// Minutes after local midnight (1..=1440), on the next day when at or before `from`.
    to: u16,
    tz: TimeZone,
    min_workers: u32,
    label: String,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day_index(name: &str) -> Option<usize> {
    let name = name.trim().to_ascii_lowercase();
    DAYS.iter().position(|d| *d == name)
}

/// `mon-fri`, `sat,sun`, `mon,wed-fri`, `daily` or `*`: Monday first. A range may wrap
/// (`fri-mon` is Friday to Monday).
fn parse_days(text: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    let text = text.trim();
    if text == "*" || text.eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    let unknown = |d: &str| {
        format!(
            "{text:?}: unknown day {:?} (expected a list of mon, tue, wed, thu, fri, sat, sun \
             or ranges such as mon-fri, or daily)",
            d.trim()
        )
    };
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let a = day_index(a).ok_or_else(|| unknown(a))?;
                let b = day_index(b).ok_or_else(|| unknown(b))?;
                let mut i = a;
                loop {
                    days[i] = true;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => days[day_index(part).ok_or_else(|| unknown(part))?] = true,
        }
    }
    Ok(days)
}

/// `HH:MM` (24-hour) as minutes after midnight; `24:00` only where `allow_end`.
fn parse_time(text: &str, allow_end: bool) -> Result<u16, String> {
    let bad = || {
        format!(
            "{text:?} is not a time of day HH:MM (00:00 to 23:59{})",
            if allow_end { ", or 24:00" } else { "" }
        )
    };
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    match (h, m) {
        (24, 0) if allow_end => Ok(24 * 60),
        (0..=23, 0..=59) => Ok(h * 60 + m),
        _ => Err(bad()),
    }
}

impl ScheduleWindow {
    /// A window on `days` (`mon-fri`, `sat,sun`, `daily`), from `from` to `to` (`HH:MM`, `to`
    /// may be `24:00`), local to `tz` (`UTC` or an IANA name such as `Europe/Paris`), raising the
    /// floor to `min_workers`. Errors name the field (`days`, `from`, `to`, `tz`).
    pub fn parse(
        days: &str,
        from: &str,
        to: &str,
        tz: &str,
        min_workers: u32,
    ) -> Result<Self, ConfigError> {
        let day_set = parse_days(days).map_err(|e| ConfigError::new("days", e))?;
        let from_m = parse_time(from, false).map_err(|e| ConfigError::new("from", e))?;
        let to_m = parse_time(to, true).map_err(|e| ConfigError::new("to", e))?;
        if from_m == to_m {
            return Err(ConfigError::new(
                "to",
                format!("{to:?} equals from: the window would be empty"),
            ));
        }
        let zone = if tz.eq_ignore_ascii_case("utc") {
            TimeZone::UTC
        } else {
            TimeZone::get(tz).map_err(|e| {
                ConfigError::new(
                    "tz",
                    format!("{tz:?} is not a known time zone (UTC or an IANA name): {e}"),
                )
            })?
        };
        Ok(ScheduleWindow {
            days: day_set,
            from: from_m,
            to: to_m,
            tz: zone,
            min_workers,
            label: format!("{days} {from}-{to} {tz}"),
        })
    }

    /// The floor within the window.
    pub fn min_workers(&self) -> u32 {
        self.min_workers
    }

    /// Whether `wall` falls in the window. A time the zone cannot express (out of range) is
    /// outside every window.
    pub fn contains(&self, wall: SystemTime) -> bool {
        let Ok(ts) = jiff::Timestamp::try_from(wall) else {
            return false;
        };
        let local = ts.to_zoned(self.tz.clone());
        let day = usize::from(local.weekday().to_monday_zero_offset().unsigned_abs());
        let minute =
            u16::from(local.hour().unsigned_abs()) * 60 + u16::from(local.minute().unsigned_abs());
        let yesterday = (day + 6) % 7;
        if self.from < self.to {
            self.days[day] && (self.from..self.to).contains(&minute)
        } else {
            // Overnight: from `from` on one of its days to `to` the next day.
            (self.days[day] && minute >= self.from) || (self.days[yesterday] && minute < self.to)
        }
    }
}

/// Raises the desired count to a window's `min_workers` while the decision's wall-clock time
/// ([`PolicyInput::wall`]) is in one of the windows: capacity for a peak that comes at a known
/// hour (business hours, a nightly batch) is there before the backlog asks for it. Outside the
/// windows it does nothing. It only ever raises, so it never turns a fault into a scale-in.
#[derive(Debug, Clone)]
pub struct ScheduledFloor<P> {
    inner: P,
    windows: Vec<ScheduleWindow>,
}

impl<P> ScheduledFloor<P> {
    /// Wraps `inner` with `windows` (where several hold, the highest floor applies).
    pub fn new(inner: P, windows: Vec<ScheduleWindow>) -> Self {
        ScheduledFloor { inner, windows }
    }
}

impl<P: ScalingPolicy> ScalingPolicy for ScheduledFloor<P> {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let mut d = self.inner.decide(input);
        let active = self
            .windows
            .iter()
            .filter(|w| w.contains(input.wall))
            .max_by_key(|w| w.min_workers);
        if let Some(w) = active
            && d.desired < w.min_workers
        {
            d.push(
                "schedule",
                w.min_workers,
                format!(
                    "raised to {} by the schedule window {}",
                    w.min_workers, w.label
                ),
            );
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Observation;
    use crate::layer::testing::{Scripted, input};
    use std::time::Duration;
    use tokio::time::Instant;

    /// `2026-01-05` is a Monday: seconds since the epoch of its 00:00 UTC.
    const MONDAY_UTC: u64 = 1_767_571_200;

    fn at(day: u64, hh: u64, mm: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH
            + Duration::from_secs(MONDAY_UTC + day * 86_400 + hh * 3600 + mm * 60)
    }

    #[test]
    fn weekday_window_in_utc() {
        let w = ScheduleWindow::parse("mon-fri", "08:00", "18:00", "UTC", 4).unwrap();
        assert!(!w.contains(at(0, 7, 59)));
        assert!(w.contains(at(0, 8, 0)));
        assert!(w.contains(at(4, 17, 59)), "Friday");
        assert!(!w.contains(at(4, 18, 0)), "the end is excluded");
        assert!(!w.contains(at(5, 12, 0)), "Saturday");
    }

    #[test]
    fn overnight_and_wrapping_days() {
        let w = ScheduleWindow::parse("fri", "22:00", "06:00", "UTC", 2).unwrap();
        assert!(w.contains(at(4, 23, 0)), "Friday night");
        assert!(w.contains(at(5, 5, 59)), "Saturday morning");
        assert!(!w.contains(at(5, 22, 30)), "not Saturday night");
        assert!(!w.contains(at(4, 5, 0)), "not Friday morning");
        let w = ScheduleWindow::parse("sat-mon", "00:00", "24:00", "UTC", 1).unwrap();
        assert!(w.contains(at(6, 23, 59)) && w.contains(at(0, 0, 0)));
        assert!(!w.contains(at(1, 0, 0)), "Tuesday");
        let w = ScheduleWindow::parse("daily", "09:00", "09:30", "UTC", 1).unwrap();
        assert!((0..7).all(|d| w.contains(at(d, 9, 15))));
    }

    #[test]
    fn local_time_follows_the_zone_and_daylight_saving() {
        // 09:00 in Paris is 08:00 UTC in January (CET) and 07:00 UTC in July (CEST).
        let w = ScheduleWindow::parse("daily", "09:00", "10:00", "Europe/Paris", 3).unwrap();
        assert!(w.contains(at(0, 8, 30)));
        assert!(!w.contains(at(0, 7, 30)));
        let july = at(0, 7, 30) + Duration::from_secs(181 * 86_400);
        assert!(w.contains(july));
    }

    #[test]
    fn bad_fields_are_named() {
        let field = |days, from, to, tz| {
            ScheduleWindow::parse(days, from, to, tz, 1)
                .unwrap_err()
                .field
                .to_string()
        };
        assert_eq!(field("mon-fry", "08:00", "18:00", "UTC"), "days");
        assert_eq!(field("", "08:00", "18:00", "UTC"), "days");
        assert_eq!(field("mon", "8am", "18:00", "UTC"), "from");
        assert_eq!(field("mon", "24:00", "18:00", "UTC"), "from");
        assert_eq!(field("mon", "08:00", "18:60", "UTC"), "to");
        assert_eq!(field("mon", "08:00", "08:00", "UTC"), "to");
        assert_eq!(field("mon", "08:00", "18:00", "Mars/Olympus"), "tz");
        let e = ScheduleWindow::parse("mon-fry", "08:00", "18:00", "UTC", 1).unwrap_err();
        assert!(e.to_string().contains("unknown day \"fry\""), "{e}");
    }

    #[test]
    fn the_layer_raises_the_floor_only_in_its_windows() {
        let now = Instant::now();
        let obs = Observation::new(0, now);
        let windows = vec![
            ScheduleWindow::parse("mon-fri", "08:00", "18:00", "UTC", 4).unwrap(),
            ScheduleWindow::parse("mon", "09:00", "09:30", "UTC", 10).unwrap(),
        ];
        let mut p = ScheduledFloor::new(Scripted { next: 1 }, windows);
        let decide = |p: &mut ScheduledFloor<Scripted>, wall, fresh: bool| {
            let mut i = input(&obs, 1, now);
            i.wall = wall;
            if !fresh {
                i.observation = None;
            }
            p.decide(&i)
        };
        assert_eq!(decide(&mut p, at(0, 7, 0), true).desired, 1);
        let d = decide(&mut p, at(0, 8, 0), true);
        assert_eq!(d.desired, 4);
        assert!(
            d.reason().contains("mon-fri 08:00-18:00 UTC"),
            "{}",
            d.reason()
        );
        assert_eq!(
            decide(&mut p, at(0, 9, 10), true).desired,
            10,
            "the highest window wins"
        );
        assert_eq!(decide(&mut p, at(1, 9, 10), true).desired, 4);
        // It raises even without a fresh observation (the inner policy holds at 1).
        assert_eq!(decide(&mut p, at(1, 9, 10), false).desired, 4);
        // Never lowers.
        p.inner.next = 20;
        assert_eq!(decide(&mut p, at(0, 9, 10), true).desired, 20);
        assert_eq!(decide(&mut p, at(5, 9, 10), true).desired, 20);
    }
}
