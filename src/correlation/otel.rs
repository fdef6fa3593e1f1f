//! The `opentelemetry` feature: OpenTelemetry's own W3C propagator at both ends, so that
//! the spans `tracing-opentelemetry` exports form one trace across the hops.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::try_from(value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Makes the incoming context the parent of the request's span. Called only for a
/// `traceparent` palisade's own parser accepted (once, valid), so that a repeated one
/// is not half-trusted by the propagator.
pub(super) fn set_parent(span: &tracing::Span, headers: &HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer records the span: nothing to link.
        let _ = span.set_parent(parent);
    }
}

/// Injects the current span's OpenTelemetry context; `false` when it has none (no
/// OpenTelemetry layer, or no span), and palisade's own context is sent instead.
pub(super) fn inject_current_span(headers: &mut HeaderMap) -> bool {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return false;
    }
    TraceContextPropagator::new().inject_context(&context, &mut HeadersMut(headers));
    true
}
