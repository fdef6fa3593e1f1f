//! The sans-io state machine: plain atomics, the time passed in by the caller.
//!
//! The whole state (which state, a generation that changes on every transition, and
//! until when the breaker stays open) is one packed word. A transition is a
//! compare-and-swap from the exact word its decision was based on, so it happens once
//! however many threads reach the same verdict. The half-open probe bookkeeping is a
//! second packed word stamped with the generation it belongs to, so a late report from
//! an earlier half-open phase changes nothing. Every transition to a state other than
//! half-open stamps it afresh, so its generation never lags far enough behind the state
//! word's for the 16-bit counter to wrap onto a live phase.
//!
//! The configuration and the window it judges by are one [`Policy`], read through one
//! load per decision and replaced whole by a live reload, so that no decision mixes two
//! configurations. What a decision leaves in the state word stays as it was decided: an
//! open breaker keeps the deadline it opened with, and a half-open episode keeps the
//! probe count it started with (the word carries it), so that a reload never strands an
//! episode waiting for probes it no longer admits.

use super::config::{Config, MAX_PROBES};
use super::error::CircuitOpen;
use super::waiters::Waiters;
use super::window::{Counts, Sample, Window};
use crate::classify::Outcome;
use crate::sync::{
    AtomicBool, AtomicU32, AtomicU64, CachePadded, Loaded, Mutex, Ordering, Swap, fence, lock,
};
use std::fmt;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;
use tokio::time::Instant;

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls flow and their outcomes are recorded.
    Closed,
    /// Calls are rejected until the open time has passed.
    Open,
    /// A few probe calls are let through to test the dependency.
    HalfOpen,
    /// Calls are rejected until [`force_closed`] or [`reset`].
    ///
    /// [`force_closed`]: super::CircuitBreakerHandle::force_closed
    /// [`reset`]: super::CircuitBreakerHandle::reset
    ForcedOpen,
    /// Calls flow and nothing is recorded until [`force_open`] or [`reset`].
    ///
    /// [`force_open`]: super::CircuitBreakerHandle::force_open
    /// [`reset`]: super::CircuitBreakerHandle::reset
    ForcedClosed,
}

impl State {
    const ALL: [State; 5] = [
        State::Closed,
        State::Open,
        State::HalfOpen,
        State::ForcedOpen,
        State::ForcedClosed,
    ];
}

/// Why the breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransitionReason {
    /// The failure rate in the window reached the threshold.
    FailureRate,
    /// The slow-call rate in the window reached its threshold.
    SlowCallRate,
    /// The open time passed and a call arrived.
    OpenTimeElapsed,
    /// The half-open probes succeeded.
    ProbesSucceeded,
    /// Too many half-open probes failed.
    ProbesFailed,
    /// Too many half-open probes were slow.
    ProbesSlow,
    /// [`CircuitBreakerHandle::force_open`](super::CircuitBreakerHandle::force_open).
    ForcedOpen,
    /// [`CircuitBreakerHandle::force_closed`](super::CircuitBreakerHandle::force_closed).
    ForcedClosed,
    /// [`CircuitBreakerHandle::reset`](super::CircuitBreakerHandle::reset).
    Reset,
}

/// A state change, as given to the
/// [`on_transition`](super::CircuitBreakerLayerBuilder::on_transition) callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transition {
    /// The state left.
    pub from: State,
    /// The state entered.
    pub to: State,
    /// Why.
    pub reason: TransitionReason,
    /// When.
    pub at: Instant,
}

pub(crate) type Observer = Arc<dyn Fn(&Transition) + Send + Sync>;

/// A snapshot of a breaker, from [`CircuitBreakerHandle::metrics`]: the closed-state
/// window, the current half-open episode and the calls rejected.
///
/// The fields are read one after the other while calls go on, so under load they may
/// be a few calls apart from each other.
///
/// [`CircuitBreakerHandle::metrics`]: super::CircuitBreakerHandle::metrics
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Metrics {
    /// The current state.
    pub state: State,
    /// Calls recorded in the closed-state window (ignored outcomes are not recorded).
    pub calls: u64,
    /// Failed calls in the window.
    pub failures: u64,
    /// Slow calls in the window.
    pub slow_calls: u64,
    /// `failures / calls`, or 0 for an empty window. Only a verdict once
    /// [`minimum_calls_reached`](Self::minimum_calls_reached): a rate of 1.0 over 9
    /// calls with a minimum of 10 does not trip the breaker.
    pub failure_rate: f64,
    /// `slow_calls / calls`, or 0 for an empty window; a verdict under the same
    /// condition as `failure_rate`.
    pub slow_call_rate: f64,
    /// Whether the window holds at least `minimum_calls` calls, so that the closed
    /// breaker acts on its rates.
    pub minimum_calls_reached: bool,
    /// Half-open probes let through and not finished yet (0 unless half-open).
    pub probes_in_flight: u32,
    /// Probes of the current half-open episode that finished without failing (0
    /// unless half-open). A slow success counts here and in `probe_slow_calls`.
    pub probe_successes: u32,
    /// Probes of the current half-open episode that failed (0 unless half-open).
    pub probe_failures: u32,
    /// Probes of the current half-open episode that were slow, whatever their outcome
    /// (0 unless half-open).
    pub probe_slow_calls: u32,
    /// Calls rejected since the breaker was built or last
    /// [`reset`](super::CircuitBreakerHandle::reset): while open, forced open, or
    /// half-open with every probe slot taken. A breaker in shadow mode rejects nothing:
    /// the calls it let through instead are in `shadow_rejected` (both are kept across a
    /// reload that flips the switch).
    pub rejected: u64,
    /// Calls a breaker in [shadow mode](super::CircuitBreakerLayerBuilder::shadow) let
    /// through that it would have rejected, since it was built or last reset (0 for a
    /// breaker never in shadow mode, whose refusals are in `rejected`).
    pub shadow_rejected: u64,
    /// How many times in a row the breaker has opened without closing in between.
    pub consecutive_trips: u32,
    /// When the breaker last changed state, if it ever did.
    pub last_transition: Option<Instant>,
}

