//! lb's own log (stderr): set up once by `main`, written off the serving
//! threads so that a stalled reader of stderr (a full pipe, a stuck journald
//! or container log driver) never blocks a request, `/healthz` or shutdown.
//!
//! Every thread that logs only formats its line and queues it (bounded,
//! [`QUEUE_LINES`]) for a writer thread of its own. When the queue is full
//! the line is dropped and counted (`lb_log_lines_dropped_total`) rather
//! than waited for. At exit [`Logging::flush`] writes out what is queued,
//! bounded in time whatever stderr does.

use std::io::IsTerminal;
use std::sync::mpsc;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// The filter when neither `--log-level` nor `RUST_LOG` says otherwise:
/// notify logs INFO/WARN lines (`unable to remove watch descriptor`) on
/// every rename-over save, which are noise to lb's users.
pub const DEFAULT_FILTER: &str = "info,notify=error";

/// Lines waiting for the writer thread, at most: a few MiB at worst, and
/// seconds of debug logging at full load.
pub const QUEUE_LINES: usize = 16 * 1024;

/// How lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Log lines dropped because the writer fell behind; zero when logging was
/// not set up through [`init`] (lb as a library, in tests).
#[derive(Clone, Default)]
pub struct DroppedLines(Option<ErrorCounter>);

impl DroppedLines {
    pub fn get(&self) -> u64 {
        self.0
            .as_ref()
            .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
    }
}

impl std::fmt::Debug for DroppedLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DroppedLines").field(&self.get()).finish()
    }
}

/// The running log: keep it until exit, then [`Logging::flush`] it.
#[must_use = "dropping it stops the log writer"]
pub struct Logging {
    guard: WorkerGuard,
    dropped: DroppedLines,
}

/// Sets up the process's log: `filter` (`--log-level`; `RUST_LOG`, then
/// [`DEFAULT_FILTER`], when `None`) in `format`, to stderr through the
/// bounded queue. Colours only when stderr is a terminal.
pub fn init(filter: Option<&str>, format: Format) -> Logging {
    let filter = match filter {
        Some(level) => EnvFilter::new(level),
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        }
    };
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("lb-log")
        .finish(std::io::stderr());
    let dropped = DroppedLines(Some(writer.error_counter()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    match format {
        Format::Text => builder.init(),
        Format::Json => builder.json().init(),
    }
    Logging { guard, dropped }
}

impl Logging {
    /// The counter `/metrics` shows (give it to [`crate::Settings`]).
    pub fn dropped_lines(&self) -> DroppedLines {
        self.dropped.clone()
    }

    /// Writes out the queued lines, waiting at most `bound`: at exit, so
    /// the last lines (why lb stopped) are not lost. The writer's own
    /// shutdown waits up to a second and then prints to stdout, both of
    /// which block when the pipes do, so it runs on a thread of its own
    /// that is left behind if it does not finish in time.
    pub fn flush(self, bound: Duration) {
        let (done, finished) = mpsc::channel();
        let guard = self.guard;
        let flusher = std::thread::Builder::new()
            .name("lb-log-flush".to_owned())
            .spawn(move || {
                drop(guard);
                let _ = done.send(());
            });
        if flusher.is_ok() {
            let _ = finished.recv_timeout(bound);
        }
    }
}
