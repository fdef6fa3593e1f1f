//! The permit counter: the limit and the requests in flight in one atomic word, and the
//! bounded FIFO queue of requests waiting for a permit.
//!
//! The word holds the in-flight count in its low 32 bits, the limit in the next 31 and,
//! in the top bit, whether anyone is queued. Admitting is one compare-and-swap that
//! reads the limit and the count together; releasing is one subtraction. Only when the
//! queue flag is set do either take the queue's lock, so that a released permit goes to
//! the oldest waiter and no newcomer can overtake it. The flag is set and cleared under that
//! lock, and is set exactly while the queue holds a waiter.
//!
//! What a live reload changes besides the limit (shadow mode, `retry_after`, the queue's
//! size and wait) is the [`Policy`], published in a [`PolicyCell`] together with the limit:
//! a refusal reads the two through a sequence number, so that it is decided and
//! answered under one reload or the other, never the limit of one with the options of
//! the other, without a lock and without delaying an admission.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use super::algorithms::{Aimd, Gradient, LimitAlgorithm, Sample};
use super::error::Overloaded;
use crate::sync::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize, CachePadded, Mutex, Ordering, fence, lock,
};

/// What a rejected client is asked to wait unless configured otherwise.
pub(crate) const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The largest limit the word can hold.
pub(crate) const MAX_LIMIT: u32 = (1 << 31) - 1;

const IN_FLIGHT_MASK: u64 = (1 << 32) - 1;
const LIMIT_SHIFT: u32 = 32;
const LIMIT_MASK: u64 = (MAX_LIMIT as u64) << LIMIT_SHIFT;
const QUEUED: u64 = 1 << 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Word(u64);

impl Word {
    fn new(limit: u32) -> Self {
        Self(u64::from(limit.min(MAX_LIMIT)) << LIMIT_SHIFT)
    }

    fn in_flight(self) -> u32 {
        // Masked to 32 bits: the cast keeps every bit.
        (self.0 & IN_FLIGHT_MASK) as u32
    }

    fn limit(self) -> u32 {
        ((self.0 & LIMIT_MASK) >> LIMIT_SHIFT) as u32
    }

    fn queued(self) -> bool {
        self.0 & QUEUED != 0
    }

    fn has_room(self) -> bool {
        self.in_flight() < self.limit()
    }

    /// One more in flight. Only called with room, so the count stays below the limit's
    /// 31 bits and never carries into them.
    fn admit(self) -> Self {
        Self(self.0 + 1)
    }

    fn with_limit(self, limit: u32) -> Self {
        Self((self.0 & !LIMIT_MASK) | (u64::from(limit.min(MAX_LIMIT)) << LIMIT_SHIFT))
    }
}

/// The options a reload changes besides the limit, as one request reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Shadow mode: a refused request is counted and let through.
    pub(crate) shadow: bool,
    /// What a refused request is told to wait.
    pub(crate) retry_after: Duration,
    /// Places in the queue; zero for no queue.
    pub(crate) waiters: usize,
    /// How long a queued request waits.
    pub(crate) max_wait: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            shadow: false,
            retry_after: DEFAULT_RETRY_AFTER,
            waiters: 0,
            max_wait: Duration::ZERO,
        }
    }
}

