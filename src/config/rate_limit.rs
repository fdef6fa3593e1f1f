//! The rate limiter's configuration.

use super::error::{ConfigError, NotReloadable, PolicyMismatch};
use crate::rate_limit::{
    Builder, DEFAULT_MAX_KEYS, LocalStore, Quota, RateLimitConfigError, RateLimitLayer, Settings,
    WhenKeyMissing,
};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::hash::Hash;
use std::time::Duration;

/// A [`RateLimitLayer`] as data: `capacity` and `refill` are required, every other field
/// left out keeps the builder's default.
///
/// ```toml
/// capacity = 100
/// refill = "50/s"           # or { tokens = 50, per = "1s" }
/// max_wait = "250ms"        # default 0: refuse at once
/// shadow = true             # decide and count, refuse nothing (default false)
/// keyed = { max_keys = 100000, when_key_missing = "reject" }
/// ```
///
/// A policy with a `keyed` section takes its key extractor in code
/// ([`build_keyed`](Self::build_keyed)), one with a `redis` section its connection
/// (`build_on_redis`, feature `redis`); [`build`](Self::build) refuses both, so that a
/// file and the code that builds it cannot silently disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RateLimitConfig {
    /// The burst size: how many tokens a full bucket holds.
    pub capacity: u64,
    /// The refill rate: `tokens` per `per`.
    pub refill: Refill,
    /// How long a request may wait for its slot (default zero: refused at once).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_wait: Option<Duration>,
    /// One bucket per key; the extractor comes from code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyed: Option<KeyedRateLimitConfig>,
    /// The buckets on a Redis server shared by a fleet; the connection comes from code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
    /// [Shadow mode](crate::rate_limit::Builder::shadow): decide and count, refuse
    /// nothing (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<bool>,
}

/// The `keyed` section of a [`RateLimitConfig`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KeyedRateLimitConfig {
    /// The most keys tracked (default 100,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<usize>,
    /// What a request without a key gets (default `reject`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_key_missing: Option<WhenKeyMissingConfig>,
}

/// [`WhenKeyMissing`] as data: `"reject"` or `"share"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenKeyMissingConfig {
    /// [`WhenKeyMissing::Reject`].
    Reject,
    /// [`WhenKeyMissing::Share`].
    Share,
}

impl From<WhenKeyMissingConfig> for WhenKeyMissing {
    fn from(when: WhenKeyMissingConfig) -> Self {
        match when {
            WhenKeyMissingConfig::Reject => Self::Reject,
            WhenKeyMissingConfig::Share => Self::Share,
        }
    }
}

/// A refill rate: `tokens` every `per`. Written `"100/s"`, `"5/250ms"`, `"1000/1m"` (the
/// period in [humantime](https://docs.rs/humantime) syntax, a bare unit meaning one of
/// it) or `{ tokens = 100, per = "1s" }`; serialized as the string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill {
    /// Tokens added per period.
    pub tokens: u64,
    /// The period.
    pub per: Duration,
}

impl Refill {
    /// `tokens` every `per`.
    pub const fn new(tokens: u64, per: Duration) -> Self {
        Self { tokens, per }
    }
}

impl std::str::FromStr for Refill {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (tokens, per) = text
            .split_once('/')
            .ok_or_else(|| format!("a rate is `tokens/period` (\"100/s\"), got {text:?}"))?;
        let tokens = tokens
            .trim()
            .parse()
            .map_err(|_| format!("the tokens of {text:?} are not a whole number"))?;
        let per = per.trim();
        // "100/s": a bare unit is one of it.
        let starts_with_unit = per.chars().next().is_some_and(char::is_alphabetic);
        let per = if starts_with_unit {
            humantime_serde::re::humantime::parse_duration(&format!("1{per}"))
        } else {
            humantime_serde::re::humantime::parse_duration(per)
        }
        .map_err(|error| format!("the period of {text:?}: {error}"))?;
        Ok(Self { tokens, per })
    }
}

impl fmt::Display for Refill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = humantime_serde::re::humantime::format_duration(self.per);
        write!(f, "{}/{per}", self.tokens)
    }
}

