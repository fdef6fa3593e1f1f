//! Log lines of every hop, kept in memory so the demo can show one request's trail.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::MakeWriter;

/// Every log line the system wrote, and optionally an echo to standard output.
#[derive(Clone, Default)]
pub struct Logs {
    lines: Arc<Mutex<Vec<u8>>>,
    echo: bool,
}

impl Logs {
    /// Installs the subscriber; with `echo`, lines also go to standard output.
    pub fn install(echo: bool) -> Self {
        let logs = Self {
            echo,
            ..Self::default()
        };
        tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .init();
        logs
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
