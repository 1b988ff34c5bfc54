//! Applying edits of `config.yaml` while lb runs.
//!
//! One task owns reloading, so reloads never overlap. It wakes on:
//! * file-system events (notify) on the file's directory, on the directory
//!   of the file it resolves to (symlinks), and on the file itself. Events
//!   are not filtered by name: a Kubernetes ConfigMap update arrives as
//!   renames of `..data_tmp` over `..data`, never as an event on the file;
//! * a slow poll, for filesystems that send no events (bind mounts, NFS);
//! * an explicit request ([`ReloadHandle::reload`]), which SIGHUP sends.
//!
//! Events are debounced (a save that writes several times is read once,
//! whole), then the file is read and hashed; unchanged content reloads
//! nothing. A reload is all-or-nothing: parse, validate, bind the new
//! listen address if it changed, and only then swap. Anything that fails
//! leaves the running config untouched, logs one error naming the file, line
//! and column, and is counted in `ReloadStats::rejected`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{timeout_at, Instant, MissedTickBehavior};

use crate::config::{Config, ContentHash};
use crate::runtime::{LastReload, Runtime};
use crate::server::Listeners;

/// A burst of events is over when none came for this long.
const QUIET: Duration = Duration::from_millis(20);
/// A burst that never goes quiet is read after this long anyway.
const MAX_DEBOUNCE: Duration = Duration::from_millis(250);

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

/// Starts the reload task.
pub fn spawn(
    path: PathBuf,
    runtime: Arc<Runtime>,
    listeners: Arc<Listeners>,
    settings: WatchSettings,
) -> (ReloadHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(4);
    // Watch before returning, so no edit after `Lb::start` can go unseen.
    let events = Arc::new(Notify::new());
    let fs_watch = if settings.watch {
        FsWatch::start(&path, Arc::clone(&events))
    } else {
        None
    };
    let reloader = Reloader {
        last_seen: runtime.snapshot().hash,
        path,
        runtime,
        listeners,
        missing: false,
    };
    let task = tokio::spawn(reloader.run(rx, settings, events, fs_watch));
    (ReloadHandle(tx), task)
}

struct Reloader {
    path: PathBuf,
    runtime: Arc<Runtime>,
    listeners: Arc<Listeners>,
    /// Hash of the last content tried (applied or rejected): the same bytes
    /// are not tried again unless asked to.
    last_seen: ContentHash,
    /// The file was absent at the last look; logged once per absence.
    missing: bool,
}

impl Reloader {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Option<oneshot::Sender<()>>>,
        settings: WatchSettings,
        events: Arc<Notify>,
        mut fs_watch: Option<FsWatch>,
    ) {
        if settings.watch {
            // The file may have changed between its first read and the watch.
            self.reload("changed during startup", Trigger::Poll).await;
        }
        let mut poll = tokio::time::interval(settings.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        poll.reset();
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    Some(reply) => {
                        self.reload("reload requested", Trigger::Request).await;
                        if let Some(reply) = reply {
                            let _ = reply.send(());
                        }
                    }
                    None => return,
                },
                () = events.notified(), if settings.watch => {
                    debounce(&events).await;
                    self.reload("file changed", Trigger::Event).await;
                    if let Some(w) = fs_watch.as_mut() {
                        w.rewatch(&self.path);
                    }
                }
                _ = poll.tick(), if settings.watch => self.reload("poll", Trigger::Poll).await,
            }
        }
    }

    /// Reads the file and applies it if it changed.
    async fn reload(&mut self, why: &str, trigger: Trigger) {
        let force = trigger == Trigger::Request;
        let mut bytes = match tokio::fs::read(&self.path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound && !force => {
                // Editors and ConfigMap updates remove the file for a moment.
                if !self.missing {
                    tracing::info!(path = %self.path.display(), "config file is missing; keeping the current config");
                    self.missing = true;
                }
                return;
            }
            Err(e) => {
                self.reject(format_args!("{}: cannot read: {e}", self.path.display()));
                return;
            }
        };
        self.missing = false;
        let mut hash = ContentHash::of(&bytes);
        if hash == self.last_seen && !force {
            return;
        }
        if trigger == Trigger::Poll {
            // No event debounced this read: it may have caught a save half
            // way. Use the content only once two reads `QUIET` apart agree.
            let give_up = Instant::now() + MAX_DEBOUNCE;
            loop {
                tokio::time::sleep(QUIET).await;
                let Ok(again) = tokio::fs::read(&self.path).await else {
                    return;
                };
                let again_hash = ContentHash::of(&again);
                if again_hash == hash || Instant::now() >= give_up {
                    break;
                }
                (bytes, hash) = (again, again_hash);
            }
        }
        self.last_seen = hash;
        if hash == self.runtime.snapshot().hash {
            self.runtime.reloads.record_unchanged();
            tracing::info!(%hash, "{why}: config unchanged");
            return;
        }
        let config = match Config::parse(&bytes, &self.path) {
            Ok(config) => config,
            Err(e) => {
                self.reject(e);
                return;
            }
        };
        let new_listener = if config.listen != self.listeners.configured() {
            match crate::server::bind(config.listen) {
                Ok(listener) => Some(listener),
                Err(e) => {
                    let own = self.listeners.local_addr();
                    let hint =
                        if e.kind() == ErrorKind::AddrInUse && own.port() == config.listen.port() {
                            format!(
                            " (lb itself holds {own}; moving to another IP on the same port needs \
                             a restart, or a reload via another port first)"
                        )
                        } else {
                            String::new()
                        };
                    self.reject(format_args!(
                        "cannot listen on {}: {e}{hint}",
                        config.listen
                    ));
                    return;
                }
            }
        } else {
            None
        };
        let listen = config.listen;
        let summary = self.runtime.apply(config, hash);
        if let Some(listener) = new_listener {
            self.listeners.replace(listener, listen);
        }
        tracing::info!("config reloaded ({why}): {summary}");
    }

    fn reject(&self, error: impl std::fmt::Display) {
        self.runtime.reloads.record_rejected(error.to_string());
        tracing::error!("config reload rejected, keeping the last good config: {error}");
    }
}

