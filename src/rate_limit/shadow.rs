//! Shadow mode: the limiter decides and counts as it would, and lets every request
//! through. The switch is live: a reload (or `RateLimitHandle::set_shadow`) turns it on
//! or off for the next request.
//!
//! A reload changes the switch and the quota, two atomic steps, yet every request gets
//! the outcome of the policy before the reload or of the one after, never a mix (refused
//! under one quota by the switch of the other). The order of the two steps depends on
//! the direction, and a request reads the switch twice:
//!
//! - Turning shadow mode on, the switch moves first, then the quota. A request decided
//!   under the new quota reads the switch after that decision ([`Switch::on`]), so it
//!   sees it on.
//! - Turning it off, the quota moves first, then the switch. A request that saw the
//!   switch off before its decision ([`Switch::before`]) is decided under the new quota.
//! - A request is let through if the switch was on before its decision or is on after
//!   it. So a refused request saw it off both times: turning on, it was decided under
//!   the old quota (old policy); turning off, under the new one (new policy).
//!
//! Reloads are serialised (`changing`), so that two of them cannot interleave their
//! steps. `loom_tests::rate_limit_shadow_switch_never_mixes_policies` checks both
//! directions.

use crate::sync::{AtomicBool, AtomicU64, Mutex, Ordering, lock};

/// A limiter's shadow switch and what it would have refused, shared by its services and
/// its handles.
pub(crate) struct Shadow {
    on: AtomicBool,
    would_reject: AtomicU64,
    /// Held by a change of the switch, so that changes apply one at a time, in order.
    changing: Mutex<()>,
}

impl Shadow {
    pub(crate) fn new(on: bool) -> Self {
        Self {
            on: AtomicBool::new(on),
            would_reject: AtomicU64::new(0),
            changing: Mutex::new(()),
        }
    }

    /// Whether the switch is on now.
    #[inline]
    pub(crate) fn is_on(&self) -> bool {
        // Acquire: a request that sees the switch off after a change turned it off sees
        // the quota that change published before it.
        self.on.load(Ordering::Acquire)
    }

    /// Turns the switch `on` (or off) and applies `change` (the quota) in the order that
    /// keeps every request's outcome that of the old policy or the new one (see the
    /// module docs). A failing `change` leaves the switch as it was.
    pub(crate) fn switch<E>(
        &self,
        on: bool,
        change: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let _changing = lock(&self.changing);
        let turning_on = on && !self.is_on();
        if turning_on {
            self.on.store(true, Ordering::Release);
        }
        if let Err(error) = change() {
            if turning_on {
                self.on.store(false, Ordering::Release);
            }
            return Err(error);
        }
        self.on.store(on, Ordering::Release);
        Ok(())
    }

    /// A request the limiter would have refused (`why`), let through instead.
    pub(crate) fn let_through(&self, why: &'static str) {
        self.would_reject.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "tracing")]
        tracing::debug!(
            reason = why,
            "request would be rate limited (shadow mode: let through)"
        );
        #[cfg(not(feature = "tracing"))]
        let _ = why;
        crate::metrics::rate_limited_in_shadow();
    }

    pub(crate) fn would_reject(&self) -> u64 {
        self.would_reject.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("on", &self.is_on())
            .field("would_reject", &self.would_reject())
            .finish()
    }
}

/// The switch as one request sees it: read before its decision, and again (only if the
/// decision is not a plain admission) after it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Switch<'a> {
    shadow: &'a Shadow,
    was_on: bool,
}

impl<'a> Switch<'a> {
    /// Reads the switch before the store decides.
    #[inline]
    pub(crate) fn before(shadow: &'a Shadow) -> Self {
        Self {
            shadow,
            was_on: shadow.is_on(),
        }
    }

    /// The switch `before` saw, for a decision that arrives later (a remote store's
    /// answer to a request sent when the switch read `was_on`).
    pub(crate) fn seen(shadow: &'a Shadow, was_on: bool) -> Self {
        Self { shadow, was_on }
    }

    /// Whether it was on before the decision.
    pub(crate) fn was_on(self) -> bool {
        self.was_on
    }

    /// Whether it was on before the decision or is on now: the shadow to let a refused or
    /// reserved request through by, if any.
    #[inline]
    pub(crate) fn on(self) -> Option<&'a Shadow> {
        (self.was_on || self.shadow.is_on()).then_some(self.shadow)
    }
}
