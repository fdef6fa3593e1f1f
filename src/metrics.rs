//! Counters through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! Emitted only where something noteworthy happens (a transition, a rejection, a retry),
//! never on the success path; without the feature these functions are empty and vanish.
//!
//! | counter | labels | when |
//! |---|---|---|
//! | `palisade_circuit_breaker_transitions_total` | `from`, `to` (and `key` for a keyed breaker that opted in with `key_in_metrics`) | a breaker changes state |
//! | `palisade_circuit_breaker_rejected_total` | (`key`, likewise) | a call is refused by an open breaker |
//! | `palisade_circuit_breaker_shadow_rejected_total` | (`key`, likewise) | a breaker in shadow mode lets through a call it would have refused |
//! | `palisade_rate_limit_rejected_total` | | a request is refused by a rate limiter |
//! | `palisade_rate_limit_shadow_rejected_total` | | a rate limiter in shadow mode lets through a request it would have refused |
//! | `palisade_retry_attempts_total` | `reason` | a request is retried (`error`, `response`, `status`, `grpc_status`, `timeout`, or the kind of a rejection from a layer below: `unavailable` (an open circuit), `overloaded`, `rate_limited`) |
//! | `palisade_retry_budget_exhausted_total` | | a retry is refused by the budget |
//! | `palisade_concurrency_limit_rejected_total` | | a request is refused with `Overloaded` |
//! | `palisade_concurrency_limit_shadow_rejected_total` | | a concurrency limit in shadow mode lets through a request it would have refused |
//!
//! | gauge | when it is set |
//! |---|---|
//! | `palisade_concurrency_limit_limit` | an adaptive limit moves |
//! | `palisade_concurrency_limit_in_flight` | an adaptive limit moves, or a request is refused |

#[cfg(feature = "metrics")]
use crate::circuit_breaker::State;

#[cfg(feature = "metrics")]
fn state_label(state: State) -> &'static str {
    match state {
        State::Closed => "closed",
        State::Open => "open",
        State::HalfOpen => "half_open",
        State::ForcedOpen => "forced_open",
        State::ForcedClosed => "forced_closed",
    }
}

/// `key` is a keyed breaker's key label, when the user opted in to it (one per tracked
/// key at most, so the cardinality is bounded by `max_keys`).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn circuit_transition(
    from: crate::circuit_breaker::State,
    to: crate::circuit_breaker::State,
    key: Option<&str>,
) {
    #[cfg(feature = "metrics")]
    match key {
        None => metrics::counter!(
            "palisade_circuit_breaker_transitions_total",
            "from" => state_label(from),
            "to" => state_label(to),
        )
        .increment(1),
        Some(key) => metrics::counter!(
            "palisade_circuit_breaker_transitions_total",
            "from" => state_label(from),
            "to" => state_label(to),
            "key" => key.to_owned(),
        )
        .increment(1),
    }
}

/// `key` as in [`circuit_transition`].
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn circuit_rejected(key: Option<&str>) {
    #[cfg(feature = "metrics")]
    match key {
        None => metrics::counter!("palisade_circuit_breaker_rejected_total").increment(1),
        Some(key) => metrics::counter!(
            "palisade_circuit_breaker_rejected_total",
            "key" => key.to_owned(),
        )
        .increment(1),
    }
}

/// `key` as in [`circuit_transition`].
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn circuit_rejected_in_shadow(key: Option<&str>) {
    #[cfg(feature = "metrics")]
    match key {
        None => metrics::counter!("palisade_circuit_breaker_shadow_rejected_total").increment(1),
        Some(key) => metrics::counter!(
            "palisade_circuit_breaker_shadow_rejected_total",
            "key" => key.to_owned(),
        )
        .increment(1),
    }
}

pub(crate) fn rate_limited() {
    #[cfg(feature = "metrics")]
    metrics::counter!("palisade_rate_limit_rejected_total").increment(1);
}

pub(crate) fn rate_limited_in_shadow() {
    #[cfg(feature = "metrics")]
    metrics::counter!("palisade_rate_limit_shadow_rejected_total").increment(1);
}

#[cfg(feature = "metrics")]
fn reason_label(reason: crate::retry::RetryReason) -> &'static str {
    use crate::retry::RetryReason;
    match reason {
        RetryReason::Error => "error",
        RetryReason::Response => "response",
        #[cfg(feature = "http")]
        RetryReason::Status(_) => "status",
        #[cfg(feature = "http")]
        RetryReason::Grpc(_) => "grpc_status",
        RetryReason::Rejected(kind) => rejection_label(kind),
        RetryReason::AttemptTimeout => "timeout",
    }
}

#[cfg(feature = "metrics")]
fn rejection_label(kind: crate::rejection::RejectionKind) -> &'static str {
    use crate::rejection::RejectionKind;
    match kind {
        RejectionKind::Unavailable => "unavailable",
        RejectionKind::Overloaded => "overloaded",
        RejectionKind::RateLimited => "rate_limited",
        RejectionKind::Malformed => "malformed",
        RejectionKind::DeadlineExceeded => "deadline_exceeded",
    }
}

#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn retried(reason: crate::retry::RetryReason) {
    #[cfg(feature = "metrics")]
    metrics::counter!("palisade_retry_attempts_total", "reason" => reason_label(reason))
        .increment(1);
}

pub(crate) fn retry_budget_exhausted() {
    #[cfg(feature = "metrics")]
    metrics::counter!("palisade_retry_budget_exhausted_total").increment(1);
}

#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn overloaded(in_flight: u32) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("palisade_concurrency_limit_rejected_total").increment(1);
        metrics::gauge!("palisade_concurrency_limit_in_flight").set(f64::from(in_flight));
    }
}

pub(crate) fn overloaded_in_shadow() {
    #[cfg(feature = "metrics")]
    metrics::counter!("palisade_concurrency_limit_shadow_rejected_total").increment(1);
}

#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn concurrency_limit(limit: u32, in_flight: u32) {
    #[cfg(feature = "metrics")]
    {
        metrics::gauge!("palisade_concurrency_limit_limit").set(f64::from(limit));
        metrics::gauge!("palisade_concurrency_limit_in_flight").set(f64::from(in_flight));
    }
}