/// One published [`Policy`], each field its own atomic (durations in nanoseconds: at
/// most a day, validated before they get here), and the limit its reload set.
#[derive(Debug)]
struct PolicySlot {
    limit: AtomicU32,
    shadow: AtomicBool,
    retry_after: AtomicU64,
    waiters: AtomicUsize,
    max_wait: AtomicU64,
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl PolicySlot {
    fn new(policy: Policy, limit: u32) -> Self {
        let slot = Self {
            limit: AtomicU32::new(0),
            shadow: AtomicBool::new(false),
            retry_after: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            max_wait: AtomicU64::new(0),
        };
        slot.store(policy, limit);
        slot
    }

    fn store(&self, policy: Policy, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
        self.shadow.store(policy.shadow, Ordering::Relaxed);
        self.retry_after
            .store(nanos(policy.retry_after), Ordering::Relaxed);
        self.waiters.store(policy.waiters, Ordering::Relaxed);
        self.max_wait
            .store(nanos(policy.max_wait), Ordering::Relaxed);
    }

    /// The limit the reload that published this slot set.
    fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    fn load(&self) -> Policy {
        Policy {
            shadow: self.shadow.load(Ordering::Relaxed),
            retry_after: Duration::from_nanos(self.retry_after.load(Ordering::Relaxed)),
            waiters: self.waiters.load(Ordering::Relaxed),
            max_wait: Duration::from_nanos(self.max_wait.load(Ordering::Relaxed)),
        }
    }
}

/// The policy in force, published with the limit it goes with: a sequence lock over two
/// slots, whose readers never wait.
///
/// Reload `k` is complete when the sequence number is `2k`, and its policy is in slot
/// `k % 2`. Reload `k + 1` writes its policy, and the limit it will set, into the other
/// slot, sets `2k + 1`, moves the limit in the word, and sets `2k + 2`. A reader takes
/// the slots and the word, and keeps what it read if the sequence has not moved
/// meanwhile: at `2k` the word holds reload `k`'s limit (a reload's move of it comes
/// after its odd number); at `2k + 1` the word holds one reload's limit or the other's,
/// and the reader tells which by the limit the new slot says (equal limits make either
/// policy a true answer). A reader retries only because a reload made progress, so
/// readers are lock-free. Reloads are serialised by the caller, and nothing else moves
/// the limit while one runs (an algorithm's update holds the same lock).
#[derive(Debug)]
struct PolicyCell {
    sequence: AtomicU64,
    slots: [PolicySlot; 2],
}

fn slot_of(sequence: u64) -> usize {
    ((sequence / 2) % 2) as usize
}

impl PolicyCell {
    fn new(policy: Policy, limit: u32) -> Self {
        Self {
            sequence: AtomicU64::new(0),
            slots: [
                PolicySlot::new(policy, limit),
                PolicySlot::new(policy, limit),
            ],
        }
    }

    /// The policy in force and the word, as of one instant between reloads.
    fn snapshot(&self, word: &AtomicU64) -> (Policy, Word) {
        loop {
            let sequence = self.sequence.load(Ordering::Acquire);
            let old = self.slots[slot_of(sequence)].load();
            let reloading = sequence % 2 == 1;
            let new = reloading.then(|| {
                let slot = &self.slots[slot_of(sequence + 1)];
                (slot.load(), slot.limit())
            });
            let current = Word(word.load(Ordering::Acquire));
            fence(Ordering::Acquire);
            if self.sequence.load(Ordering::Relaxed) != sequence {
                continue;
            }
            return match new {
                Some((new, limit)) if current.limit() == limit => (new, current),
                _ => (old, current),
            };
        }
    }

    /// The policy in force, for a caller that excludes reloads (holding the queue's
    /// lock, which a reload holds throughout).
    fn current(&self) -> Policy {
        self.slots[slot_of(self.sequence.load(Ordering::Acquire))].load()
    }

    #[cfg(any(test, feature = "serde"))]
    /// Publishes `policy`, and `limit`, which `move_limit` sets in the word, as one
    /// change. Callers are serialised (the queue's lock).
    fn publish(&self, policy: Policy, limit: u32, move_limit: impl FnOnce()) {
        let sequence = self.sequence.load(Ordering::Relaxed);
        // A reader still on an older number that reads these stores sees the number
        // moved.
        fence(Ordering::Release);
        self.slots[slot_of(sequence + 2)].store(policy, limit);
        self.sequence.store(sequence + 1, Ordering::Release);
        move_limit();
        self.sequence.store(sequence + 2, Ordering::Release);
    }
}

/// How a request was refused: under which policy, at which limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// In shadow mode: counted as a refusal, and let through.
    pub(crate) shadow: bool,
    pub(crate) retry_after: Duration,
    pub(crate) limit: u32,
}

