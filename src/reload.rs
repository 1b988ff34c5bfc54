//! Applying edits of `config.yaml` while lb runs.
//!
//! One task owns reloading, so reloads never overlap. It wakes on:
//! * file-system events (notify) on the file's directory, on the directory
//!   of the file it resolves to (symlinks), and on the file itself, kept
//!   only when they name the file, a link on the way to it, or a Kubernetes
//!   ConfigMap's `..data`/`..data_tmp` (an update arrives as a rename of
//!   `..data_tmp` over `..data`, never as an event on the file). Events for
//!   other files in the directory (lb's own log file) cost nothing.
//!   While the directory is missing (deleted, to be recreated), its nearest
//!   existing ancestor is watched instead, for the directory's return; the
//!   watch also moves when the path names another directory than the one
//!   watched (device and inode differ: renamed away, a new one put in its
//!   place). Either way the file is then read once, settled, since writes
//!   made before the new watch sent no event;
//! * a slow poll, for filesystems that send no events (bind mounts, NFS);
//! * an explicit request ([`ReloadHandle::reload`]), which SIGHUP sends.
//!
//! A file written in place is read only once its writer has closed it
//! (inotify's close-after-write): a writer may pause half way for as long as
//! it likes, and the half it wrote may be valid YAML. If no close comes
//! within [`CLOSE_WAIT`] (a writer that keeps the file open), the content is
//! used once two reads agree. A rename over the file, a ConfigMap swap or a
//! delete is whole at once and is read after a short debounce.
//!
//! Reading refuses anything but a regular file of at most 16 MiB, without
//! ever blocking (see [`config::read_file`]); reading and parsing run on
//! blocking threads, never on the async workers. Unchanged content reloads
//! nothing. A reload is all-or-nothing: parse, validate, refuse a change of
//! `mode` (http ↔ tcp needs a restart), bind the new listen address if it
//! changed, and only then swap. Anything that fails leaves the
//! running config untouched, logs one error naming the file, line and column,
//! and is counted in `ReloadStats::rejected`; a read that fails for lb's own
//! shortage (its fd limit: see [`crate::obs::local`]) is no verdict on the file
//! and rejects nothing. A panic while reloading is logged and the reloader
//! carries on. The task ends on lb's stop signal (shutdown), at its next
//! await point, even in the middle of a reload.

use std::any::Any;
use std::ffi::OsString;
use std::future::Future;
use std::io::ErrorKind;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{timeout_at, Instant, MissedTickBehavior};

use crate::config::{self, Config, ContentHash};
use crate::core::runtime::{LastReload, Runtime};
use crate::net::listen::Listeners;

/// A burst of events is over when none came for this long.
const QUIET: Duration = Duration::from_millis(20);
/// A burst that never goes quiet is looked at after this long anyway.
const MAX_DEBOUNCE: Duration = Duration::from_millis(250);
/// How long a file written in place may stay open before lb stops waiting
/// for its close and settles for two identical reads.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Floor for the poll interval: `tokio::time::interval` panics on zero.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How the reloader learns about changes.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// Watch the file and poll it; `false` (`--no-watch`) leaves only SIGHUP.
    pub watch: bool,
    /// Backstop poll of the file's hash, for filesystems without events.
    pub poll_interval: Duration,
}

/// Asks the reloader to re-read the file now (what SIGHUP does).
#[derive(Debug, Clone)]
pub struct ReloadHandle(mpsc::Sender<Option<oneshot::Sender<()>>>);

impl ReloadHandle {
    pub fn reload(&self) {
        // A full queue already holds a pending reload request.
        let _ = self.0.try_send(None);
    }

    /// Reloads now and returns what happened: `None` when the file was
    /// unchanged, else the recorded result (`POST /reload`).
    pub async fn reload_and_wait(&self, runtime: &Runtime) -> Option<LastReload> {
        let before = runtime.reloads.last().seq;
        let (tx, rx) = oneshot::channel();
        self.0.send(Some(tx)).await.ok()?;
        rx.await.ok()?;
        runtime.reloads.since(before)
    }
}

