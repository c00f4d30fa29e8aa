use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::ConfigError;
use crate::policy::{Decision, PolicyInput, ScalingPolicy};

/// Most buckets in one period (a week at 30 s), which bounds the memory the layer keeps.
const MAX_BUCKETS_PER_PERIOD: u64 = 20_160;
/// Most past periods the layer may compare.
const MAX_CYCLES: u32 = 10;
/// Longest period (a week).
const MAX_PERIOD: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest period.
const MIN_PERIOD: Duration = Duration::from_secs(60);

/// The settings of a [`Forecast`]: the length of the recurring pattern, how many past periods
/// must agree, how far ahead to look and how finely to remember.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForecastSettings {
    period: Duration,
    cycles: u32,
    lead: Duration,
    resolution: Duration,
}

impl ForecastSettings {
    /// A pattern that recurs every `period` (1 min ..= 7 days: an hourly cron, a daily peak, a
    /// weekly one); the floor is the lowest of the last `cycles` periods (1 ..= 10) so that a
    /// one-off burst is not replayed when `cycles` >= 2; demand up to `lead` ahead (0 ..= half
    /// the `period`: a worker start-up) is prepared for; remembered in buckets of `resolution` (1 s
    /// ..= `period`, at most 20 160 per period, a whole number of them).
    /// Errors name the field.
    pub fn new(
        period: Duration,
        cycles: u32,
        lead: Duration,
        resolution: Duration,
    ) -> Result<Self, ConfigError> {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        if !(MIN_PERIOD..=MAX_PERIOD).contains(&period) || period.subsec_nanos() != 0 {
            return Err(ConfigError::new(
                "period",
                format!(
                    "{} must be whole seconds from {} to {}",
                    show(period),
                    show(MIN_PERIOD),
                    show(MAX_PERIOD)
                ),
            ));
        }
        if !(1..=MAX_CYCLES).contains(&cycles) {
            return Err(ConfigError::new(
                "cycles",
                format!("{cycles} must be from 1 to {MAX_CYCLES}"),
            ));
        }
        if lead > period / 2 {
            return Err(ConfigError::new(
                "lead",
                format!(
                    "{} is more than half the period {}",
                    show(lead),
                    show(period)
                ),
            ));
        }
        let res = resolution.as_secs();
        if res == 0 || resolution.subsec_nanos() != 0 || !period.as_secs().is_multiple_of(res) {
            return Err(ConfigError::new(
                "resolution",
                format!(
                    "{} must be whole seconds (at least 1 s) that divide the period {}",
                    show(resolution),
                    show(period)
                ),
            ));
        }
        if period.as_secs() / res > MAX_BUCKETS_PER_PERIOD {
            return Err(ConfigError::new(
                "resolution",
                format!(
                    "{} makes {} buckets per period {}; at most {MAX_BUCKETS_PER_PERIOD}",
                    show(resolution),
                    period.as_secs() / res,
                    show(period)
                ),
            ));
        }
        Ok(ForecastSettings {
            period,
            cycles,
            lead,
            resolution,
        })
    }

    /// The length of the recurring pattern.
    pub fn period(&self) -> Duration {
        self.period
    }
}

/// Prepares for a recurring peak it has seen: remembers, by wall-clock time, the workers the
/// policy beneath it asked for, and raises the desired count to what was asked at the same time
/// of the last `cycles` periods, looking `lead` ahead (the lowest of those periods, so only a
/// pattern that recurred in each of them counts). With a period of a day and a lead of a
/// start-up, workers for the 09:00 rush are running at 09:00 instead of being asked for then.
///
/// What it remembers, per bucket of `resolution`, is the mean of the inner decisions (the base
/// policy with the layers beneath it: with the in-flight floor, never below the tasks that were
/// executing), not its own floor: capacity it added and nobody used is not remembered as
/// demand, so a peak that stops recurring stops being prepared for after `cycles` periods. The
/// mean, not the most, so that one tick's noise is not replayed as the level. When the pattern
/// does not come (the policy asks for less than half of what it asked at this time before,
/// less one worker, for `lead` in a row: a holiday, a cron that was removed) the floor is
/// dropped until the ask tracks the past again, so a broken pattern costs about a lead of
/// capacity instead of a period. Decisions without a fresh observation (holds) are not
/// remembered, and none is raised. It only ever raises, so it never turns a fault into a
/// scale-in; with nothing remembered for a past period (the loop was not running, or just
/// started) it does nothing. What it learned lives in memory: a restarted loop (or a new
/// leader) starts over.
///
/// The wall-clock time is [`PolicyInput::wall`]; a period's buckets are counted from the Unix
/// epoch, so a period of a day is aligned with UTC days.
#[derive(Debug, Clone)]
pub struct Forecast<P> {
    inner: P,
    settings: ForecastSettings,
    /// Bucket (seconds since the epoch / resolution) -> (sum of the workers asked, decisions).
    asked: BTreeMap<u64, (u64, u32)>,
    /// Since when the policy's ask has not tracked what was asked at this time in the past.
    untracked_since: Option<Instant>,
}

