//! The access log: one line per proxied request (`access_log: true`).
//!
//! The request path only fills an [`Entry`] and `try_send`s it into a
//! bounded channel; a thread of its own formats the lines and writes them
//! through a buffered writer, flushing whenever the channel runs dry. A full
//! channel (the sink cannot keep up) drops the entry and counts it
//! (`lb_access_log_dropped_total`) rather than slow requests down.

use std::io::{self, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use hyper::Method;

use crate::config::{BackendAddr, PoolName};

/// Entries waiting for the writer thread, at most.
const QUEUE: usize = 16 * 1024;
/// How often [`AccessLog::flush`] offers its request again to a full queue.
const FLUSH_RETRY: Duration = Duration::from_millis(5);

/// How lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// `time client method path status backend=… attempts=… upstream_ms=… duration_ms=…`
    #[default]
    Text,
    /// One JSON object per line (`--log-format json`).
    Json,
}

/// One proxied request, as logged.
#[derive(Debug)]
pub struct Entry {
    /// When the request arrived (wall clock).
    pub time: SystemTime,
    pub client: IpAddr,
    pub method: Method,
    /// The request path (no query: it may carry secrets).
    pub path: String,
    pub status: u16,
    /// The backend whose response was relayed; `None` when lb answered.
    pub backend: Option<BackendAddr>,
    /// The pool the request was routed to; `None` when no route matched or
    /// it was refused before routing.
    pub pool: Option<PoolName>,
    /// Upstream attempts made (0 when none was).
    pub attempts: u32,
    /// From the first attempt to the response head; `None` without attempts.
    pub upstream: Option<Duration>,
    /// From arrival to the response head.
    pub duration: Duration,
}

/// What goes through the channel.
enum Message {
    Line(Entry),
    /// Write out everything queued, then answer.
    Flush(mpsc::Sender<()>),
}

/// Where lines go and in which format, until the writer thread starts.
type Sink = (Format, Box<dyn Write + Send>);

/// The access log's sender side; the thread starts with the first entry.
#[derive(Default)]
pub struct AccessLog {
    /// The running writer; lock-free to read once set.
    sender: OnceLock<SyncSender<Message>>,
    /// Set before the first entry (`set_sink`); stdout in text otherwise.
    sink: Mutex<Option<Sink>>,
    /// Entries dropped because the queue was full.
    dropped: AtomicU64,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("started", &self.sender.get().is_some())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl AccessLog {
    /// Chooses format and destination; only effective before the first entry.
    pub fn set_sink(&self, format: Format, out: Box<dyn Write + Send>) {
        *self.sink.lock().unwrap_or_else(PoisonError::into_inner) = Some((format, out));
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// Queues `entry` without blocking.
    pub fn log(&self, entry: Entry) {
        let sender = self.sender.get_or_init(|| self.start());
        match sender.try_send(Message::Line(entry)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Waits (at most `timeout`, whatever the sink does) until every queued
    /// line is written: at shutdown, so the last lines are not lost with the
    /// process. Returns whether they were.
    ///
    /// The queue is full exactly when the sink has stopped taking lines (a
    /// pipe nobody reads): a blocking send of the flush request would wait
    /// for ever, so it is offered with `try_send` until the deadline. The
    /// writer thread itself is never joined: a stuck `write` cannot be
    /// cancelled, and the process exits around it.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(sender) = self.sender.get() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        let (tx, rx) = mpsc::channel();
        let mut request = Message::Flush(tx);
        loop {
            match sender.try_send(request) {
                Ok(()) => break,
                Err(TrySendError::Full(again)) if Instant::now() < deadline => {
                    request = again;
                    std::thread::sleep(FLUSH_RETRY);
                }
                Err(_) => return false,
            }
        }
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }

    fn start(&self) -> SyncSender<Message> {
        let (format, out) = self
            .sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| (Format::Text, Box::new(io::stdout())));
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("lb-access-log".to_owned())
            .spawn(move || write_loop(&rx, format, out));
        if let Err(e) = spawned {
            tracing::error!("cannot start the access log writer: {e}; access log off");
        }
        tx
    }
}

/// Writes entries until every sender is gone, flushing when idle.
fn write_loop(rx: &Receiver<Message>, format: Format, out: Box<dyn Write + Send>) {
    let mut out = io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = String::with_capacity(256);
    let mut failed = false;
    loop {
        // Flush before blocking: a quiet proxy's lines appear at once.
        let message = match rx.try_recv() {
            Ok(m) => m,
            Err(_) => {
                let _ = out.flush();
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            }
        };
        match message {
            Message::Line(entry) => {
                line.clear();
                format_entry(&mut line, &entry, format);
                if let Err(e) = out.write_all(line.as_bytes()) {
                    if !failed {
                        tracing::warn!("cannot write the access log: {e}");
                        failed = true;
                    }
                }
            }
            Message::Flush(done) => {
                let _ = out.flush();
                let _ = done.send(());
            }
        }
    }
    let _ = out.flush();
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Appends one line (with its newline) for `e` to `line`.
pub fn format_entry(line: &mut String, e: &Entry, format: Format) {
    use std::fmt::Write as _;
    let time = humantime::format_rfc3339_millis(e.time);
    match format {
        Format::Text => {
            let backend = e.backend.as_ref().map_or("-", BackendAddr::as_str);
            let _ = write!(
                line,
                "{time} {} {} {} {} backend={backend} attempts={} upstream_ms=",
                e.client, e.method, e.path, e.status, e.attempts
            );
            match e.upstream {
                Some(u) => {
                    let _ = write!(line, "{}", millis(u));
                }
                None => line.push('-'),
            }
            let pool = e.pool.as_ref().map_or("-", PoolName::as_str);
            let _ = writeln!(line, " duration_ms={} pool={pool}", millis(e.duration));
        }
        Format::Json => {
            // The field name tracing-subscriber's JSON log lines use, so
            // one query finds both kinds of line.
            let value = serde_json::json!({
                "timestamp": time.to_string(),
                "client": e.client.to_string(),
                "method": e.method.as_str(),
                "path": e.path,
                "status": e.status,
                "backend": e.backend.as_ref().map(BackendAddr::as_str),
                "pool": e.pool.as_ref().map(PoolName::as_str),
                "attempts": e.attempts,
                "upstream_ms": e.upstream.map(millis),
                "duration_ms": millis(e.duration),
            });
            let _ = writeln!(line, "{value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_500),
            client: IpAddr::from([127, 0, 0, 1]),
            method: Method::GET,
            path: "/a b".replace(' ', "%20"),
            status: 200,
            backend: Some(BackendAddr::from_static("127.0.0.1:9001")),
            pool: Some(PoolName::from_static("default")),
            attempts: 2,
            upstream: Some(Duration::from_micros(1_234)),
            duration: Duration::from_micros(2_000),
        }
    }

    #[test]
    fn text_and_json_lines() {
        let mut s = String::new();
        format_entry(&mut s, &entry(), Format::Text);
        assert_eq!(
            s,
            "1970-01-01T00:00:01.500Z 127.0.0.1 GET /a%20b 200 backend=127.0.0.1:9001 attempts=2 upstream_ms=1.234 duration_ms=2 pool=default\n"
        );
        s.clear();
        format_entry(&mut s, &entry(), Format::Json);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["backend"], "127.0.0.1:9001");
        assert_eq!(v["upstream_ms"], 1.234);
        assert_eq!(v["status"], 200);
        assert_eq!(v["timestamp"], "1970-01-01T00:00:01.500Z");
    }
}