/// When a timed call started and ended: what the slow-call check reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    started: Instant,
    ended: Instant,
}

impl Timing {
    #[inline]
    pub(crate) fn new(started: Instant, ended: Instant) -> Self {
        Self { started, ended }
    }

    /// The end: the time the call's outcome is recorded at.
    #[inline]
    pub(crate) fn ended(self) -> Instant {
        self.ended
    }

    /// Whether the call took longer than `threshold`. Compared as instants (the start
    /// plus the threshold against the end), which is exact and cheaper than making the
    /// duration: an addition instead of a subtraction normalized to a `Duration`.
    #[inline]
    fn longer_than(self, threshold: Duration) -> bool {
        self.started
            .checked_add(threshold)
            .is_some_and(|limit| self.ended > limit)
    }
}

/// What [`Core::admit`] grants: the right to call the inner service, and how to record
/// the call's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Permit {
    generation: u16,
    kind: PermitKind,
}

impl Permit {
    /// The permit of a call a breaker in shadow mode refused and let through: like a
    /// forced-closed call's, it records nothing, so that the breaker's window and probes
    /// see what an enforcing breaker's would.
    pub(crate) const SHADOW: Permit = Permit {
        generation: 0,
        kind: PermitKind::Unrecorded,
    };

    /// Whether this permit holds a half-open probe slot.
    pub(crate) fn is_probe(&self) -> bool {
        self.kind == PermitKind::Probe
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PermitKind {
    /// A closed-state call: its outcome goes into the window.
    Closed,
    /// A half-open probe: it holds a probe slot until it reports or is dropped.
    Probe,
    /// A forced-closed call: nothing is recorded.
    Unrecorded,
}

/// The packed state word: 3 bits of state, 16 bits of generation, 45 bits of "open
/// until" in milliseconds since the core's base instant (a thousand years). Half-open
/// has no deadline: the same bits hold the probe slots of the episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Word {
    state: State,
    generation: u16,
    open_until_ms: u64,
}

/// The latest "open until" the state word holds.
const MAX_OPEN_UNTIL_MS: u64 = (1 << 45) - 1;

impl Word {
    fn encode(self) -> u64 {
        self.state as u64 | u64::from(self.generation) << 3 | self.open_until_ms << 19
    }

    fn decode(word: u64) -> Self {
        Self {
            state: State::ALL[(word & 0b111) as usize % State::ALL.len()],
            generation: (word >> 3) as u16,
            open_until_ms: word >> 19,
        }
    }

    /// The word of the next state: a new generation.
    fn next(self, state: State, open_until_ms: u64) -> Self {
        Self {
            state,
            generation: self.generation.wrapping_add(1),
            open_until_ms,
        }
    }

    /// The probe slots of a half-open word.
    fn slots(self) -> u32 {
        self.open_until_ms as u32 & MAX_PROBES
    }
}

/// The packed half-open bookkeeping: the generation it belongs to, then 12 bits each
/// of slots taken, probes completed, failed and slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probes {
    generation: u16,
    taken: u32,
    completed: u32,
    failed: u32,
    slow: u32,
}

impl Probes {
    fn fresh(generation: u16) -> Self {
        Self {
            generation,
            taken: 0,
            completed: 0,
            failed: 0,
            slow: 0,
        }
    }

    fn encode(self) -> u64 {
        let field = |value: u32| u64::from(value & MAX_PROBES);
        u64::from(self.generation)
            | field(self.taken) << 16
            | field(self.completed) << 28
            | field(self.failed) << 40
            | field(self.slow) << 52
    }

    fn decode(word: u64) -> Self {
        let field = |shift: u32| (word >> shift) as u32 & MAX_PROBES;
        Self {
            generation: word as u16,
            taken: field(16),
            completed: field(28),
            failed: field(40),
            slow: field(52),
        }
    }
}

