//! The permit counter: the limit and the requests in flight in one atomic word, and the
//! bounded FIFO queue of requests waiting for a permit.
//!
//! The word holds the in-flight count in its low 32 bits, the limit in the next 31 and,
//! in the top bit, whether anyone is queued. Admitting is one compare-and-swap that
//! reads the limit and the count together; releasing is one subtraction. Only when the
//! queue flag is set do either take the queue's lock, so that a released permit goes to
//! the oldest waiter and no newcomer can overtake it. The flag is set and cleared under that
//! lock, and is set exactly while the queue holds a waiter.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use super::algorithms::{LimitAlgorithm, Sample};
use super::error::Overloaded;
use crate::sync::{AtomicBool, AtomicU64, CachePadded, Mutex, Ordering, lock};

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

/// What [`Limiter::try_admit`] decided.
#[derive(Debug)]
pub(crate) enum Admission {
    /// A permit; the requests in flight, this one included.
    Admitted(u32),
    /// In the queue: the permit comes through the waiter.
    Queued(Arc<Waiter>),
    /// No room, and no room in the queue.
    Rejected,
}

/// The shared state of one concurrency limit.
pub(crate) struct Limiter {
    /// Every admission and release writes it: on cache lines of its own, so that the
    /// `Arc`'s counts and the rejection count do not bounce with it between cores.
    word: CachePadded<AtomicU64>,
    /// Refused requests (in shadow mode: the requests that would have been).
    rejected: AtomicU64,
    /// Shadow mode: the limit the requests let through over this one hold their
    /// permits from (static, at [`MAX_LIMIT`], no queue), so that they count neither in
    /// this limit's `in_flight` nor for its algorithm, and an admitted request's permit
    /// stays one plain `Arc`.
    overflow: Option<Arc<Limiter>>,
    queue: Option<Queue>,
    algorithm: Option<Mutex<Box<dyn LimitAlgorithm>>>,
    retry_after: Duration,
}

struct Queue {
    waiters: Mutex<VecDeque<Arc<Waiter>>>,
    capacity: usize,
    max_wait: Duration,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let word = Word(self.word.load(Ordering::Relaxed));
        f.debug_struct("Limiter")
            .field("limit", &word.limit())
            .field("in_flight", &word.in_flight())
            .field("queued", &word.queued())
            .field("adaptive", &self.algorithm.is_some())
            .finish_non_exhaustive()
    }
}

impl Limiter {
    /// A static limit of `limit` (at most [`MAX_LIMIT`]).
    pub(crate) fn fixed(limit: u32) -> Self {
        Self {
            word: CachePadded(AtomicU64::new(Word::new(limit.max(1)).0)),
            rejected: AtomicU64::new(0),
            overflow: None,
            queue: None,
            algorithm: None,
            retry_after: DEFAULT_RETRY_AFTER,
        }
    }

    /// A limit that `algorithm` moves, starting at its initial limit.
    pub(crate) fn adaptive(algorithm: Box<dyn LimitAlgorithm>) -> Self {
        let limit = algorithm.starting_limit().clamp(1, MAX_LIMIT);
        Self {
            algorithm: Some(Mutex::new(algorithm)),
            ..Self::fixed(limit)
        }
    }

    /// Lets up to `capacity` requests wait up to `max_wait` for a permit.
    pub(crate) fn with_queue(mut self, capacity: usize, max_wait: Duration) -> Self {
        self.queue = Some(Queue {
            waiters: Mutex::new(VecDeque::new()),
            capacity,
            max_wait,
        });
        self
    }

    /// Shadow mode: requests over the limit are counted and let through.
    pub(crate) fn with_shadow(mut self, shadow: bool) -> Self {
        self.overflow = shadow.then(|| Arc::new(Limiter::fixed(MAX_LIMIT)));
        self
    }

    pub(crate) fn is_shadow(&self) -> bool {
        self.overflow.is_some()
    }

