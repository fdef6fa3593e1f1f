//! Live reload of the rate limiter: a new configuration applies atomically under load
//! (no request sees the capacity of one policy with the rate of the other), the tokens
//! carry over as documented (checked against an exact model), and an invalid or
//! unreloadable configuration is refused at its field with the old policy still enforced.
#![cfg(all(feature = "serde", feature = "http"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Response};
use palisade::config::{ConfigError, NotReloadable, Policies, RateLimitConfig};
use palisade::rate_limit::{Quota, RateLimitConfigError, RateLimitLayer, RateLimited, TokenBucket};
use proptest::prelude::*;
use tokio::time::{Instant, advance};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

const SECOND: Duration = Duration::from_secs(1);

fn config(text: &str) -> RateLimitConfig {
    toml::from_str(text).unwrap_or_else(|error| panic!("{text}\n{error}"))
}

fn limited(error: &BoxError) -> &RateLimited {
    error.downcast_ref::<RateLimited>().expect("RateLimited")
}

async fn send<S>(service: &mut S, request: u32) -> Result<u32, BoxError>
where
    S: Service<u32, Response = u32, Error = BoxError>,
{
    service.ready().await?.call(request).await
}

fn echo() -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone {
    service_fn(|request: u32| async move { Ok::<_, BoxError>(request) })
}

/// The `q` and `w` of a `RateLimit-Policy` field and the `r` and `t` of a `RateLimit`
/// field, in whole tokens and seconds.
fn fields<B>(response: &Response<B>) -> (u64, u64, u64, u64) {
    let number = |header: &str, name: &str| -> u64 {
        let value = response.headers()[header].to_str().expect("ASCII");
        let part = value
            .split(';')
            .find_map(|part| part.strip_prefix(name))
            .unwrap_or_else(|| panic!("{header}: {value} has no {name}"));
        part.parse().expect("a number")
    };
    (
        number("ratelimit-policy", "q="),
        number("ratelimit-policy", "w="),
        number("ratelimit", "r="),
        number("ratelimit", "t="),
    )
}

async fn ok(_: Request<()>) -> Result<Response<()>, BoxError> {
    Ok(Response::new(()))
}

// Two policies whose halves, mixed, would show: (1000, 100/s) fills in 10 s and (10, 5/s)
// in 2 s, while (1000, 5/s) would report w=200 and (10, 100/s) w=1.
const LOOSE: &str = "capacity = 1000\nrefill = \"100/s\"";
const TIGHT: &str = "capacity = 10\nrefill = \"5/s\"";
const POLICIES: [(u64, u64); 2] = [(1000, 10), (10, 2)];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_concurrent_load_never_tears_the_policy() {
    let limit = config(LOOSE)
        .build_from(RateLimitLayer::builder().headers_on_success())
        .unwrap();
    let handle = limit.handle();
    let service = limit.layer(service_fn(ok));
    let (loose, tight) = (config(LOOSE), config(TIGHT));
    let done = Arc::new(AtomicBool::new(false));
    let reloader = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut reloads = 0u64;
            while !done.load(Ordering::Relaxed) {
                let next = if reloads.is_multiple_of(2) {
                    &tight
                } else {
                    &loose
                };
                handle.reload(next).expect("a valid configuration");
                reloads += 1;
                tokio::task::yield_now().await;
            }
            reloads
        })
    };
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                let (mut admitted, mut refused) = (0u32, 0u32);
                for _ in 0..2_000 {
                    match service.clone().oneshot(Request::new(())).await {
                        Ok(response) => {
                            let (q, w, r, t) = fields(&response);
                            assert!(POLICIES.contains(&(q, w)), "torn policy: q={q};w={w}");
                            assert!(r < q && t <= w, "r={r};t={t} beyond q={q};w={w}");
                            admitted += 1;
                        }
                        Err(error) => {
                            let quota = limited(&error).quota();
                            let policy = (quota.capacity(), quota.period().as_secs());
                            assert!(POLICIES.contains(&policy), "torn policy: {quota:?}");
                            refused += 1;
                        }
                    }
                    tokio::task::yield_now().await;
                }
                (admitted, refused)
            })
        })
        .collect();
    let (mut admitted, mut refused) = (0, 0);
    for client in clients {
        let (a, r) = client.await.expect("no client panicked");
        admitted += a;
        refused += r;
    }
    done.store(true, Ordering::Relaxed);
    let reloads = reloader.await.unwrap();
    // The run exercised both policies and many switches between them.
    assert!(reloads > 100, "{reloads} reloads");
    assert!(
        admitted > 0 && refused > 0,
        "{admitted} admitted, {refused} refused"
    );
}

