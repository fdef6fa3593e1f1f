//! Log lines of every hop, kept in memory so the demo can show one request's trail, and
//! (feature `opentelemetry`) every hop's spans, recorded by `tracing-opentelemetry` into
//! the OpenTelemetry SDK's in-memory exporter so the demo can print one trace.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Every log line the system wrote, and optionally an echo to standard output.
#[derive(Clone, Default)]
pub struct Logs {
    lines: Arc<Mutex<Vec<u8>>>,
    echo: bool,
    #[cfg(feature = "opentelemetry")]
    spans: opentelemetry_sdk::trace::InMemorySpanExporter,
}

impl Logs {
    /// Installs the subscriber; with `echo`, lines also go to standard output.
    pub fn install(echo: bool) -> Self {
        let logs = Self {
            echo,
            ..Self::default()
        };
        let lines = tracing_subscriber::fmt::layer()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .with_filter(LevelFilter::INFO);
        let registry = tracing_subscriber::registry().with(lines);
        #[cfg(feature = "opentelemetry")]
        let registry = registry.with(spans::layer(&logs.spans));
        registry.init();
        logs
    }

    /// The spans OpenTelemetry recorded (feature `opentelemetry`).
    #[cfg(feature = "opentelemetry")]
    pub fn spans(&self) -> Vec<opentelemetry_sdk::trace::SpanData> {
        self.spans.get_finished_spans().unwrap_or_default()
    }

    /// The lines that mention `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        let bytes = self.lines.lock().expect("log buffer").clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.lines
            .lock()
            .expect("log buffer")
            .extend_from_slice(bytes);
        if self.echo {
            std::io::stdout().write_all(bytes)?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(feature = "opentelemetry")]
mod spans {
    use opentelemetry::trace::TracerProvider;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing::Level;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::Layer;

    /// An OpenTelemetry layer exporting the spans of palisade and of the demo's services
    /// (not hyper's, h2's or tower's) into `exporter`.
    pub fn layer<S>(exporter: &InMemorySpanExporter) -> impl Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let hops = Targets::new()
            .with_target("palisade", Level::INFO)
            .with_target("gateway", Level::INFO);
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("gateway-demo"))
            .with_filter(hops)
    }
}
