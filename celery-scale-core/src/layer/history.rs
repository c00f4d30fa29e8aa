use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Worker counts recorded over time, kept for the longest window a layer looks back over.
#[derive(Debug, Clone, Default)]
pub(crate) struct History {
    entries: VecDeque<(Instant, u32)>,
}

impl History {
    /// Records `value` at `now` and forgets entries older than `keep`.
    pub(crate) fn record(&mut self, now: Instant, value: u32, keep: Duration) {
        while let Some(&(t, _)) = self.entries.front() {
            if now.saturating_duration_since(t) > keep {
                self.entries.pop_front();
            } else {
                break;
            }
        }
        self.entries.push_back((now, value));
    }

    /// The values recorded within `window` before `now` (inclusive).
    pub(crate) fn within(&self, now: Instant, window: Duration) -> impl Iterator<Item = u32> + '_ {
        self.entries
            .iter()
            .filter(move |(t, _)| now.saturating_duration_since(*t) <= window)
            .map(|(_, v)| *v)
    }
}
