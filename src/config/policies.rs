//! A document of named policies, several per layer.

use super::error::{ConfigError, MissingPolicy};
use super::{
    CircuitBreakerConfig, ConcurrencyLimitConfig, DeadlinesConfig, RateLimitConfig, RetryConfig,
};
use crate::circuit_breaker::{
    CircuitBreakerLayer, CircuitBreakerLayerBuilder, KeyedCircuitBreakerLayer,
};
use crate::concurrency_limit::{ConcurrencyLimitLayer, ConcurrencyLimitLayerBuilder};
use crate::rate_limit::{Builder, LocalStore, RateLimitLayer, UnitCost};
use crate::retry::{RetryLayer, RetryLayerBuilder};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::hash::Hash;

/// Named policies for every layer, as one document: `limits`, `breakers`, `retries`,
/// `concurrency` and `deadlines`, each a table of policies by name.
///
/// Each policy is built by name, through its layer's builder, so that an error names
/// its place in the document: `policies.rate_limit("payments")` fails with
/// `limits.payments.refill: ...` for a bad refill, and with `limits.payments: no such
/// policy` for a missing one. Building a layer creates its state: build once and clone
/// the layer wherever the same policy applies (see [principle 1](crate#quick-start)).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Policies {
    /// Rate limits ([`RateLimitConfig`]) by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, RateLimitConfig>,
    /// Circuit breakers ([`CircuitBreakerConfig`]) by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub breakers: BTreeMap<String, CircuitBreakerConfig>,
    /// Retry policies ([`RetryConfig`]) by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub retries: BTreeMap<String, RetryConfig>,
    /// Concurrency limits ([`ConcurrencyLimitConfig`]) by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub concurrency: BTreeMap<String, ConcurrencyLimitConfig>,
    /// Incoming deadlines ([`DeadlinesConfig`]) by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deadlines: BTreeMap<String, DeadlinesConfig>,
}

/// The policy `name` of `section`, and its path in the document.
fn find<'a, T>(
    section: &'static str,
    policies: &'a BTreeMap<String, T>,
    name: &str,
) -> Result<(&'a T, String), ConfigError> {
    let path = super::error::join(section, name);
    match policies.get(name) {
        Some(policy) => Ok((policy, path)),
        None => Err(ConfigError::new(path, MissingPolicy)),
    }
}

/// Builds the policy `name` of `section` with `build`, its errors placed in the document.
fn build<T, L>(
    section: &'static str,
    policies: &BTreeMap<String, T>,
    name: &str,
    build: impl FnOnce(&T) -> Result<L, ConfigError>,
) -> Result<L, ConfigError> {
    let (policy, path) = find(section, policies, name)?;
    build(policy).map_err(|error| error.within(&path))
}

impl Policies {
    /// The global rate limit `name`, in process.
    pub fn rate_limit(&self, name: &str) -> Result<RateLimitLayer, ConfigError> {
        build("limits", &self.limits, name, RateLimitConfig::build)
    }

