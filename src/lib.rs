//! lb: a load-balancing HTTP reverse proxy whose whole behaviour comes from
//! one `config.yaml` that can be edited while it runs.
//!
//! # Layout
//!
//! Imports flow one way, top to bottom; `python3 ../shared/tools/imports.py
//! src` checks that no loop exists among these modules:
//!
//! ```text
//! main → process → lib → {reload, admin, health, discovery} → net → {http, tcp} → io → core → obs → config → tls
//! ```
//!
//! * [`tls`]: certificate and key pairs read from PEM and checked against
//!   each other, the SNI certificate store behind the handshake resolver,
//!   the ClientHello's server name read without terminating; nothing of the
//!   proxy (config checks its files with it).
//! * [`config`]: `config.yaml` → validated, immutable [`config::Config`]
//!   (raw serde structs → `validate()`, with env overrides): listeners
//!   (`listeners:`, or the one `listen`/`mode`/`tls`), pools (each with its
//!   strategy, retry, health, steering and DNS `discovery`),
//!   routes and their host/path/SNI patterns, `tls:`; every error a
//!   [`config::Diagnostic`], `file:line:col: key: message`; and
//!   [`config::ConfigDiff`]: what a reload changes, key by key.
//! * [`obs`]: the counters every layer bumps ([`obs::metrics`]), the
//!   access log, lb's own log, and [`obs::local`]: lb's own resource
//!   shortages, the one classification every path asks so no backend is
//!   blamed for them.
//! * [`core`], protocol-free (no hyper, no sockets): the live
//!   [`core::runtime::Runtime`] with its current [`core::runtime::Snapshot`]
//!   behind one `ArcSwap` (config, one [`core::runtime::Pool`] per pool —
//!   backends, selector, affinity tables, retry budget — and the
//!   [`core::route::Router`]); per-backend state keyed by (pool, address)
//!   ([`core::state`]), so it survives reloads; the strategies
//!   ([`core::selection`]); the retry budget; the passive-health verdict
//!   ([`core::passive`]), the one place any path charges a backend;
//!   [`core::failure`]: how an attempt failed; connection and upgrade counts;
//!   [`core::discovered`]: what DNS found for each discovered pool.
//! * [`io`]: byte movers shared by both protocol sides: [`io::tunnel`]
//!   (both ways, half-close, idle bound) and [`io::stall`] (the bound on
//!   each wait for a peer mid-exchange).
//! * [`http`]: one client connection ([`http::server`]: hyper for
//!   HTTP/1.1 and h2c, or the `httparse` fast path in [`http::fast`], which
//!   hands what it does not serve to hyper); per-request header work and
//!   routing ([`http::proxy`]); the attempt loop that sends a request to its
//!   pool and retries it ([`http::retry`]); bodies; the per-worker backend
//!   clients ([`http::client`]: HTTP/1.1, and HTTP/2 to `protocol: h2c`
//!   pools); `Upgrade` pass-through; affinity cookies; the HTTP/2 stream
//!   watchdog ([`http::h2_stream`]); gRPC calls ([`http::grpc`]: which
//!   requests are, lb's own answers to them).
//! * [`tcp`]: `mode: tcp`, layer-4 proxying: the catch-all pool, or a
//!   pool picked by the TLS server name (passed through, or terminated).
//! * [`net`]: listening sockets (one per worker, `SO_REUSEPORT`), accept
//!   loops, the connection cap, the worker threads, TLS termination and the
//!   certificates that follow their files ([`net::tls`]); it hands each
//!   accepted connection to `http` or `tcp`.
//! * [`health`]: active health checks, and the verdict when they hold a
//!   whole pool down.
//! * [`discovery`]: pools whose backends a DNS name gives (A/AAAA or SRV,
//!   hickory-resolver), one follower task per pool, handing each new set to
//!   the runtime ([`core::discovered`] keeps it across reloads).
//! * [`reload`]: file watching, polling and SIGHUP-driven reloads.
//! * [`process`]: lb as a process, what `main.rs` hands over to: `--check`,
//!   signals (SIGHUP reloads; SIGTERM/SIGINT: shutdown delay, grace, a
//!   second signal exits at once), loading, binding and starting [`Lb`].
//! * [`admin`]: the admin listener (`/metrics` through
//!   [`admin::exposition`], `/status`, `/healthz`, `/readyz`, `POST /reload`).
//!
//! [`Lb::start`] wires these together on a bound listener, so tests can bind
//! `127.0.0.1:0`; `main.rs` only parses the CLI, starts logging
//! ([`obs::logging::init`]) and calls [`process::main`], which binds and
//! calls [`Lb::start`].

pub mod admin;
pub mod config;
pub mod core;
pub mod discovery;
pub mod health;
pub mod http;
pub mod io;
pub mod net;
pub mod obs;
pub mod process;
pub mod reload;
pub mod tcp;
pub mod tls;