impl Refusal {
    fn new(policy: Policy, limit: u32) -> Self {
        Self {
            shadow: policy.shadow,
            retry_after: policy.retry_after,
            limit,
        }
    }

    /// The error the request gets if it is not let through.
    pub(crate) fn overloaded(&self) -> Overloaded {
        Overloaded::new(self.retry_after, self.limit)
    }
}

/// What [`Limiter::try_admit`] decided.
#[derive(Debug)]
pub(crate) enum Admission {
    /// A permit; the requests in flight, this one included.
    Admitted(u32),
    /// In the queue: the permit comes through the waiter, within `max_wait`; `refusal`
    /// is its answer if none does (the policy it was queued under).
    Queued {
        waiter: Arc<Waiter>,
        max_wait: Duration,
        refusal: Refusal,
    },
    /// No room, and no room in the queue (already counted).
    Rejected(Refusal),
}

/// An adaptive limit's algorithm.
pub(crate) enum Algorithm {
    Aimd(Aimd),
    Gradient(Gradient),
    Custom(Box<dyn LimitAlgorithm>),
}

impl std::fmt::Debug for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Aimd(aimd) => aimd.fmt(f),
            Self::Gradient(gradient) => gradient.fmt(f),
            Self::Custom(_) => f.write_str("Custom"),
        }
    }
}

impl Algorithm {
    fn starting_limit(&self) -> u32 {
        match self {
            Self::Aimd(aimd) => aimd.starting_limit(),
            Self::Gradient(gradient) => gradient.starting_limit(),
            Self::Custom(custom) => custom.starting_limit(),
        }
    }

    fn update(&mut self, sample: Sample) -> u32 {
        match self {
            Self::Aimd(aimd) => aimd.update(sample),
            Self::Gradient(gradient) => gradient.update(sample),
            Self::Custom(custom) => custom.update(sample),
        }
    }

    #[cfg(any(test, feature = "serde"))]
    /// Takes `new`'s settings, keeping this one's state: the limit in force, clamped
    /// into the new bounds. Another kind of algorithm, whose state would mean nothing
    /// here, replaces this one and starts from its starting limit. Returns the limit.
    fn reconfigure(&mut self, new: Self) -> u32 {
        match (&mut *self, new) {
            (Self::Aimd(aimd), Self::Aimd(new)) => aimd.reconfigure(&new),
            (Self::Gradient(gradient), Self::Gradient(new)) => gradient.reconfigure(&new),
            (_, new) => {
                *self = new;
                self.starting_limit()
            }
        }
    }
}

/// How the limit is set.
#[derive(Debug)]
pub(crate) enum Limit {
    /// A static limit.
    Fixed(u32),
    /// Moved by an algorithm.
    Adaptive(Algorithm),
}

/// The shared state of one concurrency limit.
pub(crate) struct Limiter {
    /// Every admission and release writes it: on cache lines of its own, so that the
    /// `Arc`'s counts and the rejection count do not bounce with it between cores.
    word: CachePadded<AtomicU64>,
    /// Refused requests.
    rejected: AtomicU64,
    /// Requests let through in shadow mode that would have been refused.
    shadow_rejected: AtomicU64,
    /// The limit the requests let through in shadow mode hold their permits from
    /// (static, at [`MAX_LIMIT`], no queue), so that they count neither in this limit's
    /// `in_flight` nor for its algorithm, and an admitted request's permit stays one
    /// plain `Arc`. `None` for that limit itself.
    overflow: Option<Arc<Limiter>>,
    /// Requests waiting for a permit (empty, and never allocated, without a queue).
    waiters: Mutex<VecDeque<Arc<Waiter>>>,
    policy: PolicyCell,
    /// Whether an algorithm moves the limit: read once per admitted request, so that a
    /// static limit reads no clock.
    adaptive: AtomicBool,
    /// Also serialises reloads, and the limit an update sets with them.
    algorithm: Mutex<Option<Algorithm>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let word = Word(self.word.load(Ordering::Relaxed));
        f.debug_struct("Limiter")
            .field("limit", &word.limit())
            .field("in_flight", &word.in_flight())
            .field("queued", &word.queued())
            .field("adaptive", &self.is_adaptive())
            .field("policy", &self.policy.current())
            .finish_non_exhaustive()
    }
}