    /// In shadow mode, a permit for a request let through over the limit, from the
    /// overflow limit (`None` if that one holds [`MAX_LIMIT`] already).
    pub(crate) fn overflow(&self) -> Option<&Arc<Limiter>> {
        self.overflow.as_ref()
    }

    /// Asks rejected clients to come back after `retry_after`.
    pub(crate) fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// The error for a request refused now.
    pub(crate) fn overloaded(&self) -> Overloaded {
        Overloaded::new(self.retry_after, self.limit())
    }

    pub(crate) fn is_adaptive(&self) -> bool {
        self.algorithm.is_some()
    }

    pub(crate) fn max_wait(&self) -> Option<Duration> {
        self.queue.as_ref().map(|queue| queue.max_wait)
    }

    pub(crate) fn limit(&self) -> u32 {
        Word(self.word.load(Ordering::Relaxed)).limit()
    }

    pub(crate) fn in_flight(&self) -> u32 {
        Word(self.word.load(Ordering::Relaxed)).in_flight()
    }

    /// The requests refused with `Overloaded` (0 in shadow mode).
    pub(crate) fn rejected(&self) -> u64 {
        if self.is_shadow() {
            0
        } else {
            self.rejected.load(Ordering::Relaxed)
        }
    }

    /// The requests a limit in shadow mode let through that it would have refused.
    pub(crate) fn shadow_rejected(&self) -> u64 {
        if self.is_shadow() {
            self.rejected.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    pub(crate) fn queued(&self) -> usize {
        self.queue
            .as_ref()
            .map_or(0, |queue| lock(&queue.waiters).len())
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

    #[inline(never)]
    fn admit_slow(&self) -> Admission {
        let Some(queue) = &self.queue else {
            return self.reject();
        };
        let mut waiters = lock(&queue.waiters);
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let word = Word(current);
            // Releases race with this only through the word: setting the flag by
            // compare-and-swap means either this sees the room a release made, or that
            // release sees the flag and hands its permit over under the lock.
            let next = if waiters.is_empty() && word.has_room() {
                word.admit()
            } else if waiters.len() >= queue.capacity {
                drop(waiters);
                return self.reject();
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
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        let waiter = Arc::new(Waiter::default());
        waiters.push_back(Arc::clone(&waiter));
        Admission::Queued(waiter)
    }

    fn reject(&self) -> Admission {
        self.count_rejection();
        Admission::Rejected
    }

    /// Counts a refusal (or a waiter that gave up): the one place a rejection is
    /// counted, in shadow mode as one that would have been.
    pub(crate) fn count_rejection(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        if self.is_shadow() {
            crate::metrics::overloaded_in_shadow();
        } else {
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
        if let Some(queue) = &self.queue {
            self.hand_over(&mut lock(&queue.waiters));
        }
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
        let Some(queue) = &self.queue else {
            return waiter.is_granted();
        };
        let mut waiters = lock(&queue.waiters);
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
    pub(crate) fn record(&self, sample: Sample) {
        let Some(algorithm) = &self.algorithm else {
            return;
        };
        let limit = lock(algorithm).update(sample);
        self.set_limit(limit);
    }

    /// Moves the limit (clamped to `1..=MAX_LIMIT`); a higher one admits waiters.
    pub(crate) fn set_limit(&self, limit: u32) {
        let limit = limit.clamp(1, MAX_LIMIT);
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            let word = Word(current);
            if word.limit() == limit {
                return;
            }
            let next = word.with_limit(limit);
            match self.word.compare_exchange_weak(
                current,
                next.0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    crate::metrics::concurrency_limit(limit, next.in_flight());
                    if next.queued()
                        && next.has_room()
                        && let Some(queue) = &self.queue
                    {
                        self.hand_over(&mut lock(&queue.waiters));
                    }
                    return;
                }
                Err(actual) => current = actual,
            }
        }
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