/// `lb --version` and `/status`: the crate version, with the git commit
/// when the build knew it (see build.rs).
pub const VERSION: &str = env!("BUILD_LB_VERSION");
/// The commit lb was built from, when known.
pub const GIT_COMMIT: Option<&str> = option_env!("BUILD_LB_COMMIT");

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::config::{Config, ContentHash};
use crate::core::runtime::Runtime;
use crate::http::server::Http1;
use crate::net::listen::{self, Listeners};
use crate::net::workers::Workers;
use crate::reload::{ReloadHandle, WatchSettings};

/// At shutdown, how long the access log may take to write out its queue.
const ACCESS_LOG_FLUSH: Duration = Duration::from_millis(250);

/// At shutdown, how long the background tasks may take to end once told
/// to stop. Each ends at its next await point, so only a bug (a task stuck
/// outside any await) takes more than microseconds.
const TASKS_STOP: Duration = Duration::from_secs(1);

/// At shutdown, once the grace ran out and what was still open was told to
/// end (a gRPC response its `grpc-status: 14` trailers, an upgraded
/// connection its close), how long their connections may take to send
/// those last frames and close before the workers' runtimes are dropped
/// and every connection left is cut.
const LAST_FRAMES: Duration = Duration::from_secs(1);

/// How a running lb finds and follows its config file.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file reloads re-read.
    pub config_path: PathBuf,
    pub watch: WatchSettings,
    /// Worker threads serving clients (`--workers`; default one per core).
    pub workers: NonZeroUsize,
    /// Which code serves HTTP/1 (`--http1`).
    pub http1: Http1,
    /// lb's own log lines dropped so far, for `/metrics`
    /// ([`obs::logging::Logging::dropped_lines`]).
    pub log_lines_dropped: obs::logging::DroppedLines,
}

impl Settings {
    /// Defaults for everything but the file: one worker per core, the fast
    /// HTTP/1 path.
    pub fn new(config_path: PathBuf, watch: WatchSettings) -> Self {
        Settings {
            config_path,
            watch,
            workers: net::workers::default_count(),
            http1: Http1::default(),
            log_lines_dropped: obs::logging::DroppedLines::default(),
        }
    }
}

/// A running proxy: accept loop, health checker and reloader.
#[derive(Debug)]
pub struct Lb {
    runtime: Arc<Runtime>,
    listeners: Arc<Listeners>,
    reload: ReloadHandle,
    /// The worker threads; dropping the last reference stops them.
    workers: Arc<Workers>,
    /// The admin listener; it answers until the end of shutdown.
    admin: Arc<Admin>,
    /// `true` asks every HTTP client connection to finish and close; tcp
    /// connections run on and close when this sender is dropped.
    drain: watch::Sender<bool>,
    /// `true` (or dropping it) tells the background tasks to end: the
    /// health supervisor (which ends its probes first), the reloader and
    /// the admin listener's follower.
    stop: watch::Sender<bool>,
    /// Those tasks, by name, awaited on shutdown.
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Lb {
    /// Starts serving `listener` (bound by [`listen::bind`]) with `config`
    /// (loaded from `settings.config_path`, whose content hash is `hash`) on
    /// `settings.workers` worker threads. Health checks and the reloader run
    /// on the calling tokio runtime.
    ///
    /// `listener` serves the config's first listener; any other one
    /// `listeners:` names is bound here ([`Lb::start_bound`] takes them all).
    pub fn start(
        listener: std::net::TcpListener,
        config: Config,
        hash: ContentHash,
        settings: Settings,
    ) -> std::io::Result<Lb> {
        Self::start_logging_to(listener, config, hash, settings, None)
    }

    /// [`Lb::start`], with the access log going to `access_log` (format and
    /// writer) instead of stdout as text.
    pub fn start_logging_to(
        listener: std::net::TcpListener,
        config: Config,
        hash: ContentHash,
        settings: Settings,
        access_log: Option<(obs::access_log::Format, Box<dyn std::io::Write + Send>)>,
    ) -> std::io::Result<Lb> {
        let mut sockets = vec![listener];
        for l in &config.listeners[1..] {
            sockets.push(listen::bind_alone(l.address)?);
        }
        Self::start_bound(sockets, config, hash, settings, access_log)
    }

    /// Starts serving with one bound socket per listener of `config`, in
    /// its order, with the access log going to `access_log` (format and
    /// writer) instead of stdout as text, set before the first client can
    /// connect.
    pub fn start_bound(
        sockets: Vec<std::net::TcpListener>,
        config: Config,
        hash: ContentHash,
        settings: Settings,
        access_log: Option<(obs::access_log::Format, Box<dyn std::io::Write + Send>)>,
    ) -> std::io::Result<Lb> {
        if sockets.len() != config.listeners.len() {
            return Err(std::io::Error::other(format!(
                "{} sockets for {} listeners",
                sockets.len(),
                config.listeners.len()
            )));
        }
        tracing::info!(%hash, "config loaded: {}", config.summary());
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let workers = Arc::new(Workers::start(settings.workers)?);
        let runtime = Runtime::new(config, hash);
        let _ = runtime
            .log_lines_dropped
            .set(settings.log_lines_dropped.clone());
        if let Some((format, out)) = access_log {
            runtime.access_log.set_sink(format, out);
        }
        let (drain, drain_rx) = watch::channel(false);
        // Background tasks end on this (connections on `drain`).
        let (stop, stop_rx) = watch::channel(false);
        // Certificates before the first accept: a TLS listener never
        // serves plaintext.
        let snap = runtime.snapshot();
        let ready = snap
            .config
            .listeners
            .iter()
            .zip(sockets)
            .map(|(l, socket)| listen::Ready::new(l, socket, &runtime))
            .collect::<Result<Vec<_>, String>>()
            .map_err(std::io::Error::other)?;
        drop(snap);
        let listeners = Listeners::start(
            ready,
            Arc::clone(&runtime),
            Arc::clone(&workers),
            settings.http1,
            drain_rx,
        );
        let tls_follower = tokio::spawn(net::tls::follow(
            Arc::clone(&listeners),
            Arc::clone(&runtime),
            stop_rx.clone(),
        ));
        let health = tokio::spawn(health::supervise(Arc::clone(&runtime), stop_rx.clone()));
        let discovery = tokio::spawn(discovery::supervise(Arc::clone(&runtime), stop_rx.clone()));
        let (reload, reloader) = reload::spawn(
            settings.config_path.clone(),
            Arc::clone(&runtime),
            Arc::clone(&listeners),
            settings.watch,
            stop_rx.clone(),
        );
        let (admin, admin_follower) = Admin::start(
            Arc::clone(&runtime),
            reload.clone(),
            settings.config_path,
            stop_rx,
        );
        Ok(Lb {
            runtime,
            listeners,
            reload,
            workers,
            admin,
            drain,
            stop,
            tasks: vec![
                ("health supervisor", health),
                ("config reloader", reloader),
                ("admin follower", admin_follower),
                ("certificate follower", tls_follower),
                ("dns discovery", discovery),
            ],
        })
    }

    /// Where the admin listener answers, if one is configured and bound.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr()
    }