#[tokio::test(start_paused = true)]
async fn tightening_applies_at_once_and_keeps_the_bucket_as_full_as_a_fraction() {
    let limit = config("capacity = 10\nrefill = \"10/s\"").build().unwrap();
    let handle = limit.handle();
    let mut service = limit.layer(echo());
    for n in 0..5 {
        send(&mut service, n).await.unwrap();
    }
    // Half full of 10 becomes half full of 2: one token, and the new rate behind it.
    handle
        .reload(&config("capacity = 2\nrefill = \"1/s\""))
        .unwrap();
    assert_eq!(handle.quota(), Quota::new(2, 1, SECOND).unwrap());
    assert_eq!(handle.available(), 1);
    send(&mut service, 0).await.unwrap();
    let error = send(&mut service, 0).await.unwrap_err();
    assert_eq!(limited(&error).retry_after(), SECOND);
    assert_eq!(limited(&error).quota().capacity(), 2);
    advance(SECOND).await;
    send(&mut service, 0).await.unwrap();
    assert!(send(&mut service, 0).await.is_err());

    // Loosening keeps the fraction: empty stays empty, and the room fills at the new
    // rate.
    handle
        .reload(&config("capacity = 100\nrefill = \"10/s\""))
        .unwrap();
    assert_eq!(handle.available(), 0);
    advance(SECOND).await;
    assert_eq!(handle.available(), 10);
}

#[tokio::test(start_paused = true)]
async fn flipping_a_thousand_times_leaves_the_shared_bucket_where_it_was() {
    // A token of 100/s is 10^7 units: 555 of 1000 is exactly 5.55 of 10.
    let (large, small) = (
        config("capacity = 1000\nrefill = \"100/s\""),
        config("capacity = 10\nrefill = \"100/s\""),
    );
    let limit = large.build().unwrap();
    let handle = limit.handle();
    let mut service = limit.layer(echo());
    for n in 0..445 {
        send(&mut service, n).await.unwrap();
    }
    for _ in 0..1000 {
        handle.reload(&small).unwrap();
        assert_eq!(handle.available(), 5);
        handle.reload(&large).unwrap();
    }
    assert_eq!(handle.available(), 555);
}

#[tokio::test(start_paused = true)]
async fn flipping_a_thousand_times_leaves_a_keys_bucket_where_it_was() {
    let (large, small) = (
        config("capacity = 1000\nrefill = \"100/s\"\nkeyed = {}"),
        config("capacity = 10\nrefill = \"100/s\"\nkeyed = {}"),
    );
    let limit = large
        .build_keyed::<_, u32>(|request: &u32| Some(*request))
        .unwrap();
    let handle = limit.handle();
    let mut service = limit.layer(echo());
    for _ in 0..445 {
        send(&mut service, 1).await.unwrap();
    }
    let token = SECOND / 100;
    // A key's bucket moves on its next request: each quota gets one, and the time it
    // takes the bucket to win that token back.
    for _ in 0..1000 {
        handle.reload(&small).unwrap();
        send(&mut service, 1).await.unwrap();
        advance(token).await;
        assert_eq!(handle.available_for(&1), 5);
        handle.reload(&large).unwrap();
        send(&mut service, 1).await.unwrap();
        advance(token).await;
        assert_eq!(handle.available_for(&1), 555);
    }
}

#[tokio::test(start_paused = true)]
async fn an_invalid_reload_is_refused_at_its_field_and_the_old_policy_holds() {
    let original = config("capacity = 2\nrefill = \"1/s\"");
    let limit = original.build().unwrap();
    let handle = limit.handle();
    let mut service = limit.layer(echo());
    let refusals: [(&str, &str); 4] = [
        ("capacity = 0\nrefill = \"1/s\"", "capacity"),
        ("capacity = 5\nrefill = \"0/s\"", "refill"),
        ("capacity = 5\nrefill = \"2/1ns\"", "refill"),
        (
            "capacity = 18446744073709551615\nrefill = \"1/s\"",
            "capacity",
        ),
    ];
    for (text, path) in refusals {
        let refused = handle.reload(&config(text)).unwrap_err();
        // Exactly what building it would say.
        let built = config(text).build().unwrap_err();
        assert_eq!(refused.path(), path, "{text}");
        assert_eq!(refused.to_string(), built.to_string(), "{text}");
        assert!(refused.error().is::<RateLimitConfigError>());
    }
    assert_eq!(handle.quota(), Quota::new(2, 1, SECOND).unwrap());
    send(&mut service, 0).await.unwrap();
    send(&mut service, 0).await.unwrap();
    let error = send(&mut service, 0).await.unwrap_err();
    assert_eq!(limited(&error).retry_after(), SECOND);
}