/// What woke the reloader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// File-system events, already debounced.
    Event,
    /// The backstop poll, or the check at startup: no event debounced the
    /// read, so it must settle.
    Poll,
    /// SIGHUP or `ReloadHandle::reload`: re-try even content seen before.
    Request,
}

/// Waits until events stop arriving for `QUIET`, at most `MAX_DEBOUNCE`.
async fn debounce(events: &Notify) {
    let give_up = Instant::now() + MAX_DEBOUNCE;
    loop {
        let quiet_until = (Instant::now() + QUIET).min(give_up);
        if timeout_at(quiet_until, events.notified()).await.is_err() || Instant::now() >= give_up {
            return;
        }
    }
}

/// The notify watcher and what it currently watches.
struct FsWatch {
    watcher: RecommendedWatcher,
    /// Directory the symlink chain ends in, when it differs from the file's own.
    target_dir: Option<PathBuf>,
}

impl FsWatch {
    fn start(path: &Path, events: Arc<Notify>) -> Option<Self> {
        let handler = move |event: notify::Result<notify::Event>| match event {
            Ok(event) if is_change(&event.kind) => events.notify_one(),
            Ok(_) => {}
            // Overflow and the like: re-read to be safe.
            Err(_) => events.notify_one(),
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config file; relying on polling and SIGHUP");
                return None;
            }
        };
        if let Err(e) = watcher.watch(&parent(path), RecursiveMode::NonRecursive) {
            tracing::warn!(error = %e, dir = %parent(path).display(), "cannot watch the config directory; relying on polling and SIGHUP");
        }
        let mut w = FsWatch {
            watcher,
            target_dir: None,
        };
        w.rewatch(path);
        Some(w)
    }

    /// Re-arms the watches that a replaced file or a moved symlink target
    /// invalidates: the file itself (a new inode after rename-over) and the
    /// directory its symlinks resolve to.
    fn rewatch(&mut self, path: &Path) {
        let _ = self.watcher.unwatch(path);
        let _ = self.watcher.watch(path, RecursiveMode::NonRecursive);
        let target_dir = std::fs::canonicalize(path)
            .ok()
            .map(|p| parent(&p))
            .filter(|d| std::fs::canonicalize(parent(path)).ok().as_ref() != Some(d));
        if target_dir != self.target_dir {
            if let Some(old) = self.target_dir.take() {
                let _ = self.watcher.unwatch(&old);
            }
            if let Some(dir) = &target_dir {
                let _ = self.watcher.watch(dir, RecursiveMode::NonRecursive);
            }
            self.target_dir = target_dir;
        }
    }
}

/// Everything but reads: lb's own reads of the file must not wake it again.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}