    /// The keyed rate limit `name`, with `extractor` (its configuration has a `keyed`
    /// section).
    pub fn keyed_rate_limit<X, K>(
        &self,
        name: &str,
        extractor: X,
    ) -> Result<RateLimitLayer<X, UnitCost, LocalStore<K>>, ConfigError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        build("limits", &self.limits, name, |policy| {
            policy.build_keyed(extractor)
        })
    }

    /// Reloads the layer behind `handle` with the rate limit `name` (see
    /// [`RateLimitHandle::reload`](crate::rate_limit::RateLimitHandle::reload)): an error
    /// names its place in the document (`limits.per_client.capacity`), and changes
    /// nothing.
    pub fn reload_rate_limit<St: crate::rate_limit::Store>(
        &self,
        name: &str,
        handle: &crate::rate_limit::RateLimitHandle<St>,
    ) -> Result<(), ConfigError> {
        build("limits", &self.limits, name, |policy| handle.reload(policy))
    }

    /// The rate limit `name`, applied to `builder` (keyed, with a cost or headers) and
    /// built in process.
    pub fn rate_limit_from<X, C, K, H>(
        &self,
        name: &str,
        builder: Builder<X, C, K, H>,
    ) -> Result<RateLimitLayer<X, C, LocalStore<K>, H>, ConfigError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        build("limits", &self.limits, name, |policy| {
            policy.build_from(builder)
        })
    }

    /// The rate limit `name`, applied to `builder` and built on the Redis server (or
    /// cluster) behind `connection` (its configuration has a `redis` section).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn rate_limit_on_redis<X, C, K, H>(
        &self,
        name: &str,
        builder: Builder<X, C, K, H>,
        connection: impl Into<crate::rate_limit::RedisConnection>,
    ) -> Result<RateLimitLayer<X, C, crate::rate_limit::RedisStore<K>, H>, ConfigError>
    where
        K: crate::rate_limit::RedisKey + Hash + Eq + Clone + Send + Sync + 'static,
    {
        build("limits", &self.limits, name, |policy| {
            policy.build_on_redis_from(builder, connection)
        })
    }

    /// The circuit breaker `name`, counting every `Err` as a failure.
    pub fn circuit_breaker(&self, name: &str) -> Result<CircuitBreakerLayer, ConfigError> {
        build(
            "breakers",
            &self.breakers,
            name,
            CircuitBreakerConfig::build,
        )
    }

    /// The keyed circuit breakers `name` (one per key), with `extractor` (its
    /// configuration has a `keyed` section).
    pub fn keyed_circuit_breaker<X, K>(
        &self,
        name: &str,
        extractor: X,
    ) -> Result<KeyedCircuitBreakerLayer<X, K>, ConfigError>
    where
        K: Hash + Eq + Clone + std::fmt::Debug + Send + Sync + 'static,
    {
        build("breakers", &self.breakers, name, |policy| {
            policy.build_keyed(extractor)
        })
    }

    /// Reloads the breaker behind `handle` with the circuit breaker `name` (see
    /// [`CircuitBreakerHandle::reload`](crate::circuit_breaker::CircuitBreakerHandle::reload)):
    /// an error names its place in the document (`breakers.payments.minimum_calls`), and
    /// changes nothing.
    pub fn reload_circuit_breaker(
        &self,
        name: &str,
        handle: &crate::circuit_breaker::CircuitBreakerHandle,
    ) -> Result<(), ConfigError> {
        build("breakers", &self.breakers, name, |policy| {
            handle.reload(policy)
        })
    }

    /// Reloads every breaker of the keyed layer behind `handle` with the circuit
    /// breaker `name` (see
    /// [`KeyedCircuitBreakerHandle::reload`](crate::circuit_breaker::KeyedCircuitBreakerHandle::reload)).
    pub fn reload_keyed_circuit_breaker<K>(
        &self,
        name: &str,
        handle: &crate::circuit_breaker::KeyedCircuitBreakerHandle<K>,
    ) -> Result<(), ConfigError>
    where
        K: Hash + Eq + Clone + std::fmt::Debug + Send + Sync + 'static,
    {
        build("breakers", &self.breakers, name, |policy| {
            handle.reload(policy)
        })
    }

    /// The circuit breaker `name`, applied to `builder` (with its classifier).
    pub fn circuit_breaker_from<C>(
        &self,
        name: &str,
        builder: CircuitBreakerLayerBuilder<C>,
    ) -> Result<CircuitBreakerLayer<C>, ConfigError> {
        build("breakers", &self.breakers, name, |policy| {
            policy.build_from(builder)
        })
    }

    /// The retry policy `name`, retrying errors.
    pub fn retry(&self, name: &str) -> Result<RetryLayer, ConfigError> {
        build("retries", &self.retries, name, RetryConfig::build)
    }

    /// The retry policy `name`, applied to `builder` (with its retry policy).
    pub fn retry_from<P, D>(
        &self,
        name: &str,
        builder: RetryLayerBuilder<P, D>,
    ) -> Result<RetryLayer<P, D>, ConfigError> {
        build("retries", &self.retries, name, |policy| {
            policy.build_from(builder)
        })
    }

    /// Reloads the retry layer behind `handle` with the policy `name` (see
    /// [`RetryHandle::reload`](crate::retry::RetryHandle::reload)): an error names its
    /// place in the document (`retries.idempotent.max_attempts`), and changes nothing.
    pub fn reload_retry(
        &self,
        name: &str,
        handle: &crate::retry::RetryHandle,
    ) -> Result<(), ConfigError> {
        build("retries", &self.retries, name, |policy| {
            handle.reload(policy)
        })
    }

    /// The concurrency limit `name`.
    pub fn concurrency_limit(&self, name: &str) -> Result<ConcurrencyLimitLayer, ConfigError> {
        build(
            "concurrency",
            &self.concurrency,
            name,
            ConcurrencyLimitConfig::build,
        )
    }

    /// The keyed (fair per client) concurrency limit `name`, with `extractor` (its
    /// configuration has a `keyed` section).
    pub fn keyed_concurrency_limit<X, K>(
        &self,
        name: &str,
        extractor: X,
    ) -> Result<super::concurrency_limit::KeyedLayer<X, K>, ConfigError>
    where
        X: Send + Sync + 'static,
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        build("concurrency", &self.concurrency, name, |policy| {
            policy.build_keyed(extractor)
        })
    }

    /// The concurrency limit `name`, applied to `builder` (with its classifier and
    /// release).
    pub fn concurrency_limit_from<C, H, X, K>(
        &self,
        name: &str,
        builder: ConcurrencyLimitLayerBuilder<C, H, X, K>,
    ) -> Result<ConcurrencyLimitLayer<C, H, X, K>, ConfigError>
    where
        X: Send + Sync + 'static,
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        build("concurrency", &self.concurrency, name, |policy| {
            policy.build_from(builder)
        })
    }

    /// Reloads the concurrency limit behind `handle` with the policy `name` (see
    /// [`ConcurrencyLimitHandle::reload`](crate::concurrency_limit::ConcurrencyLimitHandle::reload)):
    /// an error names its place in the document (`concurrency.api.max_in_flight`), and
    /// changes nothing.
    pub fn reload_concurrency_limit(
        &self,
        name: &str,
        handle: &crate::concurrency_limit::ConcurrencyLimitHandle,
    ) -> Result<(), ConfigError> {
        build("concurrency", &self.concurrency, name, |policy| {
            handle.reload(policy)
        })
    }

    /// The incoming deadlines `name`.
    #[cfg(feature = "http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn deadlines(
        &self,
        name: &str,
    ) -> Result<crate::correlation::IncomingDeadlines, ConfigError> {
        build("deadlines", &self.deadlines, name, DeadlinesConfig::build)
    }
}
