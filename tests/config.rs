//! Configuration as data: the example file parses and builds, every policy survives a
//! round trip through JSON, TOML and YAML with the same behaviour, defaults are the
//! builder's, every validation rule is reported at its field's path, and unknown fields
//! are refused.
#![cfg(feature = "serde")]

use palisade::circuit_breaker::{
    CircuitBreakerConfigError, CircuitBreakerLayer, SlidingWindow, State,
};
use palisade::concurrency_limit::{ConcurrencyLimitConfigError, ConcurrencyLimitLayer};
use palisade::config::{
    CircuitBreakerConfig, ConfigError, MissingPolicy, Policies, PolicyMismatch, RateLimitConfig,
    Refill, RetryConfig,
};
use palisade::rate_limit::{RateLimitConfigError, RateLimitLayer};
use palisade::retry::{RetryConfigError, RetryLayer};
use std::time::Duration;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

const EXAMPLE: &str = include_str!("../examples/policies.toml");

fn example() -> Policies {
    toml::from_str(EXAMPLE).expect("the example file parses")
}

fn toml_doc(text: &str) -> Policies {
    toml::from_str(text).unwrap_or_else(|error| panic!("{text}\n{error}"))
}

/// The document through each format and back.
fn round_trips(policies: &Policies) -> Vec<(&'static str, Policies)> {
    let json = serde_json::to_string_pretty(policies).expect("to JSON");
    let toml = toml::to_string(policies).expect("to TOML");
    let yaml = serde_norway::to_string(policies).expect("to YAML");
    vec![
        ("json", serde_json::from_str(&json).expect("from JSON")),
        (
            "toml",
            toml::from_str(&toml).unwrap_or_else(|e| panic!("{toml}\n{e}")),
        ),
        (
            "yaml",
            serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("{yaml}\n{e}")),
        ),
    ]
}

#[test]
fn the_readme_shows_the_example_file() {
    let readme = include_str!("../README.md");
    assert!(
        readme.contains(EXAMPLE.trim()),
        "README's Configuration section is examples/policies.toml, verbatim"
    );
}

#[test]
fn every_policy_of_the_example_file_builds() {
    let policies = example();
    let _ = policies.rate_limit("payments").unwrap();
    let _ = policies
        .keyed_rate_limit::<_, String>("per_client", |request: &String| Some(request.clone()))
        .unwrap();
    for name in ["inventory", "payments"] {
        let _ = policies.circuit_breaker(name).unwrap();
    }
    let _ = policies
        .keyed_circuit_breaker::<_, String>("per_upstream", |request: &String| {
            Some(request.clone())
        })
        .unwrap();
    for name in ["idempotent", "polling"] {
        let _ = policies.retry(name).unwrap();
    }
    for name in ["api", "search", "reports"] {
        let _ = policies.concurrency_limit(name).unwrap();
    }
    let _ = policies
        .keyed_concurrency_limit::<_, String>("per_tenant", |request: &String| {
            Some(request.clone())
        })
        .unwrap();
    #[cfg(feature = "http")]
    policies.deadlines("edge").unwrap();

    // The fleet's limit is on Redis: without its connection it does not build.
    let error = policies.rate_limit("fleet").unwrap_err();
    assert_eq!(error.path(), "limits.fleet.redis");
    assert_eq!(
        error.error().downcast_ref::<PolicyMismatch>(),
        Some(&PolicyMismatch::NeedsRedis)
    );
}

#[test]
fn the_example_file_round_trips_in_json_toml_and_yaml() {
    let policies = example();
    // Every section and every optional field of the example is there to be compared.
    assert_eq!(policies.limits.len(), 3);
    assert!(
        policies.limits["fleet"]
            .redis
            .as_ref()
            .unwrap()
            .lease_for
            .is_some()
    );
    for (format, back) in round_trips(&policies) {
        assert_eq!(back, policies, "{format}");
        // And once more from what came back: serializing is stable.
        for (again, twice) in round_trips(&back) {
            assert_eq!(twice, policies, "{format} then {again}");
        }
    }
}