impl Serialize for Refill {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Refill {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            tokens: u64,
            #[serde(with = "humantime_serde")]
            per: Duration,
        }

        struct RefillVisitor;

        impl<'de> Visitor<'de> for RefillVisitor {
            type Value = Refill;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate such as \"100/s\" or { tokens, per }")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Refill, E> {
                text.parse().map_err(E::custom)
            }

            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Refill, M::Error> {
                let table = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Refill::new(table.tokens, table.per))
            }
        }

        deserializer.deserialize_any(RefillVisitor)
    }
}

/// The `redis` section of a [`RateLimitConfig`]: the
/// [`RedisOptions`](crate::rate_limit::RedisOptions) without the connection, each field
/// left out keeping its default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The start of every key (default `palisade:rl:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// How long a request waits for Redis (default 5 ms).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// While Redis is down, how often one request asks it again (default 100 ms).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub recheck: Option<Duration>,
    /// What requests get while Redis does not answer (default `admit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_unavailable: Option<WhenUnavailableConfig>,
    /// The most keys the local fallback tracks (default 100,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_max_keys: Option<usize>,
    /// Lease tokens this many requests at a time (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
    /// How long a batch's unspent tokens stay usable.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub lease_for: Option<Duration>,
    /// The most keys holding a batch at once (default 10,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_max_keys: Option<usize>,
}

/// `WhenUnavailable` as data: `"admit"`, `"reject"` or `{ local = { replicas = 4 } }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WhenUnavailableConfig {
    /// Fail open.
    Admit,
    /// Fail closed.
    Reject,
    /// Decide in process on a share of the limit.
    Local {
        /// How many replicas share the limit.
        replicas: std::num::NonZeroU32,
    },
}

#[cfg(feature = "redis")]
impl RedisConfig {
    /// The options this section describes, over [`RedisOptions::default`](crate::rate_limit::RedisOptions).
    pub fn options(&self) -> crate::rate_limit::RedisOptions {
        use crate::rate_limit::{RedisOptions, WhenUnavailable};
        let mut options = RedisOptions::default();
        if let Some(prefix) = &self.prefix {
            options = options.prefix(prefix.as_bytes());
        }
        if let Some(timeout) = self.timeout {
            options = options.timeout(timeout);
        }
        if let Some(recheck) = self.recheck {
            options = options.recheck(recheck);
        }
        if let Some(when) = self.when_unavailable {
            options = options.when_unavailable(match when {
                WhenUnavailableConfig::Admit => WhenUnavailable::Admit,
                WhenUnavailableConfig::Reject => WhenUnavailable::Reject,
                WhenUnavailableConfig::Local { replicas } => WhenUnavailable::Local { replicas },
            });
        }
        if let Some(max_keys) = self.fallback_max_keys {
            options = options.fallback_max_keys(max_keys);
        }
        if let Some(batch) = self.batch {
            options = options.batch(batch);
        }
        if let Some(lease_for) = self.lease_for {
            options = options.lease_for(lease_for);
        }
        if let Some(max_keys) = self.lease_max_keys {
            options = options.lease_max_keys(max_keys);
        }
        options
    }
}

/// A reload refused at `path`: the layer was built with `was` there.
fn fixed(path: &str, was: &dyn fmt::Display) -> Result<(), ConfigError> {
    Err(NotReloadable::at(path, was))
}

impl RateLimitConfig {
    /// `capacity` tokens refilled at `refill`, every other setting at its default.
    pub fn new(capacity: u64, refill: Refill) -> Self {
        Self {
            capacity,
            refill,
            max_wait: None,
            keyed: None,
            redis: None,
            shadow: None,
        }
    }