/// What a breaker decides by: its configuration and the window of recent outcomes it
/// judges, swapped together by a live reload.
pub(crate) struct Policy {
    pub(crate) config: Config,
    window: Arc<Window>,
}

impl Policy {
    /// Whether calls are timed, for slow-call detection.
    #[inline]
    pub(crate) fn times_calls(&self) -> bool {
        self.config.slow.is_some()
    }
}

/// Calls refused since build or reset: rejected, or (in shadow mode) let through.
#[derive(Default)]
struct Refusals {
    rejected: AtomicU64,
    shadow: AtomicU64,
}

/// The shared state of one breaker.
pub(crate) struct Core {
    state: CachePadded<AtomicU64>,
    probes: AtomicU64,
    consecutive_trips: AtomicU32,
    jitter_seed: AtomicU64,
    /// Nanoseconds since `base` of the last transition, plus one (0: never).
    last_transition: AtomicU64,
    /// Written only on refusal, on a line of its own so that a flood of rejections does
    /// not contend with the probes or the policy.
    refusals: CachePadded<Refusals>,
    policy: Swap<Policy>,
    /// Whether the policy in force detects slow calls, read when a call starts (to take
    /// its start time) apart from the policy, so that a call costs one policy load. A
    /// call that started under another policy than the one that judges it is timed as
    /// its start saw fit: untimed, it is not slow.
    timed: AtomicBool,
    /// Serialises the handle's changes that move the window (reload, reset).
    writer: Mutex<()>,
    base: Instant,
    observer: Option<Observer>,
    /// Whether `notify` emits the `tracing` event and the `metrics` counter itself; a
    /// keyed breaker's observer does, with the key.
    announce: bool,
    /// Endpoints in a balancer waiting for this breaker to change (ejection mode only).
    waiters: Waiters,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("state", &self.state())
            .field("config", &self.config())
            .field("observer", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// A closed breaker. `now` is the base all later instants are measured from.
    pub(crate) fn new(config: Config, observer: Option<Observer>, now: Instant) -> Self {
        // Seed the jitter per breaker so that a fleet of breakers built at the same moment
        // still spreads out.
        let seed = crate::rng::random_u64();
        Self {
            state: CachePadded(AtomicU64::new(
                Word {
                    state: State::Closed,
                    generation: 0,
                    open_until_ms: 0,
                }
                .encode(),
            )),
            probes: AtomicU64::new(Probes::fresh(0).encode()),
            consecutive_trips: AtomicU32::new(0),
            jitter_seed: AtomicU64::new(seed),
            last_transition: AtomicU64::new(0),
            refusals: CachePadded(Refusals::default()),
            policy: Swap::new(Arc::new(Policy {
                config,
                window: Arc::new(Window::new(config.window, now)),
            })),
            timed: AtomicBool::new(config.slow.is_some()),
            writer: Mutex::new(()),
            base: now,
            observer,
            announce: true,
            waiters: Waiters::default(),
        }
    }

    /// A closed breaker of a keyed layer: `listener` hears of every transition and
    /// reports it (`tracing`, `metrics`, the user's observer) with the key.
    pub(crate) fn keyed(config: Config, listener: Observer, now: Instant) -> Self {
        Self {
            announce: false,
            ..Self::new(config, Some(listener), now)
        }
    }

    /// Puts a breaker nobody else has seen yet into `state` (forced open or closed)
    /// without a transition: the state a keyed layer forced as a whole gives the
    /// breakers of keys that appear afterwards.
    pub(crate) fn start_in(&self, state: State) {
        let word = Word {
            state,
            generation: 0,
            open_until_ms: 0,
        };
        self.state.store(word.encode(), Ordering::Release);
    }

    /// Whether a fresh breaker would serve the calls to come at `now` no worse than this
    /// one: closed (not forced), and nothing but successes in its window. Dropping
    /// successes can only make a breaker trip sooner, never later, so a keyed table may
    /// drop it without letting anyone close or hide a failing upstream.
    pub(crate) fn is_idle(&self, now: Instant) -> bool {
        let word = Word::decode(self.state.load(Ordering::Acquire));
        if word.state != State::Closed {
            return false;
        }
        let counts = self.policy.load().window.counts(now);
        counts.failures == 0 && counts.slow == 0
    }

    /// The policy in force, to hold (what a global breaker's lanes keep).
    pub(crate) fn current_policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.load())
    }

    /// The configuration in force.
    pub(crate) fn config(&self) -> Config {
        self.policy.load().config
    }

    /// Whether a call starting now is timed for slow-call detection.
    #[inline]
    pub(crate) fn times_calls(&self) -> bool {
        self.timed.load(Ordering::Relaxed)
    }

    pub(crate) fn state(&self) -> State {
        Word::decode(self.state.load(Ordering::Acquire)).state
    }

    /// Lets a call through, or says why not. `now` is read only when the breaker is
    /// open, so the closed path never reads the clock.
    #[inline]
    pub(crate) fn admit(&self, now: impl Fn() -> Instant) -> Result<Permit, Rejected> {
        // The closed breaker's answer, inlined into the service's call; every other
        // state (and the retry after a lost race) goes the long way.
        let word = Word::decode(self.state.load(Ordering::Acquire));
        if word.state == State::Closed {
            return Ok(Permit {
                generation: word.generation,
                kind: PermitKind::Closed,
            });
        }
        self.admit_slowly(now)
    }

    #[inline(never)]
    fn admit_slowly(&self, now: impl Fn() -> Instant) -> Result<Permit, Rejected> {
        self.try_admit(now).map_err(|refusal| self.reject(refusal))
    }

    /// [`admit`](Self::admit) without counting a refusal as a rejected call: what the
    /// ejection mode asks while deciding whether an endpoint is ready.
    pub(crate) fn try_admit(&self, now: impl Fn() -> Instant) -> Result<Permit, Refusal> {
        loop {
            let raw = self.state.load(Ordering::Acquire);
            let word = Word::decode(raw);
            let kind = match word.state {
                State::Closed => PermitKind::Closed,
                State::ForcedClosed => PermitKind::Unrecorded,
                State::ForcedOpen => return Err(self.refusal(word, now())),
                State::Open => {
                    let now = now();
                    if now < self.open_until(word) {
                        return Err(self.refusal(word, now));
                    }
                    let slots = self.policy.load().config.probes;
                    let half_open = word.next(State::HalfOpen, u64::from(slots));
                    self.transition(raw, half_open, TransitionReason::OpenTimeElapsed, now);
                    continue;
                }
                State::HalfOpen => match self.take_probe(raw, word) {
                    ProbeSlot::Taken if self.state.load(Ordering::Acquire) == raw => {
                        PermitKind::Probe
                    }
                    ProbeSlot::Taken => {
                        self.return_probe(word.generation);
                        continue;
                    }
                    ProbeSlot::Full => return Err(self.refusal(word, now())),
                    ProbeSlot::Stale => continue,
                },
            };
            return Ok(Permit {
                generation: word.generation,
                kind,
            });
        }
    }

    fn open_until(&self, word: Word) -> Instant {
        self.base + Duration::from_millis(word.open_until_ms)
    }

    /// Why a call at `now` would be refused in the state `word` (which refuses calls).
    fn refusal(&self, word: Word, now: Instant) -> Refusal {
        match word.state {
            State::Open => Refusal {
                retry_after: self.open_until(word).saturating_duration_since(now),
                timed: true,
            },
            State::HalfOpen => Refusal {
                retry_after: self.latest_open_time(),
                timed: false,
            },
            _ => Refusal {
                retry_after: self.config().open.initial(),
                timed: false,
            },
        }
    }

    /// Whether a call at `now` would be refused, and why, without changing anything:
    /// an open breaker whose open time has passed, or a half-open one with a free
    /// probe slot, would let one through.
    pub(crate) fn refuses(&self, now: Instant) -> Option<Refusal> {
        let word = Word::decode(self.state.load(Ordering::Acquire));
        let refused = match word.state {
            State::Closed | State::ForcedClosed => false,
            State::ForcedOpen => true,
            State::Open => now < self.open_until(word),
            State::HalfOpen => self.episode(word).taken >= word.slots(),
        };
        refused.then(|| self.refusal(word, now))
    }

    /// Wakes `waker` (under `id`, replacing what `id` registered before) at the next
    /// transition or probe completion.
    pub(crate) fn wake_on_change(&self, id: u64, waker: &Waker) {
        self.waiters.register(id, waker);
    }

    /// Whether the breaker runs in shadow mode, letting refused calls through.
    pub(crate) fn is_shadow(&self) -> bool {
        self.policy.load().config.shadow
    }

    /// The calls a breaker in shadow mode let through that it would have rejected.
    pub(crate) fn shadow_rejected(&self) -> u64 {
        self.refusals.shadow.load(Ordering::Relaxed)
    }

    /// Settles a refused call: rejected, or let through in shadow mode, and counted as
    /// what it was. The only place the refusal counters are written, off the path of
    /// admitted calls; one reading of the shadow switch decides both, so that a call a
    /// reload flips the switch under is counted as what it got.
    pub(crate) fn reject(&self, refusal: Refusal) -> Rejected {
        let shadow = self.is_shadow();
        let counter = if shadow {
            &self.refusals.shadow
        } else {
            &self.refusals.rejected
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Rejected {
            open: CircuitOpen::new(refusal.retry_after),
            shadow,
        }
    }

    /// How long the breaker stayed open before this half-open phase (without jitter):
    /// the hint for calls rejected while every probe slot is taken. The probes may
    /// hang, and a zero hint would send clients and retry layers into a tight loop.
    fn latest_open_time(&self) -> Duration {
        let trips = self.consecutive_trips.load(Ordering::Acquire);
        self.config().open.nominal(trips.saturating_sub(1))
    }

    /// The policy in force (one load: hold it for one decision, not across a call).
    #[inline]
    pub(crate) fn policy(&self) -> Loaded<Policy> {
        self.policy.load()
    }

    /// Records a call's outcome under the policy in force. `timing` is when the call
    /// started and ended (`None` when untimed: only slow-call detection looks at it);
    /// `now` is read only if a time window or a transition needs it.
    // Out of line: the global breaker's calls record through `record_under`, and this
    // one's policy load must not swell their report.
    #[inline(never)]
    pub(crate) fn record(
        &self,
        permit: Permit,
        outcome: Outcome,
        timing: Option<Timing>,
        now: impl Fn() -> Instant,
    ) {
        self.record_under(&self.policy(), permit, outcome, timing, now);
    }

    /// [`record`](Self::record) under `policy`: the one in force, or one that was (a
    /// global breaker's call holds the policy of the lanes it was admitted through).
    pub(crate) fn record_under(
        &self,
        policy: &Policy,
        permit: Permit,
        outcome: Outcome,
        timing: Option<Timing>,
        now: impl Fn() -> Instant,
    ) {
        if outcome == Outcome::Ignored {
            return self.release(permit);
        }
        // One policy for the whole decision: the sample, the window, the verdict and
        // the open time.
        let sample = Sample {
            failure: outcome == Outcome::Failure,
            slow: match (policy.config.slow, timing) {
                (Some(slow), Some(timing)) => timing.longer_than(slow.threshold),
                _ => false,
            },
        };
        match permit.kind {
            PermitKind::Unrecorded => {}
            PermitKind::Closed => self.record_closed(policy, permit.generation, sample, now),
            PermitKind::Probe => self.complete_probe(policy, permit.generation, sample, now),
        }
    }

    /// Gives back what a permit holds without recording anything: the call was
    /// abandoned (or ignored).
    pub(crate) fn release(&self, permit: Permit) {
        if permit.kind == PermitKind::Probe {
            self.return_probe(permit.generation);
        }
    }

    fn record_closed(
        &self,
        policy: &Policy,
        generation: u16,
        sample: Sample,
        now: impl Fn() -> Instant,
    ) {
        let raw = self.state.load(Ordering::Acquire);
        let word = Word::decode(raw);
        // A call admitted before the breaker moved on says nothing about the new phase.
        if word.state != State::Closed || word.generation != generation {
            return;
        }
        let Some(counts) = policy.window.record(sample, &now) else {
            return;
        };
        if counts.calls < policy.config.minimum_calls {
            return;
        }
        if let Some(reason) = verdict(&policy.config, counts) {
            self.open(&policy.config, raw, reason, now());
        }
    }

    /// Takes a probe slot of the half-open phase whose state word is `state` (`word`).
    fn take_probe(&self, state: u64, word: Word) -> ProbeSlot {
        let generation = word.generation;
        let mut raw = self.probes.load(Ordering::Acquire);
        loop {
            let current = Probes::decode(raw);
            // Staleness is read off the state word rather than by comparing generations,
            // which wrap.
            let probes = if current.generation == generation {
                current
            } else if self.state.load(Ordering::Acquire) != state {
                return ProbeSlot::Stale;
            } else {
                // Still this phase, so the bookkeeping is an earlier state's: the first
                // probe of the phase starts it afresh.
                Probes::fresh(generation)
            };
            if probes.taken >= word.slots() {
                return ProbeSlot::Full;
            }
            let next = Probes {
                taken: probes.taken + 1,
                ..probes
            };
            match self.probes.compare_exchange_weak(
                raw,
                next.encode(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return ProbeSlot::Taken,
                Err(actual) => raw = actual,
            }
        }
    }

    fn return_probe(&self, generation: u16) {
        self.update_probes(generation, |probes| Probes {
            taken: probes.taken.saturating_sub(1),
            ..probes
        });
        self.waiters.wake_all();
    }

    fn complete_probe(
        &self,
        policy: &Policy,
        generation: u16,
        sample: Sample,
        now: impl Fn() -> Instant,
    ) {
        let Some(probes) = self.update_probes(generation, |probes| Probes {
            completed: probes.completed + 1,
            failed: probes.failed + u32::from(sample.failure),
            slow: probes.slow + u32::from(sample.slow),
            ..probes
        }) else {
            return;
        };
        let half_open = self.state.load(Ordering::Acquire);
        let word = Word::decode(half_open);
        // Exactly one report completes the last probe of the episode: it decides. (The
        // episode moved on if the word is another: not ours to decide.)
        if word.state != State::HalfOpen
            || word.generation != generation
            || probes.completed != word.slots()
        {
            return;
        }
        let counts = Counts {
            calls: u64::from(probes.completed),
            failures: u64::from(probes.failed),
            slow: u64::from(probes.slow),
        };
        let now = now();
        match verdict(&policy.config, counts) {
            Some(TransitionReason::FailureRate) => self.open(
                &policy.config,
                half_open,
                TransitionReason::ProbesFailed,
                now,
            ),
            Some(_) => self.open(&policy.config, half_open, TransitionReason::ProbesSlow, now),
            None => self.close(policy, half_open, now),
        }
    }

    /// Closes the breaker from the half-open word `half_open` after its probes
    /// succeeded.
    fn close(&self, policy: &Policy, half_open: u64, now: Instant) {
        // Empty the window before the closed phase starts recording into it, or the first
        // closed call would be judged with the failures that tripped the breaker. The
        // decider is alone here, unless the breaker was moved by hand meanwhile; then the
        // window is not ours to clear.
        if self.state.load(Ordering::Acquire) != half_open {
            return;
        }
        policy.window.clear();
        let closed = Word::decode(half_open).next(State::Closed, 0);
        if !self.transition(half_open, closed, TransitionReason::ProbesSucceeded, now) {
            return;
        }
        // A reload that resized the window meanwhile may have carried the failures over
        // before we cleared them (it carries a window only from a closed state it saw,
        // and looks again after publishing; this is the other half of that handshake:
        // with both fences, one of the two sees the other).
        fence(Ordering::SeqCst);
        let current = self.policy.load();
        if !Arc::ptr_eq(&current.window, &policy.window) {
            current.window.clear();
        }
    }

    /// Applies `change` to this generation's probe bookkeeping; `None` if it belongs to
    /// another generation (a report from an earlier half-open phase).
    fn update_probes(&self, generation: u16, change: impl Fn(Probes) -> Probes) -> Option<Probes> {
        let mut raw = self.probes.load(Ordering::Acquire);
        loop {
            let current = Probes::decode(raw);
            if current.generation != generation {
                return None;
            }
            let next = change(current);
            match self.probes.compare_exchange_weak(
                raw,
                next.encode(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(next),
                Err(actual) => raw = actual,
            }
        }
    }

    /// Opens the breaker from the state word `from`, for the open time of the next
    /// consecutive trip.
    fn open(&self, config: &Config, from: u64, reason: TransitionReason, now: Instant) {
        let trips = self.consecutive_trips.load(Ordering::Acquire);
        let open_for = config.open.duration(trips, self.random());
        let until = now
            .saturating_duration_since(self.base)
            .saturating_add(open_for);
        // Round down so that `retry_after` never exceeds the open time; the breaker may
        // half-open up to a millisecond early. The open time is bounded at build time,
        // so only a process up for a thousand years would reach the field's end: it then
        // stays open until the end rather than wrapping around to the past.
        let until_ms = (until.as_millis().min(u128::from(MAX_OPEN_UNTIL_MS))) as u64;
        let open = Word::decode(from).next(State::Open, until_ms);
        self.transition(from, open, reason, now);
    }

    /// A uniform number in `[0, 1)` from a splitmix64 sequence: only used on trips.
    fn random(&self) -> f64 {
        let mut z = self
            .jitter_seed
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Moves from the exact word `from` to `to`; false if another thread moved first.
    ///
    /// The bookkeeping of the move is settled before the observer hears of it, so that
    /// an observer that panics (the panic goes to the caller whose call made the move)
    /// leaves the breaker consistent for everyone else.
    fn transition(&self, from: u64, to: Word, reason: TransitionReason, now: Instant) -> bool {
        if self
            .state
            .compare_exchange(from, to.encode(), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        if to.state != State::HalfOpen {
            self.stamp_probes(to);
        }
        let since_base = now.saturating_duration_since(self.base).as_nanos() as u64;
        self.last_transition
            .store(since_base.saturating_add(1), Ordering::Release);
        match reason {
            TransitionReason::FailureRate
            | TransitionReason::SlowCallRate
            | TransitionReason::ProbesFailed
            | TransitionReason::ProbesSlow => {
                // The winner of the state word is alone in this: no lost update.
                let trips = self.consecutive_trips.load(Ordering::Acquire);
                self.consecutive_trips
                    .store(trips.saturating_add(1), Ordering::Release);
            }
            TransitionReason::ProbesSucceeded => self.consecutive_trips.store(0, Ordering::Release),
            _ => {}
        }
        self.waiters.wake_all();
        self.notify(Transition {
            from: Word::decode(from).state,
            to: to.state,
            reason,
            at: now,
        });
        true
    }

    /// Stamps the probe bookkeeping with the generation of `word`, a state without
    /// probes that was just entered, while the breaker is still in it. Only stragglers
    /// of an earlier phase write the probe word meanwhile; a probe of a later half-open
    /// phase can only write it after the state word moved on, which ends the loop.
    fn stamp_probes(&self, word: Word) {
        let state = word.encode();
        let fresh = Probes::fresh(word.generation).encode();
        let mut probes = self.probes.load(Ordering::Acquire);
        while self.state.load(Ordering::Acquire) == state {
            match self.probes.compare_exchange_weak(
                probes,
                fresh,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => probes = actual,
            }
        }
    }

    fn notify(&self, transition: Transition) {
        if self.announce {
            #[cfg(feature = "tracing")]
            tracing::info!(
                target: "palisade::circuit_breaker",
                from = ?transition.from,
                to = ?transition.to,
                reason = ?transition.reason,
                "circuit breaker changed state"
            );
            crate::metrics::circuit_transition(transition.from, transition.to, None);
        }
        if let Some(observer) = &self.observer {
            observer(&transition);
        }
    }

    /// Puts `config` (validated) in force for every decision from now on, keeping the
    /// state: the window stays when its kind and size do; a resized window of the same
    /// kind starts with what the old one holds that it covers, if the breaker is closed
    /// (in any other state the window is emptied before it counts again, when the
    /// breaker closes or is reset, so it starts empty); a window of the other kind
    /// starts empty. `publish` puts the new policy wherever else it is read (a global
    /// breaker's lanes), still in the reload's turn, so that reloads publish in order.
    #[cfg(any(feature = "serde", loom))]
    pub(crate) fn reload(&self, config: Config, now: Instant, publish: impl FnOnce(&Arc<Policy>)) {
        let _writer = lock(&self.writer);
        let old = self.policy.load();
        let before = self.state.load(Ordering::Acquire);
        let (window, carried) = if old.config.window == config.window {
            (Arc::clone(&old.window), false)
        } else {
            let window = Window::new(config.window, self.base);
            let closed = Word::decode(before).state == State::Closed;
            let carried = closed && window.carry(&old.window, now);
            (Arc::new(window), carried)
        };
        drop(old);
        let policy = Arc::new(Policy {
            config,
            window: Arc::clone(&window),
        });
        self.policy.store(Arc::clone(&policy));
        self.timed.store(config.slow.is_some(), Ordering::Relaxed);
        publish(&policy);
        if carried {
            // Carried from a closed breaker: if it moved meanwhile it may have closed
            // again, clearing the old window after we copied it (see `close`, the other
            // half of this handshake), and the new one must not keep what it cleared.
            fence(Ordering::SeqCst);
            if self.state.load(Ordering::Acquire) != before {
                window.clear();
            }
        }
        // A shadow switch or a probe count may make an endpoint ready.
        self.waiters.wake_all();
    }

    /// Moves to `state` from whatever state the breaker is in (manual control). Forcing
    /// the state the breaker was already forced into is a no-op, not a transition.
    pub(crate) fn force(&self, state: State, reason: TransitionReason, now: Instant) {
        if reason == TransitionReason::Reset {
            // Not while a reload carries the window over, which would keep what we clear.
            let _writer = lock(&self.writer);
            self.policy.load().window.clear();
            self.consecutive_trips.store(0, Ordering::Release);
            self.refusals.rejected.store(0, Ordering::Relaxed);
            self.refusals.shadow.store(0, Ordering::Relaxed);
        }
        loop {
            let raw = self.state.load(Ordering::Acquire);
            let current = Word::decode(raw);
            if current.state == state && reason != TransitionReason::Reset {
                return;
            }
            let next = current.next(state, 0);
            if self.transition(raw, next, reason, now) {
                return;
            }
        }
    }

    /// The probe bookkeeping of the half-open episode `word` is in, or nothing outside
    /// one (or before its first probe, while the word still holds an earlier state's).
    fn episode(&self, word: Word) -> Probes {
        let probes = Probes::decode(self.probes.load(Ordering::Acquire));
        if word.state == State::HalfOpen && probes.generation == word.generation {
            probes
        } else {
            Probes::fresh(word.generation)
        }
    }

    pub(crate) fn metrics(&self, now: Instant) -> Metrics {
        let policy = self.policy.load();
        let counts = policy.window.counts(now);
        let rate = |part: u64| {
            if counts.calls == 0 {
                0.0
            } else {
                part as f64 / counts.calls as f64
            }
        };
        let last = self.last_transition.load(Ordering::Acquire);
        let word = Word::decode(self.state.load(Ordering::Acquire));
        let probes = self.episode(word);
        Metrics {
            state: word.state,
            calls: counts.calls,
            failures: counts.failures,
            slow_calls: counts.slow,
            failure_rate: rate(counts.failures),
            slow_call_rate: rate(counts.slow),
            minimum_calls_reached: counts.calls >= policy.config.minimum_calls,
            probes_in_flight: probes.taken.saturating_sub(probes.completed),
            probe_successes: probes.completed.saturating_sub(probes.failed),
            probe_failures: probes.failed,
            probe_slow_calls: probes.slow,
            rejected: self.refusals.rejected.load(Ordering::Relaxed),
            shadow_rejected: self.shadow_rejected(),
            consecutive_trips: self.consecutive_trips.load(Ordering::Acquire),
            last_transition: last
                .checked_sub(1)
                .map(|nanos| self.base + Duration::from_nanos(nanos)),
        }
    }
}

/// Whether `counts` call for opening under `config`, and why.
fn verdict(config: &Config, counts: Counts) -> Option<TransitionReason> {
    let calls = counts.calls as f64;
    if counts.calls > 0 && counts.failures as f64 >= config.failure_rate * calls {
        Some(TransitionReason::FailureRate)
    } else if counts.calls > 0
        && config
            .slow
            .is_some_and(|slow| counts.slow as f64 >= slow.rate * calls)
    {
        Some(TransitionReason::SlowCallRate)
    } else {
        None
    }
}

/// A refused call, as [`Core::reject`] settled it.
#[derive(Debug)]
pub(crate) struct Rejected {
    /// The rejection, or in shadow mode the one it would have been.
    pub(crate) open: CircuitOpen,
    /// Whether the breaker was in shadow mode: the call goes through.
    pub(crate) shadow: bool,
}

#[cfg(all(test, not(loom)))]
impl Rejected {
    /// The rejection's hint.
    pub(crate) fn retry_after(&self) -> Duration {
        self.open.retry_after()
    }
}

/// Why a call would be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The hint a rejected call gets.
    pub(crate) retry_after: Duration,
    /// Whether the breaker lets a probe through once `retry_after` has passed by
    /// itself (open), rather than when something else happens (probes finishing, a
    /// hand on the handle).
    pub(crate) timed: bool,
}

enum ProbeSlot {
    Taken,
    Full,
    /// The breaker left this half-open phase while we looked.
    Stale,
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::super::config::MAX_DURATION;
    use super::*;
    use std::sync::mpsc;

    const OPEN: Duration = Duration::from_secs(1);

    fn core(base: Instant) -> Core {
        let config = Config {
            minimum_calls: 1,
            window: super::super::SlidingWindow::count(1),
            open: super::super::config::OpenBackoff::fixed(OPEN),
            probes: 2,
            ..Config::default()
        };
        Core::new(config.validate().expect("valid"), None, base)
    }

    fn fail(core: &Core, now: Instant) {
        let permit = core.admit(|| now).expect("closed");
        core.record(permit, Outcome::Failure, None, || now);
        assert_eq!(core.state(), State::Open);
    }

    /// Trips the breaker, lets the open time pass and closes it through two probes.
    fn trip_and_recover(core: &Core, now: &mut Instant) {
        fail(core, *now);
        *now += OPEN;
        let probes = [core.admit(|| *now), core.admit(|| *now)].map(|probe| probe.expect("probe"));
        assert_eq!(core.state(), State::HalfOpen);
        assert!(core.admit(|| *now).is_err(), "every probe slot is taken");
        for probe in probes {
            core.record(probe, Outcome::Success, None, || *now);
        }
        assert_eq!(core.state(), State::Closed);
    }

    /// Runs `test` on a thread of its own, so that a busy spin fails the test instead
    /// of hanging it.
    fn within_a_minute(test: impl FnOnce() + Send + 'static) {
        let (done, finished) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            test();
            let _ = done.send(());
        });
        match finished.recv_timeout(Duration::from_secs(60)) {
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the breaker spun instead of deciding"),
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Err(panic) = thread.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }

    #[test]
    fn a_call_is_slow_only_past_the_threshold_to_the_nanosecond() {
        let started = Instant::now();
        let threshold = Duration::from_millis(250);
        let took = |nanos: u64| Timing::new(started, started + Duration::from_nanos(nanos));
        assert!(!took(250_000_000).longer_than(threshold));
        assert!(took(250_000_001).longer_than(threshold));
        assert!(!took(0).longer_than(threshold));
        // A threshold past the clock's range: no call is that slow (and nothing panics).
        assert!(!took(u64::MAX).longer_than(Duration::MAX));
    }

    #[test]
    fn a_trip_after_centuries_of_uptime_stays_open_instead_of_wrapping() {
        let base = Instant::now();
        let config = Config {
            minimum_calls: 1,
            window: super::super::SlidingWindow::count(1),
            open: super::super::config::OpenBackoff::fixed(MAX_DURATION),
            ..Config::default()
        };
        let core = Core::new(config.validate().expect("valid"), None, base);
        let now = base + 11 * MAX_DURATION;
        fail(&core, now);
        let retry_after = core.admit(|| now).expect_err("open").retry_after();
        assert!(retry_after > Duration::ZERO && retry_after <= MAX_DURATION);
        assert_eq!(core.state(), State::Open);
    }

    /// Between two natural half-open phases: the first leaves its probe bookkeeping
    /// behind, then `forced` manual transitions move the generation on, and the second
    /// half-open phase must start fresh bookkeeping. 65 533 forced transitions put the
    /// second phase 65 536 generations after the first, onto the same 16-bit generation.
    #[test]
    fn many_forced_transitions_between_half_open_phases_do_not_wedge_the_probes() {
        for forced in [40_000, 65_533, 65_536] {
            within_a_minute(move || {
                let base = Instant::now();
                let core = core(base);
                let mut now = base;
                trip_and_recover(&core, &mut now);
                // Alternating, since forcing the state the breaker is in changes nothing.
                for round in 1..forced {
                    if round % 2 == 0 {
                        core.force(State::ForcedClosed, TransitionReason::ForcedClosed, now);
                    } else {
                        core.force(State::ForcedOpen, TransitionReason::ForcedOpen, now);
                    }
                }
                core.force(State::Closed, TransitionReason::Reset, now);
                trip_and_recover(&core, &mut now);
            });
        }
    }
}
