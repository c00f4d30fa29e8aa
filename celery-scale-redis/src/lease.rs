//! A leader lease in Redis, for running several copies of the daemon: one key per binding
//! whose value names the holder and whose expiry is the lease's period.
//!
//! Taking and extending are one Lua script (one round trip, atomic on the server): `SET ... PX`
//! when the key is missing or empty, `PEXPIRE` when it names this holder, and the current holder
//! otherwise. Giving up empties the key (for one more period) only when it still names this
//! holder: a copy that finds it empty knows the lease was given up, not run out, and acts at
//! once; one that finds it missing waits out the previous holder's horizon
//! ([`LeaseReply::Taken`]). Both are safe to repeat, so a command resent after a lost connection
//! does no harm. The key lives on the
//! server the source reads (the master, with Sentinel); a Sentinel failover that loses the key
//! before it reached the new master lets another copy take the lease at once, and the old
//! holder then finds it taken at its next renewal (within a third of the period).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use celery_scale_core::Error;
use celery_scale_core::lease::{LeaseReply, LeaseStore};
use redis::Script;

use crate::RedisSourceError;
use crate::connect::Connector;

/// Replies `{1, holder}` extended, `{2, holder}` taken from nobody (run out), `{3, holder}`
/// taken after a give-up, `{0, other}` held by another.
const TAKE_OR_EXTEND: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, v}
elseif v == false or v == '' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if v == false then return {2, ARGV[1]} end
  return {3, ARGV[1]}
end
return {0, v}
";

const GIVE_UP: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], '', 'PX', ARGV[2])
  return 1
end
return 0
";

/// The longest holder name read back from the key that is shown (the key is writable by
/// anyone with access to the database).
const MAX_HOLDER_SHOWN: usize = 200;

/// A leader lease on one Redis key, made by
/// [`RedisQueueSource::lease`](crate::RedisQueueSource::lease) on the source's connection.
///
/// One Lua script takes the key when it is missing or empty (`SET ... PX`), extends it when it
/// names this holder (`PEXPIRE`), and returns the holder otherwise; another empties it (for one
/// more period) only when it still names this holder, so the next copy knows the lease was
/// given up and acts at once, while one that finds the key missing (run out) waits out the
/// previous holder's horizon. Both are one atomic round trip and safe to resend.
pub struct RedisLease {
    conn: Arc<Connector>,
    url: String,
    key: String,
    holder: String,
    period: Duration,
    take: Script,
    give_up: Script,
}

impl std::fmt::Debug for RedisLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLease")
            .field("url", &self.url)
            .field("key", &self.key)
            .field("holder", &self.holder)
            .field("period", &self.period)
            .finish()
    }
}

impl RedisLease {
    pub(crate) fn new(
        conn: Arc<Connector>,
        url: String,
        key: String,
        holder: String,
        period: Duration,
    ) -> Self {
        RedisLease {
            conn,
            url,
            key,
            holder,
            period,
            take: Script::new(TAKE_OR_EXTEND),
            give_up: Script::new(GIVE_UP),
        }
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    fn period_ms(&self) -> u64 {
        u64::try_from(self.period.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn error(&self, e: redis::RedisError) -> Error {
        RedisSourceError::from_redis(&self.url, e).into()
    }
}

/// The holder a reply names, bounded and printable.
fn shown_holder(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(&raw[..raw.len().min(MAX_HOLDER_SHOWN)]);
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[async_trait]
impl LeaseStore for RedisLease {
    async fn acquire(&self) -> Result<LeaseReply, Error> {
        let ms = self.period_ms();
        let reply: (i64, Vec<u8>) = self
            .conn
            .run(|mut c| {
                let mut call = self.take.key(&self.key);
                call.arg(&self.holder).arg(ms);
                async move { call.invoke_async(&mut c).await }
            })
            .await
            .map_err(|e| self.error(e))?;
        let ours = reply.1 == self.holder.as_bytes();
        Ok(match reply {
            (1 | 3, _) if ours => LeaseReply::Held,
            (2, _) if ours => LeaseReply::Taken,
            (_, holder) => LeaseReply::HeldByOther {
                holder: Some(shown_holder(&holder)),
            },
        })
    }

    async fn release(&self) -> Result<(), Error> {
        let ms = self.period_ms();
        let _: i64 = self
            .conn
            .run(|mut c| {
                let mut call = self.give_up.key(&self.key);
                call.arg(&self.holder).arg(ms);
                async move { call.invoke_async(&mut c).await }
            })
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    fn period(&self) -> Duration {
        self.period
    }

    fn holder(&self) -> &str {
        &self.holder
    }

    fn describe(&self) -> String {
        format!("redis key {:?} at {}", self.key, self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_read_back_is_bounded_and_printable() {
        assert_eq!(shown_holder(b"host:1:2"), "host:1:2");
        assert_eq!(shown_holder(b"a\nb\x1b[31m"), "a?b?[31m");
        assert_eq!(shown_holder(&[b'x'; 10_000]).len(), MAX_HOLDER_SHOWN);
        assert_eq!(shown_holder(&[0xff, 0xfe]), "\u{fffd}\u{fffd}");
    }
}