/// Starts the reload task, which runs until `stop` says `true` (or its
/// sender is gone).
pub fn spawn(
    path: PathBuf,
    runtime: Arc<Runtime>,
    listeners: Arc<Listeners>,
    settings: WatchSettings,
    stop: watch::Receiver<bool>,
) -> (ReloadHandle, tokio::task::JoinHandle<()>) {
    let (tx, requests) = mpsc::channel(4);
    // Watch before returning, so no edit after `Lb::start` can go unseen.
    let (changes_tx, changes) = mpsc::unbounded_channel();
    let fs_watch = if settings.watch {
        FsWatch::start(&path, changes_tx)
    } else {
        None
    };
    let reloader = Reloader {
        last_seen: runtime.snapshot().hash,
        path,
        runtime,
        listeners,
        unreadable: None,
        requests,
        changes,
        fs_watch,
    };
    let task = tokio::spawn(reloader.run(settings, stop));
    (ReloadHandle(tx), task)
}

struct Reloader {
    path: PathBuf,
    runtime: Arc<Runtime>,
    listeners: Arc<Listeners>,
    /// Hash of the last content tried (applied or rejected): the same bytes
    /// are not tried again unless asked to.
    last_seen: ContentHash,
    /// Why the file could not be read at the last look (missing, a FIFO, too
    /// large…); the same reason is logged once, not at every poll.
    unreadable: Option<String>,
    /// Reload requests (SIGHUP).
    requests: mpsc::Receiver<Option<oneshot::Sender<()>>>,
    /// File-system changes of the config file, already filtered by name;
    /// never yields when nothing watches.
    changes: mpsc::UnboundedReceiver<Change>,
    /// The notify watcher; `None` with `--no-watch` or when watching failed.
    fs_watch: Option<FsWatch>,
}

/// What one reloader loop iteration responds to.
enum Wake {
    /// With where to say it is done (`POST /reload`).
    Request(Option<oneshot::Sender<()>>),
    Change(Change),
    Poll,
}

impl Reloader {
    /// Serves until `stop`: a reload under way is dropped at its next await
    /// point, and the file watch with the reloader.
    async fn run(mut self, settings: WatchSettings, mut stop: watch::Receiver<bool>) {
        tokio::select! {
            () = self.serve(settings) => {}
            _ = stop.wait_for(|&stop| stop) => {}
        }
    }

    async fn serve(&mut self, settings: WatchSettings) {
        if settings.watch {
            // The file may have changed between its first read and the watch.
            self.guarded(Wake::Poll).await;
        }
        let mut poll = tokio::time::interval(settings.poll_interval.max(MIN_POLL_INTERVAL));
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        poll.reset();
        loop {
            let wake = tokio::select! {
                // Events first: a poll must not read a file whose write is
                // already known to be in progress.
                biased;
                Some(change) = self.changes.recv() => Wake::Change(change),
                request = self.requests.recv() => match request {
                    Some(reply) => Wake::Request(reply),
                    None => return,
                },
                _ = poll.tick(), if settings.watch => Wake::Poll,
            };
            self.guarded(wake).await;
        }
    }

    /// Handles one wake-up; a panic in it is logged and the reloader keeps
    /// running, so a bug costs one reload, not every later one.
    async fn guarded(&mut self, wake: Wake) {
        if let Err(panic) = CatchUnwind(Box::pin(self.handle(wake))).await {
            tracing::error!(
                "config reloader panicked ({}); keeping the current config, later reloads still apply",
                panic_message(&*panic)
            );
        }
    }

    async fn handle(&mut self, wake: Wake) {
        match wake {
            Wake::Request(reply) => {
                self.reload("reload requested", Trigger::Request).await;
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
            }
            Wake::Poll => {
                // Backstop for a directory change whose events were missed.
                self.rewatch();
                self.reload("poll", Trigger::Poll).await;
            }
            Wake::Change(first) => {
                let mut trigger = self.wait_until_written(first).await;
                if self.rewatch() {
                    // The directory came back (or was replaced): nothing
                    // vouches for what was written into it before its watch.
                    trigger = Trigger::Poll;
                }
                self.reload("file changed", trigger).await;
                // After the read too: a file renamed over has a new inode,
                // and the directory may have gone meanwhile.
                if self.rewatch() {
                    self.reload("file changed", Trigger::Poll).await;
                }
            }
        }
    }

