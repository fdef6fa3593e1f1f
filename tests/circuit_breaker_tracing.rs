//! The breaker's `tracing` events. A test binary of its own: `tracing` caches per
//! callsite whether anyone listens, and a test on another thread hitting the callsite
//! while this one installs its thread-local subscriber can leave it cached as unheard.
#![cfg(feature = "tracing")]

use palisade::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::advance;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

async fn send<S>(service: &mut S, fail: bool) -> Result<S::Response, BoxError>
where
    S: Service<bool, Error = BoxError>,
{
    service.ready().await?.call(fail).await
}

#[tokio::test(start_paused = true)]
async fn each_transition_emits_a_tracing_event() {
    use tracing_subscriber::layer::{Context, SubscriberExt};

    /// Collects the `to` field of the breaker's events.
    struct Targets(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Targets {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            struct To(Option<String>);
            impl tracing::field::Visit for To {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    if field.name() == "to" {
                        self.0 = Some(format!("{value:?}"));
                    }
                }
            }
            if event.metadata().target() == "palisade::circuit_breaker" {
                let mut to = To(None);
                event.record(&mut to);
                self.0
                    .lock()
                    .expect("not poisoned")
                    .push(to.0.unwrap_or_default());
            }
        }
    }

    let seen = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Targets(Arc::clone(&seen)));
    let _guard = tracing::subscriber::set_default(subscriber);

    let layer = CircuitBreakerLayer::builder()
        .minimum_calls(1)
        .sliding_window(SlidingWindow::count(1))
        .open_for(Duration::from_secs(1))
        .half_open_probes(1)
        .build()
        .expect("valid");
    let mut service = layer.layer(service_fn(|fail: bool| async move {
        if fail {
            Err::<(), BoxError>("down".into())
        } else {
            Ok(())
        }
    }));
    for _ in 0..5 {
        send(&mut service, false)
            .await
            .expect("closed calls emit nothing");
    }
    send(&mut service, true).await.unwrap_err();
    advance(Duration::from_secs(1)).await;
    send(&mut service, false).await.expect("probe");
    // Forcing the state the breaker is already forced into is not a transition.
    let handle = layer.handle();
    handle.force_open();
    handle.force_open();
    assert_eq!(
        *seen.lock().expect("not poisoned"),
        ["Open", "HalfOpen", "Closed", "ForcedOpen"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_keyed_breaker_names_its_key_in_the_event() {
    use tracing_subscriber::layer::{Context, SubscriberExt};

    /// Collects the `key` and `to` fields of the breaker's events.
    struct Keys(Arc<Mutex<Vec<(String, String)>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Keys {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            #[derive(Default)]
            struct Fields(String, String);
            impl tracing::field::Visit for Fields {
                fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                    if field.name() == "key" {
                        self.0 = value.to_owned();
                    }
                }
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    match field.name() {
                        "key" => self.0 = format!("{value:?}"),
                        "to" => self.1 = format!("{value:?}"),
                        _ => {}
                    }
                }
            }
            if event.metadata().target() == "palisade::circuit_breaker" {
                let mut fields = Fields::default();
                event.record(&mut fields);
                self.0
                    .lock()
                    .expect("not poisoned")
                    .push((fields.0, fields.1));
            }
        }
    }

    let seen = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Keys(Arc::clone(&seen)));
    let _guard = tracing::subscriber::set_default(subscriber);

    let layer = CircuitBreakerLayer::builder()
        .minimum_calls(1)
        .sliding_window(SlidingWindow::count(1))
        .keyed(|request: &(&'static str, bool)| (!request.0.is_empty()).then_some(request.0))
        .build()
        .expect("valid");
    let mut service = layer.layer(service_fn(|(_, fail): (&'static str, bool)| async move {
        if fail {
            Err::<(), BoxError>("down".into())
        } else {
            Ok(())
        }
    }));
    for request in [("payments", true), ("", true)] {
        let _ = service.ready().await.expect("ready").call(request).await;
    }
    assert_eq!(
        *seen.lock().expect("not poisoned"),
        vec![
            ("\"payments\"".to_owned(), "Open".to_owned()),
            ("(shared)".to_owned(), "Open".to_owned())
        ]
    );
}
