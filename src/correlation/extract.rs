//! The axum extractor.

use super::CorrelationId;
use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;
use std::convert::Infallible;

/// Extracts the request's ID, as set by [`CorrelationIdLayer`](super::CorrelationIdLayer).
///
/// Use `Option<CorrelationId>` in handlers that may run without the layer.
impl<S: Send + Sync> FromRequestParts<S> for CorrelationId {
    type Rejection = MissingCorrelationId;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        find(parts).ok_or(MissingCorrelationId)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for CorrelationId {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(find(parts))
    }
}

fn find(parts: &Parts) -> Option<CorrelationId> {
    parts
        .extensions
        .get::<CorrelationId>()
        .cloned()
        .or_else(CorrelationId::current)
}

/// Rejection of the [`CorrelationId`] extractor when the handler is not behind a
/// [`CorrelationIdLayer`](super::CorrelationIdLayer): a server bug, so a 500.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no correlation ID: the handler is not behind a CorrelationIdLayer")]
pub struct MissingCorrelationId;

impl IntoResponse for MissingCorrelationId {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}
