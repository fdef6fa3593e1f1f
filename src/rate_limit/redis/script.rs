//! The Lua scripts the store runs, and the units they count in.
//!
//! Each request runs one script on its bucket's key. `redis::Script` sends it with
//! `EVALSHA` (its SHA1 only) and, when the server answers `NOSCRIPT` (a fresh server, a
//! restart, a `SCRIPT FLUSH`), loads it and runs it again: a server that lost its script
//! cache costs one request an extra round trip, not an error.

use std::sync::LazyLock;
use std::time::Duration;

use ::redis::{Script, ScriptInvocation};

use super::store::{Ask, RedisSlot};
use crate::rate_limit::RateLimitConfigError;
#[cfg(doc)]
use crate::rate_limit::Store;
use crate::rate_limit::bucket::{Quota, gcd};

static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("bucket.lua"),
        include_str!("gcra.lua")
    ))
});
static GIVE_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("bucket.lua"),
        include_str!("give_back.lua")
    ))
});

/// The largest tolerance the scripts count in (units): with a wait capped the same, every
/// number they compute stays below 2^53, exact in Lua's doubles.
const MAX_REDIS_SPAN: u64 = 1 << 51;

/// The GCRA script on `bucket` for `ask`, taking up to `batch` times its cost (a batch to
/// lease). Its answer is a [`Reply`](super::reply::Reply).
pub(super) fn gcra(bucket: &[u8], ask: &Ask, batch: u64) -> ScriptInvocation<'static> {
    let mut invocation = GCRA.prepare_invoke();
    invocation
        .key(bucket)
        .arg(ask.scaled.token)
        .arg(ask.scaled.unit)
        .arg(ask.quota().capacity())
        .arg(ask.cost)
        .arg(micros_down(ask.max_wait))
        .arg(batch);
    invocation
}

/// The script that hands `slot` back to its bucket if nobody took tokens since.
pub(super) fn give_back(slot: &RedisSlot) -> ScriptInvocation<'static> {
    let mut invocation = GIVE_BACK.prepare_invoke();
    invocation
        .key(&slot.bucket)
        .arg(&slot.tat)
        .arg(slot.increment)
        .arg(slot.unit);
    invocation
}

/// Rounded down, so that no request waits longer than allowed.
fn micros_down(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// A quota with the units the scripts count it in: a token is `token` units and a
/// microsecond `unit` (the rate in lowest terms, per microsecond).
#[derive(Debug, Clone, Copy)]
pub(super) struct Scaled {
    pub(super) quota: Quota,
    pub(super) token: u64,
    pub(super) unit: u64,
}

impl Scaled {
    /// `quota` in the scripts' units, if they count it exactly.
    pub(super) fn of(quota: Quota) -> Result<Self, RateLimitConfigError> {
        let scaled = Self::unchecked(quota);
        match quota.capacity().checked_mul(scaled.token) {
            Some(tolerance) if tolerance <= MAX_REDIS_SPAN => Ok(scaled),
            _ => Err(RateLimitConfigError::TooLarge),
        }
    }

    /// `quota` in the scripts' units, even if they cannot count it exactly (a store whose
    /// quota [`validate`](Store::validate) refused still decides, never panics).
    pub(super) fn unchecked(quota: Quota) -> Self {
        // `tokens` refills take exactly `nanos`, so `1000 * tokens` take `nanos` µs.
        let (tokens, nanos) = quota.rate();
        let per_micro = u128::from(tokens) * 1000;
        let common = gcd(per_micro, u128::from(nanos));
        Self {
            quota,
            // Cannot truncate: each is at most the number it was divided from, and
            // `tokens` is at most 2^24.
            token: (u128::from(nanos) / common) as u64,
            unit: (per_micro / common) as u64,
        }
    }
}