    /// Collects the burst of changes that began with `first` and, when the
    /// last of them says a write is still in progress, waits for the
    /// writer's close. Returns how the file must then be read: at once
    /// (whole) or settled (no close came).
    async fn wait_until_written(&mut self, first: Change) -> Trigger {
        let started = Instant::now();
        let mut last = first;
        self.debounce(&mut last, started + MAX_DEBOUNCE).await;
        if last == Change::Complete {
            return Trigger::Event;
        }
        let give_up = started + CLOSE_WAIT;
        while let Ok(Some(change)) = timeout_at(give_up, self.changes.recv()).await {
            last = change;
            if last == Change::Complete {
                // Duplicates (directory and file watches) and a following
                // write, if any, arrive within the quiet time.
                self.debounce(&mut last, Instant::now() + MAX_DEBOUNCE)
                    .await;
                if last == Change::Complete {
                    return Trigger::Event;
                }
            }
        }
        tracing::debug!(path = %self.path.display(), "config file still open for writing after {CLOSE_WAIT:?}; reading it once it settles");
        Trigger::Poll
    }

    /// Takes changes until none came for `QUIET` (or until `give_up`),
    /// keeping the last one in `last`.
    async fn debounce(&mut self, last: &mut Change, give_up: Instant) {
        loop {
            let quiet_until = (Instant::now() + QUIET).min(give_up);
            match timeout_at(quiet_until, self.changes.recv()).await {
                Ok(Some(change)) => *last = change,
                Ok(None) | Err(_) => return,
            }
            if Instant::now() >= give_up {
                return;
            }
        }
    }

    /// Re-arms the watches (see [`FsWatch::rewatch`]); true when the
    /// directory watch moved, so the file must be looked at again.
    fn rewatch(&mut self) -> bool {
        match self.fs_watch.as_mut() {
            Some(w) => w.rewatch(&self.path),
            None => false,
        }
    }

