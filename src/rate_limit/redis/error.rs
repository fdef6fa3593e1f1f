//! The rejection of a request that Redis did not decide, from a store that fails closed.

use std::time::Duration;

use ::redis::RedisError;

use crate::rejection::{Rejection, RejectionKind};

/// A request refused because Redis did not answer and the store is configured to fail
/// closed ([`WhenUnavailable::Reject`](super::WhenUnavailable::Reject)).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct RedisUnavailable(Why);

/// Why Redis gave no decision. Each variant carries when to come back, so that the
/// public error is this one field and shows its message and source (the Redis error,
/// when Redis answered with one; nothing otherwise).
#[derive(Debug, thiserror::Error)]
enum Why {
    #[error("rate limit store (Redis) unavailable: no answer within {timeout:?}")]
    TimedOut {
        timeout: Duration,
        retry_after: Duration,
    },
    #[error("rate limit store (Redis) unavailable: {error}")]
    Failed {
        #[source]
        error: RedisError,
        retry_after: Duration,
    },
    /// An earlier request found Redis down; nobody asked it again yet.
    #[error("rate limit store (Redis) unavailable: not answering")]
    Down { retry_after: Duration },
}

impl RedisUnavailable {
    /// This request waited `timeout` for Redis in vain.
    pub(super) fn no_answer(timeout: Duration, retry_after: Duration) -> Self {
        Self(Why::TimedOut {
            timeout,
            retry_after,
        })
    }

    /// Redis answered this request with `error`.
    pub(super) fn failed(error: RedisError, retry_after: Duration) -> Self {
        Self(Why::Failed { error, retry_after })
    }

    /// Redis is known to be down: this request did not ask it.
    pub(super) fn down(retry_after: Duration) -> Self {
        Self(Why::Down { retry_after })
    }

    /// When the store asks Redis again at the latest.
    pub fn retry_after(&self) -> Duration {
        match self.0 {
            Why::TimedOut { retry_after, .. }
            | Why::Failed { retry_after, .. }
            | Why::Down { retry_after } => retry_after,
        }
    }

    /// Whether this request waited the whole timeout for Redis.
    pub fn timed_out(&self) -> bool {
        matches!(self.0, Why::TimedOut { .. })
    }

    /// How this rejection describes itself: the store is
    /// [`Unavailable`](RejectionKind::Unavailable) until
    /// [`retry_after`](Self::retry_after). The reason does not name the Redis failure,
    /// which is the server's business.
    pub fn rejection(&self) -> Rejection {
        Rejection::new(RejectionKind::Unavailable, "rate limit store unavailable")
            .with_retry_after(self.retry_after())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn the_message_names_the_cause_and_only_a_redis_error_is_the_source() {
        let second = Duration::from_secs(1);
        let timed_out = RedisUnavailable::no_answer(Duration::from_millis(5), second);
        assert_eq!(
            timed_out.to_string(),
            "rate limit store (Redis) unavailable: no answer within 5ms"
        );
        assert!(timed_out.source().is_none());
        assert!(timed_out.timed_out());
        let down = RedisUnavailable::down(second);
        assert_eq!(
            down.to_string(),
            "rate limit store (Redis) unavailable: not answering"
        );
        assert!(down.source().is_none());
        let error = RedisError::from(std::io::Error::other("connection refused"));
        let failed = RedisUnavailable::failed(error, second);
        assert!(
            failed.to_string().contains("connection refused"),
            "{failed}"
        );
        let source = failed.source().expect("the Redis error");
        assert!(source.is::<RedisError>());
        assert_eq!(failed.retry_after(), second);
        assert_eq!(failed.rejection().retry_after(), Some(second));
    }
}