    /// Sends the access log to `out` in `format` instead of stdout as
    /// text; effective only before the first request is logged (prefer
    /// [`Lb::start_logging_to`], which sets it before accepting).
    pub fn set_access_log(
        &self,
        format: obs::access_log::Format,
        out: Box<dyn std::io::Write + Send>,
    ) {
        self.runtime.access_log.set_sink(format, out);
    }

    /// The first step of shutdown: `/readyz` answers 503 from now on, so
    /// load balancers stop sending new clients, while lb keeps serving.
    pub fn begin_shutdown(&self) {
        self.runtime
            .shutting_down
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Where clients can connect to the first listener now (changes when
    /// `listen` is reloaded).
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners.local_addr()
    }

    /// Where clients can connect to the listener named `name` now (a file
    /// without `listeners:` has one, `default`).
    pub fn local_addr_of(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.local_addr_of(name)
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Re-reads the config file now, as SIGHUP does.
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
    }

    /// Stops accepting, lets open connections finish their requests (tcp
    /// mode: run) for up to `grace` (upgraded ones included; they are closed
    /// then, and response bodies still waiting on their backend are ended:
    /// a gRPC call with `grpc-status: 14`, any other body with a reset or
    /// a closed connection, given up to `LAST_FRAMES` to go out), then
    /// stops everything; open tcp connections are closed when this
    /// returns. `/readyz` says 503 throughout; the admin listener answers
    /// until the end. Health checks, the reloader and the admin
    /// follower are told to stop at once and have ended when this returns
    /// (one still running a second later is named in a warning and left
    /// behind, never aborted).
    pub async fn shutdown(self, grace: Duration) {
        self.begin_shutdown();
        self.listeners.stop();
        let _ = self.stop.send(true);
        let _ = self.drain.send(true);
        let tasks_deadline = tokio::time::Instant::now() + TASKS_STOP;
        let (drain, grace_period) = (&self.drain, &self.runtime.grace);
        let connections = async {
            if tokio::time::timeout(grace, drain.closed()).await.is_err() {
                tracing::warn!("connections still open after {grace:?}; closing them");
                grace_period.run_out();
                // Bounded: a connection that cannot send its last frames (a
                // client not reading) is cut with the runtimes.
                let _ = tokio::time::timeout(LAST_FRAMES, drain.closed()).await;
            }
        };
        let tasks = self.tasks;
        let tasks = async move {
            for (name, task) in tasks {
                match tokio::time::timeout_at(tasks_deadline, task).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!("{name} failed: {e}"),
                    Err(_) => tracing::warn!("{name} did not stop within {TASKS_STOP:?}"),
                }
            }
        };
        tokio::join!(connections, tasks);
        self.admin.stop();
        let access_log = Arc::clone(&self.runtime);
        // The writer thread blocks: flush it off the async workers. Bounded
        // whatever the sink does (a stdout nobody reads).
        let _ = tokio::task::spawn_blocking(move || {
            if !access_log.access_log.flush(ACCESS_LOG_FLUSH) {
                tracing::warn!(
                    "access log not flushed within {ACCESS_LOG_FLUSH:?}: its last lines are lost"
                );
            }
        })
        .await;
        // Last: the workers' runtimes go, and every connection still on them.
        drop(self.workers);
    }
}