impl<P> Forecast<P> {
    /// Wraps `inner`.
    pub fn new(inner: P, settings: ForecastSettings) -> Self {
        Forecast {
            inner,
            settings,
            asked: BTreeMap::new(),
            untracked_since: None,
        }
    }

    fn bucket(&self, secs: u64) -> u64 {
        secs / self.settings.resolution.as_secs()
    }

    /// Notes that `workers` were asked for at `wall` (the layer does this at every decision
    /// with a fresh observation; call it to seed the layer from recorded history).
    pub fn remember(&mut self, wall: SystemTime, workers: u32) {
        let Ok(since) = wall.duration_since(SystemTime::UNIX_EPOCH) else {
            return;
        };
        let bucket = self.bucket(since.as_secs());
        let (sum, n) = self.asked.entry(bucket).or_insert((0, 0));
        *sum = sum.saturating_add(u64::from(workers));
        *n = n.saturating_add(1);
        // Keep the periods a floor may still read (plus the lead), drop the rest.
        let keep = self.settings.period * self.settings.cycles + self.settings.lead;
        let oldest = self.bucket(since.saturating_sub(keep).as_secs());
        while let Some((&b, _)) = self.asked.first_key_value()
            && b < oldest
        {
            self.asked.pop_first();
        }
    }

    /// What the last `cycles` periods asked at `wall`: for each, the highest bucket mean of the
    /// workers asked from the same time of that period to `lead` later (rounded up), and the
    /// lowest of those as the floor; `None` when any of those periods has nothing remembered
    /// in that span, or `wall` is before the epoch.
    pub fn floor_at(&self, wall: SystemTime) -> Option<u32> {
        self.recalled(wall).map(|r| r.ahead)
    }

    /// The floor (the most asked up to `lead` ahead) and what was asked at the same time, each
    /// the lowest over the last `cycles` periods.
    fn recalled(&self, wall: SystemTime) -> Option<Recalled> {
        let now = wall.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
        let period = self.settings.period.as_secs();
        let lead = self.settings.lead.as_secs();
        let mean = |&(sum, n): &(u64, u32)| {
            u32::try_from(sum.div_ceil(u64::from(n.max(1)))).unwrap_or(u32::MAX)
        };
        let mut out: Option<Recalled> = None;
        for k in 1..=u64::from(self.settings.cycles) {
            let from = now.checked_sub(k * period)?;
            let first = self.bucket(from);
            let span = first..=self.bucket(from + lead);
            let ahead = self.asked.range(span).map(|(_, v)| mean(v)).max()?;
            let same_time = self.asked.get(&first).map_or(0, mean);
            out = Some(match out {
                None => Recalled { ahead, same_time },
                Some(r) => Recalled {
                    ahead: r.ahead.min(ahead),
                    same_time: r.same_time.min(same_time),
                },
            });
        }
        out
    }
}

/// What past periods asked (see [`Forecast::floor_at`]).
#[derive(Debug, Clone, Copy)]
struct Recalled {
    /// The most asked from the same time to `lead` later.
    ahead: u32,
    /// What was asked at the same time.
    same_time: u32,
}

/// Whether the policy's ask now tracks what was asked at this time in the past: within a
/// factor of two, with one worker of slack (an ask of 0 tracks a past of 1 or 2).
fn tracks(asked_now: u32, asked_then: u32) -> bool {
    u64::from(asked_now) * 2 + 2 >= u64::from(asked_then)
}

