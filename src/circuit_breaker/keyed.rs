//! One breaker per key, in the crate's bounded keyed table (the module docs of
//! `circuit_breaker` describe the policy at the cap and for requests without a key).
//!
//! Each key's breaker is a [`Core`] of its own, exactly the global breaker's, behind an
//! `Arc` that every call of that key holds until its outcome is known. The table drops a
//! breaker only when it is [idle](Core::is_idle) and nobody holds it: the check runs
//! under the shard's lock, where every lookup takes its reference, so a call can never
//! record into a breaker the table has already dropped.
//!
//! A key's entry also carries the policy its calls decide by, as a global breaker's
//! lanes do: a reload replaces the entry with one holding the new policy (the same core),
//! under the shard's lock that every lookup takes anyway, so the success path reads the
//! policy for free. Calls in flight keep the entry they took, and with it the core:
//! the table counts them through the core's references too.

use super::config::Config;
use super::state::{Core, Observer, Policy, State, Transition, TransitionReason};
use crate::key::{Idle, KeyedTable};
use crate::sync::{self, AtomicU32, AtomicU64, Mutex, Ordering, fence};
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The shortest pause between two sweeps of a full shard that freed nothing: a breaker
/// turns idle when its window has only successes in it, which takes calls, so sweeping
/// more often than this would only make a flood of fresh keys pay for scans.
const SWEEP_SPACING: Duration = Duration::from_millis(10);

/// The observer of a keyed layer: the key (`None` for the shared breaker) and the
/// transition.
pub(crate) type KeyedObserver<K> = Arc<dyn Fn(Option<&K>, &Transition) + Send + Sync>;

/// How a key becomes its `metrics` label, when the user opted in.
pub(crate) type KeyLabel<K> = Arc<dyn Fn(&K) -> String + Send + Sync>;

/// The label of the shared breaker's metrics, when keys are labelled.
const SHARED_LABEL: &str = "(shared)";

/// One key's breaker (or the shared one), the policy its calls decide by, and its
/// `metrics` label.
pub(crate) struct KeyedBreaker {
    pub(crate) core: sync::Arc<Core>,
    /// The policy published with this entry; `None` for the shared breaker, which has
    /// no entry to replace and reads the policy in force.
    policy: Option<Arc<Policy>>,
    label: Option<Arc<str>>,
}

impl KeyedBreaker {
    /// `core`'s entry with the policy in force.
    fn entry(core: sync::Arc<Core>, label: Option<Arc<str>>) -> Self {
        Self {
            policy: Some(core.current_policy()),
            core,
            label,
        }
    }

    /// The policy this entry's calls decide by, if it holds one (else the one in force).
    #[inline]
    pub(crate) fn policy(&self) -> Option<&Policy> {
        self.policy.as_deref()
    }

    /// The label of this breaker's `metrics`, if keys are labelled.
    pub(crate) fn label(&self) -> Option<&str> {
        self.label.as_deref()
    }
}

impl fmt::Debug for KeyedBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBreaker")
            .field("core", &self.core)
            .field("label", &self.label)
            .finish()
    }
}

struct Entry(sync::Arc<KeyedBreaker>);

impl Idle for Entry {
    type Now = Instant;

    /// Held by nobody (no call in flight, no handle working on it), and no worse than a
    /// fresh breaker.
    fn is_idle(&self, now: Instant) -> bool {
        // A call holds the entry it took, which a reload may have replaced since: the
        // core's count covers those.
        if sync::Arc::strong_count(&self.0) != 1 || sync::Arc::strong_count(&self.0.core) != 1 {
            return false;
        }
        // The count is read relaxed: synchronise with the release of the last call's
        // reference, so that the breaker is read as that call left it (one that just
        // opened it must not look closed and be dropped).
        fence(Ordering::Acquire);
        self.0.core.is_idle(now)
    }
}

/// What the layer as a whole was forced into: keys that appear afterwards start there.
const NOT_FORCED: u32 = 0;
const FORCED_OPEN: u32 = 1;
const FORCED_CLOSED: u32 = 2;

/// Everything a key's transition is reported to.
struct Events<K> {
    observer: Option<KeyedObserver<K>>,
    label: Option<KeyLabel<K>>,
}

impl<K: fmt::Debug> Events<K> {
    fn report(&self, key: Option<&K>, label: Option<&str>, transition: &Transition) {
        #[cfg(feature = "tracing")]
        match key {
            Some(key) => tracing::info!(
                target: "palisade::circuit_breaker",
                key = ?key,
                from = ?transition.from,
                to = ?transition.to,
                reason = ?transition.reason,
                "circuit breaker changed state"
            ),
            None => tracing::info!(
                target: "palisade::circuit_breaker",
                key = SHARED_LABEL,
                from = ?transition.from,
                to = ?transition.to,
                reason = ?transition.reason,
                "circuit breaker changed state"
            ),
        }
        crate::metrics::circuit_transition(transition.from, transition.to, label);
        if let Some(observer) = &self.observer {
            observer(key, transition);
        }
    }
}