    /// Sets this configuration's fields on `builder` (one made by
    /// [`RateLimitLayer::builder`], perhaps already [`keyed`](Builder::keyed), with a
    /// [`cost`](Builder::cost) or [`headers_on_success`](Builder::headers_on_success)),
    /// leaving the others as they are.
    pub fn apply<X, C, K, H>(&self, builder: Builder<X, C, K, H>) -> Builder<X, C, K, H> {
        let mut builder = builder
            .capacity(self.capacity)
            .refill(self.refill.tokens, self.refill.per);
        if let Some(max_wait) = self.max_wait {
            builder = builder.max_wait(max_wait);
        }
        if let Some(shadow) = self.shadow {
            builder = builder.shadow(shadow);
        }
        if let Some(keyed) = &self.keyed {
            if let Some(max_keys) = keyed.max_keys {
                builder = builder.max_keys(max_keys);
            }
            if let Some(when) = keyed.when_key_missing {
                builder = builder.when_key_missing(when.into());
            }
        }
        builder
    }

    /// The global limiter this configuration describes, in process.
    pub fn build(&self) -> Result<RateLimitLayer, ConfigError> {
        self.build_from(RateLimitLayer::builder())
    }

    /// The keyed limiter this configuration describes, with `extractor` (a closure
    /// `Fn(&Req) -> Option<K>` or one of the [`key`](crate::key) extractors); the
    /// configuration must have a `keyed` section.
    pub fn build_keyed<X, K>(
        &self,
        extractor: X,
    ) -> Result<RateLimitLayer<X, crate::rate_limit::UnitCost, LocalStore<K>>, ConfigError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        self.build_from(RateLimitLayer::builder().keyed(extractor))
    }

    /// Applies this configuration to `builder` and builds it in process: the builder's
    /// validation, with its errors named by field. `builder` must be keyed exactly when
    /// the configuration is.
    pub fn build_from<X, C, K, H>(
        &self,
        builder: Builder<X, C, K, H>,
    ) -> Result<RateLimitLayer<X, C, LocalStore<K>, H>, ConfigError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        self.check_shape(builder.is_keyed(), false)?;
        self.apply(builder)
            .build()
            .map_err(|error| self.locate(error))
    }

    /// The quota a live reload to this configuration switches a layer built with `built`
    /// to: `build()`'s validation, and the layer's options that cannot change left as
    /// they are (the store checks its own: [`Store::check_reload`](crate::rate_limit::Store::check_reload)).
    pub(crate) fn reload_quota(&self, built: &Settings) -> Result<Quota, ConfigError> {
        self.check_fixed(built)?;
        let quota = Quota::new(self.capacity, self.refill.tokens, self.refill.per)
            .map_err(|error| self.locate(error))?;
        if !quota.fits_wait(built.max_wait) {
            return Err(self.locate(RateLimitConfigError::TooLarge));
        }
        Ok(quota)
    }

    /// The first option of the layer that differs from what it was built with and cannot
    /// change at run time.
    fn check_fixed(&self, built: &Settings) -> Result<(), ConfigError> {
        NotReloadable::check_keyed(self.keyed.is_some(), built.keyed, "limiter")?;
        if let Some(keyed) = &self.keyed {
            let max_keys = keyed.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
            if max_keys != built.max_keys {
                return fixed("keyed.max_keys", &built.max_keys);
            }
            let when = keyed
                .when_key_missing
                .map_or(WhenKeyMissing::default(), WhenKeyMissing::from);
            if when != built.when_key_missing {
                return fixed(
                    "keyed.when_key_missing",
                    &format_args!("{:?}", built.when_key_missing),
                );
            }
        }
        if self.max_wait.unwrap_or_default() != built.max_wait {
            let was = humantime_serde::re::humantime::format_duration(built.max_wait);
            return fixed("max_wait", &was);
        }
        Ok(())
    }

    /// For a reload of a store without a `redis` section: the configuration has none
    /// either.
    pub(crate) fn check_not_on_redis(&self) -> Result<(), ConfigError> {
        match self.redis {
            Some(_) => fixed("redis", &"no `redis` section"),
            None => Ok(()),
        }
    }

    /// Whether the way it is built matches what the configuration describes.
    fn check_shape(&self, keyed: bool, on_redis: bool) -> Result<(), ConfigError> {
        let mismatch = match (self.keyed.is_some(), keyed) {
            (true, false) => Some(("keyed", PolicyMismatch::NeedsExtractor)),
            (false, true) => Some(("", PolicyMismatch::NotKeyed)),
            _ => match (self.redis.is_some(), on_redis) {
                (true, false) => Some(("redis", PolicyMismatch::NeedsRedis)),
                (false, true) => Some(("", PolicyMismatch::NotOnRedis)),
                _ => None,
            },
        };
        mismatch.map_or(Ok(()), |(path, mismatch)| {
            Err(ConfigError::new(path, mismatch))
        })
    }

    /// The field a builder error is about.
    fn locate(&self, error: RateLimitConfigError) -> ConfigError {
        let redis = self.redis.as_ref();
        let path = match error {
            RateLimitConfigError::ZeroCapacity => "capacity",
            RateLimitConfigError::ZeroRefillTokens
            | RateLimitConfigError::ZeroRefillPeriod
            | RateLimitConfigError::RateTooHigh => "refill",
            RateLimitConfigError::TooLarge => {
                match Quota::new(self.capacity, self.refill.tokens, self.refill.per) {
                    Err(_) => "capacity",
                    Ok(quota) if !quota.fits_wait(self.max_wait.unwrap_or_default()) => "max_wait",
                    Ok(_) if redis.is_some_and(|redis| redis.lease_for.is_some()) => {
                        "redis.lease_for"
                    }
                    Ok(_) => "capacity",
                }
            }
            RateLimitConfigError::ZeroMaxKeys => {
                let keyed_zero = self
                    .keyed
                    .as_ref()
                    .is_some_and(|keyed| keyed.max_keys == Some(0));
                if keyed_zero {
                    "keyed.max_keys"
                } else if redis.is_some_and(|redis| redis.fallback_max_keys == Some(0)) {
                    "redis.fallback_max_keys"
                } else {
                    "redis.lease_max_keys"
                }
            }
            RateLimitConfigError::ZeroBatch => "redis.batch",
        };
        ConfigError::new(path, error)
    }
}