/// How long a request took to be admitted.
async fn admitted_after<S>(service: &mut S) -> Duration
where
    S: Service<u32, Response = u32, Error = BoxError>,
{
    let asked = Instant::now();
    send(service, 0).await.expect("admitted");
    asked.elapsed()
}

#[tokio::test(start_paused = true)]
async fn shadow_through_reload_applies_to_the_next_request_both_ways() {
    let enforcing = "capacity = 2\nrefill = \"1/s\"\nmax_wait = \"10s\"";
    let shadow = format!("{enforcing}\nshadow = true");
    let limit = config(enforcing).build().unwrap();
    let handle = limit.handle();
    let mut service = limit.layer(echo());
    for _ in 0..2 {
        assert_eq!(admitted_after(&mut service).await, Duration::ZERO);
    }
    // Enforcing: the third request waits for its slot.
    assert_eq!(admitted_after(&mut service).await, SECOND);

    handle.reload(&config(&shadow)).unwrap();
    assert!(handle.is_shadow());
    // In shadow mode requests go at once: the next ten take the slots they would wait
    // for (a wait is not a refusal), the eleventh would be refused (a wait over 10 s).
    for _ in 0..11 {
        assert_eq!(admitted_after(&mut service).await, Duration::ZERO);
    }
    assert_eq!(handle.shadow_rejected(), 1);

    handle.reload(&config(enforcing)).unwrap();
    assert!(!handle.is_shadow());
    // Enforcing again, on the bucket shadow mode charged: refused, then a 10 s wait.
    assert!(limited(&send(&mut service, 0).await.unwrap_err()).retry_after() > Duration::ZERO);
    advance(SECOND).await;
    assert_eq!(admitted_after(&mut service).await, 10 * SECOND);
    assert_eq!(handle.shadow_rejected(), 1);

    // A refused reload leaves the switch as it was.
    let refused = format!("{shadow}\nkeyed = {{}}");
    assert_eq!(
        handle.reload(&config(&refused)).unwrap_err().path(),
        "keyed"
    );
    assert!(!handle.is_shadow());
}

#[tokio::test(start_paused = true)]
async fn a_keyed_limiter_flipped_to_shadow_lets_a_request_without_a_key_through() {
    let enforcing = "capacity = 1\nrefill = \"1/s\"\nkeyed = {}";
    let limit = config(enforcing)
        .build_keyed::<_, u32>(|request: &u32| (*request != 0).then_some(*request))
        .unwrap();
    let handle = limit.handle();
    let mut service = limit.layer(echo());
    assert!(
        send(&mut service, 0)
            .await
            .unwrap_err()
            .is::<palisade::rate_limit::MissingKey>()
    );
    send(&mut service, 1).await.unwrap();
    assert!(send(&mut service, 1).await.is_err());
    handle
        .reload(&config(&format!("{enforcing}\nshadow = true")))
        .unwrap();
    assert_eq!(send(&mut service, 0).await.unwrap(), 0);
    assert_eq!(send(&mut service, 1).await.unwrap(), 1);
    assert_eq!(handle.shadow_rejected(), 2);
    handle.reload(&config(enforcing)).unwrap();
    assert!(send(&mut service, 0).await.is_err());
    assert!(send(&mut service, 1).await.is_err());
    assert_eq!(handle.shadow_rejected(), 2);
}

fn not_reloadable(error: &ConfigError) -> &NotReloadable {
    error
        .error()
        .downcast_ref::<NotReloadable>()
        .unwrap_or_else(|| panic!("not a NotReloadable: {error}"))
}

