//! The GCRA script's answer, decoded into a named [`Reply`] and turned into an
//! [`Admission`].

use std::time::Duration;

use ::redis::{FromRedisValue, ParsingError, Value};

use super::store::{Ask, RedisReservation, RedisSlot, ReservedOn};
use crate::rate_limit::{Admission, Denied, RateLimitStatus};

/// What `gcra.lua` returns for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reply {
    /// Whether the request was admitted (now, or after `wait`).
    pub(super) admitted: bool,
    /// For an admitted request, how long it waits for its slot; for a refused one, how
    /// long until it would pass (rounded up to a microsecond).
    pub(super) wait: Duration,
    /// The tokens the bucket holds after the decision.
    pub(super) left: u64,
    /// How long until the bucket is full again (rounded up to a microsecond).
    pub(super) until_full: Duration,
    /// The TAT the script stored, exactly as stored: a reservation hands it back to
    /// prove that nobody took tokens since.
    pub(super) tat: String,
    /// How many times its cost the request took: more than once is a batch to lease.
    pub(super) taken: u64,
}

impl FromRedisValue for Reply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        let (admitted, wait, left, until_full, tat, taken): (i64, i64, i64, i64, String, i64) =
            FromRedisValue::from_redis_value(value)?;
        Ok(Self {
            admitted: admitted != 0,
            wait: Duration::from_micros(non_negative(wait)),
            left: non_negative(left),
            until_full: Duration::from_micros(non_negative(until_full)),
            tat,
            taken: non_negative(taken),
        })
    }
}

impl Reply {
    /// The decision for the request `ask` on `bucket`, whose slot (if it waits) is
    /// `increment` script units.
    pub(super) fn into_admission<K>(
        self,
        bucket: Vec<u8>,
        increment: u64,
        ask: &Ask,
    ) -> Admission<RedisReservation<K>> {
        if !self.admitted {
            return Admission::Denied(Denied::Limited {
                retry_after: self.wait,
                remaining: self.left,
            });
        }
        if self.wait.is_zero() {
            return Admission::Admitted {
                status: ask.status.report(|| RateLimitStatus {
                    quota: ask.quota(),
                    remaining: self.left,
                    reset: self.until_full,
                }),
            };
        }
        Admission::Reserved {
            wait: self.wait,
            reservation: RedisReservation {
                reserved_on: ReservedOn::Redis(RedisSlot {
                    bucket,
                    tat: self.tat,
                    increment,
                    unit: ask.scaled.unit,
                }),
            },
        }
    }
}

/// The script's integers are never negative; a server that says otherwise gets zero.
fn non_negative(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_array_is_read_by_position_into_named_fields() {
        let value = Value::Array(vec![
            Value::Int(1),
            Value::Int(250),
            Value::Int(3),
            Value::Int(-1),
            Value::BulkString(b"17.5".to_vec()),
            Value::Int(2),
        ]);
        let reply = Reply::from_redis_value(value).unwrap();
        assert_eq!(
            reply,
            Reply {
                admitted: true,
                wait: Duration::from_micros(250),
                left: 3,
                until_full: Duration::ZERO,
                tat: "17.5".to_owned(),
                taken: 2,
            }
        );
        assert!(Reply::from_redis_value(Value::Array(vec![Value::Int(1)])).is_err());
    }
}