impl Limiter {
    /// A limit set as `limit` says, under `policy`.
    pub(crate) fn new(limit: Limit, policy: Policy) -> Self {
        Self {
            overflow: Some(Arc::new(Self::bare(
                Limit::Fixed(MAX_LIMIT),
                Policy::default(),
            ))),
            ..Self::bare(limit, policy)
        }
    }

    /// A static limit of `limit` (at most [`MAX_LIMIT`]), every option at its default.
    #[cfg(test)]
    pub(crate) fn fixed(limit: u32) -> Self {
        Self::new(Limit::Fixed(limit), Policy::default())
    }

    fn bare(limit: Limit, policy: Policy) -> Self {
        let (limit, algorithm) = match limit {
            Limit::Fixed(limit) => (limit, None),
            Limit::Adaptive(algorithm) => (algorithm.starting_limit(), Some(algorithm)),
        };
        Self {
            word: CachePadded(AtomicU64::new(Word::new(limit.clamp(1, MAX_LIMIT)).0)),
            rejected: AtomicU64::new(0),
            shadow_rejected: AtomicU64::new(0),
            overflow: None,
            waiters: Mutex::new(VecDeque::new()),
            policy: PolicyCell::new(policy, limit.clamp(1, MAX_LIMIT)),
            adaptive: AtomicBool::new(algorithm.is_some()),
            algorithm: Mutex::new(algorithm),
        }
    }

    /// Whether the limit runs in shadow mode now.
    pub(crate) fn is_shadow(&self) -> bool {
        self.policy.snapshot(&self.word).0.shadow
    }

    /// In shadow mode, where a request let through over the limit takes its permit.
    pub(crate) fn overflow(&self) -> Option<&Arc<Limiter>> {
        self.overflow.as_ref()
    }

    /// The answer for a request refused now, under the policy in force.
    pub(crate) fn refusal(&self) -> Refusal {
        let (policy, word) = self.policy.snapshot(&self.word);
        Refusal::new(policy, word.limit())
    }

