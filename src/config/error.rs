//! The one error every configuration type reports: where in the document, and which rule.

use std::error::Error;
use std::fmt;

/// A configuration the layer's builder refused, or a policy that is not in the document.
///
/// [`path`](Self::path) names the field, from the top of the document when the
/// configuration came from [`Policies`](super::Policies) (`limits.payments.refill`), and
/// the message says which rule it broke: the builder's own error, which
/// [`error`](Self::error) returns for a downcast (a
/// [`RateLimitConfigError`](crate::rate_limit::RateLimitConfigError), say).
#[derive(Debug)]
pub struct ConfigError {
    path: String,
    error: Box<dyn Error + Send + Sync>,
}

impl ConfigError {
    pub(crate) fn new(
        path: impl Into<String>,
        error: impl Into<Box<dyn Error + Send + Sync>>,
    ) -> Self {
        Self {
            path: path.into(),
            error: error.into(),
        }
    }

    /// The same error, for a configuration that sits at `prefix` in a larger document.
    pub(crate) fn within(mut self, prefix: &str) -> Self {
        self.path = join(prefix, &self.path);
        self
    }

    /// The field at fault, dotted from the top of the document (`limits.payments.refill`);
    /// a policy's own name (`limits.payments`) when the fault is the policy as a whole.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The rule that was broken: the builder's error (or [`MissingPolicy`], or a
    /// [`PolicyMismatch`]).
    pub fn error(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.error
    }
}

// The rule is part of the message rather than a `source()`, so that a report that walks
// the chain does not print it twice.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.error)
        } else {
            write!(f, "{}: {}", self.path, self.error)
        }
    }
}

impl Error for ConfigError {}

/// `prefix.path`, either of them possibly empty.
pub(crate) fn join(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty()) {
        (true, _) => path.to_owned(),
        (_, true) => prefix.to_owned(),
        _ => format!("{prefix}.{path}"),
    }
}

/// A policy asked for by name that the document does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no such policy")]
pub struct MissingPolicy;

/// A policy built in a way its configuration does not describe: a keyed one without its
/// key extractor, a global one with one, or one on Redis without the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyMismatch {
    /// The configuration is keyed, and key extractors cannot come from a file: build it
    /// with the `keyed` builder method (`build_keyed`, `Policies::keyed_rate_limit`).
    #[error("the policy is keyed: give its key extractor in code (build_keyed)")]
    NeedsExtractor,
    /// A key extractor was given for a configuration without a `keyed` section.
    #[error("the policy is global (no `keyed` section) but was built with a key extractor")]
    NotKeyed,
    /// The configuration keeps its buckets on Redis: build it with the connection
    /// (`build_on_redis`).
    #[error("the policy is on Redis: build it with its connection (build_on_redis)")]
    NeedsRedis,
    /// Built on Redis, but the configuration has no `redis` section.
    #[error("the policy has no `redis` section but was built on Redis")]
    NotOnRedis,
    /// Two settings that exclude each other are both set.
    #[error("`{0}` and `{1}` exclude each other: set one")]
    Exclusive(&'static str, &'static str),
}

/// A live reload that would change an option fixed when the layer was built (global or
/// keyed, the key cap, the store, ...): build a new layer to change it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot change at run time (the layer was built with {was}): build a new layer to change it"
)]
#[non_exhaustive]
pub struct NotReloadable {
    /// What the layer was built with, as the configuration would write it.
    pub was: String,
}

impl NotReloadable {
    pub(crate) fn new(was: impl fmt::Display) -> Self {
        Self {
            was: was.to_string(),
        }
    }

    /// The refusal of a reload that changes the option at `path`, which the layer was
    /// built with as `was`.
    pub(crate) fn at(path: &str, was: impl fmt::Display) -> ConfigError {
        ConfigError::new(path, Self::new(was))
    }

    /// Refuses a reload that would make a global `layer` ("limiter", "breaker") keyed
    /// (a `keyed` section in `keyed_section`) or a keyed one global.
    pub(crate) fn check_keyed(
        keyed_section: bool,
        built_keyed: bool,
        layer: &str,
    ) -> Result<(), ConfigError> {
        let was = match (keyed_section, built_keyed) {
            (true, false) => format!("no `keyed` section (a global {layer})"),
            (false, true) => format!("a `keyed` section (a keyed {layer})"),
            _ => return Ok(()),
        };
        Err(Self::at("keyed", was))
    }

    /// Refuses a reload whose `now` at `path` is not what the layer was built with
    /// (`was`, shown as `show` writes it).
    pub(crate) fn unless_same<T: PartialEq>(
        path: &str,
        now: &T,
        was: &T,
        show: impl FnOnce(&T) -> String,
    ) -> Result<(), ConfigError> {
        if now == was {
            Ok(())
        } else {
            Err(Self::at(path, show(was)))
        }
    }
}