#[tokio::test(start_paused = true)]
async fn options_fixed_at_build_time_are_refused_at_their_field() {
    let global = config("capacity = 2\nrefill = \"1/s\"\nmax_wait = \"1s\"")
        .build()
        .unwrap()
        .handle();
    let keyed = config("capacity = 2\nrefill = \"1/s\"\nkeyed = { max_keys = 10 }")
        .build_keyed::<_, u32>(|request: &u32| Some(*request))
        .unwrap()
        .handle();
    let refusals = [
        (&global, "capacity = 5\nrefill = \"1/s\"", "max_wait"),
        (
            &global,
            "capacity = 5\nrefill = \"1/s\"\nmax_wait = \"1s\"\nredis = {}",
            "redis",
        ),
        (
            &global,
            "capacity = 5\nrefill = \"1/s\"\nmax_wait = \"1s\"\nkeyed = {}",
            "keyed",
        ),
    ];
    for (handle, text, path) in refusals {
        let refused = handle.reload(&config(text)).unwrap_err();
        assert_eq!(refused.path(), path, "{text}");
        not_reloadable(&refused);
    }
    let refused = keyed
        .reload(&config("capacity = 5\nrefill = \"1/s\"\nkeyed = {}"))
        .unwrap_err();
    assert_eq!(refused.path(), "keyed.max_keys");
    assert_eq!(not_reloadable(&refused).was, "10");
    assert_eq!(
        refused.to_string(),
        "keyed.max_keys: cannot change at run time (the layer was built with 10): build a new layer to change it"
    );
    let refused = keyed
        .reload(&config("capacity = 5\nrefill = \"1/s\""))
        .unwrap_err();
    assert_eq!(refused.path(), "keyed");
    let refused = keyed
        .reload(&config(
            "capacity = 5\nrefill = \"1/s\"\nkeyed = { max_keys = 10, when_key_missing = \"share\" }",
        ))
        .unwrap_err();
    assert_eq!(refused.path(), "keyed.when_key_missing");
    // Nothing changed; the same fixed options with a new quota are taken.
    assert_eq!(global.quota().capacity(), 2);
    assert_eq!(keyed.quota().capacity(), 2);
    global
        .reload(&config("capacity = 5\nrefill = \"1/s\"\nmax_wait = \"1s\""))
        .unwrap();
    keyed
        .reload(&config(
            "capacity = 5\nrefill = \"1/s\"\nkeyed = { max_keys = 10, when_key_missing = \"reject\" }",
        ))
        .unwrap();
    assert_eq!(global.quota().capacity(), 5);
    assert_eq!(keyed.quota().capacity(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_document_reloads_a_keyed_policy_and_its_errors_name_their_place() {
    let before: Policies = toml::from_str(
        "[limits.per_client]\ncapacity = 4\nrefill = \"1/s\"\nkeyed = { max_keys = 10 }",
    )
    .unwrap();
    let limit = before
        .keyed_rate_limit::<_, u32>("per_client", |request: &u32| Some(*request))
        .unwrap();
    let handle = limit.handle();
    let mut service = limit.layer(echo());
    for _ in 0..2 {
        send(&mut service, 1).await.unwrap();
    }
    let bad: Policies = toml::from_str(
        "[limits.per_client]\ncapacity = 0\nrefill = \"1/s\"\nkeyed = { max_keys = 10 }",
    )
    .unwrap();
    let refused = bad.reload_rate_limit("per_client", &handle).unwrap_err();
    assert_eq!(refused.path(), "limits.per_client.capacity");
    let missing = bad.reload_rate_limit("checkout", &handle).unwrap_err();
    assert_eq!(missing.to_string(), "limits.checkout: no such policy");
    assert_eq!(handle.available_for(&1), 2);

    let after: Policies = toml::from_str(
        "[limits.per_client]\ncapacity = 2\nrefill = \"1/10s\"\nkeyed = { max_keys = 10 }",
    )
    .unwrap();
    after.reload_rate_limit("per_client", &handle).unwrap();
    // Key 1 held 2 of 4: it holds 1 of 2. Key 2 is new: a full bucket of the new size.
    assert_eq!(handle.available_for(&1), 1);
    assert_eq!(handle.available_for(&2), 2);
    send(&mut service, 1).await.unwrap();
    let error = send(&mut service, 1).await.unwrap_err();
    assert_eq!(limited(&error).retry_after(), 10 * SECOND);
    for _ in 0..2 {
        send(&mut service, 2).await.unwrap();
    }
    assert!(send(&mut service, 2).await.is_err());
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The units of a token and of a nanosecond at `tokens` per `period_ns` (the rate in
/// lowest terms, as the bucket counts it).
fn units(tokens: u64, period_ns: u64) -> (i128, i128) {
    let common = gcd(tokens, period_ns);
    (i128::from(period_ns / common), i128::from(tokens / common))
}

/// `numerator / denominator`, rounded down or up.
fn divide(numerator: i128, denominator: i128, up: bool) -> i128 {
    let down = numerator.div_euclid(denominator);
    if up && down * denominator != numerator {
        down + 1
    } else {
        down
    }
}

/// A quota as the model sees it: capacity, refill tokens, refill period in nanoseconds.
type Plain = (u64, u64, u64);

/// What the model says a bucket holds `elapsed_ns` after switching from `from` holding
/// `held` tokens (negative: owing them to queued reservations) to `to`. It keeps its
/// fullness as a fraction of the capacity (a debt in tokens), counted in units of the new
/// quota: exact where a whole number of units expresses it, else rounded down when the
/// new full bucket has fewer units than the old, up when it has more. Then it refills
/// exactly, up to the new capacity.
fn model(from: Plain, held: i64, to: Plain, elapsed_ns: u64) -> u64 {
    let (token_from, _) = units(from.1, from.2);
    let (token, unit) = units(to.1, to.2);
    let (full_from, full) = (i128::from(from.0) * token_from, i128::from(to.0) * token);
    let held = i128::from(held);
    let held_units = if held > 0 {
        divide(held * token_from * full, full_from, full > full_from)
    } else {
        held * token
    };
    let total = held_units + i128::from(elapsed_ns) * unit;
    u64::try_from(total.div_euclid(token).clamp(0, i128::from(to.0))).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A bucket drained by `take` (and owing `owe` more to a queued reservation) switches
    /// quota; what it holds then, and at two later times, is the model's.
    #[test]
    fn the_tokens_carry_over_as_the_model_says(
        capacity in 1u64..=1_000,
        from_tokens in 1u64..=1_000,
        from_period_ms in 1u64..=10_000,
        take_share in 0.0f64..=1.0,
        owe in 0u64..=20,
        to_capacity in 1u64..=1_000,
        to_tokens in 1u64..=1_000,
        to_period_ms in 1u64..=10_000,
        later_ms in prop::collection::vec(0u64..=20_000, 2),
    ) {
        let start = Instant::now();
        let from = Quota::new(capacity, from_tokens, Duration::from_millis(from_period_ms)).unwrap();
        let to_period = Duration::from_millis(to_period_ms);
        let to = Quota::new(to_capacity, to_tokens, to_period).unwrap();
        let bucket = TokenBucket::new(from, start);
        // Truncation is the point: a whole number of tokens, from none to all.
        let take = ((capacity as f64) * take_share) as u64;
        if take > 0 {
            bucket.acquire(take, start).unwrap();
        }
        let owe = if take == capacity { owe.min(capacity) } else { 0 };
        if owe > 0 {
            bucket.reserve(owe, Duration::MAX, start).unwrap();
        }
        let held = i64::try_from(capacity - take).unwrap() - i64::try_from(owe).unwrap();
        bucket.set_quota(to, start);
        let period_ns = |ms: u64| ms * 1_000_000;
        let from = (capacity, from_tokens, period_ns(from_period_ms));
        let to = (to_capacity, to_tokens, period_ns(to_period_ms));
        prop_assert_eq!(bucket.available(start), model(from, held, to, 0));
        let mut elapsed = 0;
        for ms in later_ms {
            elapsed += ms * 1_000_000;
            prop_assert_eq!(
                bucket.available(start + Duration::from_nanos(elapsed)),
                model(from, held, to, elapsed),
                "{} ms after the switch", elapsed / 1_000_000
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Flipping between two quotas with no time passing: through a quota whose full
    /// bucket has at least as many units the bucket comes back exactly; through one with
    /// fewer it loses less than one of that quota's units (`capacity / units` tokens of
    /// its own), on the first round trip only.
    #[test]
    fn round_trips_are_exact_or_lose_less_than_a_unit_once(
        a in (1u64..=1_000, 1u64..=1_000, 1u64..=100_000),
        b in (1u64..=1_000, 1u64..=1_000, 1u64..=100_000),
        take_share in 0.0f64..=1.0,
        flips in 1usize..=20,
    ) {
        let quota = |(capacity, tokens, period): Plain| {
            Quota::new(capacity, tokens, Duration::from_nanos(period))
        };
        let (Ok(quota_a), Ok(quota_b)) = (quota(a), quota(b)) else {
            return Err(TestCaseError::reject("not a valid quota"));
        };
        let start = Instant::now();
        let bucket = TokenBucket::new(quota_a, start);
        let take = ((a.0 as f64) * take_share) as u64;
        if take > 0 {
            bucket.acquire(take, start).unwrap();
        }
        let round_trip = || {
            bucket.set_quota(quota_b, start);
            bucket.set_quota(quota_a, start);
            bucket.available(start)
        };
        let held = a.0 - take;
        let after = round_trip();
        let (full_a, full_b) = (a.0 * units(a.1, a.2).0 as u64, b.0 * units(b.1, b.2).0 as u64);
        if full_b >= full_a {
            prop_assert_eq!(after, held);
        } else {
            prop_assert!(after <= held);
            prop_assert!(held - after <= a.0.div_ceil(full_b), "{held} -> {after}");
        }
        for _ in 0..flips {
            prop_assert_eq!(round_trip(), after);
        }
    }
}