    /// Whether a gradient algorithm is measuring its minimum RTT.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn is_measuring(&self) -> bool {
        matches!(&*lock(&self.algorithm), Some(Algorithm::Gradient(gradient)) if gradient.is_measuring())
    }

    #[inline]
    pub(crate) fn is_adaptive(&self) -> bool {
        self.adaptive.load(Ordering::Relaxed)
    }

    pub(crate) fn limit(&self) -> u32 {
        Word(self.word.load(Ordering::Relaxed)).limit()
    }

    pub(crate) fn in_flight(&self) -> u32 {
        Word(self.word.load(Ordering::Relaxed)).in_flight()
    }

    /// The requests refused with `Overloaded`.
    pub(crate) fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// The requests let through in shadow mode that would have been refused.
    pub(crate) fn shadow_rejected(&self) -> u64 {
        self.shadow_rejected.load(Ordering::Relaxed)
    }

    pub(crate) fn queued(&self) -> usize {
        lock(&self.waiters).len()
    }

    /// Takes a permit if there is room and nobody is queued; else queues (when there is
    /// a queue with room) or rejects.
    #[inline]
    pub(crate) fn try_admit(&self) -> Admission {
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let word = Word(current);
            if word.queued() || !word.has_room() {
                return self.admit_slow();
            }
            match self.word.compare_exchange_weak(
                current,
                word.admit().0,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Admission::Admitted(word.in_flight() + 1),
                Err(actual) => current = actual,
            }
        }
    }

    /// No room, or someone queued: decided under the policy in force, read with the
    /// word it goes with.
    #[inline(never)]
    fn admit_slow(&self) -> Admission {
        loop {
            let (policy, word) = self.policy.snapshot(&self.word);
            if policy.waiters > 0 {
                return self.queue_or_reject();
            }
            // No queue: refused unless room came back meanwhile. (Waiters left from a
            // queue a reload removed still go first.)
            if word.queued() || !word.has_room() {
                return self.reject(Refusal::new(policy, word.limit()));
            }
            if self
                .word
                .compare_exchange_weak(word.0, word.admit().0, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Admission::Admitted(word.in_flight() + 1);
            }
        }
    }

    /// With a queue: under its lock, which a reload holds too, so the policy read here
    /// stays in force until the request is queued or refused.
    fn queue_or_reject(&self) -> Admission {
        let mut waiters = lock(&self.waiters);
        let policy = self.policy.current();
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let word = Word(current);
            // Releases race with this only through the word: setting the flag by
            // compare-and-swap means either this sees the room a release made, or that
            // release sees the flag and hands its permit over under the lock.
            let next = if waiters.is_empty() && word.has_room() {
                word.admit()
            } else if waiters.len() >= policy.waiters {
                drop(waiters);
                return self.reject(Refusal::new(policy, word.limit()));
            } else {
                Word(current | QUEUED)
            };
            match self.word.compare_exchange_weak(
                current,
                next.0,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) if !next.queued() => return Admission::Admitted(word.in_flight() + 1),
                Ok(_) => {
                    let waiter = Arc::new(Waiter::default());
                    waiters.push_back(Arc::clone(&waiter));
                    return Admission::Queued {
                        waiter,
                        max_wait: policy.max_wait,
                        refusal: Refusal::new(policy, word.limit()),
                    };
                }
                Err(actual) => current = actual,
            }
        }
    }

    fn reject(&self, refusal: Refusal) -> Admission {
        self.count(&refusal);
        Admission::Rejected(refusal)
    }

    /// Counts a refusal (or a waiter that gave up): the one place a rejection is
    /// counted, in shadow mode as one that would have been.
    pub(crate) fn count(&self, refusal: &Refusal) {
        if refusal.shadow {
            self.shadow_rejected.fetch_add(1, Ordering::Relaxed);
            crate::metrics::overloaded_in_shadow();
        } else {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            crate::metrics::overloaded(self.in_flight());
        }
    }

    /// Gives a permit back: to the oldest waiter if there is one and room for it.
    ///
    /// One subtraction, whatever happens meanwhile: a newcomer that finds the queue
    /// flag set takes the lock, so it cannot take the permit this frees before the
    /// waiters get it under the lock below; one that set the flag after this
    /// subtraction saw the room it made and was admitted instead of queueing.
    #[inline]
    pub(crate) fn release(&self) {
        let previous = Word(self.word.fetch_sub(1, Ordering::Release));
        if previous.queued() {
            self.hand_over_released();
        }
    }

    #[inline(never)]
    fn hand_over_released(&self) {
        self.hand_over(&mut lock(&self.waiters));
    }

    /// Under the queue's lock: gives permits to the oldest waiters while there is room,
    /// and clears the flag once nobody is left.
    fn hand_over(&self, waiters: &mut VecDeque<Arc<Waiter>>) {
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let word = Word(current);
            let (next, grant) = match waiters.front() {
                None if word.queued() => (Word(current & !QUEUED), false),
                None => return,
                Some(_) if word.has_room() => (word.admit(), true),
                Some(_) => return,
            };
            match self.word.compare_exchange_weak(
                current,
                next.0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if grant && let Some(waiter) = waiters.pop_front() {
                        waiter.grant();
                    }
                    current = next.0;
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Takes `waiter` out of the queue. `true` when it was no longer there because it
    /// had been granted a permit, which the caller now holds.
    pub(crate) fn leave(&self, waiter: &Arc<Waiter>) -> bool {
        let mut waiters = lock(&self.waiters);
        match waiters
            .iter()
            .position(|queued| Arc::ptr_eq(queued, waiter))
        {
            Some(index) => {
                waiters.remove(index);
                self.hand_over(&mut waiters);
                false
            }
            // Granted permits are popped under this lock: it is granted.
            None => true,
        }
    }

    /// Feeds a finished request to the algorithm and applies the limit it returns.
    /// The algorithm stays locked until the limit is set, so that a reload cannot slip
    /// between the two and be overwritten by a limit of the old settings.
    pub(crate) fn record(&self, sample: Sample) {
        let mut algorithm = lock(&self.algorithm);
        let Some(algorithm) = algorithm.as_mut() else {
            return;
        };
        let limit = algorithm.update(sample);
        self.set_limit(limit);
    }

    /// Moves the limit (clamped to `1..=MAX_LIMIT`); a higher one admits waiters.
    pub(crate) fn set_limit(&self, limit: u32) {
        let next = self.store_limit(limit);
        if let Some(next) = next {
            crate::metrics::concurrency_limit(next.limit(), next.in_flight());
            if next.queued() && next.has_room() {
                self.hand_over(&mut lock(&self.waiters));
            }
        }
    }

    /// Sets the limit in the word; the new word, `None` if the limit was already that.
    fn store_limit(&self, limit: u32) -> Option<Word> {
        let limit = limit.clamp(1, MAX_LIMIT);
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let word = Word(current);
            if word.limit() == limit {
                return None;
            }
            let next = word.with_limit(limit);
            match self.word.compare_exchange_weak(
                current,
                next.0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(next),
                Err(actual) => current = actual,
            }
        }
    }

    #[cfg(any(test, feature = "serde"))]
    /// Switches to `limit` (`None`: the limit and its algorithm stay as they are) and
    /// `policy`, as one change: a request is refused, queued or let through under the
    /// old limit and policy or the new ones. The same kind of algorithm keeps its state
    /// (its limit clamped into the new bounds); another kind starts afresh from its
    /// starting limit. Waiters a higher limit makes room for are let in.
    pub(crate) fn reload(&self, limit: Option<Limit>, policy: Policy) {
        let mut algorithm = lock(&self.algorithm);
        let next = limit.map(|limit| match limit {
            Limit::Fixed(limit) => {
                *algorithm = None;
                limit
            }
            Limit::Adaptive(new) => match algorithm.as_mut() {
                Some(current) => current.reconfigure(new),
                None => algorithm.insert(new).starting_limit(),
            },
        });
        self.adaptive.store(algorithm.is_some(), Ordering::Relaxed);
        let mut waiters = lock(&self.waiters);
        let limit = next.map_or_else(|| self.limit(), |limit| limit.clamp(1, MAX_LIMIT));
        self.policy.publish(policy, limit, || {
            self.store_limit(limit);
        });
        self.hand_over(&mut waiters);
        drop(waiters);
        drop(algorithm);
        crate::metrics::concurrency_limit(self.limit(), self.in_flight());
    }
}

/// A queued request: told when a permit is its.
#[derive(Debug, Default)]
pub(crate) struct Waiter {
    granted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Waiter {
    fn grant(&self) {
        self.granted.store(true, Ordering::Release);
        if let Some(waker) = lock(&self.waker).take() {
            waker.wake();
        }
    }

    pub(crate) fn is_granted(&self) -> bool {
        self.granted.load(Ordering::Acquire)
    }

    /// Whether the permit has come; if not, wakes `cx`'s task when it does.
    pub(crate) fn poll_granted(&self, cx: &mut Context<'_>) -> bool {
        if self.is_granted() {
            return true;
        }
        let mut waker = lock(&self.waker);
        match &mut *waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        drop(waker);
        // A grant that took the old waker (or none) before this one was stored set the
        // flag first: read it again.
        self.is_granted()
    }
}