    /// Reads the file on a blocking thread: regular files only, bounded.
    async fn read(&self) -> std::io::Result<Vec<u8>> {
        self.runtime.reloads.reads.fetch_add(1, Relaxed);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || config::read_file(&path))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
    }

    /// Reads the file and applies it if it changed.
    async fn reload(&mut self, why: &str, trigger: Trigger) {
        let force = trigger == Trigger::Request;
        let mut bytes = match self.read().await {
            Ok(bytes) => bytes,
            Err(e) => {
                if let Some(shortage) = crate::obs::local::Shortage::of(&e) {
                    // lb's own fd limit and the like: the file may be fine,
                    // and the next look reads it again. Not a rejected config.
                    let what = format_args!("{}: cannot read ({why})", self.path.display());
                    self.runtime.local_errors.record(
                        crate::obs::local::Op::ConfigRead,
                        shortage,
                        self.runtime.clock.now_ms(),
                        format_args!("{what}: {e}; keeping the current config"),
                    );
                    return;
                }
                let reason = e.to_string();
                if force || self.unreadable.as_ref() != Some(&reason) {
                    if e.kind() == ErrorKind::NotFound && !force {
                        // Editors and ConfigMap updates remove the file for a moment.
                        tracing::info!(path = %self.path.display(), "config file is missing; keeping the current config");
                    } else {
                        self.reject(format_args!("{}: cannot read: {e}", self.path.display()));
                    }
                }
                self.unreadable = Some(reason);
                return;
            }
        };
        self.unreadable = None;
        let mut hash = ContentHash::of(&bytes);
        if hash == self.last_seen && !force {
            return;
        }
        // An empty file is most likely created or truncated and about to be
        // written (a late event can wake us in between): settle before judging.
        if trigger == Trigger::Poll || (bytes.is_empty() && !force) {
            // No close event vouches for this read: it may have caught a save
            // half way. Use the content only once two reads `QUIET` apart agree.
            let give_up = Instant::now() + MAX_DEBOUNCE;
            loop {
                tokio::time::sleep(QUIET).await;
                let Ok(again) = self.read().await else {
                    return;
                };
                let again_hash = ContentHash::of(&again);
                if again_hash == hash || Instant::now() >= give_up {
                    break;
                }
                (bytes, hash) = (again, again_hash);
            }
            if !self.changes.is_empty() {
                // A write began meanwhile; its events decide when to read.
                return;
            }
        }
        self.last_seen = hash;
        // A reload (SIGHUP, POST /reload) is also the moment to look at the
        // certificates: the follower would within a second.
        for tls in self.listeners.terminators() {
            tls.recheck(&self.runtime);
        }
        crate::net::tls::recheck_backend_tls(&self.runtime);
        if hash == self.runtime.snapshot().hash {
            // After a rejected edit, the file coming back is news: the
            // error no longer stands.
            let after_rejection = !self.runtime.reloads.last().ok;
            self.runtime.reloads.record_unchanged();
            if after_rejection {
                tracing::info!(%hash, "{why}: config matches the running one again");
            } else {
                tracing::info!(%hash, "{why}: config unchanged");
            }
            return;
        }
        let path = self.path.clone();
        let parsed =
            tokio::task::spawn_blocking(move || Config::parse_with_warnings(&bytes, &path)).await;
        let (config, positioned) = match parsed {
            Ok(Ok(parsed)) => parsed,
            Ok(Err(e)) => {
                self.reject(e);
                return;
            }
            Err(e) => {
                self.reject(format_args!("{}: parsing failed: {e}", self.path.display()));
                return;
            }
        };
        // Sockets bound and certificates loaded before anything changes:
        // a reload that cannot have its listeners is refused whole.
        let plan = match self.listeners.plan(&config) {
            Ok(plan) => plan,
            Err(e) => {
                self.reject(format_args!("{}: {e}", self.path.display()));
                return;
            }
        };
        // As at startup: `file:line:col: key: …` for the keys that are
        // legal but probably not meant, then the config-wide ones.
        for warning in positioned {
            tracing::warn!("{warning}");
        }
        for warning in config.warnings() {
            tracing::warn!("{}: {warning}", self.path.display());
        }
        // Building a snapshot is CPU work (a consistent_hash table over
        // 10,000 backends takes tens of ms): keep it off the async workers.
        let runtime = Arc::clone(&self.runtime);
        let summary = match tokio::task::spawn_blocking(move || runtime.apply(config, hash)).await {
            Ok(summary) => summary,
            Err(e) => {
                self.reject(format_args!(
                    "{}: applying failed: {e}",
                    self.path.display()
                ));
                return;
            }
        };
        self.listeners.commit(plan);
        tracing::info!(%hash, "config reloaded ({why}): {summary}");
    }

    fn reject(&self, error: impl std::fmt::Display) {
        let error = error.to_string();
        // Fields too, so a JSON log can be queried for the position.
        let (line, column) = crate::config::line_column(&error);
        tracing::error!(
            line,
            column,
            "config reload rejected, keeping the last good config: {error}"
        );
        self.runtime.reloads.record_rejected(error);
    }
}

/// What woke the reloader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// File-system events saying the file is whole (closed after writing,
    /// renamed, removed).
    Event,
    /// The backstop poll, the check at startup, or a write whose close never
    /// came: nothing vouches for the read, so it must settle.
    Poll,
    /// SIGHUP or `ReloadHandle::reload`: re-try even content seen before.
    Request,
}

/// What a file-system event says about the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Created, truncated or written, and not closed yet: reading now could
    /// see half a file.
    Writing,
    /// Closed after writing, renamed, removed, or a ConfigMap swap: the
    /// content is whole (or gone).
    Complete,
}

impl Change {
    /// `None` for events that say nothing about the content (reads,
    /// including lb's own).
    fn of(kind: &EventKind) -> Option<Change> {
        match kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Change::Complete),
            EventKind::Access(_) => None,
            // A directory on the way to the file came back: it holds no
            // content being written (its files send their own events).
            EventKind::Create(CreateKind::Folder) => Some(Change::Complete),
            EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any | ModifyKind::Other) => {
                Some(Change::Writing)
            }
            _ => Some(Change::Complete),
        }
    }
}