/// The breakers of a keyed layer: one per tracked key, and one shared by requests
/// without a key and by new keys the full table cannot track.
pub(crate) struct KeyedBreakers<K> {
    table: KeyedTable<K, Entry>,
    /// The shared breaker, whose configuration is also the one a new key's starts with.
    shared: sync::Arc<KeyedBreaker>,
    max_keys: usize,
    /// Serialises reloads, so that every breaker ends with the last one's configuration.
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    reloading: Mutex<()>,
    events: Arc<Events<K>>,
    forced: AtomicU32,
    /// Calls a keyed layer in shadow mode let through that its breakers refused, since
    /// it was built or reset: the layer's total, which the table's dropping of idle
    /// breakers does not lose.
    shadow_rejected: AtomicU64,
}

impl<K> fmt::Debug for KeyedBreakers<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBreakers")
            .field("shared", &self.shared)
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl<K> KeyedBreakers<K>
where
    K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
{
    /// Counts a call the layer in shadow mode let through instead of rejecting it.
    pub(crate) fn count_shadow_rejected(&self) {
        self.shadow_rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// The calls the layer in shadow mode let through instead of rejecting them.
    pub(crate) fn shadow_rejected(&self) -> u64 {
        self.shadow_rejected.load(Ordering::Relaxed)
    }

    /// Whether the layer runs in shadow mode.
    pub(crate) fn is_shadow(&self) -> bool {
        self.shared.core.is_shadow()
    }

    /// The most keys the layer tracks.
    #[cfg(feature = "serde")]
    pub(crate) fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Puts `config` in force for every breaker: the shared one, then every tracked
    /// key's (each as [`Core::reload`] says), and every key's that appears afterwards.
    ///
    /// A new key's breaker takes the shared breaker's configuration under its shard's
    /// lock, and the tracked ones are collected shard by shard under the same locks
    /// after the shared breaker took the new one: a breaker created during the reload
    /// either starts with the new configuration or is in the collection.
    #[cfg(feature = "serde")]
    pub(crate) fn reload(&self, config: Config, now: Instant) {
        let _reloading = sync::lock(&self.reloading);
        self.shared.core.reload(config, now, |_| {});
        let mut tracked = Vec::with_capacity(self.len());
        self.table.for_each(|key, Entry(breaker)| {
            tracked.push((key.clone(), sync::Arc::clone(breaker)));
        });
        for (key, breaker) in tracked {
            breaker.core.reload(config, now, |_| {});
            // The entry's calls move to the new policy; an entry the table dropped (or
            // replaced with a fresh breaker, which took the new policy) is left alone.
            let mut slot = self.table.slot(&key);
            if let Some(Entry(entry)) = slot.get_mut()
                && sync::Arc::ptr_eq(&entry.core, &breaker.core)
            {
                let label = entry.label.clone();
                *entry =
                    sync::Arc::new(KeyedBreaker::entry(sync::Arc::clone(&breaker.core), label));
            }
        }
    }

    /// Every tracked breaker, collected so that what is done to them (user code, in
    /// transitions) runs outside the shards' locks.
    fn collect(&self) -> Vec<sync::Arc<KeyedBreaker>> {
        let mut breakers = Vec::with_capacity(self.len());
        self.table
            .for_each(|_, Entry(breaker)| breakers.push(sync::Arc::clone(breaker)));
        breakers
    }

    /// Breakers for at most `max_keys` keys (`max_keys >= 1`) plus the shared one.
    pub(crate) fn new(
        config: Config,
        max_keys: usize,
        observer: Option<KeyedObserver<K>>,
        label: Option<KeyLabel<K>>,
        now: Instant,
    ) -> Self {
        let events = Arc::new(Events { observer, label });
        let shared_label: Option<Arc<str>> = events.label.as_ref().map(|_| SHARED_LABEL.into());
        let listener: Observer = {
            let events = Arc::clone(&events);
            let label = shared_label.clone();
            Arc::new(move |transition| events.report(None, label.as_deref(), transition))
        };
        Self {
            // A breaker with only successes is idle at once: sweep only for room.
            table: KeyedTable::sweeping_when_full(max_keys),
            shared: sync::Arc::new(KeyedBreaker {
                core: sync::Arc::new(Core::keyed(config, listener, now)),
                policy: None,
                label: shared_label,
            }),
            max_keys,
            reloading: Mutex::new(()),
            events,
            forced: AtomicU32::new(NOT_FORCED),
            shadow_rejected: AtomicU64::new(0),
        }
    }

    /// The breaker a request with `key` goes through: its key's (created if the table
    /// has room), or the shared one. `now` is read only for a key the table does not
    /// track yet.
    #[inline]
    pub(crate) fn breaker(
        &self,
        key: Option<&K>,
        now: impl FnOnce() -> Instant,
    ) -> sync::Arc<KeyedBreaker> {
        let Some(key) = key else {
            return sync::Arc::clone(&self.shared);
        };
        let mut slot = self.table.slot(key);
        if let Some(Entry(breaker)) = slot.get() {
            return sync::Arc::clone(breaker);
        }
        let now = now();
        let fresh = || Entry(self.fresh(key, now));
        match slot.insert_with(fresh, now, || now + SWEEP_SPACING) {
            Some(Entry(breaker)) => sync::Arc::clone(breaker),
            None => sync::Arc::clone(&self.shared),
        }
    }

    /// A new breaker for `key`, in the state the layer as a whole was forced into.
    fn fresh(&self, key: &K, now: Instant) -> sync::Arc<KeyedBreaker> {
        let label: Option<Arc<str>> = self.events.label.as_ref().map(|label| label(key).into());
        let listener: Observer = {
            let events = Arc::clone(&self.events);
            let (key, label) = (key.clone(), label.clone());
            Arc::new(move |transition| events.report(Some(&key), label.as_deref(), transition))
        };
        let core = Core::keyed(self.shared.core.config(), listener, now);
        match self.forced.load(Ordering::Acquire) {
            FORCED_OPEN => core.start_in(State::ForcedOpen),
            FORCED_CLOSED => core.start_in(State::ForcedClosed),
            _ => {}
        }
        sync::Arc::new(KeyedBreaker::entry(sync::Arc::new(core), label))
    }

    /// `key`'s breaker, if the table tracks it.
    pub(crate) fn tracked(&self, key: &K) -> Option<sync::Arc<KeyedBreaker>> {
        let slot = self.table.slot(key);
        slot.get().map(|Entry(breaker)| sync::Arc::clone(breaker))
    }

    /// Whether `breaker` is the shared one.
    pub(crate) fn is_shared(&self, breaker: &sync::Arc<KeyedBreaker>) -> bool {
        sync::Arc::ptr_eq(breaker, &self.shared)
    }

    /// The shared breaker.
    pub(crate) fn shared(&self) -> &Core {
        &self.shared.core
    }

    /// The state a fresh key's breaker starts in.
    pub(crate) fn fresh_state(&self) -> State {
        match self.forced.load(Ordering::Acquire) {
            FORCED_OPEN => State::ForcedOpen,
            FORCED_CLOSED => State::ForcedClosed,
            _ => State::Closed,
        }
    }

    /// Every tracked key whose breaker is not closed, with its state.
    pub(crate) fn not_closed(&self) -> Vec<(K, State)> {
        let mut keys = Vec::new();
        self.table.for_each(|key, Entry(breaker)| {
            let state = breaker.core.state();
            if state != State::Closed {
                keys.push((key.clone(), state));
            }
        });
        keys
    }

    /// How many keys the table tracks.
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// Forces `key`'s breaker (tracking the key if it is new and there is room); false
    /// when the table is full of live breakers. The transition is reported outside the
    /// table's lock, so an observer may use the handle.
    pub(crate) fn force_one(
        &self,
        key: &K,
        state: State,
        reason: TransitionReason,
        now: Instant,
    ) -> bool {
        let breaker = if reason == TransitionReason::Reset {
            // A breaker the table does not track is a fresh one already.
            self.tracked(key)
        } else {
            Some(self.breaker(Some(key), || now)).filter(|breaker| !self.is_shared(breaker))
        };
        match breaker {
            Some(breaker) => {
                breaker.core.force(state, reason, now);
                true
            }
            None => reason == TransitionReason::Reset,
        }
    }

    /// Forces every breaker, the shared one included, and the breakers of keys that
    /// appear afterwards (until a [reset](TransitionReason::Reset), which returns them
    /// all to closed).
    pub(crate) fn force_all(&self, state: State, reason: TransitionReason, now: Instant) {
        if reason == TransitionReason::Reset {
            self.shadow_rejected.store(0, Ordering::Relaxed);
        }
        let forced = match state {
            State::ForcedOpen => FORCED_OPEN,
            State::ForcedClosed => FORCED_CLOSED,
            _ => NOT_FORCED,
        };
        self.forced.store(forced, Ordering::Release);
        for breaker in self.collect().iter().chain([&self.shared]) {
            breaker.core.force(state, reason, now);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
