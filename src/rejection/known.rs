//! The one place that knows palisade's concrete rejection types. A new rejection is one
//! line here and a `rejection()` method beside its type; every mapper and the retry
//! layer then understand it.

use std::error::Error;

use super::{Rejection, RejectionKind};

macro_rules! known_rejections {
    ($($(#[$attr:meta])* $rejection:ty,)*) => {
        /// The description of `error` itself (not its sources), if it is a rejection.
        pub(super) fn describe(error: &(dyn Error + 'static)) -> Option<Rejection> {
            $(
                $(#[$attr])*
                if let Some(rejection) = error.downcast_ref::<$rejection>() {
                    return Some(rejection.rejection());
                }
            )*
            error
                .is::<tower::timeout::error::Elapsed>()
                .then_some(Rejection::new(RejectionKind::DeadlineExceeded, "request timed out"))
        }

        // axum handlers and extractors may return any rejection directly.
        #[cfg(feature = "axum")]
        mod into_response {
            use axum_core::response::{IntoResponse, Response};

            $(
                $(#[$attr])*
                impl IntoResponse for $rejection {
                    fn into_response(self) -> Response {
                        self.rejection().to_http_response()
                    }
                }
            )*
        }
    };
}

known_rejections! {
    crate::rejection::Rejected,
    crate::circuit_breaker::CircuitOpen,
    crate::rate_limit::RateLimited,
    crate::rate_limit::CostExceedsCapacity,
    crate::rate_limit::MissingKey,
    #[cfg(feature = "redis")]
    crate::rate_limit::RedisUnavailable,
    crate::retry::AttemptTimedOut,
    crate::context::DeadlineExceeded,
    crate::concurrency_limit::Overloaded,
}