/// The notify watcher and what it currently watches.
struct FsWatch {
    watcher: RecommendedWatcher,
    /// The directory watched for the file's own: that directory, or while
    /// it is missing its nearest existing ancestor; with its identity, so a
    /// different directory at the same path is noticed.
    dir: Option<(PathBuf, DirId)>,
    /// Directory the symlink chain ends in, when it differs from the file's own.
    target_dir: Option<PathBuf>,
    /// Which events concern the config (shared with the handler, which runs
    /// on notify's thread).
    filter: Arc<Mutex<Filter>>,
}

/// A directory's identity: device and inode.
type DirId = (u64, u64);

/// What the notify handler keeps events for.
#[derive(Default)]
struct Filter {
    /// File names: the config's, its symlinks', a ConfigMap's (see
    /// [`watched_names`]).
    names: Vec<OsString>,
    /// Directories on the way to the file, from its own up to the watched
    /// one: their removal, move or return changes what the path names.
    dirs: Vec<PathBuf>,
}

impl Filter {
    fn concerns(&self, path: &Path) -> bool {
        path.file_name()
            .is_some_and(|n| self.names.iter().any(|w| w == n))
            || self.dirs.iter().any(|d| d == path)
    }
}

impl FsWatch {
    fn start(path: &Path, changes: mpsc::UnboundedSender<Change>) -> Option<Self> {
        let filter = Arc::new(Mutex::new(Filter::default()));
        let shared = Arc::clone(&filter);
        let handler = move |event: notify::Result<notify::Event>| {
            let change = match event {
                Ok(event) => {
                    let filter = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    // No path: a rescan after an overflow, which may hide anything.
                    let ours =
                        event.paths.is_empty() || event.paths.iter().any(|p| filter.concerns(p));
                    match Change::of(&event.kind) {
                        Some(change) if ours => change,
                        _ => return,
                    }
                }
                // Overflow and the like: re-read to be safe.
                Err(_) => Change::Complete,
            };
            let _ = changes.send(change);
        };
        let watcher = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config file; relying on polling and SIGHUP");
                return None;
            }
        };
        let mut w = FsWatch {
            watcher,
            dir: None,
            target_dir: None,
            filter,
        };
        w.rewatch(path);
        Some(w)
    }

    /// Re-arms the watches that a replaced file, a moved symlink target or
    /// a deleted, recreated or replaced directory invalidates: the file
    /// itself (a new inode after rename-over), the directory its symlinks
    /// resolve to, and its own directory (or, while that is missing, the
    /// nearest ancestor that exists, which sees it come back); and what
    /// events are kept for. Returns true when the directory watch moved:
    /// whatever happened in the new directory before sent no event.
    fn rewatch(&mut self, path: &Path) -> bool {
        let own_dir = parent(path);
        let found = nearest_existing_dir(&own_dir);
        let moved = found.as_ref().map(|(dir, id, _)| (dir, id))
            != self.dir.as_ref().map(|(dir, id)| (dir, id));
        let dirs = match found {
            Some((dir, id, chain)) => {
                if moved {
                    if let Some((old, _)) = self.dir.take() {
                        let _ = self.watcher.unwatch(&old);
                    }
                    if let Err(e) = self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; relying on polling and SIGHUP");
                    }
                    // Kept even when watching failed: retried only once the
                    // directory changes, not warned about at every poll.
                    self.dir = Some((dir, id));
                }
                chain
            }
            None => Vec::new(),
        };
        {
            let mut filter = self.filter.lock().unwrap_or_else(PoisonError::into_inner);
            filter.names = watched_names(path);
            filter.dirs = dirs;
        }
        let _ = self.watcher.unwatch(path);
        let _ = self.watcher.watch(path, RecursiveMode::NonRecursive);
        let target_dir = std::fs::canonicalize(path)
            .ok()
            .map(|p| parent(&p))
            .filter(|d| std::fs::canonicalize(&own_dir).ok().as_ref() != Some(d));
        if target_dir != self.target_dir {
            if let Some(old) = self.target_dir.take() {
                let _ = self.watcher.unwatch(&old);
            }
            if let Some(dir) = &target_dir {
                let _ = self.watcher.watch(dir, RecursiveMode::NonRecursive);
            }
            self.target_dir = target_dir;
        }
        moved
    }
}