impl<P: ScalingPolicy> ScalingPolicy for Forecast<P> {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let mut d = self.inner.decide(input);
        let Some(obs) = input.observation else {
            return d;
        };
        // While the worker figures are unknown (units it started are booting, not heard yet)
        // the ask beneath follows the running units, which may be this layer's own floor: it
        // is neither remembered nor taken as the pattern coming.
        let heard = !obs.workers_are_unknown();
        if heard {
            self.remember(input.wall, d.desired);
        }
        let Some(recalled) = self.recalled(input.wall) else {
            self.untracked_since = None;
            return d;
        };
        let s = self.settings;
        if heard && tracks(d.desired, recalled.same_time) {
            self.untracked_since = None;
        } else if heard || self.untracked_since.is_some() {
            let since = *self.untracked_since.get_or_insert(input.now);
            if input.now.saturating_duration_since(since) >= s.lead {
                // The pattern did not come (a holiday, a cron that was removed): no floor until
                // the ask tracks the past again.
                return d;
            }
        }
        if recalled.ahead > d.desired {
            d.push(
                "forecast",
                recalled.ahead,
                format!(
                    "raised to {}: asked for at this time (up to {} ahead) in each of the last \
                     {} period(s) of {}",
                    recalled.ahead,
                    humantime::format_duration(s.lead),
                    s.cycles,
                    humantime::format_duration(s.period)
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

    const DAY: u64 = 86_400;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn daily(cycles: u32) -> Forecast<Scripted> {
        let s = ForecastSettings::new(
            Duration::from_secs(DAY),
            cycles,
            Duration::from_secs(60),
            Duration::from_secs(60),
        )
        .unwrap();
        Forecast::new(Scripted::default(), s)
    }

    /// The layer's decision at `secs` when the policy beneath asks for `asked`.
    fn decide(f: &mut Forecast<Scripted>, secs: u64, asked: u32) -> Decision {
        decide_seeing(f, secs, asked, true)
    }

    /// As [`decide`], with the worker figures known (`heard`) or not.
    fn decide_seeing(f: &mut Forecast<Scripted>, secs: u64, asked: u32, heard: bool) -> Decision {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let now = *START.get_or_init(Instant::now) + Duration::from_secs(secs);
        let mut obs = Observation::new(0, now);
        if !heard {
            obs.workers_unknown = Some(crate::WorkersUnknown::new("units not heard yet"));
        }
        f.inner.next = asked;
        let mut i = input(&obs, 0, now);
        i.wall = at(secs);
        f.decide(&i)
    }

    /// One day of decisions every 5 s: `peak` workers asked from 09:00 to 09:20, 1 otherwise.
    fn live_a_day(f: &mut Forecast<Scripted>, day: u64, peak: u32) {
        for t in (0..DAY).step_by(5) {
            let asked = if (9 * 3600..9 * 3600 + 1200).contains(&t) {
                peak
            } else {
                1
            };
            decide(f, day * DAY + t, asked);
        }
    }

    #[test]
    fn a_peak_seen_yesterday_is_prepared_for_a_lead_ahead() {
        let mut f = daily(1);
        // Day 0: nothing remembered, nothing raised.
        assert_eq!(decide(&mut f, 9 * 3600 - 60, 1).desired, 1);
        live_a_day(&mut f, 0, 50);
        // Day 1, 08:58: the peak is more than a lead away.
        assert_eq!(decide(&mut f, DAY + 9 * 3600 - 120, 1).desired, 1);
        // 08:59: within a lead of it: raised to what was asked at 09:00 yesterday.
        let d = decide(&mut f, DAY + 9 * 3600 - 60, 1);
        assert_eq!(d.desired, 50, "{}", d.reason());
        assert_eq!(d.steps.last().unwrap().stage, "forecast");
        // Through the peak, and not past its end.
        assert_eq!(decide(&mut f, DAY + 9 * 3600 + 600, 3).desired, 50);
        assert_eq!(decide(&mut f, DAY + 9 * 3600 + 1260, 1).desired, 1);
        // The policy asking for more than the floor is never cut.
        assert_eq!(decide(&mut f, DAY + 9 * 3600 + 300, 80).desired, 80);
    }

    #[test]
    fn a_one_off_burst_is_not_replayed_when_two_periods_must_agree() {
        let mut f = daily(2);
        live_a_day(&mut f, 0, 1); // no peak on day 0
        live_a_day(&mut f, 1, 50); // a one-off on day 1
        assert_eq!(decide(&mut f, 2 * DAY + 9 * 3600 - 60, 1).desired, 1);
        live_a_day(&mut f, 2, 50);
        // Days 1 and 2 both had it: day 3 is prepared.
        assert_eq!(decide(&mut f, 3 * DAY + 9 * 3600 - 60, 1).desired, 50);
    }

    #[test]
    fn a_peak_that_does_not_come_is_dropped_after_a_lead_and_not_remembered() {
        let mut f = daily(1);
        live_a_day(&mut f, 0, 50);
        // Day 1: prepared a lead ahead ...
        let day1 = DAY + 9 * 3600;
        assert_eq!(decide(&mut f, day1 - 30, 1).desired, 50);
        // ... but the peak does not come: the policy asks for 1 where it asked 50. Held for a
        // lead (it may be late), then dropped.
        assert_eq!(decide(&mut f, day1, 1).desired, 50);
        assert_eq!(decide(&mut f, day1 + 55, 1).desired, 50);
        assert_eq!(decide(&mut f, day1 + 60, 1).desired, 1);
        assert_eq!(decide(&mut f, day1 + 600, 1).desired, 1);
        // A late peak that comes after all: tracking again, the floor is back.
        assert_eq!(decide(&mut f, day1 + 605, 30).desired, 50);
        // Its own floor is not remembered as demand: day 2 is not prepared at 09:00 (the
        // policy asked 1 then on day 1), only where the late peak was.
        live_a_day(&mut f, 1, 1);
        assert_eq!(decide(&mut f, 2 * DAY + 9 * 3600 - 60, 1).desired, 1);
    }

    #[test]
    fn asks_while_the_workers_are_unknown_are_not_remembered_nor_tracking() {
        let mut f = daily(1);
        live_a_day(&mut f, 0, 50);
        let day1 = DAY + 9 * 3600;
        let unknown =
            |f: &mut Forecast<Scripted>, secs, asked| decide_seeing(f, secs, asked, false);
        // The floor's 50 units boot at 09:00, unheard: the ask beneath follows them (50), which
        // must not count as the peak coming, nor be remembered for day 2.
        assert_eq!(decide(&mut f, day1 - 30, 1).desired, 50);
        assert_eq!(decide(&mut f, day1, 1).desired, 50, "untracked from here");
        for t in (5..=55).step_by(5) {
            assert_eq!(unknown(&mut f, day1 + t, 50).desired, 50);
        }
        assert_eq!(
            unknown(&mut f, day1 + 60, 50).desired,
            50,
            "the policy's own 50"
        );
        assert_eq!(
            decide(&mut f, day1 + 65, 1).desired,
            1,
            "let go after a lead"
        );
        for t in (70..1200).step_by(5) {
            decide(&mut f, day1 + t, 1);
        }
        assert_eq!(decide(&mut f, 2 * DAY + 9 * 3600 - 60, 1).desired, 1);
    }

    #[test]
    fn holds_and_gaps_are_not_demand_and_memory_is_bounded() {
        let mut f = daily(1);
        // A hold (no observation) at 09:00 on day 0 is not remembered.
        let now = Instant::now();
        let obs = Observation::new(0, now);
        let mut i = input(&obs, 7, now);
        i.observation = None;
        i.wall = at(9 * 3600);
        f.inner.next = 40;
        assert_eq!(f.decide(&i).desired, 7);
        assert_eq!(f.floor_at(at(DAY + 9 * 3600)), None);
        // Three weeks of decisions keep at most one period (plus the lead) of buckets.
        for day in 0..21 {
            live_a_day(&mut f, day, 50);
        }
        assert!(f.asked.len() <= 1440 + 2, "{} buckets", f.asked.len());
        // Before the epoch: nothing, no panic.
        f.remember(SystemTime::UNIX_EPOCH - Duration::from_secs(5), 9);
        assert_eq!(f.floor_at(SystemTime::UNIX_EPOCH), None);
    }

    #[test]
    fn settings_are_checked_and_name_the_field() {
        let s = |p, c, l, r| {
            ForecastSettings::new(
                Duration::from_secs(p),
                c,
                Duration::from_secs(l),
                Duration::from_secs(r),
            )
        };
        assert!(s(3600, 2, 60, 30).is_ok());
        assert_eq!(s(30, 1, 0, 1).unwrap_err().field, "period");
        assert_eq!(s(8 * DAY, 1, 0, 60).unwrap_err().field, "period");
        assert_eq!(s(DAY, 0, 60, 60).unwrap_err().field, "cycles");
        assert_eq!(s(DAY, 11, 60, 60).unwrap_err().field, "cycles");
        assert_eq!(s(3600, 1, 1801, 60).unwrap_err().field, "lead");
        assert!(s(3600, 1, 1800, 60).is_ok());
        assert_eq!(s(3600, 1, 60, 7).unwrap_err().field, "resolution");
        assert_eq!(s(3600, 1, 60, 0).unwrap_err().field, "resolution");
        assert_eq!(s(7 * DAY, 1, 60, 1).unwrap_err().field, "resolution");
    }
}