#[test]
fn rates_are_written_as_a_fraction_or_a_table() {
    let rate = |text: &str| -> Refill {
        let config: RateLimitConfig =
            toml::from_str(&format!("capacity = 1\nrefill = {text}")).unwrap();
        config.refill
    };
    assert_eq!(rate("\"100/s\""), Refill::new(100, Duration::from_secs(1)));
    assert_eq!(
        rate("\"5/250ms\""),
        Refill::new(5, Duration::from_millis(250))
    );
    assert_eq!(
        rate("\"1000 / 1m\""),
        Refill::new(1000, Duration::from_secs(60))
    );
    assert_eq!(
        rate("\"3/1h 30m\""),
        Refill::new(3, Duration::from_secs(5400))
    );
    assert_eq!(
        rate("{ tokens = 7, per = \"2s\" }"),
        Refill::new(7, Duration::from_secs(2))
    );
    assert_eq!(
        Refill::new(100, Duration::from_secs(1)).to_string(),
        "100/1s"
    );
    for bad in [
        "\"100\"",
        "\"x/s\"",
        "\"1/fortnight\"",
        "\"-1/s\"",
        "{ tokens = 1 }",
        "5",
    ] {
        let text = format!("capacity = 1\nrefill = {bad}");
        assert!(
            toml::from_str::<RateLimitConfig>(&text).is_err(),
            "{bad} is not a rate"
        );
    }
}

fn echo() -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone {
    service_fn(|request: u32| async move { Ok::<_, BoxError>(request) })
}