/// The first of `dir` and its ancestors that exists, with its identity and
/// the paths from `dir` up to it (both included). `None` only when not even
/// the root or `.` can be looked at.
fn nearest_existing_dir(dir: &Path) -> Option<(PathBuf, DirId, Vec<PathBuf>)> {
    use std::os::unix::fs::MetadataExt;
    let mut at = dir.to_owned();
    let mut chain = Vec::new();
    loop {
        chain.push(at.clone());
        match std::fs::metadata(&at) {
            Ok(meta) if meta.is_dir() => return Some((at, (meta.dev(), meta.ino()), chain)),
            _ => {}
        }
        at = match at.parent() {
            Some(up) if !up.as_os_str().is_empty() => up.to_owned(),
            // A relative path's last ancestor is the working directory.
            Some(_) if at != Path::new(".") => PathBuf::from("."),
            _ => return None,
        };
    }
}

/// File names whose events concern the config at `path`: its own, each
/// symlink on the way to the real file and the real file's, and a
/// Kubernetes ConfigMap volume's `..data` / `..data_tmp`.
fn watched_names(path: &Path) -> Vec<OsString> {
    /// Linux's SYMLOOP_MAX: a longer chain does not resolve anyway.
    const MAX_HOPS: usize = 40;
    let mut names: Vec<OsString> = vec!["..data".into(), "..data_tmp".into()];
    let mut hop = path.to_owned();
    for _ in 0..MAX_HOPS {
        names.extend(hop.file_name().map(ToOwned::to_owned));
        match std::fs::read_link(&hop) {
            // A relative target is relative to the link's own directory.
            Ok(target) => hop = parent(&hop).join(target),
            Err(_) => break,
        }
    }
    if let Ok(real) = std::fs::canonicalize(path) {
        names.extend(real.file_name().map(ToOwned::to_owned));
    }
    names.sort();
    names.dedup();
    names
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Runs a future, turning a panic while polling it into an `Err` (what
/// `futures::FutureExt::catch_unwind` does, without the dependency).
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_caught_and_the_next_step_runs() {
        let panicked: Result<(), _> = CatchUnwind(Box::pin(async {
            tokio::task::yield_now().await;
            panic!("boom")
        }))
        .await;
        let message = panicked.expect_err("the panic was not caught");
        assert_eq!(panic_message(&*message), "boom");
        let fine = CatchUnwind(Box::pin(async { 7 })).await;
        assert_eq!(fine.ok(), Some(7));
    }

    #[test]
    fn only_reads_say_nothing_about_the_content() {
        use notify::event::{DataChange, RemoveKind, RenameMode};
        let close_write = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(Change::of(&close_write), Some(Change::Complete));
        let close_read = EventKind::Access(AccessKind::Close(AccessMode::Read));
        assert_eq!(Change::of(&close_read), None);
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert_eq!(Change::of(&write), Some(Change::Writing));
        assert_eq!(
            Change::of(&EventKind::Create(CreateKind::File)),
            Some(Change::Writing)
        );
        assert_eq!(
            Change::of(&EventKind::Create(CreateKind::Folder)),
            Some(Change::Complete)
        );
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert_eq!(Change::of(&rename), Some(Change::Complete));
        assert_eq!(
            Change::of(&EventKind::Remove(RemoveKind::File)),
            Some(Change::Complete)
        );
    }

    #[test]
    fn watched_names_follow_symlinks_and_configmaps() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::fs::write(dir.path().join("real/v2.yaml"), "x").unwrap();
        std::os::unix::fs::symlink("real/v2.yaml", dir.path().join("current.yaml")).unwrap();
        std::os::unix::fs::symlink("current.yaml", dir.path().join("config.yaml")).unwrap();
        let names = watched_names(&dir.path().join("config.yaml"));
        for want in [
            "config.yaml",
            "current.yaml",
            "v2.yaml",
            "..data",
            "..data_tmp",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert!(!names.iter().any(|n| n == "lb.log"));
    }
}
