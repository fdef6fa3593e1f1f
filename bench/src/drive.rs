//! Driving a service stack for a measurement: ready, call, await, in one runtime entry.

use std::fmt::Debug;
use std::hint::black_box;

use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

/// Calls made before a measurement: the first calls fill caches and lazily built state
/// (a keyed table's first entry, a budget's first slice, a lazily seeded RNG).
pub const WARM_UP: u64 = 64;

/// A current-thread runtime with tokio's clock, as a server's worker has.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
}

/// A service stack ready to be called `n` times in a row, warmed up.
///
/// The stack's type is erased once per measurement, not per call: the loop over the
/// calls is monomorphized inside the box.
pub struct Driver {
    runtime: Runtime,
    run: Box<Calls>,
}

/// Makes the given number of calls inside the runtime.
type Calls = dyn FnMut(&Runtime, u64);

impl Driver {
    /// Builds the stack with `make` inside the runtime (some peers arm timers when they
    /// are built) and calls it [`WARM_UP`] times with `request(i)`.
    pub fn new<S, Req>(make: impl FnOnce() -> S, request: impl Fn(u64) -> Req + 'static) -> Self
    where
        S: Service<Req> + 'static,
        S::Error: Debug,
    {
        let runtime = runtime();
        let mut service = {
            let _context = runtime.enter();
            make()
        };
        let run = Box::new(move |runtime: &Runtime, calls: u64| {
            runtime.block_on(async {
                for i in 0..calls {
                    let ready = service.ready().await.expect("ready");
                    black_box(ready.call(black_box(request(i))).await.expect("admitted"));
                }
            });
        });
        let mut driver = Self { runtime, run };
        driver.run(WARM_UP);
        driver
    }

    /// Makes `calls` calls.
    pub fn run(&mut self, calls: u64) {
        (self.run)(&self.runtime, calls);
    }
}
