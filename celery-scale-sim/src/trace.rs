//! Arrival traces: what arrives when, and how long each task runs.
//!
//! The file format is CSV with a header, one row per arrival event:
//!
//! ```text
//! at_s,count,duration_s,queue
//! 0,5,12.5,celery
//! 30.5,1,3,emails
//! ```
//!
//! `count` tasks arrive at `at_s` seconds (from the start), each running `duration_s` seconds.
//! The `queue` column is optional (default `celery`). Rows need not be sorted. Lines whose
//! first non-blank character is `#` are comments (`celery-scale record` says there how the
//! trace was measured).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// One arrival event: `count` tasks of `duration` arrive on `queue` at `at`.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    /// Time since the start of the trace.
    pub at: Duration,
    /// Tasks arriving.
    pub count: u32,
    /// How long each runs on a worker.
    pub duration: Duration,
    /// The queue they are published to.
    pub queue: String,
}

/// A list of arrivals, sorted by time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Trace {
    arrivals: Vec<Arrival>,
}

/// Why a trace file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("line {line}: {message}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

impl Trace {
    /// A trace of these arrivals (sorted by time, stable).
    pub fn new(mut arrivals: Vec<Arrival>) -> Self {
        arrivals.sort_by_key(|a| a.at);
        Trace { arrivals }
    }

    /// The arrivals, sorted by time.
    pub fn arrivals(&self) -> &[Arrival] {
        &self.arrivals
    }

    /// The queues, in the order they first appear (the order workers consume them in).
    pub fn queues(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for a in &self.arrivals {
            if !out.contains(&a.queue) {
                out.push(a.queue.clone());
            }
        }
        out
    }

    /// Tasks in the trace.
    pub fn tasks(&self) -> u64 {
        self.arrivals.iter().map(|a| u64::from(a.count)).sum()
    }

    /// Sum of all task durations: the busy time any fleet must pay for.
    pub fn busy_time(&self) -> Duration {
        self.arrivals
            .iter()
            .map(|a| a.duration.mul_f64(f64::from(a.count)))
            .sum()
    }

    /// The time of the last arrival.
    pub fn end(&self) -> Duration {
        self.arrivals.last().map_or(Duration::ZERO, |a| a.at)
    }

