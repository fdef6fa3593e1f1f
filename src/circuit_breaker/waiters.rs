//! The tasks waiting for a breaker to change: endpoints of a balancer that reported
//! not-ready while it refused calls (the ejection mode), woken at its next transition
//! or when a probe slot comes free.

use crate::sync::{Mutex, lock};
use std::task::Waker;

/// One waker per waiting endpoint (by id), so that an endpoint polled again and again
/// replaces its waker instead of piling up copies.
///
/// A waiter registers, then looks at the breaker again; a change is made, then wakes
/// the waiters. The lock orders the two: whichever takes it second sees the other's
/// work. It is taken only on transitions and returned probe slots, never by a call
/// that a closed breaker lets through.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    wakers: Mutex<Vec<(u64, Waker)>>,
}

impl Waiters {
    pub(crate) fn register(&self, id: u64, waker: &Waker) {
        let mut wakers = lock(&self.wakers);
        match wakers.iter_mut().find(|(known, _)| *known == id) {
            Some((_, known)) => known.clone_from(waker),
            None => wakers.push((id, waker.clone())),
        }
    }

    pub(crate) fn wake_all(&self) {
        // Every update is one push or one swap: a panic cannot leave the list torn.
        let wakers = std::mem::take(&mut *lock(&self.wakers));
        for (_, waker) in wakers {
            waker.wake();
        }
    }
}
