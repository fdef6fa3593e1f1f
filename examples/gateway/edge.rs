//! The API gateway: one bearer-token check at the edge, per-client rate limits keyed on
//! the token's subject, and routing to the backends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The HS256 key the gateway checks tokens with (a demo secret, not for production).
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl TokenKeys {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// Issues a token for `subject`, valid for an hour.
    pub fn issue(&self, subject: &str) -> String {
        let expires = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |now| now.as_secs())
            + 3600;
        let claims = Claims {
            sub: subject.to_owned(),
            exp: expires,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    fn verify(&self, token: &str) -> Option<Subject> {
        let validation = Validation::new(Algorithm::HS256);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()
            .map(|data| Subject(data.claims.sub))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// The authenticated caller, put in the request extensions by [`authenticate`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject(pub String);

/// Checks the bearer token once, at the edge; the backends trust the gateway.
pub async fn authenticate(
    State(keys): State<Arc<TokenKeys>>,
    mut request: Request,
    next: Next,
) -> Response {
    let subject = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(|token| keys.verify(token));
    let Some(subject) = subject else {
        tracing::warn!("gateway: missing or invalid bearer token");
        return (StatusCode::UNAUTHORIZED, "missing or invalid bearer token").into_response();
    };
    request.headers_mut().remove(header::AUTHORIZATION);
    request.extensions_mut().insert(subject);
    next.run(request).await
}

/// Where the gateway forwards to, and the HTTP client it forwards with (behind one
/// circuit breaker per upstream authority).
pub struct Upstreams<C> {
    pub users: SocketAddr,
    pub orders: SocketAddr,
    /// A retired service nobody listens on any more: its breaker opens, and only its.
    pub legacy: SocketAddr,
    pub client: C,
}

/// Forwards the request to the backend that owns its path.
pub async fn forward<C>(
    State(upstreams): State<Arc<Upstreams<C>>>,
    mut request: Request,
) -> Response
where
    C: tower::Service<Request, Response = Response<hyper::body::Incoming>, Error = tower::BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    C::Future: Send,
{
    use tower::ServiceExt;

    let path = request.uri().path();
    let upstream = if path.starts_with("/users") {
        upstreams.users
    } else if path.starts_with("/legacy") {
        upstreams.legacy
    } else {
        upstreams.orders
    };
    let path_and_query = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str());
    let Ok(uri) = format!("http://{upstream}{path_and_query}").parse::<Uri>() else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    tracing::info!(%uri, "gateway: forwarding");
    *request.uri_mut() = uri;
    match upstreams.client.clone().oneshot(request).await {
        Ok(response) => response.map(Body::new),
        // This upstream's breaker is open: 503 with Retry-After, without trying it.
        Err(error) if error.is::<palisade::circuit_breaker::CircuitOpen>() => {
            tracing::warn!(%error, "gateway: upstream's breaker is open");
            palisade::axum::handle_error(error).await
        }
        Err(error) => {
            tracing::warn!(%error, "gateway: upstream unreachable");
            StatusCode::BAD_GATEWAY.into_response()
        }
    }
}