/// What a limiter admits of a burst, a trickle and a second burst, on paused time: for
/// each request, whether it passed and how long it waited.
async fn admissions<L>(layer: L) -> Vec<(bool, Duration)>
where
    L: Layer<
            tower::util::ServiceFn<fn(u32) -> std::future::Ready<Result<u32, BoxError>>>,
            Service: Service<u32, Response = u32, Error = BoxError>,
        >,
{
    fn ok(request: u32) -> std::future::Ready<Result<u32, BoxError>> {
        std::future::ready(Ok(request))
    }
    let mut service = layer.layer(service_fn(ok as fn(u32) -> _));
    let mut seen = Vec::new();
    let gaps = [0, 0, 0, 0, 0, 0, 30, 5, 5, 20, 200, 0, 0, 0, 0, 1000, 0, 0];
    for (request, gap) in gaps.into_iter().enumerate() {
        tokio::time::advance(Duration::from_millis(gap)).await;
        let start = tokio::time::Instant::now();
        let passed = service
            .ready()
            .await
            .unwrap()
            .call(request as u32)
            .await
            .is_ok();
        seen.push((passed, start.elapsed()));
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn a_limiter_from_a_file_admits_after_a_round_trip_what_it_admitted_before() {
    let policies = toml_doc(
        "[limits.api]\ncapacity = 3\nrefill = \"10/s\"\nmax_wait = \"50ms\"\n\
         [limits.strict]\ncapacity = 2\nrefill = { tokens = 1, per = \"100ms\" }",
    );
    for name in ["api", "strict"] {
        let original = admissions(policies.rate_limit(name).unwrap()).await;
        assert!(
            original.iter().any(|(passed, _)| !passed),
            "{name} refuses some"
        );
        assert!(
            original.iter().any(|(passed, _)| *passed),
            "{name} admits some"
        );
        for (format, back) in round_trips(&policies) {
            assert_eq!(
                admissions(back.rate_limit(name).unwrap()).await,
                original,
                "{name} after {format}"
            );
        }
    }
    // The same policy in code admits the same requests: the file's defaults are the
    // builder's.
    let in_code = RateLimitLayer::builder()
        .capacity(2)
        .refill(1, Duration::from_millis(100))
        .build()
        .unwrap();
    assert_eq!(
        admissions(in_code).await,
        admissions(policies.rate_limit("strict").unwrap()).await
    );
    let waiting_in_code = RateLimitLayer::builder()
        .capacity(3)
        .refill(10, Duration::from_secs(1))
        .max_wait(Duration::from_millis(50))
        .build()
        .unwrap();
    assert_eq!(
        admissions(waiting_in_code).await,
        admissions(policies.rate_limit("api").unwrap()).await
    );
}

/// A breaker's state after each step of a fixed script of failures, successes and
/// pauses, on paused time.
async fn breaker_script(layer: CircuitBreakerLayer) -> Vec<State> {
    let handle = layer.handle();
    let mut service = layer.layer(service_fn(|fail: bool| async move {
        if fail {
            Err::<(), BoxError>("down".into())
        } else {
            Ok(())
        }
    }));
    let mut states = Vec::new();
    let script: Vec<(bool, u64)> = std::iter::repeat_n((true, 0), 25)
        .chain([(false, 3_000), (false, 40_000)])
        .chain(std::iter::repeat_n((false, 0), 6))
        .chain(std::iter::repeat_n((true, 100), 30))
        .chain([(true, 70_000), (false, 0)])
        .collect();
    for (fail, pause_ms) in script {
        tokio::time::advance(Duration::from_millis(pause_ms)).await;
        let _ = service.ready().await.unwrap().call(fail).await;
        states.push(handle.state());
    }
    states
}

#[tokio::test(start_paused = true)]
async fn a_breaker_from_a_file_behaves_as_the_builder_after_a_round_trip() {
    let policies = toml_doc(
        "[breakers.default]\n\
         [breakers.tuned]\nfailure_rate_threshold = 0.4\nminimum_calls = 10\n\
         sliding_window = { count = 20 }\nopen_for = \"5s\"\nhalf_open_probes = 2\n\
         [breakers.timed]\nsliding_window = { time = \"2s\", buckets = 4 }\n\
         open_backoff = { initial = \"1s\", max = \"8s\" }\nminimum_calls = 5",
    );
    let in_code = [
        ("default", CircuitBreakerLayer::builder().build().unwrap()),
        (
            "tuned",
            CircuitBreakerLayer::builder()
                .failure_rate_threshold(0.4)
                .minimum_calls(10)
                .sliding_window(SlidingWindow::count(20))
                .open_for(Duration::from_secs(5))
                .half_open_probes(2)
                .build()
                .unwrap(),
        ),
        (
            "timed",
            CircuitBreakerLayer::builder()
                .sliding_window(SlidingWindow::time(Duration::from_secs(2)).buckets(4))
                .open_backoff(
                    palisade::circuit_breaker::OpenBackoff::exponential(Duration::from_secs(1))
                        .max(Duration::from_secs(8)),
                )
                .minimum_calls(5)
                .build()
                .unwrap(),
        ),
    ];
    for (name, layer) in in_code {
        let expected = breaker_script(layer).await;
        assert!(expected.contains(&State::Open), "{name} trips");
        assert_eq!(
            breaker_script(policies.circuit_breaker(name).unwrap()).await,
            expected,
            "{name} from the file"
        );
        for (format, back) in round_trips(&policies) {
            assert_eq!(
                breaker_script(back.circuit_breaker(name).unwrap()).await,
                expected,
                "{name} after {format}"
            );
        }
    }
}

/// How many attempts a retry layer makes for a request that always fails, and when.
async fn attempts(layer: RetryLayer) -> Vec<Duration> {
    let start = tokio::time::Instant::now();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let service = layer.layer(service_fn(move |_: u32| {
        record.lock().unwrap().push(start.elapsed());
        async { Err::<u32, BoxError>("down".into()) }
    }));
    let _ = service.oneshot(1).await;
    seen.lock().unwrap().clone()
}

#[tokio::test(start_paused = true)]
async fn a_retry_from_a_file_behaves_as_the_builder() {
    let policies = toml_doc(
        "[retries.default]\n\
         [retries.steady]\nmax_attempts = 4\nbackoff = { kind = \"linear\", base = \"100ms\" }",
    );
    // The default's full jitter makes its delays random: compare the attempts only.
    assert_eq!(
        attempts(policies.retry("default").unwrap()).await.len(),
        attempts(RetryLayer::builder().build().unwrap()).await.len()
    );
    let steady = attempts(policies.retry("steady").unwrap()).await;
    let ms = Duration::from_millis;
    assert_eq!(steady, [ms(0), ms(100), ms(300), ms(600)]);
    for (format, back) in round_trips(&policies) {
        assert_eq!(
            attempts(back.retry("steady").unwrap()).await,
            steady,
            "{format}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_limit_from_a_file_admits_what_its_limit_allows() {
    let policies = toml_doc("[concurrency.two]\nmax_in_flight = 2");
    for (format, policies) in round_trips(&policies) {
        let layer: ConcurrencyLimitLayer = policies.concurrency_limit("two").unwrap();
        let handle = layer.handle();
        let (release, gate) = tokio::sync::watch::channel(false);
        let service = layer.layer(service_fn(move |_: u32| {
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok::<_, BoxError>(())
            }
        }));
        let held: Vec<_> = (0..2)
            .map(|i| tokio::spawn(service.clone().oneshot(i)))
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(handle.in_flight(), 2, "{format}");
        assert!(
            service.clone().oneshot(3).await.is_err(),
            "{format}: the third is refused"
        );
        release.send(true).unwrap();
        for task in held {
            task.await.unwrap().unwrap();
        }
    }
}

/// The error building policy `p` of the one-policy document `section` + `body` gives.
fn error_of(section: &str, body: &str) -> ConfigError {
    let policies = toml_doc(&format!("[{section}.p]\n{body}"));
    let result = match section {
        "limits" => policies.rate_limit("p").map(drop),
        "breakers" => policies.circuit_breaker("p").map(drop),
        "retries" => policies.retry("p").map(drop),
        "concurrency" => policies.concurrency_limit("p").map(drop),
        #[cfg(feature = "http")]
        "deadlines" => policies.deadlines("p").map(drop),
        _ => unreachable!("{section}"),
    };
    result.expect_err(body)
}

/// Every case gives an error at `path`, whose message is the path and the builder's own
/// error, which downcasts to `E`.
fn check<E: std::error::Error + 'static>(section: &str, cases: &[(&str, &str)]) {
    for (body, path) in cases {
        let error = error_of(section, body);
        let full = format!(
            "{section}.p{}{path}",
            if path.is_empty() { "" } else { "." }
        );
        assert_eq!(error.path(), full, "{body}");
        let rule = error
            .error()
            .downcast_ref::<E>()
            .unwrap_or_else(|| panic!("{body}: {error} is the builder's error"));
        assert_eq!(error.to_string(), format!("{full}: {rule}"), "{body}");
    }
}

#[test]
fn every_rate_limit_rule_is_reported_at_its_field() {
    check::<RateLimitConfigError>(
        "limits",
        &[
            ("capacity = 0\nrefill = \"1/s\"", "capacity"),
            ("capacity = 1\nrefill = \"0/s\"", "refill"),
            ("capacity = 1\nrefill = \"1/0s\"", "refill"),
            ("capacity = 1\nrefill = \"2/1ns\"", "refill"),
            // capacity × interval beyond the bucket's arithmetic
            (
                "capacity = 18446744073709551615\nrefill = \"1/1000days\"",
                "capacity",
            ),
            (
                "capacity = 1\nrefill = \"1/s\"\nmax_wait = \"10years\"",
                "max_wait",
            ),
        ],
    );
    let keyed = |body: &str| {
        let policies = toml_doc(&format!(
            "[limits.p]\ncapacity = 1\nrefill = \"1/s\"\n{body}"
        ));
        policies
            .keyed_rate_limit::<_, u32>("p", |request: &u32| Some(*request))
            .map(drop)
            .unwrap_err()
    };
    let error = keyed("keyed = { max_keys = 0 }");
    assert_eq!(error.path(), "limits.p.keyed.max_keys");
    assert_eq!(
        error.error().downcast_ref::<RateLimitConfigError>(),
        Some(&RateLimitConfigError::ZeroMaxKeys)
    );
    assert_eq!(
        error.to_string(),
        "limits.p.keyed.max_keys: rate limit max_keys must be at least 1"
    );

    // A file and the code that builds it must agree on keyed or global.
    let error = keyed("");
    assert_eq!(error.path(), "limits.p");
    assert_eq!(
        error.error().downcast_ref(),
        Some(&PolicyMismatch::NotKeyed)
    );
    let error = error_of("limits", "capacity = 1\nrefill = \"1/s\"\nkeyed = {}");
    assert_eq!(error.path(), "limits.p.keyed");
    assert_eq!(
        error.error().downcast_ref(),
        Some(&PolicyMismatch::NeedsExtractor)
    );
}

#[test]
fn every_breaker_rule_is_reported_at_its_field() {
    check::<CircuitBreakerConfigError>(
        "breakers",
        &[
            ("failure_rate_threshold = 0.0", "failure_rate_threshold"),
            ("failure_rate_threshold = 1.5", "failure_rate_threshold"),
            (
                "slow_calls = { threshold = \"1s\", rate = 0.0 }",
                "slow_calls.rate",
            ),
            (
                "slow_calls = { threshold = \"0s\", rate = 0.5 }",
                "slow_calls.threshold",
            ),
            ("minimum_calls = 0", "minimum_calls"),
            (
                "minimum_calls = 11\nsliding_window = { count = 10 }",
                "minimum_calls",
            ),
            ("sliding_window = { count = 0 }", "sliding_window.count"),
            (
                "sliding_window = { count = 2000000 }",
                "sliding_window.count",
            ),
            (
                "sliding_window = { time = \"200years\" }",
                "sliding_window.time",
            ),
            (
                "sliding_window = { time = \"1s\", buckets = 0 }",
                "sliding_window.buckets",
            ),
            (
                "sliding_window = { time = \"1h\", buckets = 2000 }",
                "sliding_window.buckets",
            ),
            (
                "sliding_window = { time = \"5ms\", buckets = 10 }",
                "sliding_window",
            ),
            ("open_for = \"0s\"", "open_for"),
            ("open_for = \"200years\"", "open_for"),
            (
                "open_backoff = { initial = \"0s\" }",
                "open_backoff.initial",
            ),
            (
                "open_backoff = { initial = \"200years\" }",
                "open_backoff.initial",
            ),
            (
                "open_backoff = { initial = \"1s\", max = \"200years\" }",
                "open_backoff.max",
            ),
            (
                "open_backoff = { initial = \"2s\", max = \"1s\" }",
                "open_backoff.max",
            ),
            (
                "open_backoff = { initial = \"1s\", multiplier = 0.5 }",
                "open_backoff.multiplier",
            ),
            (
                "open_backoff = { initial = \"1s\", jitter = 1.0 }",
                "open_backoff.jitter",
            ),
            ("half_open_probes = 0", "half_open_probes"),
            ("half_open_probes = 5000", "half_open_probes"),
        ],
    );
    let error = error_of(
        "breakers",
        "open_for = \"1s\"\nopen_backoff = { initial = \"1s\" }",
    );
    assert_eq!(error.path(), "breakers.p.open_backoff");
    assert_eq!(
        error.error().downcast_ref(),
        Some(&PolicyMismatch::Exclusive("open_for", "open_backoff"))
    );
}

#[test]
fn every_retry_rule_is_reported_at_its_field() {
    check::<RetryConfigError>(
        "retries",
        &[
            ("max_attempts = 0", "max_attempts"),
            (
                "backoff = { base = \"1s\", multiplier = 0.5 }",
                "backoff.multiplier",
            ),
            ("backoff = { base = \"2s\", max = \"1s\" }", "backoff.max"),
            (
                "backoff = { base = \"1s\", jitter = { proportional = 1.5 } }",
                "backoff.jitter",
            ),
            (
                "budget = { ttl = \"500ms\", min_per_sec = 1, ratio = 0.1 }",
                "budget.ttl",
            ),
            (
                "budget = { ttl = \"10s\", min_per_sec = 2000000, ratio = 0.1 }",
                "budget.min_per_sec",
            ),
            (
                "budget = { ttl = \"10s\", min_per_sec = 1, ratio = -1.0 }",
                "budget.ratio",
            ),
            ("per_attempt_timeout = \"0s\"", "per_attempt_timeout"),
            ("deadline = \"0s\"", "deadline"),
        ],
    );
}

#[test]
fn every_concurrency_limit_rule_is_reported_at_its_field() {
    check::<ConcurrencyLimitConfigError>(
        "concurrency",
        &[
            ("retry_after = \"1s\"", "max_in_flight"),
            ("max_in_flight = 0", "max_in_flight"),
            ("max_in_flight = 1\nretry_after = \"0s\"", "retry_after"),
            (
                "max_in_flight = 1\nqueue = { waiters = 0, max_wait = \"1s\" }",
                "queue.waiters",
            ),
            (
                "max_in_flight = 1\nqueue = { waiters = 1, max_wait = \"0s\" }",
                "queue.max_wait",
            ),
            ("aimd = { min_limit = 0 }", "aimd.min_limit"),
            ("aimd = { initial_limit = 5, max_limit = 4 }", "aimd"),
            ("aimd = { backoff_ratio = 0.1 }", "aimd.backoff_ratio"),
            (
                "aimd = { latency_threshold = \"0s\" }",
                "aimd.latency_threshold",
            ),
            ("gradient = { interval = \"0s\" }", "gradient.interval"),
            (
                "gradient = { min_rtt_interval = \"2days\" }",
                "gradient.min_rtt_interval",
            ),
            ("gradient = { percentile = 0.0 }", "gradient.percentile"),
            ("gradient = { buffer = 11.0 }", "gradient.buffer"),
            (
                "gradient = { min_rtt_requests = 0 }",
                "gradient.min_rtt_requests",
            ),
        ],
    );
    let keyed = |body: &str| {
        toml_doc(&format!("[concurrency.p]\nmax_in_flight = 4\n{body}"))
            .keyed_concurrency_limit::<_, u32>("p", |request: &u32| Some(*request))
            .map(drop)
            .unwrap_err()
    };
    for (body, path) in [
        ("keyed = { max_keys = 0 }", "keyed.max_keys"),
        (
            "keyed = {}\nqueue = { waiters = 1, max_wait = \"1s\" }",
            "queue",
        ),
    ] {
        let error = keyed(body);
        assert_eq!(error.path(), format!("concurrency.p.{path}"), "{body}");
        let rule = error
            .error()
            .downcast_ref::<ConcurrencyLimitConfigError>()
            .unwrap();
        assert_eq!(error.to_string(), format!("concurrency.p.{path}: {rule}"));
    }
    let error = keyed("");
    assert_eq!(error.path(), "concurrency.p");
    assert_eq!(
        error.error().downcast_ref(),
        Some(&PolicyMismatch::NotKeyed)
    );
    let error = error_of("concurrency", "max_in_flight = 1\nkeyed = {}");
    assert_eq!(error.path(), "concurrency.p.keyed");
    assert_eq!(
        error.error().downcast_ref(),
        Some(&PolicyMismatch::NeedsExtractor)
    );

    let error = error_of("concurrency", "max_in_flight = 1\ngradient = {}");
    assert_eq!(error.path(), "concurrency.p.gradient");
    assert_eq!(
        error.error().downcast_ref(),
        Some(&PolicyMismatch::Exclusive("max_in_flight", "gradient"))
    );
}

#[cfg(feature = "http")]
#[test]
fn every_deadline_rule_is_reported_at_its_field() {
    use palisade::correlation::DeadlineConfigError;
    check::<DeadlineConfigError>(
        "deadlines",
        &[
            ("max = \"0s\"", "max"),
            ("max = \"1s\"\ndefault = \"2s\"", "default"),
            ("max = \"1s\"\nmin_left = \"1s\"", "min_left"),
        ],
    );
    let error = error_of("deadlines", "header = \"not a header\"");
    assert_eq!(error.path(), "deadlines.p.header");
}

#[test]
fn a_missing_policy_is_named() {
    let policies = example();
    let error = policies.circuit_breaker("payment").unwrap_err();
    assert_eq!(error.path(), "breakers.payment");
    assert_eq!(error.to_string(), "breakers.payment: no such policy");
    assert!(error.error().is::<MissingPolicy>());
    assert_eq!(policies.retry("x").unwrap_err().path(), "retries.x");
    assert_eq!(
        policies.concurrency_limit("x").unwrap_err().path(),
        "concurrency.x"
    );
    assert_eq!(policies.rate_limit("x").unwrap_err().path(), "limits.x");
}

#[test]
fn unknown_fields_are_refused_everywhere() {
    let cases = [
        "[limits.p]\ncapacity = 1\nrefill = \"1/s\"\nmax_wiat = \"1s\"",
        "[limits.p]\ncapacity = 1\nrefill = { tokens = 1, per = \"1s\", burst = 2 }",
        "[limits.p]\ncapacity = 1\nrefill = \"1/s\"\nkeyed = { max_key = 1 }",
        "[limits.p]\ncapacity = 1\nrefill = \"1/s\"\nredis = { prefx = \"a\" }",
        "[limits.p]\ncapacity = 1\nrefill = \"1/s\"\nredis = { when_unavailable = { local = { replicas = 2, x = 1 } } }",
        "[breakers.p]\nfailure_rate = 0.5",
        "[breakers.p]\nsliding_window = { count = 10, size = 1 }",
        "[breakers.p]\nslow_calls = { threshold = \"1s\", rate = 0.5, x = 1 }",
        "[breakers.p]\nopen_backoff = { initial = \"1s\", cap = \"2s\" }",
        "[retries.p]\nattempts = 3",
        "[retries.p]\nbackoff = { base = \"1s\", cap = \"2s\" }",
        "[retries.p]\nbudget = { ttl = \"10s\", min_per_sec = 1, ratio = 0.1, x = 1 }",
        "[concurrency.p]\nmax_in_flight = 1\nqueue = { waiters = 1, max_wait = \"1s\", x = 1 }",
        "[concurrency.p]\naimd = { initial = 1 }",
        "[concurrency.p]\ngradient = { initial = 1 }",
        "[concurrency.p]\nmax_in_flight = 1\nkeyed = { max = 1 }",
        "[deadlines.p]\nmaximum = \"1s\"",
        "[limit.p]\ncapacity = 1\nrefill = \"1/s\"",
    ];
    for case in cases {
        let error = toml::from_str::<Policies>(case)
            .expect_err(case)
            .to_string();
        // (toml words it its own way for an enum's variant.)
        let unknown =
            |error: &str| error.contains("unknown field") || error.contains("unexpected keys");
        assert!(unknown(&error), "{case}: {error}");
        // JSON too.
        let value: toml::Value = toml::from_str(case).unwrap();
        let json = serde_json::to_string(&value).unwrap();
        let error = serde_json::from_str::<Policies>(&json)
            .expect_err(&json)
            .to_string();
        assert!(unknown(&error), "{json}: {error}");
    }
}

#[test]
fn a_window_or_a_backoff_of_the_wrong_shape_is_refused() {
    for (body, why) in [
        (
            "sliding_window = { count = 10, time = \"1s\" }",
            "exactly one",
        ),
        ("sliding_window = {}", "exactly one"),
        (
            "sliding_window = { count = 10, buckets = 2 }",
            "time window only",
        ),
        ("open_for = \"soon\"", ""),
        ("open_for = 30", ""),
    ] {
        let error = toml::from_str::<CircuitBreakerConfig>(body)
            .expect_err(body)
            .to_string();
        assert!(error.contains(why), "{body}: {error}");
    }
    assert!(
        toml::from_str::<RetryConfig>("backoff = { kind = \"quadratic\", base = \"1s\" }").is_err()
    );
    assert!(
        toml::from_str::<RetryConfig>("backoff = { max = \"1s\" }").is_err(),
        "base is required"
    );
}

#[cfg(feature = "redis")]
#[path = "rate_limit_redis/server.rs"]
#[allow(dead_code)]
mod server;

#[cfg(feature = "redis")]
mod redis {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_limit_on_redis_builds_from_its_section_and_reports_its_rules() {
        let server = server::RedisServer::start().await;
        let manager = server.manager().await;
        let mut policies = example();
        // The example's 5 ms would fail open on a loaded machine, leaving no key behind.
        let redis = policies
            .limits
            .get_mut("fleet")
            .unwrap()
            .redis
            .as_mut()
            .unwrap();
        redis.timeout = Some(Duration::from_secs(2));
        redis.when_unavailable = Some(palisade::config::WhenUnavailableConfig::Reject);
        let fleet = policies
            .rate_limit_on_redis("fleet", RateLimitLayer::builder(), manager.clone())
            .unwrap();
        let mut service = fleet.layer(echo());
        assert_eq!(service.ready().await.unwrap().call(7).await.unwrap(), 7);
        assert!(
            !server.keys("gateway:rl:*").await.is_empty(),
            "the prefix is the file's"
        );

        let base = "[limits.p]\ncapacity = 1\nrefill = \"1/s\"\n";
        for (redis, path) in [
            ("redis = { batch = 0 }", "redis.batch"),
            (
                "redis = { when_unavailable = { local = { replicas = 2 } }, fallback_max_keys = 0 }",
                "redis.fallback_max_keys",
            ),
            (
                "redis = { batch = 2, lease_max_keys = 0 }",
                "redis.lease_max_keys",
            ),
            (
                "redis = { batch = 2, lease_for = \"10years\" }",
                "redis.lease_for",
            ),
        ] {
            let policies = toml_doc(&format!("{base}{redis}"));
            let error = policies
                .rate_limit_on_redis("p", RateLimitLayer::builder(), manager.clone())
                .map(drop)
                .unwrap_err();
            assert_eq!(error.path(), format!("limits.p.{path}"), "{redis}");
            assert!(error.error().is::<RateLimitConfigError>(), "{redis}");
        }
        // Without a `redis` section, a limit is not built on Redis.
        let error = toml_doc(base)
            .rate_limit_on_redis("p", RateLimitLayer::builder(), manager)
            .map(drop)
            .unwrap_err();
        assert_eq!(
            error.error().downcast_ref(),
            Some(&PolicyMismatch::NotOnRedis)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn keyed_breakers_from_a_file_keep_one_breaker_per_key() {
    let policies = toml_doc(
        "[breakers.per_upstream]\nminimum_calls = 2\nsliding_window = { count = 2 }\nkeyed = { max_keys = 8 }",
    );
    let round_tripped: Policies =
        serde_json::from_str(&serde_json::to_string(&policies).unwrap()).unwrap();
    assert_eq!(round_tripped, policies);
    let layer = round_tripped
        .keyed_circuit_breaker::<_, &'static str>("per_upstream", |call: &(&'static str, bool)| {
            Some(call.0)
        })
        .expect("a keyed policy with its extractor");
    let handle = layer.handle();
    let mut service = layer.layer(service_fn(|(_, fail): (&'static str, bool)| async move {
        if fail {
            Err::<(), BoxError>("down".into())
        } else {
            Ok(())
        }
    }));
    for call in [("payments", true), ("payments", true), ("users", false)] {
        let _ = service.ready().await.unwrap().call(call).await;
    }
    assert_eq!(handle.state_for(&"payments"), State::Open);
    assert_eq!(handle.state_for(&"users"), State::Closed);
}

#[test]
fn a_keyed_breaker_policy_is_reported_at_its_fields() {
    let keyed = |body: &str| {
        toml_doc(&format!("[breakers.p]\n{body}"))
            .keyed_circuit_breaker::<_, u32>("p", |request: &u32| Some(*request))
            .map(drop)
            .expect_err(body)
    };
    let error = keyed("keyed = { max_keys = 0 }");
    assert_eq!(error.path(), "breakers.p.keyed.max_keys");
    assert_eq!(
        error.error().downcast_ref(),
        Some(&CircuitBreakerConfigError::ZeroMaxKeys)
    );
    // A file and the code that builds it must agree on keyed or global.
    let error = keyed("");
    assert_eq!(
        error.error().downcast_ref(),
        Some(&PolicyMismatch::NotKeyed)
    );
    let error = error_of("breakers", "keyed = {}");
    assert_eq!(error.path(), "breakers.p.keyed");
    assert_eq!(
        error.error().downcast_ref(),
        Some(&PolicyMismatch::NeedsExtractor)
    );
}

#[tokio::test(start_paused = true)]
async fn shadow_breakers_and_concurrency_limits_come_from_the_file_and_survive_a_round_trip() {
    let policies = toml_doc(
        "[breakers.watching]\nminimum_calls = 2\nsliding_window = { count = 2 }\nshadow = true\n\
         [breakers.enforcing]\nminimum_calls = 2\nsliding_window = { count = 2 }\nshadow = false\n\
         [breakers.keyed_watching]\nminimum_calls = 2\nsliding_window = { count = 2 }\n\
         keyed = { max_keys = 4 }\nshadow = true\n\
         [concurrency.watching]\nmax_in_flight = 1\nshadow = true\n\
         [concurrency.enforcing]\nmax_in_flight = 1",
    );
    let failing = || service_fn(|_: u32| async { Err::<(), BoxError>("down".into()) });
    for (format, policies) in round_trips(&policies) {
        assert_eq!(policies, policies.clone(), "{format}");
        for (name, shadow) in [("watching", true), ("enforcing", false)] {
            let layer = policies.circuit_breaker(name).unwrap();
            let handle = layer.handle();
            assert_eq!(handle.is_shadow(), shadow, "{format}: {name}");
            let mut service = layer.layer(failing());
            let mut reached = 0;
            for n in 0..5 {
                let error = service.ready().await.unwrap().call(n).await.unwrap_err();
                reached += u64::from(error.to_string() == "down");
            }
            assert_eq!(handle.state(), State::Open, "{format}: {name} tripped");
            let expected = if shadow { (5, 3) } else { (2, 0) };
            assert_eq!(
                (reached, handle.shadow_rejected()),
                expected,
                "{format}: {name}"
            );
        }
        let keyed = policies
            .keyed_circuit_breaker::<_, u32>("keyed_watching", |n: &u32| Some(n % 2))
            .unwrap();
        let handle = keyed.handle();
        assert!(handle.is_shadow(), "{format}");
        let mut service = keyed.layer(failing());
        for n in 0..6 {
            let error = service.ready().await.unwrap().call(n).await.unwrap_err();
            assert_eq!(error.to_string(), "down", "{format}: call {n} is sent");
        }
        assert_eq!(handle.shadow_rejected(), 2, "{format}: one per key");

        for (name, shadow) in [("watching", true), ("enforcing", false)] {
            let layer: ConcurrencyLimitLayer = policies.concurrency_limit(name).unwrap();
            let handle = layer.handle();
            assert_eq!(handle.is_shadow(), shadow, "{format}: {name}");
            let service = layer.layer(service_fn(|n: u32| async move { Ok::<_, BoxError>(n) }));
            let mut held = service.clone();
            let first = held.ready().await.unwrap().call(1);
            let second = service.clone().oneshot(2).await;
            assert_eq!(second.is_ok(), shadow, "{format}: {name}");
            assert_eq!(first.await.unwrap(), 1);
            assert_eq!(
                handle.shadow_rejected(),
                u64::from(shadow),
                "{format}: {name}"
            );
            assert_eq!(handle.rejected(), u64::from(!shadow), "{format}: {name}");
        }
    }
    let text = toml::to_string(&policies).unwrap();
    assert!(text.contains("shadow = true"), "{text}");
}