#[cfg(feature = "redis")]
impl RateLimitConfig {
    /// For a reload of a store on Redis built with `built`: the configuration has a
    /// `redis` section, every field of it as the store was built (left out: its default).
    pub(crate) fn check_redis_reload(
        &self,
        built: &crate::rate_limit::RedisOptions,
    ) -> Result<(), ConfigError> {
        let Some(redis) = &self.redis else {
            return fixed("redis", &"a `redis` section (its buckets on Redis)");
        };
        match built.first_difference(&redis.options()) {
            Some((field, was)) => fixed(&super::error::join("redis", field), &was),
            None => Ok(()),
        }
    }

    /// The global limiter this configuration describes, on the Redis server (or
    /// cluster) behind `connection`; the configuration must have a `redis` section.
    pub fn build_on_redis(
        &self,
        connection: impl Into<crate::rate_limit::RedisConnection>,
    ) -> Result<
        RateLimitLayer<
            crate::key::Global,
            crate::rate_limit::UnitCost,
            crate::rate_limit::RedisStore,
        >,
        ConfigError,
    > {
        self.build_on_redis_from(RateLimitLayer::builder(), connection)
    }

    /// [`build_from`](Self::build_from), on the Redis server (or cluster) behind
    /// `connection`, with the `redis` section's options.
    pub fn build_on_redis_from<X, C, K, H>(
        &self,
        builder: Builder<X, C, K, H>,
        connection: impl Into<crate::rate_limit::RedisConnection>,
    ) -> Result<RateLimitLayer<X, C, crate::rate_limit::RedisStore<K>, H>, ConfigError>
    where
        K: crate::rate_limit::RedisKey + Hash + Eq + Clone + Send + Sync + 'static,
    {
        self.check_shape(builder.is_keyed(), true)?;
        let options = self.redis.clone().unwrap_or_default().options();
        let connection = connection.into();
        self.apply(builder)
            .build_with(|quota| crate::rate_limit::RedisStore::new(connection, quota, options))
            .map_err(|error| self.locate(error))
    }
}