    /// Generates arrivals from a rate function: over `length`, second by second, a Poisson
    /// number of tasks with mean `rate(t)` (tasks per second at `t` seconds) arrives, each
    /// running `duration(rng)`. Deterministic for a given `seed`.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use celery_scale_sim::Trace;
    /// // A 10-minute burst of 5 tasks/s after 5 quiet minutes, tasks of 2-8 s.
    /// let trace = Trace::from_rate(
    ///     Duration::from_secs(900), 42, "celery",
    ///     |t| if (300.0..900.0).contains(&t) { 5.0 } else { 0.0 },
    ///     |rng| Duration::from_secs_f64(rand::RngExt::random_range(rng, 2.0..8.0)),
    /// );
    /// assert!(trace.tasks() > 2_500 && trace.tasks() < 3_500);
    /// ```
    pub fn from_rate(
        length: Duration,
        seed: u64,
        queue: &str,
        rate: impl Fn(f64) -> f64,
        mut duration: impl FnMut(&mut rand::rngs::StdRng) -> Duration,
    ) -> Self {
        use rand::{RngExt as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut arrivals = Vec::new();
        for second in 0..length.as_secs() {
            let mean = rate(second as f64).max(0.0);
            // Poisson by inversion; for large means a normal approximation is plenty.
            let n = if mean > 30.0 {
                let u1: f64 = rng.random_range(f64::EPSILON..1.0);
                let u2: f64 = rng.random_range(0.0..1.0);
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                (mean + z * mean.sqrt()).round().max(0.0) as u32
            } else {
                let limit = (-mean).exp();
                let mut k = 0u32;
                let mut p: f64 = rng.random_range(0.0..1.0);
                while p > limit {
                    k += 1;
                    p *= rng.random_range(0.0..1.0);
                }
                k
            };
            for i in 0..n {
                arrivals.push(Arrival {
                    at: Duration::from_secs(second)
                        + Duration::from_secs_f64(f64::from(i) / f64::from(n)),
                    count: 1,
                    duration: duration(&mut rng),
                    queue: queue.to_string(),
                });
            }
        }
        Trace::new(arrivals)
    }

    /// Merges two traces (e.g. two queues with different priorities).
    pub fn merge(mut self, other: Trace) -> Self {
        self.arrivals.extend(other.arrivals);
        Trace::new(self.arrivals)
    }

    /// Parses the CSV format.
    pub fn from_csv(text: &str) -> Result<Self, TraceError> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        let (_, header) = lines.next().ok_or(TraceError::Parse {
            line: 1,
            message: "empty file: expected the header at_s,count,duration_s[,queue]".into(),
        })?;
        let cols: Vec<&str> = header.split(',').map(str::trim).collect();
        if cols.len() < 3
            || cols[..3] != ["at_s", "count", "duration_s"]
            || cols.len() > 4
            || (cols.len() == 4 && cols[3] != "queue")
        {
            return Err(TraceError::Parse {
                line: 1,
                message: format!("header {header:?} must be at_s,count,duration_s[,queue]"),
            });
        }
        let mut arrivals = Vec::new();
        for (i, line) in lines {
            let n = i + 1;
            let err = |message: String| TraceError::Parse { line: n, message };
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() != cols.len() {
                return Err(err(format!(
                    "{} fields, the header has {}",
                    f.len(),
                    cols.len()
                )));
            }
            let secs = |name: &str, v: &str| -> Result<Duration, TraceError> {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| {
                        err(format!(
                            "{name} {v:?} is not a non-negative number of seconds"
                        ))
                    })
            };
            let at = secs("at_s", f[0])?;
            let count = f[1]
                .parse::<u32>()
                .map_err(|_| err(format!("count {:?} is not a whole number", f[1])))?;
            let duration = secs("duration_s", f[2])?;
            let queue = f.get(3).map_or("celery", |q| q).to_string();
            if queue.is_empty() {
                return Err(err("queue is empty".into()));
            }
            arrivals.push(Arrival {
                at,
                count,
                duration,
                queue,
            });
        }
        Ok(Trace::new(arrivals))
    }

    /// Reads a CSV trace file.
    pub fn read(path: &Path) -> Result<Self, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Trace::from_csv(&text)
    }

    /// Writes the CSV format (with the queue column).
    pub fn to_csv(&self) -> String {
        let mut out = String::from("at_s,count,duration_s,queue\n");
        for a in &self.arrivals {
            let _ = writeln!(
                out,
                "{},{},{},{}",
                a.at.as_secs_f64(),
                a.count,
                a.duration.as_secs_f64(),
                a.queue
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trip_and_errors_name_the_line() {
        let t = Trace::from_csv("at_s,count,duration_s\n5,2,1.5\n0,1,3\n").unwrap();
        assert_eq!(t.arrivals()[0].at, Duration::ZERO, "sorted by time");
        assert_eq!(t.tasks(), 3);
        assert_eq!(t.busy_time(), Duration::from_secs(6));
        assert_eq!(Trace::from_csv(&t.to_csv()).unwrap(), t);
        let e = Trace::from_csv("at_s,count,duration_s\n1,2,3\n1,x,3\n").unwrap_err();
        assert_eq!(e.to_string(), "line 3: count \"x\" is not a whole number");
        assert!(Trace::from_csv("a,b,c\n").is_err());
        assert!(Trace::from_csv("at_s,count,duration_s\n-1,1,1\n").is_err());
        let commented =
            "# recorded\n  # mode: x\nat_s,count,duration_s,queue\n# between\n1,2,3,q\n";
        let t = Trace::from_csv(commented).unwrap();
        assert_eq!((t.tasks(), t.queues()), (2, vec!["q".to_string()]));
    }
}
